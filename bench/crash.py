"""R1 crash benchmark: SIGKILL ``batchgen run`` at seeded moments, with the simulator's faults on.

``python -m bench crash`` (2,000 jobs, 10 kills) and ``tests/test_crash.py`` (300 jobs, 3 kills)
run the same harness, :func:`crash_run`:

1. start the embedded simulator in this process on loopback, faults on (429 with and without
   ``Retry-After``, 5xx, dropped connections, lost submit answers, failed jobs, truncated downloads,
   expiring URLs), at rates that make every fault fire several times;
2. run ``batchgen run MANIFEST --yes`` as a subprocess with ``provider: runcomfy`` and
   ``RUNCOMFY_BASE_URL``/``RUNCOMFY_API_TOKEN`` pointing at the simulator — the real provider,
   unchanged — and SIGKILL it on a seeded schedule (:func:`kill_schedule`): mostly once the
   simulator has accepted a seeded number of submits (plus a seeded delay), so kills land at
   random points of submitting, polling and downloading; some a moment after a restart starts,
   so they land in its recovery and plan sync;
3. restart it until it exits 0 or 1 (every job terminal); then ``batchgen retry --unknown`` and run
   again, on purpose, for the jobs a kill or a lost answer left ``unknown`` — the only submits
   allowed to repeat;
4. audit (:func:`audit`) the state, the disk and the simulator's metrics against target R1.

Invariants checked (each violation is a line in ``report["violations"]``; ``ok`` is their absence):

- every job is ``done``, ``failed`` with an error class and message, or ``unknown`` (counted);
- every ``done`` job has outputs; each output file exists once, at its recorded path inside the
  output folder, with the recorded sha256, which is the sha256 the simulator served for that URI;
- the output folder holds no ``.part``/temporary files, no symlinks, no file no job recorded;
- per distinct submit body, the simulator accepted at most 1 + (times that job was retried on
  purpose) submits;
- ``PRAGMA integrity_check`` is ``ok``.

The harness helpers (:func:`batchgen_command`, :func:`integrity_check`, :func:`walk_files`,
:func:`sha256_file`) are shared with the other reliability tests (secrets, hostile data,
concurrency).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: exit codes of ``batchgen run`` that mean "every job reached an end" (TARGETS.md U3)
TERMINAL_EXITS = (0, 1)
#: suffixes a crash may leave if writes are not atomic
TEMP_SUFFIXES = (".part", ".tmp", ".temp", "-journal")
#: the files batchgen writes at the output root besides images and their sidecars
ROOT_FILES = {"metadata.jsonl", "stats.json", "failures.jsonl"}
MODEL = "google/nano-banana/pro/text-to-image"


@dataclass(frozen=True)
class CrashConfig:
    """One crash scenario: how big, how many kills, how hostile the simulator is."""

    jobs: int
    kills: int
    seed: int = 20261122
    #: simulator: virtual GPUs and run time per request, seconds
    workers: int = 32
    latency: tuple[float, float] = (0.05, 0.4)
    #: manifest limits
    max_in_flight: int = 24
    max_attempts: int = 6
    #: the manifest's ``limits.on_ambiguous_submit``: park (unknown) or retry (counted)
    on_ambiguous: str = "park"
    #: kill once the simulator accepted this fraction range of the jobs, plus up to this delay
    kill_between: tuple[float, float] = (0.08, 0.85)
    kill_delay: tuple[float, float] = (0.0, 0.6)
    #: of the kills, how many strike this many seconds after the process starts instead: a
    #: restart's recovery, resume and plan sync (they come second, fourth, ... in the schedule)
    startup_kills: int = 1
    startup_window: tuple[float, float] = (1.0, 2.2)  # imports alone take ~0.9 s here
    #: how many ``retry --unknown`` + run rounds to make at most
    retry_rounds: int = 3
    #: one ``batchgen run`` may take this long before the harness calls it hung
    run_timeout: float = 120.0
    #: the simulator's faults, by the simulator's names (see :func:`simulator_faults`)
    faults: Mapping[str, Any] = field(default_factory=dict)


#: fault rates that make each fault fire several times on 300 jobs (each submit, poll and
#: download is a draw) while leaving most jobs to finish
DEFAULT_FAULTS: dict[str, Any] = {
    # a 429 slows the whole run down (as it must), so these two stay rare
    "http_429": 0.01,  # without Retry-After: backoff with jitter
    "http_429_retry_after": 0.01,
    "retry_after": 0.3,
    "http_5xx": 0.015,  # on a submit an ambiguous answer (unknown), on a read a retry
    "drop_connection": 0.015,  # likewise
    "lost_submit": 0.02,  # the job exists but the answer never comes: unknown
    "job_failure": 0.03,
    "truncated_download": 0.04,
    "url_ttl": 0.3,  # busy moments and restarts after a kill find URLs expired
}

SMALL = CrashConfig(jobs=300, kills=3, faults=DEFAULT_FAULTS, run_timeout=60.0)
FULL = CrashConfig(jobs=2000, kills=10, startup_kills=3, faults=DEFAULT_FAULTS, run_timeout=300.0)


# --------------------------------------------------------------------------- shared helpers


def batchgen_command(*args: str | os.PathLike[str]) -> list[str]:
    """The argv that runs this checkout's ``batchgen`` with this interpreter."""
    return [sys.executable, "-m", "batchgen", *(os.fspath(a) for a in args)]


