"""The simulator's HTTP app: the RunComfy Model API, its files, and ``/_simulator/*``.

Routes (shapes from ``shared/spec/runcomfy-model-api.md``)::

    POST /v1/models/{model_id}       submit  200 {request_id, status_url, result_url, cancel_url}
    GET  /v1/requests/{id}/status    status  200 {request_id, status, [queue_position], urls}
    GET  /v1/requests/{id}/result    result  200 {request_id, status, [output|error], times, [cost]}
    POST /v1/requests/{id}/cancel    cancel  202 {request_id, status, outcome}
    GET  /_files/{id}/{index}.{ext}  a result file (no token needed, like a public CDN link)
    GET  /_simulator/metrics         counters (``?timeline=true`` adds one row per request)
    POST /_simulator/reset           zero the counters
    GET  /_simulator/requests/{id}   one request's record
    GET  /_simulator/health          {"ok": true}

Errors are ``{"error_code": N, "error_message": "..."}`` with the HTTP status the code's first
three digits give: 400001 unknown model, 404001 unknown request, 400004 missing or wrong token
(the Model API's UserAccountError, spec §2), 422001 a body the model's schema refuses (plus a
``detail`` array naming each field), 429001 rate limited, 500001 simulated server error.

Order of checks on an API call: token, rate limit, per-call fault, then the endpoint itself.
Everything runs on the event loop thread except image rendering (a worker thread).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import secrets
import time
import uuid
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.validators import validator_for
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..registry import ModelRegistry, ModelSpec
from .config import SimulatorConfig
from .faults import FaultInjector, retry_after_header
from .gpu import GpuPool, RequestState, SimRequest
from .images import FORMATS, ImageKey, ImageMaker, canonical_json, image_size, output_format
from .images import small_size as scale_to_small
from .metrics import Metrics

#: where the simulator serves result files: a prefix the real API never uses
FILES_PREFIX = "/_files"
#: where the simulator's own endpoints live
CONTROL_PREFIX = "/_simulator"

_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(?:/[A-Za-z0-9][A-Za-z0-9._-]*)*$")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_FILE_NAME = re.compile(r"^(\d+)\.([a-z]+)$")
_CYCLE = "batchgen.simulator.cycle"
_DROPPED = "batchgen.simulator.dropped"
#: simulated prices per image for models whose public price is known (spec/models/README.md)
_NANO_BANANA_PRO = "google/nano-banana/pro/text-to-image"
#: images up to this many pixels render on the event loop itself (see ``file``)
_INLINE_RENDER_PIXELS = 256 * 256


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
    return Response(body, status_code=status, headers=headers, media_type="application/json")


def api_error(
    code: int,
    message: str,
    *,
    headers: dict[str, str] | None = None,
    detail: list[dict[str, Any]] | None = None,
) -> Response:
    """The API's error body; the HTTP status is the code's first three digits."""
    body: dict[str, Any] = {"error_code": code, "error_message": message}
    if detail is not None:
        body["detail"] = detail
    return _json(body, int(str(code)[:3]), headers)


def _close_connection(scope: Scope) -> None:
    """Close the client's TCP connection now, so that it sees a dropped connection, not a 500.

    uvicorn's ``receive`` is a bound method of its request-response cycle, which holds the
    transport; marking the cycle disconnected stops uvicorn from answering in our place.
    """
    cycle: Any = scope.get(_CYCLE)
    transport = getattr(cycle, "transport", None)
    if cycle is None or transport is None:
        raise RuntimeError("the simulator can only drop connections when served by uvicorn")
    cycle.disconnected = True
    transport.close()
    scope[_DROPPED] = True


class _DroppedConnection(Response):
    """A 'response' that closes the connection without a byte."""

    def __init__(self) -> None:
        super().__init__(status_code=599)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        _close_connection(scope)


class _TruncatedBody(Response):
    """Headers announcing the whole body, half the body, then the connection closes."""

    def __init__(self, content: bytes, media_type: str) -> None:
        super().__init__(content, media_type=media_type)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        await send(
            {
                "type": "http.response.body",
                "body": self.body[: len(self.body) // 2],
                "more_body": True,
            }
        )
        _close_connection(scope)


class SimulatorState:
    """Requests, the GPU pool, faults, images and metrics of one running simulator."""

    def __init__(self, config: SimulatorConfig, registry: ModelRegistry | None = None) -> None:
        self.config = config
        self.registry = registry if registry is not None else ModelRegistry.default()
        self.faults = FaultInjector(config.fault_settings, config.seed)
        self.metrics = Metrics()
        self.images = ImageMaker(config.image_cache_bytes)
        self.requests: dict[str, SimRequest] = {}
        self.pool = GpuPool(config.workers, on_finish=self._finished)
        self.counts = {state.value: 0 for state in RequestState if state.terminal}
        self._ids = random.Random(f"{config.seed}:ids")
        self._latency = random.Random(f"{config.seed}:latency")
        self._validators: dict[str, Draft202012Validator] = {}
        self._token = config.api_token.encode()

    # helpers -------------------------------------------------------------------------------

    def _finished(self, request: SimRequest) -> None:
        self.counts[request.state.value] += 1
        self.metrics.finished()

    def _validator(self, spec: ModelSpec) -> Draft202012Validator:
        validator = self._validators.get(spec.model_id)
        if validator is None:
            cls = validator_for(spec.input_schema, default=Draft202012Validator)
            validator = cls(spec.input_schema)
            self._validators[spec.model_id] = validator
        return validator

    def _new_request_id(self) -> str:
        while True:
            request_id = str(uuid.UUID(int=self._ids.getrandbits(128), version=4))
            if request_id not in self.requests:
                return request_id

    def _run_seconds(self) -> float:
        low, high = self.config.latency_range
        return low if low == high else self._latency.uniform(low, high)

    def _price(self, model_id: str, params: dict[str, Any]) -> float:
        if model_id == _NANO_BANANA_PRO:
            return 0.30 if params.get("resolution") == "4K" else 0.15
        return self.config.price_per_image

    def status_word(self, request: SimRequest) -> str:
        """What ``/status`` says for ``request`` (a failed job says ``failed_status``)."""
        if request.state is RequestState.SUCCEEDED:
            return "completed"
        if request.state is RequestState.FAILED:
            return self.config.failed_status
        return str(request.state.value)

    def _seen(self, request: SimRequest, *, via_result: bool) -> None:
        """A status/result call saw ``request`` finished: record when it was first noticed."""
        if request.state not in (RequestState.SUCCEEDED, RequestState.FAILED):
            return
        assert request.finished is not None
        now = time.monotonic()
        first = request.first_terminal_status is None and request.first_terminal_result is None
        if via_result:
            if request.first_terminal_result is None:
                request.first_terminal_result = now
                self.metrics.noticed(now - request.finished, via_result=True, first=first)
        elif request.first_terminal_status is None:
            request.first_terminal_status = now
            if first:
                self.metrics.noticed(now - request.finished, via_result=False, first=True)

    def _gate(self, request: Request) -> tuple[Response | None, bool]:
        """Token, rate limit and per-call faults: an early answer, and whether to answer slowly."""
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            token.strip().encode(), self._token
        ):
            what = "missing" if not header else "invalid"
            return api_error(400004, f"UserAccountError: {what} API token"), False
        wait = self.faults.rate_limited(token.strip())
        if wait is not None:
            self.metrics.fault("rate_limit_rps")
            return api_error(
                429001,
                "Too Many Requests: rate limit exceeded",
                headers={"Retry-After": retry_after_header(wait)},
            ), False
        fault = self.faults.call_fault()
        if fault is None:
            return None, False
        self.metrics.fault(fault)
        if fault == "http_429":
            return api_error(429001, "Too Many Requests: rate limited, retry later"), False
        if fault == "http_429_retry_after":
            seconds = self.config.fault_settings.retry_after
            return api_error(
                429001,
                "Too Many Requests: rate limited, retry later",
                headers={"Retry-After": retry_after_header(seconds)},
            ), False
        if fault == "http_5xx":
            return api_error(500001, "Internal Error: simulated server error"), False
        if fault == "drop_connection":
            return _DroppedConnection(), False
        return None, True  # slow_response

    async def _slowly(self, response: Response, slow: bool) -> Response:
        if slow:
            await asyncio.sleep(self.config.fault_settings.slow_response_delay)
        return response

    def _base_url(self, request: Request) -> str:
        # The address the client used (its Host header), so that URLs work from wherever it is;
        # the socket's own address when the client sent none.
        host = request.headers.get("host")
        if not host:
            server = request.scope.get("server") or ("127.0.0.1", None)
            host = server[0] if server[1] is None else f"{server[0]}:{server[1]}"
        return f"http://{host}"

    def _lookup(self, request: Request) -> SimRequest | Response:
        request_id = request.path_params["request_id"]
        found = self.requests.get(request_id) if _REQUEST_ID.match(request_id) else None
        if found is None:
            return api_error(404001, f"ResourceNotFound: no request with id {request_id!r}")
        return found

    def _gate_and_lookup(self, request: Request) -> tuple[SimRequest, bool] | Response:
        """What every call on a request id does first: the gate, then the id (404001 if unknown)."""
        early, slow = self._gate(request)
        if early is not None:
            return early
        sim = self._lookup(request)
        if isinstance(sim, Response):
            return sim
        return sim, slow

    # API endpoints -------------------------------------------------------------------------

    async def submit(self, request: Request) -> Response:
        """``POST /v1/models/{model_id}``: validate, create a request, queue it."""
        early, slow = self._gate(request)
        if early is not None:
            return early
        model_id = request.path_params["model_id"]
        spec = self.registry.get(model_id) if _MODEL_ID.match(model_id) else None
        if spec is None:
            return api_error(400001, f"InvalidResourceIdentifier: unknown model_id {model_id!r}")
        try:
            raw = await request.body()
        except ClientDisconnect:
            # the client went away in the middle of its body (killed, say): no job is created,
            # and there is nobody left to answer; counted as a dropped call
            request.scope[_DROPPED] = True
            return Response(status_code=499)
        try:
            params = json.loads(raw)
        except ValueError as exc:
            return api_error(
                422001,
                "Validation Error",
                detail=[
                    {"loc": ["body"], "msg": f"the body is not JSON: {exc}", "type": "json_invalid"}
                ],
            )
        if not isinstance(params, dict):
            return api_error(
                422001,
                "Validation Error",
                detail=[{"loc": ["body"], "msg": "the body must be a JSON object", "type": "type"}],
            )
        detail = _schema_errors(self._validator(spec), params)
        if detail:
            return api_error(422001, "Validation Error", detail=detail)

        request_id = self._new_request_id()
        body_json = canonical_json(params)
        body_sha = hashlib.sha256(f"{model_id}\n{body_json}".encode()).hexdigest()
        count = _num_images(params)
        size = image_size(spec, params)
        if self.config.image_mode == "small":
            size = scale_to_small(size, self.config.small_side)
        fmt = output_format(spec, params)
        variant = "" if "seed" in params else request_id
        images = [
            ImageKey(model_id, body_json, i, count, size[0], size[1], fmt, variant)
            for i in range(count)
        ]
        sim = SimRequest(
            request_id=request_id,
            model_id=model_id,
            params=params,
            body_sha256=body_sha,
            run_seconds=self._run_seconds(),
            will_fail=self.faults.job_fails(),
            images=images,
            cost=round(self._price(model_id, params) * count, 6),
        )
        self.requests[request_id] = sim
        self.metrics.submitted(body_sha, request_id)
        self.pool.submit(sim)
        if self.faults.submit_lost():
            self.metrics.fault("lost_submit")
            return _DroppedConnection()
        base = f"{self._base_url(request)}/v1/requests/{request_id}"
        return await self._slowly(
            _json(
                {
                    "request_id": request_id,
                    "status_url": f"{base}/status",
                    "result_url": f"{base}/result",
                    "cancel_url": f"{base}/cancel",
                }
            ),
            slow,
        )

    async def status(self, request: Request) -> Response:
        """``GET /v1/requests/{id}/status``."""
        gated = self._gate_and_lookup(request)
        if isinstance(gated, Response):
            return gated
        sim, slow = gated
        self._seen(sim, via_result=False)
        body: dict[str, Any] = {"request_id": sim.request_id, "status": self.status_word(sim)}
        position = self.pool.queue_position(sim)
        if position is not None:
            body["queue_position"] = position
        base = f"{self._base_url(request)}/v1/requests/{sim.request_id}"
        body["status_url"] = f"{base}/status"
        body["result_url"] = f"{base}/result"
        return await self._slowly(_json(body), slow)

    async def result(self, request: Request) -> Response:
        """``GET /v1/requests/{id}/result[?include_cost=true]``."""
        gated = self._gate_and_lookup(request)
        if isinstance(gated, Response):
            return gated
        sim, slow = gated
        self._seen(sim, via_result=True)
        body: dict[str, Any] = {"request_id": sim.request_id, "status": sim.state.value}
        if sim.state is RequestState.SUCCEEDED:
            urls = self._file_urls(request, sim)
            output: dict[str, Any] = {"image": urls[0]}
            if len(urls) > 1:
                output["images"] = urls
            body["output"] = output
        elif sim.state is RequestState.FAILED:
            body["error"] = {
                "error_code": 500101,
                "error_message": "the model failed to generate an image (simulated job_failure)",
            }
        body["created_at"] = sim.created_at
        if sim.state.terminal:
            body["finished_at"] = sim.finished_at
        include_cost = request.query_params.get("include_cost", "").lower() in ("true", "1")
        if include_cost and sim.state.terminal:
            body["cost"] = sim.cost if sim.state is RequestState.SUCCEEDED else 0.0
        return await self._slowly(_json(body), slow)

    async def cancel(self, request: Request) -> Response:
        """``POST /v1/requests/{id}/cancel``: cancels only a queued request (202 either way)."""
        gated = self._gate_and_lookup(request)
        if isinstance(gated, Response):
            return gated
        sim, slow = gated
        if self.pool.cancel(sim):
            self._finished(sim)
        # Cancelling twice answers as the first time did, so a retried cancel is harmless.
        outcome = "cancelled" if sim.state is RequestState.CANCELLED else "not_cancellable"
        body = {"request_id": sim.request_id, "status": self.status_word(sim), "outcome": outcome}
        return await self._slowly(_json(body, 202), slow)

    def _file_urls(self, request: Request, sim: SimRequest) -> list[str]:
        base = self._base_url(request)
        ttl = self.config.fault_settings.url_ttl
        query = "" if ttl is None else f"?expires={time.time() + ttl:.3f}"
        return [
            f"{base}{FILES_PREFIX}/{sim.request_id}/{key.index}.{FORMATS[key.fmt][1]}{query}"
            for key in sim.images
        ]

    # files ---------------------------------------------------------------------------------

    async def file(self, request: Request) -> Response:
        """``GET /_files/{id}/{index}.{ext}``: a result image, public like a CDN link."""
        request_id = request.path_params["request_id"]
        name = request.path_params["name"]
        sim = self.requests.get(request_id)
        match = _FILE_NAME.match(name)
        key: ImageKey | None = None
        if sim is not None and match and sim.state is RequestState.SUCCEEDED:
            index = int(match.group(1))
            if index < len(sim.images) and FORMATS[sim.images[index].fmt][1] == match.group(2):
                key = sim.images[index]
        if key is None:
            return Response("Not Found\n", status_code=404, media_type="text/plain")
        ttl = self.config.fault_settings.url_ttl
        if ttl is not None:
            try:
                expires = float(request.query_params.get("expires", ""))
            except ValueError:
                expires = 0.0
            if time.time() > expires:
                self.metrics.fault("url_ttl")
                return Response("Request has expired\n", status_code=403, media_type="text/plain")
        data = self.images.cached(key)
        if data is None:
            # A small image renders in about a millisecond: cheaper on the loop than the hop to
            # a worker thread and back. Large ones (up to 4K) would stall every other call.
            if key.width * key.height <= _INLINE_RENDER_PIXELS:
                data = self.images.get(key)
            else:
                data = await run_in_threadpool(self.images.get, key)
        truncated = self.faults.download_truncated()
        if truncated:
            self.metrics.fault("truncated_download")
        self.metrics.file_served(
            request.url.path,
            hashlib.sha256(data).hexdigest(),
            len(data),
            key.content_type,
            authorized="authorization" in request.headers,
            truncated=truncated,
        )
        if truncated:
            return _TruncatedBody(data, key.content_type)
        return Response(data, media_type=key.content_type)

    # control -------------------------------------------------------------------------------

    def snapshot(self, *, timeline: bool = False) -> dict[str, Any]:
        """Metrics as ``GET /_simulator/metrics`` returns them."""
        data = self.metrics.snapshot()
        data["jobs"] = {
            "created": len(self.requests),
            "in_queue": self.pool.queued,
            "in_progress": self.pool.running,
            **self.counts,
        }
        data["images_rendered"] = self.images.renders
        data["config"] = {
            key: value for key, value in self.config.to_dict().items() if key != "token"
        }
        if timeline:
            data["timeline"] = {sim.request_id: self.record(sim) for sim in self.requests.values()}
        return data

    def record(self, sim: SimRequest) -> dict[str, Any]:
        """One request's record: its fate and timeline (seconds since the simulator started)."""
        origin = self.metrics.started

        def rel(value: float | None) -> float | None:
            return None if value is None else round(value - origin, 6)

        return {
            "model_id": sim.model_id,
            "state": sim.state.value,
            "body_sha256": sim.body_sha256,
            "planned_seconds": round(sim.run_seconds, 6),
            "will_fail": sim.will_fail,
            "created": rel(sim.created),
            "started": rel(sim.started),
            "finished": rel(sim.finished),
            "first_terminal_status": rel(sim.first_terminal_status),
            "first_terminal_result": rel(sim.first_terminal_result),
            "images": [{"width": k.width, "height": k.height, "format": k.fmt} for k in sim.images],
        }

    async def metrics_endpoint(self, request: Request) -> Response:
        """``GET /_simulator/metrics[?timeline=true]``."""
        timeline = request.query_params.get("timeline", "").lower() in ("true", "1")
        return _json(self.snapshot(timeline=timeline))

    async def reset_endpoint(self, request: Request) -> Response:
        """``POST /_simulator/reset``."""
        self.metrics.reset()
        return _json({"reset": True})

    async def request_endpoint(self, request: Request) -> Response:
        """``GET /_simulator/requests/{id}``."""
        sim = self._lookup(request)
        if isinstance(sim, Response):
            return sim
        return _json({"request_id": sim.request_id, **self.record(sim)})

    async def health(self, request: Request) -> Response:
        """``GET /_simulator/health``."""
        return _json({"ok": True})


