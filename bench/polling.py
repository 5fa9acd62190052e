"""T5 — polling cost: result calls per job and how soon a finished request is noticed.

The simulator (its own process) runs each request for a time drawn uniformly from 2-5 s on at
least N workers; ``batchgen run`` (a measured child, ``max_in_flight`` N) polls with its adaptive
planner. The simulator counts every call and, per request, the delay between its finish and the
first result call that saw it finished (``result_notice_delay``). The hand-written loop that
polls ``/result`` every 2 s (``bench/baseline_loop.py``, as users write it) runs on the same
simulator in the same run for comparison.

Targets: ≤ 3 status/result calls per job on average, and the result fetched ≤ 0.5 s after the
simulator finished it (mean).

    python -m bench polling [--small]
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import common

TARGET_CALLS = 3.0
TARGET_DELAY = 0.5


def _figures(metrics: dict[str, Any], jobs: int) -> dict[str, Any]:
    calls = common.total_calls(metrics)
    notice = metrics["result_notice_delay"]
    return {
        "calls_per_job": round((calls["status"] + calls["result"]) / jobs, 3),
        "result_calls": calls["result"],
        "status_calls": calls["status"],
        "notice_delay_mean_s": notice["mean"],
        "notice_delay_max_s": notice["max"],
        "noticed": notice["count"],
    }


def _baseline(sim: Any, folder: Path, jobs: int, slots: int) -> dict[str, Any] | None:
    if not (Path(__file__).parent / "baseline_loop.py").exists():
        return None
    out = folder / "baseline.json"
    child = common.run_child(
        [
            sys.executable,
            "-m",
            "bench.baseline_loop",
            "--jobs",
            str(jobs),
            "--concurrency",
            str(slots),
            "--poll-interval",
            "2",
            "--json",
            str(out),
        ],
        env=common.child_env(sim.base_url, sim.token),
        cwd=common.ROOT,
    )
    if child.returncode != 0 or not out.exists():
        raise RuntimeError(f"baseline loop failed ({child.returncode}): {child.stderr[-2000:]}")
    own = json.loads(out.read_text())
    figures = _figures(sim.metrics(), jobs)
    figures["seconds"] = own.get("seconds")
    return figures


def run(small: bool) -> dict[str, Any]:
    """Measure T5 for batchgen and the 2-second loop; print and return the figures."""
    jobs, slots, latency = (64, 16, (1.0, 2.5)) if small else (160, 32, (2.0, 5.0))
    with (
        common.simulator(workers=slots, latency=latency) as sim,
        tempfile.TemporaryDirectory(prefix="bench-polling-") as tmp,
    ):
        folder = Path(tmp)
        manifest = common.write_manifest(folder, jobs=jobs, max_in_flight=slots, name="polling")
        child = common.run_batchgen(manifest, base_url=sim.base_url, token=sim.token)
        if child.returncode != 0:
            raise RuntimeError(f"batchgen failed ({child.returncode}): {child.stderr[-2000:]}")
        ours = _figures(sim.metrics(), jobs)
        ours["child_seconds"] = child.seconds
        sim.reset_metrics()
        baseline = _baseline(sim, folder, jobs, slots)
    figures: dict[str, Any] = {
        "target": f"calls/job <= {TARGET_CALLS}, mean notice delay <= {TARGET_DELAY}s",
        "jobs": jobs,
        "max_in_flight": slots,
        "latency_s": list(latency),
        "batchgen": ours,
        "baseline_2s_loop": baseline,
    }
    figures["ok"] = (
        ours["calls_per_job"] <= TARGET_CALLS
        and ours["notice_delay_mean_s"] is not None
        and ours["notice_delay_mean_s"] <= TARGET_DELAY
        and ours["noticed"] == jobs
    )
    line = (
        f"T5 polling: {jobs} jobs, N={slots}, latency {latency[0]:g}-{latency[1]:g}s: batchgen "
        f"{ours['calls_per_job']} calls/job, notice {ours['notice_delay_mean_s']}s mean"
    )
    if baseline:
        line += (
            f"; 2-second loop {baseline['calls_per_job']} calls/job, notice "
            f"{baseline['notice_delay_mean_s']}s mean"
        )
    print(f"{line}  {'ok' if figures['ok'] else 'MISSED'}")
    return figures
