"""Contact sheets: a labelled X/Y(/Z) grid of a sweep's images, like AUTOMATIC1111's X/Y/Z plot.

:func:`make_grid` selects jobs of the manifest (optionally one sweep, optionally filtered with
``where``), lays them out with one axis across, one down and an optional third giving one sheet per
value, and writes PNGs.

Invariants:

- The selection is the manifest as it is now (re-planned), not whatever the state happens to
  hold: a cell the manifest added since the last run shows "not run yet" instead of vanishing.
  The state only says what became of each job.
- An axis is ``prompt``, ``model``, ``seed``, ``sample``, ``sweep`` or a parameter, and must take
  at least two values in the selection. Jobs that do not set a parameter axis (or ``seed``) are
  left out: ``--x aspect_ratio`` over a manifest that also has a FLUX sweep draws the sweeps that
  have aspect ratios. Axis values are ordered as the manifest expands them (the
  first job position at which each appears).
- Everything else that varies in the selection must be an axis, except ``seed`` and ``sample``:
  jobs of one cell that differ only in those are repeats, drawn side by side (or one picked with
  ``sample``). Anything else left varying is an error naming the parameter, so a cell never mixes
  images that differ in something the labels do not say.
- Every cell is drawn: an image scaled to a common square tile (aspect ratio kept, letterboxed),
  or a placeholder saying why there is none (pending, failed and the reason, no such job).
- A sheet larger than :data:`MAX_SIDE` pixels on a side or with more than :data:`MAX_CELLS` cells
  is refused before anything is drawn, with the numbers and how to shrink it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps

from .errors import BatchgenError, StoreError
from .manifest import Manifest
from .plan import JobSpec, iter_jobs
from .registry import ModelRegistry
from .store import Job, JobState, Store

#: axes every selection has, besides the parameters
BUILTIN_AXES = ("prompt", "model", "seed", "sample", "sweep")
#: the largest sheet side, in pixels
MAX_SIDE = 20_000
#: the most cells (X values × Y values) on one sheet
MAX_CELLS = 400
#: the most jobs a selection may hold before the grid is even laid out
MAX_SELECTION = 20_000
#: default tile side, in pixels
DEFAULT_TILE = 256

_BACKGROUND = (255, 255, 255)
_LETTERBOX = (236, 236, 236)
_TEXT = (20, 20, 20)
_MUTED = (90, 90, 90)
_FRAME = (150, 150, 150)
_PLACEHOLDER = {
    "waiting": (232, 232, 232),
    "failed": (246, 212, 212),
    "missing": (248, 240, 214),
}
_CELL_GAP = 6
_REPEAT_GAP = 2
_PAD = 8
_MAX_HEADER_LINES = 5


class GridError(BatchgenError):
    """The contact sheet cannot be made as asked: bad axis, empty selection, too large."""

    exit_code = 2


@dataclass
class _Tile:
    """What one tile shows: an image file, or a placeholder kind and its text."""

    path: Path | None = None
    kind: str = "waiting"
    text: str = ""


@dataclass
class _Axis:
    """One axis: its name and its values in manifest order (keyed by canonical JSON)."""

    name: str
    keys: list[str] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)

    def add(self, value: Any) -> str:
        key = _key(value)
        if key not in self.values:
            self.keys.append(key)
            self.values[key] = value
        return key

    def label(self, key: str) -> str:
        value = self.values[key]
        text = _text(value)
        if self.name == "prompt":
            return text
        if self.name in ("model", "sweep"):
            return text
        if self.name in ("seed", "sample"):
            return f"{self.name} {text}"
        return f"{self.name}: {text}"

    def labels(self, font: _Font, width: float) -> dict[str, str]:
        """Labels to draw: ``name: value`` when every one fits on a line, else the bare values
        (the sheet's subtitle names the axis either way)."""
        full = {k: self.label(k) for k in self.keys}
        if all(font.getlength(text) <= width for text in full.values()):
            return full
        return {k: _text(self.values[k]) for k in self.keys}


_MISSING = object()
_Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def _key(value: Any) -> str:
    return "\x00missing" if value is _MISSING else json.dumps(value, sort_keys=True, default=str)


def _text(value: Any) -> str:
    if value is _MISSING or value is None:
        return "(not set)"
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _value(spec: JobSpec, axis: str) -> Any:
    """The value ``spec`` has on ``axis`` (``_MISSING`` when the parameter is not set)."""
    if axis == "prompt":
        return spec.params.get("prompt")
    if axis == "model":
        return spec.model
    if axis == "sample":
        return spec.sample
    if axis == "sweep":
        return spec.sweep
    return spec.params.get(axis, _MISSING)


def _matches(value: Any, wanted: str) -> bool:
    """Whether a job's value equals the text the user typed after ``key=``."""
    if value is _MISSING or value is None:
        return wanted.lower() in ("", "null", "none")
    if isinstance(value, bool):
        return wanted.lower() in (("true", "1", "yes") if value else ("false", "0", "no"))
    if isinstance(value, int | float):
        try:
            return float(wanted) == float(value)
        except ValueError:
            return False
    if isinstance(value, str):
        return value == wanted
    return _key(value) == _key(_parse_json(wanted))


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_where(items: Iterable[str]) -> dict[str, list[str]]:
    """``["k=v", "k=w", "j=x"]`` → ``{"k": ["v", "w"], "j": ["x"]}``: one key's values are OR-ed."""
    where: dict[str, list[str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise GridError(f"--where {item!r}: expected KEY=VALUE, e.g. --where resolution=1K")
        where.setdefault(key.strip(), []).append(value)
    return where


def _where_value(spec: JobSpec, key: str) -> Any:
    if key in BUILTIN_AXES:
        return _value(spec, key)
    if key in spec.params:
        return spec.params[key]
    return spec.metadata.get(key, _MISSING)


def _select(
    manifest: Manifest,
    registry: ModelRegistry,
    sweep: str | None,
    where: Mapping[str, Sequence[str]],
    sample: int | None,
) -> list[JobSpec]:
    """The manifest's jobs in ``sweep`` that satisfy every ``where`` key, deduplicated."""
    sweeps: list[str] = []
    known_keys: set[str] = set(BUILTIN_AXES)
    selected: list[JobSpec] = []
    seen: set[str] = set()
    for spec in iter_jobs(manifest, registry):
        if spec.sweep not in sweeps:
            sweeps.append(spec.sweep)
        if sweep is not None and spec.sweep != sweep:
            continue
        known_keys.update(spec.params)
        known_keys.update(spec.metadata)
        if sample is not None and spec.sample != sample:
            continue
        if any(
            not any(_matches(_where_value(spec, k), v) for v in values)
            for k, values in where.items()
        ):
            continue
        if spec.id in seen:  # the same job planned by two sweeps
            continue
        seen.add(spec.id)
        selected.append(spec)
        if len(selected) > MAX_SELECTION:
            raise GridError(
                f"the selection holds more than {MAX_SELECTION} jobs: narrow it with --sweep "
                "or --where KEY=VALUE"
            )
    if sweep is not None and sweep not in sweeps:
        raise GridError(
            f"no sweep named {sweep!r} in {manifest.path.name}: sweeps are "
            f"{', '.join(sweeps) or '(none)'}"
        )
    unknown = sorted(set(where) - known_keys)
    if unknown:
        raise GridError(
            f"--where {unknown[0]}: no parameter or prompt column of that name in the selection; "
            f"known: {', '.join(sorted(known_keys))}"
        )
    if not selected:
        what = [f"sweep {sweep!r}"] if sweep else []
        what += [f"{k}={'|'.join(v)}" for k, v in where.items()]
        if sample is not None:
            what.append(f"sample {sample}")
        raise GridError(
            f"the selection is empty: no job of {manifest.path.name} matches "
            f"{', '.join(what) or 'anything'}"
        )
    return selected


def _varying(specs: Sequence[JobSpec], names: Iterable[str]) -> dict[str, _Axis]:
    axes: dict[str, _Axis] = {}
    for name in names:
        axis = _Axis(name)
        for spec in specs:
            axis.add(_value(spec, name))
        axes[name] = axis
    return axes


def _narrow(specs: Sequence[JobSpec], axes: Sequence[str]) -> list[JobSpec]:
    """Leave out jobs that do not set a parameter axis (a FLUX sweep on an aspect_ratio sheet).

    An axis nobody in the selection sets is left for :func:`_check_axes` to report.
    """
    params = [a for a in axes if a not in BUILTIN_AXES or a == "seed"]
    present = [a for a in params if any(a in spec.params for spec in specs)]
    if not present:
        return list(specs)
    return [spec for spec in specs if all(a in spec.params for a in present)]


def _check_axes(
    specs: Sequence[JobSpec], x: str, y: str, z: str | None, sample: int | None
) -> dict[str, _Axis]:
    """Validate the axes against the selection; return every dimension's values."""
    params: list[str] = []
    for spec in specs:
        for name in spec.params:
            if name not in ("prompt", "seed") and name not in params:
                params.append(name)
    names = [*BUILTIN_AXES, *params]
    dims = _varying(specs, names)
    chosen = [a for a in (x, y, z) if a is not None]
    varying = [n for n in names if len(dims[n].keys) > 1]
    hint = f"axes that vary here: {', '.join(varying)}" if varying else "nothing varies here"
    for flag, chosen_name in (("--x", x), ("--y", y), ("--z", z)):
        if chosen_name is None:
            continue
        if chosen_name not in dims:
            raise GridError(f"{flag} {chosen_name}: not an axis of this selection; {hint}")
        dim = dims[chosen_name]
        if len(dim.keys) < 2:
            only = _text(dim.values[dim.keys[0]])
            raise GridError(
                f"{flag} {chosen_name}: does not vary in the selection (only {only!r}); {hint}"
            )
    # Anything else that varies would put different images in one cell under one label.
    for name in varying:
        if name in chosen or name in ("seed", "sample", "sweep"):
            continue
        axis = dims[name]
        values = ", ".join(_text(axis.values[k]) for k in axis.keys[:4]) + (
            ", ..." if len(axis.keys) > 4 else ""
        )
        some = _text(axis.values[axis.keys[0]])
        raise GridError(
            f"{name} varies in the selection ({values}) but is not an axis: pick one value with "
            f"--where {name}={some} or make it --z"
        )
    return dims


# --- drawing -------------------------------------------------------------------------------------


def _font(size: int) -> _Font:
    # Pillow >= 10.1 ships a scalable default font when FreeType is available.
    return ImageFont.load_default(size=size)


def _line_height(font: _Font) -> int:
    bottom = font.getbbox("Ág")[3]
    return int(bottom) + 4


def _wrap(text: str, font: _Font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; words longer than a line are broken; ellipsis past
    ``max_lines``."""
    words = text.replace("\n", " ").split(" ")
    lines: list[str] = []
    line = ""
    for word in words:
        candidate = f"{line} {word}" if line else word
        if font.getlength(candidate) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        # a word wider than the line is cut into pieces that fit
        while font.getlength(word) > width and len(word) > 1:
            cut = len(word)
            while cut > 1 and font.getlength(word[:cut]) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and font.getlength(last + "…") > width:
            last = last[:-1]
        lines[-1] = last + "…"
    return lines or [""]


def _draw_lines(
    draw: ImageDraw.ImageDraw,
    lines: list[str],
    box: tuple[int, int, int, int],
    font: _Font,
    fill: tuple[int, int, int],
    align: str = "center",
) -> None:
    """Draw ``lines`` centred vertically in ``box`` (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    lh = _line_height(font)
    top = y0 + max(0, ((y1 - y0) - lh * len(lines)) // 2)
    for i, line in enumerate(lines):
        width = font.getlength(line)
        if align == "center":
            x = x0 + ((x1 - x0) - width) / 2
        elif align == "right":
            x = x1 - width
        else:
            x = x0
        draw.text((x, top + i * lh), line, font=font, fill=fill)


def _placeholder(tile: int, kind: str, text: str, font: _Font) -> Image.Image:
    img = Image.new("RGB", (tile, tile), _PLACEHOLDER.get(kind, _PLACEHOLDER["waiting"]))
    draw = ImageDraw.Draw(img)
    # a dashed frame tells a placeholder from the letterbox bands of a real image
    for i in range(0, tile, 8):
        for a, b in (
            ((i, 0), (i + 3, 0)),
            ((i, tile - 1), (i + 3, tile - 1)),
            ((0, i), (0, i + 3)),
            ((tile - 1, i), (tile - 1, i + 3)),
        ):
            draw.line((a, b), fill=_FRAME)
    max_lines = max(1, (tile - 2 * _PAD) // _line_height(font))
    lines = _wrap(text, font, tile - 2 * _PAD, max_lines)
    _draw_lines(draw, lines, (_PAD, _PAD, tile - _PAD, tile - _PAD), font, _MUTED)
    return img


def _image_tile(path: Path, tile: int) -> Image.Image:
    with Image.open(path) as src:
        src.draft("RGB", (tile, tile))  # JPEG: decode at a reduced scale, much faster
        img = ImageOps.exif_transpose(src)
        if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            img = Image.new("RGB", rgba.size, _LETTERBOX)
            img.paste(rgba, mask=rgba.getchannel("A"))
        else:
            img = img.convert("RGB")
        img = ImageOps.contain(img, (tile, tile), Image.Resampling.LANCZOS)
    out = Image.new("RGB", (tile, tile), _LETTERBOX)
    out.paste(img, ((tile - img.width) // 2, (tile - img.height) // 2))
    return out


_WAITING_STATES = {
    JobState.PENDING: "pending",
    JobState.SUBMITTING: "submitting",
    JobState.QUEUED: "queued",
    JobState.RUNNING: "running",
    JobState.DOWNLOADING: "downloading",
    JobState.CANCELLED: "cancelled",
}


def _tiles_for(store: Store, spec: JobSpec, root: Path) -> list[_Tile]:
    """The tiles one job contributes: each of its images, or one placeholder saying why not."""
    try:
        job: Job = store.get(spec.id)
    except (StoreError, KeyError):
        return [_Tile(kind="waiting", text="not run yet")]
    if job.state is JobState.DONE:
        tiles = []
        for output in sorted(store.outputs(job.id), key=lambda o: o.index):
            path = root / output.path
            if path.is_file():
                tiles.append(_Tile(path=path))
            else:
                tiles.append(_Tile(kind="missing", text=f"file missing: {output.path}"))
        return tiles or [_Tile(kind="missing", text="done, but no image recorded")]
    if job.state in (JobState.FAILED, JobState.UNKNOWN):
        reason = ": ".join(p for p in (job.error_class, job.last_error) if p)
        return [
            _Tile(kind="failed", text=f"{job.state.value}: {reason}" if reason else job.state.value)
        ]
    return [_Tile(kind="waiting", text=_WAITING_STATES.get(job.state, job.state.value))]


@dataclass
class _Layout:
    tile: int
    repeats: int
    left: int
    header: int
    title: int
    cols: int
    rows: int
    x_labels: dict[str, str]
    y_labels: dict[str, str]
    label_font: _Font
    title_font: _Font
    tile_font: _Font

    @property
    def cell_w(self) -> int:
        return self.repeats * self.tile + (self.repeats - 1) * _REPEAT_GAP

    @property
    def width(self) -> int:
        return self.left + self.cols * (self.cell_w + _CELL_GAP) + _PAD

    @property
    def height(self) -> int:
        return self.title + self.header + self.rows * (self.tile + _CELL_GAP) + _PAD

    def cell_origin(self, col: int, row: int) -> tuple[int, int]:
        return (
            self.left + col * (self.cell_w + _CELL_GAP),
            self.title + self.header + row * (self.tile + _CELL_GAP),
        )


def _layout(x: _Axis, y: _Axis, repeats: int, tile: int) -> _Layout:
    label_size = max(12, tile // 14)
    label_font = _font(label_size)
    title_font = _font(label_size + 4)
    tile_font = _font(max(11, tile // 18))
    lh = _line_height(label_font)
    cell_w = repeats * tile + (repeats - 1) * _REPEAT_GAP
    x_labels = x.labels(label_font, cell_w - 2 * _PAD)
    y_labels = y.labels(label_font, tile * 1.5 - 2 * _PAD)
    # Left column: as wide as the longest row label needs, between 0.6 and 1.5 tiles (wrapped).
    widest = max(label_font.getlength(text) for text in y_labels.values())
    left = int(min(max(widest + 2 * _PAD, tile * 0.6), tile * 1.5)) + _PAD
    header_lines = max(
        len(_wrap(text, label_font, cell_w - 2 * _PAD, _MAX_HEADER_LINES))
        for text in x_labels.values()
    )
    header = header_lines * lh + 2 * _PAD
    title = 2 * _line_height(title_font) + 2 * _PAD
    return _Layout(
        tile=tile,
        repeats=repeats,
        left=left,
        header=header,
        title=title,
        cols=len(x.keys),
        rows=len(y.keys),
        x_labels=x_labels,
        y_labels=y_labels,
        label_font=label_font,
        title_font=title_font,
        tile_font=tile_font,
    )


def _slug(text: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return slug[:40] or "value"


def _sheet_paths(out: Path, z: _Axis | None) -> list[Path]:
    if z is None:
        return [out]
    return [
        out.with_name(f"{out.stem}-{i + 1:02d}-{_slug(_text(z.values[k]))}{out.suffix}")
        for i, k in enumerate(z.keys)
    ]


_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def _save(img: Image.Image, path: Path) -> None:
    """Write the sheet atomically; the format follows the suffix (PNG unless .jpg or .webp)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = _FORMATS.get(path.suffix.lower(), "PNG")
    options: dict[str, Any] = {"compress_level": 6} if fmt == "PNG" else {"quality": 90}
    # a name of our own rather than mkstemp, whose 0600 files would stay unreadable to others
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        img.save(tmp, format=fmt, **options)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def make_grid(
    store: Store,
    manifest: Manifest,
    x: str,
    y: str,
    z: str | None = None,
    *,
    sweep: str | None = None,
    where: Mapping[str, str | Sequence[str]] | None = None,
    sample: int | None = None,
    out: Path | None = None,
    tile: int = DEFAULT_TILE,
    registry: ModelRegistry | None = None,
) -> list[Path]:
    """Draw the contact sheet(s) of a selection; return the PNG paths, one per Z value.

    :param store: the run's state (what became of each job)
    :param manifest: the manifest; its jobs are the selection before filtering
    :param x: the axis across (a parameter, or prompt, model, seed, sample, sweep)
    :param y: the axis down
    :param z: an optional third axis: one sheet per value, named ``<out stem>-NN-<value>.png``
    :param sweep: only this sweep's jobs
    :param where: keep jobs whose parameter (or prompt column) equals one of the values given
    :param sample: draw only this repeat (0-based) instead of all repeats side by side
    :param out: PNG path (default: ``<output>/contact-sheet.png``)
    :param tile: tile side in pixels
    :param registry: the model registry used to plan (default: the built-in one)
    """
    if not 32 <= tile <= 2048:
        raise GridError(f"--tile {tile}: must be between 32 and 2048 pixels")
    if sample is not None and sample < 0:
        raise GridError(f"--sample {sample}: must be 0 or more")
    chosen = [a for a in (x, y, z) if a is not None]
    if len(set(chosen)) != len(chosen):
        raise GridError(f"--x, --y and --z must be different axes, got {', '.join(chosen)}")
    if sample is not None and "sample" in chosen:
        raise GridError("--sample picks one repeat; it cannot be used with sample as an axis")
    wanted = {k: [v] if isinstance(v, str) else list(v) for k, v in (where or {}).items()}
    specs = _select(manifest, registry or ModelRegistry.default(), sweep, wanted, sample)
    specs = _narrow(specs, chosen)
    dims = _check_axes(specs, x, y, z, sample)
    ax, ay, az = dims[x], dims[y], dims[z] if z else None

    cells: dict[tuple[str, str, str], list[JobSpec]] = {}
    for spec in specs:  # specs are in position order, so repeats are too
        zk = _key(_value(spec, z)) if z else ""
        cells.setdefault((zk, _key(_value(spec, y)), _key(_value(spec, x))), []).append(spec)

    if len(ax.keys) * len(ay.keys) > MAX_CELLS:
        raise GridError(
            f"the sheet would have {len(ax.keys)} × {len(ay.keys)} = {len(ax.keys) * len(ay.keys)} "
            f"cells (at most {MAX_CELLS}): narrow the selection with --where, "
            "or move an axis to --z"
        )
    root = Path(manifest.output)
    sweeps = list(dict.fromkeys(spec.sweep for spec in specs))
    tiles = {
        key: [t for spec in group for t in _tiles_for(store, spec, root)]
        for key, group in cells.items()
    }
    repeats = max(len(t) for t in tiles.values())
    layout = _layout(ax, ay, repeats, tile)
    if layout.width > MAX_SIDE or layout.height > MAX_SIDE:
        raise GridError(
            f"the sheet would be {layout.width} × {layout.height} px (at most {MAX_SIDE} a side): "
            f"use a smaller --tile (now {tile}), pick one repeat with --sample, or narrow the "
            "selection with --where"
        )

    paths = _sheet_paths(out or root / "contact-sheet.png", az)
    zkeys = az.keys if az else [""]
    for path, zk in zip(paths, zkeys, strict=True):
        sheet = _draw_sheet(manifest, sweeps, layout, ax, ay, az, zk, tiles)
        _save(sheet, path)
    return paths


def _draw_sheet(
    manifest: Manifest,
    sweeps: Sequence[str],
    layout: _Layout,
    ax: _Axis,
    ay: _Axis,
    az: _Axis | None,
    zk: str,
    tiles: Mapping[tuple[str, str, str], list[_Tile]],
) -> Image.Image:
    sheet = Image.new("RGB", (layout.width, layout.height), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    lf, tf = layout.label_font, layout.title_font
    lh = _line_height(lf)

    title = manifest.name
    if len(sweeps) == 1:
        title += f" · sweep {sweeps[0]}"
    if az is not None:
        title += f" · {az.label(zk)}"
    drawn = [t for (z, _, _), cell in tiles.items() if z == zk for t in cell]
    images = sum(1 for t in drawn if t.path is not None)
    waiting = len(drawn) - images
    subtitle = f"x: {ax.name}   y: {ay.name}" + (f"   z: {az.name}" if az else "")
    subtitle += f"   ·   {images} image{'s' * (images != 1)}"
    if waiting:
        subtitle += f", {waiting} without (see the placeholders)"
    width = layout.width - 2 * _PAD
    draw.text((_PAD, _PAD), _wrap(title, tf, width, 1)[0], font=tf, fill=_TEXT)
    draw.text(
        (_PAD, _PAD + _line_height(tf)), _wrap(subtitle, tf, width, 1)[0], font=tf, fill=_MUTED
    )

    for col, xk in enumerate(ax.keys):
        x0, _ = layout.cell_origin(col, 0)
        lines = _wrap(layout.x_labels[xk], lf, layout.cell_w - 2 * _PAD, _MAX_HEADER_LINES)
        box = (x0, layout.title, x0 + layout.cell_w, layout.title + layout.header)
        _draw_lines(draw, lines, box, lf, _TEXT)

    row_lines = max(1, (layout.tile - _PAD) // lh)
    for row, yk in enumerate(ay.keys):
        _, y0 = layout.cell_origin(0, row)
        lines = _wrap(layout.y_labels[yk], lf, layout.left - 3 * _PAD, row_lines)
        _draw_lines(
            draw,
            lines,
            (_PAD, y0, layout.left - 2 * _PAD, y0 + layout.tile),
            lf,
            _TEXT,
            align="right",
        )
        for col, xk in enumerate(ax.keys):
            x0, _ = layout.cell_origin(col, row)
            cell = tiles.get((zk, yk, xk)) or [
                _Tile(kind="missing", text="no job here: excluded or not in the selection")
            ]
            for i, t in enumerate(cell):
                img = _render_tile(t, layout)
                sheet.paste(img, (x0 + i * (layout.tile + _REPEAT_GAP), y0))
    return sheet


def _render_tile(t: _Tile, layout: _Layout) -> Image.Image:
    if t.path is not None:
        try:
            return _image_tile(t.path, layout.tile)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            return _placeholder(
                layout.tile, "missing", f"unreadable image: {exc}", layout.tile_font
            )
    return _placeholder(layout.tile, t.kind, t.text, layout.tile_font)
