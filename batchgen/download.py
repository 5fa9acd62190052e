"""Where outputs land, and how they get there safely.

Output tree, relative to the manifest's ``output`` folder::

    <model-slug>/<prompt-slug>/<params-slug>__s<sample>[_<index>].<ext>     the image
    <model-slug>/<prompt-slug>/<params-slug>__s<sample>[_<index>].json      its sidecar

Invariants:

- :func:`output_path` is pure and total: any model id, prompt (10 kB, NUL, ``../``, ``/``, emoji,
  RTL text) and parameters give a relative path of components made only of ``[A-Za-z0-9._-]``,
  that never start with ``.``, never end with ``.`` or ``-``, are never a Windows device name
  (``CON``, ``NUL``, ``COM1``...), and are short (≤ 80 characters each, about 210 in all).
  Distinct jobs get distinct paths, also on case-insensitive filesystems: prompt and parameter
  slugs end with a hash of the exact text, and model slugs are either lower-case and injective
  or hashed too.
- :func:`resolve_inside` refuses any path that would land outside the output root.
- :func:`fetch` only speaks http(s), never sends an ``Authorization`` header or cookies (whatever
  client it is given), caps the size while streaming, caps the total time, caps redirects, and
  writes ``<dest>.part`` in the destination folder, fsyncs it and renames it into place only
  after the bytes proved to be a complete image. On any failure the ``.part`` file is removed.
  Memory use does not depend on the file size (fixed-size chunks, incremental hash).
- :func:`fetch` starts no thread per file: a body that fits in one batch (1 MiB: every
  ordinary image) is held in memory, then written, fsynced, checked, renamed, given its sidecar
  and its folder fsynced in one step, inline (cheaper than a thread hand-off for small files);
  only a longer body gets a writer thread while it streams, and its last step runs on the
  loop's thread pool. One folder fsync makes both renames (image, sidecar) durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.cookiejar
import json
import os
import re
import struct
import tempfile
import unicodedata
import warnings
import zlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Final, Protocol, TypeVar

import httpx
from PIL import Image, UnidentifiedImageError

from . import __version__
from .errors import DownloadError, ExpiredURLError

#: longest readable part of a slug, before the hash suffix: keeps whole relative paths near
#: 210 characters at worst, inside Windows' 260 (MAX_PATH) with a reasonable output folder
MAX_SLUG: Final = 48
#: longest model slug kept without a hash (model ids are short; longer ones are hashed)
MAX_MODEL_SLUG: Final = 64
#: hex digits of sha256 appended to prompt and parameter slugs (48 bits: no practical collision)
HASH_LEN: Final = 12
DEFAULT_MAX_BYTES: Final = 200_000_000
DEFAULT_TIMEOUT: Final = 120.0
DEFAULT_MAX_REDIRECTS: Final = 5
CHUNK: Final = 64 * 1024
#: download failures that the same URL will give again however often it is asked: the job fails
#: at once instead of spending ``max_attempts`` downloads (up to 5 × ``max_bytes``) and backoffs
PERMANENT_ERRORS: Final = frozenset(
    {"bad_url", "unsafe_path", "too_large", "not_an_image", "redirect_loop", "bad_encoding"}
)

_WINDOWS_RESERVED: Final = frozenset(
    {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"}
    | {f"COM{i}" for i in range(10)}
    | {f"LPT{i}" for i in range(10)}
)
_UNSAFE_RUN: Final = re.compile(r"[^A-Za-z0-9._-]+")
_CANONICAL_SEGMENT: Final = re.compile(r"[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?")
_EXTENSIONS: Final[dict[str, str]] = {
    "PNG": "png",
    "JPEG": "jpg",
    "WEBP": "webp",
    "GIF": "gif",
    "BMP": "bmp",
    "TIFF": "tif",
    "AVIF": "avif",
    "HEIF": "heic",
    "JPEG2000": "jp2",
    "ICO": "ico",
}
#: extensions fetch may swap for the real one (the caller's guess before the bytes arrived)
_GUESSABLE: Final = frozenset({*_EXTENSIONS.values(), "jpeg", "tiff", "bin", "img", "image"})
#: content types that cannot be an image; anything else is judged by its bytes
_NOT_IMAGE_TYPES: Final = re.compile(
    r"^(text/|application/(json|xml|javascript|x-javascript|xhtml\+xml|problem\+json|pdf)|"
    r"video/|audio/|multipart/)"
)


# -- output paths ------------------------------------------------------------------------------


class JobLike(Protocol):
    """What :func:`output_path` reads of a job (``batchgen.store.Job`` or ``plan.JobSpec``)."""

    @property
    def model(self) -> str: ...
    @property
    def params(self) -> dict[str, Any]: ...
    @property
    def sample(self) -> int: ...


def _digest(text: str) -> str:
    # surrogatepass: a lone surrogate from a JSON file must still hash, not crash
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_LEN]


def _readable(text: str, limit: int = MAX_SLUG) -> str:
    """ASCII letters, digits, ``.``, ``_``, ``-`` only; no leading/trailing punctuation."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    cleaned = _UNSAFE_RUN.sub("_", ascii_text).strip("._-")
    return cleaned[:limit].rstrip("._-")