def provider_env(base_url: str, token: str, **extra: str) -> dict[str, str]:
    """The environment of a ``batchgen`` subprocess aimed at a loopback RunComfy server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNCOMFY_", "BATCHGEN_"))}
    env.update(
        RUNCOMFY_BASE_URL=base_url,
        RUNCOMFY_API_TOKEN=token,
        PYTHONUNBUFFERED="1",
        # The checkout must win over any installed copy, whatever the cwd is.
        PYTHONPATH=os.pathsep.join(
            [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]
        ),
    )
    env.update(extra)
    return env


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def integrity_check(db_path: Path) -> str:
    """``PRAGMA integrity_check`` of a state database, opened read-only ("ok" when sound)."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    try:
        rows = conn.execute("PRAGMA integrity_check").fetchall()
    finally:
        conn.close()
    return "; ".join(str(r[0]) for r in rows)


def walk_files(root: Path) -> Iterator[Path]:
    """Every entry under ``root`` that is not a directory (symlinks included, never followed)."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in filenames:
            yield Path(dirpath) / name
        for name in dirnames:
            if (Path(dirpath) / name).is_symlink():
                yield Path(dirpath) / name


def secret_variants(secret: str) -> list[bytes]:
    """Byte strings whose presence betrays ``secret``: raw, and its base64 at each alignment.

    A base64 encoding of any text containing the secret contains, at one of three alignments,
    the encoding of the secret trimmed to whole 3-byte groups; those cores are what to grep for.
    """
    raw = secret.encode()
    found = [raw]
    for shift in range(3):
        padded = b"\0" * shift + raw
        encoded = base64.b64encode(padded)
        # The first group holds the stand-in prefix bytes, the last partial group the bytes
        # that would follow: both vary with context, the groups between do not.
        core = encoded[4 if shift else 0 : (len(padded) // 3) * 4]
        if len(core) >= 16:
            found.append(core)
    return found


@contextlib.contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """Serve an ASGI app on a free 127.0.0.1 port in a thread; yields its base URL."""
    import threading

    import uvicorn

    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        log_level="error",
        lifespan="off",
        ws="none",
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="reliability-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


# --------------------------------------------------------------------------- simulator glue


def simulator_faults(faults: Mapping[str, Any]) -> Any:
    """Build the simulator's ``Faults`` from this harness's fault names."""
    from batchgen.simulator import Faults

    return Faults.from_dict(dict(faults))


def duplicate_submits(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Bodies the simulator accepted more than once: ``body_sha256``, ``count``, ``request_ids``."""
    return list(metrics["submits"]["duplicates"])


def total_submits(metrics: Mapping[str, Any]) -> int:
    """Submits the simulator accepted (created a request for) so far."""
    return int(metrics["submits"]["total"])


def served_sha256(metrics: Mapping[str, Any]) -> dict[str, str]:
    """sha256 of every file the simulator served, by URI path."""
    return {str(path): str(entry["sha256"]) for path, entry in metrics["files"]["by_path"].items()}


def body_key(model_id: str, params: Mapping[str, Any]) -> str:
    """The key the simulator files a submit under: sha256 of the model id and canonical JSON."""
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{model_id}\n{canonical}".encode()).hexdigest()


def fault_counts(metrics: Mapping[str, Any]) -> dict[str, int]:
    """How many times each fault fired."""
    fired = {str(k): int(v) for k, v in metrics.get("faults", {}).items()}
    # job_failure is decided at submit and shows as the requests that ended failed
    fired["job_failure"] = int(metrics.get("jobs", {}).get("failed", 0))
    return fired


