"""Fault draws and the per-token rate limit, from seeded random streams.

Each kind of draw has its own ``random.Random`` derived from the seed, so that (for a given
order of calls) adding polling calls does not change which jobs fail, and a run is reproducible.
Invariants:

- at most one per-call fault fires per API call (one uniform draw against the cumulative
  probabilities, in the order of ``PER_CALL_FAULTS``); a fault with probability 0 never fires
  and consumes no draw of any other stream;
- the rate limit admits a call when fewer than ``floor(rate_limit_rps)`` calls of the same token
  were admitted in the last second (sliding window; below 1/s, one call per ``1/rate`` s);
  refused calls do not count against the window, and their ``Retry-After`` is the whole
  seconds until the oldest admitted call leaves it.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque

from .config import PER_CALL_FAULTS, Faults


def retry_after_header(seconds: float) -> str:
    """``Retry-After`` value: whole seconds when whole (the RFC form), else a decimal."""
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"


class FaultInjector:
    """Decides, call by call, which fault (if any) the simulator plays."""

    def __init__(self, faults: Faults, seed: int) -> None:
        self.faults = faults
        self._calls = random.Random(f"{seed}:calls")
        self._jobs = random.Random(f"{seed}:jobs")
        self._files = random.Random(f"{seed}:files")
        self._submits = random.Random(f"{seed}:submits")
        self._per_call = [
            (name, getattr(faults, name)) for name in PER_CALL_FAULTS if getattr(faults, name) > 0
        ]
        self._windows: dict[str, deque[float]] = {}

    def call_fault(self) -> str | None:
        """The per-call fault to play on this API call, or None."""
        if not self._per_call:
            return None
        draw = self._calls.random()
        edge = 0.0
        for name, probability in self._per_call:
            edge += probability
            if draw < edge:
                return name
        return None

    def job_fails(self) -> bool:
        """Whether a new job will end ``failed``."""
        p = self.faults.job_failure
        return p > 0 and self._jobs.random() < p

    def submit_lost(self) -> bool:
        """Whether this submit's answer is lost after the job was created."""
        p = self.faults.lost_submit
        return p > 0 and self._submits.random() < p

    def download_truncated(self) -> bool:
        """Whether this download is cut off halfway."""
        p = self.faults.truncated_download
        return p > 0 and self._files.random() < p

    def rate_limited(self, token: str) -> float | None:
        """None when a call of ``token`` is admitted now, else the Retry-After seconds."""
        limit = self.faults.rate_limit_rps
        if limit is None:
            return None
        # Below 1/s the window stretches to 1/limit seconds with room for one call, so that the
        # long-run rate is still the limit; at or above 1/s it is one second, holding floor(limit).
        span, room = (1.0, math.floor(limit)) if limit >= 1 else (1.0 / limit, 1)
        now = time.monotonic()
        window = self._windows.setdefault(token, deque())
        edge = now - span
        while window and window[0] <= edge:
            window.popleft()
        if len(window) < room:
            window.append(now)
            return None
        return float(max(1, math.ceil(window[0] + span - now)))
