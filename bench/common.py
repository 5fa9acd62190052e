"""Helpers the benchmarks share: a simulator in a subprocess, a throwaway manifest, a measured
``batchgen run`` child, process CPU and RSS, and read-only looks at a state database.

Invariants the benchmarks rely on:

- The simulator always runs in its own process (``Simulator(cfg, subprocess=True)``), so it never
  shares a GIL or a CPU-time account with the client being measured.
- A measured child (``batchgen run`` or the baseline script) is reaped with ``os.wait4``, which
  returns that child's own resource usage: its CPU seconds and peak RSS are exact, not a
  ``RUSAGE_CHILDREN`` difference that other children could pollute.
- The state database is only ever opened read-only here (``mode=ro`` URI), so sampling it while a
  run writes cannot take a lock the runner needs or change a row.
- ``bench_bodies(n)`` and ``write_manifest(..., jobs=n)`` describe the same ``n`` request bodies,
  so batchgen and the baseline loop submit exactly the same calls.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from batchgen.simulator import Simulator

#: the model every benchmark submits to: it takes a seed, so ``n`` jobs are ``n`` distinct bodies
BENCH_MODEL = "blackforestlabs/flux-2/max/text-to-image"
BENCH_PROMPT = "a red fox in fresh snow, benchmark"
#: the repository root, so children import this checkout's batchgen and bench
ROOT = Path(__file__).resolve().parents[1]


def bench_bodies(n: int) -> list[dict[str, Any]]:
    """The ``n`` request bodies of a benchmark: one prompt, seeds 1..n (what the manifest plans)."""
    return [{"prompt": BENCH_PROMPT, "seed": seed} for seed in range(1, n + 1)]


def api_from_env(
    base_url: str | None = None, token: str | None = None
) -> tuple[str | None, str | None]:
    """The API to use: the arguments, else ``RUNCOMFY_BASE_URL`` / ``RUNCOMFY_API_TOKEN``."""
    return (
        base_url or os.environ.get("RUNCOMFY_BASE_URL"),
        token or os.environ.get("RUNCOMFY_API_TOKEN"),
    )


@contextlib.contextmanager
def simulator(
    *,
    workers: int,
    latency: tuple[float, float] | str = (0.0, 0.0),
    image_mode: Literal["full", "small"] = "small",
    seed: int = 0,
    **config: Any,
) -> Iterator[Simulator]:
    """A simulator in a subprocess (zero latency and small images unless told otherwise)."""
    from batchgen.simulator import Simulator, SimulatorConfig

    cfg = SimulatorConfig(
        workers=workers, latency=latency, image_mode=image_mode, seed=seed, **config
    )
    with Simulator(cfg, subprocess=True) as sim:
        yield sim


def total_calls(metrics: dict[str, Any]) -> dict[str, int]:
    """API calls per endpoint from the simulator's metrics (downloads excluded)."""
    by_endpoint = metrics["calls"]["by_endpoint"]  # {endpoint: {status code: count}}
    return {
        endpoint: sum(by_endpoint.get(endpoint, {}).values())
        for endpoint in ("submit", "status", "result", "cancel")
    }


def cpu_seconds(who: int = resource.RUSAGE_SELF) -> float:
    """User + system CPU seconds of this process (or of its reaped children)."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def rss_bytes(pid: int) -> int | None:
    """The resident set size of a live process from ``/proc/<pid>/status``, None once it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024  # the kernel reports kB
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None  # a zombie has no VmRSS line


def write_manifest(
    folder: Path,
    *,
    jobs: int,
    max_in_flight: int,
    name: str = "bench",
    poll_interval: float | None = None,
    download_concurrency: int | None = None,
    limits: dict[str, Any] | None = None,
) -> Path:
    """Write a manifest of ``jobs`` jobs (the bodies of ``bench_bodies(jobs)``) into ``folder``.

    It uses ``provider: runcomfy``, so the run talks to whatever ``RUNCOMFY_BASE_URL`` names (the
    subprocess simulator); state and output go to ``folder/state.db`` and ``folder/out``.
    """
    import yaml

    limit_keys: dict[str, Any] = {"max_in_flight": max_in_flight, "max_jobs": max(jobs, 1)}
    if poll_interval is not None:
        limit_keys["poll_interval"] = poll_interval
    limit_keys.update(limits or {})
    manifest: dict[str, Any] = {
        "version": 1,
        "name": name,
        "provider": "runcomfy",
        "output": str(folder / "out"),
        "state": str(folder / "state.db"),
        "limits": limit_keys,
        "sweeps": [
            {
                "name": "bench",
                "model": BENCH_MODEL,
                "prompts": [BENCH_PROMPT],
                "grid": {"seed": {"range": [1, jobs]}},
            }
        ],
    }
    if download_concurrency is not None:
        manifest["download"] = {"concurrency": download_concurrency}
    path = folder / "bench.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path


@dataclass
class Sample:
    """One look at a running child: seconds since start, its RSS, and anything the probe adds."""

    at: float
    rss: int | None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ChildRun:
    """What a measured child did: exit code, wall time, its own CPU and peak RSS, its output.

    ``voluntary_switches`` counts the times it blocked (fsync, a lock, a thread hand-off):
    unlike wall time, it hardly moves with the machine's load, so it shows blocking reliably.
    """

    returncode: int
    seconds: float
    cpu_seconds: float
    max_rss_bytes: int
    stdout: str
    stderr: str
    samples: list[Sample]
    user_seconds: float = 0.0
    system_seconds: float = 0.0
    voluntary_switches: int = 0


