"""T2 — batchgen's own overhead: its jobs/s against the minimal asyncio + httpx loop.

Both clients push the same bodies (``common.bench_bodies``) through the same simulator — one
subprocess, zero latency, small images, enough workers — at the same concurrency (batchgen's
``max_in_flight`` and download concurrency = the loop's worker count), in the same run. With no
latency to hide behind, every millisecond a client spends per job shows.

Each side runs as a measured child process (``common.run_child``, reaped with ``os.wait4``):
``python -m bench.baseline_loop --poll-interval 0 ...`` and ``python -m batchgen run MANIFEST``.
So both pay their interpreter start and imports, both write every image to disk, and the CPU
seconds are each child's own (``ru_utime + ru_stime`` of that child, not of this process).

Figures per side: wall seconds of the child and jobs/s over it, the "run phase" (baseline: its
own loop timer; batchgen: first ``submitted_at`` to last ``done_at`` in its state database), CPU
ms per job (``system_ms_per_job``: the kernel's share), ``blocks_per_job`` (voluntary context
switches: fsyncs, thread hand-offs; robust to machine load where wall time is not), and API
calls per job as the simulator counted them. The full run alternates the
sides (A B B A) and keeps each side's best, which cancels drift on a shared machine; the small
run does A B once.

Target: batchgen's end-to-end jobs/s ≥ 0.7 x the baseline's (``ratio_wall``); ``ratio_run``
compares the run phases only (planning and start-up left out).

    python -m bench overhead [--small]
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import common

TARGET_RATIO = 0.7


def _baseline(sim: Any, folder: Path, jobs: int, concurrency: int) -> dict[str, Any]:
    """One measured run of the baseline loop script; figures from its own JSON and the child."""
    figures_file = folder / "baseline.json"
    child = common.run_child(
        [
            sys.executable,
            "-m",
            "bench.baseline_loop",
            "--jobs",
            str(jobs),
            "--concurrency",
            str(concurrency),
            "--poll-interval",
            "0",
            "--out",
            str(folder / "out"),
            "--json",
            str(figures_file),
        ],
        env=common.child_env(sim.base_url, sim.token),  # the token goes by env, never argv
        cwd=common.ROOT,
    )
    if child.returncode != 0 or not figures_file.exists():
        raise RuntimeError(f"baseline loop failed ({child.returncode}): {child.stderr[-2000:]}")
    loop = json.loads(figures_file.read_text())
    return {
        "jobs": loop["jobs"],
        "failed": loop["failed"],
        "wall_seconds": child.seconds,
        "run_seconds": loop["seconds"],
        "cpu_seconds": child.cpu_seconds,
        "system_seconds": child.system_seconds,
        "voluntary_switches": child.voluntary_switches,
        "max_rss_mib": common.mib(child.max_rss_bytes),
    }


def _batchgen(
    sim: Any,
    folder: Path,
    jobs: int,
    concurrency: int,
    poll_interval: float | None,
    profile_to: Path | None = None,
) -> dict[str, Any]:
    """One measured ``batchgen run`` child on a fresh manifest and state in ``folder``."""
    manifest = common.write_manifest(
        folder,
        jobs=jobs,
        max_in_flight=concurrency,
        poll_interval=poll_interval,
        download_concurrency=concurrency,
    )
    child = common.run_batchgen(
        manifest, base_url=sim.base_url, token=sim.token, profile_to=profile_to
    )
    db = folder / "state.db"
    counts = common.counts_by_state(db)
    if child.returncode != 0:
        raise RuntimeError(
            f"batchgen run exited {child.returncode} (states {counts}): {child.stderr[-2000:]}"
        )
    phase = common.run_phase(db)
    return {
        "jobs": counts.get("done", 0),
        "failed": sum(n for state, n in counts.items() if state != "done"),
        "wall_seconds": child.seconds,
        "run_seconds": phase["seconds"],
        "cpu_seconds": child.cpu_seconds,
        "system_seconds": child.system_seconds,
        "voluntary_switches": child.voluntary_switches,
        "max_rss_mib": common.mib(child.max_rss_bytes),
    }


def _finish(side: dict[str, Any], calls: dict[str, int]) -> dict[str, Any]:
    """Add the per-job rates to one side's raw figures."""
    jobs = side["jobs"]
    side["jobs_per_s"] = round(jobs / side["wall_seconds"], 2)
    run = side["run_seconds"]
    side["run_jobs_per_s"] = round(jobs / run, 2) if run else None
    side["cpu_ms_per_job"] = round(1000 * side["cpu_seconds"] / jobs, 3) if jobs else None
    side["system_ms_per_job"] = round(1000 * side["system_seconds"] / jobs, 3) if jobs else None
    side["blocks_per_job"] = round(side["voluntary_switches"] / jobs, 1) if jobs else None
    side["calls"] = calls
    side["calls_per_job"] = round(sum(calls.values()) / jobs, 3) if jobs else None
    return side


