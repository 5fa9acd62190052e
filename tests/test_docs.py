"""The README documents every command, and every command documents itself."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from batchgen.cli import cli

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
COMMANDS = sorted(cli.commands)


def test_there_are_commands() -> None:
    assert {"validate", "plan", "models", "run", "status", "retry", "cancel", "simulate"} <= set(
        COMMANDS
    )


@pytest.mark.parametrize("name", COMMANDS)
def test_command_is_in_readme(name: str) -> None:
    assert f"batchgen {name}" in README, f"README does not mention `batchgen {name}`"


@pytest.mark.parametrize("name", COMMANDS)
def test_command_has_help_with_example(name: str) -> None:
    command = cli.commands[name]
    assert isinstance(command, click.Command)
    assert command.help, f"`batchgen {name}` has no help text"
    assert "Example" in command.help, f"`batchgen {name}` help has no Example: block"
    # click rewraps paragraphs: an example block needs \\b so each command stays on its line
    example = command.help.split("Example:", 1)[1]
    assert "\b" in example, f"`batchgen {name}`: put \\b before the example lines"


def test_readme_first_screen_shows_the_two_commands() -> None:
    first_screen = "\n".join(README.splitlines()[:40])
    assert "make demo" in first_screen
    assert "make test" in first_screen
