"""The runner: claim → submit → poll → download, for every job of a manifest, resumably.

One :class:`Runner` drives the jobs of one state database through a provider::

    pending ─claim─▶ submitting ─POST─▶ queued ─▶ running ─▶ downloading ─files─▶ done
                         │                 └────────┴──▶ failed / cancelled
                         └─▶ pending (429, refused) · unknown (answer lost) · failed (rejected)

Invariants:

- **Intent before side effect.** Every state change is committed (by :class:`~batchgen.store.Store`)
  before the next side effect: ``submitting`` before the paid POST, the request id (``queued``)
  before anything else happens, ``downloading`` with the URIs before the first byte is fetched,
  each output row before ``done``. A crash at any point leaves a state a restart can finish.
- **Never pay twice silently.** A submit whose answer was lost is parked as ``unknown`` (or, with
  ``on_ambiguous_submit: retry``, resubmitted and counted as a possible duplicate). Jobs with a
  request id are polled, never resubmitted.
- **Every allowed slot busy.** A submit goes out as soon as an in-flight slot is free and the
  meters allow it; nothing on the submit path sleeps for any other reason.
- **Few polls, quick notice.** Only the result endpoint is polled (it answers while running, so
  one call is status and result). Each job's next poll is planned from the durations this run
  has seen for its model (:class:`PollPlanner`); one scheduler task serves every job. Until a
  model has a duration, one scout job of it is polled from 0.1 s on, geometrically, so a fast
  model is noticed at once without polling every job early.
- **Errors are handled by type only** (:mod:`batchgen.errors`): transient → retry later, 429 →
  the whole run slows down, rejected → the job fails with the reason, ambiguous submit → park,
  fatal → the run stops (exit code 3).
- Store calls happen on the event-loop thread and are short; the token never reaches this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import logging
import math
import time
from bisect import insort
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from . import __version__, download
from .errors import (
    AmbiguousSubmitError,
    BatchgenError,
    DownloadError,
    ExpiredURLError,
    FatalProviderError,
    JobRejectedError,
    ProviderError,
    RateLimitedError,
    TransientError,
)
from .limits import RateLimiter
from .store import Job, JobState, Output, Store

if TYPE_CHECKING:
    from .manifest import Manifest
    from .providers.base import Provider, RemoteResult

log = logging.getLogger(__name__)

#: ``on_event(kind, **data)``: progress for whoever renders it (the CLI draws bars)
EventCallback = Callable[..., None]


class _Events(Protocol):
    def __call__(self, kind: str, /, **data: Any) -> None: ...


# --------------------------------------------------------------------------------------------
# Poll planning
# --------------------------------------------------------------------------------------------

#: before any duration is known, the first poll comes at PRIOR_FIRST × PRIOR_RATIO^phase seconds
#: (phase in [0, 1) differs per job, so that together the jobs of a wave sample time densely
#: and the first finish is noticed within a fraction of a second), then each poll waits
#: PRIOR_RATIO times the time elapsed so far
PRIOR_FIRST = 2.0
PRIOR_RATIO = 2.0
#: meanwhile one "scout" job per model (the first one submitted while its model has no history)
#: is polled from SCOUT_FIRST seconds on, each poll SCOUT_RATIO times the elapsed time, up to
#: PRIOR_FIRST (about 8 calls per model and run, not per job); its finish (observed, then every
#: waiting poll re-planned) tells the others when to look, so a fast model is not waited on
SCOUT_FIRST = 0.1
SCOUT_RATIO = 1.5
#: with history, a job is polled at the quantiles 1/k, 2/k, … 1 of the durations seen: about
#: (k + 1) / 2 calls per job, and a mean notice delay of spread / 2k
GRID_STEPS = 3.5
#: polls aim this long after the predicted finish, so that they land after it
MARGIN = 0.02
#: never two polls of one job closer than this, nor closer than GAP_FACTOR grid steps
MIN_STEP = 0.05
GAP_FACTOR = 0.8
#: durations needed before the grid is trusted (before, polls step geometrically from the
#: shortest duration seen)
MIN_HISTORY = 8
#: past the longest duration seen, each poll waits this many times the elapsed time
BEYOND_RATIO = 1.3
#: never more than this between two polls of one job (seconds)
MAX_GAP = 30.0
#: durations remembered per model (the most recent ones: a remote queue that grows shows up)
HISTORY = 100


class PollPlanner:
    """When to poll a request next, from the durations this run has seen for its model.

    Pure bookkeeping (no clock, no I/O): :meth:`observe` feeds a duration, :meth:`next_poll`
    answers "at which elapsed time (seconds since the submit was answered) should this job be
    polled next, given it was last polled at ``elapsed`` and was not finished".

    :param fixed_interval: poll every that many seconds instead (``limits.poll_interval``)
    """

    def __init__(self, fixed_interval: float | None = None) -> None:
        self.fixed_interval = fixed_interval
        self._recent: dict[str, deque[float]] = {}
        self._sorted: dict[str, list[float]] = {}

    def observe(self, model: str, seconds: float) -> None:
        """A request of ``model`` took ``seconds`` from submit to finish."""
        if not math.isfinite(seconds) or seconds < 0:
            return
        recent = self._recent.setdefault(model, deque())
        ordered = self._sorted.setdefault(model, [])
        if len(recent) >= HISTORY:
            ordered.remove(recent.popleft())
        recent.append(seconds)
        insort(ordered, seconds)

    def samples(self, model: str) -> int:
        """How many durations of ``model`` are known."""
        return len(self._sorted.get(model, ()))

    def grid(self, model: str) -> list[float]:
        """The elapsed times a fresh job of ``model`` is polled at (empty without history)."""
        ordered = self._sorted.get(model)
        if not ordered:
            return []
        n = len(ordered)
        levels = [min(1.0, i / GRID_STEPS) for i in range(1, math.ceil(GRID_STEPS) + 1)]
        points = {ordered[max(0, min(n - 1, math.ceil(level * n) - 1))] for level in levels}
        return sorted(p + MARGIN for p in points)

    def next_poll(
        self, model: str, elapsed: float, polls: int, phase: float = 0.0, *, scout: bool = False
    ) -> float:
        """Elapsed time of the next poll of a job last polled at ``elapsed`` (``polls`` so far).

        ``scout``: this job scouts its model (see ``SCOUT_FIRST``); it only matters while the
        model has no history.
        """
        if self.fixed_interval is not None:
            return elapsed + self.fixed_interval
        ordered = self._sorted.get(model)
        if not ordered and scout and elapsed < PRIOR_FIRST:
            # past PRIOR_FIRST the others sample time densely: the scout steps like them
            target = SCOUT_FIRST if polls == 0 else elapsed * SCOUT_RATIO
        elif not ordered:
            target = PRIOR_FIRST * PRIOR_RATIO**phase if polls == 0 else elapsed * PRIOR_RATIO
        else:
            shortest, longest = ordered[0], ordered[-1]
            if len(ordered) >= MIN_HISTORY:
                upcoming = [p for p in self.grid(model) if p > elapsed + 1e-3]
                target = upcoming[0] if upcoming else elapsed * BEYOND_RATIO
            else:
                # a few durations say when jobs start to finish, not how they spread: step
                # geometrically, but not before the shortest duration seen
                target = max(elapsed * BEYOND_RATIO, shortest + MARGIN)
            # the grid moves a little with each new duration: never poll one job twice in
            # less than (most of) a grid step because of that
            step = (longest - shortest) / GRID_STEPS
            target = max(target, elapsed + GAP_FACTOR * step)
        return min(max(target, elapsed + MIN_STEP), elapsed + MAX_GAP)


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------

#: why a run ended
STOP_DONE = "done"  # nothing left to do
STOP_INTERRUPTED = "interrupted"  # Ctrl-C (or stop())
STOP_FATAL = "fatal"  # the provider refused us (auth, funds, account)
STOP_BUDGET = "budget"  # budget.max_usd would be passed
STOP_MAX_JOBS = "max_jobs"  # --max-jobs reached


@dataclass
class RunSummary:
    """What a run did, and the state it left."""

    run_id: int | None
    stop_reason: str
    #: jobs per state (every JobState value, plus "retired"), after the run
    counts: dict[str, int]
    elapsed: float
    #: submits sent this run (retries included), jobs whose result came back, jobs finished done
    submitted: int = 0
    finished: int = 0
    downloaded: int = 0
    images: int = 0
    failed: int = 0
    unknown: int = 0
    #: estimated USD of every submit that may have reached the API (all runs), and of the plan
    spent_usd: float = 0.0
    planned_usd: float = 0.0
    #: jobs of the manifest without a price (counted as $0 in the estimates)
    unpriced: int = 0
    #: (error class, sample message, count) over failed/unknown jobs of the state
    top_errors: list[tuple[str, str, int]] = field(default_factory=list)
    #: errors met this run by class (retried ones included)
    errors: dict[str, int] = field(default_factory=dict)
    rate_limited: int = 0
    possible_duplicates: int = 0
    output_dir: str = ""
    message: str | None = None
    exported: bool = False

    @property
    def images_per_minute(self) -> float:
        """Images written per minute of this run."""
        return 60.0 * self.images / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def exit_code(self) -> int:
        """0 all done (or --max-jobs reached), 1 failed/unknown/budget, 3 fatal, 130 interrupted."""
        if self.stop_reason == STOP_FATAL:
            return 3
        if self.stop_reason == STOP_INTERRUPTED:
            return 130
        if self.counts.get("failed", 0) or self.counts.get("unknown", 0):
            return 1
        if self.stop_reason == STOP_BUDGET:
            return 1
        return 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (for the runs table and ``--json``)."""
        data = asdict(self)
        data["images_per_minute"] = round(self.images_per_minute, 3)
        data["exit_code"] = self.exit_code
        data["top_errors"] = [list(t) for t in self.top_errors]
        return data


