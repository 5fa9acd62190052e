"""The ``batchgen`` command line: a click group whose commands live one module per concern.

Each command parses its arguments, calls the library and renders the result; nothing here holds
logic the library lacks. Errors batchgen raises on purpose become one clear message on stderr and
their exit code; anything else is a bug and keeps its traceback (set ``BATCHGEN_RAISE_ERRORS=1`` to
see tracebacks for expected errors too).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import click

from .. import __version__
from ..errors import BatchgenError

#: exit codes, as TARGETS.md U3 gives them
EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_FATAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class BatchgenGroup(click.Group):
    """A click group that turns ``BatchgenError`` into a message and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BatchgenError as exc:
            if os.environ.get("BATCHGEN_RAISE_ERRORS"):
                raise
            click.echo(f"Error: {exc}", err=True)
            sys.exit(exc.exit_code)


@click.group(cls=BatchgenGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="batchgen")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """Turn one YAML manifest into thousands of generated images, resumably.

    Example:

    \b
        batchgen validate manifests/demo.yaml
        batchgen plan manifests/demo.yaml
        batchgen run manifests/demo.yaml
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


# Command modules register themselves on import; the order here is the order in --help.
from . import planning, running, simulating, outputs  # noqa: E402,F401,I001
