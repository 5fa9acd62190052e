"""R5: one runner per state, and readers that never get in its way.

- Two ``batchgen run`` on one state at once: the second refuses at once with a clear message and
  exit code 2 (TARGETS.md U3: usage), submits nothing and writes nothing; the first finishes
  every job, with no duplicate submit and a sound database.
- ``batchgen status --json`` polled hard (back-to-back subprocesses) and the Store read from
  another connection in a tight loop while a run writes: no reader ever errors ("database is
  locked"), every snapshot is whole (the per-state counts sum to the job total) and ``done`` never
  goes down; and the run under this load takes about as long as the same run without it.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from batchgen.errors import StoreError
from batchgen.simulator import Simulator, SimulatorConfig
from batchgen.store import JobState, Store
from bench.crash import batchgen_command, integrity_check, provider_env, total_submits

pytestmark = pytest.mark.timeout(150)

MODEL = "google/nano-banana/pro/text-to-image"
STATES = [s.value for s in JobState]


def _manifest(workdir: Path, jobs: int, max_in_flight: int) -> Path:
    (workdir / "prompts.txt").write_text(
        "".join(f"concurrency test {i}: a windmill in a field\n" for i in range(jobs)),
        encoding="utf-8",
    )
    manifest = workdir / "conc.yaml"
    manifest.write_text(
        f"""\
name: conc
provider: runcomfy
output: out
state: state/conc.db
limits: {{max_in_flight: {max_in_flight}}}
sweeps:
  - model: {MODEL}
    params: {{resolution: 1K, aspect_ratio: "1:1", output_format: png}}
    prompts:
      - file: prompts.txt
        template: false
