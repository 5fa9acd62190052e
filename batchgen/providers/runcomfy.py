"""The RunComfy Model API provider: one ``httpx.AsyncClient`` speaking the async queue endpoints.

Protocol: ``shared/spec/runcomfy-model-api.md``. Endpoints, all under ``<base>/v1``::

    POST /models/{model_id}                 submit (body = the params, no wrapper)   → Submission
    GET  /requests/{id}/status              status                                   → RemoteStatus
    GET  /requests/{id}/result?include_cost result (answers while running too)       → RemoteResult
    POST /requests/{id}/cancel              cancel a queued request                  → CancelOutcome

Invariants:

- Every outcome is classified here, once (see the table in :func:`classify_error`): retry
  (:class:`TransientError`, :class:`RateLimitedError` with ``retry_after``), fail the job
  (:class:`JobRejectedError`), stop the run (:class:`FatalProviderError`), or — on submit only —
  :class:`AmbiguousSubmitError` when the paid POST went out and its answer was lost. A submit is
  never retried here: the API has no idempotency key.
- Follow-up URLs are built from our own base URL and the request id (checked against
  ``[A-Za-z0-9_-]{1,128}``); the ``*_url`` fields a server returns are never followed, and
  redirects are never followed, so a hostile answer cannot move the token to another host.
- Error messages never contain the token: no headers are ever formatted, server text is
  redacted, stripped of control characters and cut to :data:`MAX_MESSAGE` characters.
- The client reads at most :data:`MAX_BODY` bytes of any answer (a hostile endless body cannot
  exhaust memory).
"""

from __future__ import annotations

import email.utils
import ipaddress
import json
import logging
import math
import os
import re
import time
from collections.abc import Mapping
from datetime import UTC
from typing import Any, Final
from urllib.parse import quote

import httpx

from .. import __version__
from ..errors import (
    AmbiguousSubmitError,
    FatalProviderError,
    JobRejectedError,
    ProviderError,
    RateLimitedError,
    TransientError,
)
from .base import (
    STATUS_CANCELLED,
    STATUS_COMPLETED,
    STATUS_FAILED,
    STATUS_IN_PROGRESS,
    STATUS_IN_QUEUE,
    STATUS_SUCCEEDED,
    CancelOutcome,
    Provider,
    RemoteResult,
    RemoteStatus,
    Submission,
)

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL: Final = "https://model-api.runcomfy.net"
BASE_URL_ENV: Final = "RUNCOMFY_BASE_URL"
TOKEN_ENV: Final = "RUNCOMFY_API_TOKEN"
#: the request id charset the official client validates; anything else never reaches a URL
REQUEST_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,128}")
#: longest server-provided text kept in an error message
MAX_MESSAGE: Final = 300
#: longest failure text kept from a ``failed`` result's string ``error``
MAX_ERROR_TEXT: Final = 2000
#: most bytes read from any API answer (real answers are a few kB)
MAX_BODY: Final = 4 * 1024 * 1024
#: a longer Retry-After is clamped (a hostile or buggy header must not stall a run for days)
MAX_RETRY_AFTER: Final = 3600.0
DEFAULT_TIMEOUT: Final = 60.0
DEFAULT_MAX_CONNECTIONS: Final = 16
#: below common server idle timeouts (uvicorn: 5 s), so we rarely reuse a connection the
#: server is closing — on a submit that race would look like an ambiguous dropped connection
DEFAULT_KEEPALIVE_EXPIRY: Final = 4.0

_OPERATIONS = ("submit", "status", "result", "cancel")

# Status words, liberal: the documented ones, the official clients' synonyms, and the obvious.
_STATUS_WORDS: Final[dict[str, str]] = {
    "in_queue": STATUS_IN_QUEUE,
    "queued": STATUS_IN_QUEUE,
    "pending": STATUS_IN_QUEUE,
    "waiting": STATUS_IN_QUEUE,
    "in_progress": STATUS_IN_PROGRESS,
    "starting": STATUS_IN_PROGRESS,
    "processing": STATUS_IN_PROGRESS,
    "running": STATUS_IN_PROGRESS,
    # a cancel that the server has noted but not confirmed: the request may still run
    "cancellation_requested": STATUS_IN_PROGRESS,
    "completed": STATUS_COMPLETED,
    "succeeded": STATUS_SUCCEEDED,
    "success": STATUS_SUCCEEDED,
    "failed": STATUS_FAILED,
    "error": STATUS_FAILED,
    "cancelled": STATUS_CANCELLED,
    "canceled": STATUS_CANCELLED,
}

