"""``python -m batchgen.simulator``: the simulator without the CLI (used by ``subprocess=True``).

Takes the same flags as ``batchgen simulate``, or one ``--config-json`` object (``-`` reads it
from stdin: how the subprocess variant passes a whole :class:`SimulatorConfig`); prints the
banner whose first line is ``batchgen simulator listening on <base URL>``, and serves until
SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import sys

from .config import FAULT_OPTIONS, SimulatorConfig, config_from_flags
from .server import serve_forever


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m batchgen.simulator", description=__doc__)
    parser.add_argument(
        "--config-json", help="a whole SimulatorConfig as JSON, '-' to read it from stdin"
    )
    parser.add_argument("--host", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", help="port (default 0: a free one)")
    parser.add_argument("--token", help="bearer token to accept (default: generated)")
    parser.add_argument("--latency", help="run time per request: 2, 2s, 500ms, 1-5s (0.5-1.5s)")
    parser.add_argument("--workers", help="requests that run at once (default 8)")
    parser.add_argument("--seed", help="random seed (default 0)")
    parser.add_argument("--image-mode", choices=["full", "small"], help="default full")
    parser.add_argument("--fail-rate", help="probability a job ends failed (= --job-failure)")
    for option in FAULT_OPTIONS:
        parser.add_argument(option.flag, dest=option.name, help=option.help)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse flags, serve until interrupted."""
    args = vars(_parser().parse_args(argv))
    raw = args.pop("config_json")
    if raw == "-":
        raw = sys.stdin.read()
    try:
        config = SimulatorConfig.from_dict(json.loads(raw)) if raw else config_from_flags(args)
    except ValueError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    serve_forever(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
