"""``batchgen simulate``: run the embedded RunComfy Model API simulator until Ctrl-C."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from ..simulator.config import FAULT_OPTIONS, config_from_flags
from ..simulator.server import serve_forever
from . import cli

F = TypeVar("F", bound=Callable[..., Any])


def _fault_flags(function: F) -> F:
    """One ``--<fault>`` option per simulator fault (names from ``FAULT_OPTIONS``)."""
    for option in reversed(FAULT_OPTIONS):
        metavar = {"probability": "P", "seconds": "DURATION", "rate": "RPS"}[option.kind]
        function = click.option(
            option.flag,
            option.name,
            metavar=metavar,
            default=None,
            help=option.help[0].upper() + option.help[1:] + ".",
        )(function)
    return function


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", type=int, default=8000, show_default=True, help="Port (0: a free one).")
@click.option("--token", default=None, help="Bearer token to accept (default: generated).")
@click.option(
    "--latency",
    metavar="SPEC",
    default="0.5-1.5s",
    show_default=True,
    help="Run time per request: 2, 2s, 500ms, or a range 1-5s (uniform).",
)
@click.option("--workers", type=int, default=8, show_default=True, help="Requests run at once.")
@click.option(
    "--fail-rate", metavar="P", default=None, help="Probability a job ends failed (0-1 or 5%)."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of every random draw.")
@click.option(
    "--image-mode",
    type=click.Choice(["full", "small"]),
    default="full",
    show_default=True,
    help="full: the size the parameters ask for; small: longest side 256 (benchmarks).",
)
@_fault_flags
def simulate(**values: Any) -> None:
    """Serve a local RunComfy Model API (for dry runs, tests and benchmarks) until Ctrl-C.

    Prints its base URL and the token it accepts. Every fault is off unless its flag is given;
    probabilities are per call (0.05 or 5%), durations take units (2, 2s, 500ms).

    Example:

    \b
        batchgen simulate --port 8000 --latency 1-5s --workers 4 --fail-rate 0.05
        RUNCOMFY_BASE_URL=http://127.0.0.1:8000 RUNCOMFY_API_TOKEN=<token> batchgen run m.yaml
    """
    try:
        config = config_from_flags(values)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    try:
        serve_forever(config, echo=click.echo)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {config.host}:{config.port}: {exc}") from exc
