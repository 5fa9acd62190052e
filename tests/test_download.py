"""Downloads: safe output names, guarded streaming fetch, atomic sidecars.

Servers: ``httpx.MockTransport`` where the HTTP exchange is all that matters; a raw asyncio
server on 127.0.0.1 where real sockets matter (timeouts, endless bodies, dropped connections,
what headers actually arrived).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import re
import struct
import time
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from batchgen.download import (
    Fetched,
    check_uri,
    ext_from_uri,
    fetch,
    make_download_client,
    model_slug,
    output_path,
    path_for,
    resolve_inside,
    sidecar_path,
    sidecar_record,
    write_sidecar,
)
from batchgen.errors import DownloadError, ExpiredURLError

MODEL = "google/nano-banana/pro/text-to-image"
WINDOWS_RESERVED = (
    {"CON", "PRN", "AUX", "NUL"} | {f"COM{i}" for i in range(10)} | {f"LPT{i}" for i in range(10)}
)


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 60)).save(buffer, format=fmt)
    return buffer.getvalue()


PNG = image_bytes("PNG")
JPEG = image_bytes("JPEG")


def assert_portable(rel: PurePosixPath) -> None:
    """A relative path every filesystem (Windows included) accepts as written."""
    assert not rel.is_absolute()
    assert len(str(rel)) <= 240
    for part in rel.parts:
        assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", part), part
        assert part not in (".", "..")
        assert not part.endswith((".", " ", "-"))
        assert part.split(".")[0].upper() not in WINDOWS_RESERVED, part
        assert len(part) <= 100


@dataclass
class FakeJob:
    model: str
    params: dict[str, Any]
    sample: int = 0
    id: str = "job123"
    sweep: str = "sweep-1"
    metadata: dict[str, Any] = field(default_factory=dict)
    request_id: str | None = "req_1"


# -- output paths ---------------------------------------------------------------------------------


def test_output_path_layout() -> None:
    job = FakeJob(
        MODEL,
        {
            "prompt": "A red fox, in fresh snow!",
            "aspect_ratio": "16:9",
            "resolution": "2K",
            "seed": 5,
        },
        sample=2,
    )
    rel = output_path(job, 0, "png")
    model, prompt, name = rel.parts
    assert model == "google__nano-banana__pro__text-to-image"
    assert re.fullmatch(r"A_red_fox_in_fresh_snow-[0-9a-f]{12}", prompt)
    assert re.fullmatch(r"aspect_ratio-16_9_resolution-2K_seed-5-[0-9a-f]{12}__s2\.png", name)
    assert output_path(job, 3, ".PNG").name == name.replace("__s2.png", "__s2_3.png")
    assert output_path(job, 0, "p/n?g").suffix == ".bin"
    assert rel == path_for(MODEL, job.params["prompt"], job.params, 2, 0, "png")
    assert_portable(rel)


def test_paths_are_stable_and_separate_every_job_dimension() -> None:
    base = {"prompt": "p", "seed": 1}
    paths = {
        path_for(MODEL, "p", base, 0, 0, "png"),
        path_for(MODEL, "p", base, 1, 0, "png"),
        path_for(MODEL, "p", base, 0, 1, "png"),
        path_for(MODEL, "P", {**base, "prompt": "P"}, 0, 0, "png"),
        path_for(MODEL, "p", {**base, "seed": 2}, 0, 0, "png"),
        path_for(MODEL, "p", {**base, "seed": "1"}, 0, 0, "png"),
        path_for("blackforestlabs/flux-2/max/text-to-image", "p", base, 0, 0, "png"),
    }
    assert len(paths) == 7
    assert len({str(p).lower() for p in paths}) == 7  # case-insensitive filesystems too
    assert path_for(MODEL, "p", base, 0, 0, "png") == path_for(MODEL, "p", base, 0, 0, "png")


HOSTILE_PROMPTS = [
    "../../etc/passwd",
    "/",
    "/etc/passwd",
    "..",
    ".",
    "...",
    ".hidden",
    "\x00",
    "a\x00b",
    "a" * 10_000,
    "🦊🔥" * 50,
    "שלום עולם \u202e gnp.exe",
    "مرحبا بالعالم",
    "东京的夜晚",
    "CON",
    "con.txt",
    "nul",
    "COM1",
    "LPT9.png",
    "aux.tar.gz",
    " ",
    "",
    "trailing dot.",
    "C:\\Windows\\System32",
    "\\\\server\\share",
    'a/b\\c:d*e?f"g<h>i|j',
    "\ud800 lone surrogate",
    "café naïve façade",
]


@pytest.mark.parametrize("prompt", HOSTILE_PROMPTS, ids=range(len(HOSTILE_PROMPTS)))
def test_hostile_prompts_give_sane_paths_inside_the_root(prompt: str, tmp_path: Path) -> None:
    rel = path_for(MODEL, prompt, {"prompt": prompt, "seed": 1}, 0, 0, "png")
    assert_portable(rel)
    assert len(rel.parts) == 3
    target = resolve_inside(tmp_path, rel)
    assert target.is_relative_to(tmp_path.resolve())


def test_hostile_prompts_never_collide() -> None:
    paths = [path_for(MODEL, p, {"prompt": p}, 0, 0, "png") for p in HOSTILE_PROMPTS]
    assert len({str(p).lower() for p in paths}) == len(HOSTILE_PROMPTS)


def test_readable_parts_survive() -> None:
    assert path_for(MODEL, "café naïve", {}, 0, 0, "png").parts[1].startswith("cafe_naive-")
    assert path_for(MODEL, "CON", {}, 0, 0, "png").parts[1].startswith("CON-")
    assert path_for(MODEL, "con.txt", {}, 0, 0, "png").parts[1].startswith("_con.txt-")
    assert path_for(MODEL, "🦊", {}, 0, 0, "png").parts[1].startswith("prompt-")
    assert path_for(MODEL, "p", {"prompt": "p"}, 0, 0, "png").name.startswith("default-")


@pytest.mark.parametrize(
    ("model_id", "expected"),
    [
        (MODEL, "google__nano-banana__pro__text-to-image"),
        ("blackforestlabs/flux-2/max/text-to-image", "blackforestlabs__flux-2__max__text-to-image"),
        ("con", "_con"),
    ],
)
def test_model_slugs(model_id: str, expected: str) -> None:
    assert model_slug(model_id) == expected


@pytest.mark.parametrize(
    "model_id", ["Google/Nano", "google/nano", "a_b/c", "a/b_c", "../x", "", "a" * 300, "x/./y"]
)
def test_unusual_model_ids_are_hashed_and_distinct(model_id: str) -> None:
    slug = model_slug(model_id)
    assert_portable(PurePosixPath(slug))
    others = ["Google/Nano", "google/nano", "a_b/c", "a/b_c", "../x", "", "a" * 300, "x/./y"]
    assert len({model_slug(m).lower() for m in others}) == len(others)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(prompt=st.text(max_size=2000), sample=st.integers(0, 10_000), index=st.integers(0, 64))
def test_any_prompt_gives_a_portable_path_inside_the_root(
    tmp_path: Path, prompt: str, sample: int, index: int
) -> None:
    rel = path_for(MODEL, prompt, {"prompt": prompt, "seed": sample}, sample, index, "png")
    assert_portable(rel)
    assert resolve_inside(tmp_path, rel).is_relative_to(tmp_path.resolve())


@settings(max_examples=150, deadline=None)
@given(prompts=st.lists(st.text(max_size=300), min_size=2, max_size=25, unique=True))
def test_distinct_prompts_never_share_a_folder(prompts: list[str]) -> None:
    folders = {path_for(MODEL, p, {"prompt": p}, 0, 0, "png").parts[1].lower() for p in prompts}
    assert len(folders) == len(prompts)


PARAM_VALUES = st.one_of(
    st.text(max_size=40),
    st.integers(),
    st.floats(allow_nan=False),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=3),
)


@settings(max_examples=150, deadline=None)
@given(
    params=st.lists(
        st.dictionaries(st.text(max_size=12), PARAM_VALUES, max_size=5),
        min_size=2,
        max_size=15,
        unique_by=lambda d: json.dumps(d, sort_keys=True),
    )
)
def test_distinct_parameters_never_share_a_file_name(params: list[dict[str, Any]]) -> None:
    names = {path_for(MODEL, "p", {**p, "prompt": "p"}, 0, 0, "png").name.lower() for p in params}
    assert len(names) == len(
        {json.dumps({k: v for k, v in p.items() if k != "prompt"}, sort_keys=True) for p in params}
    )
    for p in params:
        assert_portable(path_for(MODEL, "p", p, 0, 0, "png"))


@pytest.mark.parametrize(
    "rel",
    [
        "../x.png",
        "/etc/passwd",
        "a/../../b.png",
        "a/./b",
        "C:/x.png",
        "a\\..\\b",
        "",
        "a\x00b",
        "..",
        ".",
    ],
)
def test_resolve_inside_refuses_escapes(tmp_path: Path, rel: str) -> None:
    with pytest.raises(DownloadError) as info:
        resolve_inside(tmp_path / "out", rel)
    assert info.value.error_class == "unsafe_path"


def test_resolve_inside_refuses_symlinks_out_of_the_root(tmp_path: Path) -> None:
    root = tmp_path / "out"
    (root / "model").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (root / "model" / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(DownloadError, match="outside"):
        resolve_inside(root, "model/link/x.png")
    assert resolve_inside(root, "model/x.png") == (root / "model" / "x.png").resolve()


# -- sidecars -------------------------------------------------------------------------------------


def test_write_sidecar_is_atomic_json(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "x__s0.json"
    write_sidecar(target, {"prompt": "🦊 ../x", "n": 1})
    write_sidecar(target, {"prompt": "second", "params": {"seed": 2}})
    assert json.loads(target.read_text(encoding="utf-8")) == {
        "prompt": "second",
        "params": {"seed": 2},
    }
    assert sorted(p.name for p in target.parent.iterdir()) == ["x__s0.json"]


def test_write_sidecar_failure_leaves_no_temp_file(tmp_path: Path) -> None:
    class Boom:  # unknown objects are rendered with str(); this one cannot be
        def __str__(self) -> str:
            raise TypeError("no")

    with pytest.raises(TypeError):
        write_sidecar(tmp_path / "y.json", {"bad": Boom()})
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_sidecar_path_and_record(tmp_path: Path) -> None:
    assert sidecar_path(tmp_path / "a-1.5__s0.png") == tmp_path / "a-1.5__s0.json"
    job = FakeJob(MODEL, {"prompt": "p", "seed": 9}, metadata={"Category": "Animals"})
    fetched = Fetched(tmp_path / "x.png", 10, "ab" * 32, 64, 48, "image/png", "png")
    record = sidecar_record(
        job,
        index=0,
        uri="http://h/x.png",
        fetched=fetched,
        path="m/p/x.png",
        timings={"submitted_at": "t0"},
    )
    assert record["job_id"] == "job123" and record["seed"] == 9 and record["prompt"] == "p"
    assert record["metadata"] == {"Category": "Animals"} and record["request_id"] == "req_1"
    assert record["sha256"] == "ab" * 32 and (record["width"], record["height"]) == (64, 48)
    assert record["timings"] == {"submitted_at": "t0"}


def test_ext_from_uri() -> None:
    assert ext_from_uri("https://cdn.test/a/b.webp?sig=x") == "webp"
    assert ext_from_uri("https://cdn.test/a/b.JPEG") == "jpg"
    assert ext_from_uri("https://cdn.test/a/b") == "png"
    assert ext_from_uri("https://cdn.test/a/b.exe", "bin") == "bin"


# -- fetch over a mock transport ------------------------------------------------------------------


Handler = Callable[[httpx.Request], httpx.Response]


def mock_client(handler: Handler, **headers: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(handler), headers=headers)


def serving(body: bytes, status: int = 200, content_type: str | None = "image/png") -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        headers = {"Content-Type": content_type} if content_type else {}
        return httpx.Response(status, content=body, headers=headers)

    return handler


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


async def test_fetch_stores_the_image_and_reports_it(tmp_path: Path) -> None:
    dest = tmp_path / "m" / "p" / "x__s0.png"
    async with mock_client(serving(PNG)) as client:
        fetched = await fetch(client, "https://cdn.test/x.png", dest, max_bytes=10**6, timeout=5)
    assert fetched == Fetched(
        dest, len(PNG), hashlib.sha256(PNG).hexdigest(), 64, 48, "image/png", "png"
    )
    assert dest.read_bytes() == PNG
    assert leftovers(tmp_path) == ["x__s0.png"]


async def test_fetch_names_the_file_after_the_real_format(tmp_path: Path) -> None:
    async with mock_client(serving(JPEG, content_type="application/octet-stream")) as client:
        fetched = await fetch(client, "https://cdn.test/x", tmp_path / "x__s0.png")
        odd = await fetch(client, "https://cdn.test/x", tmp_path / "guidance-3.5__s0")
    assert fetched.path == tmp_path / "x__s0.jpg" and fetched.ext == "jpg"
    assert odd.path == tmp_path / "guidance-3.5__s0.jpg"
    assert leftovers(tmp_path) == ["guidance-3.5__s0.jpg", "x__s0.jpg"]


@pytest.mark.parametrize(
    "uri",
    [
        "file:///etc/passwd",
        "data:image/png;base64,iVBORw0KGgo=",
        "ftp://cdn.test/x.png",
        "javascript:alert(1)",
        "gopher://x/",
        "//cdn.test/x.png",
        "/etc/passwd",
        "",
        "http:///no-host",
        "HTTPS",
    ],
)
async def test_non_http_uris_are_refused_with_a_reason(tmp_path: Path, uri: str) -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(200, content=PNG)

    async with mock_client(handler) as client:
        with pytest.raises(DownloadError) as info:
            await fetch(client, uri, tmp_path / "x.png")
    assert info.value.error_class == "bad_url"
    assert "refusing" in str(info.value)
    assert calls == [] and leftovers(tmp_path) == []


def test_check_uri_accepts_http_and_https() -> None:
    assert check_uri("https://cdn.test/a.png").host == "cdn.test"
    assert check_uri("HTTP://127.0.0.1:8/a").port == 8
    with pytest.raises(DownloadError):
        check_uri(None)


@pytest.mark.parametrize(
    ("status", "expected", "error_class"),
    [
        (403, ExpiredURLError, "url_expired"),
        (404, ExpiredURLError, "url_expired"),
        (410, ExpiredURLError, "url_expired"),
        (429, DownloadError, "http_429"),
        (500, DownloadError, "http_5xx"),
        (503, DownloadError, "http_5xx"),
        (401, DownloadError, "http_401"),
    ],
)
async def test_http_errors(
    tmp_path: Path, status: int, expected: type[DownloadError], error_class: str
) -> None:
    async with mock_client(serving(b"nope", status, "text/plain")) as client:
        with pytest.raises(DownloadError) as info:
            await fetch(client, "https://cdn.test/x.png", tmp_path / "x.png")
    assert type(info.value) is expected
    assert info.value.error_class == error_class
    assert leftovers(tmp_path) == []


async def test_redirect_loop_is_refused(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        target = "/b" if request.url.path == "/a" else "/a"
        return httpx.Response(302, headers={"Location": target})

    async with mock_client(handler) as client:
        with pytest.raises(DownloadError, match="redirect loop") as info:
            await fetch(client, "https://cdn.test/a", tmp_path / "x.png")
    assert info.value.error_class == "redirect_loop"
    assert leftovers(tmp_path) == []


async def test_too_many_redirects_are_refused(tmp_path: Path) -> None:
    hops: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        hops.append(request.url.path)
        return httpx.Response(301, headers={"Location": f"/hop{len(hops)}"})

    async with mock_client(handler) as client:
        with pytest.raises(DownloadError, match="more than 3 redirects") as info:
            await fetch(client, "https://cdn.test/start", tmp_path / "x.png", max_redirects=3)
    assert info.value.error_class == "redirect_loop"
    assert len(hops) == 4


async def test_redirect_to_another_scheme_is_refused(tmp_path: Path) -> None:
    async with mock_client(
        lambda r: httpx.Response(302, headers={"Location": "file:///etc/passwd"})
    ) as client:
        with pytest.raises(DownloadError) as info:
            await fetch(client, "https://cdn.test/x", tmp_path / "x.png")
    assert info.value.error_class == "bad_url"


async def test_redirects_are_followed_without_credentials(tmp_path: Path) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.host == "api.test":
            return httpx.Response(
                302,
                headers={"Location": "https://cdn.test/final.png", "Set-Cookie": "s=1; Path=/"},
            )
        return httpx.Response(200, content=PNG, headers={"Content-Type": "image/png"})

    # even a client that carries the API token and a cookie must not send them
    client = httpx.AsyncClient(
        transport=httpx.MockTransport(handler),
        headers={"Authorization": "Bearer SECRET"},
        cookies={"session": "SECRET"},
    )
    async with client:
        fetched = await fetch(client, "https://api.test/x", tmp_path / "x.png")
    assert fetched.bytes == len(PNG)
    assert [r.url.host for r in seen] == ["api.test", "cdn.test"]
    for request in seen:
        assert "authorization" not in request.headers
        assert "cookie" not in request.headers


async def test_make_download_client_sends_no_credentials_and_keeps_no_cookies() -> None:
    seen: list[httpx.Request] = []
    client = make_download_client()
    assert "authorization" not in client.headers
    client._transport = httpx.MockTransport(  # the client's own settings, a fake network
        lambda r: (seen.append(r), httpx.Response(200, headers={"Set-Cookie": "a=b; Path=/"}))[1]
    )
    async with client:
        await client.get("https://cdn.test/1")
        await client.get("https://cdn.test/2")
    assert len(client.cookies) == 0
    assert all("cookie" not in r.headers and "authorization" not in r.headers for r in seen)


async def test_content_length_over_the_cap_is_refused_before_reading(tmp_path: Path) -> None:
    pulled = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal pulled
        for _ in range(100):
            pulled += 1
            yield b"\0" * 65536

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body(), headers={"Content-Length": str(100 * 65536)})

    async with mock_client(handler) as client:
        with pytest.raises(DownloadError, match="announces") as info:
            await fetch(client, "https://cdn.test/x", tmp_path / "x.png", max_bytes=1_000_000)
    assert info.value.error_class == "too_large"
    assert pulled == 0
    assert leftovers(tmp_path) == []


async def test_a_body_longer_than_the_cap_stops_at_the_cap(tmp_path: Path) -> None:
    pulled = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal pulled
        while True:
            pulled += 1
            yield b"\0" * 65536

    async with mock_client(lambda r: httpx.Response(200, content=endless())) as client:
        with pytest.raises(DownloadError, match="max_bytes") as info:
            await fetch(client, "https://cdn.test/x", tmp_path / "x.png", max_bytes=1_000_000)
    assert info.value.error_class == "too_large"
    assert pulled <= 1_000_000 // 65536 + 2
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"<html><body>Access denied</body></html>", "text/html; charset=utf-8"),
        (b'{"error": "expired"}', "application/json"),
        (PNG, "text/html"),  # the type alone decides when it cannot be an image
        (b"<html>not really</html>", "image/png"),  # the bytes decide when the type lies
        (b"", "image/png"),
        (b"GIF89a" + b"\0" * 3, None),
    ],
)
async def test_what_is_not_an_image_is_refused(
    tmp_path: Path, body: bytes, content_type: str | None
) -> None:
    async with mock_client(serving(body, content_type=content_type)) as client:
        with pytest.raises(DownloadError) as info:
            await fetch(client, "https://cdn.test/x.png", tmp_path / "x.png")
    assert info.value.error_class in ("not_an_image", "truncated")
    if content_type and not content_type.startswith("image/"):
        assert info.value.error_class == "not_an_image"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
async def test_truncated_images_are_refused(tmp_path: Path, fmt: str) -> None:
    whole = image_bytes(fmt, (300, 200))
    cut = whole[: len(whole) * 2 // 3]
    async with mock_client(serving(cut, content_type=f"image/{fmt.lower()}")) as client:
        with pytest.raises(DownloadError) as info:
            await fetch(client, "https://cdn.test/x", tmp_path / "x.png")
    assert info.value.error_class == "truncated", str(info.value)
    assert leftovers(tmp_path) == []
    async with mock_client(serving(whole, content_type=f"image/{fmt.lower()}")) as client:
        fetched = await fetch(client, "https://cdn.test/x", tmp_path / "x.png")
    assert (fetched.width, fetched.height) == (300, 200)


async def test_a_body_shorter_than_its_content_length_is_truncated(tmp_path: Path) -> None:
    async def short() -> AsyncIterator[bytes]:
        yield PNG[:50]

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=short(), headers={"Content-Length": str(len(PNG))})

    async with mock_client(handler) as client:
        with pytest.raises(DownloadError, match="truncated") as info:
            await fetch(client, "https://cdn.test/x", tmp_path / "x.png")
    assert info.value.error_class == "truncated"
    assert leftovers(tmp_path) == []


async def test_a_failed_download_keeps_the_previous_file(tmp_path: Path) -> None:
    dest = tmp_path / "x.png"
    dest.write_bytes(PNG)
    async with mock_client(serving(PNG[:40])) as client:
        with pytest.raises(DownloadError):
            await fetch(client, "https://cdn.test/x", dest)
    assert dest.read_bytes() == PNG
    assert leftovers(tmp_path) == ["x.png"]


async def test_non_image_outputs_when_asked(tmp_path: Path) -> None:
    video = b"\x00\x00\x00\x18ftypmp42" + b"\x01" * 1000
    async with mock_client(serving(video, content_type="video/mp4")) as client:
        fetched = await fetch(
            client, "https://cdn.test/v.mp4", tmp_path / "v.mp4", require_image=False
        )
    assert fetched.width is None and fetched.ext == "mp4" and fetched.bytes == len(video)


async def test_cancellation_of_a_small_body_leaves_nothing(tmp_path: Path) -> None:
    """A body that fits in one batch is held in memory: nothing touches the disk until it is
    complete, so a cancel mid-stream leaves no file at all."""
    started = asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield PNG[:20]
        started.set()
        await asyncio.sleep(30)
        yield PNG[20:]

    async with mock_client(lambda r: httpx.Response(200, content=slow())) as client:
        task = asyncio.create_task(fetch(client, "https://cdn.test/x", tmp_path / "x.png"))
        await started.wait()
        await asyncio.sleep(0.05)
        assert leftovers(tmp_path) == []
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert leftovers(tmp_path) == []


async def test_cancellation_of_a_big_body_removes_the_part_file(tmp_path: Path) -> None:
    """A body longer than one batch streams into ``.part`` on a writer thread; a cancel
    mid-stream waits for the write under way, then removes the file."""
    import batchgen.download as download

    started = asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        sent = 0
        async for chunk in big_png(8_000_000, hashlib.sha256()):
            yield chunk
            sent += len(chunk)
            if sent > 3 * download._BATCH and not started.is_set():
                started.set()
                await asyncio.sleep(30)

    async with mock_client(lambda r: httpx.Response(200, content=slow())) as client:
        task = asyncio.create_task(fetch(client, "https://cdn.test/x", tmp_path / "x.png"))
        await started.wait()
        for _ in range(100):  # the writer thread creates the file at its first batch
            if leftovers(tmp_path):
                break
            await asyncio.sleep(0.01)
        assert leftovers(tmp_path) == ["x.png.part"]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert leftovers(tmp_path) == []


# -- a 50 MB body with flat memory ---------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


async def big_png(total: int, digest: Any, width: int = 2048) -> AsyncIterator[bytes]:
    """A valid RGB PNG of about ``total`` bytes, generated 64 rows at a time (never in memory)."""
    row = width * 3 + 1
    height = max(1, total // row)
    compressor = zlib.compressobj(level=0)
    pattern = bytes(range(256)) * (row * 64 // 256 + 1)

    def emit(data: bytes) -> bytes:
        digest.update(data)
        return data

    yield emit(
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    )
    for start in range(0, height, 64):
        rows = min(64, height - start)
        block = bytearray(pattern[: rows * row])
        for r in range(rows):
            block[r * row] = 0
        data = compressor.compress(bytes(block))
        if data:
            yield emit(_chunk(b"IDAT", data))
    yield emit(_chunk(b"IDAT", compressor.flush()) + _chunk(b"IEND", b""))


async def test_a_50_mb_download_keeps_memory_flat(tmp_path: Path) -> None:
    sent = hashlib.sha256()

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, content=big_png(50_000_000, sent), headers={"Content-Type": "image/png"}
        )

    async with mock_client(handler) as client:
        tracemalloc.start()
        try:
            fetched = await fetch(
                client,
                "https://cdn.test/big.png",
                tmp_path / "big.png",
                max_bytes=60_000_000,
                timeout=60,
            )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert fetched.bytes >= 50_000_000
    assert fetched.bytes == (tmp_path / "big.png").stat().st_size
    assert fetched.sha256 == sent.hexdigest()
    assert (fetched.width, fetched.height) == (2048, 50_000_000 // (2048 * 3 + 1))
    assert peak < 8_000_000, f"peak traced memory {peak:,} bytes for a 50 MB file"


# -- over real sockets ---------------------------------------------------------------------------

Behaviour = Callable[[asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A tiny HTTP/1.1 server on 127.0.0.1 whose answers are raw bytes (for misbehaviour)."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.requests: list[dict[str, str]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.url = ""

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/out.png"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {
                k.strip().lower(): v.strip()
                for k, _, v in (line.partition(":") for line in lines[1:] if line)
            }
            headers[":request-line"] = lines[0]
            self.requests.append(headers)
            await self.behaviour(writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)


def head(length: int | None = None, content_type: str = "image/png") -> bytes:
    lines = ["HTTP/1.1 200 OK", f"Content-Type: {content_type}", "Connection: close"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def test_socket_no_authorization_reaches_the_download_host(tmp_path: Path) -> None:
    async def ok(writer: asyncio.StreamWriter) -> None:
        writer.write(head(len(PNG)) + PNG)
        await writer.drain()

    async with RawServer(ok) as server, make_download_client() as client:
        await fetch(client, server.url, tmp_path / "a.png")
        # and a careless caller handing over an authorised client leaks nothing either
        async with httpx.AsyncClient(headers={"Authorization": "Bearer rc_SECRET"}) as risky:
            await fetch(risky, server.url, tmp_path / "b.png")
    assert len(server.requests) == 2
    for request in server.requests:
        assert "authorization" not in request and "cookie" not in request
        assert request[":request-line"] == "GET /out.png HTTP/1.1"


async def test_socket_endless_body_stops_at_the_size_cap(tmp_path: Path) -> None:
    async def endless(writer: asyncio.StreamWriter) -> None:
        writer.write(head(None) + PNG[:33])
        while True:
            writer.write(b"\0" * 65536)
            await writer.drain()

    async with RawServer(endless) as server, make_download_client() as client:
        started = time.monotonic()
        with pytest.raises(DownloadError) as info:
            await fetch(client, server.url, tmp_path / "x.png", max_bytes=2_000_000, timeout=20)
    assert info.value.error_class == "too_large"
    assert time.monotonic() - started < 10
    assert leftovers(tmp_path) == []


async def test_socket_endless_slow_body_stops_at_the_timeout(tmp_path: Path) -> None:
    async def trickle(writer: asyncio.StreamWriter) -> None:
        writer.write(head(None) + PNG[:33])
        while True:  # a byte every 50 ms: never idle long enough for a read timeout
            writer.write(b"\0")
            await writer.drain()
            await asyncio.sleep(0.05)

    async with RawServer(trickle) as server, make_download_client() as client:
        started = time.monotonic()
        with pytest.raises(DownloadError, match=r"download\.timeout") as info:
            await fetch(client, server.url, tmp_path / "x.png", max_bytes=10**9, timeout=0.6)
    assert info.value.error_class == "timeout"
    assert 0.5 < time.monotonic() - started < 5
    assert leftovers(tmp_path) == []


async def test_socket_silent_server_times_out(tmp_path: Path) -> None:
    async def silent(writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    async with RawServer(silent) as server, make_download_client() as client:
        with pytest.raises(DownloadError) as info:
            await fetch(client, server.url, tmp_path / "x.png", timeout=0.4)
    assert info.value.error_class == "timeout"


async def test_socket_connection_dropped_mid_body_is_truncated(tmp_path: Path) -> None:
    whole = image_bytes("PNG", (400, 400))

    async def drop(writer: asyncio.StreamWriter) -> None:
        writer.write(head(len(whole)) + whole[: len(whole) // 2])
        await writer.drain()

    async with RawServer(drop) as server, make_download_client() as client:
        with pytest.raises(DownloadError) as info:
            await fetch(client, server.url, tmp_path / "x.png")
    assert info.value.error_class == "truncated"
    assert leftovers(tmp_path) == []


async def test_socket_refused_connection(tmp_path: Path) -> None:
    async with RawServer(lambda w: asyncio.sleep(0)) as server:
        url = server.url
    async with make_download_client() as client:
        with pytest.raises(DownloadError) as info:
            await fetch(client, url, tmp_path / "x.png", timeout=5)
    assert info.value.error_class == "connection"


async def test_a_slow_disk_does_not_make_memory_follow_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The network side waits for the writer: queued data stays bounded when writes lag."""
    import batchgen.download as download

    original = download._Sink._write

    def slow_write(self: Any, chunks: list[bytes]) -> None:
        time.sleep(0.01)  # in the writer thread: a slow disk
        original(self, chunks)

    monkeypatch.setattr(download._Sink, "_write", slow_write)
    sent = hashlib.sha256()

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=big_png(32_000_000, sent))

    async with mock_client(handler) as client:
        tracemalloc.start()
        try:
            fetched = await fetch(client, "https://cdn.test/big.png", tmp_path / "big.png")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert fetched.sha256 == sent.hexdigest()
    assert peak < 12_000_000, f"peak traced memory {peak:,} bytes for a 32 MB file"