def measure(
    *,
    jobs: int,
    concurrency: int,
    rounds: list[str],
    poll_interval: float | None = None,
    profile_to: Path | None = None,
) -> dict[str, Any]:
    """Run the sides in ``rounds`` order on one simulator; each side's best round is kept."""
    best: dict[str, dict[str, Any]] = {}
    every: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp,
        common.simulator(workers=concurrency) as sim,
    ):
        for number, side in enumerate(rounds):
            folder = Path(tmp) / f"{number}-{side}"
            folder.mkdir()
            sim.reset_metrics()
            if side == "baseline":
                figures = _baseline(sim, folder, jobs, concurrency)
            else:
                profile = profile_to if number == rounds.index("batchgen") else None
                figures = _batchgen(sim, folder, jobs, concurrency, poll_interval, profile)
            figures = _finish(figures, common.total_calls(sim.metrics()))
            every.append({"side": side, **figures})
            print(
                f"  {side:9s} {figures['jobs']:>6d} jobs  {figures['wall_seconds']:7.2f} s  "
                f"{figures['jobs_per_s']:8.1f} jobs/s  "
                f"run phase {figures['run_jobs_per_s']} jobs/s  "
                f"{figures['cpu_ms_per_job']} CPU ms/job  {figures['blocks_per_job']} blocks/job  "
                f"{figures['calls_per_job']} calls/job",
                flush=True,
            )
            if side not in best or figures["jobs_per_s"] > best[side]["jobs_per_s"]:
                best[side] = figures
    if set(best) != {"baseline", "batchgen"}:  # a one-sided run (profiling): no ratio to judge
        return {"jobs": jobs, "concurrency": concurrency, "rounds": every, "ok": None}
    base, ours = best["baseline"], best["batchgen"]
    ratio_wall = round(ours["jobs_per_s"] / base["jobs_per_s"], 3)
    ratio_run = (
        round(ours["run_jobs_per_s"] / base["run_jobs_per_s"], 3)
        if ours["run_jobs_per_s"] and base["run_jobs_per_s"]
        else None
    )
    complete = ours["jobs"] == jobs and base["jobs"] == jobs
    return {
        "jobs": jobs,
        "concurrency": concurrency,
        "batchgen_poll_interval": poll_interval,
        "baseline": base,
        "batchgen": ours,
        "ratio_wall": ratio_wall,
        "ratio_run": ratio_run,
        "cpu_per_job_ratio": (
            round(ours["cpu_ms_per_job"] / base["cpu_ms_per_job"], 2)
            if ours["cpu_ms_per_job"] and base["cpu_ms_per_job"]
            else None
        ),
        "target": f"ratio_wall >= {TARGET_RATIO}",
        "rounds": every,
        "ok": complete and ratio_wall >= TARGET_RATIO,
    }


def run(small: bool) -> dict[str, Any]:
    """T2: 5,000 jobs (small: 500), concurrency 32, zero latency; print and return the figures."""
    jobs = 500 if small else 5000
    rounds = ["baseline", "batchgen"] if small else ["baseline", "batchgen", "batchgen", "baseline"]
    figures = measure(jobs=jobs, concurrency=32, rounds=rounds)
    base, ours = figures["baseline"], figures["batchgen"]
    print(
        f"T2 overhead: batchgen {ours['jobs_per_s']} jobs/s vs baseline {base['jobs_per_s']} "
        f"jobs/s = {figures['ratio_wall']} (target >= {TARGET_RATIO}); run phase only "
        f"{figures['ratio_run']}; CPU/job {ours['cpu_ms_per_job']} ms vs "
        f"{base['cpu_ms_per_job']} ms; calls/job {ours['calls_per_job']} vs "
        f"{base['calls_per_job']} -> {'ok' if figures['ok'] else 'MISSED'}"
    )
    return figures


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.overhead [--small] [--profile FILE]``: ``--profile`` runs batchgen's
    round under cProfile (slower, so its figures are not the benchmark's) and saves the stats."""
    import argparse
    import pstats

    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__)
    parser.add_argument("--small", action="store_true", help="500 jobs instead of 5,000")
    parser.add_argument("--profile", type=Path, help="cProfile batchgen's round into this file")
    parser.add_argument("--jobs", type=int, help="override the job count")
    args = parser.parse_args(argv)
    if args.profile is None:
        run(args.small)
        return 0
    jobs = args.jobs or (500 if args.small else 5000)
    measure(jobs=jobs, concurrency=32, rounds=["batchgen"], profile_to=args.profile.resolve())
    stats = pstats.Stats(str(args.profile))
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(40)
    return 0


if __name__ == "__main__":
    sys.exit(main())
