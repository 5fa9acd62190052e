"""The runner against the embedded simulator over loopback: a full run, each error class, limits.

Every test drives the real RunComfy provider against a simulator started for it, with fast
latencies; the simulator's metrics are the source of truth for what reached the API.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from batchgen.errors import RateLimitedError
from batchgen.limits import RateLimiter
from batchgen.providers import get_provider
from batchgen.providers.base import Provider, RemoteResult
from batchgen.runner import (
    BEYOND_RATIO,
    MARGIN,
    MIN_HISTORY,
    PRIOR_FIRST,
    SCOUT_FIRST,
    SCOUT_RATIO,
    STOP_BUDGET,
    STOP_DONE,
    STOP_FATAL,
    STOP_MAX_JOBS,
    PollPlanner,
    Runner,
    RunSummary,
)
from batchgen.store import JobState, Store

MODEL = "blackforestlabs/flux-2/max/text-to-image"


# -- fakes for the manifest and the plan (the runner reads only these fields) ------------------


@dataclass(frozen=True)
class Spec:
    """What plan.JobSpec carries into the store."""

    id: str
    sweep: str
    model: str
    params: dict[str, Any]
    sample: int
    metadata: dict[str, Any]
    estimated_cost: float | None
    position: int


def specs(n: int, *, cost: float | None = 0.07, prompt: str = "a red fox") -> Iterator[Spec]:
    for i in range(n):
        params = {"prompt": f"{prompt} {i}", "seed": i + 1}
        digest = hashlib.sha256(json.dumps([MODEL, params]).encode()).hexdigest()[:24]
        yield Spec(digest, "foxes", MODEL, params, 0, {"Category": "Animals"}, cost, i)


@dataclass
class Limits:
    submits_per_minute: float | None = None
    requests_per_second: float | None = None
    max_in_flight: int = 8
    max_attempts: int = 5
    job_timeout: float = 60.0
    on_ambiguous_submit: str = "park"
    poll_interval: float | None = 0.05


@dataclass
class Budget:
    max_usd: float | None = None


@dataclass
class Download:
    max_bytes: int = 20_000_000
    timeout: float = 30.0
    concurrency: int = 4


@dataclass
class FakeManifest:
    output: Path
    path: Path
    name: str = "runner-test"
    provider: str = "runcomfy"
    hash: str = "0" * 64
    limits: Limits = field(default_factory=Limits)
    budget: Budget = field(default_factory=Budget)
    download: Download = field(default_factory=Download)


@pytest.fixture
def manifest(tmp_path: Path) -> FakeManifest:
    return FakeManifest(output=tmp_path / "out", path=tmp_path / "m.yaml")


@pytest.fixture
def store() -> Iterator[Store]:
    s = Store(memory=True)
    yield s
    s.close()


Events = list[tuple[str, dict[str, Any]]]


async def run(
    store: Store,
    provider: Provider,
    manifest: FakeManifest,
    *,
    max_jobs: int | None = None,
    limiter: RateLimiter | None = None,
    events: Events | None = None,
) -> RunSummary:
    def on_event(kind: str, **data: Any) -> None:
        if events is not None:
            events.append((kind, data))

    try:
        runner = Runner(store, provider, manifest, limiter, on_event=on_event)  # type: ignore[arg-type]
        return await runner.run(max_jobs=max_jobs)
    finally:
        await provider.aclose()


def provider_for(sim: Any, **options: Any) -> Provider:
    return get_provider("runcomfy", base_url=sim.base_url, token=sim.token, **options)


def sim_sha256(sim: Any) -> set[str]:
    return {entry["sha256"] for entry in sim.metrics()["files"]["by_path"].values()}


def assert_outputs_intact(store: Store, manifest: FakeManifest, sim: Any) -> None:
    served = sim_sha256(sim)
    for job in store.jobs([JobState.DONE]):
        outputs = store.outputs(job.id)
        assert outputs, job.id
        for out in outputs:
            path = manifest.output / out.path
            data = path.read_bytes()
            assert hashlib.sha256(data).hexdigest() == out.sha256
            assert out.sha256 in served
            sidecar = json.loads(path.with_suffix(".json").read_text())
            assert sidecar["job_id"] == job.id and sidecar["sha256"] == out.sha256
            assert sidecar["request_id"] == job.request_id
            assert sidecar["prompt"] == job.prompt and sidecar["seed"] == job.seed
            assert sidecar["metadata"] == {"Category": "Animals"}
    assert not list(manifest.output.rglob("*.part"))


# -- a full run ----------------------------------------------------------------------------


async def test_full_run(
    simulator_factory: Callable[..., Any], store: Store, manifest: FakeManifest
) -> None:
    sim = simulator_factory(workers=8, latency=(0.05, 0.2))
    store.sync(specs(24))
    events: Events = []
    summary = await run(store, provider_for(sim), manifest, events=events)
    assert summary.stop_reason == STOP_DONE and summary.exit_code == 0
    assert summary.counts["done"] == 24 and summary.images == 24 and summary.downloaded == 24
    assert summary.spent_usd == pytest.approx(24 * 0.07)
    metrics = sim.metrics()
    assert metrics["submits"]["total"] == 24 and metrics["submits"]["duplicate_submits"] == 0
    assert metrics["calls"]["by_endpoint"]["status"] == {}  # only /result is polled
    assert metrics["files"]["with_authorization"] == 0
    assert_outputs_intact(store, manifest, sim)
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert kinds.count("submitted") == kinds.count("finished") == kinds.count("downloaded") == 24
    # the export engineer's files are written at the end of the run
    assert summary.exported and (manifest.output / "metadata.jsonl").is_file()
    # every state change was logged as an event row
    job = store.jobs([JobState.DONE])[0]
    path = [e["to_state"] for e in store.events(job.id)]
    assert path[-4:] in (
        ["submitting", "queued", "downloading", "done"],
        ["queued", "running", "downloading", "done"],
    )


async def test_adaptive_polling_learns(
    simulator_factory: Callable[..., Any], store: Store, manifest: FakeManifest
) -> None:
    sim = simulator_factory(workers=16, latency=(0.3, 0.3))
    manifest.limits.poll_interval = None
    manifest.limits.max_in_flight = 16
    store.sync(specs(64))
    provider = provider_for(sim)
    runner = Runner(store, provider, manifest)  # type: ignore[arg-type]
    task = asyncio.create_task(runner.run())
    # the first wave has no history: it probes (staggered, a few polls each)
    while store.counts()["done"] < 16:
        await asyncio.sleep(0.02)
    first_wave_results = sum(sim.metrics()["calls"]["by_endpoint"]["result"].values())
    sim.reset_metrics()
    summary = await task
    await provider.aclose()
    assert summary.counts["done"] == 64
    assert first_wave_results <= 16 * 4
    # later waves: polled about once each, right after they finish
    later = sim.metrics()
    results = sum(later["calls"]["by_endpoint"]["result"].values())
    noticed = later["result_notice_delay"]["count"]
    assert noticed >= 40 and results <= 1.5 * noticed, (results, noticed)
    assert later["result_notice_delay"]["mean"] < 0.15


# -- errors, by class ----------------------------------------------------------------------


async def test_429_without_retry_after_backs_off_and_finishes(
    simulator_factory: Callable[..., Any], store: Store, manifest: FakeManifest
) -> None:
    sim = simulator_factory(workers=8, latency=(0.05, 0.1), faults={"http_429": 0.05})
    store.sync(specs(20))
    limiter = RateLimiter(None, None, 8)
    summary = await run(store, provider_for(sim), manifest, limiter=limiter)
    assert summary.counts["done"] == 20 and summary.counts["failed"] == 0
    assert summary.rate_limited > 0 and summary.errors.get("http_429", 0) > 0
    assert sim.metrics()["submits"]["duplicate_submits"] == 0


class Recording(Provider):
    """Wraps a provider, recording when each call went out and when each 429 came back."""

    name = "recording"

    def __init__(self, inner: Provider) -> None:
        self.inner = inner
        self.sent: list[float] = []
        self.limited: list[tuple[float, float | None]] = []
        self.first_result: set[str] = set()
        self.spoil_first_urls = False

    async def _call(self, coro: Any) -> Any:
        self.sent.append(time.monotonic())
        try:
            return await coro
        except RateLimitedError as exc:
            self.limited.append((time.monotonic(), exc.retry_after))
            raise

    async def submit(self, model_id: str, params: dict[str, Any]) -> Any:
        return await self._call(self.inner.submit(model_id, params))

    async def status(self, request_id: str) -> Any:
        return await self._call(self.inner.status(request_id))

    async def result(self, request_id: str) -> RemoteResult:
        result: RemoteResult = await self._call(self.inner.result(request_id))
        if self.spoil_first_urls and result.succeeded and request_id not in self.first_result:
            self.first_result.add(request_id)
            spoiled = [re.sub(r"expires=[0-9.]+", "expires=1", uri) for uri in result.outputs]
            return RemoteResult(
                result.status, spoiled, result.error, result.created_at, result.finished_at
            )
        return result

    async def cancel(self, request_id: str) -> Any:
        return await self._call(self.inner.cancel(request_id))

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_retry_after_is_honoured_by_the_whole_run(
    simulator_factory: Callable[..., Any], store: Store, manifest: FakeManifest
) -> None:
    sim = simulator_factory(
        workers=8, latency=(0.05, 0.1), faults={"http_429_retry_after": 0.05, "retry_after": 0.4}
    )
    store.sync(specs(16))
    provider = Recording(provider_for(sim))
    summary = await run(store, provider, manifest)
    assert summary.counts["done"] == 16 and summary.counts["failed"] == 0
    assert provider.limited, "the fault never fired"
    assert all(ra == pytest.approx(0.4) for _, ra in provider.limited)
    # After each 429, no call went out for Retry-After seconds (calls already on the wire aside:
    # they were sent before the 429 came back).
    for at, retry_after in provider.limited:
        assert retry_after is not None
        too_soon = [t for t in provider.sent if at < t < at + retry_after - 0.02]
        assert not too_soon, (at, too_soon[:3])


async def test_5xx_and_dropped_connections(
    simulator_factory: Callable[..., Any], store: Store, manifest: FakeManifest
) -> None:
    sim = simulator_factory(
        workers=8, latency=(0.05, 0.1), faults={"http_5xx": 0.1, "drop_connection": 0.1}
    )
    store.sync(specs(30))
    summary = await run(store, provider_for(sim), manifest)
    counts = summary.counts
    # A 5xx or a dropped connection on a submit is ambiguous: parked, never resubmitted blindly.
    assert counts["done"] + counts["unknown"] == 30 and counts["done"] > 0
    assert counts["failed"] == 0
    unknown = store.jobs([JobState.UNKNOWN])
    assert all(job.error_class for job in unknown)
    assert summary.exit_code == (1 if unknown else 0)
    assert sim.metrics()["submits"]["duplicate_submits"] == 0


async def test_lost_submits_parked_then_resubmitted_with_retry(
    simulator_factory: Callable[..., Any], store: Store, manifest: FakeManifest
) -> None:
    sim = simulator_factory(workers=8, latency=(0.05, 0.1), faults={"lost_submit": 0.3}, seed=3)
    store.sync(specs(20))
    summary = await run(store, provider_for(sim), manifest)
    parked = summary.counts["unknown"]
    assert parked > 0 and summary.counts["done"] == 20 - parked
    assert summary.exit_code == 1
    assert sim.metrics()["submits"]["duplicate_submits"] == 0

    # the user says "retry": the parked ones are resubmitted, counted as possible duplicates
    store.reset([JobState.UNKNOWN])
    manifest.limits.on_ambiguous_submit = "retry"
    sim2_provider = provider_for(sim)
    summary = await run(store, sim2_provider, manifest)
    assert summary.counts["done"] + summary.counts["unknown"] == 20
    metrics = sim.metrics()["submits"]
    # every duplicate the simulator saw is one the runner counted as possible
    assert metrics["duplicate_submits"] <= store.possible_duplicates() + parked


async def test_on_ambiguous_retry_counts_possible_duplicates(
    simulator_factory: Callable[..., Any], store: Store, manifest: FakeManifest
) -> None:
    sim = simulator_factory(workers=8, latency=(0.05, 0.1), faults={"lost_submit": 0.25}, seed=5)
    manifest.limits.on_ambiguous_submit = "retry"
    manifest.limits.max_attempts = 10
    store.sync(specs(20))
    summary = await run(store, provider_for(sim), manifest)
    assert summary.counts["done"] == 20
    dupes = sim.metrics()["submits"]["duplicate_submits"]
    assert dupes > 0
    assert store.possible_duplicates() == summary.possible_duplicates >= dupes


async def test_failed_jobs_fail_with_reason(
    simulator_factory: Callable[..., Any], store: Store, manifest: FakeManifest
) -> None:
    sim = simulator_factory(workers=8, latency=(0.05, 0.1), faults={"job_failure": 0.3}, seed=1)
    store.sync(specs(20))
    summary = await run(store, provider_for(sim), manifest)
    failed = store.jobs([JobState.FAILED])
    assert failed and summary.counts["done"] == 20 - len(failed)
    assert {job.error_class for job in failed} == {"job_failed"}
    assert all(job.last_error for job in failed)
    assert summary.exit_code == 1
    assert summary.top_errors[0][0] == "job_failed"


async def test_truncated_downloads_are_retried(
    simulator_factory: Callable[..., Any], store: Store, manifest: FakeManifest
) -> None:
    sim = simulator_factory(workers=8, latency=(0.05, 0.1), faults={"truncated_download": 0.3})
    store.sync(specs(16))
    summary = await run(store, provider_for(sim), manifest)
    assert summary.counts["done"] == 16
    assert summary.errors.get("truncated", 0) > 0
    assert_outputs_intact(store, manifest, sim)


async def test_expired_urls_are_refreshed_once(
    simulator_factory: Callable[..., Any], store: Store, manifest: FakeManifest
) -> None:
    sim = simulator_factory(workers=8, latency=(0.05, 0.1), faults={"url_ttl": 60})
    store.sync(specs(6))
    provider = Recording(provider_for(sim))
    provider.spoil_first_urls = True  # the first result's URLs have already expired
    summary = await run(store, provider, manifest)
    assert summary.counts["done"] == 6
    assert summary.errors.get("url_expired") == 6
    assert_outputs_intact(store, manifest, sim)
    # the fresh URLs replaced the expired ones in the state, so a resume would use them
    for job in store.jobs([JobState.DONE]):
        assert [o.uri for o in store.outputs(job.id)] == job.output_uris


async def test_urls_that_stay_expired_fail_the_job(
    simulator_factory: Callable[..., Any], store: Store, manifest: FakeManifest
) -> None:
    sim = simulator_factory(workers=8, latency=(0.05, 0.1), faults={"url_ttl": 0})
    store.sync(specs(4))
    summary = await run(store, provider_for(sim), manifest)
    assert summary.exit_code == 1
    failed = store.jobs([JobState.FAILED])
    assert len(failed) == 4 and {j.error_class for j in failed} == {"url_expired"}
    assert all("fresh" in (j.last_error or "") for j in failed)


# -- limits --------------------------------------------------------------------------------


async def test_limits_hold_per_the_simulator(
    simulator_factory: Callable[..., Any], store: Store, manifest: FakeManifest
) -> None:
    sim = simulator_factory(workers=16, latency=(0.2, 0.4))
    manifest.limits.requests_per_second = 15
    manifest.limits.submits_per_minute = 300  # 5 per second
    manifest.limits.max_in_flight = 6
    manifest.limits.poll_interval = None
    store.sync(specs(20))
    summary = await run(store, provider_for(sim), manifest)
    assert summary.counts["done"] == 20
    metrics = sim.metrics()
    per_second = metrics["max_calls_per_second"]
    # sliding 1-second windows per endpoint, as the simulator counts them
    assert per_second["submit"] <= 5 + 1, per_second
    assert per_second["result"] <= 15 + 1, per_second
    # every API call together, in the simulator's whole-second buckets
    series = metrics["per_second"]
    api = [series.get(name, []) for name in ("submit", "result", "status", "cancel")]
    width = max(len(s) for s in api)
    together = [sum(s[i] for s in api if i < len(s)) for i in range(width)]
    assert max(together) <= 15 + 1, together
    assert metrics["unfinished_jobs"]["peak"] <= 6


async def test_budget_stops_submitting(
    simulator_factory: Callable[..., Any], store: Store, manifest: FakeManifest
) -> None:
    sim = simulator_factory(workers=8, latency=(0.05, 0.1))
    manifest.budget.max_usd = 0.5  # 7 jobs at $0.07
    store.sync(specs(20))
    summary = await run(store, provider_for(sim), manifest)
    assert summary.stop_reason == STOP_BUDGET and summary.exit_code == 1
    assert sim.metrics()["submits"]["total"] == 7
    assert summary.counts["done"] == 7 and summary.counts["pending"] == 13
    assert summary.spent_usd == pytest.approx(0.49)
    assert "budget" in (summary.message or "")


async def test_budget_refuses_unpriced_jobs(
    simulator_factory: Callable[..., Any], store: Store, manifest: FakeManifest
) -> None:
    sim = simulator_factory(workers=8, latency=(0.05, 0.1))
    manifest.budget.max_usd = 5
    store.sync(specs(3, cost=None))
    summary = await run(store, provider_for(sim), manifest)
    assert summary.stop_reason == STOP_BUDGET and sim.metrics()["submits"]["total"] == 0
    assert "no price" in (summary.message or "")


async def test_max_jobs(
    simulator_factory: Callable[..., Any], store: Store, manifest: FakeManifest
) -> None:
    sim = simulator_factory(workers=8, latency=(0.05, 0.1))
    store.sync(specs(12))
    summary = await run(store, provider_for(sim), manifest, max_jobs=5)
    assert summary.stop_reason == STOP_MAX_JOBS and summary.exit_code == 0
    assert summary.counts["done"] == 5 and summary.counts["pending"] == 7
    assert sim.metrics()["submits"]["total"] == 5


async def test_job_timeout(
    simulator_factory: Callable[..., Any], store: Store, manifest: FakeManifest
) -> None:
    sim = simulator_factory(workers=8, latency=(30, 30))
    manifest.limits.job_timeout = 0.4
    store.sync(specs(3))
    started = time.monotonic()
    summary = await run(store, provider_for(sim), manifest)
    assert time.monotonic() - started < 5 and summary.exit_code == 1
    failed = store.jobs([JobState.FAILED])
    assert len(failed) == 3 and {j.error_class for j in failed} == {"job_timeout"}


async def test_fatal_auth_error_stops_the_run(
    simulator_factory: Callable[..., Any], store: Store, manifest: FakeManifest
) -> None:
    sim = simulator_factory(workers=8, latency=(0.05, 0.1))
    store.sync(specs(10))
    provider = get_provider("runcomfy", base_url=sim.base_url, token="not-the-token")
    summary = await run(store, provider, manifest)
    assert summary.stop_reason == STOP_FATAL and summary.exit_code == 3
    # refused submits created nothing: the jobs are still pending, ready for the next run
    assert summary.counts["pending"] == 10
    assert sim.metrics()["submits"]["total"] == 0


async def test_token_never_written(
    simulator_factory: Callable[..., Any],
    tmp_path: Path,
    manifest: FakeManifest,
    caplog: pytest.LogCaptureFixture,
) -> None:
    token = "tok-" + "s3cr3t" * 6
    sim = simulator_factory(
        workers=4, latency=(0.05, 0.1), token=token, faults={"job_failure": 0.3}
    )
    db = tmp_path / "state.db"
    store = Store(db)
    store.sync(specs(8))
    caplog.set_level(logging.DEBUG)
    summary = await run(store, provider_for(sim), manifest)
    store.close()
    assert summary.counts["done"] + summary.counts["failed"] == 8
    assert sim.token == token
    for path in [db, *tmp_path.glob("state.db*"), *manifest.output.rglob("*")]:
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path
    assert token not in caplog.text
    assert token not in json.dumps(summary.as_dict(), default=str)


# -- poll planning -------------------------------------------------------------------------


def test_planner_without_history_staggers_and_grows() -> None:
    planner = PollPlanner()
    firsts = [planner.next_poll("m", 0.0, 0, phase) for phase in (0.0, 0.25, 0.5, 0.99)]
    assert firsts[0] == pytest.approx(PRIOR_FIRST)
    assert firsts == sorted(firsts) and firsts[-1] < 2 * PRIOR_FIRST
    assert planner.next_poll("m", 3.0, 2) == pytest.approx(6.0)


def test_planner_scout_polls_early_until_the_model_has_history() -> None:
    planner = PollPlanner()
    assert planner.next_poll("m", 0.0, 0, 0.5, scout=True) == pytest.approx(SCOUT_FIRST)
    later = planner.next_poll("m", 0.4, 3, 0.5, scout=True)
    assert later == pytest.approx(0.4 * SCOUT_RATIO)
    # everyone else waits for the prior
    assert planner.next_poll("m", 0.0, 0, 0.0) == pytest.approx(PRIOR_FIRST)
    planner.observe("m", 3.0)
    # with a duration known, a scout is planned like any other job
    assert planner.next_poll("m", 0.4, 3, scout=True) == planner.next_poll("m", 0.4, 3)


async def test_a_fast_model_is_noticed_before_the_prior(
    simulator_factory: Callable[..., Any], store: Store, manifest: FakeManifest
) -> None:
    """No job of the first wave waits PRIOR_FIRST when the model answers in 50 ms: the scout
    sees the first finish, and every waiting poll is re-planned from it."""
    sim = simulator_factory(workers=16, latency=(0.05, 0.05))
    manifest.limits.poll_interval = None
    manifest.limits.max_in_flight = 16
    store.sync(specs(16))
    provider = provider_for(sim)
    summary = await Runner(store, provider, manifest).run()  # type: ignore[arg-type]
    await provider.aclose()
    assert summary.counts["done"] == 16
    assert summary.elapsed < 0.6 * PRIOR_FIRST, summary.elapsed
    results = sum(sim.metrics()["calls"]["by_endpoint"]["result"].values())
    assert results <= 16 + 8, results  # the scout's few polls, then about one per job


def test_planner_grid_from_history() -> None:
    planner = PollPlanner()
    for i in range(101):
        planner.observe("m", 2.0 + 3.0 * i / 100)  # uniform over 2-5 s
    grid = planner.grid("m")
    assert grid[-1] == pytest.approx(5.0 + MARGIN)
    assert 3 <= len(grid) <= 4 and grid[0] > 2.5
    assert planner.next_poll("m", 0.0, 0) == pytest.approx(grid[0])
    assert planner.next_poll("m", grid[0], 1) == pytest.approx(grid[1])
    # past the longest duration seen: geometric
    assert planner.next_poll("m", 6.0, 5) == pytest.approx(6.0 * BEYOND_RATIO)
    # other models keep their own history
    assert planner.grid("other") == []


def test_planner_fixed_latency_polls_once_right_after() -> None:
    planner = PollPlanner()
    for _ in range(MIN_HISTORY):
        planner.observe("m", 5.0)
    assert planner.next_poll("m", 0.0, 0) == pytest.approx(5.0 + MARGIN)


def test_planner_few_samples_step_from_the_shortest() -> None:
    planner = PollPlanner()
    planner.observe("m", 2.0)
    assert planner.next_poll("m", 1.0, 1) == pytest.approx(2.0 + MARGIN)
    assert planner.next_poll("m", 2.5, 2) == pytest.approx(2.5 * BEYOND_RATIO)


def test_planner_fixed_interval() -> None:
    planner = PollPlanner(fixed_interval=2.0)
    planner.observe("m", 1.0)
    assert planner.next_poll("m", 0.0, 0) == 2.0
    assert planner.next_poll("m", 2.0, 1) == 4.0
