"""batchgen commands for what a run leaves behind: ``export`` (dataset tables) and ``grid``."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import ManifestError
from ..export import FORMATS, write_outputs
from ..grid import DEFAULT_TILE, make_grid, parse_where
from ..manifest import Manifest
from ..store import Store
from . import cli
from .common import echo_json, load, manifest_argument, state_option


def _open_state(manifest: Manifest) -> Store:
    """The manifest's state, read-only (a run may be writing it); never creates one."""
    path = Path(manifest.state)
    if not path.is_file():
        raise ManifestError.at(
            manifest.path,
            None,
            "state",
            f"no state database at {path}: run `batchgen run {manifest.path.name}` first "
            "(or point --state at the right file)",
        )
    return Store(path, readonly=True)


@cli.command()
@manifest_argument
@state_option
@click.option(
    "--format",
    "formats",
    multiple=True,
    type=click.Choice(FORMATS),
    help="Also write the table as images.csv / images.parquet (repeatable); metadata.jsonl is "
    "always written.",
)
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def export(
    manifest_path: Path, state_path: Path | None, formats: tuple[str, ...], as_json: bool
) -> None:
    """Write metadata.jsonl, failures.jsonl and stats.json at the output root.

    metadata.jsonl has one row per downloaded image of a done job (file_name, job_id, model,
    sweep, prompt, seed, every parameter, the prompt's metadata columns, request_id, size,
    sha256, timings); `datasets.load_dataset("imagefolder", data_dir=OUTPUT)` loads it.
    failures.jsonl lists failed and unknown jobs with their error class and reason; stats.json
    has counts by state, duration, images per minute, estimated cost and an error histogram.

    Example:

    \b
        batchgen export manifests/demo.yaml
        batchgen export manifests/demo.yaml --format csv --format parquet
    """
    manifest = load(manifest_path, state_path)
    store = _open_state(manifest)
    try:
        report = write_outputs(store, manifest, formats=("jsonl", *formats))
    finally:
        store.close()
    if as_json:
        echo_json(
            {
                "output": str(report.output_dir),
                "files": {k: str(v) for k, v in report.files.items()},
                "images": report.images,
                "failures": report.failures,
                "missing": report.missing,
                "columns": list(report.columns),
                "stats": report.stats,
            }
        )
        return
    click.echo(f"{report.images} images, {len(report.columns)} columns → {report.files['jsonl']}")
    for kind in ("csv", "parquet"):
        if kind in report.files:
            click.echo(f"same table → {report.files[kind]}")
    click.echo(f"{report.failures} failed or unknown jobs → {report.files['failures']}")
    click.echo(f"stats → {report.files['stats']}")
    if report.missing:
        click.echo(
            f"warning: {report.missing} images recorded as downloaded are not on disk "
            "and were left out",
            err=True,
        )


@cli.command()
@manifest_argument
@state_option
@click.option(
    "--x",
    "x",
    required=True,
    metavar="AXIS",
    help="Axis across: a parameter that varies, or prompt, model, seed, sample, sweep.",
)
@click.option("--y", "y", required=True, metavar="AXIS", help="Axis down (same choices).")
@click.option(
    "--z",
    "z",
    default=None,
    metavar="AXIS",
    help="Third axis: one sheet per value, named <out>-NN-<value>.png.",
)
@click.option("--sweep", default=None, metavar="NAME", help="Only this sweep's jobs.")
@click.option(
    "--where",
    "where",
    multiple=True,
    metavar="KEY=VALUE",
    help="Keep jobs whose parameter or prompt column equals VALUE (repeatable; "
    "one key given twice means either value).",
)
@click.option(
    "--sample",
    type=int,
    default=None,
    metavar="N",
    help="Draw only repeat N (0-based) instead of all repeats side by side.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    metavar="FILE.png",
    help="Where to write (default: <output>/contact-sheet.png).",
)
@click.option(
    "--tile",
    type=int,
    default=DEFAULT_TILE,
    show_default=True,
    metavar="PX",
    help="Side of each image tile in pixels.",
)
def grid(
    manifest_path: Path,
    state_path: Path | None,
    x: str,
    y: str,
    z: str | None,
    sweep: str | None,
    where: tuple[str, ...],
    sample: int | None,
    out: Path | None,
    tile: int,
) -> None:
    """Draw a labelled X/Y(/Z) contact sheet of a sweep's images as PNG.

    Cells with no image show why (pending, failed and the reason, not run yet). Every parameter
    that varies in the selection must be an axis or be fixed with --where; repeats (sample,
    seed) are drawn side by side unless --sample picks one.

    Example:

    \b
        batchgen grid manifests/demo.yaml --x aspect_ratio --y prompt --out sheet.png
        batchgen grid manifests/demo.yaml --x seed --y prompt --z resolution --where model=...
    """
    manifest = load(manifest_path, state_path)
    store = _open_state(manifest)
    try:
        paths = make_grid(
            store,
            manifest,
            x,
            y,
            z,
            sweep=sweep,
            where=parse_where(where),
            sample=sample,
            out=out,
            tile=tile,
        )
    finally:
        store.close()
    for path in paths:
        click.echo(str(path))
