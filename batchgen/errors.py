"""Every exception batchgen raises on purpose, in one tree.

::

    BatchgenError
    ├── ManifestError            bad manifest or usage: file, line, key; exit code 2
    ├── PlanTooLargeError        the size guard tripped (a ManifestError)
    ├── StoreError               the state database cannot be used
    │   ├── StateLockedError     another runner holds this state
    │   └── TransitionError      a state change the job's current state does not allow
    ├── ProviderError            anything the remote API said or failed to say
    │   ├── TransientError       retry later: 429, 5xx on reads, connection not made
    │   │   └── RateLimitedError 429 (carries ``retry_after`` when the server sent one)
    │   ├── AmbiguousSubmitError a submit may or may not have been accepted: park it,
    │   │                        never resubmit it blindly
    │   ├── JobRejectedError     this job cannot succeed: 400/422 on the body, a ``failed`` result,
    │   │                        an unknown or expired request id
    │   └── FatalProviderError   stop the whole run: bad token, no funds, account disabled;
    │                            exit code 3
    ├── DownloadError            an output could not be fetched or stored
    │   └── ExpiredURLError      the output URI is gone (403/404/410): fetch the result again
    ├── ExportError              (export.py) the dataset files cannot be written; exit code 2
    └── GridError                (grid.py) a contact sheet cannot be drawn as asked; exit code 2

The classification is made once, where the error is born (providers/, download), so that the
runner only decides by type: retry, fail the job, park it, or stop.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


class BatchgenError(Exception):
    """Base class of every error batchgen raises on purpose."""

    #: process exit code when this error ends a command
    exit_code = 1


@dataclass(frozen=True)
class ManifestIssue:
    """One problem found in a manifest, located as precisely as we can."""

    file: str
    line: int | None
    key: str
    message: str
    #: how many jobs the same problem hits (validation aggregates identical problems)
    count: int = 1

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        hits = f" ({self.count} jobs)" if self.count > 1 else ""
        key = f"{self.key}: " if self.key else ""
        return f"{where}: {key}{self.message}{hits}"


class ManifestError(BatchgenError):
    """The manifest (or a file it names) is wrong; nothing has been spent."""

    exit_code = 2

    def __init__(self, issues: ManifestIssue | Iterable[ManifestIssue]) -> None:
        self.issues: list[ManifestIssue] = (
            [issues] if isinstance(issues, ManifestIssue) else list(issues)
        )
        super().__init__("\n".join(str(i) for i in self.issues))

    @classmethod
    def at(cls, file: str | Path, line: int | None, key: str, message: str) -> ManifestError:
        """Shorthand for a single located issue."""
        return cls(ManifestIssue(str(file), line, key, message))


class PlanTooLargeError(ManifestError):
    """The manifest expands past the size guard (``limits.max_jobs``)."""


class StoreError(BatchgenError):
    """The state database cannot be opened, migrated or written."""


class StateLockedError(StoreError):
    """Another ``batchgen run`` holds this state database."""

    exit_code = 2


class TransitionError(StoreError):
    """A job was asked to move to a state its current state does not lead to."""


class ProviderError(BatchgenError):
    """The remote API answered with an error, or did not answer.

    :param message: what happened, safe to show (never contains the token)
    :param status_code: the HTTP status, when there was a response
    :param error_code: the API's numeric ``error_code``, when it sent one
    :param job_id: the batchgen job concerned, when known
    """

    #: a short stable name used to group errors in the summary ("http_429", "timeout", ...)
    error_class = "provider_error"

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        error_code: int | None = None,
        error_class: str | None = None,
        job_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.error_code = error_code
        self.job_id = job_id
        if error_class:
            self.error_class = error_class


class TransientError(ProviderError):
    """Safe to try again later: the request did not take effect."""

    error_class = "transient"

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.retry_after = retry_after


class RateLimitedError(TransientError):
    """HTTP 429: the whole run should slow down, not just this job."""

    error_class = "rate_limited"


class AmbiguousSubmitError(ProviderError):
    """A paid submit went out but its answer was lost: it may have created a job."""

    error_class = "ambiguous_submit"


class JobRejectedError(ProviderError):
    """This job cannot succeed as it is; fail it with the reason and go on."""

    error_class = "rejected"


class FatalProviderError(ProviderError):
    """Nothing will succeed until the user acts (token, funds, account): stop the run."""

    error_class = "fatal"
    exit_code = 3


class DownloadError(BatchgenError):
    """An output URI could not be fetched or written."""

    error_class = "download_failed"

    def __init__(
        self, message: str, *, uri: str | None = None, error_class: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.uri = uri
        if error_class:
            self.error_class = error_class


class ExpiredURLError(DownloadError):
    """The URI answered 403/404/410: ask the API for the result again for a fresh one."""

    error_class = "url_expired"
