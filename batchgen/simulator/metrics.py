"""What the simulator counts, for tests and benchmarks (``GET /_simulator/metrics``).

Every update is O(1) amortised and runs on the server's event loop thread; a snapshot is built
on that thread too. Invariants:

- every HTTP call to an API endpoint or a file is counted once, when it arrives, whatever its
  answer (faults included); ``/_simulator/*`` calls are never counted;
- ``max_calls_per_second`` is a **sliding**-window maximum: the largest number of calls whose
  arrival times fall in any half-open interval ``(t - 1 s, t]``, over every ``t`` since the last
  reset (it is enough to look at the instants calls arrive, which is what is done);
- ``per_second`` is the same calls in **fixed** 1-second buckets from the last reset (bucket ``i``
  covers ``[i, i + 1)`` seconds after it);
- a reset clears counters, windows, peaks, the duplicate-submit table, delays and the file table;
  it does not touch requests (their states and timelines live on).
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from typing import Any

#: endpoint names used as keys everywhere in the metrics
ENDPOINTS = ("submit", "status", "result", "cancel", "file", "other")


class _Delays:
    """Count, mean and max of a stream of durations."""

    __slots__ = ("count", "max", "total")

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.max = 0.0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.total += seconds
        self.max = max(self.max, seconds)

    def as_dict(self) -> dict[str, float | int | None]:
        mean = self.total / self.count if self.count else None
        return {
            "count": self.count,
            "mean": None if mean is None else round(mean, 6),
            "max": round(self.max, 6) if self.count else None,
        }


class Metrics:
    """Counters of one simulator since its start or last reset."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.reset()

    def reset(self) -> None:
        """Start counting afresh (see the module docstring for what survives)."""
        self.reset_at = time.monotonic()
        self.total = 0
        self.by_endpoint: dict[str, dict[str, int]] = {name: {} for name in ENDPOINTS}
        self._windows: dict[str, deque[float]] = {name: deque() for name in (*ENDPOINTS, "all")}
        self.max_per_second: dict[str, int] = {name: 0 for name in (*ENDPOINTS, "all")}
        self.per_second: dict[str, list[int]] = {name: [] for name in (*ENDPOINTS, "all")}
        self.in_flight = getattr(self, "in_flight", 0)
        self.peak_in_flight = self.in_flight
        self.faults: dict[str, int] = defaultdict(int)
        self.submits = 0
        self._bodies: dict[str, list[str]] = {}
        self.unfinished = getattr(self, "unfinished", 0)
        self.peak_unfinished = self.unfinished
        self.notice = _Delays()
        self.result_notice = _Delays()
        self.files: dict[str, dict[str, Any]] = {}
        self.file_requests = 0
        self.file_bytes = 0
        self.file_requests_with_authorization = 0

    # calls ---------------------------------------------------------------------------------

    def call_started(self, endpoint: str) -> None:
        """A call to ``endpoint`` arrived."""
        now = time.monotonic()
        self.total += 1
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        second = int(now - self.reset_at)
        for name in (endpoint, "all"):
            window = self._windows[name]
            window.append(now)
            edge = now - 1.0
            while window[0] <= edge:
                window.popleft()
            if len(window) > self.max_per_second[name]:
                self.max_per_second[name] = len(window)
            series = self.per_second[name]
            if len(series) <= second:
                series.extend([0] * (second + 1 - len(series)))
            series[second] += 1

    def call_finished(self, endpoint: str, status: str) -> None:
        """The call to ``endpoint`` ended with ``status`` (an HTTP code, or ``dropped``)."""
        self.in_flight -= 1
        codes = self.by_endpoint[endpoint]
        codes[status] = codes.get(status, 0) + 1

    def fault(self, name: str) -> None:
        """A fault fired."""
        self.faults[name] += 1

    # jobs ----------------------------------------------------------------------------------

    def submitted(self, body_sha256: str, request_id: str) -> None:
        """A submit created a request (whether or not its answer reached the client)."""
        self.submits += 1
        self.unfinished += 1
        self.peak_unfinished = max(self.peak_unfinished, self.unfinished)
        self._bodies.setdefault(body_sha256, []).append(request_id)

    def finished(self) -> None:
        """A request left the pool (done, failed or cancelled)."""
        self.unfinished -= 1

    def noticed(self, delay: float, *, via_result: bool, first: bool) -> None:
        """A status/result call saw a finished request for the first time (by that route)."""
        if first:
            self.notice.add(delay)
        if via_result:
            self.result_notice.add(delay)

    # files ---------------------------------------------------------------------------------

    def file_served(
        self,
        path: str,
        sha256: str,
        size: int,
        content_type: str,
        *,
        authorized: bool,
        truncated: bool,
    ) -> None:
        """A file was requested and (at least partly) sent."""
        self.file_requests += 1
        if authorized:
            self.file_requests_with_authorization += 1
        entry = self.files.get(path)
        if entry is None:
            entry = self.files[path] = {
                "sha256": sha256,
                "bytes": size,
                "content_type": content_type,
                "downloads": 0,
                "truncated": 0,
            }
        if truncated:
            entry["truncated"] += 1
        else:
            entry["downloads"] += 1
            self.file_bytes += size

    # snapshot ------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The counters as JSON-able data (see the README for every field)."""
        now = time.monotonic()
        duplicates = [
            {"body_sha256": digest, "count": len(ids), "request_ids": list(ids)}
            for digest, ids in self._bodies.items()
            if len(ids) > 1
        ]
        return {
            "uptime_seconds": round(now - self.started, 6),
            "since_reset_seconds": round(now - self.reset_at, 6),
            "calls": {
                "total": self.total,
                "by_endpoint": {name: dict(codes) for name, codes in self.by_endpoint.items()},
            },
            "max_calls_per_second": dict(self.max_per_second),
            "per_second": {name: list(series) for name, series in self.per_second.items()},
            "in_flight": {"now": self.in_flight, "peak": self.peak_in_flight},
            "faults": dict(self.faults),
            "submits": {
                "total": self.submits,
                "distinct_bodies": len(self._bodies),
                "duplicate_submits": self.submits - len(self._bodies),
                "duplicates": duplicates,
            },
            "unfinished_jobs": {"now": self.unfinished, "peak": self.peak_unfinished},
            "notice_delay": self.notice.as_dict(),
            "result_notice_delay": self.result_notice.as_dict(),
            "files": {
                "requests": self.file_requests,
                "bytes": self.file_bytes,
                "with_authorization": self.file_requests_with_authorization,
                "by_path": {path: dict(entry) for path, entry in self.files.items()},
            },
        }