# -- content encodings ----------------------------------------------------------------------------


def encoded(body: bytes, encoding: str) -> Handler:
    async def stream() -> AsyncIterator[bytes]:
        yield body  # one network chunk: the worst case for a decompression bomb

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            content=stream(),
            headers={"Content-Encoding": encoding, "Content-Type": "image/png"},
        )

    return handler


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", lambda data: zlib.compress(data)[2:-4]),  # headerless deflate
    ],
)
async def test_encoded_bodies_are_decoded(
    tmp_path: Path, encoding: str, compress: Callable[[bytes], bytes]
) -> None:
    async with mock_client(encoded(compress(PNG), encoding)) as client:
        fetched = await fetch(client, "https://cdn.test/x.png", tmp_path / "x.png")
    assert fetched.sha256 == hashlib.sha256(PNG).hexdigest()
    assert (tmp_path / "x.png").read_bytes() == PNG


async def test_a_gzip_bomb_stops_at_the_cap_without_inflating_in_memory(tmp_path: Path) -> None:
    bomb = gzip.compress(b"\0" * 50_000_000, compresslevel=9)
    assert len(bomb) < 100_000
    async with mock_client(encoded(bomb, "gzip")) as client:
        tracemalloc.start()
        try:
            with pytest.raises(DownloadError, match="max_bytes") as info:
                await fetch(client, "https://cdn.test/x.png", tmp_path / "x.png", max_bytes=300_000)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert info.value.error_class == "too_large"
    assert peak < 3_000_000, f"peak traced memory {peak:,} bytes while refusing a gzip bomb"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("body", "encoding", "error_class"),
    [
        (b"\x1f\x8b\x08\x00garbage-not-gzip" * 10, "gzip", "bad_encoding"),
        (gzip.compress(PNG)[:-30], "gzip", "truncated"),
        (PNG, "br", "bad_encoding"),
        (PNG, "gzip, br", "bad_encoding"),
    ],
)
async def test_bad_encodings(tmp_path: Path, body: bytes, encoding: str, error_class: str) -> None:
    async with mock_client(encoded(body, encoding)) as client:
        with pytest.raises(DownloadError) as info:
            await fetch(client, "https://cdn.test/x.png", tmp_path / "x.png")
    assert info.value.error_class == error_class, str(info.value)
    assert leftovers(tmp_path) == []


async def test_socket_download_asks_for_identity_encoding(tmp_path: Path) -> None:
    async def ok(writer: asyncio.StreamWriter) -> None:
        writer.write(head(len(PNG)) + PNG)
        await writer.drain()

    async with RawServer(ok) as server, make_download_client() as client:
        await fetch(client, server.url, tmp_path / "a.png")
    assert server.requests[0]["accept-encoding"] == "identity"


def test_worst_case_paths_stay_short() -> None:
    rel = path_for(
        "Vendor_X/" + "m" * 300,
        "p" * 10_000,
        {"prompt": "p", "negative_prompt": "n" * 5_000, "loras": [{"path": "x" * 500}]},
        999_999,
        99,
        "jpeg2000x",
    )
    assert_portable(rel)
    assert len(str(rel)) <= 215, len(str(rel))


async def test_a_malformed_redirect_location_is_a_bad_url(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(302, headers={"Location": "http://cdn.test:abc/x"})

    async with mock_client(handler) as client:
        with pytest.raises(DownloadError) as info:
            await fetch(client, "https://cdn.test/x", tmp_path / "x.png")
    assert info.value.error_class == "bad_url", str(info.value)
    assert leftovers(tmp_path) == []
