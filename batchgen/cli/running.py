"""Running commands: ``run``, ``status``, ``retry`` and ``cancel``.

``run`` plans the manifest into its state database, then drives the jobs with
:class:`batchgen.runner.Runner`, drawing progress bars from the runner's events. ``status`` only
reads (it never takes the runner lock, so it works while a run goes). ``retry`` and ``cancel``
write, so they take the lock and refuse while a run holds it.

Exit codes (TARGETS.md U3): 0 all done, 1 some failed or unknown (or the budget stopped the
run), 2 bad manifest or usage, 3 fatal provider error (auth, funds), 130 interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from ..limits import RateLimiter
from ..manifest import Manifest
from ..plan import iter_jobs
from ..plan import validate as plan_validate
from ..providers import get_provider
from ..providers.base import Provider
from ..registry import ModelRegistry
from ..runner import STOP_DONE, Runner, RunSummary
from ..store import JobState, Store
from . import EXIT_INTERRUPTED, EXIT_USAGE, cli
from .common import echo_json, load, manifest_argument, state_option

#: a run is "large" (asks for confirmation unless --yes) past this estimated cost ...
CONFIRM_USD = 10.0
#: ... or past this many jobs to submit
CONFIRM_JOBS = 1_000

#: states still to be worked on, for ETA
_OPEN_STATES = ("pending", "submitting", "queued", "running", "downloading")


def _provider(manifest: Manifest) -> Provider:
    """The manifest's provider (``simulator`` starts the embedded server for this command)."""
    return get_provider(
        manifest.provider,
        simulator=manifest.simulator,
        max_connections=max(16, manifest.limits.max_in_flight + 8),
    )


def _money(value: float | None) -> str:
    return "unknown" if value is None else f"${value:,.2f}"


# -- progress ----------------------------------------------------------------------------------


class _NullBar:
    """A bar that draws nothing (``--quiet``)."""

    def __init__(self, total: int) -> None:
        self.total: int | None = total
        self.n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass


class Progress:
    """Renders runner events: three bars (submitted, finished, downloaded) and one line per new
    error class (the count of each is shown in the summary), never one line per error."""

    def __init__(self, *, quiet: bool) -> None:
        self.quiet = quiet
        self.bars: dict[str, Any] = {}
        self.errors: Counter[str] = Counter()
        self.told_slow_down = False

    def _bar(self, key: str, desc: str, total: int, position: int) -> Any:
        if self.quiet:
            return _NullBar(total)
        return tqdm(
            total=total,
            desc=desc,
            unit="job",
            position=position,
            dynamic_ncols=True,
            leave=True,
            smoothing=0.1,
            file=sys.stderr,
        )

    def write(self, line: str) -> None:
        if self.quiet:
            return
        tqdm.write(line, file=sys.stderr)

    def __call__(self, kind: str, **data: Any) -> None:
        if kind == "start":
            to_submit = int(data["to_submit"])
            in_flight = int(data["in_flight"])
            downloading = int(data["downloading"])
            self.bars["submitted"] = self._bar("submitted", "submitted ", to_submit, 0)
            self.bars["finished"] = self._bar("finished", "finished  ", to_submit + in_flight, 1)
            self.bars["downloaded"] = self._bar(
                "downloaded", "downloaded", to_submit + in_flight + downloading, 2
            )
            recovered = data.get("recovered") or {}
            if recovered.get("unknown"):
                self.write(
                    f"{recovered['unknown']} submit(s) cut off by the last stop are now 'unknown' "
                    "(they may have been accepted): `batchgen retry --unknown` resubmits them"
                )
            if in_flight or downloading:
                self.write(f"resuming: {in_flight} request(s) in flight, {downloading} download(s)")
        elif kind in ("submitted", "finished", "downloaded"):
            downloads = self.bars.get("downloaded")
            if kind == "finished" and data.get("status") != "succeeded" and downloads is not None:
                # nothing to download for a failed, cancelled or timed-out request
                downloads.total = max(downloads.n, (downloads.total or 0) - 1)
                downloads.refresh()
            bar = self.bars.get(kind)
            if bar is not None:
                if bar.total is not None and bar.n >= bar.total:  # resubmits of retried jobs
                    bar.total += 1
                bar.update(1)
        elif kind == "error":
            error_class = str(data["error_class"])
            self.errors[error_class] += 1
            if self.errors[error_class] == 1:
                action = {
                    "retry": "retrying",
                    "failed": "job failed",
                    "unknown": "parked as unknown",
                    "stop": "stopping",
                }.get(str(data.get("action")), str(data.get("action")))
                self.write(
                    f"! {error_class} ({action}): {data['message']} — further ones are counted"
                )
        elif kind == "slow_down":
            if not self.told_slow_down:
                self.told_slow_down = True
                why = (
                    f"Retry-After {data['retry_after']:g}s"
                    if data.get("retry_after") is not None
                    else "backing off with jitter"
                )
                self.write(f"! rate limited by the API: the whole run slows down ({why})")
        elif kind == "stop_submitting":
            self.write(f"no more submits: {data.get('message') or data['reason']}")
        elif kind == "end":
            for bar in self.bars.values():
                bar.close()


