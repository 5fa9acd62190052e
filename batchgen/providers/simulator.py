"""The ``simulator`` provider: the embedded RunComfy-compatible server, driven over real HTTP.

:func:`start_simulator_provider` starts :class:`batchgen.simulator.Simulator` on a free loopback
port (configured from the manifest's ``simulator:`` settings) and returns a
:class:`SimulatorProvider` — a :class:`~batchgen.providers.runcomfy.RunComfyProvider` pointed at it
with the simulator's own token. Invariants:

- The RunComfy code path is exercised unchanged: the simulator is only a base URL and a token.
- ``RUNCOMFY_API_TOKEN`` and ``RUNCOMFY_BASE_URL`` are never read: a dry run cannot reach the
  paid API nor send the real token to the simulator.
- Closing the provider stops the simulator it started (and only that one).
- ``batchgen.simulator`` is imported lazily, inside the factory, so importing providers never
  pulls in the server (starlette/uvicorn) for real runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import ManifestError
from .runcomfy import RunComfyProvider

if TYPE_CHECKING:
    from batchgen.simulator import SimulatorConfig


class _RunningSimulator(Protocol):
    """What the provider needs of a started ``batchgen.simulator.Simulator``."""

    @property
    def base_url(self) -> str: ...
    @property
    def token(self) -> str: ...
    def stop(self) -> None: ...


class SimulatorProvider(RunComfyProvider):
    """A RunComfyProvider that owns the simulator it talks to; closing it stops the server."""

    name = "simulator"

    def __init__(self, server: _RunningSimulator, **options: Any) -> None:
        super().__init__(base_url=server.base_url, token=server.token, **options)
        self.server = server
        self._server_stopped = False

    async def aclose(self) -> None:
        """Close connections, then stop the simulator (idempotent)."""
        try:
            await super().aclose()
        finally:
            if not self._server_stopped:
                self._server_stopped = True
                # stopping joins the server thread or child process: keep the event loop free
                await asyncio.to_thread(self.server.stop)


def simulator_config(settings: object = None) -> SimulatorConfig:
    """A ``SimulatorConfig`` from the manifest's ``simulator:`` settings (model, mapping or None).

    The server always listens on 127.0.0.1 on a free port with a fresh random token.
    """
    from batchgen.simulator import SimulatorConfig

    if isinstance(settings, SimulatorConfig):
        return settings
    data: dict[str, Any]
    if settings is None:
        data = {}
    elif isinstance(settings, Mapping):
        data = dict(settings)
    elif hasattr(settings, "model_dump"):  # the manifest's pydantic SimulatorSettings
        data = dict(settings.model_dump())
    else:
        raise TypeError(f"simulator settings must be a mapping or a model, got {type(settings)}")
    data = {key: value for key, value in data.items() if value is not None}
    for key in ("host", "port", "token"):
        data.pop(key, None)
    try:
        return SimulatorConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise ManifestError.at("manifest", None, "simulator", str(exc)) from exc


def start_simulator_provider(
    *,
    simulator: object = None,
    subprocess: bool = False,
    **options: Any,
) -> SimulatorProvider:
    """Start a simulator and return a provider talking to it (the ``simulator`` factory).

    :param simulator: the manifest's ``simulator:`` settings (or a mapping, or a SimulatorConfig)
    :param subprocess: run the server in a child process instead of a thread (keeps its CPU off
        the runner's GIL)
    :param options: passed to :class:`RunComfyProvider` (``timeout``, ``max_connections``, ...)
    """
    from batchgen.simulator import Simulator

    for forbidden in ("base_url", "token"):
        if forbidden in options:
            raise TypeError(f"the simulator provider sets {forbidden} itself")
    server = Simulator(simulator_config(simulator), subprocess=subprocess)
    server.start()
    try:
        return SimulatorProvider(server, **options)
    except BaseException:
        server.stop()
        raise
