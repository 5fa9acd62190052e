"""The embedded RunComfy Model API simulator: a real HTTP server for dry runs, tests, benchmarks.

It speaks the API as ``shared/spec/runcomfy-model-api.md`` gives it (so the real provider runs
against it unchanged, only the base URL differs), runs requests on a virtual GPU pool with a
seeded latency, serves real images of the requested size and format, injects faults on demand,
and counts everything under ``/_simulator/``. It imports nothing of the runner.

    from batchgen.simulator import Simulator, SimulatorConfig
    with Simulator(SimulatorConfig(workers=4, latency="1-2s")) as sim:
        ...  # RUNCOMFY_BASE_URL=sim.base_url, token sim.token
        sim.metrics()
"""

from .config import FAULT_OPTIONS, FaultOption, Faults, SimulatorConfig
from .server import Simulator

__all__ = ["FAULT_OPTIONS", "FaultOption", "Faults", "Simulator", "SimulatorConfig"]
