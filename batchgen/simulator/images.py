"""The simulator's image maker: readable stand-ins for generated images.

Each image shows the model id, the prompt and the other parameters on a background colour derived
from the request, so a contact sheet of simulator output can be read. Invariants:

- the size is what the parameters ask for (``shared/spec/models/README.md``): nano-banana's
  ``resolution`` and ``aspect_ratio`` (sides multiples of 16), flux's ``image_size`` presets,
  ``width``/``height`` when a model takes them, else 1024 x 1024; ``small`` mode keeps the format
  and aspect ratio and scales the longest side down to ``small_side``;
- the format is ``output_format`` (``jpg`` read as ``jpeg``), else the model's documented
  default, else PNG;
- rendering is a pure function of :class:`ImageKey`: the same key gives the same bytes, so
  rendered bytes are cached (LRU, bounded in bytes) and the sha256 of a file is stable.
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import json
import textwrap
import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from ..registry import ModelSpec

#: MIME type and file extension of each output format
FORMATS: dict[str, tuple[str, str]] = {
    "png": ("image/png", "png"),
    "jpeg": ("image/jpeg", "jpg"),
    "webp": ("image/webp", "webp"),
}

#: Gemini image sizes at 1K per aspect ratio (2K and 4K double and quadruple them); all sides
#: are multiples of 16, 1:1 at 1K is 1024×1024 as spec/models/README.md gives it
_NANO_BANANA_1K: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "2:3": (848, 1264),
    "3:2": (1264, 848),
    "3:4": (896, 1200),
    "4:3": (1200, 896),
    "4:5": (928, 1152),
    "5:4": (1152, 928),
    "9:16": (768, 1376),
    "16:9": (1376, 768),
    "21:9": (1584, 672),
}
_RESOLUTION_SCALE = {"0.5K": 0.5, "1K": 1.0, "2K": 2.0, "4K": 4.0}

#: flux ``image_size`` presets (spec/models/README.md)
_IMAGE_SIZE_PRESETS: dict[str, tuple[int, int]] = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}

DEFAULT_SIZE = (1024, 1024)


def _round16(value: float) -> int:
    return max(16, round(value / 16.0) * 16)


def image_size(spec: ModelSpec | None, params: dict[str, Any]) -> tuple[int, int]:
    """``(width, height)`` in pixels that ``params`` ask of the model (defaults from its schema)."""
    merged = {**(spec.defaults if spec else {}), **params}
    width, height = merged.get("width"), merged.get("height")
    if isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0:
        return width, height
    preset = merged.get("image_size")
    if isinstance(preset, str) and preset in _IMAGE_SIZE_PRESETS:
        return _IMAGE_SIZE_PRESETS[preset]
    if isinstance(preset, dict):
        w, h = preset.get("width"), preset.get("height")
        if isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0:
            return w, h
    ratio = merged.get("aspect_ratio")
    resolution = merged.get("resolution")
    if isinstance(ratio, str) or isinstance(resolution, str):
        scale = _RESOLUTION_SCALE.get(str(resolution), 1.0)
        ratio_text = ratio if isinstance(ratio, str) else "1:1"
        if ratio_text in _NANO_BANANA_1K:
            w1, h1 = _NANO_BANANA_1K[ratio_text]
            return _round16(w1 * scale), _round16(h1 * scale)
        try:
            rw, rh = (float(part) for part in ratio_text.split(":"))
        except ValueError:
            return DEFAULT_SIZE
        if rw <= 0 or rh <= 0:
            return DEFAULT_SIZE
        # about 1024² pixels per "1K", shaped by the ratio
        area = (1024.0 * scale) ** 2
        return _round16((area * rw / rh) ** 0.5), _round16((area * rh / rw) ** 0.5)
    return DEFAULT_SIZE


def output_format(spec: ModelSpec | None, params: dict[str, Any]) -> str:
    """``png``, ``jpeg`` or ``webp``: ``output_format``, else the model's default, else png."""
    value = params.get("output_format")
    if value is None and spec is not None:
        value = spec.properties.get("output_format", {}).get("default")
    text = str(value or "png").lower()
    if text == "jpg":
        text = "jpeg"
    return text if text in FORMATS else "png"


def small_size(size: tuple[int, int], longest: int) -> tuple[int, int]:
    """``size`` scaled so that its longest side is at most ``longest`` (aspect ratio kept)."""
    width, height = size
    factor = min(1.0, longest / max(width, height))
    return max(1, round(width * factor)), max(1, round(height * factor))


@dataclass(frozen=True)
class ImageKey:
    """Everything an image depends on; equal keys render equal bytes."""

    model_id: str
    #: canonical JSON of the request body
    params_json: str
    index: int
    count: int
    width: int
    height: int
    fmt: str
    #: the request id when the body has no seed (an unseeded model differs run to run),
    #: else "" (a seeded model gives the same image for the same body)
    variant: str

    @property
    def content_type(self) -> str:
        """MIME type of the rendered bytes."""
        return FORMATS[self.fmt][0]


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no spaces: equal bodies give equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow's bundled scalable font: no font file to ship or find on the system.
    return ImageFont.load_default(size=size)