def _not_reserved(name: str) -> str:
    """Prefix ``_`` to names Windows treats as devices (``CON``, ``con.txt``, ``COM1.png``)."""
    stem = name.split(".", 1)[0].upper()
    return f"_{name}" if stem in _WINDOWS_RESERVED else name


def slug(text: str, *, fallback: str, limit: int = MAX_SLUG) -> str:
    """A readable, filesystem-safe name unique to ``text``: ``<readable>-<hash of text>``."""
    readable = _readable(text, limit) or fallback
    return _not_reserved(f"{readable}-{_digest(text)}")


def model_slug(model_id: str) -> str:
    """``google/nano-banana/pro`` → ``google__nano-banana__pro``; unusual ids get a hash suffix."""
    segments = model_id.split("/")
    joined = "__".join(segments)
    if len(joined) <= MAX_MODEL_SLUG and all(_CANONICAL_SEGMENT.fullmatch(s) for s in segments):
        # lower case, no "_" inside segments: the mapping is injective, even case-insensitively
        return _not_reserved(joined)
    return slug(model_id.replace("/", "__"), fallback="model")


def _value_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def params_slug(params: Mapping[str, Any]) -> str:
    """``aspect_ratio-16_9_seed-5-<hash>`` from every parameter but the prompt."""
    rest = {k: v for k, v in params.items() if k != "prompt"}
    canonical = json.dumps(
        rest, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str
    )
    readable_text = "_".join(f"{k}-{_value_text(v)}" for k, v in sorted(rest.items()))
    readable = _readable(readable_text) or "default"
    return _not_reserved(f"{readable}-{_digest(canonical)}")


def _clean_ext(ext: str) -> str:
    ext = ext.strip().lstrip(".").lower()
    return ext if re.fullmatch(r"[a-z0-9]{1,10}", ext) else "bin"


def path_for(
    model: str, prompt: str, params: Mapping[str, Any], sample: int, index: int, ext: str
) -> PurePosixPath:
    """The relative output path of output ``index`` of one job (see the module docstring)."""
    name = f"{params_slug(params)}__s{int(sample)}"
    if index:
        name += f"_{int(index)}"
    return PurePosixPath(
        model_slug(model), slug(prompt, fallback="prompt"), f"{name}.{_clean_ext(ext)}"
    )


def output_path(job: JobLike, index: int = 0, ext: str = "png") -> PurePosixPath:
    """The relative output path of output ``index`` of ``job``."""
    prompt = job.params.get("prompt", "")
    return path_for(job.model, _value_text(prompt), job.params, job.sample, index, ext)


def sidecar_path(image_path: Path) -> Path:
    """The sidecar of an image: same folder, same stem, ``.json``."""
    return image_path.with_name(image_path.name.rsplit(".", 1)[0] + ".json")


def resolve_inside(root: Path, relative: PurePosixPath | str) -> Path:
    """``root / relative`` as an absolute path, or DownloadError if it would leave ``root``."""
    rel = PurePosixPath(relative)
    text = str(relative)
    if (
        rel.is_absolute()
        or not rel.parts
        or any(part in ("..", ".") for part in text.split("/"))
        or "\\" in text
        or "\x00" in text
        or re.match(r"^[A-Za-z]:", text)
    ):
        raise DownloadError(
            f"refusing output path {text[:120]!r}: it is not a plain relative path",
            error_class="unsafe_path",
        )
    base = Path(root).resolve()
    target = (base / Path(*rel.parts)).resolve()
    if not target.is_relative_to(base):
        # a symlink inside the tree pointing elsewhere
        raise DownloadError(
            f"refusing output path {text[:120]!r}: it resolves outside {base}",
            error_class="unsafe_path",
        )
    return target


