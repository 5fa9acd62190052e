"""T1 — slot utilisation: batchgen's jobs/s against the Little's-law limit N/L, same run.

The simulator (its own process) runs every request for exactly L seconds on at least N workers,
so no request ever waits in its queue; ``batchgen run`` (a measured child) has ``max_in_flight``
N. A client that kept all N slots busy all the time would finish ``jobs`` requests at N/L per
second; whatever it loses — a slow first wave with no latency history, late notice of a finished
request, a slow resubmit into a freed slot — shows as a lower ratio.

The phase measured is the simulator's own: from the first request created to the last result
fetched after it finished (``timeline``: ``created`` → ``first_terminal_result``), so interpreter
start-up, planning and the final downloads are left out, as TARGETS.md T1 says.

Target: jobs/s ≥ 0.95 x N/L, first wave included.

    python -m bench utilisation [--small]
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from bench import common

TARGET_RATIO = 0.95


def phase_from_timeline(metrics: dict[str, Any]) -> dict[str, Any]:
    """First request created → last terminal result fetched, and per-request notice delays."""
    rows = list(metrics["timeline"].values())
    created = [r["created"] for r in rows if r["created"] is not None]
    fetched = [r["first_terminal_result"] for r in rows if r["first_terminal_result"] is not None]
    delays = [
        r["first_terminal_result"] - r["finished"]
        for r in rows
        if r["first_terminal_result"] is not None and r["finished"] is not None
    ]
    return {
        "requests": len(rows),
        "results_fetched": len(fetched),
        "seconds": round(max(fetched) - min(created), 3) if fetched and created else None,
        "notice_delay_mean_s": round(sum(delays) / len(delays), 4) if delays else None,
        "notice_delay_max_s": round(max(delays), 4) if delays else None,
    }


def run(small: bool) -> dict[str, Any]:
    """Measure T1; print and return the figures."""
    jobs, slots, latency = (64, 16, 2.0) if small else (160, 32, 5.0)
    with (
        common.simulator(workers=slots, latency=(latency, latency)) as sim,
        tempfile.TemporaryDirectory(prefix="bench-utilisation-") as tmp,
    ):
        manifest = common.write_manifest(
            Path(tmp), jobs=jobs, max_in_flight=slots, name="utilisation"
        )
        child = common.run_batchgen(manifest, base_url=sim.base_url, token=sim.token)
        metrics = sim.metrics(timeline=True)
        if child.returncode != 0:
            raise RuntimeError(f"batchgen run failed ({child.returncode}): {child.stderr[-2000:]}")
    phase = phase_from_timeline(metrics)
    limit = slots / latency
    achieved = phase["results_fetched"] / phase["seconds"]
    calls = common.total_calls(metrics)
    figures: dict[str, Any] = {
        "target": f"jobs/s >= {TARGET_RATIO} x N/L",
        "jobs": jobs,
        "max_in_flight": slots,
        "latency_s": latency,
        "littles_law_jobs_per_s": round(limit, 3),
        "jobs_per_s": round(achieved, 3),
        "ratio": round(achieved / limit, 4),
        "phase_seconds": phase["seconds"],
        "ideal_seconds": round(jobs / limit, 3),
        "notice_delay_mean_s": phase["notice_delay_mean_s"],
        "result_calls_per_job": round(calls["result"] / jobs, 3),
        "status_calls": calls["status"],
        "peak_unfinished": metrics["unfinished_jobs"]["peak"],
        "child_seconds": child.seconds,
    }
    figures["ok"] = figures["ratio"] >= TARGET_RATIO and phase["results_fetched"] == jobs
    print(
        f"T1 utilisation: {jobs} jobs, N={slots}, L={latency:g}s: {achieved:.3f} jobs/s vs "
        f"N/L = {limit:.3f} → ratio {figures['ratio']:.3f} (target ≥ {TARGET_RATIO}); phase "
        f"{phase['seconds']}s vs ideal {figures['ideal_seconds']}s; "
        f"{figures['result_calls_per_job']} result calls/job; "
        f"notice delay {phase['notice_delay_mean_s']}s  {'ok' if figures['ok'] else 'MISSED'}"
    )
    return figures