#: text masks are cached only up to this font size (small images: a few kB each, 4096 of them)
_CACHED_FONT_SIZE = 24


def _line_mask(text: str, size: int) -> Image.Image:
    if size <= _CACHED_FONT_SIZE:
        return _small_line_mask(text, size)
    return _render_line(text, size)


@lru_cache(maxsize=4096)
def _small_line_mask(text: str, size: int) -> Image.Image:
    # Rasterising glyphs is most of the cost of a small image, and the same lines (model id,
    # parameters, a prompt used with many seeds) recur across requests: keep their masks.
    return _render_line(text, size)


def _render_line(text: str, size: int) -> Image.Image:
    font = _font(size)
    right, bottom = font.getbbox(text)[2:]
    mask = Image.new("L", (max(1, int(right)), max(1, int(bottom))), 0)
    ImageDraw.Draw(mask).text((0, 0), text, font=font, fill=255)
    return mask


def _write(
    image: Image.Image, xy: tuple[int, int], text: str, size: int, ink: tuple[int, ...]
) -> None:
    mask = _line_mask(text, size)
    image.paste(ink, (xy[0], xy[1], xy[0] + mask.width, xy[1] + mask.height), mask)


def _colours(key: ImageKey) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    digest = hashlib.sha256(
        f"{key.model_id}\n{key.params_json}\n{key.variant}\n{key.index}".encode()
    ).digest()
    hue = digest[0] / 255.0
    saturation = 0.35 + digest[1] / 255.0 * 0.4
    value = 0.45 + digest[2] / 255.0 * 0.45
    r, g, b = colorsys.hsv_to_rgb(hue, saturation, value)
    background = (int(r * 255), int(g * 255), int(b * 255))
    luminance = 0.299 * background[0] + 0.587 * background[1] + 0.114 * background[2]
    ink = (16, 16, 16) if luminance > 140 else (245, 245, 245)
    return background, ink


def render(key: ImageKey) -> bytes:
    """The encoded image for ``key``."""
    background, ink = _colours(key)
    image = Image.new("RGB", (key.width, key.height), background)
    margin = max(2, key.width // 40)
    # A band across the top marks the model, like a label on a print.
    font_size = max(8, min(key.width, key.height * 2) // 28)
    line_height = int(font_size * 1.25)
    band = (
        tuple(max(0, c - 40) for c in background)
        if ink[0] > 128
        else tuple(min(255, c + 40) for c in background)
    )
    ImageDraw.Draw(image).rectangle((0, 0, key.width, line_height + 2 * margin), fill=band)
    params = json.loads(key.params_json)
    prompt = str(params.pop("prompt", ""))
    chars = max(8, int((key.width - 2 * margin) / (font_size * 0.55)))
    lines_room = max(1, (key.height - 2 * margin) // line_height - 1)
    param_lines = [f"{name}: {canonical_json(value)}" for name, value in sorted(params.items())]
    footer = f"image {key.index + 1}/{key.count}" + (f" · {key.variant}" if key.variant else "")
    prompt_room = max(1, lines_room - len(param_lines) - 2)
    prompt_lines = textwrap.wrap(prompt, chars)[:prompt_room] or ["(no prompt)"]
    y = margin
    _write(image, (margin, y), key.model_id[:chars], font_size, ink)
    y += line_height + margin
    for line in [*prompt_lines, "", *param_lines, footer]:
        if y + line_height > key.height:
            break
        if line:
            _write(image, (margin, y), line[:chars], font_size, ink)
        y += line_height
    buffer = io.BytesIO()
    if key.fmt == "png":
        image.save(buffer, "PNG", compress_level=1)
    elif key.fmt == "jpeg":
        image.save(buffer, "JPEG", quality=85)
    else:
        image.save(buffer, "WEBP", quality=80, method=0)
    return buffer.getvalue()


class ImageMaker:
    """Renders images and keeps the most recent ones (LRU, at most ``cache_bytes``); thread-safe."""

    def __init__(self, cache_bytes: int = 64 * 1024 * 1024) -> None:
        self._cache: OrderedDict[ImageKey, bytes] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._held = 0
        self._lock = threading.Lock()
        #: renders done (cache misses), for metrics
        self.renders = 0

    def cached(self, key: ImageKey) -> bytes | None:
        """The bytes of ``key`` if they are in the cache."""
        with self._lock:
            data = self._cache.get(key)
            if data is not None:
                self._cache.move_to_end(key)
            return data

    def get(self, key: ImageKey) -> bytes:
        """The bytes of ``key``, rendered on a miss (call off the event loop: it takes CPU)."""
        data = self.cached(key)
        if data is not None:
            return data
        data = render(key)
        with self._lock:
            self.renders += 1
            if key not in self._cache and len(data) <= self._cache_bytes:
                self._cache[key] = data
                self._held += len(data)
                while self._held > self._cache_bytes:
                    _, dropped = self._cache.popitem(last=False)
                    self._held -= len(dropped)
        return data