#: output keys, in the order their URIs are listed; other keys follow in the server's order
OUTPUT_KEYS: Final = ("image", "images", "video", "videos", "url", "path", "audio")

# error_code → (exception, error_class, what it means); these win over the HTTP status
_FATAL_CODES: Final[dict[int, tuple[str, str]]] = {
    400002: ("funds", "insufficient balance (400002 InsufficientResources): top up the account"),
    400004: (
        "auth",
        "account or token problem (400004 UserAccountError): the token is missing, expired or "
        "revoked, or the account is inactive",
    ),
    401001: ("auth", "the API token was refused (401001 Unauthorized)"),
    10001: ("funds", "insufficient funds (10001 InsufficientFunds): top up the account"),
}


def _normalise_word(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    return value.strip().lower().replace("-", "_").replace(" ", "_")


def _as_int(value: object) -> int | None:
    """An int from a JSON number or numeric string, else None (bools are not numbers)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d{1,12}\s*", value):
        return int(value)
    return None


def _as_float(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delay-seconds or HTTP-date), else None."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    seconds: float | None
    try:
        seconds = float(text)
        if not math.isfinite(seconds):
            return None
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # RFC 9110 dates are GMT
            when = when.replace(tzinfo=UTC)
        reference = now if now is not None else time.time()
        seconds = when.timestamp() - reference
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


class _Redactor:
    """Makes server text safe to show: no token, no control characters, bounded length."""

    def __init__(self, secret: str) -> None:
        self._secrets = [s for s in {secret, quote(secret, safe="")} if s]

    def found_in(self, raw: bytes) -> bool:
        """Whether ``raw`` carries the token (plain or percent-encoded)."""
        return any(secret.encode() in raw for secret in self._secrets)

    def text(self, value: str, limit: int = MAX_MESSAGE) -> str:
        for secret in self._secrets:
            value = value.replace(secret, "[redacted]")
        value = re.sub(r"(?i)bearer\s+\S+", "Bearer [redacted]", value)
        value = re.sub(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e]+", " ", value)
        value = re.sub(r"\s+", " ", value).strip()
        if len(value) > limit:
            value = value[: limit - 1].rstrip() + "…"
        return value

    def json(self, value: Any) -> Any:
        """A copy of a parsed JSON value with the token replaced in every string."""
        if isinstance(value, str):
            for secret in self._secrets:
                value = value.replace(secret, "[redacted]")
            return value
        if isinstance(value, list):
            return [self.json(v) for v in value]
        if isinstance(value, dict):
            return {self.json(k): self.json(v) for k, v in value.items()}
        return value


def _describe(value: Any, depth: int = 0) -> str:
    """Human text from an error payload of any JSON shape (str, dict, list of validation items)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if depth > 3:
        return json.dumps(value, ensure_ascii=False)[:MAX_MESSAGE]
    if isinstance(value, list):
        return "; ".join(d for d in (_describe(v, depth + 1) for v in value[:20]) if d)
    if isinstance(value, dict):
        location = value.get("loc") or value.get("field") or value.get("param")
        text = next(
            (
                _describe(value[k], depth + 1)
                for k in ("msg", "message", "error_message", "error", "detail", "debugInfo")
                if k in value and value[k] not in (None, "", [], {})
            ),
            "",
        )
        if location is not None:
            if isinstance(location, list):
                parts = [str(p) for p in location if p not in ("body", "input")]
                location = ".".join(parts)
            return f"{location}: {text}" if text else str(location)
        return text or json.dumps(value, ensure_ascii=False)[:MAX_MESSAGE]
    return str(value)


def error_fields(body: Any) -> tuple[int | None, str]:
    """The ``error_code`` and the server's message from an error body of any known shape."""
    if not isinstance(body, dict):
        return None, _describe(body) if isinstance(body, (str, list)) else ""
    code = next(
        (c for c in (_as_int(body.get(k)) for k in ("error_code", "errorCode")) if c is not None),
        None,
    )
    parts: list[str] = []
    for key in ("error_message", "message", "error", "detail"):
        if key in body:
            text = _describe(body[key])
            if text and text not in parts:
                parts.append(text)
    return code, "; ".join(parts)


def _http_status_of_code(code: int) -> int | None:
    """The HTTP status an API error code implies (``422001`` → 422), when it has that shape."""
    if 100000 <= code <= 599999:
        status = code // 1000
        if 400 <= status <= 599:
            return status
    return None


def classify_error(
    operation: str,
    http_status: int,
    body: Any,
    *,
    retry_after: float | None = None,
    subject: str = "",
    redactor: _Redactor | None = None,
    from_api: bool = True,
) -> ProviderError:
    """The exception for an error answer (``http_status`` ≥ 300, or a 2xx carrying an error_code).

    ``from_api`` is False when the body was not a JSON object (an HTML error page, say).

    ========================  ====================  ==========================================
    answer                    submit                status / result / cancel
    ========================  ====================  ==========================================
    429                       RateLimited http_429  RateLimited http_429
    3xx (never followed)      Fatal redirect        Fatal redirect
    401, 403, 402             Fatal auth / funds    Fatal auth / funds
    403001 foreign id         JobRejected forbidden JobRejected forbidden
    400002, 10001             Fatal funds           Fatal funds
    400004, 401001            Fatal auth            Fatal auth
    404, 404001, 400001       JobRejected           JobRejected not_found
                              unknown_model
    404 page, not JSON        Fatal config          Fatal config
    408                       Transient timeout     Transient timeout
    400, 422                  JobRejected           JobRejected bad_request
                              bad_request
    other 4xx                 JobRejected http_4xx  JobRejected http_4xx
    5xx                       AmbiguousSubmit       Transient http_5xx
    2xx + unknown error_code  JobRejected api_error Transient api_error
    ========================  ====================  ==========================================
    """
    if operation not in _OPERATIONS:
        raise ValueError(f"unknown operation {operation!r}")
    redact = redactor or _Redactor("")
    code, server_text = error_fields(body)
    server_text = redact.text(server_text) if server_text else ""
    submit = operation == "submit"
    where = f"{operation} {subject}".strip()
    code_text = f", error_code {code}" if code else ""
    said = f": {server_text}" if server_text else ""
    head = f"{where}: HTTP {http_status}{code_text}{said}"
    kw: dict[str, Any] = {"status_code": http_status, "error_code": code}

    if code in _FATAL_CODES:
        error_class, meaning = _FATAL_CODES[code]
        return FatalProviderError(f"{where}: {meaning}{said}", error_class=error_class, **kw)
    if code == 403001:
        return JobRejectedError(
            f"{where}: the request id belongs to another account (403001){said}",
            error_class="forbidden",
            **kw,
        )
    status = http_status
    if 200 <= http_status < 300:
        # An error carried by a 2xx body (spec §2): its code says which HTTP error it stands for.
        derived = _http_status_of_code(code) if code else None
        if derived is None:
            message = f"{where}: the API answered HTTP {http_status} with error_code {code}{said}"
            if submit:
                return JobRejectedError(message, error_class="api_error", **kw)
            return TransientError(message, error_class="api_error", **kw)
        status = derived

    if status == 429:
        return RateLimitedError(
            f"{where}: rate limited (HTTP 429{code_text})"
            + (f", retry after {retry_after:g} s" if retry_after is not None else "")
            + said,
            retry_after=retry_after,
            error_class="http_429",
            **kw,
        )
    if 300 <= status < 400:
        return FatalProviderError(
            f"{head} — the API redirected, and redirects are never followed (they could carry "
            f"the token elsewhere); point {BASE_URL_ENV} at the final address",
            error_class="redirect",
            **kw,
        )
    if status == 401:
        return FatalProviderError(
            f"{head} — the API token was refused; check {TOKEN_ENV}", error_class="auth", **kw
        )
    if status == 403:
        return FatalProviderError(
            f"{head} — access denied; check {TOKEN_ENV} and the account", error_class="auth", **kw
        )
    if status == 402:
        return FatalProviderError(
            f"{head} — insufficient balance; top up the account", error_class="funds", **kw
        )
    if status == 404 and code is None and not from_api:
        # a 404 page that is not a JSON answer: the base URL points somewhere else — stop
        # rather than fail every job one by one
        return FatalProviderError(
            f"{head} — this does not look like the RunComfy Model API (a 404 page, not a JSON "
            f"error); check {BASE_URL_ENV}",
            error_class="config",
            **kw,
        )
    if status == 404 or code in (404001, 400001):
        if submit:
            return JobRejectedError(
                f"{head} — the API does not know this model id", error_class="unknown_model", **kw
            )
        return JobRejectedError(
            f"{head} — unknown or expired request id", error_class="not_found", **kw
        )
    if status == 408:
        return TransientError(
            f"{head} — the server timed out reading the request", error_class="timeout", **kw
        )
    if status in (400, 422):
        what = "the API rejected the parameters" if submit else "the API rejected the request"
        return JobRejectedError(f"{head} — {what}", error_class="bad_request", **kw)
    if 400 <= status < 500:
        return JobRejectedError(head, error_class="http_4xx", **kw)
    if status >= 500:
        if submit:
            return AmbiguousSubmitError(
                f"{head} — the submit may or may not have started a paid job",
                error_class="ambiguous_submit",
                **kw,
            )
        return TransientError(head, retry_after=retry_after, error_class="http_5xx", **kw)
    # 1xx or another oddity: treat like an unreadable answer
    if submit:
        return AmbiguousSubmitError(
            f"{head} — unexpected answer to a submit", error_class="ambiguous_submit", **kw
        )
    return TransientError(f"{head} — unexpected answer", error_class="schema", **kw)


def transport_error(operation: str, exc: httpx.HTTPError, *, subject: str = "") -> ProviderError:
    """The exception for a request that got no (complete) answer.

    Only errors raised before a byte of the request left are certainly harmless on a submit
    (``ConnectError``, ``ConnectTimeout``, ``PoolTimeout``, ``ProxyError``,
    ``UnsupportedProtocol``); anything later — read/write timeouts, dropped connections,
    undecodable bodies — makes a submit ambiguous. Reads and cancels are always safe to retry.
    """
    where = f"{operation} {subject}".strip()
    kind = type(exc).__name__
    detail = str(exc).strip() or "no detail"
    # httpx exception text never carries headers; still cut it (it may quote a long URL)
    detail = _Redactor("").text(detail, 160)
    if isinstance(exc, httpx.UnsupportedProtocol):
        return FatalProviderError(
            f"{where}: the base URL is not usable ({detail}); check {BASE_URL_ENV}",
            error_class="config",
        )
    if isinstance(exc, httpx.PoolTimeout):
        return TransientError(
            f"{where}: no free connection in time ({kind}); raise max_connections or lower "
            "max_in_flight",
            error_class="pool_timeout",
        )
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.ProxyError)):
        return TransientError(
            f"{where}: could not connect ({kind}: {detail})", error_class="connection"
        )
    if operation == "submit":
        return AmbiguousSubmitError(
            f"{where}: the submit went out but its answer was lost ({kind}: {detail}); it may "
            "have started a paid job",
            error_class="ambiguous_submit",
        )
    if isinstance(exc, httpx.TimeoutException):
        return TransientError(f"{where}: timed out ({kind}: {detail})", error_class="timeout")
    if isinstance(exc, httpx.DecodingError):
        return TransientError(
            f"{where}: unreadable answer ({kind}: {detail})", error_class="schema"
        )
    return TransientError(f"{where}: connection lost ({kind}: {detail})", error_class="connection")


