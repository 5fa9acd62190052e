"""Contact sheets: layout and pixel size, labels, placeholders, Z sheets, repeats, guards, CLI."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image, ImageStat

from batchgen import grid as grid_module
from batchgen.cli import cli
from batchgen.grid import GridError, make_grid
from batchgen.manifest import Manifest, load_manifest
from batchgen.plan import JobSpec, expand
from batchgen.registry import ModelRegistry
from batchgen.store import Output, Store

NANO = "google/nano-banana/pro/text-to-image"
LONG_PROMPT = (
    "a lighthouse at dusk on a rocky coast, long exposure, waves breaking over the rocks, "
    "the beam sweeping across low clouds"
)
TILE = 64


def _write_manifest(tmp_path: Path, *, repeat: int = 1, extra: str = "") -> Manifest:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "grid.yaml"
    path.write_text(
        "name: grid-test\n"
        "provider: simulator\n"
        f"output: {tmp_path / 'out'}\n"
        f"state: {tmp_path / 'state.db'}\n"
        "sweeps:\n"
        "  - name: ratios\n"
        f"    model: {NANO}\n"
        f"    prompts: ['a red fox', '{LONG_PROMPT}']\n"
        "    grid:\n"
        "      aspect_ratio: ['1:1', '16:9', '9:16']\n"
        "      resolution: ['1K', '2K']\n"
        f"    repeat: {repeat}\n" + extra,
        encoding="utf-8",
    )
    return load_manifest(path)


def _color(spec: JobSpec) -> tuple[int, int, int]:
    """A colour of its own for every job, so a tile can be traced back to its image."""
    digest = hashlib.sha256(spec.id.encode()).digest()
    return (digest[0] // 2 + 20, digest[1] // 2 + 20, digest[2] // 2 + 20)


_SIZES = {"1:1": (40, 40), "16:9": (64, 36), "9:16": (36, 64)}


def _finish(store: Store, root: Path, spec: JobSpec) -> None:
    store.mark_submitting(spec.id)
    store.mark_queued(spec.id, f"req-{spec.position}")
    store.mark_running(spec.id)
    store.mark_downloading(spec.id, [f"https://cdn.example/{spec.id}.png"])
    rel = f"nano/p{spec.position:03d}/img__s{spec.sample}.png"
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = _SIZES[spec.params["aspect_ratio"]]
    Image.new("RGB", (w, h), _color(spec)).save(path)
    data = path.read_bytes()
    store.record_output(
        Output(
            spec.id,
            0,
            f"https://cdn.example/{spec.id}.png",
            rel,
            len(data),
            hashlib.sha256(data).hexdigest(),
            w,
            h,
            "image/png",
        )
    )
    store.mark_done(spec.id)


@dataclass
class Sweep:
    store: Store
    manifest: Manifest
    specs: list[JobSpec]

    def spec(self, prompt: str, ratio: str, resolution: str = "1K", sample: int = 0) -> JobSpec:
        return next(
            s
            for s in self.specs
            if s.params["prompt"] == prompt
            and s.params["aspect_ratio"] == ratio
            and s.params["resolution"] == resolution
            and s.sample == sample
        )


def _populate(store: Store, manifest: Manifest) -> list[JobSpec]:
    specs = expand(manifest, ModelRegistry.default())
    store.sync(specs)
    return specs


@pytest.fixture
def sweep(tmp_path: Path) -> Iterator[Sweep]:
    """2 prompts x 3 aspect ratios x 2 resolutions; all done but one failed and one pending."""
    manifest = _write_manifest(tmp_path)
    store = Store(memory=True)
    specs = _populate(store, manifest)
    s = Sweep(store, manifest, specs)
    failed, pending = s.spec(LONG_PROMPT, "16:9"), s.spec(LONG_PROMPT, "9:16")
    for spec in specs:
        if spec.id == failed.id:
            store.mark_submitting(spec.id)
            store.mark_failed(spec.id, "rejected", "prompt blocked by the safety filter")
        elif spec.id != pending.id:
            _finish(store, Path(manifest.output), spec)
    yield s
    store.close()


def _variance(img: Image.Image) -> float:
    return sum(ImageStat.Stat(img.convert("RGB")).var)


RATIOS = ("aspect_ratio", ["1:1", "16:9", "9:16"])
PROMPTS = ("prompt", ["a red fox", LONG_PROMPT])


def _layout(
    x: tuple[str, list[str]], y: tuple[str, list[str]], repeats: int = 1
) -> grid_module._Layout:
    """The layout make_grid computes for these axes (label sizes depend on the font)."""
    axes = []
    for name, values in (x, y):
        axis = grid_module._Axis(name)
        for v in values:
            axis.add(v)
        axes.append(axis)
    return grid_module._layout(axes[0], axes[1], repeats, TILE)


def test_two_by_three_sheet_has_the_expected_size_and_tiles(sweep: Sweep, tmp_path: Path) -> None:
    out = tmp_path / "sheet.png"
    paths = make_grid(
        sweep.store,
        sweep.manifest,
        "aspect_ratio",
        "prompt",
        where={"resolution": "1K"},
        out=out,
        tile=TILE,
    )
    assert paths == [out]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask  # like any file the user writes
    sheet = Image.open(out)
    layout = _layout(RATIOS, PROMPTS)
    # 3 columns and 2 rows of 64 px tiles, 6 px apart, after the left labels and the header
    assert sheet.size == (
        layout.left + 3 * (TILE + 6) + 8,
        layout.title + layout.header + 2 * (TILE + 6) + 8,
    )
    # every done cell shows its own image: the centre pixel has that job's colour
    for col, ratio in enumerate(("1:1", "16:9", "9:16")):
        x0, y0 = layout.cell_origin(col, 0)
        centre = sheet.getpixel((x0 + TILE // 2, y0 + TILE // 2))
        assert centre == _color(sweep.spec("a red fox", ratio))
    # aspect ratio kept, letterboxed: a 16:9 image leaves bands above and below
    x0, y0 = layout.cell_origin(1, 0)
    assert sheet.getpixel((x0 + TILE // 2, y0 + 2)) == grid_module._LETTERBOX
    assert sheet.getpixel((x0 + 2, y0 + TILE // 2)) == _color(sweep.spec("a red fox", "16:9"))


def test_labels_are_drawn(sweep: Sweep, tmp_path: Path) -> None:
    out = tmp_path / "sheet.png"
    make_grid(
        sweep.store,
        sweep.manifest,
        "aspect_ratio",
        "prompt",
        where={"resolution": "1K"},
        out=out,
        tile=TILE,
    )
    sheet = Image.open(out)
    layout = _layout(RATIOS, PROMPTS)
    for col in range(3):
        x0, _ = layout.cell_origin(col, 0)
        header = sheet.crop((x0, layout.title, x0 + TILE, layout.title + layout.header))
        assert _variance(header) > 100, f"column {col} has no label"
    for row in range(2):
        _, y0 = layout.cell_origin(0, row)
        label = sheet.crop((0, y0, layout.left - 8, y0 + TILE))
        assert _variance(label) > 100, f"row {row} has no label"
    # the long prompt wraps onto several lines instead of running off the sheet
    lines = grid_module._wrap(LONG_PROMPT, layout.label_font, layout.left - 24, 99)
    assert len(lines) > 1
    assert _variance(sheet.crop((0, 0, sheet.width, layout.title))) > 100  # the title


def test_placeholders_say_why_a_cell_is_empty(sweep: Sweep, tmp_path: Path) -> None:
    out = tmp_path / "sheet.png"
    make_grid(
        sweep.store,
        sweep.manifest,
        "aspect_ratio",
        "prompt",
        where={"resolution": "1K"},
        out=out,
        tile=TILE,
    )
    sheet = Image.open(out)
    layout = _layout(RATIOS, PROMPTS)
    for col, kind, text in (
        (1, "failed", "failed: rejected: prompt blocked by the safety filter"),
        (2, "waiting", "pending"),
    ):
        x0, y0 = layout.cell_origin(col, 1)
        cell = sheet.crop((x0, y0, x0 + TILE, y0 + TILE))
        # the very tile a placeholder with that reason draws, pixel for pixel
        expected = grid_module._placeholder(TILE, kind, text, layout.tile_font)
        assert cell.tobytes() == expected.tobytes()
        assert _variance(cell) > 100  # text is on it
    failed = grid_module._placeholder(TILE, "failed", "failed: rejected: x", layout.tile_font)
    assert failed.getpixel((1, 1)) == grid_module._PLACEHOLDER["failed"]


def test_cells_without_a_job_and_jobs_not_run_yet(tmp_path: Path) -> None:
    manifest = _write_manifest(
        tmp_path, extra="    exclude:\n      - {aspect_ratio: '9:16', resolution: '2K'}\n"
    )
    with Store(memory=True) as store:
        specs = expand(manifest, ModelRegistry.default())
        # the 16:9 jobs were never synced (added to the manifest after the run): "not run yet"
        store.sync(s for s in specs if s.params["aspect_ratio"] != "16:9")
        for s in specs:
            if s.params["aspect_ratio"] != "16:9":
                _finish(store, Path(manifest.output), s)
        out = tmp_path / "sheet.png"
        make_grid(
            store,
            manifest,
            "aspect_ratio",
            "resolution",
            where={"prompt": "a red fox"},
            out=out,
            tile=TILE,
        )
    sheet = Image.open(out)
    layout = _layout(RATIOS, ("resolution", ["1K", "2K"]))
    assert sheet.size == (layout.width, layout.height)
    excluded = grid_module._placeholder(
        TILE, "missing", "no job here: excluded or not in the selection", layout.tile_font
    )
    x0, y0 = layout.cell_origin(2, 1)
    assert sheet.crop((x0, y0, x0 + TILE, y0 + TILE)).tobytes() == excluded.tobytes()
    not_run = grid_module._placeholder(TILE, "waiting", "not run yet", layout.tile_font)
    for row in (0, 1):
        x0, y0 = layout.cell_origin(1, row)
        cell = sheet.crop((x0, y0, x0 + TILE, y0 + TILE))
        assert cell.tobytes() == not_run.tobytes()


def test_jobs_without_a_parameter_axis_are_left_out(tmp_path: Path) -> None:
    flux = (
        "  - name: flux\n"
        "    model: blackforestlabs/flux-2/max/text-to-image\n"
        "    prompts: ['a red fox']\n"
        "    grid:\n"
        "      image_size: [square_hd, landscape_16_9]\n"
    )
    manifest = _write_manifest(tmp_path, extra=flux)
    with Store(memory=True) as store:
        specs = _populate(store, manifest)
        for spec in specs:
            if spec.model == NANO:
                _finish(store, Path(manifest.output), spec)
        # model and image_size vary across the manifest, but not among jobs with aspect ratios
        out = make_grid(
            store,
            manifest,
            "aspect_ratio",
            "prompt",
            where={"resolution": "1K"},
            out=tmp_path / "sheet.png",
            tile=TILE,
        )[0]
        layout = _layout(RATIOS, PROMPTS)
        assert Image.open(out).size == (layout.width, layout.height)
        # on an image_size sheet only the FLUX jobs remain, and they have one prompt
        with pytest.raises(
            GridError,
            match=r"--y prompt: does not vary in the selection "
            r"\(only 'a red fox'\); axes that vary here: seed, image_size",
        ):
            make_grid(store, manifest, "image_size", "prompt", out=tmp_path / "x.png")
        flux_sheet = make_grid(
            store,
            manifest,
            "image_size",
            "seed",
            sweep="flux",
            out=tmp_path / "flux.png",
            tile=TILE,
        )
        assert flux_sheet[0].is_file()


def test_where_on_a_prompt_column(tmp_path: Path) -> None:
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "parti.tsv").write_text(
        "Prompt\tCategory\n"
        "a red fox\tAnimals\n"
        "an owl at night\tAnimals\n"
        "a lighthouse\tOutdoor Scenes\n",
        encoding="utf-8",
    )
    path = tmp_path / "parti.yaml"
    path.write_text(
        f"name: parti\nprovider: simulator\noutput: {tmp_path / 'out'}\n"
        f"sweeps:\n  - model: {NANO}\n    prompts:\n      - file: parti.tsv\n"
        "        column: Prompt\n    grid:\n      aspect_ratio: ['1:1', '16:9']\n",
        encoding="utf-8",
    )
    manifest = load_manifest(path)
    with Store(memory=True) as store:
        _populate(store, manifest)
        out = make_grid(
            store,
            manifest,
            "aspect_ratio",
            "prompt",
            where={"Category": "Animals"},
            out=tmp_path / "animals.png",
            tile=TILE,
        )[0]
    # two animal prompts, not three prompts
    layout = _layout(
        ("aspect_ratio", ["1:1", "16:9"]), ("prompt", ["a red fox", "an owl at night"])
    )
    assert Image.open(out).size == (layout.width, layout.height)


def test_z_axis_gives_one_sheet_per_value(sweep: Sweep, tmp_path: Path) -> None:
    paths = make_grid(
        sweep.store,
        sweep.manifest,
        "aspect_ratio",
        "prompt",
        "resolution",
        out=tmp_path / "sheet.png",
        tile=TILE,
    )
    assert [p.name for p in paths] == ["sheet-01-1K.png", "sheet-02-2K.png"]
    first, second = (Image.open(p) for p in paths)
    assert first.size == second.size
    layout = _layout(RATIOS, PROMPTS)
    x0, y0 = layout.cell_origin(0, 0)
    assert first.getpixel((x0 + 32, y0 + 32)) == _color(sweep.spec("a red fox", "1:1", "1K"))
    assert second.getpixel((x0 + 32, y0 + 32)) == _color(sweep.spec("a red fox", "1:1", "2K"))


def test_repeats_side_by_side_or_one_picked(tmp_path: Path) -> None:
    manifest = _write_manifest(tmp_path, repeat=2)
    with Store(memory=True) as store:
        specs = _populate(store, manifest)
        for spec in specs:
            _finish(store, Path(manifest.output), spec)
        s = Sweep(store, manifest, specs)
        both = make_grid(
            store,
            manifest,
            "aspect_ratio",
            "prompt",
            where={"resolution": "1K"},
            out=tmp_path / "both.png",
            tile=TILE,
        )[0]
        one = make_grid(
            store,
            manifest,
            "aspect_ratio",
            "prompt",
            where={"resolution": "1K"},
            sample=1,
            out=tmp_path / "one.png",
            tile=TILE,
        )[0]
    labels = (RATIOS, PROMPTS)
    wide, narrow = _layout(*labels, repeats=2), _layout(*labels)
    sheet = Image.open(both)
    assert sheet.size == (wide.width, wide.height)
    x0, y0 = wide.cell_origin(0, 0)
    assert sheet.getpixel((x0 + 32, y0 + 32)) == _color(s.spec("a red fox", "1:1", sample=0))
    assert sheet.getpixel((x0 + TILE + 2 + 32, y0 + 32)) == _color(
        s.spec("a red fox", "1:1", sample=1)
    )
    picked = Image.open(one)
    assert picked.size == (narrow.width, narrow.height)
    x0, y0 = narrow.cell_origin(0, 0)
    assert picked.getpixel((x0 + 32, y0 + 32)) == _color(s.spec("a red fox", "1:1", sample=1))


def test_size_guards(sweep: Sweep, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = _write_manifest(tmp_path / "big", repeat=4)
    with Store(memory=True) as store:
        _populate(store, manifest)  # nothing run: the guard needs no image
        # 3 cells of 4 repeats of 2048 px side by side: over 24,000 px wide
        with pytest.raises(GridError, match=r"would be 2\d{4} × \d+ px \(at most 20000 a side\)"):
            make_grid(
                store,
                manifest,
                "aspect_ratio",
                "prompt",
                where={"resolution": "1K"},
                tile=2048,
                out=tmp_path / "big.png",
            )
        # the same with one repeat picked fits
        assert make_grid(
            store,
            manifest,
            "aspect_ratio",
            "prompt",
            where={"resolution": "1K"},
            sample=0,
            tile=32,
            out=tmp_path / "small.png",
        )
    monkeypatch.setattr(grid_module, "MAX_CELLS", 4)
    with pytest.raises(GridError, match=r"3 × 2 = 6 cells \(at most 4\)"):
        make_grid(
            sweep.store,
            sweep.manifest,
            "aspect_ratio",
            "prompt",
            where={"resolution": "1K"},
            out=tmp_path / "x.png",
            tile=TILE,
        )
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "big.png").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--x", "colour", "--y", "prompt"],
            "--x colour: not an axis of this selection; axes that vary here: prompt, aspect_ratio",
        ),
        (
            ["--x", "aspect_ratio", "--y", "model"],
            f"--y model: does not vary in the selection (only '{NANO}')",
        ),
        (
            ["--x", "aspect_ratio", "--y", "prompt"],
            "resolution varies in the selection (1K, 2K) but is not an axis:"
            " pick one value with --where resolution=1K or make it --z",
        ),
        (
            ["--x", "aspect_ratio", "--y", "prompt", "--where", "aspect_ratio=7:3"],
            "the selection is empty: no job of grid.yaml matches aspect_ratio=7:3",
        ),
        (
            ["--x", "aspect_ratio", "--y", "prompt", "--where", "colour=red"],
            "--where colour: no parameter or prompt column of that name in the selection",
        ),
        (
            ["--x", "aspect_ratio", "--y", "prompt", "--sweep", "nope"],
            "no sweep named 'nope' in grid.yaml: sweeps are ratios",
        ),
        (["--x", "aspect_ratio", "--y", "aspect_ratio"], "--x, --y and --z must be different axes"),
        (
            ["--x", "aspect_ratio", "--y", "prompt", "--where", "resolution"],
            "--where 'resolution': expected KEY=VALUE",
        ),
    ],
)
def test_bad_requests_exit_2_with_a_clear_message(
    tmp_path: Path, args: list[str], message: str
) -> None:
    manifest = _write_manifest(tmp_path)
    with Store(tmp_path / "state.db") as store:
        _populate(store, manifest)
    result = CliRunner().invoke(cli, ["grid", str(manifest.path), *args], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_cli_grid_writes_the_sheet(sweep: Sweep, tmp_path: Path) -> None:
    # the CLI opens the manifest's state file: copy the fixture's state into it
    with Store(tmp_path / "state.db") as disk:
        disk.sync(sweep.specs)
        for spec in sweep.specs:
            if spec.params["aspect_ratio"] == "1:1":
                _finish(disk, Path(sweep.manifest.output), spec)
    out = tmp_path / "cli.png"
    result = CliRunner().invoke(
        cli,
        [
            "grid",
            str(sweep.manifest.path),
            "--x",
            "aspect_ratio",
            "--y",
            "prompt",
            "--z",
            "resolution",
            "--out",
            str(out),
            "--tile",
            "48",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    written = [Path(line) for line in result.output.split()]
    assert [p.name for p in written] == ["cli-01-1K.png", "cli-02-2K.png"]
    assert all(p.is_file() and Image.open(p).format == "PNG" for p in written)


def test_cli_grid_without_state_exits_2(tmp_path: Path) -> None:
    manifest = _write_manifest(tmp_path)
    result = CliRunner().invoke(
        cli,
        ["grid", str(manifest.path), "--x", "aspect_ratio", "--y", "prompt"],
        catch_exceptions=False,
    )
    assert result.exit_code == 2
    assert "no state database at" in result.output and "batchgen run grid.yaml" in result.output