# --------------------------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Active:
    """A request in flight remotely, as the scheduler sees it."""

    job: Job
    request_id: str
    #: clock time the submit was answered (or, on resume, when it was submitted)
    t0: float
    deadline: float
    phase: float
    polls: int = 0
    #: elapsed (since t0) when the last poll was sent
    last_elapsed: float = 0.0
    next_at: float = math.inf
    polling: bool = False
    poll_errors: int = 0
    running: bool = False
    #: polled early and often while its model has no history (PollPlanner's scout)
    scout: bool = False


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _remote_duration(result: RemoteResult) -> float | None:
    """Seconds from the server's ``created_at`` to its ``finished_at``, when both are given."""
    start, end = _parse_time(result.created_at), _parse_time(result.finished_at)
    if start is None or end is None:
        return None
    return (end - start).total_seconds()


def _describe(error: Any) -> str:
    if error is None:
        return "the request failed (no detail given)"
    if isinstance(error, str):
        return error
    return json.dumps(error, ensure_ascii=False, default=str)[:2000]


class Runner:
    """Drive the jobs of ``store`` through ``provider`` until none is left (or told to stop).

    :param store: the state database (jobs already synced from the manifest)
    :param provider: the remote API
    :param manifest: limits, budget, output folder and download settings come from it
    :param limiter: rate meters and in-flight cap (built from ``manifest.limits`` when None)
    :param on_event: ``on_event(kind, **data)`` progress callback (see :meth:`run`)
    :param download_client: an HTTP client for downloads (``batchgen.download`` builds one if None)
    :param cancel_queued: on a stop, cancel requests still queued remotely
    :param clock: monotonic seconds
    """

    def __init__(
        self,
        store: Store,
        provider: Provider,
        manifest: Manifest,
        limiter: RateLimiter | None = None,
        *,
        on_event: EventCallback | None = None,
        download_client: Any = None,
        cancel_queued: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.provider = provider
        self.manifest = manifest
        limits = manifest.limits
        self.limiter = limiter or RateLimiter(
            limits.submits_per_minute, limits.requests_per_second, limits.max_in_flight
        )
        self._on_event = on_event
        self._download_client = download_client
        self.cancel_queued = cancel_queued
        self.clock = clock
        self.max_attempts = int(limits.max_attempts)
        self.job_timeout = float(limits.job_timeout)
        self.on_ambiguous = str(limits.on_ambiguous_submit)
        self.max_usd: float | None = manifest.budget.max_usd
        self.output_root = Path(manifest.output)
        self.planner = PollPlanner(getattr(limits, "poll_interval", None))
        settings = getattr(manifest, "download", None)
        self.download_max_bytes = int(getattr(settings, "max_bytes", 200_000_000))
        self.download_timeout = float(getattr(settings, "timeout", 120.0))
        self._download_concurrency = int(getattr(settings, "concurrency", 8))
        self._download_slots = asyncio.Semaphore(self._download_concurrency)
        self._own_client = False

        self._stop_reason: str | None = None
        #: why submitting stopped early while the run went on (budget, --max-jobs)
        self._soft_reason: str | None = None
        self._max_jobs: int | None = None
        self._message: str | None = None
        self._submitting_stopped = False
        self._aborted = False
        self._active: dict[str, _Active] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._heap_changed = asyncio.Event()
        #: set when a job may have become claimable again (released, or a slot freed)
        self._released = asyncio.Event()
        self._idle = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._submit_tasks: set[asyncio.Task[None]] = set()
        self._download_tasks: set[asyncio.Task[None]] = set()
        self._claimable: deque[Job] = deque()
        self._retry: list[tuple[float, int, str]] = []
        self._retry_ids: set[str] = set()
        self._rate_limited_submits: Counter[str] = Counter()
        self._phase = itertools.count()
        self._claimed: set[str] = set()
        #: model → id of the job scouting it (polled early while the model has no history)
        self._scouts: dict[str, str] = {}
        self._spent = 0.0
        self._errors: Counter[str] = Counter()
        self._counters: Counter[str] = Counter()
        self._loop_task: asyncio.Task[None] | None = None
        self._submit_loop_task: asyncio.Task[None] | None = None

    # -- events --------------------------------------------------------------------------

    def _emit(self, kind: str, **data: Any) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(kind, **data)
        except Exception:  # a broken progress bar must not stop a paid run
            log.exception("on_event callback failed for %s", kind)

    def _error(
        self, exc: BaseException | str, job_id: str | None, action: str, cls: str | None = None
    ) -> None:
        error_class = str(cls or getattr(exc, "error_class", None) or type(exc).__name__)
        message = getattr(exc, "message", None) or str(exc)
        self._errors[error_class] += 1
        log.info("%s (%s) job %s: %s", error_class, action, job_id, message)
        self._emit("error", error_class=error_class, message=message, job_id=job_id, action=action)

    # -- public control ------------------------------------------------------------------

    def stop(self, reason: str = STOP_INTERRUPTED) -> None:
        """Stop submitting; let writes in flight finish; :meth:`run` then returns."""
        if self._stop_reason is None:
            self._stop_reason = reason
            log.info("stopping: %s", reason)
            self._emit("stop", reason=reason, message=self._message)
        self._submitting_stopped = True
        if self._submit_loop_task is not None and not self._submit_loop_task.done():
            # Safe: the submit loop only awaits before mark_submitting (slots, meters); the
            # POST itself runs in its own task, which is left to finish.
            self._submit_loop_task.cancel()
        # Polls are reads: cancelling one at any await (waiting for the meter, or for the
        # answer) changes no state, and the next run polls that request again. Only POSTs in
        # flight (their request id must be stored) and downloads are waited for.
        for task in list(self._tasks):
            task.cancel()
        self._heap_changed.set()
        self._check_idle()

    def abort(self) -> None:
        """Stop at once: cancel every task (a second Ctrl-C). The state stays resumable."""
        self._aborted = True
        self.stop(STOP_INTERRUPTED)
        for task in list(self._tasks | self._submit_tasks | self._download_tasks):
            task.cancel()
        self._idle.set()

    @property
    def stopping(self) -> bool:
        """True once a stop was asked for (or the run ran out of allowed work)."""
        return self._stop_reason is not None

    # -- the run -------------------------------------------------------------------------

    async def run(self, max_jobs: int | None = None, *, take_lock: bool = True) -> RunSummary:
        """Run until every job is settled, or a stop; returns the summary.

        Events: ``start`` (totals), ``submitted``, ``finished`` (with ``status``), ``downloaded``,
        ``error`` (``error_class``, ``message``, ``action``: retry/failed/unknown/stop),
        ``slow_down`` (``delay``, ``retry_after``), ``stop`` (``reason``), ``end`` (``summary``).

        :param max_jobs: submit at most this many distinct jobs in this run
        :param take_lock: hold the state's runner lock (False when the caller already holds it)
        """
        if max_jobs is not None and max_jobs < 0:
            raise ValueError(f"max_jobs must be 0 or more, got {max_jobs}")
        with self.store.lock() if take_lock else contextlib.nullcontext():
            return await self._run_locked(max_jobs)

    async def _run_locked(self, max_jobs: int | None) -> RunSummary:
        store = self.store
        started = self.clock()
        recovered = store.recover(self.on_ambiguous, max_attempts=self.max_attempts)
        run_id = store.start_run(str(self.manifest.path), self.manifest.hash, __version__)
        self._spent = store.cost()[0]
        self._max_jobs = max_jobs
        self._resume()
        counts = store.counts()
        to_submit = counts.get("pending", 0)
        if max_jobs is not None:
            to_submit = min(to_submit, max_jobs)
        self._emit(
            "start",
            run_id=run_id,
            counts=counts,
            to_submit=to_submit,
            in_flight=len(self._active),
            downloading=len(self._download_tasks),
            recovered=recovered,
        )
        self._submit_loop_task = asyncio.create_task(self._submit_loop())
        self._loop_task = asyncio.create_task(self._poll_loop())
        try:
            self._check_idle()
            await self._idle.wait()
            if self.stopping and not self._aborted:
                await self._drain()
        finally:
            for task in (self._submit_loop_task, self._loop_task):
                task.cancel()
            everything = [
                self._submit_loop_task,
                self._loop_task,
                *self._tasks,
                *self._submit_tasks,
                *self._download_tasks,
            ]
            if self._aborted:
                for task in everything:
                    task.cancel()
            await asyncio.gather(*everything, return_exceptions=True)
        if (
            self.cancel_queued
            and self._stop_reason in (STOP_INTERRUPTED, STOP_FATAL)
            and not self._aborted
        ):
            await self._cancel_queued()
        if self._own_client and self._download_client is not None:
            await self._download_client.aclose()
        summary = self._summary(run_id, started)
        if not self._aborted:
            summary.exported = self._export()
        store.finish_run(run_id, summary.as_dict())
        self._emit("end", summary=summary)
        return summary

    def _resume(self) -> None:
        """Take up what an earlier run left in flight: poll queued/running, finish downloads."""
        now_mono = self.clock()
        now_wall = datetime.now(UTC)
        for job in self.store.jobs([JobState.QUEUED, JobState.RUNNING]):
            if job.request_id is None:  # cannot happen by the store's transitions; be safe
                self.store.mark_failed(job.id, "internal", "in flight without a request id")
                continue
            submitted = _parse_time(job.submitted_at)
            age = (now_wall - submitted).total_seconds() if submitted else 0.0
            self.limiter.in_flight.take()
            active = self._track(job, job.request_id, now_mono - max(0.0, age))
            active.running = job.state == JobState.RUNNING
            # poll it now: it may well have finished while nobody was watching
            self._schedule(active, now_mono)
        for job in self.store.jobs([JobState.DOWNLOADING]):
            self._start_download(job, job.request_id, list(job.output_uris))

    def _summary(self, run_id: int, started: float) -> RunSummary:
        store = self.store
        counts = store.counts()
        spent, planned = store.cost()
        stop_reason = self._stop_reason or self._soft_reason or STOP_DONE
        return RunSummary(
            run_id=run_id,
            stop_reason=stop_reason,
            counts=counts,
            elapsed=self.clock() - started,
            submitted=self._counters["submitted"],
            finished=self._counters["finished"],
            downloaded=self._counters["downloaded"],
            images=self._counters["images"],
            failed=self._counters["failed"],
            unknown=self._counters["unknown"],
            spent_usd=round(spent, 6),
            planned_usd=round(planned, 6),
            unpriced=store.unpriced(),
            top_errors=store.top_errors(5),
            errors=dict(self._errors),
            rate_limited=self.limiter.rate_limited,
            possible_duplicates=store.possible_duplicates(),
            output_dir=str(self.output_root),
            message=self._message,
        )

    def _export(self) -> bool:
        """Write the dataset files (metadata.jsonl, stats.json, …) when batchgen.export exists."""
        try:
            from . import export
        except ImportError:  # pragma: no cover - the export module ships with batchgen
            return False
        try:
            export.write_outputs(self.store, self.manifest)
        except BatchgenError as exc:
            self._error(exc, None, "export", cls="export")
            return False
        return True

    async def _drain(self) -> None:
        """After a stop: wait for POSTs, polls and downloads already under way."""
        pending = [
            t for t in (*self._submit_tasks, *self._tasks, *self._download_tasks) if not t.done()
        ]
        while pending:
            await asyncio.gather(*pending, return_exceptions=True)
            pending = [
                t
                for t in (*self._submit_tasks, *self._tasks, *self._download_tasks)
                if not t.done()
            ]

    def _check_idle(self) -> None:
        """Wake run() when nothing is left: no claimable work, nothing in flight."""
        if self._submit_loop_task is None:
            return
        submit_loop_over = self._submit_loop_task.done()
        busy = self._submit_tasks or self._download_tasks or self._tasks
        if self.stopping:
            # in-flight remote requests are left for the next run to poll
            if submit_loop_over and not busy:
                self._idle.set()
            return
        if submit_loop_over and not busy and not self._active:
            self._idle.set()

    def _spawn(self, coro: Any, group: set[asyncio.Task[None]]) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        group.add(task)

        def done(t: asyncio.Task[None]) -> None:
            group.discard(t)
            # a finished POST may have released its job, or left nothing to wait for
            self._released.set()
            if not t.cancelled() and t.exception() is not None:
                exc = t.exception()
                log.error("internal error in the runner", exc_info=exc)
                self._message = f"internal error: {exc!r}"
                self.stop(STOP_FATAL)
            self._check_idle()

        task.add_done_callback(done)

    # -- claiming and submitting ---------------------------------------------------------

    def _fill_claimable(self) -> None:
        batch = max(64, 2 * self.limiter.in_flight.limit)
        for job in self.store.next_pending(batch + len(self._retry_ids)):
            if job.id not in self._retry_ids:
                self._claimable.append(job)

    async def _next_job(self) -> Job | None:
        """The next job to submit: a retry that is due, else the next pending job in plan order."""
        while True:
            now = self.clock()
            if self._retry and self._retry[0][0] <= now:
                _, _, job_id = heapq.heappop(self._retry)
                self._retry_ids.discard(job_id)
                job = self.store.get(job_id)
                if job.state == JobState.PENDING and job.in_manifest:
                    return job
                continue
            if not self._claimable:
                self._fill_claimable()
            while self._claimable:
                job = self._claimable.popleft()
                if job.id not in self._retry_ids:
                    return job
            # nothing claimable now: wait for a retry to fall due, or for a POST in flight to
            # release its job, or give up if neither can happen
            if not self._retry and not self._submit_tasks:
                return None
            timeout = (self._retry[0][0] - now) if self._retry else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._released.wait(), timeout)
            self._released.clear()

    async def _submit_loop(self) -> None:
        slots = self.limiter.in_flight
        try:
            while not self._submitting_stopped:
                await slots.acquire()
                try:
                    job = await self._next_job()
                    if job is None or self._submitting_stopped:
                        slots.release()
                        break
                    if not self._admit(job):
                        slots.release()
                        break
                    await self.limiter.submit()
                except BaseException:
                    slots.release()
                    raise
                # No await between here and the POST task: a cancel cannot cut in between.
                if self._submitting_stopped:
                    slots.release()
                    break
                try:
                    claimed = self.store.mark_submitting(job.id)
                except BatchgenError as exc:  # changed under us (e.g. retired): skip it
                    log.warning("cannot claim job %s: %s", job.id, exc)
                    slots.release()
                    continue
                self._claimed.add(job.id)
                if claimed.estimated_cost:
                    self._spent += claimed.estimated_cost
                self._counters["submitted"] += 1
                self._spawn(self._submit(claimed), self._submit_tasks)
        finally:
            self._check_idle_soon()

    def _check_idle_soon(self) -> None:
        asyncio.get_running_loop().call_soon(self._check_idle)

    def _admit(self, job: Job) -> bool:
        """Budget and --max-jobs checks before a job is claimed; False stops submitting."""
        if (
            self._max_jobs is not None
            and job.id not in self._claimed
            and len(self._claimed) >= self._max_jobs
        ):
            self._message = f"--max-jobs {self._max_jobs} reached"
            self.stop_submitting(STOP_MAX_JOBS)
            return False
        if self.max_usd is not None:
            cost = job.estimated_cost
            if cost is None:
                self._message = (
                    f"budget.max_usd is set but model {job.model} has no price: add it under "
                    "`prices:` in the manifest to submit its jobs"
                )
                self.stop_submitting(STOP_BUDGET)
                return False
            if self._spent + cost > self.max_usd + 1e-9:
                self._message = (
                    f"budget reached: ${self._spent:.2f} spent (estimated), the next job "
                    f"(${cost:.2f}) would pass budget.max_usd ${self.max_usd:.2f}"
                )
                self.stop_submitting(STOP_BUDGET)
                return False
        return True

    def stop_submitting(self, reason: str) -> None:
        """Submit nothing more, but finish what is in flight (budget, --max-jobs)."""
        if not self._submitting_stopped:
            self._submitting_stopped = True
            self._soft_reason = reason
            log.info("no more submits: %s", self._message or reason)
            self._emit("stop_submitting", reason=reason, message=self._message)

    def _requeue(self, job_id: str, delay: float) -> None:
        heapq.heappush(self._retry, (self.clock() + delay, next(self._seq), job_id))
        self._retry_ids.add(job_id)
        self._released.set()

    async def _submit(self, job: Job) -> None:
        """The paid POST of one claimed job, and what its answer means for the job."""
        slots = self.limiter.in_flight
        try:
            submission = await self.provider.submit(job.model, job.params)
        except RateLimitedError as exc:
            slots.release()
            self._rate_limited_submits[job.id] += 1
            self._slow_down(exc)
            self.store.release(job.id, exc.error_class, exc.message)
            self._spent -= job.estimated_cost or 0.0
            self._error(exc, job.id, "retry")
            self._requeue(job.id, 0.0)  # the run-wide pause spaces it
            return
        except TransientError as exc:
            slots.release()
            tries = job.attempts - self._rate_limited_submits[job.id]
            if tries >= self.max_attempts:
                self.store.mark_failed(
                    job.id, exc.error_class, f"{exc.message} (gave up after {tries} attempts)"
                )
                self._counters["failed"] += 1
                self._error(exc, job.id, "failed")
                return
            self.store.release(job.id, exc.error_class, exc.message)
            self._spent -= job.estimated_cost or 0.0
            self._error(exc, job.id, "retry")
            self._requeue(job.id, exc.retry_after or min(30.0, 0.5 * 2**tries))
            return
        except AmbiguousSubmitError as exc:
            slots.release()
            self._ambiguous(job, exc.message, exc.error_class)
            return
        except JobRejectedError as exc:
            slots.release()
            self.store.mark_failed(job.id, exc.error_class, exc.message)
            self._counters["failed"] += 1
            self._error(exc, job.id, "failed")
            return
        except FatalProviderError as exc:
            slots.release()
            # 401/402/403 are refusals: nothing was created, the job goes back to pending
            self.store.release(job.id, exc.error_class, exc.message)
            self._spent -= job.estimated_cost or 0.0
            self._fatal(exc, job.id)
            return
        except ProviderError as exc:  # a class the provider did not narrow: be careful, park
            slots.release()
            self._ambiguous(job, exc.message, exc.error_class)
            return
        except asyncio.CancelledError:
            # aborted mid-POST: the job stays `submitting`; the next run's recover() settles it
            slots.release()
            raise
        except Exception as exc:  # a bug (in a provider?) while the POST was out: it may be paid
            slots.release()
            log.exception("unexpected error submitting job %s", job.id)
            self._ambiguous(job, f"unexpected error while submitting: {exc!r}", "internal")
            return
        self.store.mark_queued(job.id, submission.request_id)
        self.limiter.record_success()
        now = self.clock()
        active = self._track(job, submission.request_id, now)
        self._emit("submitted", job_id=job.id, model=job.model, request_id=submission.request_id)
        self._schedule(active)

    def _ambiguous(self, job: Job, message: str, error_class: str) -> None:
        if self.on_ambiguous == "retry" and job.attempts < self.max_attempts:
            self.store.release(
                job.id,
                error_class,
                f"resubmitting, possible duplicate: {message}",
                possible_duplicate=True,
            )
            self._error(message, job.id, "retry", cls=error_class)
            self._emit("possible_duplicate", job_id=job.id)
            self._requeue(job.id, 0.0)
        else:
            self.store.mark_unknown(job.id, message)
            self._counters["unknown"] += 1
            self._error(message, job.id, "unknown", cls=error_class)

    def _slow_down(self, exc: RateLimitedError) -> None:
        slow = self.limiter.slow_down(exc.retry_after)
        if slow.escalated:
            self._emit(
                "slow_down", delay=slow.delay, retry_after=slow.retry_after, level=slow.level
            )

    def _fatal(self, exc: FatalProviderError, job_id: str | None) -> None:
        self._message = exc.message
        self._error(exc, job_id, "stop")
        self.stop(STOP_FATAL)

    # -- tracking and polling ------------------------------------------------------------

    def _track(self, job: Job, request_id: str, t0: float) -> _Active:
        phase = (next(self._phase) * 0.6180339887498949) % 1.0
        active = _Active(job, request_id, t0, t0 + self.job_timeout, phase)
        if job.model not in self._scouts and not self.planner.samples(job.model):
            active.scout = True
            self._scouts[job.model] = job.id
        self._active[job.id] = active
        return active

    def _untrack(self, active: _Active) -> None:
        if self._active.pop(active.job.id, None) is not None:
            self.limiter.in_flight.release()
        if active.scout and self._scouts.get(active.job.model) == active.job.id:
            # finished without a duration (failed, timed out)? the next job takes over
            del self._scouts[active.job.model]
        self._check_idle()

    def _schedule(self, active: _Active, at: float | None = None) -> None:
        if at is None:
            job = active.job
            elapsed = self.planner.next_poll(
                job.model, active.last_elapsed, active.polls, active.phase, scout=active.scout
            )
            at = active.t0 + elapsed
        at = min(at, active.deadline)
        active.next_at = at
        heapq.heappush(self._heap, (at, next(self._seq), active.job.id))
        self._heap_changed.set()

    def _replan(self, model: str) -> None:
        """New duration data for ``model``: move every waiting poll of it to its new time."""
        now = self.clock()
        for active in self._active.values():
            if active.job.model != model or active.polling:
                continue
            elapsed = self.planner.next_poll(
                model, active.last_elapsed, active.polls, active.phase, scout=active.scout
            )
            at = max(now, min(active.t0 + elapsed, active.deadline))
            if abs(at - active.next_at) > 1e-3:
                self._schedule(active, at)

    async def _poll_loop(self) -> None:
        """The single scheduler: pop polls that are due, run each in its own task."""
        while not self.stopping:
            now = self.clock()
            while self._heap and self._heap[0][0] <= now:
                at, _, job_id = heapq.heappop(self._heap)
                active = self._active.get(job_id)
                if active is None or active.polling or abs(active.next_at - at) > 1e-9:
                    continue  # stale entry (rescheduled, or the job left)
                active.polling = True
                self._spawn(self._poll(active), self._tasks)
            self._heap_changed.clear()
            timeout = (self._heap[0][0] - now) if self._heap else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._heap_changed.wait(), timeout)

    async def _poll(self, active: _Active) -> None:
        job = active.job
        try:
            if self.clock() >= active.deadline:
                await self._timed_out(active)
                return
            await self.limiter.request()
            sent = self.clock()
            active.last_elapsed = sent - active.t0
            active.polls += 1
            log.debug("poll %s #%d at %.3fs", job.id, active.polls, active.last_elapsed)
            try:
                result = await self.provider.result(active.request_id)
            except RateLimitedError as exc:
                self._slow_down(exc)
                self._error(exc, job.id, "retry")
                active.polling = False
                self._schedule(active, self.clock())  # the run-wide pause decides when
                return
            except TransientError as exc:
                active.poll_errors += 1
                self._error(exc, job.id, "retry")
                delay = exc.retry_after or min(30.0, 0.5 * 2**active.poll_errors)
                active.polling = False
                self._schedule(active, self.clock() + delay)
                return
            except JobRejectedError as exc:  # unknown or expired request id
                self._finish(active, "failed")
                self.store.mark_failed(job.id, exc.error_class, exc.message)
                self._counters["failed"] += 1
                self._error(exc, job.id, "failed")
                return
            except FatalProviderError as exc:
                active.polling = False
                self._fatal(exc, job.id)
                return
            except ProviderError as exc:
                active.poll_errors += 1
                self._error(exc, job.id, "retry")
                active.polling = False
                self._schedule(active, self.clock() + min(30.0, 0.5 * 2**active.poll_errors))
                return
            self.limiter.record_success()
            active.poll_errors = 0
            await self._handle_result(active, result)
        finally:
            active.polling = False

    async def _handle_result(self, active: _Active, result: RemoteResult) -> None:
        job = active.job
        if result.running:
            if result.status == "in_progress" and not active.running:
                self.store.mark_running(job.id)
                active.running = True
            if self.clock() >= active.deadline:
                await self._timed_out(active)
                return
            active.polling = False
            self._schedule(active)
            return
        # finished, one way or another: learn how long it took
        duration = _remote_duration(result)
        if duration is None:
            duration = self.clock() - active.t0
        self.planner.observe(job.model, duration)
        self._finish(active, result.status)
        if result.succeeded:
            if not result.outputs:
                self.store.mark_failed(job.id, "no_outputs", "the request succeeded with no output")
                self._counters["failed"] += 1
                self._error(
                    "the request succeeded with no output", job.id, "failed", cls="no_outputs"
                )
            else:
                self.store.mark_downloading(job.id, list(result.outputs))
                if not self.stopping:
                    self._start_download(job, active.request_id, list(result.outputs), result)
        elif result.status == "cancelled":
            self.store.mark_cancelled(job.id)
        else:
            message = _describe(result.error)
            self.store.mark_failed(job.id, "job_failed", message)
            self._counters["failed"] += 1
            self._error(message, job.id, "failed", cls="job_failed")
        self._replan(job.model)

    def _finish(self, active: _Active, status: str) -> None:
        self._counters["finished"] += 1
        self._emit("finished", job_id=active.job.id, status=status)
        self._untrack(active)

    async def _timed_out(self, active: _Active) -> None:
        job = active.job
        message = f"no result after {self.job_timeout:g}s (limits.job_timeout)"
        self._finish(active, "timeout")
        self.store.mark_failed(job.id, "job_timeout", message)
        self._counters["failed"] += 1
        self._error(message, job.id, "failed", cls="job_timeout")

    async def _cancel_queued(self) -> None:
        """--cancel-queued: ask the API to drop every request still queued remotely."""
        for active in list(self._active.values()):
            if active.running:
                continue
            try:
                await self.limiter.request()
                outcome = await self.provider.cancel(active.request_id)
            except ProviderError as exc:
                self._error(exc, active.job.id, "cancel")
                continue
            if outcome.outcome == "cancelled":
                self.store.mark_cancelled(active.job.id)
                self._emit("cancelled", job_id=active.job.id)
                self._untrack(active)

    # -- downloads -----------------------------------------------------------------------

    def _start_download(
        self, job: Job, request_id: str | None, uris: list[str], result: RemoteResult | None = None
    ) -> None:
        self._spawn(self._download(job, request_id, uris, result), self._download_tasks)

    async def _download(
        self, job: Job, request_id: str | None, uris: list[str], result: RemoteResult | None
    ) -> None:
        """Fetch every output of a finished job, record each, then mark it done."""
        async with self._download_slots:
            done = {o.index: o for o in self.store.outputs(job.id)}
            refreshed = False
            outputs: list[Output] = []
            for index, uri in enumerate(uris):
                previous = done.get(index)
                if previous is not None and (self.output_root / previous.path).is_file():
                    outputs.append(previous)
                    continue
                attempt = 0
                while True:
                    try:
                        output = await self._fetch_one(job, index, uri, request_id, result)
                        break
                    except ExpiredURLError as exc:
                        fresh = None if refreshed else await self._fresh_uris(request_id)
                        refreshed = True
                        if fresh and index < len(fresh) and fresh[index] != uri:
                            self._error(exc, job.id, "retry")
                            # recorded, so a crash now resumes with URLs that still work
                            self.store.update_output_uris(job.id, fresh)
                            uris = fresh
                            uri = fresh[index]
                            continue
                        self.store.mark_failed(
                            job.id,
                            exc.error_class,
                            f"{exc.message} (and no fresh URL from the result)",
                        )
                        self._counters["failed"] += 1
                        self._error(exc, job.id, "failed")
                        return
                    except DownloadError as exc:
                        attempt += 1
                        permanent = exc.error_class in download.PERMANENT_ERRORS
                        if permanent or attempt >= self.max_attempts:
                            tries = "" if permanent else f" (after {attempt} tries)"
                            self.store.mark_failed(job.id, exc.error_class, exc.message + tries)
                            self._counters["failed"] += 1
                            self._error(exc, job.id, "failed")
                            return
                        self._error(exc, job.id, "retry")
                        await asyncio.sleep(min(10.0, 0.25 * 2**attempt))
                self.store.record_output(output)
                outputs.append(output)
                self._counters["images"] += 1
            self.store.mark_done(job.id)
            self._counters["downloaded"] += 1
            self._emit("downloaded", job_id=job.id, files=[o.path for o in outputs])

    async def _fresh_uris(self, request_id: str | None) -> list[str] | None:
        """The result fetched once more, for output URLs that have not expired."""
        if request_id is None:
            return None
        try:
            await self.limiter.request()
            result = await self.provider.result(request_id)
        except ProviderError as exc:
            log.info("could not refresh the result of %s: %s", request_id, exc)
            return None
        return list(result.outputs) if result.succeeded else None

    async def _fetch_one(
        self, job: Job, index: int, uri: str, request_id: str | None, result: RemoteResult | None
    ) -> Output:
        """Download one output into the tree, write its sidecar, return its row (not yet stored)."""
        guess = download.ext_from_uri(uri, str(job.params.get("output_format") or "png"))
        dest = download.resolve_inside(self.output_root, download.output_path(job, index, guess))
        root = self.output_root.resolve()

        def sidecar(fetched: download.Fetched) -> dict[str, Any]:
            # called by fetch (on a worker thread for big files) between the rename and the fsync
            timings = {
                "submitted_at": job.submitted_at,
                "remote_created_at": result.created_at if result else None,
                "remote_finished_at": result.finished_at if result else None,
                "downloaded_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            }
            return download.sidecar_record(
                job,
                index=index,
                uri=uri,
                fetched=fetched,
                path=fetched.path.relative_to(root).as_posix(),
                request_id=request_id,
                timings=timings,
            )

        fetched = await download.fetch(
            self._client(),
            uri,
            dest,
            max_bytes=self.download_max_bytes,
            timeout=self.download_timeout,
            sidecar=sidecar,
        )
        relative = fetched.path.relative_to(root).as_posix()
        return Output(
            job_id=job.id,
            index=index,
            uri=uri,
            path=relative,
            bytes=fetched.bytes,
            sha256=fetched.sha256,
            width=fetched.width,
            height=fetched.height,
            content_type=fetched.content_type,
        )

    def _client(self) -> Any:
        if self._download_client is None:
            self._download_client = download.make_download_client(
                max_connections=self._download_concurrency, timeout=self.download_timeout
            )
            self._own_client = True
        return self._download_client
