"""RateLimiter on a fake clock: spacing, 1-second windows, the in-flight cap, 429 slow-down."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import random
from collections.abc import Awaitable
from typing import Any, TypeVar

import pytest

from batchgen.limits import (
    BACKOFF_CAP,
    FORGIVE_AFTER,
    MIN_FACTOR,
    RETRY_AFTER_CAP,
    InFlight,
    RateLimiter,
    RateMeter,
)

T = TypeVar("T")


class FakeClock:
    """Virtual time: ``sleep`` parks the caller until :meth:`drive` advances the clock to it.

    ``overshoot`` makes every wake-up late by a random amount, like a busy event loop.
    """

    def __init__(self, overshoot: float = 0.0, seed: int = 0) -> None:
        self.now = 0.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._overshoot = overshoot
        self._rng = random.Random(seed)

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        late = self._rng.random() * self._overshoot
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + max(0.0, seconds) + late, next(self._seq), fut))
        await fut

    async def drive(self, aw: Awaitable[T]) -> T:
        """Run ``aw`` to completion, jumping the clock to the next sleeper whenever all are idle."""
        task = asyncio.ensure_future(aw)
        while not task.done():
            for _ in range(20):  # let every runnable coroutine reach its next sleep
                await asyncio.sleep(0)
            if task.done():
                break
            if not self._sleepers:
                raise AssertionError("deadlock: nothing sleeping and the task is not done")
            wake, _, fut = heapq.heappop(self._sleepers)
            self.now = max(self.now, wake)
            fut.set_result(None)
        return task.result()


def max_in_window(times: list[float], window: float = 1.0) -> int:
    """Largest number of ``times`` inside any half-open window [t, t + window)."""
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


async def _grant_times(clock: FakeClock, limiter: RateLimiter, n: int, kind: str) -> list[float]:
    times: list[float] = []

    async def one() -> None:
        await (limiter.submit() if kind == "submit" else limiter.request())
        times.append(clock.now)

    async def many() -> None:
        await asyncio.gather(*(one() for _ in range(n)))

    await clock.drive(many())
    return times


async def test_requests_are_evenly_spaced_and_never_burst() -> None:
    clock = FakeClock()
    limiter = RateLimiter(requests_per_second=10, clock=clock, sleep=clock.sleep)
    times = await _grant_times(clock, limiter, 100, "request")
    gaps = [b - a for a, b in itertools.pairwise(sorted(times))]
    assert min(gaps) == pytest.approx(0.1, abs=1e-5)
    assert max(gaps) == pytest.approx(0.1, abs=1e-5)
    assert max_in_window(times) <= 10
    assert 99 / (max(times) - min(times)) == pytest.approx(10.0, rel=1e-4)


async def test_late_wakeups_never_break_a_window_and_keep_the_mean() -> None:
    # every sleep overshoots by up to 40 ms, as on a loaded machine
    clock = FakeClock(overshoot=0.04, seed=7)
    limiter = RateLimiter(requests_per_second=20, clock=clock, sleep=clock.sleep)
    times = await _grant_times(clock, limiter, 400, "request")
    assert max_in_window(times) <= 20
    mean = 399 / (max(times) - min(times))
    assert 0.95 * 20 <= mean <= 20.0 + 1e-9


async def test_fractional_rate_window_cap_is_its_ceiling() -> None:
    clock = FakeClock(overshoot=0.01, seed=1)
    limiter = RateLimiter(requests_per_second=2.5, clock=clock, sleep=clock.sleep)
    times = await _grant_times(clock, limiter, 50, "request")
    assert max_in_window(times) <= 3
    assert 49 / (max(times) - min(times)) >= 0.95 * 2.5


async def test_submits_per_minute_spacing() -> None:
    clock = FakeClock()
    limiter = RateLimiter(submits_per_minute=120, clock=clock, sleep=clock.sleep)
    times = await _grant_times(clock, limiter, 21, "submit")
    assert max(times) - min(times) == pytest.approx(10.0, abs=1e-4)  # 20 gaps of 0.5 s
    assert max_in_window(times, 60.0) <= 121


async def test_submit_takes_both_meters_and_polls_are_not_starved() -> None:
    clock = FakeClock()
    limiter = RateLimiter(
        submits_per_minute=60, requests_per_second=4, clock=clock, sleep=clock.sleep
    )
    submits: list[float] = []
    polls: list[float] = []

    async def submitter() -> None:
        for _ in range(5):
            await limiter.submit()
            submits.append(clock.now)

    async def poller() -> None:
        for _ in range(16):
            await limiter.request()
            polls.append(clock.now)

    async def both() -> None:
        await asyncio.gather(submitter(), poller())

    await clock.drive(both())
    # at most 1 submit per second (a poll may take the request slot a submit wanted: the shared
    # meter delays it by at most one request interval); all calls together at most 4 per second,
    # and polls keep flowing while a submit waits for its own meter
    gaps = [b - a for a, b in itertools.pairwise(submits)]
    assert all(1.0 - 1e-9 <= gap <= 1.25 + 1e-4 for gap in gaps), gaps
    assert max_in_window(submits + polls) <= 4
    assert max(polls) <= 5.5


async def test_unlimited_meters_never_wait() -> None:
    clock = FakeClock()
    limiter = RateLimiter(clock=clock, sleep=clock.sleep)
    times = await _grant_times(clock, limiter, 50, "submit")
    assert set(times) == {0.0}


async def test_in_flight_cap() -> None:
    slots = InFlight(2)
    await slots.acquire()
    await slots.acquire()
    third = asyncio.ensure_future(slots.acquire())
    await asyncio.sleep(0.01)
    assert not third.done()
    slots.release()
    await asyncio.wait_for(third, 1)
    assert slots.in_use == 2 and slots.free == 0
    slots.take()  # a request found in flight on resume: counted even past the cap
    assert slots.in_use == 3
    fourth = asyncio.ensure_future(slots.acquire())
    slots.release()
    await asyncio.sleep(0.01)
    assert not fourth.done()  # 2 in use, still at the cap
    slots.release()
    await asyncio.wait_for(fourth, 1)
    with pytest.raises(RuntimeError):
        InFlight(1).release()


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3"])
def test_in_flight_rejects_bad_limits(bad: Any) -> None:
    with pytest.raises(ValueError, match="max_in_flight"):
        InFlight(bad)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"requests_per_second": 0}, "requests_per_second"),
        ({"requests_per_second": -2}, "requests_per_second"),
        ({"submits_per_minute": math.inf}, "submits_per_minute"),
        ({"submits_per_minute": "10"}, "submits_per_minute"),
    ],
)
def test_rejects_bad_rates(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        RateLimiter(**kwargs)


async def test_retry_after_pauses_every_caller() -> None:
    clock = FakeClock()
    limiter = RateLimiter(
        requests_per_second=100, clock=clock, sleep=clock.sleep, rng=random.Random(3)
    )
    clock.now = 10.0
    slow = limiter.slow_down(retry_after=2.0)
    assert 2.0 <= slow.delay < 2.2 and slow.retry_after == 2.0 and slow.escalated
    times = await _grant_times(clock, limiter, 5, "request")
    assert min(times) >= 12.0  # nobody went out during the pause
    assert min(times) == pytest.approx(10.0 + slow.delay)
    # the meter runs at half speed after a 429
    assert limiter.requests.rate == pytest.approx(50.0)
    assert max(times) - min(times) == pytest.approx(4 / 50, abs=1e-4)


async def test_retry_after_is_clamped() -> None:
    clock = FakeClock()
    limiter = RateLimiter(clock=clock, sleep=clock.sleep, rng=random.Random(0))
    slow = limiter.slow_down(retry_after=86400)
    assert slow.delay <= RETRY_AFTER_CAP * 1.1


def test_backoff_without_retry_after_grows_with_jitter_and_caps() -> None:
    clock = FakeClock()
    limiter = RateLimiter(requests_per_second=10, clock=clock, rng=random.Random(42))
    delays = []
    for level in range(1, 10):
        slow = limiter.slow_down()
        assert slow.level == level and slow.escalated
        nominal = min(BACKOFF_CAP, 2 ** (level - 1))
        assert 0.5 * nominal <= slow.delay < nominal
        delays.append(slow.delay)
        clock.now = limiter.paused_until  # the pause ends; the next 429 escalates
    assert len({round(d, 9) for d in delays}) == len(delays)  # jittered, not a fixed ladder
    assert limiter.requests.factor == pytest.approx(MIN_FACTOR)


def test_jitter_differs_between_runs() -> None:
    a = RateLimiter(clock=lambda: 0.0, rng=random.Random(1)).slow_down().delay
    b = RateLimiter(clock=lambda: 0.0, rng=random.Random(2)).slow_down().delay
    assert a != b


def test_a_crowd_of_429s_is_one_signal() -> None:
    clock = FakeClock()
    limiter = RateLimiter(requests_per_second=10, clock=clock, rng=random.Random(0))
    first = limiter.slow_down()
    for _ in range(31):  # answers to calls sent before the pause began
        again = limiter.slow_down()
        assert not again.escalated
    assert limiter.level == 1
    assert limiter.requests.rate == pytest.approx(5.0)
    assert limiter.paused_until == pytest.approx(first.delay, abs=1.0)
    assert limiter.rate_limited == 32


def test_recovery_after_successes() -> None:
    clock = FakeClock()
    limiter = RateLimiter(submits_per_minute=60, requests_per_second=10, clock=clock)
    limiter.slow_down()
    clock.now = limiter.paused_until
    limiter.slow_down()
    assert limiter.level == 2
    assert limiter.requests.rate == pytest.approx(2.5)
    assert limiter.submits.rate == pytest.approx(0.25)
    for _ in range(FORGIVE_AFTER - 1):
        limiter.record_success()
    assert limiter.level == 2
    limiter.record_success()
    assert limiter.level == 1
    # quickly back to 90 % of the rate the server refused last (5/s), then slowly probing
    for _ in range(20):
        limiter.record_success()
    assert limiter.level == 0
    assert 0.9 * 5.0 <= limiter.requests.rate < 5.0  # type: ignore[operator]
    for _ in range(100):
        limiter.record_success()
    assert limiter.requests.rate < 5.5  # type: ignore[operator]
    for _ in range(5000):
        limiter.record_success()
    assert limiter.requests.rate == pytest.approx(10.0)  # the configured rate, not above
    assert limiter.submits.rate == pytest.approx(1.0)


def test_unlimited_meter_learns_a_rate_from_a_429_and_lets_go_later() -> None:
    clock = FakeClock()
    meter = RateMeter(None, clock=clock)
    for i in range(30):
        meter.grant(i / 100)  # 30 calls in the last 0.3 s
    clock.now = 0.3
    meter.throttle()
    assert meter.learned and meter.rate == pytest.approx(15.0)
    assert meter.ceiling == 30
    for _ in range(25):  # a learned reference may have been a lull: no slow probing
        meter.recover()
    assert meter.rate == pytest.approx(30.0)
    for _ in range(400):
        meter.recover()
    assert meter.rate is None and not meter.learned


def test_unlimited_submit_meter_is_not_throttled_by_poll_429s() -> None:
    limiter = RateLimiter(requests_per_second=None, submits_per_minute=None, clock=lambda: 0.0)
    limiter.slow_down()
    assert limiter.submits.rate is None
    assert limiter.requests.rate is not None


def test_ceiling_is_the_refused_rate_only_when_the_meter_was_busy() -> None:
    clock = FakeClock()
    busy = RateMeter(25.0, clock=clock)
    busy.factor = 0.5  # 12.5/s in force
    for i in range(11):
        busy.grant(i * 0.09)
    clock.now = 0.95
    busy.throttle()
    assert busy.ceiling == 11 and busy.rate == pytest.approx(5.5)
    # a 429 in a lull (2 calls in the last second) says nothing about the server's limit
    lull = RateMeter(20.0, clock=clock)
    lull.grant(0.5)
    lull.grant(0.9)
    lull.throttle()
    assert lull.ceiling == 20 and lull.rate == pytest.approx(10.0)