""",
        encoding="utf-8",
    )
    return manifest


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def state_counts(status_json: dict[str, Any]) -> dict[str, int]:
    """The per-state counts in ``batchgen status --json`` (under each state's own name)."""
    for holder in (status_json, status_json.get("counts"), status_json.get("states")):
        if isinstance(holder, dict) and all(name in holder for name in STATES):
            return {name: int(holder[name]) for name in STATES}
    raise AssertionError(f"no count per state in status --json: {sorted(status_json)}")


def test_second_run_refuses_and_nothing_is_corrupted(tmp_path: Path) -> None:
    jobs = 24
    manifest = _manifest(tmp_path, jobs, max_in_flight=4)
    with Simulator(SimulatorConfig(latency=(0.6, 0.6), workers=4, image_mode="small")) as sim:
        env = provider_env(sim.base_url, sim.token)
        first = subprocess.Popen(
            batchgen_command("run", manifest, "--yes"),
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            # Once the simulator has a submit, the first run holds the lock and is mid-run.
            _wait_for(lambda: total_submits(sim.metrics()) > 0, 30, "a submit")
            before = total_submits(sim.metrics())
            second = subprocess.run(
                batchgen_command("run", manifest, "--yes"),
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            during = total_submits(sim.metrics())
            assert first.poll() is None, "the first run ended before the second was tried"
            _, err = first.communicate(timeout=90)
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
        metrics = sim.metrics()

    assert second.returncode == 2, (second.returncode, second.stderr)
    message = second.stderr.strip()
    assert "Traceback" not in message
    assert "another batchgen run" in message and str(first.pid) in message, message
    assert str(tmp_path / "state" / "conc.db") in message or "conc.db" in message, message
    # the second run refused before claiming anything: at most the first run's submits moved on
    assert during - before <= 4 + 1
    assert first.returncode == 0, err.decode()[-3000:]

    assert metrics["submits"]["total"] == jobs, metrics["submits"]
    assert metrics["submits"]["duplicate_submits"] == 0, metrics["submits"]
    assert integrity_check(tmp_path / "state" / "conc.db") == "ok"
    store = Store(tmp_path / "state" / "conc.db")
    try:
        assert store.counts()["done"] == jobs
        assert len(store.outputs()) == jobs
    finally:
        store.close()


def test_two_runs_started_together_one_wins(tmp_path: Path) -> None:
    """Started in the same instant (both plan and sync at once): one runs, one refuses."""
    jobs = 12
    manifest = _manifest(tmp_path, jobs, max_in_flight=4)
    with Simulator(SimulatorConfig(latency=(0.2, 0.2), workers=4, image_mode="small")) as sim:
        env = provider_env(sim.base_url, sim.token)
        procs = [
            subprocess.Popen(
                batchgen_command("run", manifest, "--yes"),
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        errs = [p.communicate(timeout=90)[1] for p in procs]
        results = [(p.returncode, err) for p, err in zip(procs, errs, strict=True)]
        metrics = sim.metrics()
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refusal = next(err for code, err in results if code == 2)
    assert "another batchgen run" in refusal and "Traceback" not in refusal, refusal
    assert metrics["submits"]["total"] == jobs and metrics["submits"]["duplicate_submits"] == 0
    assert integrity_check(tmp_path / "state" / "conc.db") == "ok"
    with Store(tmp_path / "state" / "conc.db", readonly=True) as store:
        assert store.counts()["done"] == jobs


def test_lock_is_released_by_the_os_after_sigkill(tmp_path: Path) -> None:
    """A SIGKILLed runner leaves no lock behind: the next run starts, resumes, finishes."""
    manifest = _manifest(tmp_path, 12, max_in_flight=4)
    with Simulator(SimulatorConfig(latency=(0.4, 0.4), workers=4, image_mode="small")) as sim:
        env = provider_env(sim.base_url, sim.token)
        first = subprocess.Popen(
            batchgen_command("run", manifest, "--yes"),
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_for(lambda: total_submits(sim.metrics()) > 0, 30, "a submit")
        first.kill()
        first.wait()
        again = subprocess.run(
            batchgen_command("run", manifest, "--yes"),
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert again.returncode in (0, 1), again.stderr[-3000:]
    assert "another batchgen run" not in again.stderr


class _Hammer:
    """Reads the state as fast as it can from another process and another connection."""

    def __init__(self, manifest: Path, db: Path, env: dict[str, str], total: int) -> None:
        self.manifest, self.db, self.env, self.total = manifest, db, env, total
        self.stop = threading.Event()
        #: set once the run has written its plan: from then on every snapshot must be whole
        self.synced = threading.Event()
        self.errors: list[str] = []
        self.status_calls = 0
        self.store_reads = 0
        self.slowest_status = 0.0
        self._count_lock = threading.Lock()
        # `status` processes back to back, and a tight reader on its own connection; one
        # status loop only: more would measure CPU contention on a 2-core box, not blocking
        self._threads = [
            threading.Thread(target=self._status_loop, daemon=True),
            threading.Thread(target=self._store_loop, daemon=True),
        ]

    def __enter__(self) -> _Hammer:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(30)

    def _check(self, source: str, counts: dict[str, int], last_done: list[int]) -> None:
        total = sum(counts[name] for name in STATES)
        if total != self.total:
            self.errors.append(f"{source}: torn snapshot, states sum to {total}: {counts}")
        if counts["done"] < last_done[0]:
            self.errors.append(f"{source}: done went down {last_done[0]} → {counts['done']}")
        last_done[0] = counts["done"]

    def _status_loop(self) -> None:
        last_done = [0]
        self.synced.wait(60)
        while not self.stop.is_set():
            started = time.monotonic()
            result = subprocess.run(
                batchgen_command("status", self.manifest, "--json"),
                env=self.env,
                cwd=self.manifest.parent,
                capture_output=True,
                text=True,
                timeout=60,
            )
            with self._count_lock:
                self.slowest_status = max(self.slowest_status, time.monotonic() - started)
                self.status_calls += 1
            if "locked" in result.stderr.lower() or result.returncode not in (0, 1):
                self.errors.append(f"status exited {result.returncode}: {result.stderr[-500:]}")
                continue
            self._check("status --json", state_counts(json.loads(result.stdout)), last_done)

    def _store_loop(self) -> None:
        last_done = [0]
        # The run creates and migrates the database first; until then there is nothing to read.
        deadline = time.monotonic() + 30
        while True:
            try:
                store = Store(self.db, readonly=True)  # as `status` reads: its own connection
                break
            except StoreError as exc:
                if self.stop.is_set() or time.monotonic() > deadline:
                    self.errors.append(f"Store() never opened: {exc}")
                    return
                time.sleep(0.01)
        try:
            while not self.stop.is_set():
                try:
                    counts = store.counts()
                except Exception as exc:
                    self.errors.append(f"Store.counts(): {exc!r}")
                    continue
                self.store_reads += 1
                if not self.synced.is_set():
                    if sum(counts[name] for name in STATES) == 0:
                        continue  # the run has not written its plan yet
                    self.synced.set()
                self._check("Store.counts()", counts, last_done)
                time.sleep(0.005)
        finally:
            store.close()


def _timed_run(workdir: Path, jobs: int, hammer: bool) -> dict[str, Any]:
    workdir.mkdir()
    manifest = _manifest(workdir, jobs, max_in_flight=8)
    db = workdir / "state" / "conc.db"
    with Simulator(
        SimulatorConfig(latency=(0.3, 0.3), workers=8, image_mode="small", seed=3)
    ) as sim:
        env = provider_env(sim.base_url, sim.token)
        if hammer:
            with _Hammer(manifest, db, env, jobs) as h:
                started = time.monotonic()
                result = subprocess.run(
                    batchgen_command("run", manifest, "--yes"),
                    cwd=workdir,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                seconds = time.monotonic() - started
                time.sleep(0.3)  # a few reads of the finished state too
            figures = {
                "status_calls": h.status_calls,
                "store_reads": h.store_reads,
                "errors": h.errors,
                "slowest_status": h.slowest_status,
            }
        else:
            started = time.monotonic()
            result = subprocess.run(
                batchgen_command("run", manifest, "--yes"),
                cwd=workdir,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            seconds = time.monotonic() - started
            figures = {}
    assert result.returncode == 0, result.stderr[-3000:]
    assert "locked" not in result.stderr.lower(), result.stderr[-3000:]
    assert integrity_check(db) == "ok"
    return {"seconds": seconds, **figures}


def test_status_hammering_never_blocks_or_tears(tmp_path: Path) -> None:
    jobs = 96
    quiet = _timed_run(tmp_path / "quiet", jobs, hammer=False)
    loud = _timed_run(tmp_path / "loud", jobs, hammer=True)
    print(
        f"run alone {quiet['seconds']:.2f} s, under status hammering {loud['seconds']:.2f} s; "
        f"{loud['status_calls']} status --json calls (slowest {loud['slowest_status']:.2f} s), "
        f"{loud['store_reads']} Store reads"
    )
    assert loud["errors"] == [], "\n".join(loud["errors"][:20])
    assert loud["status_calls"] >= 3 and loud["store_reads"] >= 50, loud
    # Readers cost CPU on a shared 2-core machine, so allow some slowdown, never a stall.
    assert loud["seconds"] <= 1.5 * quiet["seconds"] + 2.0, (quiet, loud)