def file_requests_with_authorization(metrics: Mapping[str, Any]) -> int:
    """File downloads that arrived carrying an ``Authorization`` header."""
    return int(metrics["files"]["with_authorization"])


# --------------------------------------------------------------------------- the scenario


def write_crash_manifest(workdir: Path, cfg: CrashConfig) -> Path:
    """A manifest of ``cfg.jobs`` distinct jobs (distinct bodies) on the runcomfy provider."""
    if cfg.jobs % 2:
        raise ValueError(f"jobs must be even (two output formats per prompt), got {cfg.jobs}")
    prompts = workdir / "prompts.txt"
    prompts.write_text(
        "".join(
            f"crash test {i:05d}: a lighthouse at dusk, seen from the sea\n"
            for i in range(cfg.jobs // 2)
        ),
        encoding="utf-8",
    )
    manifest = workdir / "crash.yaml"
    manifest.write_text(
        f"""\
name: crash
provider: runcomfy
output: out
state: state/crash.db
limits:
  max_in_flight: {cfg.max_in_flight}
  max_attempts: {cfg.max_attempts}
  job_timeout: 300
  on_ambiguous_submit: {cfg.on_ambiguous}
download:
  timeout: 15
  max_bytes: 20000000
  concurrency: 8
sweeps:
  - name: crash
    model: {MODEL}
    prompts:
      - file: prompts.txt
        template: false
    params:
      resolution: 1K
      aspect_ratio: "1:1"
    grid:
      output_format: [png, webp]
""",
        encoding="utf-8",
    )
    return manifest


@dataclass
class _Attempt:
    """One ``batchgen run`` process of the scenario."""

    number: int
    kind: str  # "kill" | "finish" | "retry"
    exit_code: int | None = None
    killed: bool = False
    seconds: float = 0.0
    submits_at_kill: int | None = None
    #: jobs the kill caught mid-way, by state (read from the state right after the kill)
    caught: dict[str, int] = field(default_factory=dict)


def _run_once(
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: Path,
    log_stem: Path,
    timeout: float,
    kill_when: Any = None,
) -> tuple[int | None, bool, float]:
    """Run one batchgen process, SIGKILLed once ``kill_when()`` says so: (rc, killed, seconds)."""
    started = time.monotonic()
    with open(f"{log_stem}.out", "wb") as out, open(f"{log_stem}.err", "wb") as err:
        proc = subprocess.Popen(
            list(argv), cwd=cwd, env=dict(env), stdout=out, stderr=err, start_new_session=True
        )
        try:
            while proc.poll() is None:
                if kill_when is not None and kill_when():
                    # The whole session: a real crash leaves no helper process behind either.
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return None, True, time.monotonic() - started
                if time.monotonic() - started > timeout:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    raise TimeoutError(
                        f"{' '.join(argv[3:])} did not finish in {timeout:.0f} s; "
                        f"see {log_stem}.err"
                    )
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return proc.returncode, False, time.monotonic() - started


def kill_schedule(cfg: CrashConfig) -> list[tuple[int, float]]:
    """The seeded kill points: (simulator submits to wait for, then seconds to wait).

    Progress kills take one point per equal slice of the submit range, so no two fall together;
    startup kills (0 submits, a delay in ``startup_window``) are put second, fourth, ... so that
    they hit a restart's recovery of the state an earlier kill left.
    """
    rng = random.Random(cfg.seed)
    progress = cfg.kills - cfg.startup_kills
    lo, hi = (cfg.jobs * f for f in cfg.kill_between)
    step = (hi - lo) / max(progress, 1)
    points = [
        (max(1, int(rng.uniform(lo + i * step, lo + (i + 1) * step))), rng.uniform(*cfg.kill_delay))
        for i in range(progress)
    ]
    for k in range(cfg.startup_kills):
        points.insert(min(1 + 2 * k, len(points)), (0, rng.uniform(*cfg.startup_window)))
    return points


def crash_run(cfg: CrashConfig, workdir: Path) -> dict[str, Any]:
    """Run the whole R1 scenario in ``workdir`` and return its report (see module docstring)."""
    from batchgen.simulator import Simulator, SimulatorConfig

    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    manifest = write_crash_manifest(workdir, cfg)
    schedule = kill_schedule(cfg)
    sim_cfg = SimulatorConfig(
        workers=cfg.workers,
        latency=cfg.latency,
        seed=cfg.seed,
        image_mode="small",
        faults=simulator_faults(cfg.faults),
    )
    attempts: list[_Attempt] = []
    retried: Counter[str] = Counter()
    unknown_before_retry: list[int] = []
    with Simulator(sim_cfg) as sim:
        env = provider_env(sim.base_url, sim.token)
        run_argv = batchgen_command("run", manifest, "--yes")

        def attempt(kind: str, kill_at: int | None = None, delay: float = 0.0) -> _Attempt:
            """One run; with ``kill_at``, SIGKILL it ``delay`` s after that many submits."""
            record = _Attempt(number=len(attempts) + 1, kind=kind)
            attempts.append(record)
            reached: list[float] = []
            looked = [0.0]

            def kill_when() -> bool:
                now = time.monotonic()
                if not reached:
                    # A metrics snapshot costs the simulator some work: look 5 times a second.
                    if now - looked[0] < 0.2:
                        return False
                    looked[0] = now
                    if total_submits(sim.metrics()) < (kill_at or 0):
                        return False
                    reached.append(now)
                return now - reached[0] >= delay

            rc, killed, seconds = _run_once(
                run_argv,
                env,
                workdir,
                logs / f"run-{record.number:02d}",
                cfg.run_timeout,
                kill_when if kill_at is not None else None,
            )
            record.exit_code, record.killed, record.seconds = rc, killed, seconds
            if killed:
                record.submits_at_kill = total_submits(sim.metrics())
                record.caught = _caught(workdir / "state/crash.db")
            elif rc not in TERMINAL_EXITS:
                err = (logs / f"run-{record.number:02d}.err").read_text(errors="replace")
                raise RuntimeError(
                    f"batchgen run exited {rc} (attempt {record.number}):\n{err[-3000:]}"
                )
            return record

        # Phase 1: kill at each point; a run that ends before its point just ends.
        for kill_at, delay in schedule:
            if attempt("kill", kill_at, delay).exit_code in TERMINAL_EXITS:
                break
        # Phase 2: restart until every job is terminal.
        while not attempts or attempts[-1].exit_code not in TERMINAL_EXITS:
            if len(attempts) > cfg.kills + 5:
                raise RuntimeError("batchgen run did not reach an end after 5 restarts")
            attempt("finish")
        # Phase 3: retry the unknown jobs, on purpose, and count them.
        for _round in range(cfg.retry_rounds):
            unknown = _job_ids(workdir / "state/crash.db", "unknown")
            unknown_before_retry.append(len(unknown))
            if not unknown:
                break
            retried.update(unknown)
            _run_checked(
                batchgen_command("retry", manifest, "--unknown"),
                env,
                workdir,
                logs / f"retry-{_round + 1}",
            )
            attempt("retry")  # raises unless it ends with every job terminal
        metrics = sim.metrics()
    (workdir / "metrics.json").write_text(json.dumps(metrics, default=str))

    report = audit(workdir / "state/crash.db", workdir / "out", metrics, retried)
    report.update(
        jobs=cfg.jobs,
        kills_planned=cfg.kills,
        kills=sum(a.killed for a in attempts),
        # every kill was followed by a restart that resumed (an attempt that fails raises)
        kills_survived=sum(a.killed for a in attempts),
        kill_points_submits=[a.submits_at_kill for a in attempts if a.killed],
        kills_caught=[a.caught for a in attempts if a.killed],
        runs=len(attempts),
        exit_codes=[a.exit_code for a in attempts],
        unknown_before_retry=unknown_before_retry,
        unknown_retried_jobs=len(retried),
        faults_fired=fault_counts(metrics),
        seconds=round(time.monotonic() - started, 1),
    )
    if report["kills"] < cfg.kills:
        report["violations"].append(
            f"only {report['kills']} of {cfg.kills} kills happened: the run ended first"
        )
    report["ok"] = not report["violations"]
    return report


def _run_checked(argv: Sequence[str], env: Mapping[str, str], cwd: Path, log_stem: Path) -> None:
    """Run a short batchgen command that must exit 0."""
    rc, _, _ = _run_once(argv, env, cwd, log_stem, timeout=60.0)
    if rc != 0:
        err = Path(f"{log_stem}.err").read_text(errors="replace")
        raise RuntimeError(f"{' '.join(argv[3:])} exited {rc}:\n{err[-3000:]}")


def _caught(db_path: Path) -> dict[str, int]:
    """Jobs left mid-way (submitting, queued, running, downloading) in a killed run's state."""
    from batchgen.errors import StoreError
    from batchgen.store import Store

    try:
        store = Store(db_path, readonly=True)
    except StoreError:
        return {}  # killed before the state was created or migrated
    try:
        counts = store.counts()
    finally:
        store.close()
    return {k: counts[k] for k in ("submitting", "queued", "running", "downloading") if counts[k]}


def _job_ids(db_path: Path, state: str) -> list[str]:
    """Ids of the jobs in ``state`` (read through the Store, as batchgen itself reads)."""
    from batchgen.store import JobState, Store

    store = Store(db_path, readonly=True)
    try:
        return [job.id for job in store.jobs([JobState(state)])]
    finally:
        store.close()


def audit(
    db_path: Path,
    output_root: Path,
    metrics: Mapping[str, Any],
    retried: Mapping[str, int],
) -> dict[str, Any]:
    """Check the R1 invariants on a finished state, its output folder and the simulator metrics."""
    from batchgen.store import JobState, Store

    violations: list[str] = []
    integrity = integrity_check(db_path)
    if integrity != "ok":
        violations.append(f"PRAGMA integrity_check: {integrity}")

    store = Store(db_path, readonly=True)
    try:
        jobs = store.jobs()
        outputs = store.outputs()
    finally:
        store.close()
    states = Counter(job.state.value for job in jobs)
    served = served_sha256(metrics)
    root = output_root.resolve()
    by_job: dict[str, list[Any]] = {}
    for out in outputs:
        by_job.setdefault(out.job_id, []).append(out)

    terminal = {JobState.DONE, JobState.FAILED, JobState.UNKNOWN}
    recorded_paths: Counter[Path] = Counter()
    for job in jobs:
        if job.state not in terminal:
            violations.append(f"job {job.id} ended {job.state.value}, not done/failed/unknown")
        if job.state is JobState.FAILED and not (job.error_class and job.last_error):
            violations.append(
                f"failed job {job.id} has no reason ({job.error_class!r}, {job.last_error!r})"
            )
        if job.state is not JobState.DONE:
            continue
        if not by_job.get(job.id):
            violations.append(f"done job {job.id} has no output recorded")
        for out in by_job.get(job.id, []):
            path = (root / out.path).resolve()
            recorded_paths[path] += 1
            if not path.is_relative_to(root):
                violations.append(f"job {job.id} output {out.path!r} is outside {root}")
                continue
            if not path.is_file():
                violations.append(f"job {job.id} output {out.path} is missing")
                continue
            on_disk = sha256_file(path)
            if on_disk != out.sha256:
                violations.append(
                    f"job {job.id} output {out.path}: sha256 on disk {on_disk} "
                    f"!= recorded {out.sha256}"
                )
            if path.stat().st_size != out.bytes:
                violations.append(
                    f"job {job.id} output {out.path}: {path.stat().st_size} bytes "
                    f"on disk, {out.bytes} recorded"
                )
            violations += _check_sidecar(path, job, out)
            expected = served.get(_uri_path(out.uri))
            if expected is None:
                violations.append(f"job {job.id} output {out.uri}: the simulator never served it")
            elif expected != out.sha256:
                violations.append(
                    f"job {job.id} output {out.path}: sha256 {out.sha256} != "
                    f"served {expected} (truncated or mixed up)"
                )
    for path, n in recorded_paths.items():
        if n > 1:
            violations.append(f"{n} outputs recorded at the same path {path}")

    # The disk: only recorded images, their sidecars and the root files; nothing temporary.
    sidecars = {_sidecar(path) for path in recorded_paths}
    unfinished = _paths_of_unfinished(by_job, jobs, root)
    images_on_disk = 0
    for file in walk_files(output_root):
        rel = file.relative_to(output_root)
        resolved = file.resolve()
        if file.is_symlink():
            violations.append(f"symlink in the output folder: {rel}")
        elif file.name.endswith(TEMP_SUFFIXES) or (
            file.name.startswith(".") and "tmp" in file.name
        ):
            violations.append(f"temporary file left behind: {rel}")
        elif str(rel) in ROOT_FILES or resolved in sidecars:
            continue
        elif resolved in recorded_paths:
            images_on_disk += 1
        elif resolved in unfinished or _sidecar(resolved) in unfinished:
            continue  # recorded by a job that then failed (its files are kept for inspection)
        else:
            violations.append(f"file no done job recorded: {rel}")

    # Duplicate submits: per body, at most 1 + the times the job was retried on purpose.
    duplicates = 0
    unexplained = 0
    by_key = {body_key(job.model, job.params): job for job in jobs}
    by_request = {job.request_id: job for job in jobs if job.request_id}
    for entry in duplicate_submits(metrics):
        n = int(entry["count"])
        duplicates += n - 1
        owner = by_key.get(entry["body_sha256"]) or next(
            (by_request[r] for r in entry["request_ids"] if r in by_request), None
        )
        if owner is None:
            unexplained += n - 1
            violations.append(
                f"body {entry['body_sha256'][:12]} was submitted {n} times; no "
                f"job matches it (request ids {entry['request_ids']})"
            )
            continue
        # retried on purpose: by the user (`retry --unknown`), or by batchgen under
        # `on_ambiguous_submit: retry`, which must count each such resubmit on the job
        allowed = 1 + retried.get(owner.id, 0) + owner.possible_duplicates
        if n > allowed:
            unexplained += n - allowed
            violations.append(
                f"job {owner.id} was submitted {n} times; at most {allowed} allowed "
                f"({retried.get(owner.id, 0)} retries by the user, {owner.possible_duplicates} "
                "counted possible duplicates)"
            )
    submits = total_submits(metrics)
    distinct = int(metrics["submits"]["distinct_bodies"])
    if distinct > len(jobs):
        violations.append(f"the simulator saw {distinct} distinct bodies for {len(jobs)} jobs")
    done = states.get("done", 0)
    if distinct < done:
        violations.append(f"{done} jobs done but only {distinct} distinct bodies submitted")

    return {
        "states": dict(sorted(states.items())),
        "outputs": len(outputs),
        "images_on_disk": images_on_disk,
        "submits": submits,
        "duplicates": duplicates,
        "duplicates_unexplained": unexplained,
        "possible_duplicates_counted": sum(job.possible_duplicates for job in jobs),
        "integrity_check": integrity,
        "violations": violations,
    }


def _sidecar(image: Path) -> Path:
    """Where batchgen writes an image's JSON sidecar."""
    from batchgen.download import sidecar_path

    return sidecar_path(image)


def _check_sidecar(image: Path, job: Any, out: Any) -> list[str]:
    """The sidecar beside a done image exists and describes that very download."""
    sidecar = _sidecar(image)
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return [f"job {job.id} output {out.path}: sidecar {sidecar.name} unreadable ({exc})"]
    wrong = {
        key: (data.get(key), want)
        for key, want in (
            ("job_id", job.id),
            ("sha256", out.sha256),
            ("request_id", job.request_id),
        )
        if data.get(key) != want
    }
    return [f"job {job.id} output {out.path}: sidecar says {wrong}"] if wrong else []


def _paths_of_unfinished(
    by_job: Mapping[str, list[Any]], jobs: Sequence[Any], root: Path
) -> set[Path]:
    """Recorded output paths of jobs that did not end ``done`` (a partly downloaded job)."""
    return {
        (root / out.path).resolve()
        for job in jobs
        if job.state.value != "done"
        for out in by_job.get(job.id, [])
    }


def _uri_path(uri: str) -> str:
    """The path part of a URI, which is what the simulator files served hashes under."""
    from urllib.parse import urlsplit

    return urlsplit(uri).path


def run(small: bool) -> dict[str, Any]:
    """``python -m bench crash [--small]``: the scenario in a temporary folder; prints figures."""
    cfg = SMALL if small else FULL
    with tempfile.TemporaryDirectory(prefix="batchgen-crash-") as tmp:
        report = crash_run(cfg, Path(tmp))
    print(
        f"jobs {report['jobs']}, kills survived {report['kills_survived']}/{cfg.kills}, "
        f"runs {report['runs']}, states {report['states']}"
    )
    print(
        f"submits {report['submits']}, duplicates {report['duplicates']} "
        f"(unexplained {report['duplicates_unexplained']}), unknown retried on purpose "
        f"{report['unknown_retried_jobs']}, integrity {report['integrity_check']}"
    )
    print(f"faults fired {report['faults_fired']}, {report['seconds']} s")
    for line in report["violations"][:20]:
        print(f"VIOLATION {line}")
    return report
