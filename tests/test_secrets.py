"""R3: the API token never lands anywhere batchgen writes or prints, nor on a download host.

A run with a recognisable token (``sk-BATCHGEN-CANARY-<random>``) goes through everything that
could leak it: an auth failure (a second canary token the server refuses), provider errors (5xx,
429, dropped connections, lost submit answers, failed jobs, truncated downloads, expired URLs),
``-vv`` debug logging, ``status``/``plan`` ``--json``, ``retry`` and a resumed run. Then every byte
under the work folder (state DB and its ``-wal``/``-shm``/lock files, outputs, sidecars,
``metadata.jsonl``/``stats.json``/``failures.jsonl``, logs) and every captured stdout/stderr is
searched for either token, raw or base64-encoded; and the simulator's metrics must show that no
file request ever carried an ``Authorization`` header.
"""

from __future__ import annotations

import io
import logging
import secrets
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from batchgen.simulator import Simulator, SimulatorConfig
from batchgen.store import JobState, Store
from bench.crash import (
    batchgen_command,
    file_requests_with_authorization,
    provider_env,
    secret_variants,
    serve_in_thread,
    walk_files,
)

pytestmark = pytest.mark.timeout(120)

MODEL = "google/nano-banana/pro/text-to-image"
FAULTS = {
    "http_429": 0.02,
    "http_429_retry_after": 0.02,
    "retry_after": 0.2,
    "http_5xx": 0.05,
    "drop_connection": 0.03,
    "lost_submit": 0.05,
    "job_failure": 0.1,
    "truncated_download": 0.1,
    "url_ttl": 1.0,
}


def _manifest(workdir: Path, jobs: int) -> Path:
    (workdir / "prompts.txt").write_text(
        "".join(f"secret test {i}: a quiet harbour at dawn\n" for i in range(jobs)),
        encoding="utf-8",
    )
    manifest = workdir / "secrets.yaml"
    manifest.write_text(
        f"""\
name: secrets
provider: runcomfy
output: out
state: state/secrets.db
limits: {{max_in_flight: 8, max_attempts: 4, on_ambiguous_submit: park}}
download: {{timeout: 10}}
sweeps:
  - model: {MODEL}
    params: {{resolution: 1K, aspect_ratio: "1:1", output_format: png}}
    prompts:
      - file: prompts.txt
        template: false
""",
        encoding="utf-8",
    )
    return manifest


def _leaks(blob: bytes, tokens: list[str]) -> list[str]:
    """Which of the tokens' variants (raw or base64) occur in ``blob``."""
    return [
        f"{token[:22]}… as {variant[:12]!r}"
        for token in tokens
        for variant in secret_variants(token)
        if variant in blob
    ]


Batchgen = Callable[..., subprocess.CompletedProcess[bytes]]


def _recorder(workdir: Path, printed: list[tuple[str, bytes]]) -> Batchgen:
    """A ``batchgen -vv ...`` runner that keeps every byte printed, for the grep."""

    def batchgen(
        *args: str | Path, env: dict[str, str], ok: tuple[int, ...]
    ) -> subprocess.CompletedProcess[bytes]:
        argv = batchgen_command("-vv", *args)
        result = subprocess.run(argv, env=env, cwd=workdir, capture_output=True, timeout=90)
        label = " ".join(str(a) for a in args if not isinstance(a, Path))
        printed.append((f"`{label}` stdout", result.stdout))
        printed.append((f"`{label}` stderr", result.stderr))
        assert result.returncode in ok, (label, result.returncode, result.stderr[-3000:])
        assert b"Traceback" not in result.stderr, result.stderr[-3000:]
        return result

    return batchgen


def _grep_everything(
    workdir: Path, printed: list[tuple[str, bytes]], tokens: list[str]
) -> list[str]:
    """Every place under ``workdir`` (except the inputs) or in ``printed`` holding a token."""
    leaks = []
    for path in walk_files(workdir):
        if path.suffix in (".yaml", ".txt") and path.parent == workdir:
            continue  # the manifest and prompts we wrote ourselves
        found = _leaks(path.read_bytes(), tokens)
        leaks += [f"{path.relative_to(workdir)}: {f}" for f in found]
    for label, blob in printed:
        leaks += [f"{label}: {f}" for f in _leaks(blob, tokens)]
    return leaks