def _summary_lines(summary: RunSummary, manifest: Manifest) -> list[str]:
    counts = summary.counts
    order = [
        "done",
        "failed",
        "unknown",
        "cancelled",
        "pending",
        "queued",
        "running",
        "downloading",
    ]
    shown = " · ".join(f"{name} {counts.get(name, 0):,}" for name in order if counts.get(name))
    if counts.get("retired"):
        shown += f" · retired {counts['retired']:,}"
    headline = {
        STOP_DONE: "finished",
        "interrupted": "interrupted",
        "fatal": "stopped by the API",
        "budget": "stopped at the budget",
        "max_jobs": "stopped at --max-jobs",
    }.get(summary.stop_reason, summary.stop_reason)
    lines = [
        f"batchgen run {manifest.name}: {headline} in {summary.elapsed:,.1f}s",
        f"  jobs: {shown or 'none'}",
        f"  this run: {summary.submitted:,} submitted, {summary.images:,} images "
        f"({summary.images_per_minute:,.1f}/min), {summary.failed:,} failed",
        f"  estimated cost: {_money(summary.spent_usd)} spent of {_money(summary.planned_usd)} "
        "planned" + (f" ({summary.unpriced:,} jobs have no price)" if summary.unpriced else ""),
    ]
    if summary.errors:
        errors = ", ".join(
            f"{cls} ×{n}" for cls, n in sorted(summary.errors.items(), key=lambda x: -x[1])
        )
        lines.append(f"  errors this run: {errors}")
    for error_class, message, count in summary.top_errors[:3]:
        lines.append(f"  top error: {error_class} ({count}): {message[:160]}")
    if summary.possible_duplicates:
        lines.append(
            f"  possible duplicate submits (may be billed twice): {summary.possible_duplicates}"
        )
    if summary.message and summary.stop_reason != STOP_DONE:
        lines.append(f"  {summary.message}")
    if counts.get("unknown"):
        lines.append(
            "  unknown jobs may have been accepted by the API: check its dashboard, then "
            f"`batchgen retry {manifest.path.name} --unknown` to resubmit them"
        )
    if counts.get("failed"):
        lines.append(
            f"  `batchgen retry {manifest.path.name} --failed` tries the failed ones again"
        )
    if summary.stop_reason not in (STOP_DONE,) and any(counts.get(s) for s in _OPEN_STATES):
        lines.append(f"  run `batchgen run {manifest.path}` again to resume")
    lines.append(f"images in {summary.output_dir}")
    return lines


# -- run ---------------------------------------------------------------------------------------


