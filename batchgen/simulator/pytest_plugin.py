"""pytest fixtures for code that talks to the simulator (registered as a ``pytest11`` plugin).

- ``simulator``: a running simulator with the default config (latency 0.5-1.5 s, 8 workers).
- ``simulator_factory(**settings)``: starts one per call with ``SimulatorConfig(**settings)``
  (``subprocess=True`` runs it in a child process); all are stopped when the test ends.

Collection stays cheap: nothing heavy is imported until a fixture is used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .server import Simulator

SimulatorFactory = Callable[..., "Simulator"]


@pytest.fixture
def simulator_factory() -> Iterator[SimulatorFactory]:
    """Start simulators with custom settings; each is stopped at the end of the test."""
    from .config import SimulatorConfig
    from .server import Simulator

    started: list[Simulator] = []

    def factory(*, subprocess: bool = False, **settings: Any) -> Simulator:
        sim = Simulator(SimulatorConfig(**settings), subprocess=subprocess)
        started.append(sim.start())
        return sim

    try:
        yield factory
    finally:
        for sim in reversed(started):
            sim.stop()


@pytest.fixture
def simulator(simulator_factory: SimulatorFactory) -> Simulator:
    """A running simulator with the default settings."""
    return simulator_factory()