def test_token_never_written_printed_or_sent_to_a_download_host(tmp_path: Path) -> None:
    token = f"sk-BATCHGEN-CANARY-{secrets.token_hex(12)}"
    wrong = f"sk-BATCHGEN-CANARY-{secrets.token_hex(12)}"
    tokens = [token, wrong]
    manifest = _manifest(tmp_path, jobs=30)
    printed: list[tuple[str, bytes]] = []
    batchgen = _recorder(tmp_path, printed)

    with Simulator(
        SimulatorConfig(token=token, faults=FAULTS, latency=(0.0, 0.1), image_mode="small", seed=7)
    ) as sim:
        env = provider_env(sim.base_url, token)
        bad_env = provider_env(sim.base_url, wrong)
        batchgen("validate", manifest, env=env, ok=(0,))
        batchgen("plan", manifest, "--json", env=env, ok=(0,))
        # An auth failure first: the run stops (exit 3) and says why, without the token.
        refused = batchgen("run", manifest, "--yes", env=bad_env, ok=(3,))
        assert b"RUNCOMFY_API_TOKEN" in refused.stderr or b"token" in refused.stderr.lower()
        # The real run, the parked and failed jobs again, and every read command: faults on.
        batchgen("run", manifest, "--yes", env=env, ok=(0, 1))
        batchgen("status", manifest, env=env, ok=(0, 1))
        batchgen("status", manifest, "--json", env=env, ok=(0, 1))
        batchgen("retry", manifest, "--unknown", env=env, ok=(0,))
        batchgen("retry", manifest, "--failed", env=env, ok=(0,))
        batchgen("run", manifest, "--yes", env=env, ok=(0, 1))
        batchgen("status", manifest, "--json", env=env, ok=(0, 1))
        batchgen("plan", manifest, "--json", env=env, ok=(0,))
        metrics = sim.metrics()
    assert sum(metrics["faults"].values()) >= 5, metrics["faults"]
    # -vv really logged at debug level: the grep below reads the most talkative output there is
    assert any(b"DEBUG" in blob for _, blob in printed), "no debug log to search"

    # The run went through the faults it was meant to survive, and wrote files.
    files = list(walk_files(tmp_path))
    assert any(p.name.endswith(".db-wal") or p.name.endswith(".db") for p in files)
    assert any(p.suffix == ".png" for p in files), "the run produced no image: nothing was tested"
    assert any(p.name.endswith(".png.json") or p.suffix == ".json" for p in files)

    leaks = _grep_everything(tmp_path, printed, tokens)
    assert not leaks, "the token leaked:\n" + "\n".join(leaks)

    assert metrics["files"]["requests"] > 0
    assert file_requests_with_authorization(metrics) == 0, metrics["files"]


