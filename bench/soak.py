"""S4 — memory over a long run: RSS at the end ≤ 1.2 x RSS once 2,000 jobs are done.

``batchgen run`` drives 20,000 jobs (small: 2,000) through a subprocess simulator with zero
latency and small images, as a child process of this script. Every 0.5 s a sampler thread reads
the child's ``VmRSS`` from ``/proc/<pid>/status`` and the number of ``done`` jobs from the state
database (opened read-only, so the sampler never takes a lock the runner needs).

- ``rss_at_mark``: the first sample with at least 2,000 jobs done (small: 200) — past start-up,
  planning and the first wave, so what grows after it is per-job growth, i.e. a leak;
- ``rss_end``: the last sample with every job done (the runner still alive, writing its
  summary), else the last sample taken;
- target: ``rss_end / rss_at_mark`` ≤ 1.2. Peak RSS (``ru_maxrss`` from ``os.wait4``) is reported
  too.

    python -m bench soak [--small]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import common

TARGET_RATIO = 1.2
SAMPLE_EVERY = 0.5


def measure(*, jobs: int, mark: int, concurrency: int = 32) -> dict[str, Any]:
    """One soak run of ``jobs`` jobs; RSS compared between ``mark`` jobs done and the end."""
    with (
        tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp,
        common.simulator(workers=concurrency) as sim,
    ):
        folder = Path(tmp)
        manifest = common.write_manifest(
            folder, jobs=jobs, max_in_flight=concurrency, download_concurrency=concurrency
        )
        db = folder / "state.db"
        child = common.run_batchgen(
            manifest,
            base_url=sim.base_url,
            token=sim.token,
            sample_every=SAMPLE_EVERY,
            probe=lambda: {"done": common.done_count(db)},
            timeout=1800.0,
        )
        counts = common.counts_by_state(db)
    if child.returncode != 0:
        raise RuntimeError(
            f"batchgen run exited {child.returncode} (states {counts}): {child.stderr[-2000:]}"
        )
    live = [s for s in child.samples if s.rss is not None and s.extra.get("done") is not None]
    at_mark = next((s for s in live if s.extra["done"] >= mark), None)
    finished = [s for s in live if s.extra["done"] >= jobs]
    end = finished[-1] if finished else (live[-1] if live else None)
    ratio = round(end.rss / at_mark.rss, 3) if at_mark and end and at_mark.rss and end.rss else None
    step = max(1, len(live) // 40)  # keep the trace in the JSON short
    return {
        "jobs": jobs,
        "done": counts.get("done", 0),
        "states": counts,
        "mark": mark,
        "seconds": child.seconds,
        "jobs_per_s": round(counts.get("done", 0) / child.seconds, 2),
        "rss_at_mark_mib": common.mib(at_mark.rss) if at_mark else None,
        "done_at_mark": at_mark.extra["done"] if at_mark else None,
        "rss_end_mib": common.mib(end.rss) if end else None,
        "rss_peak_mib": common.mib(child.max_rss_bytes),
        "ratio": ratio,
        "target": f"rss_end / rss_at_mark <= {TARGET_RATIO}",
        "trace": [
            {"t": s.at, "done": s.extra["done"], "rss_mib": common.mib(s.rss)} for s in live[::step]
        ],
        "ok": ratio is not None and ratio <= TARGET_RATIO and counts.get("done", 0) == jobs,
    }


def run(small: bool) -> dict[str, Any]:
    """S4: 20,000 jobs (small: 2,000); print and return the figures."""
    jobs, mark = (2000, 200) if small else (20_000, 2000)
    figures = measure(jobs=jobs, mark=mark)
    print(
        f"S4 soak: {figures['done']}/{jobs} done in {figures['seconds']} s "
        f"({figures['jobs_per_s']} jobs/s); RSS {figures['rss_at_mark_mib']} MiB at "
        f"{figures['done_at_mark']} done -> {figures['rss_end_mib']} MiB at the end "
        f"(x{figures['ratio']}, target <= {TARGET_RATIO}); peak {figures['rss_peak_mib']} MiB "
        f"-> {'ok' if figures['ok'] else 'MISSED'}"
    )
    return figures


if __name__ == "__main__":
    run(small="--small" in sys.argv[1:])
