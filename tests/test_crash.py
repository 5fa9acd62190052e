"""R1, the CI size: 300 jobs, 3 SIGKILLs of ``batchgen run``, the simulator's faults on.

The harness is ``bench/crash.py`` (``python -m bench crash`` runs the full 2,000-job, 10-kill
version); this file runs it small and asserts its audit, proves the audit itself can fail by
tampering with a copy of the finished state and output folder, runs the ``on_ambiguous_submit:
retry`` variant (every duplicate must be counted on its job), and SIGKILLs a run in the middle of
its end-of-run export.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batchgen.store import Store
from bench.crash import (
    SMALL,
    TEMP_SUFFIXES,
    audit,
    batchgen_command,
    crash_run,
    integrity_check,
    provider_env,
)

pytestmark = pytest.mark.timeout(170)

#: the faults R1 names; each must fire at least twice for the run to prove anything
FAULTS_REQUIRED = (
    "http_429",
    "http_429_retry_after",
    "http_5xx",
    "drop_connection",
    "lost_submit",
    "job_failure",
    "truncated_download",
    "url_ttl",
)


@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, Any], Path]]:
    """Run the small crash scenario once for the whole module."""
    workdir = tmp_path_factory.mktemp("crash")
    report = crash_run(SMALL, workdir)
    (workdir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    yield report, workdir


def test_every_kill_was_survived(crashed: tuple[dict[str, Any], Path]) -> None:
    report, _ = crashed
    assert report["kills"] == SMALL.kills, report["exit_codes"]
    # the last run of the scenario ended by itself, with every job terminal
    assert report["exit_codes"][-1] in (0, 1), report["exit_codes"]


def test_audit_is_clean(crashed: tuple[dict[str, Any], Path]) -> None:
    report, workdir = crashed
    assert report["violations"] == [], (
        f"{len(report['violations'])} violations (report in {workdir / 'report.json'}):\n"
        + "\n".join(report["violations"][:40])
    )


def test_every_job_is_accounted_for(crashed: tuple[dict[str, Any], Path]) -> None:
    report, _ = crashed
    states = report["states"]
    assert sum(states.values()) == SMALL.jobs
    assert set(states) <= {"done", "failed", "unknown"}, states
    # Faults fail a few jobs on purpose; most must still get through.
    assert states.get("done", 0) >= 0.75 * SMALL.jobs, states
    # one image per done job, each on disk once
    assert report["images_on_disk"] == report["outputs"] == states["done"], report


def test_every_fault_fired(crashed: tuple[dict[str, Any], Path]) -> None:
    report, _ = crashed
    fired = report["faults_fired"]
    quiet = {name: fired.get(name, 0) for name in FAULTS_REQUIRED if fired.get(name, 0) < 2}
    assert not quiet, f"faults that fired too rarely to prove anything: {quiet} ({fired})"


def test_duplicates_only_from_retried_unknowns(crashed: tuple[dict[str, Any], Path]) -> None:
    report, _ = crashed
    assert report["duplicates_unexplained"] == 0
    assert report["duplicates"] <= report["unknown_retried_jobs"] * (SMALL.retry_rounds)


def test_retry_mode_counts_every_duplicate_it_may_pay(tmp_path: Path) -> None:
    """``on_ambiguous_submit: retry``: lost answers are resubmitted at once, each one counted.

    Every submit the simulator saw twice must be covered by the job's ``possible_duplicates``
    (what `status` reports as "may have been paid twice"), kills included.
    """
    cfg = dataclasses.replace(
        SMALL,
        jobs=120,
        kills=2,
        # progress kills only: a restart of a run this small can end before a startup kill
        startup_kills=0,
        on_ambiguous="retry",
        faults={**SMALL.faults, "lost_submit": 0.06},
        seed=7,
    )
    report = crash_run(cfg, tmp_path / "retry-mode")
    figures = {k: v for k, v in report.items() if k != "violations"}
    assert report["violations"] == [], "\n".join(report["violations"][:40]) + f"\n{figures}"
    assert report["duplicates"] > 0, f"no lost answer was resubmitted: nothing was tested {figures}"
    # every duplicate is explained by the job's own count or a `retry --unknown` of ours
    assert (
        report["possible_duplicates_counted"] + report["unknown_retried_jobs"]
        >= (report["duplicates"])
    )


def test_the_audit_catches_tampering(crashed: tuple[dict[str, Any], Path], tmp_path: Path) -> None:
    """A corrupted image, a leftover .part, a stray file and an extra submit are each reported."""
    _, workdir = crashed
    copy = tmp_path / "copy"
    shutil.copytree(workdir / "out", copy / "out")
    shutil.copytree(workdir / "state", copy / "state")
    metrics = json.loads((workdir / "metrics.json").read_text())
    db = copy / "state" / "crash.db"
    store = Store(db)
    try:
        victim = copy / "out" / sorted(o.path for o in store.outputs())[0]
    finally:
        store.close()
    victim.write_bytes(victim.read_bytes()[:-10])
    (victim.parent / (victim.name + ".part")).write_bytes(b"half")
    (copy / "out" / "stray.png").write_bytes(b"not recorded")
    metrics["submits"]["duplicates"].append(
        {"body_sha256": "0" * 64, "count": 3, "request_ids": ["forged-1", "forged-2", "forged-3"]}
    )

    found = "\n".join(audit(db, copy / "out", metrics, {})["violations"])
    assert "sha256 on disk" in found
    assert "temporary file left behind" in found
    assert "stray.png" in found
    assert "submitted" in found and "times" in found
    assert integrity_check(db) == "ok"


def test_a_kill_during_the_export_leaves_no_temporary_file_after_the_next_run(
    crashed: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    """SIGKILL ``run`` while it writes metadata.jsonl & co., then run again: nothing temporary.

    The kill is aimed: the output root is watched and the run killed the moment a temporary
    file appears in it. Every job is terminal, so the runs make no API call (the port is
    closed): they only resume, find nothing to do, and export.
    """
    _, workdir = crashed
    copy = tmp_path / "copy"
    for name in ("out", "state"):
        shutil.copytree(workdir / name, copy / name)
    for name in ("crash.yaml", "prompts.txt"):
        shutil.copy(workdir / name, copy / name)
    out = copy / "out"
    env = provider_env("http://127.0.0.1:9", "unused-token")
    argv = batchgen_command("run", "crash.yaml", "--yes")
    caught: list[str] = []
    for _ in range(5):
        proc = subprocess.Popen(
            argv, cwd=copy, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        while proc.poll() is None and not caught:
            caught = [p.name for p in out.iterdir() if p.name.endswith(TEMP_SUFFIXES)]
            time.sleep(0.0005)
        proc.kill()
        proc.wait()
        if caught:
            break
    if not caught:
        pytest.skip("the export never lasted long enough to be caught half-way")
    result = subprocess.run(argv, cwd=copy, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode in (0, 1), result.stderr[-3000:]
    left = [p.name for p in out.iterdir() if p.name.endswith(TEMP_SUFFIXES)]
    assert not left, f"killed mid-export (with {caught} on disk), the next run left {left}"
