"""T4 - 429 storms: the API limits harder than the client does; every job still finishes.

Two runs of ``batchgen run`` (measured children) against a simulator in its own process:

- **server limit**: the simulator admits 10 calls per second per token and answers 429 with a
  ``Retry-After`` beyond that, while the manifest allows 25 requests per second and 32 requests
  in flight, so the first wave of submits alone goes over the server's limit. batchgen must
  honour Retry-After and slow the whole run (its request meter halves, then recovers gradually).
- **random 429s without Retry-After**: 5 % of API calls answered 429 with no header (adaptive
  polling); batchgen backs off exponentially with jitter, run-wide.

Figures per run: jobs done / failed, 429s received, wall time, API calls per second achieved
against the server's limit, and duplicate submits (must be 0: a 429 submit created nothing).

Target: every job done, none failed for the 429s.

    python -m bench storm_429 [--small]
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from bench import common


def _one(
    name: str,
    jobs: int,
    *,
    sim_config: dict[str, Any],
    limits: dict[str, Any],
    poll_interval: float | None,
) -> dict[str, Any]:
    with (
        common.simulator(workers=32, latency=(0.5, 1.5), **sim_config) as sim,
        tempfile.TemporaryDirectory(prefix=f"bench-429-{name}-") as tmp,
    ):
        folder = Path(tmp)
        manifest = common.write_manifest(
            folder,
            jobs=jobs,
            max_in_flight=32,
            name=f"storm-{name}",
            limits=limits,
            poll_interval=poll_interval,
        )
        child = common.run_batchgen(manifest, base_url=sim.base_url, token=sim.token)
        counts = common.counts_by_state(folder / "state.db")
        metrics = sim.metrics()
    calls = common.total_calls(metrics)
    limited = sum(
        int(n)
        for codes in metrics["calls"]["by_endpoint"].values()
        for code, n in codes.items()
        if code == "429"
    )
    figures = {
        "jobs": jobs,
        "exit_code": child.returncode,
        "done": counts.get("done", 0),
        "failed": counts.get("failed", 0),
        "unknown": counts.get("unknown", 0),
        "responses_429": limited,
        "api_calls": sum(calls.values()),
        "seconds": child.seconds,
        "api_calls_per_s": round(sum(calls.values()) / child.seconds, 2),
        "duplicate_submits": metrics["submits"]["duplicate_submits"],
        "faults": metrics["faults"],
    }
    figures["ok"] = (
        figures["done"] == jobs and figures["failed"] == 0 and figures["duplicate_submits"] == 0
    )
    return figures


def run(small: bool) -> dict[str, Any]:
    """Measure T4; print and return the figures."""
    jobs = 40 if small else 200
    server = _one(
        "server-limit",
        jobs,
        sim_config={"faults": {"rate_limit_rps": 10}},
        limits={"requests_per_second": 25},
        poll_interval=None,
    )
    print(
        f"T4 server limit 10/s, client 25/s: {server['done']}/{jobs} done, {server['failed']} "
        f"failed, {server['responses_429']} x 429 (Retry-After), {server['api_calls_per_s']} "
        f"calls/s, {server['seconds']}s, duplicates {server['duplicate_submits']}  "
        f"{'ok' if server['ok'] else 'MISSED'}"
    )
    storm = _one(
        "random", jobs, sim_config={"faults": {"http_429": 0.05}}, limits={}, poll_interval=None
    )
    print(
        f"T4 random 429s (5 %, no Retry-After): {storm['done']}/{jobs} done, {storm['failed']} "
        f"failed, {storm['responses_429']} x 429, {storm['seconds']}s, duplicates "
        f"{storm['duplicate_submits']}  {'ok' if storm['ok'] else 'MISSED'}"
    )
    return {
        "target": "every job done, none failed for 429s",
        "server_limit": server,
        "random_429": storm,
        "ok": server["ok"] and storm["ok"],
    }