def _num_images(params: dict[str, Any]) -> int:
    value = params.get("num_images", 1)
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 16:
        return value
    return 1


def _schema_errors(validator: Draft202012Validator, params: dict[str, Any]) -> list[dict[str, Any]]:
    """FastAPI-style ``detail`` entries, one per problem, each naming the field."""
    detail: list[dict[str, Any]] = []
    for error in validator.iter_errors(params):
        if error.validator == "required" and not error.path:
            missing = [name for name in error.validator_value if name not in params]
            for name in missing:
                entry = {"loc": ["body", name], "msg": "field required", "type": "missing"}
                if entry not in detail:
                    detail.append(entry)
            continue
        detail.append(
            {
                "loc": ["body", *error.path],
                "msg": error.message,
                "type": str(error.validator),
            }
        )
    # One stable order whatever order the validator found them in.
    detail.sort(key=lambda entry: ([str(part) for part in entry["loc"]], entry["type"]))
    return detail


def _classify(method: str, path: str) -> str | None:
    """The metrics endpoint name of a call, None for the simulator's own endpoints."""
    if path.startswith("/v1/requests/"):
        for name in ("status", "result", "cancel"):
            if path.endswith("/" + name):
                return name
        return "other"
    if path.startswith("/v1/models/") and method == "POST":
        return "submit"
    if path.startswith(FILES_PREFIX + "/"):
        return "file"
    if path.startswith(CONTROL_PREFIX + "/"):
        return None
    return "other"


