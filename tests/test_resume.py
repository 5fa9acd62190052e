"""Stop and resume: ``batchgen run`` as a child process, interrupted (SIGINT) or killed (SIGKILL).

The simulator runs in this test process; the child reaches it with ``provider: runcomfy`` and
``RUNCOMFY_BASE_URL`` / ``RUNCOMFY_API_TOKEN`` — the real provider, unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

MODEL = "blackforestlabs/flux-2/max/text-to-image"


def write_manifest(tmp_path: Path, jobs: int, **limits: Any) -> Path:
    limit_lines = "".join(f"  {key}: {value}\n" for key, value in limits.items())
    path = tmp_path / "resume.yaml"
    path.write_text(
        "name: resume\n"
        "provider: runcomfy\n"
        f"output: {tmp_path / 'out'}\n"
        f"state: {tmp_path / 'state.db'}\n"
        "limits:\n"
        "  max_in_flight: 8\n"
        f"{limit_lines}"
        "sweeps:\n"
        f"  - model: {MODEL}\n"
        '    prompts: ["a red fox in fresh snow"]\n'
        "    grid:\n"
        f"      seed: {{range: [1, {jobs}]}}\n"
    )
    return path


def spawn(manifest: Path, sim: Any, *extra: str) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env.update(RUNCOMFY_BASE_URL=sim.base_url, RUNCOMFY_API_TOKEN=sim.token)
    env.pop("BATCHGEN_RAISE_ERRORS", None)
    return subprocess.Popen(
        [sys.executable, "-m", "batchgen", "run", str(manifest), "--yes", "--quiet", *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def counts(db: Path) -> dict[str, int]:
    if not db.exists():
        return {}
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        rows = conn.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall()
    except sqlite3.OperationalError:  # not created yet
        return {}
    finally:
        conn.close()
    return dict(rows)


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def finish(proc: subprocess.Popen[str], timeout: float = 60.0) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def check_files(tmp_path: Path, sim: Any) -> int:
    """Every done job's files exist, once, with the sha256 the simulator served."""
    served = {e["sha256"] for e in sim.metrics()["files"]["by_path"].values()}
    conn = sqlite3.connect(f"file:{tmp_path / 'state.db'}?mode=ro", uri=True)
    rows = conn.execute(
        "SELECT o.path, o.sha256 FROM outputs o JOIN jobs j ON j.id = o.job_id "
        "WHERE j.state = 'done'"
    ).fetchall()
    done = conn.execute("SELECT count(*) FROM jobs WHERE state = 'done'").fetchone()[0]
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    assert len(rows) == done
    for rel, sha in rows:
        data = (tmp_path / "out" / rel).read_bytes()
        assert hashlib.sha256(data).hexdigest() == sha and sha in served
    assert not list((tmp_path / "out").rglob("*.part"))
    return done


def test_sigint_then_rerun_finishes(simulator_factory: Callable[..., Any], tmp_path: Path) -> None:
    sim = simulator_factory(workers=8, latency=(0.3, 0.6))
    manifest = write_manifest(tmp_path, 48)
    db = tmp_path / "state.db"
    proc = spawn(manifest, sim)
    wait_for(lambda: counts(db).get("done", 0) >= 8)
    # status reads while the run writes (no lock taken, nothing blocked)
    started = time.monotonic()
    status = subprocess.run(
        [sys.executable, "-m", "batchgen", "status", str(manifest), "--json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["running"] is True and data["run_pid"] == proc.pid
    assert sum(data["counts"].values()) == 48 and data["counts"]["done"] >= 8
    assert time.monotonic() - started < 10
    proc.send_signal(signal.SIGINT)
    code, out, err = finish(proc, 30)
    assert code == 130, (out, err)
    assert "interrupted" in out and "again to resume" in out
    assert "Traceback" not in err
    left = counts(db)
    assert left.get("done", 0) < 48 and left.get("submitting", 0) == 0

    code, out, err = finish(spawn(manifest, sim))
    assert code == 0, (out, err)
    assert counts(db) == {"done": 48}
    submits = sim.metrics()["submits"]
    assert submits["total"] == 48 and submits["duplicate_submits"] == 0
    assert check_files(tmp_path, sim) == 48


def test_sigkill_then_rerun_no_duplicate_and_files_intact(
    simulator_factory: Callable[..., Any], tmp_path: Path
) -> None:
    sim = simulator_factory(workers=8, latency=(0.2, 0.5))
    manifest = write_manifest(tmp_path, 48)
    db = tmp_path / "state.db"
    proc = spawn(manifest, sim)
    wait_for(lambda: counts(db).get("done", 0) >= 10)
    proc.kill()
    proc.wait(10)

    code, out, err = finish(spawn(manifest, sim))
    final = counts(db)
    # a kill that hit a submit in flight leaves it `unknown` (parked, never resubmitted)
    assert final.get("done", 0) + final.get("unknown", 0) == 48, final
    assert code == (1 if final.get("unknown") else 0), (out, err)
    submits = sim.metrics()["submits"]
    assert submits["duplicate_submits"] == 0
    assert check_files(tmp_path, sim) == final["done"]


def test_a_second_runner_is_refused(simulator_factory: Callable[..., Any], tmp_path: Path) -> None:
    sim = simulator_factory(workers=2, latency=(2, 2))
    manifest = write_manifest(tmp_path, 8)
    db = tmp_path / "state.db"
    first = spawn(manifest, sim)
    try:
        wait_for(lambda: counts(db).get("queued", 0) + counts(db).get("running", 0) > 0)
        code, _out, err = finish(spawn(manifest, sim), 30)
        assert code == 2
        assert f"another batchgen run (pid {first.pid})" in err
        assert "Traceback" not in err
    finally:
        first.send_signal(signal.SIGINT)
        finish(first, 30)
    # the refused run changed nothing: nothing was submitted twice
    assert sim.metrics()["submits"]["duplicate_submits"] == 0


@pytest.mark.parametrize("flag", [[], ["--cancel-queued"]])
def test_cancel_queued_on_interrupt(
    simulator_factory: Callable[..., Any], tmp_path: Path, flag: list[str]
) -> None:
    # one worker, 8 in flight: most requests wait in the remote queue when we stop
    sim = simulator_factory(workers=1, latency=(1.0, 1.0))
    manifest = write_manifest(tmp_path, 8)
    db = tmp_path / "state.db"
    proc = spawn(manifest, sim, *flag)
    wait_for(lambda: counts(db).get("queued", 0) >= 6)
    proc.send_signal(signal.SIGINT)
    code, out, err = finish(proc, 30)
    assert code == 130, (out, err)
    cancels = sim.metrics()["calls"]["by_endpoint"]["cancel"]
    left = counts(db)
    if flag:
        assert left.get("cancelled", 0) >= 5 and sum(cancels.values()) >= 5
    else:
        assert not cancels and left.get("queued", 0) >= 5