async def _run_async(
    store: Store,
    manifest: Manifest,
    *,
    max_jobs: int | None,
    quiet: bool,
    cancel_queued: bool,
) -> RunSummary:
    progress = Progress(quiet=quiet)
    provider = _provider(manifest)
    limits = manifest.limits
    limiter = RateLimiter(
        limits.submits_per_minute, limits.requests_per_second, limits.max_in_flight
    )
    runner = Runner(
        store, provider, manifest, limiter, on_event=progress, cancel_queued=cancel_queued
    )
    loop = asyncio.get_running_loop()
    interrupts = 0

    def on_sigint() -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1:
            progress.write(
                "stopping: no new submits; writes in flight finish (Ctrl-C again to quit at once)"
            )
            runner.stop()
        else:
            runner.abort()

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    loop.add_signal_handler(signal.SIGTERM, on_sigint)
    try:
        return await runner.run(max_jobs=max_jobs, take_lock=False)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        loop.remove_signal_handler(signal.SIGTERM)
        await provider.aclose()


@cli.command("run")
@manifest_argument
@state_option
@click.option(
    "--max-jobs",
    type=click.IntRange(min=0),
    default=None,
    help="Submit at most N jobs in this run (the rest stay pending).",
)
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation of a large run.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars; only the final summary.")
@click.option(
    "--cancel-queued",
    is_flag=True,
    help="On Ctrl-C, also cancel the requests still queued remotely.",
)
def run_command(
    manifest_path: Path,
    state_path: Path | None,
    max_jobs: int | None,
    yes: bool,
    quiet: bool,
    cancel_queued: bool,
) -> None:
    """Generate every job of a manifest, resuming where the last run stopped.

    Plans the manifest into its state database (only new jobs are added), asks for
    confirmation when the run is large (over $10 estimated or 1,000 jobs; --yes skips it),
    then submits, polls and downloads within the manifest's limits. Ctrl-C stops submitting and
    lets writes in flight finish; a second Ctrl-C quits at once. Either way `run` again resumes.

    Exit codes: 0 all done, 1 some failed or unknown (or the budget stopped the run), 2 bad
    manifest or usage, 3 the API refused us (token, funds), 130 interrupted.

    Example:

    \b
        batchgen run manifests/demo.yaml
        RUNCOMFY_API_TOKEN=... batchgen run manifests/sweep.yaml --max-jobs 10
    """
    try:
        summary, manifest = _plan_and_run(
            manifest_path, state_path, max_jobs, yes, quiet, cancel_queued
        )
    except KeyboardInterrupt:  # Ctrl-C while planning or at the confirmation prompt
        click.echo("\ninterrupted before anything was submitted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    for line in _summary_lines(summary, manifest):
        click.echo(line)
    sys.exit(summary.exit_code)


def _plan_and_run(
    manifest_path: Path,
    state_path: Path | None,
    max_jobs: int | None,
    yes: bool,
    quiet: bool,
    cancel_queued: bool,
) -> tuple[RunSummary, Manifest]:
    manifest = load(manifest_path, state_path)
    registry = ModelRegistry.default()
    for warning in plan_validate(manifest, registry):
        click.echo(f"warning: {warning}", err=True)
    store = Store(manifest.state)
    try:
        with store.lock():
            report = store.sync(iter_jobs(manifest, registry))
            counts = store.counts()
            to_run = counts["pending"] if max_jobs is None else min(counts["pending"], max_jobs)
            # priced from the state with one indexed query each: a million-job plan is never
            # loaded (or expanded a second time) just to print its cost (TARGETS S2)
            _, run_cost, unpriced = store.pending_cost(to_run)
            cost_text = f"${run_cost:,.2f}" + (f" + {unpriced:,} unpriced" if unpriced else "")
            planned = store.cost()[1]
            planned_text = _money(planned if planned or not store.unpriced() else None)
            click.echo(
                f"{manifest.name}: {report.total:,} jobs ({report.added:,} new, "
                f"{counts.get('done', 0):,} done), {to_run:,} to submit, estimated cost "
                f"{cost_text} of {planned_text} planned, "
                f"provider {manifest.provider} → {manifest.output}"
            )
            large = run_cost > CONFIRM_USD or to_run > CONFIRM_JOBS
            if large and manifest.provider != "simulator" and not yes:
                if not sys.stdin.isatty():
                    click.echo(
                        f"Error: this run is large ({to_run:,} jobs, {cost_text} estimated) and "
                        "there is no terminal to confirm it: pass --yes to go ahead",
                        err=True,
                    )
                    sys.exit(EXIT_USAGE)
                if not click.confirm(f"Submit {to_run:,} jobs for about {cost_text}?"):
                    click.echo("nothing submitted")
                    sys.exit(0)
            summary = asyncio.run(
                _run_async(
                    store, manifest, max_jobs=max_jobs, quiet=quiet, cancel_queued=cancel_queued
                )
            )
    finally:
        store.close()
    return summary, manifest


# -- status ------------------------------------------------------------------------------------


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def status_data(manifest: Manifest) -> dict[str, Any]:
    """What ``status`` shows, as data (``--json`` prints exactly this)."""
    state = manifest.state
    data: dict[str, Any] = {
        "manifest": str(manifest.path),
        "name": manifest.name,
        "state": str(state),
        "output": str(manifest.output),
    }
    if not state.exists():
        data.update(
            counts={s.value: 0 for s in JobState} | {"retired": 0},
            total=0,
            running=False,
            note="no state yet: nothing has run",
        )
        return data
    store = Store(state, readonly=True)
    try:
        counts = store.counts()
        spent, planned = store.cost()
        rate = store.rate(300.0)
        runs = store.runs()
        top = store.top_errors(5)
        duplicates = store.possible_duplicates()
    finally:
        store.close()
    open_jobs = sum(counts.get(s, 0) for s in _OPEN_STATES)
    last = runs[-1] if runs else None
    active = bool(last and last["finished_at"] is None and _pid_alive(last.get("pid")))
    data.update(
        counts=counts,
        total=sum(v for k, v in counts.items() if k != "retired"),
        running=active,
        run_pid=last.get("pid") if active and last else None,
        rate_per_minute=round(rate * 60.0, 3),
        eta_seconds=round(open_jobs / rate, 1) if rate > 0 and open_jobs else None,
        spent_usd=round(spent, 6),
        planned_usd=round(planned, 6),
        possible_duplicates=duplicates,
        top_errors=[{"error_class": c, "message": m, "count": n} for c, m, n in top],
        last_run=None
        if last is None
        else {
            "id": last["id"],
            "started_at": last["started_at"],
            "finished_at": last["finished_at"],
            "stop_reason": (last.get("summary") or {}).get("stop_reason"),
        },
    )
    return data


@cli.command("status")
@manifest_argument
@state_option
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status_command(manifest_path: Path, state_path: Path | None, as_json: bool) -> None:
    """Where a manifest's jobs stand: counts by state, rate, ETA, cost, top errors.

    Read-only: safe while a run goes (it never takes the runner's lock).

    Example:

    \b
        batchgen status manifests/demo.yaml
        batchgen status manifests/demo.yaml --json
    """
    manifest = load(manifest_path, state_path)
    data = status_data(manifest)
    if as_json:
        echo_json(data)
        return
    counts = data["counts"]
    click.echo(f"{data['name']}: {data['total']:,} jobs  (state {data['state']})")
    if data.get("note"):
        click.echo(f"  {data['note']}")
        return
    for state in JobState:
        click.echo(f"  {state.value:<12}{counts.get(state.value, 0):>10,}")
    if counts.get("retired"):
        click.echo(f"  {'retired':<12}{counts['retired']:>10,}  (left the manifest, kept)")
    if data["running"]:
        click.echo(f"  a run is going (pid {data['run_pid']})")
    if data["rate_per_minute"]:
        eta = data["eta_seconds"]
        eta_text = f", ETA {_duration(eta)}" if eta else ""
        click.echo(f"  rate {data['rate_per_minute']:,.1f} jobs/min (last 5 min){eta_text}")
    click.echo(
        f"  estimated cost: {_money(data['spent_usd'])} spent of {_money(data['planned_usd'])} "
        "planned"
    )
    if data["possible_duplicates"]:
        click.echo(f"  possible duplicate submits: {data['possible_duplicates']}")
    for error in data["top_errors"]:
        click.echo(f"  error {error['error_class']} ({error['count']}): {error['message'][:160]}")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


# -- retry / cancel ----------------------------------------------------------------------------


@contextlib.contextmanager
def _locked_state(manifest: Manifest) -> Iterator[Store | None]:
    """The manifest's state held with the runner lock (writers refuse while a run goes);
    None when there is no state yet, which is never created just to be changed."""
    if not manifest.state.exists():
        yield None
        return
    store = Store(manifest.state)
    try:
        with store.lock():
            yield store
    finally:
        store.close()


@cli.command("retry")
@manifest_argument
@state_option
@click.option("--failed", is_flag=True, help="Send failed jobs back to pending.")
@click.option(
    "--unknown",
    is_flag=True,
    help="Send unknown jobs back to pending (they may already have been billed once).",
)
@click.option("--cancelled", is_flag=True, help="Send cancelled jobs back to pending.")
def retry_command(
    manifest_path: Path, state_path: Path | None, failed: bool, unknown: bool, cancelled: bool
) -> None:
    """Put failed / unknown / cancelled jobs back to pending, with their attempts reset.

    The next `batchgen run` submits them. An `unknown` job's first submit may have been
    accepted: resubmitting it may pay twice (check the API's dashboard first).

    Example:

    \b
        batchgen retry manifests/demo.yaml --failed
        batchgen retry manifests/demo.yaml --unknown
    """
    states = [
        state
        for state, wanted in (
            (JobState.FAILED, failed),
            (JobState.UNKNOWN, unknown),
            (JobState.CANCELLED, cancelled),
        )
        if wanted
    ]
    if not states:
        raise click.UsageError("say which jobs: --failed, --unknown and/or --cancelled")
    manifest = load(manifest_path, state_path)
    with _locked_state(manifest) as store:
        if store is None:
            click.echo(f"no state at {manifest.state}: nothing to retry")
            return
        n = store.reset(states)
    names = "/".join(s.value for s in states)
    click.echo(f"{n:,} {names} job{'s' * (n != 1)} back to pending: `batchgen run` submits them")


async def _cancel_remote(store: Store, manifest: Manifest) -> tuple[int, int, int]:
    from ..errors import JobRejectedError, ProviderError

    queued = store.jobs([JobState.QUEUED])
    if not queued:
        return 0, 0, 0
    provider = _provider(manifest)
    limiter = RateLimiter(None, manifest.limits.requests_per_second, 1)
    cancelled = not_cancellable = errors = 0
    try:
        for job in queued:
            assert job.request_id is not None
            await limiter.request()
            try:
                outcome = await provider.cancel(job.request_id)
            except JobRejectedError:
                # the API does not know the request (expired, or a simulator long gone)
                store.mark_cancelled(job.id)
                cancelled += 1
                continue
            except ProviderError as exc:
                click.echo(f"cannot cancel {job.id}: {exc}", err=True)
                errors += 1
                continue
            if outcome.outcome == "cancelled":
                store.mark_cancelled(job.id)
                cancelled += 1
            else:
                not_cancellable += 1
    finally:
        await provider.aclose()
    return cancelled, not_cancellable, errors


@cli.command("cancel")
@manifest_argument
@state_option
def cancel_command(manifest_path: Path, state_path: Path | None) -> None:
    """Cancel the pending jobs and the requests still queued remotely.

    Requests already running remotely cannot be cancelled (the API refuses): they finish, and
    the next `batchgen run` downloads them. `batchgen retry --cancelled` undoes a cancel.

    Example:

    \b
        batchgen cancel manifests/demo.yaml
    """
    manifest = load(manifest_path, state_path)
    with _locked_state(manifest) as store:
        if store is None:
            click.echo(f"no state at {manifest.state}: nothing to cancel")
            return
        pending = store.cancel_pending()
        cancelled, running, errors = asyncio.run(_cancel_remote(store, manifest))
    click.echo(
        f"cancelled {pending:,} pending job{'s' * (pending != 1)} and {cancelled:,} queued "
        f"request{'s' * (cancelled != 1)}"
        + (f"; {running:,} already running could not be cancelled" if running else "")
        + (f"; {errors:,} could not be reached" if errors else "")
    )
    if errors:
        sys.exit(1)
