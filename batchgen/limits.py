"""How fast batchgen may talk to the API: two rate meters, a concurrency cap and a run-wide brake.

A :class:`RateLimiter` holds

- a **submit meter** (``submits_per_minute``: paid POSTs only),
- a **request meter** (``requests_per_second``: every API call — submit, result, status, cancel),
- the **in-flight cap** (``max_in_flight``: requests submitted and not yet finished remotely),
- a **brake** shared by the whole run: after a 429 every caller waits (``Retry-After`` when the
  server sent one, exponential backoff with jitter when not) and the meters run slower, recovering
  gradually as calls succeed again.

Invariants (what tests and benchmark T3 check):

- A meter never grants more than ``ceil(rate * 1 s)`` permits in any 1-second window, whatever
  the event loop's timing (a sliding-window log of grant times enforces it), so a server counting
  calls in 1-second windows sees at most the limit, plus one at window edges.
- With steady demand a meter grants ``rate`` permits per second on average: permits are spaced
  ``1/rate`` apart on a *reserved* timeline, so a late wake-up of the event loop is caught up on
  (within one interval) instead of being lost. Nothing is granted in bursts.
- Waiters of one meter are served in arrival order (an ``asyncio.Lock`` is FIFO).
- Both meters take an injected ``clock`` and ``sleep``, so tests run on a fake clock.

Why not a token bucket with a large burst: a bucket that has filled up while idle lets ``burst``
calls out at once, which a per-second limit on the server counts as a violation.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

#: the sliding window a meter's hard cap applies to, in seconds (servers count per second)
WINDOW = 1.0
#: a grant leaves the window this much after a full WINDOW: float sums of 1/rate must never
#: let ``cap + 1`` grants into one window
EPSILON = 1e-6
#: after a 429 the meters run at this fraction of their rate, halved again per repeated 429 ...
SLOW_FACTOR = 0.5
#: ... but never slower than this fraction
MIN_FACTOR = 1 / 32
#: each successful call gives back this much of the rate (25 successes from half speed to full)
RECOVERY_STEP = 0.02
#: recovery slows down 50-fold from this fraction of the last refused rate
PROBE_FROM = 0.9
#: the meters are slowed at most once per this many seconds: a burst of 429s (or a server that
#: refuses a share of calls at random) is one signal, not a collapse to the slowest rate
THROTTLE_SPACING = 0.5
#: a learned rate this many times its reference is dropped: the meter is unlimited again
LEARNED_RELEASE = 16.0
#: consecutive successes that forgive one level of backoff
FORGIVE_AFTER = 3
#: backoff without Retry-After: BACKOFF_BASE × 2^(level-1), capped, times a jitter in [0.5, 1)
BACKOFF_BASE = 1.0
BACKOFF_CAP = 60.0
#: a Retry-After longer than this is clamped (a hostile or buggy server must not park us forever)
RETRY_AFTER_CAP = 300.0


def _check_rate(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a number above 0, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


class RateMeter:
    """At most ``rate`` permits a second, evenly spaced, at most ``ceil(rate)`` in any window.

    :param rate: permits per second; ``None`` means unlimited (until :meth:`throttle` learns a rate)
    :param clock: monotonic seconds
    """

    def __init__(self, rate: float | None, *, clock: Clock = time.monotonic) -> None:
        self.base_rate = _check_rate("rate", rate)
        self._clock = clock
        #: multiplier of ``base_rate``: lowered by throttle(), raised by recover()
        self.factor = 1.0
        #: True when ``base_rate`` was learned from a 429 rather than configured
        self.learned = False
        #: the rate the server last refused (calls in the second before its 429), if any
        self.ceiling: float | None = None
        #: theoretical time of the next permit on the reserved timeline
        self._tat = -math.inf
        #: grant times inside the last WINDOW seconds (also used to measure the current rate)
        self._log: deque[float] = deque()
        #: FIFO queue of callers; the limiter holds it while a caller waits for its turn
        self.lock = asyncio.Lock()

    @property
    def rate(self) -> float | None:
        """The rate in force now (permits per second), ``None`` when unlimited."""
        if self.base_rate is None:
            return None
        return self.base_rate * self.factor

    def _prune(self, now: float) -> None:
        while self._log and self._log[0] < now - WINDOW - EPSILON:
            self._log.popleft()

    def observed(self, now: float | None = None) -> int:
        """Permits granted in the last second."""
        self._prune(self._clock() if now is None else now)
        return len(self._log)

    def wait_time(self, now: float) -> float:
        """Seconds until a permit could be granted (0 when it can be granted now)."""
        rate = self.rate
        if rate is None:
            return 0.0
        self._prune(now)
        wait = self._tat - now
        cap = max(1, math.ceil(rate * WINDOW - 1e-9))
        if len(self._log) >= cap:
            # the oldest grant that keeps the window full must leave it first
            wait = max(wait, self._log[-cap] + WINDOW + EPSILON - now)
        return max(0.0, wait)

    def grant(self, now: float) -> None:
        """Record a permit granted at ``now``."""
        self._log.append(now)
        rate = self.rate
        if rate is None:
            # the log stays bounded: prune as we go even when nothing limits us
            self._prune(now)
            return
        interval = 1.0 / rate
        # Catch up on a late wake-up (up to one interval) so the mean rate is not lost to
        # event-loop jitter; beyond that the meter was idle and the timeline restarts at now
        # (so two grants at most can come back to back; the window log bounds the rest).
        base = self._tat if now - self._tat <= interval else now
        self._tat = base + interval

    def throttle(self) -> None:
        """Run slower after a 429: half the rate the server refused (learning one if unlimited).

        The rate that tripped the server is remembered as the meter's ``ceiling``: the calls
        actually made in the last second when they were at least half the meter's rate, else the
        meter's rate itself.
        """
        observed = self.observed()
        if self.base_rate is None:
            # an unlimited meter takes the rate that tripped the server as its reference
            self.base_rate = float(max(1, observed))
            self.factor = 1.0
            self.learned = True
        current = self.base_rate * min(self.factor, 1.0)
        # Calls made in the last second are the rate the server refused, when the meter was
        # busy; far below the meter's rate (a lull, or 429s unrelated to rate) they say nothing.
        busy = not self.learned and observed >= 0.5 * current
        self.ceiling = min(current, observed) if busy else current
        self.factor = max(MIN_FACTOR, self.ceiling * SLOW_FACTOR / self.base_rate)

    def recover(self) -> None:
        """Give back a little rate after a successful call.

        A configured rate comes back linearly up to the configured value: quickly up to
        PROBE_FROM of the last ceiling, then 50 times more slowly, so that the meter lingers
        just under the rate the server refused instead of running into it again. A learned one
        (the user set no limit) comes back quickly and keeps growing past its reference by 1 %
        per success, since the rate that tripped the server may have been a lull (or the 429s
        unrelated to rate); far past it the meter is unlimited again.
        """
        if self.base_rate is None:
            return
        if self.factor < 1.0:
            step = RECOVERY_STEP
            if (
                not self.learned
                and self.ceiling is not None
                and self.base_rate * self.factor >= PROBE_FROM * self.ceiling
            ):
                step /= 50
            self.factor = min(1.0, self.factor + step)
        elif self.learned:
            self.factor *= 1.01
            if self.factor > LEARNED_RELEASE:
                self.base_rate, self.factor, self.learned = None, 1.0, False
                self.ceiling = None


class InFlight:
    """A cap on remote requests submitted and not yet finished.

    Unlike a semaphore, :meth:`take` may go past the cap: jobs found in flight when a run resumes
    are counted at once, and no new submit starts until enough of them have finished.
    """

    def __init__(self, limit: int) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"max_in_flight must be an integer of at least 1, got {limit!r}")
        self.limit = limit
        self.in_use = 0
        self._changed = asyncio.Event()

    @property
    def free(self) -> int:
        """Slots free now (0 when at or over the cap)."""
        return max(0, self.limit - self.in_use)

    async def acquire(self) -> None:
        """Wait for a free slot and take it."""
        while self.in_use >= self.limit:
            self._changed.clear()
            await self._changed.wait()
        self.in_use += 1

    def take(self) -> None:
        """Take a slot without waiting (a request already in flight at start)."""
        self.in_use += 1

    def release(self) -> None:
        """Give a slot back (the request finished remotely, or was never sent)."""
        if self.in_use <= 0:
            raise RuntimeError("InFlight.release() without a slot taken")
        self.in_use -= 1
        self._changed.set()


@dataclass(frozen=True)
class SlowDown:
    """What one 429 did to the run: how long everyone waits, and why."""

    delay: float
    retry_after: float | None
    level: int
    #: False when the 429 answered a call made before the current pause (no further escalation)
    escalated: bool


class RateLimiter:
    """The run's limits: a submit meter, a request meter, the in-flight cap and the 429 brake.

    :param submits_per_minute: paid submits per minute, ``None`` for no limit
    :param requests_per_second: every API call per second, ``None`` for no limit
    :param max_in_flight: requests submitted and not yet finished, at once
    :param clock: monotonic seconds (injected in tests)
    :param sleep: coroutine sleeping that many seconds of ``clock`` (injected in tests)
    :param rng: random source for backoff jitter (seeded in tests)
    """

    def __init__(
        self,
        submits_per_minute: float | None = None,
        requests_per_second: float | None = None,
        max_in_flight: int = 8,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        spm = _check_rate("submits_per_minute", submits_per_minute)
        rps = _check_rate("requests_per_second", requests_per_second)
        self.clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self.submits = RateMeter(None if spm is None else spm / 60.0, clock=clock)
        self.requests = RateMeter(rps, clock=clock)
        self.in_flight = InFlight(max_in_flight)
        #: nobody calls the API before this time (a 429's Retry-After or backoff)
        self.paused_until = -math.inf
        #: consecutive 429s not yet forgiven by successes; drives the backoff length
        self.level = 0
        self._successes = 0
        self._throttled_at = -math.inf
        #: totals for the summary
        self.rate_limited = 0

    # -- permits -----------------------------------------------------------------------------

    async def _wait_until(self, wait_time: Callable[[float], float]) -> float:
        while True:
            now = self.clock()
            wait = wait_time(now)
            if wait <= 0:
                return now
            await self._sleep(wait)

    def _pause_wait(self, now: float) -> float:
        return self.paused_until - now

    async def submit(self) -> None:
        """Wait until a paid submit may go out now (submit meter, request meter and brake)."""
        async with self.submits.lock:
            await self._wait_until(
                lambda now: max(self.submits.wait_time(now), self._pause_wait(now))
            )
            # The request meter is shared with polls: take it last and briefly, and grant both
            # meters at the same instant so neither records a time the call did not go out at.
            async with self.requests.lock:
                now = await self._wait_until(
                    lambda now: max(
                        self.submits.wait_time(now),
                        self.requests.wait_time(now),
                        self._pause_wait(now),
                    )
                )
                self.submits.grant(now)
                self.requests.grant(now)

    async def request(self) -> None:
        """Wait until any other API call (result, status, cancel) may go out now."""
        async with self.requests.lock:
            now = await self._wait_until(
                lambda now: max(self.requests.wait_time(now), self._pause_wait(now))
            )
            self.requests.grant(now)

    # -- feedback ----------------------------------------------------------------------------

    def slow_down(self, retry_after: float | None = None) -> SlowDown:
        """A call got a 429: pause every caller and slow both meters.

        With ``retry_after`` (seconds) the pause lasts that long (plus up to 10 % jitter, so that
        a crowd of waiters does not return in the same millisecond); without it the pause is
        ``BACKOFF_BASE * 2^(level-1)`` seconds, capped at ``BACKOFF_CAP``, times a jitter in
        [0.5, 1). A 429 answering a call sent before the current pause began does not escalate:
        32 polls rejected at once are one signal, not 32.
        """
        now = self.clock()
        self.rate_limited += 1
        self._successes = 0
        escalated = now >= self.paused_until
        if escalated:
            self.level += 1
        if escalated and now - self._throttled_at >= THROTTLE_SPACING:
            self._throttled_at = now
            # Every call goes through the request meter, so throttling it slows submits too; the
            # submit meter is only lowered when the user set one (learning a submit rate from a
            # 429 on polls would starve submits).
            self.requests.throttle()
            if self.submits.base_rate is not None and not self.submits.learned:
                self.submits.throttle()
        if retry_after is not None and retry_after >= 0:
            delay = min(retry_after, RETRY_AFTER_CAP) * (1.0 + 0.1 * self._rng.random())
        else:
            nominal = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** max(0, self.level - 1))
            delay = nominal * (0.5 + 0.5 * self._rng.random())
        self.paused_until = max(self.paused_until, now + delay)
        return SlowDown(delay, retry_after, self.level, escalated)

    def pause_until(self, until: float) -> None:
        """Make every caller wait until ``until`` (a time of ``clock``)."""
        self.paused_until = max(self.paused_until, until)

    def record_success(self) -> None:
        """A call succeeded: give back a little rate; forgive one backoff level per 3 successes."""
        self.submits.recover()
        self.requests.recover()
        if self.level:
            self._successes += 1
            if self._successes >= FORGIVE_AFTER:
                self.level -= 1
                self._successes = 0