# -- sidecars ----------------------------------------------------------------------------------


def write_sidecar(path: Path, data: Mapping[str, Any]) -> None:
    """Write ``data`` as JSON at ``path`` atomically (temp file beside it, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, data)
    _fsync_dir(path.parent)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Temp file beside ``path``, fsync, rename; the caller fsyncs the folder (once per batch)."""
    text = json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def sidecar_record(
    job: Any,
    *,
    index: int,
    uri: str,
    fetched: Fetched,
    path: str,
    request_id: str | None = None,
    timings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The sidecar fields of one output of ``job`` (a ``store.Job``), in a stable order."""
    params = dict(getattr(job, "params", {}) or {})
    return {
        "job_id": getattr(job, "id", None),
        "sweep": getattr(job, "sweep", None),
        "model": getattr(job, "model", None),
        "prompt": params.get("prompt"),
        "params": params,
        "seed": params.get("seed"),
        "sample": getattr(job, "sample", None),
        "index": index,
        "metadata": dict(getattr(job, "metadata", {}) or {}),
        "request_id": request_id if request_id is not None else getattr(job, "request_id", None),
        "uri": uri,
        "file": path,
        "bytes": fetched.bytes,
        "sha256": fetched.sha256,
        "width": fetched.width,
        "height": fetched.height,
        "content_type": fetched.content_type,
        "timings": dict(timings or {}),
    }


# -- fetching ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fetched:
    """One stored download: where it is, its size, hash and image facts."""

    path: Path
    bytes: int
    sha256: str
    width: int | None
    height: int | None
    content_type: str | None
    ext: str


def make_download_client(
    *,
    max_connections: int = 8,
    timeout: float = 30.0,
) -> httpx.AsyncClient:
    """An httpx client for output downloads: no Authorization header, no cookie jar, no auth."""
    no_cookies = http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    return httpx.AsyncClient(
        headers={
            "User-Agent": f"batchgen/{__version__}",
            "Accept": "image/*,*/*;q=0.5",
            # images are compressed already; a server that still encodes is decoded by fetch
            # in bounded steps (see _Inflate)
            "Accept-Encoding": "identity",
        },
        cookies=no_cookies,
        auth=None,
        follow_redirects=False,  # fetch follows them itself, checking each hop
        timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
        limits=httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        ),
    )


def _shown(uri: str) -> str:
    return repr(uri[:100] + ("…" if len(uri) > 100 else ""))


def check_uri(uri: object) -> httpx.URL:
    """The URL if batchgen may download it (http or https with a host), else DownloadError."""
    text = uri if isinstance(uri, str) else repr(uri)
    if not isinstance(uri, str) or not uri.strip():
        raise DownloadError(
            f"refusing to download {_shown(text)}: not a URL", error_class="bad_url"
        )
    scheme = uri.strip().split(":", 1)[0].lower() if ":" in uri else ""
    if scheme not in ("http", "https"):
        raise DownloadError(
            f"refusing to download {_shown(uri)}: only http and https URLs are fetched "
            f"(scheme {scheme or 'missing'!r})",
            uri=uri[:200],
            error_class="bad_url",
        )
    try:
        url = httpx.URL(uri.strip())
    except httpx.InvalidURL as exc:
        raise DownloadError(
            f"refusing to download {_shown(uri)}: malformed URL ({exc})",
            uri=uri[:200],
            error_class="bad_url",
        ) from exc
    if not url.host:
        raise DownloadError(
            f"refusing to download {_shown(uri)}: the URL has no host",
            uri=uri[:200],
            error_class="bad_url",
        )
    return url


def _status_error(response: httpx.Response, uri: str) -> DownloadError:
    code = response.status_code
    if code in (403, 404, 410):
        return ExpiredURLError(
            f"download {_shown(uri)}: HTTP {code} — the URL has expired or is gone",
            uri=uri[:200],
        )
    error_class = "http_429" if code == 429 else "http_5xx" if code >= 500 else f"http_{code}"
    return DownloadError(
        f"download {_shown(uri)}: HTTP {code}", uri=uri[:200], error_class=error_class
    )


async def fetch(
    client: httpx.AsyncClient,
    uri: str,
    dest: Path,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout: float = DEFAULT_TIMEOUT,
    max_redirects: int = DEFAULT_MAX_REDIRECTS,
    require_image: bool = True,
    sidecar: Callable[[Fetched], Mapping[str, Any]] | None = None,
) -> Fetched:
    """Download ``uri`` to ``dest`` (via ``<dest>.part``) and return what was stored.

    When the bytes turn out to be another image format than ``dest``'s extension says, the real
    extension replaces it: ``Fetched.path`` is where the file is. Raises DownloadError
    (``error_class``: ``bad_url``, ``too_large``, ``timeout``, ``redirect_loop``, ``truncated``,
    ``not_an_image``, ``bad_encoding``, ``connection``, ``http_<code>``) or ExpiredURLError
    (403/404/410).

    ``sidecar``: when given, ``sidecar(fetched)`` is written as the image's JSON sidecar
    (:func:`sidecar_path`, atomically) right after the image is renamed into place, and one
    folder fsync makes both renames durable. It may run on a worker thread (big bodies): it
    must only read.
    """
    check_uri(uri)
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    try:
        try:
            async with asyncio.timeout(timeout):
                body = await _stream_to(
                    client,
                    uri,
                    part,
                    max_bytes=max_bytes,
                    max_redirects=max_redirects,
                    require_image=require_image,
                )
        except TimeoutError as exc:
            raise DownloadError(
                f"download {_shown(uri)}: not finished after {timeout:g} s (download.timeout)",
                uri=uri[:200],
                error_class="timeout",
            ) from exc
        # Everything left touches the disk (write a small body, fsync, inspect, rename, sidecar,
        # folder fsync). For a body held in memory (at most one batch) it is done right here:
        # measured at 2,000 small images, handing it to a pooled thread cost more than it saved
        # (GIL hand-offs: 115-204 vs 16 context switches per job, CPU 4.7-5.3 vs 4.1-4.4 ms per
        # job, 4 % fewer jobs/s). A big body's last step (checking it reads the file) goes to
        # the thread pool.
        if body.held is not None:
            return _store(body, part, dest, uri, require_image, sidecar)
        return await _off_loop(_store, body, part, dest, uri, require_image, sidecar)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
        raise


@dataclass(slots=True)
class _Body:
    """A complete response body: held in memory (small), or already in ``<dest>.part``."""

    size: int
    content_type: str | None
    #: the chunks of a body that fit in one batch (not written yet); None once written
    held: list[bytes] | None
    #: sha256 hex of a body the writer thread already wrote and synced
    sha256: str | None = None


_T = TypeVar("_T")


async def _off_loop(function: Callable[..., _T], *args: Any) -> _T:
    """``function(*args)`` on the loop's default thread pool.

    If the awaiting task is cancelled, the thread still finishes before the cancellation goes
    on: ``function`` writes files, and the caller's cleanup must come after it, not race it.
    """
    future = asyncio.get_running_loop().run_in_executor(None, function, *args)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await future
        raise


def _store(
    body: _Body,
    part: Path,
    dest: Path,
    uri: str,
    require_image: bool,
    sidecar: Callable[[Fetched], Mapping[str, Any]] | None,
) -> Fetched:
    """(Worker thread) make ``part`` a durable, checked image at its final path; its sidecar."""
    if body.held is not None:
        part.parent.mkdir(parents=True, exist_ok=True)
        hasher = hashlib.sha256()
        with open(part, "wb") as handle:
            for chunk in body.held:
                hasher.update(chunk)
                handle.write(chunk)
            _flush_and_sync(handle)
        digest = hasher.hexdigest()
    else:
        assert body.sha256 is not None, "a written body carries its digest"
        digest = body.sha256
    width: int | None = None
    height: int | None = None
    if require_image:
        fmt, width, height = _inspect_image(part, uri)
        ext = _EXTENSIONS.get(fmt, fmt.lower())
    else:
        ext = _clean_ext(dest.suffix) if dest.suffix else "bin"
    final = dest
    current = dest.suffix.lstrip(".").lower()
    if current != ext:
        final = (
            dest.with_suffix(f".{ext}")
            if current in _GUESSABLE
            else dest.with_name(f"{dest.name}.{ext}")
        )
    os.replace(part, final)
    fetched = Fetched(final, body.size, digest, width, height, body.content_type, ext)
    if sidecar is not None:
        _write_json(sidecar_path(final), sidecar(fetched))
    _fsync_dir(final.parent)
    return fetched


async def _stream_to(
    client: httpx.AsyncClient,
    uri: str,
    part: Path,
    *,
    max_bytes: int,
    max_redirects: int,
    require_image: bool,
) -> _Body:
    """Follow redirects by hand, then read the body (into ``part`` when it is big)."""
    request = client.build_request("GET", uri)
    seen = [str(request.url)]
    for hop in range(max_redirects + 1):
        # whatever client we were given: the API token and cookies never reach a download host
        for header in ("Authorization", "Proxy-Authorization", "Cookie"):
            request.headers.pop(header, None)
        try:
            response = await client.send(request, stream=True, auth=None, follow_redirects=False)
        except httpx.HTTPError as exc:
            raise _network_error(exc, uri, started=False) from exc
        try:
            if response.next_request is not None:
                target = str(response.next_request.url)
                if hop == max_redirects:
                    raise DownloadError(
                        f"download {_shown(uri)}: more than {max_redirects} redirects",
                        uri=uri[:200],
                        error_class="redirect_loop",
                    )
                try:
                    check_uri(target)
                except DownloadError as exc:
                    raise DownloadError(
                        f"download {_shown(uri)}: redirected to {_shown(target)}, which is not "
                        "an http(s) URL",
                        uri=uri[:200],
                        error_class="bad_url",
                    ) from exc
                if target in seen:
                    raise DownloadError(
                        f"download {_shown(uri)}: redirect loop back to {_shown(target)}",
                        uri=uri[:200],
                        error_class="redirect_loop",
                    )
                seen.append(target)
                request = response.next_request
                continue
            return await _save_body(response, uri, part, max_bytes, require_image)
        finally:
            await response.aclose()
    raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover


async def _save_body(
    response: httpx.Response, uri: str, part: Path, max_bytes: int, require_image: bool
) -> _Body:
    if not 200 <= response.status_code < 300:
        raise _status_error(response, uri)
    content_type = response.headers.get("Content-Type")
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if require_image and media and _NOT_IMAGE_TYPES.match(media):
        raise DownloadError(
            f"download {_shown(uri)}: the server sent {media}, not an image",
            uri=uri[:200],
            error_class="not_an_image",
        )
    declared = response.headers.get("Content-Length")
    expected = int(declared) if declared and declared.strip().isdigit() else None
    if expected is not None and expected > max_bytes:
        raise _too_large(uri, max_bytes, f"it announces {expected:,} bytes")
    decoder: _Identity | _Inflate
    if response.is_stream_consumed:
        # an in-memory transport already read and decoded the whole body (httpx does that
        # for byte content): nothing left to stream, cap or decode
        decoder, expected, body = _Identity(), None, _once(response.content)
    else:
        decoder = _decoder(response.headers.get("Content-Encoding"), uri)
        body = response.aiter_raw()
    size = 0  # decoded bytes: what lands on disk, what the cap counts
    wire = 0  # bytes as received: what Content-Length counts
    batch: list[bytes] = []
    batch_bytes = 0
    # A body that fits in one batch (every ordinary image) stays in memory and is written by
    # fetch's single worker step; only a bigger one gets a writer thread while it streams.
    sink: _Sink | None = None
    try:
        try:
            async for raw in body:
                wire += len(raw)
                for chunk in decoder.feed(raw):
                    size += len(chunk)
                    if size > max_bytes:
                        raise _too_large(uri, max_bytes, "the body is longer")
                    batch.append(chunk)
                    batch_bytes += len(chunk)
                if batch_bytes >= _BATCH:
                    if sink is None:
                        sink = _Sink(part)
                    await sink.put(batch)
                    batch, batch_bytes = [], 0
        except httpx.HTTPError as exc:
            raise _network_error(exc, uri, started=True) from exc
        except zlib.error as exc:
            raise DownloadError(
                f"download {_shown(uri)}: the compressed body is corrupt ({exc})",
                uri=uri[:200],
                error_class="bad_encoding",
            ) from exc
        if (expected is not None and wire != expected) or not decoder.complete:
            got = f"got {wire:,} of {expected:,} bytes" if expected is not None else "cut short"
            raise DownloadError(
                f"download {_shown(uri)}: truncated — {got}",
                uri=uri[:200],
                error_class="truncated",
            )
        if sink is None:
            return _Body(size, content_type, held=batch)
        if batch:
            await sink.put(batch)
        return _Body(size, content_type, held=None, sha256=await sink.finish())
    finally:
        if sink is not None:
            sink.close()


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


class _Identity:
    """No content encoding: bytes pass through."""

    complete = True

    def feed(self, data: bytes) -> Iterator[bytes]:
        if data:
            yield data


class _Inflate:
    """gzip / deflate, decoded in pieces of at most ``CHUNK`` bytes.

    httpx's own decoders inflate a whole network chunk at once: a 64 kB gzip bomb would become
    64 MB in one step. Bounded steps let the size cap stop it after ``CHUNK`` bytes instead.
    """

    def __init__(self, raw_deflate: bool = False) -> None:
        # 47: zlib or gzip header, detected; -15: headerless deflate (some servers send it)
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS if raw_deflate else 32 + zlib.MAX_WBITS)
        self._raw = raw_deflate
        self._started = False

    @property
    def complete(self) -> bool:
        """True once the compressed stream reached its end marker."""
        return self._inflater.eof

    def feed(self, data: bytes) -> Iterator[bytes]:
        try:
            out = self._inflater.decompress(data, CHUNK)
        except zlib.error:
            if self._started or self._raw:
                raise
            # "deflate" without the zlib header: start over as raw deflate
            self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            self._raw = True
            out = self._inflater.decompress(data, CHUNK)
        self._started = True
        if out:
            yield out
        while self._inflater.unconsumed_tail:
            out = self._inflater.decompress(self._inflater.unconsumed_tail, CHUNK)
            if out:
                yield out


def _decoder(encoding: str | None, uri: str) -> _Identity | _Inflate:
    value = (encoding or "identity").strip().lower()
    if value in ("", "identity"):
        return _Identity()
    if value in ("gzip", "x-gzip", "deflate"):
        return _Inflate()
    raise DownloadError(
        f"download {_shown(uri)}: unsupported Content-Encoding {value[:40]!r} (asked for identity)",
        uri=uri[:200],
        error_class="bad_encoding",
    )


#: bytes handed to the writer thread at once, and how many hand-offs may wait (memory bound);
#: a body no longer than one batch never gets a writer thread
_BATCH: Final = 1024 * 1024
_MAX_PENDING: Final = 2


class _Sink:
    """Hashes and writes a big body on one worker thread, in order, while the loop keeps reading.

    Started only for bodies longer than one batch. sha256 and file writes release the GIL, so
    this overlaps them with HTTP parsing; at most ``_MAX_PENDING`` batches wait, so memory stays
    bounded whatever the file size. The file is created on the worker thread at the first batch.
    """

    def __init__(self, part: Path) -> None:
        self._part = part
        self._handle: BinaryIO | None = None
        self._digest = hashlib.sha256()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batchgen-fetch")
        self._pending: deque[asyncio.Future[None]] = deque()

    def _write(self, chunks: list[bytes]) -> None:
        if self._handle is None:
            self._part.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self._part, "wb")  # noqa: SIM115 - closed by _seal or close
        for chunk in chunks:
            self._digest.update(chunk)
            self._handle.write(chunk)

    def _seal(self) -> None:
        if self._handle is not None:
            _flush_and_sync(self._handle)
            self._handle.close()
            self._handle = None

    async def put(self, chunks: list[bytes]) -> None:
        """Queue ``chunks`` for hashing and writing; wait while too many are queued."""
        self._pending.append(asyncio.wrap_future(self._executor.submit(self._write, chunks)))
        while len(self._pending) > _MAX_PENDING:
            await self._pending.popleft()

    async def finish(self) -> str:
        """Wait for every write, fsync and close the file; return the sha256 hex digest."""
        while self._pending:
            await self._pending.popleft()
        await asyncio.wrap_future(self._executor.submit(self._seal))
        return self._digest.hexdigest()

    def close(self) -> None:
        """Stop the thread; on failure, queued writes are dropped and the running one finishes
        before the file is closed (and then removed by fetch)."""
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _flush_and_sync(handle: BinaryIO) -> None:
    handle.flush()
    os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _too_large(uri: str, max_bytes: int, why: str) -> DownloadError:
    return DownloadError(
        f"download {_shown(uri)}: larger than download.max_bytes ({max_bytes:,} bytes): {why}",
        uri=uri[:200],
        error_class="too_large",
    )


def _network_error(exc: httpx.HTTPError, uri: str, *, started: bool) -> DownloadError:
    kind = type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        error_class = "timeout"
    elif started and isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError)):
        error_class = "truncated"  # the connection closed in the middle of the body
    elif isinstance(exc, httpx.UnsupportedProtocol) or (
        not started and "location header" in str(exc).lower()
    ):
        error_class = "bad_url"  # a redirect to something that is not a usable URL
    else:
        error_class = "connection"
    detail = re.sub(r"\s+", " ", str(exc))[:160] or "no detail"
    return DownloadError(
        f"download {_shown(uri)}: {kind}: {detail}", uri=uri[:200], error_class=error_class
    )


# -- image checks ------------------------------------------------------------------------------

_PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"


def _inspect_image(path: Path, uri: str) -> tuple[str, int, int]:
    """(PIL format, width, height) of a complete image file, else DownloadError.

    Pixels are never decoded (memory stays flat); completeness is checked from the format's
    structure: the PNG chunk chain up to IEND, the JPEG EOI marker, the RIFF size of WEBP, the
    GIF trailer, and PIL's ``verify`` for other formats.
    """
    try:
        with warnings.catch_warnings():
            # dimensions are all we read: a huge canvas costs nothing here
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                fmt = image.format or "UNKNOWN"
                width, height = image.size
                if fmt not in ("PNG", "JPEG", "WEBP", "GIF"):
                    image.verify()
    except Image.DecompressionBombError as exc:
        raise DownloadError(
            f"download {_shown(uri)}: the image has too many pixels to be real ({exc})",
            uri=uri[:200],
            error_class="not_an_image",
        ) from exc
    except (UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise DownloadError(
            f"download {_shown(uri)}: the body is not an image PIL can read",
            uri=uri[:200],
            error_class="not_an_image",
        ) from exc
    except OSError as exc:  # PIL reports truncated headers and bad data as OSError
        raise DownloadError(
            f"download {_shown(uri)}: the image is truncated or corrupt ({exc})",
            uri=uri[:200],
            error_class="truncated",
        ) from exc
    problem = _structure_problem(path, fmt)
    if problem:
        raise DownloadError(
            f"download {_shown(uri)}: the {fmt} image is {problem}",
            uri=uri[:200],
            error_class="truncated",
        )
    return fmt, width, height


def _structure_problem(path: Path, fmt: str) -> str | None:
    """Why the file is not a complete ``fmt`` image, or None (reads in fixed-size blocks)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        if fmt == "PNG":
            return _png_problem(handle, size)
        if fmt == "JPEG":
            handle.seek(max(0, size - 4096))
            tail = handle.read().rstrip(b"\x00\r\n ")
            return None if tail.endswith(b"\xff\xd9") else "truncated (no end-of-image marker)"
        if fmt == "WEBP":
            header = handle.read(12)
            declared = struct.unpack("<I", header[4:8])[0] + 8 if len(header) >= 8 else None
            if declared is None or size < declared:
                return f"truncated ({size:,} of {declared or '?'} bytes)"
            return None
        if fmt == "GIF":
            handle.seek(max(0, size - 16))
            tail = handle.read().rstrip(b"\x00")
            return None if tail.endswith(b"\x3b") else "truncated (no trailer)"
    return None


def _png_problem(handle: BinaryIO, size: int) -> str | None:
    """Walk the chunk headers (seeking over the data) up to IEND: catches any truncation."""
    if handle.read(8) != _PNG_SIGNATURE:
        return "not a PNG"
    position = 8
    while True:
        head = handle.read(8)
        if len(head) < 8:
            return "truncated (no IEND chunk)"
        length, kind = struct.unpack(">I4s", head)
        position += 12 + length
        if position > size:
            return f"truncated (a {kind.decode('latin-1')} chunk ends past the {size:,} bytes)"
        if kind == b"IEND":
            return None
        handle.seek(position)


def ext_from_uri(uri: str, default: str = "png") -> str:
    """The extension a URI's path suggests (``…/a.webp?sig=…`` → ``webp``), else ``default``."""
    try:
        path = httpx.URL(uri).path
    except (httpx.InvalidURL, TypeError):
        return default
    name = path.rsplit("/", 1)[-1]
    if "." in name:
        ext = name.rsplit(".", 1)[1].lower()
        if ext == "jpeg":
            return "jpg"
        if ext in _GUESSABLE:
            return ext
    return default
