"""Run benchmarks: ``python -m bench all [--small]`` or ``python -m bench NAME [--small]``.

Each benchmark is a module ``bench/<name>.py`` with ``run(small: bool) -> dict``: it measures
batchgen and its baseline in the same run, prints its figures, and returns them; this driver
writes them to ``bench/results/<name>.json``. ``--small`` is the quick version CI runs so that no
benchmark rots.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
from pathlib import Path

#: every benchmark, in the order ``all`` runs them (the simulator's own capacity first)
BENCHMARKS = [
    "simulator_capacity",
    "planning",
    "utilisation",
    "overhead",
    "rate_limits",
    "storm_429",
    "polling",
    "downloads",
    "soak",
    "crash",
]

RESULTS = Path(__file__).parent / "results"


def _available() -> list[str]:
    here = Path(__file__).parent
    return [name for name in BENCHMARKS if (here / f"{name}.py").exists()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("name", help="a benchmark name, or 'all'", choices=["all", *_available()])
    parser.add_argument("--small", action="store_true", help="the quick version CI runs")
    args = parser.parse_args(argv)
    names = _available() if args.name == "all" else [args.name]
    RESULTS.mkdir(exist_ok=True)
    failed = []
    for name in names:
        print(f"\n=== bench {name}{' (small)' if args.small else ''} ===", flush=True)
        module = importlib.import_module(f"bench.{name}")
        started = time.perf_counter()
        figures = module.run(small=args.small)
        figures["_meta"] = {
            "small": args.small,
            "seconds": round(time.perf_counter() - started, 2),
            "machine": f"{platform.machine()} {platform.python_version()} ({_cores()} cores)",
        }
        (RESULTS / f"{name}{'-small' if args.small else ''}.json").write_text(
            json.dumps(figures, indent=2) + "\n"
        )
        if figures.get("ok") is False:
            failed.append(name)
    if failed:
        print(f"\nbenchmarks missing their targets: {', '.join(failed)}")
    # Small runs prove the benchmarks still work; targets are judged on full runs only.
    return 1 if failed and not args.small else 0


def _cores() -> int:
    import os

    return os.cpu_count() or 1


if __name__ == "__main__":
    sys.exit(main())