class _Instrumented:
    """Outermost ASGI layer: counts calls, tracks in-flight, exposes the connection to faults."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = _classify(scope["method"], scope["path"])
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        scope[_CYCLE] = getattr(receive, "__self__", None)
        self.metrics.call_started(endpoint)
        status = "dropped"

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.call_finished(endpoint, "dropped" if scope.get(_DROPPED) else status)


async def _not_found(request: Request, exc: Exception) -> Response:
    if isinstance(exc, HTTPException) and exc.status_code == 405:
        return api_error(405001, f"MethodNotAllowed: {request.method} {request.url.path}")
    return api_error(404001, f"ResourceNotFound: no endpoint {request.url.path}")


def build_app(state: SimulatorState) -> ASGIApp:
    """The ASGI app serving ``state``."""
    routes = [
        Route("/v1/models/{model_id:path}", state.submit, methods=["POST"]),
        Route("/v1/requests/{request_id}/status", state.status, methods=["GET"]),
        Route("/v1/requests/{request_id}/result", state.result, methods=["GET"]),
        Route("/v1/requests/{request_id}/cancel", state.cancel, methods=["POST"]),
        Route(FILES_PREFIX + "/{request_id}/{name}", state.file, methods=["GET"]),
        Route(CONTROL_PREFIX + "/metrics", state.metrics_endpoint, methods=["GET"]),
        Route(CONTROL_PREFIX + "/reset", state.reset_endpoint, methods=["POST"]),
        Route(CONTROL_PREFIX + "/requests/{request_id}", state.request_endpoint, methods=["GET"]),
        Route(CONTROL_PREFIX + "/health", state.health, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={404: _not_found, 405: _not_found})
    return _Instrumented(app, state.metrics)