def run_child(
    argv: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    sample_every: float | None = None,
    probe: Callable[[], dict[str, Any]] | None = None,
    timeout: float = 600.0,
) -> ChildRun:
    """Run ``argv``, optionally sampling its RSS (and ``probe()``) every ``sample_every`` seconds.

    The child is reaped with ``os.wait4`` so the CPU and peak RSS are its own. Output goes to
    temporary files (not pipes), so a chatty child never blocks on a full pipe. Past ``timeout``
    the child is killed and the run reports its exit code (negative: the signal).
    """
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(
            list(argv), stdout=out, stderr=err, env=env, cwd=cwd, start_new_session=True
        )
        samples: list[Sample] = []
        stop = threading.Event()

        def watch() -> None:
            interval = sample_every if sample_every is not None else 0.5
            while not stop.is_set():
                if sample_every is not None:
                    extra = probe() if probe is not None else {}
                    samples.append(
                        Sample(round(time.perf_counter() - started, 3), rss_bytes(proc.pid), extra)
                    )
                if time.perf_counter() - started > timeout:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    return
                stop.wait(interval)

        watcher = threading.Thread(target=watch, name="bench-sampler", daemon=True)
        watcher.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            raise
        finally:
            stop.set()
            watcher.join()
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)  # we reaped it; tell Popen
        out.seek(0)
        err.seek(0)
        return ChildRun(
            returncode=proc.returncode,
            seconds=round(seconds, 3),
            cpu_seconds=round(usage.ru_utime + usage.ru_stime, 3),
            max_rss_bytes=usage.ru_maxrss * 1024,  # Linux reports kB
            stdout=out.read(),
            stderr=err.read(),
            samples=samples,
            user_seconds=round(usage.ru_utime, 3),
            system_seconds=round(usage.ru_stime, 3),
            voluntary_switches=usage.ru_nvcsw,
        )


def child_env(base_url: str, token: str) -> dict[str, str]:
    """The environment of a measured child: this one, pointed at the simulator."""
    # A developer's own RUNCOMFY_* / BATCHGEN_* settings must not leak into a measured run.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNCOMFY_", "BATCHGEN_"))}
    env["RUNCOMFY_BASE_URL"] = base_url
    env["RUNCOMFY_API_TOKEN"] = token
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def batchgen_argv(manifest: Path, *extra: str, profile_to: Path | None = None) -> list[str]:
    """``python -m batchgen run MANIFEST --yes --quiet`` (under cProfile when ``profile_to``)."""
    prefix = [sys.executable]
    if profile_to is not None:
        prefix += ["-m", "cProfile", "-o", str(profile_to)]
    return [*prefix, "-m", "batchgen", "run", str(manifest), "--yes", "--quiet", *extra]


def run_batchgen(
    manifest: Path,
    *,
    base_url: str,
    token: str,
    extra: Sequence[str] = (),
    sample_every: float | None = None,
    probe: Callable[[], dict[str, Any]] | None = None,
    profile_to: Path | None = None,
    timeout: float = 600.0,
) -> ChildRun:
    """Run ``batchgen run`` on ``manifest`` as a measured child talking to ``base_url``."""
    return run_child(
        batchgen_argv(manifest, *extra, profile_to=profile_to),
        env=child_env(base_url, token),
        cwd=manifest.parent,
        sample_every=sample_every,
        probe=probe,
        timeout=timeout,
    )


def _connect_ro(db: Path) -> sqlite3.Connection:
    # mode=ro: never a write, never a lock the runner could wait on (WAL readers do not block)
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0)


def counts_by_state(db: Path) -> dict[str, int]:
    """Jobs per state in a state database, read-only; empty while the database does not exist."""
    if not db.exists():
        return {}
    try:
        with contextlib.closing(_connect_ro(db)) as conn:
            rows = conn.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall()
    except sqlite3.OperationalError:  # not created yet, or migrations still running
        return {}
    return {str(state): int(count) for state, count in rows}


def done_count(db: Path) -> int | None:
    """Jobs ``done`` so far, read-only; None while the database or its table does not exist."""
    if not db.exists():
        return None
    try:
        with contextlib.closing(_connect_ro(db)) as conn:
            (count,) = conn.execute("SELECT count(*) FROM jobs WHERE state = 'done'").fetchone()
    except sqlite3.OperationalError:
        return None
    return int(count)


def run_phase(db: Path) -> dict[str, Any]:
    """First submit to last done of a finished run, from the state database's timestamps."""
    from datetime import datetime

    with contextlib.closing(_connect_ro(db)) as conn:
        first, last, done = conn.execute(
            "SELECT min(submitted_at), max(done_at), count(*) FROM jobs WHERE state = 'done'"
        ).fetchone()
    if not done:
        return {"jobs": 0, "seconds": None}
    seconds = (datetime.fromisoformat(last) - datetime.fromisoformat(first)).total_seconds()
    return {
        "jobs": int(done),
        "seconds": round(seconds, 3),
        "first_submit": first,
        "last_done": last,
    }


def mib(n: int | None) -> float | None:
    """Bytes as MiB, rounded for printing."""
    return None if n is None else round(n / 2**20, 1)
