"""Helpers shared by the command modules: manifests, state paths, JSON output."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from ..manifest import Manifest, load_manifest

#: the flag every command that touches state accepts
state_option = click.option(
    "--state",
    "state_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="State database (default: the manifest's `state`, else $BATCHGEN_STATE_DIR/<name>.db, "
    "else state/<name>.db).",
)

manifest_argument = click.argument(
    "manifest_path", metavar="MANIFEST", type=click.Path(dir_okay=False, path_type=Path)
)


def load(manifest_path: Path, state_path: Path | None = None) -> Manifest:
    """Load a manifest (errors propagate as ManifestError → exit 2), applying ``--state``."""
    manifest = load_manifest(manifest_path)
    if state_path is not None:
        manifest = manifest.model_copy(update={"state": state_path.resolve()})
    return manifest


def echo_json(data: Any) -> None:
    """Print ``data`` as indented JSON on stdout."""
    json.dump(data, sys.stdout, indent=2, sort_keys=False, default=str, ensure_ascii=False)
    sys.stdout.write("\n")
