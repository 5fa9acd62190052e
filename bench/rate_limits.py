"""T3 - rate limits: never over ``submits_per_minute`` / ``requests_per_second``, and close to them.

Two runs of ``batchgen run`` (measured children) against one simulator in its own process, each
with more work than its limit allows, so that the limit alone sets the pace:

- **submits**: ``submits_per_minute: 600`` (10 per second) and nothing else limiting: enough
  in-flight slots and simulator workers that submits are never waiting for a slot. Figures from
  the simulator: the largest number of submits in any sliding 1-second window (its own counter,
  and again from the exact arrival time of every request), and the mean submit rate from the
  first submit to the last.
- **requests**: ``requests_per_second: 20`` with long jobs and a 50 ms ``poll_interval``, so the
  client always wants to poll far faster than allowed. Figures: the largest count in any sliding
  1-second window per endpoint, all API calls together per whole second (the simulator's
  buckets), and the mean API call rate over the run.

Target: every 1-second window ≤ limit + 1 (window edges); mean ≥ 0.95 x limit.

    python -m bench rate_limits [--small]
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from bench import common

TARGET_MEAN = 0.95
API = ("submit", "result", "status", "cancel")


def max_in_window(times: list[float], window: float = 1.0) -> int:
    """The largest number of ``times`` inside any window [t, t + window)."""
    times = sorted(times)
    best = lo = 0
    for hi, t in enumerate(times):
        while times[lo] <= t - window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def _submits(small: bool) -> dict[str, Any]:
    limit_per_min = 600.0
    per_second = limit_per_min / 60.0
    jobs = 60 if small else 200
    with (
        common.simulator(workers=64, latency=(0.5, 1.0)) as sim,
        tempfile.TemporaryDirectory(prefix="bench-rate-submits-") as tmp,
    ):
        manifest = common.write_manifest(
            Path(tmp),
            jobs=jobs,
            max_in_flight=64,
            name="rate-submits",
            limits={"submits_per_minute": limit_per_min},
        )
        child = common.run_batchgen(manifest, base_url=sim.base_url, token=sim.token)
        metrics = sim.metrics(timeline=True)
    if child.returncode != 0:
        raise RuntimeError(f"batchgen failed ({child.returncode}): {child.stderr[-2000:]}")
    created = sorted(r["created"] for r in metrics["timeline"].values() if r["created"] is not None)
    mean = (len(created) - 1) / (created[-1] - created[0])
    figures = {
        "limit_per_s": per_second,
        "jobs": jobs,
        "max_in_1s_window_simulator": metrics["max_calls_per_second"].get("submit", 0),
        "max_in_1s_window_arrivals": max_in_window(created),
        "mean_per_s": round(mean, 3),
        "mean_ratio": round(mean / per_second, 4),
    }
    figures["ok"] = (
        figures["max_in_1s_window_simulator"] <= per_second + 1
        and figures["max_in_1s_window_arrivals"] <= per_second + 1
        and figures["mean_ratio"] >= TARGET_MEAN
    )
    return figures


def _requests(small: bool) -> dict[str, Any]:
    limit = 20.0
    jobs, latency = (24, 4.0) if small else (40, 10.0)
    with (
        common.simulator(workers=jobs, latency=(latency, latency)) as sim,
        tempfile.TemporaryDirectory(prefix="bench-rate-requests-") as tmp,
    ):
        manifest = common.write_manifest(
            Path(tmp),
            jobs=jobs,
            max_in_flight=jobs,
            name="rate-requests",
            poll_interval=0.05,
            limits={"requests_per_second": limit},
        )
        child = common.run_batchgen(manifest, base_url=sim.base_url, token=sim.token)
        metrics = sim.metrics(timeline=True)
    if child.returncode != 0:
        raise RuntimeError(f"batchgen failed ({child.returncode}): {child.stderr[-2000:]}")
    sliding = {k: v for k, v in metrics["max_calls_per_second"].items() if k in API}
    series = [metrics["per_second"].get(name, []) for name in API]
    width = max(len(s) for s in series)
    buckets = [sum(s[i] for s in series if i < len(s)) for i in range(width)]
    rows = list(metrics["timeline"].values())
    start = min(r["created"] for r in rows)
    end = max(r["first_terminal_result"] for r in rows)
    calls = sum(common.total_calls(metrics).values())
    # calls made from the first submit to the last result (the run always had more to ask)
    mean = calls / (end - start)
    figures = {
        "limit_per_s": limit,
        "jobs": jobs,
        "api_calls": calls,
        "max_in_1s_window_by_endpoint": sliding,
        "max_api_calls_in_a_whole_second": max(buckets),
        "mean_per_s": round(mean, 3),
        "mean_ratio": round(mean / limit, 4),
    }
    figures["ok"] = (
        all(v <= limit + 1 for v in sliding.values())
        and max(buckets) <= limit + 1
        and figures["mean_ratio"] >= TARGET_MEAN
    )
    return figures


def run(small: bool) -> dict[str, Any]:
    """Measure T3; print and return the figures."""
    submits = _submits(small)
    print(
        f"T3 submits_per_minute 600: max {submits['max_in_1s_window_simulator']} submits in a "
        f"1-s window (arrivals: {submits['max_in_1s_window_arrivals']}; limit 10 + 1), mean "
        f"{submits['mean_per_s']}/s = {submits['mean_ratio']:.3f} x limit  "
        f"{'ok' if submits['ok'] else 'MISSED'}"
    )
    requests = _requests(small)
    print(
        "T3 requests_per_second 20: max per 1-s window "
        f"{requests['max_in_1s_window_by_endpoint']}, "
        f"all API calls per whole second max {requests['max_api_calls_in_a_whole_second']} "
        f"(limit 20 + 1), mean {requests['mean_per_s']}/s = {requests['mean_ratio']:.3f} x limit  "
        f"{'ok' if requests['ok'] else 'MISSED'}"
    )
    return {
        "target": f"every 1-s window <= limit + 1; mean >= {TARGET_MEAN} x limit",
        "submits_per_minute": submits,
        "requests_per_second": requests,
        "ok": submits["ok"] and requests["ok"],
    }
