"""The provider interface: what the runner needs from a hosted image-model API.

A provider speaks one remote queue protocol (submit → status/result → cancel) and turns every
answer into one of the dataclasses below or one exception of :mod:`batchgen.errors`. Invariants:

- Classification happens here, once: the runner decides by exception type only (retry
  ``TransientError``, fail the job ``JobRejectedError``, park ``AmbiguousSubmitError``, stop
  ``FatalProviderError`` — all from :mod:`batchgen.errors`).
- A remote job that *finished badly* is data, not an exception: ``RemoteResult(status="failed")``.
- Status words are normalised to the small vocabularies documented on each field, whatever
  synonyms the server used (``succeeded``/``completed``, ``canceled``/``cancelled``, ...).
- Nothing here ever holds or prints the API token.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Self

#: RemoteStatus.status values
STATUS_IN_QUEUE: Final = "in_queue"
STATUS_IN_PROGRESS: Final = "in_progress"
STATUS_COMPLETED: Final = "completed"
STATUS_CANCELLED: Final = "cancelled"
STATUS_FAILED: Final = "failed"
#: RemoteResult.status adds this one (the /result vocabulary says ``succeeded``, not ``completed``)
STATUS_SUCCEEDED: Final = "succeeded"

RUNNING_STATUSES: Final = frozenset({STATUS_IN_QUEUE, STATUS_IN_PROGRESS})


@dataclass(frozen=True, slots=True)
class Submission:
    """The answer to a submit: the remote request id, plus the URLs the server advertised.

    The URLs are informational only: providers build every follow-up URL from ``request_id``
    and their own base URL, so a hostile answer cannot send the token to another host.
    """

    request_id: str
    status_url: str | None = None
    result_url: str | None = None
    cancel_url: str | None = None


@dataclass(frozen=True, slots=True)
class RemoteStatus:
    """Where a remote request stands, from the status endpoint.

    ``status`` is one of ``in_queue``, ``in_progress``, ``completed``, ``cancelled``, ``failed``.
    ``completed`` does not mean success: only :class:`RemoteResult` tells success from failure.
    """

    status: str
    queue_position: int | None = None

    @property
    def done(self) -> bool:
        """True once the request will not change any more (read the result next)."""
        return self.status not in RUNNING_STATUSES

    @property
    def running(self) -> bool:
        """True while the request is queued or running remotely."""
        return self.status in RUNNING_STATUSES


@dataclass(frozen=True, slots=True)
class RemoteResult:
    """The result endpoint's answer (it also answers while the request is still running).

    ``status`` is one of ``in_queue``, ``in_progress``, ``succeeded``, ``failed``, ``cancelled``.
    ``outputs`` lists every output URI in a stable order without duplicates (``image``,
    ``images[]``, ``video``, ``videos[]``, ``url``, ``path``, ``audio``, then any other key);
    URIs are not vetted here — the downloader refuses what is not http(s), with a reason.
    """

    status: str
    outputs: list[str] = field(default_factory=list)
    error: Any = None
    created_at: str | None = None
    finished_at: str | None = None
    cost: float | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        """True once the request is over (succeeded, failed or cancelled)."""
        return self.status not in RUNNING_STATUSES

    @property
    def running(self) -> bool:
        """True while the request is queued or running remotely."""
        return self.status in RUNNING_STATUSES

    @property
    def succeeded(self) -> bool:
        """True when the request finished and produced its outputs."""
        return self.status == STATUS_SUCCEEDED


@dataclass(frozen=True, slots=True)
class CancelOutcome:
    """What a cancel achieved.

    ``outcome`` is ``cancelled`` (it will not run), ``not_cancellable`` (already running or over),
    ``requested`` (the server took note but did not say which) or the server's own word.
    ``status`` is the request's status after the call, normalised like :class:`RemoteStatus`.
    """

    outcome: str
    status: str


class Provider(ABC):
    """A remote image-generation queue: submit, poll, fetch the result, cancel.

    Use as ``async with provider:`` or call :meth:`aclose` when done; it owns network
    connections (and, for the simulator provider, a whole server).
    """

    #: registry name ("runcomfy", "simulator", ...)
    name: str = "provider"

    @abstractmethod
    async def submit(self, model_id: str, params: dict[str, Any]) -> Submission:
        """Start one paid generation of ``model_id`` with ``params`` as the request body."""

    @abstractmethod
    async def status(self, request_id: str) -> RemoteStatus:
        """Where the request stands."""

    @abstractmethod
    async def result(self, request_id: str) -> RemoteResult:
        """The request's result, or its current state while it still runs."""

    @abstractmethod
    async def cancel(self, request_id: str) -> CancelOutcome:
        """Ask the server to drop a queued request (a no-op once it runs)."""

    @abstractmethod
    async def aclose(self) -> None:
        """Release connections and anything else the provider started."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