def normalise_base_url(value: str) -> str:
    """``scheme://host[:port][/prefix]``, no trailing ``/`` or ``/v1``; else FatalProviderError."""
    try:
        url = httpx.URL(value.strip())
    except (httpx.InvalidURL, TypeError) as exc:
        raise FatalProviderError(
            f"{BASE_URL_ENV} is not a URL ({exc})", error_class="config"
        ) from exc
    if url.scheme not in ("http", "https") or not url.host:
        raise FatalProviderError(
            f"{BASE_URL_ENV} must look like https://host[:port], got {value.strip()[:100]!r}",
            error_class="config",
        )
    if url.userinfo or url.query or url.fragment:
        raise FatalProviderError(
            f"{BASE_URL_ENV} must not carry credentials, a query or a fragment",
            error_class="config",
        )
    path = url.path.rstrip("/")
    if path.endswith("/v1"):  # the official CLI's variable includes /v1; ours does not
        path = path[: -len("/v1")]
    if url.scheme == "http" and not _is_loopback(url.host):
        logger.warning(
            "%s uses plain http to %s: the API token will travel unencrypted",
            BASE_URL_ENV,
            url.host,
        )
    return str(url.copy_with(path=path or "/", query=None, fragment=None)).rstrip("/")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def model_path(model_id: str) -> str:
    """The URL path of a model id (``a/b/c`` → ``a/b/c``, each segment percent-encoded)."""
    segments = model_id.split("/")
    if (
        not model_id
        or len(model_id) > 512
        or any(s in ("", ".", "..") for s in segments)
        or re.search(r"[\x00-\x20\x7f]", model_id)
    ):
        raise JobRejectedError(
            f"submit: {model_id[:100]!r} is not a model id (slash-separated names like "
            "'google/nano-banana/pro/text-to-image')",
            error_class="bad_model_id",
        )
    return "/".join(quote(s, safe="") for s in segments)


