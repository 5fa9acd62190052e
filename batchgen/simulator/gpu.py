"""The virtual GPU pool: ``workers`` requests run at once, the rest wait in a FIFO queue.

Event-driven: a request starts when it is submitted to a free worker or when a running one
finishes (one ``loop.call_later`` per running request); nothing polls. All methods run on the
server's event loop thread. Invariants:

- at most ``workers`` requests are ``in_progress``; a worker is never idle while one is queued;
- ``queue_position(r)`` is the number of queued requests ahead of ``r`` (0 = next to start), kept
  exact under cancellations by a Fenwick tree over queue sequence numbers (O(log n) per call);
- a request's run time and its outcome (``will_fail``) are fixed at submit from the seeded RNG.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from .images import ImageKey


class RequestState(StrEnum):
    """Where a simulated request is, in the words of ``/result``."""

    #: waiting for a worker
    QUEUED = "in_queue"
    #: running on a worker
    RUNNING = "in_progress"
    #: finished with output
    SUCCEEDED = "succeeded"
    #: finished without output (the ``job_failure`` fault)
    FAILED = "failed"
    #: cancelled while queued
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """Whether the request will not change any more."""
        return self in (RequestState.SUCCEEDED, RequestState.FAILED, RequestState.CANCELLED)


def wall_clock() -> str:
    """Now as the API writes timestamps: ISO-8601 with microseconds and offset."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


@dataclass(slots=True, eq=False)
class SimRequest:
    """One simulated request: what was asked, its fate, and when things happened to it."""

    request_id: str
    model_id: str
    params: dict[str, Any]
    body_sha256: str
    run_seconds: float
    will_fail: bool
    images: list[ImageKey]
    cost: float
    created_at: str = field(default_factory=wall_clock)
    finished_at: str | None = None
    state: RequestState = RequestState.QUEUED
    #: monotonic times (``time.monotonic``)
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    first_terminal_status: float | None = None
    first_terminal_result: float | None = None
    #: position in the queue's sequence (set when enqueued)
    seq: int = -1


class _Fenwick:
    """Counts of queued requests by sequence number; prefix sums in O(log n); grows on demand."""

    def __init__(self, size: int = 1024) -> None:
        self._size = size
        self._tree = [0] * (size + 1)
        self._values = [0] * size

    def add(self, index: int, delta: int) -> None:
        while index >= self._size:
            self._grow()
        self._values[index] += delta
        i = index + 1
        while i <= self._size:
            self._tree[i] += delta
            i += i & -i

    def prefix(self, index: int) -> int:
        """Sum of the counts at positions ``0 .. index - 1``."""
        i = min(index, self._size)
        total = 0
        while i > 0:
            total += self._tree[i]
            i -= i & -i
        return total

    def _grow(self) -> None:
        values = self._values + [0] * self._size
        self._size *= 2
        self._values = values
        tree = [0] * (self._size + 1)
        for i, value in enumerate(values, start=1):
            if value:
                j = i
                while j <= self._size:
                    tree[j] += value
                    j += j & -j
        self._tree = tree


class GpuPool:
    """Runs requests on ``workers`` virtual GPUs; calls ``on_finish`` as each one ends."""

    def __init__(
        self,
        workers: int,
        on_start: Callable[[SimRequest], None] | None = None,
        on_finish: Callable[[SimRequest], None] | None = None,
    ) -> None:
        self.workers = workers
        self.running = 0
        self.queued = 0
        self._queue: deque[SimRequest] = deque()
        self._queued_seqs = _Fenwick()
        self._next_seq = 0
        self._on_start = on_start
        self._on_finish = on_finish
        self._timers: set[asyncio.TimerHandle] = set()

    def submit(self, request: SimRequest) -> None:
        """Start ``request`` on a free worker, or queue it behind the others."""
        if self.running < self.workers and not self.queued:
            self._start(request)
            return
        request.seq = self._next_seq
        self._next_seq += 1
        self._queued_seqs.add(request.seq, 1)
        self._queue.append(request)
        self.queued += 1

    def queue_position(self, request: SimRequest) -> int | None:
        """Requests ahead of ``request`` in the queue (0 = next), None when it is not queued."""
        if request.state is not RequestState.QUEUED:
            return None
        return self._queued_seqs.prefix(request.seq)

    def cancel(self, request: SimRequest) -> bool:
        """Cancel ``request`` if it is still queued; True when it was."""
        if request.state is not RequestState.QUEUED:
            return False
        request.state = RequestState.CANCELLED
        request.finished = time.monotonic()
        request.finished_at = wall_clock()
        self._queued_seqs.add(request.seq, -1)
        self.queued -= 1
        # The deque keeps the cancelled entry; _start_next skips it (O(1) cancel).
        return True

    def close(self) -> None:
        """Cancel every pending timer (the server is stopping)."""
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()

    def _start(self, request: SimRequest) -> None:
        self.running += 1
        request.state = RequestState.RUNNING
        request.started = time.monotonic()
        if self._on_start:
            self._on_start(request)
        loop = asyncio.get_running_loop()
        timer: asyncio.TimerHandle | None = None

        def finish() -> None:
            assert timer is not None
            self._timers.discard(timer)
            self._finish(request)

        timer = loop.call_later(request.run_seconds, finish)
        self._timers.add(timer)

    def _finish(self, request: SimRequest) -> None:
        self.running -= 1
        request.state = RequestState.FAILED if request.will_fail else RequestState.SUCCEEDED
        request.finished = time.monotonic()
        request.finished_at = wall_clock()
        if self._on_finish:
            self._on_finish(request)
        self._start_next()

    def _start_next(self) -> None:
        while self._queue and self.running < self.workers:
            request = self._queue.popleft()
            if request.state is not RequestState.QUEUED:
                continue  # cancelled while waiting
            self._queued_seqs.add(request.seq, -1)
            self.queued -= 1
            self._start(request)
