"""The provider boundary: request shapes, answer parsing, and the error classification table.

Mocked answers (``httpx.MockTransport``) pin every row of the classification; the last section
runs the same code against the embedded simulator over loopback.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from batchgen.errors import (
    AmbiguousSubmitError,
    FatalProviderError,
    JobRejectedError,
    ManifestError,
    ProviderError,
    RateLimitedError,
    TransientError,
)
from batchgen.providers import Provider, get_provider, provider_names, register
from batchgen.providers.base import CancelOutcome, RemoteResult, RemoteStatus, Submission
from batchgen.providers.runcomfy import (
    MAX_MESSAGE,
    RunComfyProvider,
    parse_retry_after,
)
from batchgen.providers.simulator import SimulatorProvider

TOKEN = "rc_live_SECRET_7f3a9b2c1d"
BASE = "https://api.test"
MODEL = "google/nano-banana/pro/text-to-image"
RID = "req_0123456789abcdef"

Handler = Callable[[httpx.Request], httpx.Response]


def make(handler: Handler, **options: Any) -> RunComfyProvider:
    """A provider whose every request goes to ``handler``."""
    options.setdefault("base_url", BASE)
    options.setdefault("token", TOKEN)
    return RunComfyProvider(transport=httpx.MockTransport(handler), **options)


def answer(status: int, body: Any = None, headers: dict[str, str] | None = None) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        if isinstance(body, (bytes, str)):
            return httpx.Response(status, content=body, headers=headers)
        return httpx.Response(status, json=body, headers=headers)

    return handler


def raising(exc_type: type[httpx.HTTPError]) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc_type("simulated", request=request)

    return handler


async def call(provider: RunComfyProvider, operation: str) -> Any:
    if operation == "submit":
        return await provider.submit(MODEL, {"prompt": "a cat", "seed": 1})
    return await getattr(provider, operation)(RID)


def assert_no_token(exc: BaseException) -> None:
    """The token is nowhere in what an error could show: message, attributes, traceback."""
    assert TOKEN not in str(exc)
    assert TOKEN not in repr(exc)
    assert TOKEN not in repr(vars(exc))
    assert TOKEN not in "".join(traceback.format_exception(exc))


# -- request shapes ------------------------------------------------------------------------------


async def test_request_shapes() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        path = request.url.path
        if path.startswith("/v1/models/"):
            return httpx.Response(200, json={"request_id": RID, "status_url": "x"})
        if path.endswith("/status"):
            return httpx.Response(200, json={"status": "in_queue", "queue_position": 3})
        if path.endswith("/result"):
            return httpx.Response(200, json={"status": "in_progress"})
        return httpx.Response(202, json={"status": "cancelled", "outcome": "cancelled"})

    params = {"prompt": "a lighthouse, ünïcode ☃", "seed": 81030369, "aspect_ratio": "16:9"}
    async with make(handler) as provider:
        submission = await provider.submit(MODEL, params)
        await provider.status(RID)
        await provider.result(RID)
        await provider.cancel(RID)

    assert submission == Submission(request_id=RID, status_url="x")
    submit, status, result, cancel = seen
    assert (submit.method, str(submit.url)) == ("POST", f"{BASE}/v1/models/{MODEL}")
    assert json.loads(submit.content) == params  # the params are the body, no wrapper
    assert submit.headers["Content-Type"] == "application/json"
    assert (status.method, str(status.url)) == ("GET", f"{BASE}/v1/requests/{RID}/status")
    assert (result.method, str(result.url)) == (
        "GET",
        f"{BASE}/v1/requests/{RID}/result?include_cost=true",
    )
    assert (cancel.method, str(cancel.url)) == ("POST", f"{BASE}/v1/requests/{RID}/cancel")
    assert cancel.content == b""
    for request in seen:
        assert request.headers["Authorization"] == f"Bearer {TOKEN}"
        assert request.headers["Accept"] == "application/json"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("https://api.test", "https://api.test"),
        ("https://api.test/", "https://api.test"),
        ("https://api.test/v1", "https://api.test"),
        ("https://api.test/v1/", "https://api.test"),
        ("http://127.0.0.1:8123", "http://127.0.0.1:8123"),
        ("https://gw.test/runcomfy", "https://gw.test/runcomfy"),
    ],
)
async def test_base_url_normalised(given: str, expected: str) -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200, json={"status": "in_queue"})

    async with make(handler, base_url=given) as provider:
        await provider.status(RID)
    assert seen == [f"{expected}/v1/requests/{RID}/status"]


@pytest.mark.parametrize(
    "bad", ["ftp://api.test", "api.test", "https://user:pw@api.test", "https://api.test?x=1"]
)
def test_bad_base_url_is_fatal(bad: str) -> None:
    with pytest.raises(FatalProviderError) as info:
        RunComfyProvider(base_url=bad, token=TOKEN)
    assert info.value.error_class == "config"
    assert "RUNCOMFY_BASE_URL" in str(info.value)


async def test_env_vars_give_base_url_and_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNCOMFY_BASE_URL", "http://127.0.0.1:9/")
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", f"  {TOKEN}\n")
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"status": "completed"})

    provider = RunComfyProvider(transport=httpx.MockTransport(handler))
    async with provider:
        assert await provider.status(RID) == RemoteStatus("completed")
    assert provider.base_url == "http://127.0.0.1:9"
    assert seen[0].headers["Authorization"] == f"Bearer {TOKEN}"
    assert TOKEN not in repr(provider)


def test_default_base_url_is_the_public_api() -> None:
    assert RunComfyProvider(token=TOKEN).base_url == "https://model-api.runcomfy.net"


@pytest.mark.parametrize("token", [None, "", "   "])
def test_missing_token_is_fatal_with_a_clear_message(token: str | None) -> None:
    with pytest.raises(FatalProviderError) as info:
        RunComfyProvider(base_url=BASE, token=token)
    assert info.value.error_class == "auth"
    assert "RUNCOMFY_API_TOKEN is not set" in str(info.value)
    assert info.value.exit_code == 3


def test_token_with_header_breaking_characters_is_fatal_and_not_shown() -> None:
    with pytest.raises(FatalProviderError) as info:
        RunComfyProvider(base_url=BASE, token="abc\r\nX-Evil: 1")
    assert "abc" not in str(info.value)


async def test_server_urls_are_never_followed() -> None:
    """A hostile submit answer cannot redirect later calls (and the token) to another host."""
    hosts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        if request.method == "POST":
            evil = "https://evil.test/v1/requests/x"
            return httpx.Response(
                200,
                json={
                    "request_id": RID,
                    "status_url": f"{evil}/status",
                    "result_url": f"{evil}/result",
                    "cancel_url": f"{evil}/cancel",
                },
            )
        return httpx.Response(200, json={"status": "in_queue"})

    async with make(handler) as provider:
        submission = await provider.submit(MODEL, {"prompt": "x"})
        await provider.status(submission.request_id)
        await provider.result(submission.request_id)
        await provider.cancel(submission.request_id)
    assert hosts == ["api.test"] * 4


async def test_redirects_are_not_followed_and_stop_the_run() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(str(request.url))
        return httpx.Response(307, headers={"Location": "https://evil.test/steal"})

    async with make(handler) as provider:
        with pytest.raises(FatalProviderError) as info:
            await provider.status(RID)
    assert len(calls) == 1
    assert info.value.error_class == "redirect"


@pytest.mark.parametrize(
    "request_id", ["../../v1/models/x", "a/b", "", "x" * 129, "id with space", "é", "a?b=c", "a#b"]
)
@pytest.mark.parametrize("operation", ["status", "result", "cancel"])
async def test_bad_request_ids_never_reach_a_url(operation: str, request_id: str) -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(200, json={"status": "completed"})

    async with make(handler) as provider:
        with pytest.raises(JobRejectedError) as info:
            await getattr(provider, operation)(request_id)
    assert info.value.error_class == "bad_request_id"
    assert calls == []


@pytest.mark.parametrize("model_id", ["", "a//b", "../etc", "a/../b", "a/./b", "a b", "a\x00b"])
async def test_bad_model_ids_are_rejected_before_sending(model_id: str) -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(200, json={"request_id": RID})

    async with make(handler) as provider:
        with pytest.raises(JobRejectedError) as info:
            await provider.submit(model_id, {"prompt": "x"})
    assert info.value.error_class == "bad_model_id"
    assert calls == []


async def test_model_id_segments_are_percent_encoded() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.raw_path.decode())
        return httpx.Response(200, json={"request_id": RID})

    async with make(handler) as provider:
        await provider.submit("owner/name:v2?x", {"prompt": "x"})
    assert seen == ["/v1/models/owner/name%3Av2%3Fx"]


async def test_unserialisable_params_fail_the_job_without_sending() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(200, json={"request_id": RID})

    async with make(handler) as provider:
        with pytest.raises(JobRejectedError):
            await provider.submit(MODEL, {"prompt": "x", "cfg": float("nan")})
    assert calls == []


# -- the classification table ---------------------------------------------------------------------

HUGE = "x" * 1_000_000
#: every error body echoes the token: it must never come back in a message
ECHO = f"token was {TOKEN} (Authorization: Bearer {TOKEN})"
DETAIL_422 = [
    {"loc": ["body", "resolution"], "msg": "'3K' is not one of 1K, 2K, 4K", "type": "enum"},
    {"loc": ["body", "aspect_ratio"], "msg": "'7:5' is not allowed", "type": "enum"},
]
HTTP_DATE = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)

STATUS_CASES: list[tuple[str, int, Any, dict[str, str], type[ProviderError], str]] = [
    # operation, HTTP status, body, headers, exception, error_class
    ("submit", 429, {"error_message": ECHO}, {}, RateLimitedError, "http_429"),
    ("status", 429, {"message": ECHO}, {"Retry-After": "7"}, RateLimitedError, "http_429"),
    ("result", 429, ECHO, {"Retry-After": HTTP_DATE}, RateLimitedError, "http_429"),
    ("cancel", 429, None, {}, RateLimitedError, "http_429"),
    (
        "submit",
        500,
        {"error_code": 500001, "error_message": ECHO},
        {},
        AmbiguousSubmitError,
        "ambiguous_submit",
    ),
    ("submit", 502, "<html>bad gateway</html>", {}, AmbiguousSubmitError, "ambiguous_submit"),
    ("submit", 503, None, {"Retry-After": "5"}, AmbiguousSubmitError, "ambiguous_submit"),
    ("status", 500, {"error_code": 500001, "error_message": ECHO}, {}, TransientError, "http_5xx"),
    ("result", 502, "<html>bad gateway</html>", {}, TransientError, "http_5xx"),
    ("cancel", 503, None, {}, TransientError, "http_5xx"),
    (
        "submit",
        400,
        {"error_message": ECHO, "detail": DETAIL_422},
        {},
        JobRejectedError,
        "bad_request",
    ),
    (
        "submit",
        422,
        {"error_code": 422001, "detail": DETAIL_422},
        {},
        JobRejectedError,
        "bad_request",
    ),
    (
        "submit",
        400,
        {"error_code": 400001, "error_message": ECHO},
        {},
        JobRejectedError,
        "unknown_model",
    ),
    ("submit", 404, {"detail": "Not Found"}, {}, JobRejectedError, "unknown_model"),
    (
        "status",
        404,
        {"error_code": 404001, "error_message": ECHO},
        {},
        JobRejectedError,
        "not_found",
    ),
    ("result", 404, {"detail": "Not Found"}, {}, JobRejectedError, "not_found"),
    ("result", 404, None, {}, FatalProviderError, "config"),
    ("submit", 404, "<html>404 Not Found</html>", {}, FatalProviderError, "config"),
    ("cancel", 404, {"error_code": 404001}, {}, JobRejectedError, "not_found"),
    (
        "status",
        403,
        {"error_code": 403001, "error_message": ECHO},
        {},
        JobRejectedError,
        "forbidden",
    ),
    ("submit", 409, {"error": ECHO}, {}, JobRejectedError, "http_4xx"),
    ("submit", 408, None, {}, TransientError, "timeout"),
    ("submit", 401, {"error_code": 401001, "error_message": ECHO}, {}, FatalProviderError, "auth"),
    ("status", 401, None, {}, FatalProviderError, "auth"),
    ("result", 403, {"error_code": 403003, "error": ECHO}, {}, FatalProviderError, "auth"),
    ("submit", 402, {"message": ECHO}, {}, FatalProviderError, "funds"),
    ("submit", 400, {"error_code": 400002, "error_message": ECHO}, {}, FatalProviderError, "funds"),
    ("submit", 400, {"error_code": 400004, "error_message": ECHO}, {}, FatalProviderError, "auth"),
    ("status", 400, {"error_code": "400004"}, {}, FatalProviderError, "auth"),
    ("submit", 301, None, {"Location": "https://evil.test/"}, FatalProviderError, "redirect"),
    # HTTP 200 bodies carrying a non-zero error_code are errors (spec §2)
    ("submit", 200, {"error_code": 10001, "error_message": ECHO}, {}, FatalProviderError, "funds"),
    (
        "submit",
        200,
        {"error_code": 422001, "detail": DETAIL_422},
        {},
        JobRejectedError,
        "bad_request",
    ),
    (
        "submit",
        200,
        {"error_code": 500001, "request_id": RID},
        {},
        AmbiguousSubmitError,
        "ambiguous_submit",
    ),
    ("status", 200, {"error_code": 500001, "status": "in_queue"}, {}, TransientError, "http_5xx"),
    (
        "result",
        200,
        {"error_code": 404001, "error_message": ECHO},
        {},
        JobRejectedError,
        "not_found",
    ),
    ("submit", 200, {"error_code": 77, "error_message": ECHO}, {}, JobRejectedError, "api_error"),
    ("status", 200, {"error_code": 77}, {}, TransientError, "api_error"),
    # answers that cannot be read
    ("submit", 200, "<html>ok</html>", {}, AmbiguousSubmitError, "ambiguous_submit"),
    ("submit", 200, {"status_url": "x"}, {}, AmbiguousSubmitError, "ambiguous_submit"),
    ("submit", 200, {"request_id": "../../evil"}, {}, AmbiguousSubmitError, "ambiguous_submit"),
    ("submit", 200, {"request_id": TOKEN + "/x"}, {}, AmbiguousSubmitError, "ambiguous_submit"),
    ("status", 200, "not json", {}, TransientError, "schema"),
    ("status", 200, {"status": "exploded"}, {}, TransientError, "schema"),
    ("result", 200, [1, 2], {}, TransientError, "schema"),
    ("result", 200, {"status": TOKEN}, {}, TransientError, "schema"),
    ("submit", 400, {"error_message": HUGE + ECHO}, {}, JobRejectedError, "bad_request"),
    ("status", 500, HUGE + ECHO + HUGE, {}, TransientError, "http_5xx"),
    (
        "submit",
        422,
        {"detail": [{"loc": ["body", "p"], "msg": ECHO * 1000}] * 50},
        {},
        JobRejectedError,
        "bad_request",
    ),
]


@pytest.mark.parametrize(
    ("operation", "status", "body", "headers", "expected", "error_class"),
    STATUS_CASES,
    ids=[f"{c[0]}-{c[1]}-{c[5]}-{i}" for i, c in enumerate(STATUS_CASES)],
)
async def test_classification_of_answers(
    operation: str,
    status: int,
    body: Any,
    headers: dict[str, str],
    expected: type[ProviderError],
    error_class: str,
) -> None:
    async with make(answer(status, body, headers)) as provider:
        with pytest.raises(ProviderError) as info:
            await call(provider, operation)
    exc = info.value
    assert type(exc) is expected, f"{type(exc).__name__}: {exc}"
    assert exc.error_class == error_class
    assert exc.status_code == status
    assert_no_token(exc)
    assert len(str(exc)) < MAX_MESSAGE + 400  # hostile bodies are cut
    assert operation in str(exc)


async def test_retry_after_seconds_and_http_date() -> None:
    async with make(answer(429, None, {"Retry-After": "7"})) as provider:
        with pytest.raises(RateLimitedError) as seconds:
            await provider.status(RID)
    assert seconds.value.retry_after == 7.0
    assert "retry after 7 s" in str(seconds.value)
    fresh = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    async with make(answer(429, None, {"Retry-After": fresh})) as provider:
        with pytest.raises(RateLimitedError) as date:
            await provider.submit(MODEL, {"prompt": "x"})
    assert date.value.retry_after is not None and 25 <= date.value.retry_after <= 30
    async with make(answer(429, None)) as provider:
        with pytest.raises(RateLimitedError) as none:
            await provider.result(RID)
    assert none.value.retry_after is None
    async with make(answer(503, None, {"Retry-After": "3"})) as provider:
        with pytest.raises(TransientError) as unavailable:
            await provider.status(RID)
    assert unavailable.value.retry_after == 3.0


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("7", 7.0),
        (" 1.5 ", 1.5),
        ("0", 0.0),
        ("-4", 0.0),
        ("99999999", 3600.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
        ("soon", None),
        ("", None),
        (None, None),
        ("nan", None),
    ],
)
def test_parse_retry_after(header: str | None, expected: float | None) -> None:
    assert parse_retry_after(header) == expected


def test_parse_retry_after_future_date() -> None:
    now = time.time()
    when = format_datetime(datetime.fromtimestamp(now + 120, UTC), usegmt=True)
    result = parse_retry_after(when, now=now)
    assert result is not None and 119 <= result <= 120


async def test_validation_errors_name_every_field() -> None:
    body = {"error_code": 422001, "error_message": "Validation Error", "detail": DETAIL_422}
    async with make(answer(422, body)) as provider:
        with pytest.raises(JobRejectedError) as info:
            await provider.submit(MODEL, {"prompt": "x"})
    message = str(info.value)
    assert "resolution: '3K' is not one of 1K, 2K, 4K" in message
    assert "aspect_ratio: '7:5' is not allowed" in message
    assert info.value.error_code == 422001


async def test_hostile_messages_are_cut_and_cleaned() -> None:
    body = {"error_message": "\x1b[31mred\x00\u202eevil\n" + "y" * 100_000 + TOKEN}
    async with make(answer(400, body)) as provider:
        with pytest.raises(JobRejectedError) as info:
            await provider.submit(MODEL, {"prompt": "x"})
    message = str(info.value)
    assert "\x1b" not in message and "\x00" not in message and "\u202e" not in message
    assert "\n" not in message
    assert len(message) < MAX_MESSAGE + 200
    assert_no_token(info.value)


async def test_an_endless_answer_is_not_read_into_memory() -> None:
    async def endless() -> Any:
        while True:
            yield b'{"status": "' + b"a" * 65536

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=endless())

    async with make(handler) as provider:
        with pytest.raises(TransientError) as info:
            await provider.status(RID)
    assert info.value.error_class == "schema"


EXCEPTION_CASES: list[tuple[str, type[httpx.HTTPError], type[ProviderError], str]] = [
    # certainly not sent: safe everywhere
    ("submit", httpx.ConnectError, TransientError, "connection"),
    ("submit", httpx.ConnectTimeout, TransientError, "connection"),
    ("submit", httpx.PoolTimeout, TransientError, "pool_timeout"),
    ("submit", httpx.ProxyError, TransientError, "connection"),
    ("status", httpx.ConnectError, TransientError, "connection"),
    ("result", httpx.PoolTimeout, TransientError, "pool_timeout"),
    ("submit", httpx.UnsupportedProtocol, FatalProviderError, "config"),
    # sent, answer lost: a submit is ambiguous, anything else is retried
    ("submit", httpx.ReadTimeout, AmbiguousSubmitError, "ambiguous_submit"),
    ("submit", httpx.WriteTimeout, AmbiguousSubmitError, "ambiguous_submit"),
    ("submit", httpx.RemoteProtocolError, AmbiguousSubmitError, "ambiguous_submit"),
    ("submit", httpx.ReadError, AmbiguousSubmitError, "ambiguous_submit"),
    ("submit", httpx.WriteError, AmbiguousSubmitError, "ambiguous_submit"),
    ("submit", httpx.DecodingError, AmbiguousSubmitError, "ambiguous_submit"),
    ("status", httpx.ReadTimeout, TransientError, "timeout"),
    ("status", httpx.RemoteProtocolError, TransientError, "connection"),
    ("result", httpx.ReadError, TransientError, "connection"),
    ("result", httpx.WriteTimeout, TransientError, "timeout"),
    ("cancel", httpx.ReadTimeout, TransientError, "timeout"),
    ("cancel", httpx.RemoteProtocolError, TransientError, "connection"),
    ("result", httpx.DecodingError, TransientError, "schema"),
]


@pytest.mark.parametrize(
    ("operation", "raised", "expected", "error_class"),
    EXCEPTION_CASES,
    ids=[f"{c[0]}-{c[1].__name__}" for c in EXCEPTION_CASES],
)
async def test_classification_of_transport_errors(
    operation: str,
    raised: type[httpx.HTTPError],
    expected: type[ProviderError],
    error_class: str,
) -> None:
    async with make(raising(raised)) as provider:
        with pytest.raises(ProviderError) as info:
            await call(provider, operation)
    exc = info.value
    assert type(exc) is expected, f"{type(exc).__name__}: {exc}"
    assert exc.error_class == error_class
    assert isinstance(exc.__cause__, raised)
    assert_no_token(exc)


async def test_every_classified_error_is_one_of_the_four_runner_decisions() -> None:
    decisions = (TransientError, JobRejectedError, FatalProviderError, AmbiguousSubmitError)
    for operation, status, body, headers, _, _ in STATUS_CASES:
        async with make(answer(status, body, headers)) as provider:
            with pytest.raises(ProviderError) as info:
                await call(provider, operation)
        assert isinstance(info.value, decisions)
        if operation != "submit":
            assert not isinstance(info.value, AmbiguousSubmitError)


# -- parsing of good answers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("in_queue", "in_queue"),
        ("IN_QUEUE", "in_queue"),
        ("pending", "in_queue"),
        ("waiting", "in_queue"),
        ("queued", "in_queue"),
        ("in_progress", "in_progress"),
        ("in-progress", "in_progress"),
        ("starting", "in_progress"),
        ("processing", "in_progress"),
        ("running", "in_progress"),
        ("completed", "completed"),
        ("succeeded", "completed"),
        ("failed", "failed"),
        ("cancelled", "cancelled"),
        ("canceled", "cancelled"),
    ],
)
async def test_status_words(word: str, expected: str) -> None:
    async with make(answer(200, {"status": word, "queue_position": 2})) as provider:
        status = await provider.status(RID)
    assert status.status == expected
    assert status.queue_position == (2 if expected == "in_queue" else None)
    assert status.done is (expected in ("completed", "failed", "cancelled"))
    assert status.running is not status.done


async def test_error_code_zero_is_not_an_error() -> None:
    async with make(answer(200, {"status": "in_queue", "error_code": 0})) as provider:
        assert (await provider.status(RID)).status == "in_queue"


async def test_result_outputs_every_uri_in_order_without_duplicates() -> None:
    body = {
        "request_id": RID,
        "status": "succeeded",
        "output": {
            "videos": ["https://cdn.test/v1.mp4", "https://cdn.test/v2.mp4"],
            "images": ["https://cdn.test/a.png", {"url": "https://cdn.test/b.png"}],
            "image": "https://cdn.test/a.png",
            "seed": "12345",
            "thumbnails": ["https://cdn.test/t.png"],
            "audio": "https://cdn.test/s.wav",
        },
        "created_at": "2026-01-01T00:00:00.000001+00:00",
        "finished_at": "2026-01-01T00:00:09.5+00:00",
        "cost": 0.15,
    }
    async with make(answer(200, body)) as provider:
        result = await provider.result(RID)
    assert result.status == "succeeded" and result.succeeded and result.done
    assert result.outputs == [
        "https://cdn.test/a.png",
        "https://cdn.test/b.png",
        "https://cdn.test/v1.mp4",
        "https://cdn.test/v2.mp4",
        "https://cdn.test/s.wav",
        "https://cdn.test/t.png",
    ]
    assert result.cost == 0.15
    assert result.created_at == "2026-01-01T00:00:00.000001+00:00"
    assert result.finished_at == "2026-01-01T00:00:09.5+00:00"
    assert result.raw == body


@pytest.mark.parametrize(
    ("body", "status", "outputs", "error"),
    [
        ({"status": "in_queue"}, "in_queue", [], None),
        ({"status": "in_progress"}, "in_progress", [], None),
        (
            {"status": "completed", "output": {"image": "https://c/x.png"}},
            "succeeded",
            ["https://c/x.png"],
            None,
        ),
        ({"status": "completed", "error": {"code": 1}}, "failed", [], {"code": 1}),
        (
            {"status": "failed", "error": [{"errorCode": 3, "error": "OOM"}]},
            "failed",
            [],
            [{"errorCode": 3, "error": "OOM"}],
        ),
        ({"status": "failed", "error_message": "NSFW filter"}, "failed", [], "NSFW filter"),
        ({"status": "failed"}, "failed", [], None),
        ({"status": "cancelled"}, "cancelled", [], None),
        ({"status": "canceled"}, "cancelled", [], None),
        ({"output": {"images": ["https://c/y.png"]}}, "succeeded", ["https://c/y.png"], None),
        (
            {"status": "succeeded", "output": "https://c/z.png"},
            "succeeded",
            ["https://c/z.png"],
            None,
        ),
    ],
)
async def test_result_states(
    body: dict[str, Any], status: str, outputs: list[str], error: Any
) -> None:
    async with make(answer(200, body)) as provider:
        result = await provider.result(RID)
    assert (result.status, result.outputs, result.error) == (status, outputs, error)
    assert result.running is (status in ("in_queue", "in_progress"))


async def test_a_failed_result_is_data_not_an_exception() -> None:
    async with make(answer(200, {"status": "failed", "error": "boom"})) as provider:
        result = await provider.result(RID)
    assert result == RemoteResult(
        status="failed", error="boom", raw={"status": "failed", "error": "boom"}
    )


async def test_cost_parsing_and_opt_out() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"status": "completed", "cost": "2.85"})

    async with make(handler, include_cost=False) as provider:
        result = await provider.result(RID)
    assert result.cost == 2.85
    assert "include_cost" not in str(seen[0].url)


async def test_an_echoed_token_is_redacted_from_raw_results() -> None:
    body = {"status": "failed", "error": {"debug": f"Authorization: Bearer {TOKEN}"}}
    async with make(answer(200, body)) as provider:
        result = await provider.result(RID)
    assert TOKEN not in json.dumps(result.raw)
    assert TOKEN not in repr(result)


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (
            202,
            {"request_id": RID, "status": "cancelled", "outcome": "cancelled"},
            CancelOutcome("cancelled", "cancelled"),
        ),
        (
            202,
            {"request_id": RID, "status": "completed", "outcome": "cancelled"},
            CancelOutcome("cancelled", "completed"),
        ),
        (
            202,
            {"request_id": RID, "status": "in_progress", "outcome": "not_cancellable"},
            CancelOutcome("not_cancellable", "in_progress"),
        ),
        (200, {"status": "cancellation_requested"}, CancelOutcome("requested", "in_progress")),
        (202, None, CancelOutcome("requested", "unknown")),
        (202, b'{"request_id": "x" "status": "completed"}', CancelOutcome("requested", "unknown")),
    ],
)
async def test_cancel_outcomes(status: int, body: Any, expected: CancelOutcome) -> None:
    async with make(answer(status, body)) as provider:
        assert await provider.cancel(RID) == expected


async def test_closed_provider_refuses_calls() -> None:
    provider = make(answer(200, {"status": "in_queue"}))
    await provider.aclose()
    await provider.aclose()  # idempotent
    with pytest.raises(TransientError):
        await provider.status(RID)


# -- registry -------------------------------------------------------------------------------------


async def test_registry_builds_runcomfy_and_ignores_simulator_settings() -> None:
    provider = get_provider(
        "runcomfy", token=TOKEN, base_url=BASE, simulator={"workers": 2}, max_connections=4
    )
    assert isinstance(provider, RunComfyProvider) and provider.name == "runcomfy"
    await provider.aclose()
    assert {"runcomfy", "simulator"} <= set(provider_names())


def test_registry_unknown_and_duplicate_names() -> None:
    with pytest.raises(ManifestError, match="unknown provider 'nope'"):
        get_provider("nope")
    with pytest.raises(ValueError, match="already registered"):
        register("runcomfy", lambda **_: make(answer(200, {})))
    with pytest.raises(ValueError):
        register("bad name!", lambda **_: make(answer(200, {})))


async def test_registry_takes_plugins() -> None:
    class Echo(Provider):
        name = "echo-test"

        async def submit(self, model_id: str, params: dict[str, Any]) -> Submission:
            return Submission(request_id=str(params["n"]))

        async def status(self, request_id: str) -> RemoteStatus:
            return RemoteStatus("completed")

        async def result(self, request_id: str) -> RemoteResult:
            return RemoteResult("succeeded", [f"https://x/{request_id}.png"])

        async def cancel(self, request_id: str) -> CancelOutcome:
            return CancelOutcome("not_cancellable", "completed")

        async def aclose(self) -> None:
            pass

    register("echo-test", lambda **options: Echo(), replace=True)
    async with get_provider("echo-test") as provider:
        submission = await provider.submit("m", {"n": 7})
        assert (await provider.result(submission.request_id)).outputs == ["https://x/7.png"]


# -- against the embedded simulator, over loopback -------------------------------------------------


@pytest.fixture
def sim_factory(request: pytest.FixtureRequest) -> Any:
    pytest.importorskip("batchgen.simulator", reason="batchgen.simulator has not landed yet")
    return request.getfixturevalue("simulator_factory")


async def _wait_result(provider: Provider, request_id: str, deadline: float = 20.0) -> RemoteResult:
    import asyncio

    stop = time.monotonic() + deadline
    while time.monotonic() < stop:
        result = await provider.result(request_id)
        if result.done:
            return result
        await asyncio.sleep(0.02)
    raise AssertionError("the simulator did not finish in time")


async def test_round_trip_against_the_simulator(sim_factory: Any, tmp_path: Path) -> None:
    from batchgen.download import fetch, make_download_client

    sim = sim_factory(latency="0.05-0.1s", image_mode="small", workers=2)
    async with RunComfyProvider(base_url=sim.base_url, token=sim.token) as provider:
        submission = await provider.submit(MODEL, {"prompt": "a cat", "aspect_ratio": "16:9"})
        assert submission.status_url and submission.request_id in submission.status_url
        status = await provider.status(submission.request_id)
        assert status.status in ("in_queue", "in_progress", "completed")
        result = await _wait_result(provider, submission.request_id)
        assert result.status == "succeeded" and len(result.outputs) == 1
        assert result.cost is not None and result.cost > 0
        assert result.created_at and result.finished_at
        assert (await provider.status(submission.request_id)).status == "completed"
        async with make_download_client() as client:
            fetched = await fetch(client, result.outputs[0], tmp_path / "a.png")
        assert fetched.width is not None and fetched.height is not None
        assert fetched.width > fetched.height  # 16:9

        # validation errors, unknown model, unknown id: the job fails with a reason
        with pytest.raises(JobRejectedError) as bad:
            await provider.submit(MODEL, {"prompt": "x", "resolution": "3K"})
        assert bad.value.error_class == "bad_request" and "resolution" in str(bad.value)
        with pytest.raises(JobRejectedError) as unknown:
            await provider.submit("nobody/no-model", {"prompt": "x"})
        assert unknown.value.error_class == "unknown_model"
        with pytest.raises(JobRejectedError) as missing:
            await provider.result("no_such_request")
        assert missing.value.error_class == "not_found"

        # cancel: a second job waits behind two busy workers, so it is still queued
        busy = [await provider.submit(MODEL, {"prompt": f"busy {i}"}) for i in range(2)]
        queued = await provider.submit(MODEL, {"prompt": "queued"})
        outcome = await provider.cancel(queued.request_id)
        assert outcome.outcome == "cancelled"
        assert (await provider.result(queued.request_id)).status == "cancelled"
        for job in busy:
            await _wait_result(provider, job.request_id)

    async with RunComfyProvider(base_url=sim.base_url, token="wrong-token") as intruder:
        with pytest.raises(FatalProviderError) as refused:
            await intruder.submit(MODEL, {"prompt": "x"})
        assert refused.value.error_class == "auth"
        assert_no_token(refused.value)


@pytest.mark.parametrize(
    ("faults", "operation", "expected", "error_class"),
    [
        ({"http_5xx": 1.0}, "submit", AmbiguousSubmitError, "ambiguous_submit"),
        ({"http_5xx": 1.0}, "status", TransientError, "http_5xx"),
        ({"drop_connection": 1.0}, "submit", AmbiguousSubmitError, "ambiguous_submit"),
        ({"drop_connection": 1.0}, "result", TransientError, "connection"),
        ({"lost_submit": 1.0}, "submit", AmbiguousSubmitError, "ambiguous_submit"),
        ({"http_429": 1.0}, "submit", RateLimitedError, "http_429"),
        ({"http_429_retry_after": 1.0, "retry_after": 2}, "status", RateLimitedError, "http_429"),
    ],
)
async def test_simulator_faults_are_classified(
    sim_factory: Any,
    faults: dict[str, Any],
    operation: str,
    expected: type[ProviderError],
    error_class: str,
) -> None:
    sim = sim_factory(latency=0, image_mode="small", faults=faults)
    async with RunComfyProvider(base_url=sim.base_url, token=sim.token) as provider:
        with pytest.raises(ProviderError) as info:
            await call(provider, operation)
    assert type(info.value) is expected, f"{type(info.value).__name__}: {info.value}"
    assert info.value.error_class == error_class
    if "retry_after" in faults:
        assert isinstance(info.value, RateLimitedError) and info.value.retry_after == 2.0


async def test_simulator_provider_starts_and_stops_its_server(
    sim_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the real token and base URL must never be used by a dry run
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", TOKEN)
    monkeypatch.setenv("RUNCOMFY_BASE_URL", "https://model-api.runcomfy.net")
    provider = get_provider(
        "simulator", simulator={"latency": "0.01-0.02s", "image_mode": "small", "workers": 2}
    )
    assert isinstance(provider, RunComfyProvider)
    base_url = provider.base_url
    assert provider.name == "simulator" and base_url.startswith("http://127.0.0.1:")
    async with provider:
        submission = await provider.submit(MODEL, {"prompt": "a dog"})
        result = await _wait_result(provider, submission.request_id)
        assert result.succeeded
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"{base_url}/_simulator/health")


def test_simulator_settings_errors_are_manifest_errors(sim_factory: Any) -> None:
    with pytest.raises(ManifestError, match="simulator"):
        get_provider("simulator", simulator={"workers": 0})


async def test_simulator_provider_takes_the_manifest_settings(sim_factory: Any) -> None:
    manifest = pytest.importorskip("batchgen.manifest")
    settings = manifest.SimulatorSettings(
        workers=3, latency="10ms", seed=4, faults={"job_failure": 1.0}
    )
    provider = get_provider("simulator", simulator=settings, max_connections=4)
    assert isinstance(provider, SimulatorProvider)
    config = provider.server.config
    assert (config.workers, config.latency, config.seed, config.image_mode) == (
        3,
        (0.01, 0.01),
        4,
        "small",
    )
    async with provider:
        submission = await provider.submit(MODEL, {"prompt": "doomed"})
        result = await _wait_result(provider, submission.request_id)
    assert result.status == "failed" and result.error


async def test_a_failed_results_text_is_cleaned_and_cut() -> None:
    body = {"status": "failed", "error": "line1\nline2\x00" + "z" * 50_000 + TOKEN}
    async with make(answer(200, body)) as provider:
        result = await provider.result(RID)
    assert isinstance(result.error, str)
    assert result.error.startswith("line1 line2")
    assert len(result.error) <= 2000 and TOKEN not in result.error


async def test_advertised_urls_are_cut() -> None:
    body = {"request_id": RID, "status_url": "https://x/" + "a" * 100_000}
    async with make(answer(200, body)) as provider:
        submission = await provider.submit(MODEL, {"prompt": "x"})
    assert submission.status_url is not None and len(submission.status_url) == 2048
    assert submission.result_url is None


async def test_a_percent_encoded_echo_of_the_token_is_redacted_too() -> None:
    token = "rc+SECRET/abc="
    quoted = "rc%2BSECRET%2Fabc%3D"
    body = {"status": "failed", "error": {"url": f"https://x/?t={quoted}"}}
    async with make(answer(200, body), token=token) as provider:
        result = await provider.result(RID)
    assert quoted not in json.dumps(result.raw) and token not in json.dumps(result.raw)
    async with make(answer(400, {"error_message": f"bad {quoted} and {token}"}), token=token) as p:
        with pytest.raises(JobRejectedError) as info:
            await p.submit(MODEL, {"prompt": "x"})
    assert quoted not in str(info.value) and token not in str(info.value)