def check_request_id(request_id: object, operation: str) -> str:
    """``request_id`` when it is safe to put in a URL, else JobRejectedError."""
    if isinstance(request_id, str) and REQUEST_ID_RE.fullmatch(request_id):
        return request_id
    shown = repr(request_id)[:60]
    raise JobRejectedError(
        f"{operation}: request id {shown} is not of the form [A-Za-z0-9_-]{{1,128}}",
        error_class="bad_request_id",
    )


def _collect_outputs(output: Any) -> list[str]:
    """Every output URI, in :data:`OUTPUT_KEYS` order then the server's, without duplicates."""
    found: list[str] = []

    def add(value: Any, depth: int = 0) -> None:
        if isinstance(value, str):
            if value.strip() and value not in found:
                found.append(value.strip())
        elif isinstance(value, list) and depth < 3:
            for item in value:
                add(item, depth + 1)
        elif isinstance(value, dict) and depth < 3:
            # fal-style {"url": ...} objects inside lists
            for key in ("url", "uri", "path"):
                if key in value:
                    add(value[key], depth + 1)

    if isinstance(output, dict):
        for key in OUTPUT_KEYS:
            if key in output:
                add(output[key])
        for key, value in output.items():
            if key not in OUTPUT_KEYS and isinstance(value, (str, list)):
                # only things that look like URIs: other keys may hold text ("seed": "123")
                if isinstance(value, str) and "://" not in value:
                    continue
                if isinstance(value, list) and not any(
                    isinstance(v, str) and "://" in v for v in value
                ):
                    continue
                add(value)
    else:
        add(output)
    return found