async def test_provider_errors_and_reprs_never_show_the_token(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """In-process: every error the provider raises, its cause chain, and its debug logs."""
    from batchgen.errors import BatchgenError
    from batchgen.providers.runcomfy import RunComfyProvider

    token = f"sk-BATCHGEN-CANARY-{secrets.token_hex(12)}"
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    with Simulator(SimulatorConfig(token=token, faults={"http_5xx": 0.5}, latency=0.0)) as sim:
        for use in (token, "sk-BATCHGEN-CANARY-wrong-token-000000"):
            provider = RunComfyProvider(base_url=sim.base_url, token=use)
            seen += [repr(provider), str(provider)]
            try:
                for call in (
                    provider.submit(MODEL, {"prompt": "x", "resolution": "9K"}),
                    provider.submit(MODEL, {"prompt": "x"}),
                    provider.status("no-such-request"),
                    provider.result("no-such-request"),
                    provider.cancel("no-such-request"),
                ):
                    try:
                        await call
                    except BatchgenError as exc:
                        chain: BaseException | None = exc
                        while chain is not None:
                            seen += [str(chain), repr(chain), repr(chain.args)]
                            seen += [repr(v) for v in vars(chain).values()]
                            chain = chain.__cause__ or chain.__context__
            finally:
                await provider.aclose()
    seen += [record.getMessage() for record in caplog.records]
    assert len(seen) > 10
    blob = "\n".join(seen).encode()
    assert not _leaks(blob, [token]), [s for s in seen if token in s][:5]


def _echo_app(state: dict[str, Any]) -> Starlette:
    """A RunComfy-like server that repeats the Authorization header back in every error."""

    async def submit(request: Request) -> Response:
        auth = request.headers.get("authorization", "")
        case = (await request.json())["prompt"]
        if case == "echo-401":
            return JSONResponse(
                {"error_code": 401001, "error_message": f"token {auth} is not valid"}, 401
            )
        if case == "echo-422":
            detail = [{"loc": ["body", "prompt"], "msg": f"rejected for {auth}", "type": "x"}]
            return JSONResponse({"error_code": 422001, "detail": detail}, 422)
        rid = f"r{len(state['requests'])}"
        state["requests"][rid] = case
        return JSONResponse({"request_id": rid})

    async def result(request: Request) -> Response:
        auth = request.headers.get("authorization", "")
        rid = request.path_params["rid"]
        case = state["requests"].get(rid)
        state["polls"][rid] = state["polls"].get(rid, 0) + 1
        if case == "echo-500" and state["polls"][rid] == 1:
            return JSONResponse({"error_code": 500001, "error_message": f"trace: {auth}"}, 500)
        if case == "echo-failed":
            error = {"message": f"worker crashed holding {auth}", "header": auth}
            return JSONResponse({"request_id": rid, "status": "failed", "error": error})
        return JSONResponse(
            {
                "request_id": rid,
                "status": "succeeded",
                "output": {"image": f"{state['base_url']}/files/{rid}.png"},
            }
        )

    async def status(request: Request) -> Response:
        return JSONResponse({"request_id": request.path_params["rid"], "status": "completed"})

    async def files(request: Request) -> Response:
        if "authorization" in request.headers:
            state["auth_on_files"] += 1
        return Response(PNG, media_type="image/png")

    return Starlette(
        routes=[
            Route("/v1/models/{model:path}", submit, methods=["POST"]),
            Route("/v1/requests/{rid}/result", result),
            Route("/v1/requests/{rid}/status", status),
            Route("/files/{name:path}", files),
        ]
    )


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 120, 200)).save(buffer, "PNG")
    return buffer.getvalue()


PNG = _png()


def _echo_manifest(workdir: Path, name: str, cases: list[str]) -> Path:
    """A manifest whose prompts name the echo server's cases."""
    path = workdir / f"{name}.yaml"
    prompts = ", ".join(f'"{case}"' for case in cases)
    path.write_text(
        f"""\
name: {name}
provider: runcomfy
output: out/{name}
state: state/{name}.db
limits: {{max_attempts: 3}}
sweeps:
  - model: {MODEL}
    params: {{resolution: 1K, aspect_ratio: "1:1", output_format: png}}
    prompts: [{prompts}]
""",
        encoding="utf-8",
    )
    return path


def test_a_server_echoing_the_token_cannot_make_batchgen_store_or_print_it(
    tmp_path: Path,
) -> None:
    """Error bodies (401, 422, 500) and a failed result that repeat the token: all redacted."""
    token = f"sk-BATCHGEN-CANARY-{secrets.token_hex(12)}"
    state: dict[str, Any] = {"requests": {}, "polls": {}, "auth_on_files": 0}
    manifest = _echo_manifest(tmp_path, "echo", ["echo-422", "echo-failed", "echo-500", "ok"])
    refused = _echo_manifest(tmp_path, "refused", ["echo-401"])
    printed: list[tuple[str, bytes]] = []
    batchgen = _recorder(tmp_path, printed)
    with serve_in_thread(_echo_app(state)) as base_url:
        state["base_url"] = base_url
        env = provider_env(base_url, token)
        batchgen("run", manifest, "--yes", env=env, ok=(1,))
        batchgen("status", manifest, "--json", env=env, ok=(0, 1))
        # then a run whose first submit answers 401 with the token in the message
        batchgen("run", refused, "--yes", env=env, ok=(3,))
        batchgen("status", refused, "--json", env=env, ok=(0, 1))

    leaks = _grep_everything(tmp_path, printed, [token])
    assert not leaks, "a token echoed by the server was kept:\n" + "\n".join(leaks)
    assert state["auth_on_files"] == 0
    # the failures were recorded with their (redacted) reasons, not dropped
    with Store(tmp_path / "state" / "echo.db", readonly=True) as store:
        failed = {j.prompt: j for j in store.jobs([JobState.FAILED])}
    assert {"echo-422", "echo-failed"} <= set(failed), failed
    assert all(j.last_error for j in failed.values())
