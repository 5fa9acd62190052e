"""R4: hostile prompts and hostile API answers, end to end through ``batchgen run``.

Two halves:

- hostile *prompts* (path traversal, absolute paths, NUL and control characters, a 10 kB prompt,
  emoji, right-to-left text and overrides, Windows-reserved names, names that differ only by case)
  run on the embedded simulator: every file lands inside the output folder under a portable name,
  no two jobs share a file, and the sidecar keeps the prompt exactly;
- hostile *answers*: a small RunComfy-speaking server on 127.0.0.1 whose results point at
  non-http(s) URIs, redirect loops, bodies without end, a drip that never finishes, a lying
  Content-Length, a gzip bomb, HTML instead of an image, a hostile request id and follow-up URLs
  on another path. The real runner must fail each job with a clear reason, stop each download at
  the size cap or the timeout, never follow the server's URLs with the token, and leave nothing
  behind.

The download engineer unit-tests ``download.py`` on its own; these tests go through the runner.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import io
import json
import os
import subprocess
import threading
import time
import unicodedata
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from batchgen.simulator import Simulator, SimulatorConfig
from batchgen.store import JobState, Store
from bench.crash import batchgen_command, provider_env, serve_in_thread, walk_files

pytestmark = pytest.mark.timeout(120)

MODEL = "google/nano-banana/pro/text-to-image"
#: Windows refuses these as file names, with or without an extension (and case-insensitively)
RESERVED = (
    {"CON", "PRN", "AUX", "NUL"} | {f"COM{i}" for i in range(10)} | {f"LPT{i}" for i in range(10)}
)
#: characters Windows forbids in names, besides the control characters
FORBIDDEN = set('<>:"/\\|?*')
#: bidi controls that make a name display differently from what it is ("\u202egnp.exe")
BIDI = {chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C)}


def portable_name_problems(component: str) -> list[str]:
    """Why a path component is not safe on every filesystem ([] when it is)."""
    problems = []
    if component in ("", ".", ".."):
        problems.append("empty or dot name")
    if len(component.encode("utf-8")) > 255:
        problems.append(f"{len(component.encode('utf-8'))} bytes > 255")
    if any(unicodedata.category(ch) == "Cc" for ch in component):
        problems.append("control character")
    if FORBIDDEN & set(component):
        problems.append(f"forbidden characters {sorted(FORBIDDEN & set(component))}")
    if BIDI & set(component):
        problems.append("bidirectional override character")
    if component.endswith((".", " ")):
        problems.append("ends with a dot or a space (Windows strips it)")
    if component.split(".")[0].strip().upper() in RESERVED:
        problems.append("Windows-reserved device name")
    return problems


def _run(
    argv: list[str], env: dict[str, str], cwd: Path, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _manifest(
    path: Path,
    prompts: list[Any],
    *,
    limits: dict[str, Any] | None = None,
    download: dict[str, Any] | None = None,
) -> Path:
    """A one-sweep runcomfy manifest; PyYAML escapes every prompt as YAML needs."""
    manifest: dict[str, Any] = {
        "name": path.stem,
        "provider": "runcomfy",
        "output": "out",
        "state": f"state/{path.stem}.db",
        "limits": limits or {},
        "download": download or {},
        "sweeps": [
            {
                "model": MODEL,
                "params": {"resolution": "1K", "aspect_ratio": "1:1", "output_format": "png"},
                "prompts": prompts,
            }
        ],
    }
    path.write_text(
        yaml.safe_dump(manifest, allow_unicode=True, sort_keys=False, width=1 << 20),
        encoding="utf-8",
    )
    return path


def _no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr, result.stderr[-4000:]


# --------------------------------------------------------------------------- hostile prompts

ESCAPE_MARK = f"batchgen-escape-{uuid.uuid4().hex[:8]}"
HOSTILE_PROMPTS = [
    f"../../../../../../../../../../tmp/{ESCAPE_MARK}",
    "..",
    ".",
    "/etc/passwd",
    "a/b/c/../../d",
    "C:\\Windows\\System32\\drivers",
    "x" * 10_240,
    "🦊🔥🌊",
    "👩\u200d💻 coder at night",
    "שלום עולם",
    "مرحبا بالعالم",
    "\u202egnp.exe",
    "CON",
    "nul.txt",
    "COM1",
    "LPT9",
    "aux",
    "PRN.png",
    "trailing dot.",
    "trailing space ",
    "tab\there\nnewline\rreturn\x1b[31mansi\x7f",
    "before\x00after NUL",
    "é" * 200,
    "🦊" * 100,
    "Hello World",
    "hello world",
    "HELLO-WORLD",
    "hello_world",
    "%2e%2e%2f%2e%2e%2fetc",
    '*?<>|:"',
]
#: lines of a prompt file (template: false): raw control bytes that YAML could not even carry
FILE_PROMPTS = [
    "nul\x00in a file",
    "del\x7fin a file",
    "esc\x1b[0m in a file",
    "../../../from a file",
    "bell\x07 and backspace\x08 in a file",
]


def test_hostile_prompts_stay_inside_with_portable_names(tmp_path: Path) -> None:
    (tmp_path / "hostile.txt").write_text("\n".join(FILE_PROMPTS) + "\n", encoding="utf-8")
    manifest = _manifest(
        tmp_path / "hostile.yaml",
        [*HOSTILE_PROMPTS, {"file": "hostile.txt", "template": False}],
    )
    with Simulator(SimulatorConfig(latency=(0.0, 0.05), image_mode="small", workers=16)) as sim:
        env = provider_env(sim.base_url, sim.token)
        result = _run(batchgen_command("run", manifest, "--yes"), env, tmp_path)
    _no_traceback(result)
    assert result.returncode == 0, result.stderr[-4000:]

    root = (tmp_path / "out").resolve()
    with Store(tmp_path / "state" / "hostile.db", readonly=True) as store:
        jobs = store.jobs()
        outputs = store.outputs()
    expected = [*HOSTILE_PROMPTS, *FILE_PROMPTS]
    # Prompts reach the API as written (a reader may trim the ends of a line, nothing else).
    assert len(jobs) == len(expected)
    assert sorted(j.prompt.strip() for j in jobs) == sorted(p.strip() for p in expected)
    assert {j.state for j in jobs} == {JobState.DONE}, {j.prompt[:40]: j.state for j in jobs}
    assert len(outputs) == len(expected)

    seen: dict[str, str] = {}
    problems = []
    for out in outputs:
        rel = Path(out.path)
        assert not rel.is_absolute(), out.path
        full = (root / rel).resolve()
        assert full.is_relative_to(root), f"{out.path!r} escapes the output folder"
        assert full.is_file(), out.path
        for part in rel.parts:
            problems += [f"{out.path!r}: {part!r}: {p}" for p in portable_name_problems(part)]
        # Case-insensitive filesystems (macOS, Windows) and Unicode-normalising ones (macOS)
        # must not merge two jobs' files either.
        key = unicodedata.normalize("NFC", str(rel)).casefold()
        assert key not in seen, f"jobs {seen.get(key)} and {out.job_id} share {out.path!r}"
        seen[key] = out.job_id
        sidecar = full.with_name(full.name + ".json")
        if not sidecar.exists():
            sidecar = full.with_suffix(".json")
        assert sidecar.is_file(), f"no sidecar beside {out.path}"
        job = next(j for j in jobs if j.id == out.job_id)
        assert json.loads(sidecar.read_text(encoding="utf-8"))["prompt"] == job.prompt
    assert not problems, "\n".join(problems)

    # Nothing was written outside the work folder by the traversal prompt, nor left temporary.
    assert not list(Path("/tmp").glob(f"{ESCAPE_MARK}*"))
    assert not [p for p in walk_files(tmp_path) if ESCAPE_MARK in p.name]
    leftovers = [p for p in walk_files(tmp_path) if p.name.endswith((".part", ".tmp"))]
    assert not leftovers


def test_a_raw_control_character_in_the_manifest_is_a_located_error(tmp_path: Path) -> None:
    """A prompt pasted with a raw DEL/ESC byte: exit 2 naming file and line, never a traceback."""
    path = tmp_path / "raw.yaml"
    path.write_bytes(
        b"name: raw\nsweeps:\n  - model: " + MODEL.encode() + b'\n    prompts: ["a\x7fb"]\n'
    )
    result = _run(batchgen_command("validate", path), dict(os.environ), tmp_path)
    _no_traceback(result)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "raw.yaml:4" in result.stderr, result.stderr


# --------------------------------------------------------------------------- hostile answers

CAP = 300_000  # download.max_bytes for the hostile run
TIMEOUT = 2.0  # download.timeout


def _png(side: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (200, 40, 40)).save(buffer, "PNG")
    return buffer.getvalue()


PNG = _png()


@functools.cache
def _gzip_bomb() -> bytes:
    """50 MB of zeros in about 50 kB of gzip."""
    return gzip.compress(b"\0" * 50_000_000, compresslevel=9)


@dataclass
class Hostile:
    """A RunComfy-speaking server whose results point wherever the case says."""

    base_url: str = ""
    requests: dict[str, str] = field(default_factory=dict)  # request id → case
    #: per stream case: bytes yielded before the client went away, and how long it stayed
    streamed: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    stolen: list[str] = field(default_factory=list)  # paths hit on the /steal trap
    auth_on_files: list[str] = field(default_factory=list)
    file_hits: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def outputs(self, case: str) -> Any:
        f = f"{self.base_url}/files"
        return {
            "ok": {"image": f"{f}/ok.png"},
            "url-traversal": {"image": f"{f}/..%2f..%2f..%2fescape.png"},
            "file-scheme": {"image": "file:///etc/passwd"},
            "ftp-scheme": {"image": "ftp://127.0.0.1/x.png"},
            "data-uri": {"image": "data:image/png;base64,iVBORw0KGgo="},
            "javascript": {"image": "javascript:alert(1)"},
            "relative": {"image": "/files/ok.png"},
            "empty-uri": {"image": ""},
            "not-a-string": {"image": 42},
            "no-output": {},
            "redirect-loop": {"image": f"{f}/loop"},
            "redirect-to-file": {"image": f"{f}/to-file"},
            "endless": {"image": f"{f}/endless"},
            "huge-length": {"image": f"{f}/huge"},
            "drip": {"image": f"{f}/drip"},
            "gzip-bomb": {"image": f"{f}/bomb"},
            "html": {"image": f"{f}/page.html"},
            "gone": {"image": f"{f}/gone"},
        }.get(case, {})


#: the reason a failed job's message must give, per case (any one of the words, case-insensitive)
REASONS: dict[str, tuple[str, ...]] = {
    "file-scheme": ("scheme", "http", "refus", "unsupported"),
    "ftp-scheme": ("scheme", "http", "refus", "unsupported"),
    "data-uri": ("scheme", "http", "refus", "unsupported"),
    "javascript": ("scheme", "http", "refus", "unsupported"),
    "relative": ("scheme", "http", "refus", "unsupported", "relative", "absolute"),
    "empty-uri": ("scheme", "http", "refus", "empty", "output", "uri", "url"),
    "not-a-string": ("output", "uri", "url"),
    "no-output": ("output",),
    "redirect-loop": ("redirect",),
    "redirect-to-file": ("redirect", "scheme", "http", "unsupported"),
    "endless": ("max_bytes", "size", "cap", "too large", "bytes"),
    "huge-length": ("max_bytes", "size", "cap", "too large", "bytes"),
    "gzip-bomb": ("max_bytes", "size", "cap", "too large", "bytes"),
    "drip": ("timeout", "timed out", "took longer", "slow"),
    "html": ("content type", "content-type", "not an image", "text/html"),
    "gone": ("expired", "404", "gone", "not found"),
}
DONE_CASES = ("ok", "url-traversal")
EVIL_ID = "evil-id"


def _hostile_app(state: Hostile) -> Starlette:
    async def submit(request: Request) -> Response:
        body = await request.json()
        case = str(body.get("prompt", ""))
        with state.lock:
            rid = f"req{len(state.requests):04d}"
            state.requests[rid] = case
        if case == EVIL_ID:
            rid = "../../steal/x"
        trap = f"{state.base_url}/steal/{rid}"
        # Follow-up URLs on another path: a provider must build them from the id, never use these.
        return JSONResponse(
            {
                "request_id": rid,
                "status_url": f"{trap}/status",
                "result_url": f"{trap}/result",
                "cancel_url": f"{trap}/cancel",
            }
        )

    def _case(request: Request) -> str | None:
        return state.requests.get(request.path_params["rid"])

    async def status(request: Request) -> Response:
        rid = request.path_params["rid"]
        if _case(request) is None:
            return JSONResponse({"error_code": 404001, "error_message": "not found"}, 404)
        return JSONResponse({"request_id": rid, "status": "completed"})

    async def result(request: Request) -> Response:
        rid = request.path_params["rid"]
        case = _case(request)
        if case is None:
            return JSONResponse({"error_code": 404001, "error_message": "not found"}, 404)
        return JSONResponse(
            {
                "request_id": rid,
                "status": "succeeded",
                "output": state.outputs(case),
                "created_at": "2026-11-22T00:00:00Z",
                "finished_at": "2026-11-22T00:00:01Z",
            }
        )

    async def cancel(request: Request) -> Response:
        return JSONResponse(
            {
                "request_id": request.path_params["rid"],
                "status": "completed",
                "outcome": "not_cancellable",
            },
            202,
        )

    async def steal(request: Request) -> Response:
        state.stolen.append(request.url.path)
        return JSONResponse({"error_code": 404001, "error_message": "trap"}, 404)

    def _stream(case: str, chunk: bytes, pause: float) -> AsyncIterator[bytes]:
        async def body() -> AsyncIterator[bytes]:
            sent, started = 0, time.monotonic()
            try:
                while True:  # never ends: only the client can stop it
                    yield chunk
                    sent += len(chunk)
                    await asyncio.sleep(pause)
            finally:
                with state.lock:
                    state.streamed.setdefault(case, []).append((sent, time.monotonic() - started))

        return body()

    async def files(request: Request) -> Response:
        if "authorization" in request.headers:
            state.auth_on_files.append(request.url.path)
        name = request.path_params["name"]
        state.file_hits[name] += 1
        if name in ("ok.png", "..%2f..%2f..%2fescape.png", "../../../escape.png"):
            return Response(PNG, media_type="image/png")
        if name == "loop":
            return RedirectResponse(f"{state.base_url}/files/loop", 302)
        if name == "to-file":
            return RedirectResponse("file:///etc/passwd", 302)
        if name == "endless":
            return StreamingResponse(
                _stream("endless", PNG + b"\0" * 65_536, 0), media_type="image/png"
            )
        if name == "drip":
            return StreamingResponse(_stream("drip", b"\x89", 0.2), media_type="image/png")
        if name == "huge":
            return StreamingResponse(
                _stream("huge-length", b"\0" * 65_536, 0),
                media_type="image/png",
                headers={"content-length": str(10**11)},
            )
        if name == "bomb":
            return Response(
                _gzip_bomb(),
                media_type="image/png",
                headers={"content-encoding": "gzip"},
            )
        if name == "page.html":
            return Response("<html><body>not an image</body></html>", media_type="text/html")
        return JSONResponse({"error": "gone"}, 404)

    return Starlette(
        routes=[
            Route("/v1/models/{model:path}", submit, methods=["POST"]),
            Route("/v1/requests/{rid}/status", status),
            Route("/v1/requests/{rid}/result", result),
            Route("/v1/requests/{rid}/cancel", cancel, methods=["POST"]),
            Route("/steal/{rest:path}", steal, methods=["GET", "POST"]),
            Route("/files/{name:path}", files),
        ]
    )


@dataclass
class HostileRun:
    """One ``batchgen run`` against the hostile server, and what it left."""

    server: Hostile
    workdir: Path
    exit_code: int
    stderr: str
    seconds: float
    jobs: dict[str, Any]  # by prompt (= case name)
    outputs: list[Any]

    def summary(self, case: str) -> tuple[str, str | None, str | None]:
        job = self.jobs[case]
        return job.state.value, job.error_class, job.last_error


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileRun]:
    """Every hostile case in one run of the real runner (max_attempts 2, a small cap)."""
    workdir = tmp_path_factory.mktemp("hostile-answers")
    server = Hostile()
    manifest = _manifest(
        workdir / "hostile.yaml",
        [*DONE_CASES, *REASONS, EVIL_ID],
        limits={"max_attempts": 2, "max_in_flight": 8, "job_timeout": 60},
        download={"max_bytes": CAP, "timeout": TIMEOUT, "concurrency": 8},
    )
    with serve_in_thread(_hostile_app(server)) as base_url:
        server.base_url = base_url
        env = provider_env(base_url, "hostile-token-0123456789")
        started = time.monotonic()
        result = _run(batchgen_command("run", manifest, "--yes"), env, workdir)
        seconds = time.monotonic() - started
    with Store(workdir / "state" / "hostile.db", readonly=True) as store:
        jobs = {j.prompt: j for j in store.jobs()}
        outputs = store.outputs()
    yield HostileRun(server, workdir, result.returncode, result.stderr, seconds, jobs, outputs)


def test_hostile_answers_end_the_run_cleanly(hostile_run: HostileRun) -> None:
    assert "Traceback" not in hostile_run.stderr, hostile_run.stderr[-4000:]
    assert hostile_run.exit_code == 1, (hostile_run.exit_code, hostile_run.stderr[-4000:])
    for case in DONE_CASES:
        assert hostile_run.jobs[case].state is JobState.DONE, hostile_run.summary(case)


def test_each_hostile_output_fails_its_job_with_a_clear_reason(hostile_run: HostileRun) -> None:
    wrong = {}
    for case, words in REASONS.items():
        state, error_class, message = hostile_run.summary(case)
        reason = f"{error_class} {message}".lower()
        if state != "failed" or not any(w in reason for w in words):
            wrong[case] = (state, error_class, message)
    assert not wrong, "jobs that did not fail with a clear reason:\n" + "\n".join(
        f"  {c}: {s}" for c, s in wrong.items()
    )


def test_the_server_cannot_redirect_the_provider(hostile_run: HostileRun) -> None:
    """A hostile request id is never used, the answer's *_url fields are never followed."""
    assert hostile_run.jobs[EVIL_ID].state is not JobState.DONE, hostile_run.summary(EVIL_ID)
    assert hostile_run.server.stolen == [], hostile_run.server.stolen
    assert hostile_run.server.auth_on_files == [], "the API token went to a download host"