class RunComfyProvider(Provider):
    """RunComfy Model API client.

    :param base_url: ``scheme://host[:port]`` without ``/v1``; default env ``RUNCOMFY_BASE_URL``,
        else ``https://model-api.runcomfy.net``
    :param token: the API token; default env ``RUNCOMFY_API_TOKEN`` (missing → FatalProviderError)
    :param timeout: seconds per connect/read/write/pool wait, or an ``httpx.Timeout``
    :param max_connections: connection pool size; size it to the run's concurrency
    :param include_cost: ask ``/result`` for ``cost`` (``?include_cost=true``)
    :param keepalive_expiry: seconds an idle connection is kept for reuse
    :param transport: an httpx transport to use instead of the network (tests)
    """

    name = "runcomfy"

    def __init__(
        self,
        base_url: str | None = None,
        token: str | None = None,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        include_cost: bool = True,
        keepalive_expiry: float = DEFAULT_KEEPALIVE_EXPIRY,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        raw_token = token if token is not None else os.environ.get(TOKEN_ENV, "")
        secret = raw_token.strip()
        if not secret:
            raise FatalProviderError(
                f"{TOKEN_ENV} is not set: export your RunComfy API token "
                f"(export {TOKEN_ENV}=...) or use `provider: simulator` for a dry run",
                error_class="auth",
            )
        if not re.fullmatch(r"[\x21-\x7e]+", secret):
            raise FatalProviderError(
                f"{TOKEN_ENV} contains spaces or characters that cannot go in an HTTP header; "
                "copy the token again",
                error_class="auth",
            )
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {max_connections}")
        self.base_url = normalise_base_url(
            base_url if base_url is not None else os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
        )
        self.include_cost = include_cost
        self._redact = _Redactor(secret)
        if not isinstance(timeout, httpx.Timeout):
            timeout = httpx.Timeout(timeout, connect=min(timeout, 10.0))
        self._client = httpx.AsyncClient(
            headers={
                "Authorization": f"Bearer {secret}",
                "Accept": "application/json",
                "User-Agent": f"batchgen/{__version__}",
            },
            timeout=timeout,
            limits=httpx.Limits(
                max_connections=max_connections,
                max_keepalive_connections=max_connections,
                keepalive_expiry=keepalive_expiry,
            ),
            follow_redirects=False,
            transport=transport,
        )
        self._closed = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    # -- the four endpoints ------------------------------------------------------------------

    async def submit(self, model_id: str, params: dict[str, Any]) -> Submission:
        """POST the params as the body; AmbiguousSubmitError when the answer was lost."""
        path = f"/v1/models/{model_path(model_id)}"
        try:
            content = json.dumps(
                params, ensure_ascii=False, separators=(",", ":"), allow_nan=False
            ).encode()
        except (TypeError, ValueError) as exc:
            raise JobRejectedError(
                f"submit {model_id}: the parameters are not valid JSON ({exc})",
                error_class="bad_request",
            ) from exc
        http_status, _, body = await self._call("submit", "POST", path, model_id, content=content)
        if not isinstance(body, dict):
            raise AmbiguousSubmitError(
                f"submit {model_id}: HTTP {http_status} with an unreadable body; it may have "
                "started a paid job",
                status_code=http_status,
                error_class="ambiguous_submit",
            )
        request_id = body.get("request_id")
        if isinstance(request_id, int) and not isinstance(request_id, bool):
            request_id = str(request_id)
        if not (isinstance(request_id, str) and REQUEST_ID_RE.fullmatch(request_id)):
            shown = self._redact.text(repr(request_id), 60)
            raise AmbiguousSubmitError(
                f"submit {model_id}: HTTP {http_status} without a usable request_id "
                f"(got {shown}); it may have started a paid job",
                status_code=http_status,
                error_class="ambiguous_submit",
            )
        # informational only (never requested); cut so a hostile answer cannot bloat the state
        urls = {k: _str_or_none(body.get(k)) for k in ("status_url", "result_url", "cancel_url")}
        return Submission(
            request_id=request_id, **{k: v[:2048] if v else v for k, v in urls.items()}
        )

    async def status(self, request_id: str) -> RemoteStatus:
        """GET /status; ``completed`` is not success — read the result to know."""
        rid = check_request_id(request_id, "status")
        http_status, _, body = await self._call("status", "GET", f"/v1/requests/{rid}/status", rid)
        if not isinstance(body, dict):
            raise self._schema_error("status", rid, http_status, "the body is not a JSON object")
        word = _normalise_word(body.get("status"))
        status = _STATUS_WORDS.get(word or "")
        if status is None:
            shown = self._redact.text(repr(body.get("status")), 60)
            raise self._schema_error("status", rid, http_status, f"unknown status {shown}")
        if status == STATUS_SUCCEEDED:
            status = STATUS_COMPLETED
        position = _as_int(body.get("queue_position"))
        return RemoteStatus(
            status=status, queue_position=position if status == STATUS_IN_QUEUE else None
        )

    async def result(self, request_id: str) -> RemoteResult:
        """GET /result (with ``include_cost``); answers with the current state while running."""
        rid = check_request_id(request_id, "result")
        query = {"include_cost": "true"} if self.include_cost else None
        http_status, _, body = await self._call(
            "result", "GET", f"/v1/requests/{rid}/result", rid, params=query
        )
        if not isinstance(body, dict):
            raise self._schema_error("result", rid, http_status, "the body is not a JSON object")
        output = body.get("output")
        outputs = _collect_outputs(output) if output is not None else []
        error = body.get("error")
        has_error = error not in (None, "", [], {})
        word = _normalise_word(body.get("status"))
        if word is None and output is not None:
            status: str | None = STATUS_SUCCEEDED  # no status word but outputs: it is done
        else:
            status = _STATUS_WORDS.get(word or "")
        if status is None:
            shown = self._redact.text(repr(body.get("status")), 60)
            raise self._schema_error("result", rid, http_status, f"unknown status {shown}")
        if status == STATUS_COMPLETED:
            # /status vocabulary on /result: the error field and outputs tell the outcome
            status = STATUS_FAILED if has_error and not outputs else STATUS_SUCCEEDED
        if status == STATUS_FAILED and not has_error:
            _, text = error_fields({k: body.get(k) for k in ("error_message", "message", "detail")})
            error = text or None
        if isinstance(error, str):
            # shown to users as the job's reason: one clean line of bounded length
            error = self._redact.text(error, MAX_ERROR_TEXT)
        return RemoteResult(
            status=status,
            outputs=outputs,
            error=error,
            created_at=_str_or_none(body.get("created_at")),
            finished_at=_str_or_none(body.get("finished_at")),
            cost=_as_float(body.get("cost")),
            raw=body,
        )

    async def cancel(self, request_id: str) -> CancelOutcome:
        """POST /cancel; ``not_cancellable`` once the request runs (that is not an error)."""
        rid = check_request_id(request_id, "cancel")
        _, _, body = await self._call("cancel", "POST", f"/v1/requests/{rid}/cancel", rid)
        data = body if isinstance(body, dict) else {}
        word = _normalise_word(data.get("status"))
        status = _STATUS_WORDS.get(word or "", word or "unknown")
        outcome = _normalise_word(data.get("outcome"))
        if not outcome:
            outcome = "cancelled" if status == STATUS_CANCELLED else "requested"
        if status == STATUS_SUCCEEDED:
            status = STATUS_COMPLETED
        return CancelOutcome(
            outcome=self._redact.text(outcome, 60), status=self._redact.text(status, 60)
        )

    async def aclose(self) -> None:
        """Close the connection pool (idempotent)."""
        if not self._closed:
            self._closed = True
            await self._client.aclose()

    # -- plumbing ------------------------------------------------------------------------------

    async def _call(
        self,
        operation: str,
        method: str,
        path: str,
        subject: str,
        *,
        content: bytes | None = None,
        params: Mapping[str, str] | None = None,
    ) -> tuple[int, httpx.Headers, Any]:
        """Send one request; return (status, headers, parsed JSON or None) of a 2xx, else raise."""
        if self._closed:
            raise TransientError(
                f"{operation} {subject}: the provider is closed", error_class="closed"
            )
        headers = {"Content-Type": "application/json"} if content is not None else None
        started = time.perf_counter()
        try:
            async with self._client.stream(
                method, self.base_url + path, content=content, params=params, headers=headers
            ) as response:
                raw, complete = await _read_capped(response, MAX_BODY)
        except httpx.HTTPError as exc:
            logger.debug("%s %s failed: %s", method, path, type(exc).__name__)
            raise transport_error(operation, exc, subject=subject) from exc
        logger.debug(
            "%s %s -> %d in %.3fs",
            method,
            path,
            response.status_code,
            time.perf_counter() - started,
        )
        body = _parse_json(raw) if complete else None
        if body is not None and self._redact.found_in(raw):
            body = self._redact.json(body)
        from_api = isinstance(body, dict)
        if body is None and raw and not (200 <= response.status_code < 300):
            # a non-JSON error page: its text is the message
            body = {"message": raw[:4096].decode("utf-8", "replace")}
        code = error_fields(body)[0] if isinstance(body, dict) else None
        if response.status_code >= 300 or response.status_code < 200 or code:
            raise classify_error(
                operation,
                response.status_code,
                body,
                retry_after=parse_retry_after(response.headers.get("Retry-After")),
                subject=subject,
                redactor=self._redact,
                from_api=from_api,
            )
        return response.status_code, response.headers, body

    def _schema_error(
        self, operation: str, subject: str, http_status: int, what: str
    ) -> TransientError:
        return TransientError(
            f"{operation} {subject}: HTTP {http_status} but {what}",
            status_code=http_status,
            error_class="schema",
        )


async def _read_capped(response: httpx.Response, limit: int) -> tuple[bytes, bool]:
    """Up to ``limit`` bytes of the body, and whether that was all of it."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return b"".join(chunks)[:limit], False
    return b"".join(chunks), True


def _parse_json(raw: bytes) -> Any:
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None