def test_downloads_stop_at_the_size_cap_and_the_timeout(hostile_run: HostileRun) -> None:
    """The endless streams never end by themselves: only the client's cap or clock stops them."""
    streamed = hostile_run.server.streamed
    assert streamed.get("endless") and streamed.get("drip"), streamed
    for case in ("endless", "huge-length"):
        for sent, _ in streamed.get(case, []):
            # what the server pushed into socket buffers, not what was kept: a bound, not a cap
            assert sent <= CAP + 8 * 1024 * 1024, f"{case}: {sent} bytes pulled past a {CAP} cap"
    for _, lasted in streamed["drip"]:
        assert lasted <= TIMEOUT + 3, f"drip stayed open {lasted:.1f} s past a {TIMEOUT} s timeout"
    assert hostile_run.seconds < 60, f"the run took {hostile_run.seconds:.0f} s"


def test_nothing_is_left_behind(hostile_run: HostileRun) -> None:
    """Only the done jobs' images (and sidecars) under the output folder; no temporary file."""
    root = (hostile_run.workdir / "out").resolve()
    done = {j.id for j in hostile_run.jobs.values() if j.state is JobState.DONE}
    recorded = {(root / o.path).resolve() for o in hostile_run.outputs if o.job_id in done}
    assert len(recorded) == len(DONE_CASES)
    for path in walk_files(hostile_run.workdir):
        assert not path.name.endswith((".part", ".tmp")), f"temporary file left: {path}"
        if path.suffix in (".png", ".jpeg", ".jpg", ".webp", ".html", ".bin", ".gz"):
            assert path.resolve() in recorded, f"a file no done job recorded: {path}"
    for path in recorded:
        assert path.is_relative_to(root)
        with Image.open(path) as image:
            image.verify()


def test_refusals_that_cannot_change_are_not_retried(hostile_run: HostileRun) -> None:
    """A body over the cap or an HTML page is the same on the next try: one request each."""
    hits = hostile_run.server.file_hits
    repeated = {
        name: hits[name] for name in ("endless", "huge", "bomb", "page.html") if hits[name] > 1
    }
    assert not repeated, f"downloads retried although the answer cannot change: {repeated}"


def test_portable_name_rules_catch_bad_names() -> None:
    """The checker above is only worth something if it rejects what it claims to."""
    for bad in (
        "..",
        "CON",
        "nul.txt",
        "a\x00b",
        "x" * 256,
        "a:b",
        "dot.",
        "\u202egnp.exe",
        "🦊" * 64,
    ):
        assert portable_name_problems(bad), bad
    for good in ("hello-world__0.png", "lighthouse-at-dusk", "a" * 255, "console.png"):
        assert not portable_name_problems(good), good
