"""The state database: transitions, events, sync, recovery, reads, the runner lock, WAL."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from batchgen import migrations as schema
from batchgen.errors import StateLockedError, StoreError, TransitionError
from batchgen.plan import JobSpec
from batchgen.store import (
    CACHE_KIB,
    MAX_MESSAGE,
    SYNC_CACHE_KIB,
    TERMINAL_STATES,
    TRANSITIONS,
    Job,
    JobState,
    Output,
    Store,
)

ROOT = Path(__file__).resolve().parents[1]
P, S, Q, R, DL = (
    JobState.PENDING,
    JobState.SUBMITTING,
    JobState.QUEUED,
    JobState.RUNNING,
    JobState.DOWNLOADING,
)
DN, F, U, C = JobState.DONE, JobState.FAILED, JobState.UNKNOWN, JobState.CANCELLED


def spec(
    n: int,
    *,
    sweep: str = "s1",
    model: str = "vendor/model/t2i",
    cost: float | None = 0.05,
    position: int | None = None,
    metadata: dict[str, Any] | None = None,
    seed: int | None = None,
) -> JobSpec:
    """A JobSpec with a readable id; ``n`` picks the prompt and (by default) the position."""
    params: dict[str, Any] = {"prompt": f"prompt {n}, ünïcode ✓", "size": "1K"}
    if seed is not None:
        params["seed"] = seed
    return JobSpec(
        id=f"job{n:05d}",
        sweep=sweep,
        model=model,
        params=params,
        sample=0,
        metadata=metadata if metadata is not None else {"prompt_source": f"p.txt:{n + 1}"},
        estimated_cost=cost,
        position=n if position is None else position,
    )


def specs(ns: Iterator[int] | range | list[int], **kw: Any) -> list[JobSpec]:
    return [spec(n, **kw) for n in ns]


@pytest.fixture
def store() -> Iterator[Store]:
    with Store(memory=True) as s:
        yield s


@pytest.fixture
def file_store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "state" / "test.db") as s:
        yield s


def force(store: Store, job_id: str, state: JobState, **columns: Any) -> None:
    """Put a job straight into a state (test setup only; bypasses the transition table)."""
    sets = "".join(f", {k} = ?" for k in columns)
    store.db.conn.execute(
        f"UPDATE jobs SET state = ?{sets} WHERE id = ?", (state.value, *columns.values(), job_id)
    )


def event_count(store: Store) -> int:
    return int(store.db.conn.execute("SELECT count(*) FROM events").fetchone()[0])


def output(job_id: str, index: int = 0, **kw: Any) -> Output:
    fields: dict[str, Any] = {
        "uri": f"https://cdn.example/{job_id}/{index}.png",
        "path": f"m/p/{job_id}__{index}.png",
        "bytes": 1234,
        "sha256": "ab" * 32,
        "width": 64,
        "height": 48,
        "content_type": "image/png",
    }
    fields.update(kw)
    return Output(job_id=job_id, index=index, **fields)


# ------------------------------------------------------------------------------ states


def test_state_names_are_the_specs_and_the_schemas() -> None:
    assert [s.value for s in JobState] == [
        "pending",
        "submitting",
        "queued",
        "running",
        "downloading",
        "done",
        "failed",
        "unknown",
        "cancelled",
    ]
    assert list(schema._STATES) == [s.value for s in JobState]
    assert JobState("done") is DN and f"{DN}" == "done" and isinstance(DN, str)


def test_schema_refuses_a_state_that_is_not_one(store: Store) -> None:
    store.sync([spec(1)])
    with pytest.raises(sqlite3.IntegrityError):
        store.db.conn.execute("UPDATE jobs SET state = 'finished' WHERE id = 'job00001'")


#: (method, call, the states it may start from, the state it leads to) — written out here, not
#: derived from the implementation, so a change to either side shows up as a failure
def _calls() -> dict[str, tuple[Callable[[Store, str], Any], set[JobState], JobState]]:
    return {
        "mark_submitting": (lambda s, j: s.mark_submitting(j), {P}, S),
        "mark_queued": (lambda s, j: s.mark_queued(j, "req-1"), {S}, Q),
        "mark_running": (lambda s, j: s.mark_running(j), {Q}, R),
        "mark_downloading": (lambda s, j: s.mark_downloading(j, ["https://x/1.png"]), {Q, R}, DL),
        "mark_done": (lambda s, j: s.mark_done(j), {DL}, DN),
        "mark_failed": (lambda s, j: s.mark_failed(j, "rejected", "422"), {P, S, Q, R, DL}, F),
        "mark_unknown": (lambda s, j: s.mark_unknown(j, "read timeout"), {S}, U),
        "mark_cancelled": (lambda s, j: s.mark_cancelled(j), {P, Q, R, U}, C),
        "release": (lambda s, j: s.release(j, "rate_limited", "429"), {S}, P),
    }


CALLS = _calls()


def test_transition_table_is_exactly_what_the_methods_do() -> None:
    edges = {(src, to) for _, sources, to in CALLS.values() for src in sources}
    edges |= {(src, P) for src in (F, U, C)}  # reset()
    table = {(src, to) for src, targets in TRANSITIONS.items() for to in targets}
    assert table == edges
    assert set(TRANSITIONS) == set(JobState)
    assert not TRANSITIONS[DN]  # done is final
    assert {DN, F, U, C} == TERMINAL_STATES


@pytest.mark.parametrize("method", sorted(CALLS))
@pytest.mark.parametrize("start", list(JobState), ids=lambda s: s.value)
def test_every_transition_allowed_or_refused(store: Store, method: str, start: JobState) -> None:
    call, sources, target = CALLS[method]
    store.sync([spec(1)])
    force(store, "job00001", start)
    before = event_count(store)
    if start in sources:
        call(store, "job00001")
        assert store.get("job00001").state == target
        events = store.events("job00001")
        assert len(events) == before + 1
        assert (events[-1]["from_state"], events[-1]["to_state"]) == (start.value, target.value)
    else:
        with pytest.raises(TransitionError, match=f"job job00001 is {start.value}"):
            call(store, "job00001")
        assert store.get("job00001").state == start
        assert event_count(store) == before


def test_unknown_job_is_an_error(store: Store) -> None:
    with pytest.raises(StoreError, match="no job 'nope'"):
        store.mark_submitting("nope")
    with pytest.raises(StoreError, match="no job 'nope'"):
        store.get("nope")


def test_full_life_of_a_job(store: Store) -> None:
    store.sync([spec(1, seed=7)])
    run_id = store.start_run("/m.yaml", "h" * 64, "0.1.0")
    job = store.mark_submitting("job00001")
    assert (job.state, job.attempts, job.submits, job.request_id) == (S, 1, 1, None)
    assert job.submitted_at is not None and job.seed == 7
    store.mark_queued("job00001", "req-abc")
    store.mark_running("job00001")
    store.mark_downloading("job00001", ["https://cdn/a.png", "https://cdn/b.png"])
    store.record_output(output("job00001", 0))
    store.record_output(output("job00001", 1))
    store.mark_done("job00001")
    job = store.get("job00001")
    assert job.state == DN and job.request_id == "req-abc"
    assert job.output_uris == ["https://cdn/a.png", "https://cdn/b.png"]
    assert job.finished_at is not None and job.done_at is not None
    assert job.params == {"prompt": "prompt 1, ünïcode ✓", "size": "1K", "seed": 7}
    assert job.prompt == "prompt 1, ünïcode ✓"
    events = store.events("job00001")
    assert [e["to_state"] for e in events] == [
        "submitting",
        "queued",
        "running",
        "downloading",
        "done",
    ]
    assert {e["run_id"] for e in events} == {run_id}
    assert events[1]["detail"] == "request req-abc"
    for stamp in (job.created_at, job.updated_at, job.submitted_at, job.done_at, events[0]["at"]):
        assert stamp is not None and stamp.endswith("Z")
        assert datetime.fromisoformat(stamp).utcoffset() is not None


def test_refreshed_output_uris_replace_the_expired_ones(store: Store) -> None:
    store.sync([spec(1)])
    store.mark_submitting("job00001")
    store.mark_queued("job00001", "req-1")
    with pytest.raises(TransitionError, match="refreshed while downloading"):
        store.update_output_uris("job00001", ["https://cdn/new.png"])
    store.mark_downloading("job00001", ["https://cdn/old.png"])
    store.update_output_uris("job00001", ["https://cdn/new.png"])
    job = store.get("job00001")
    assert job.output_uris == ["https://cdn/new.png"] and job.state == DL
    last = store.events("job00001")[-1]
    assert (last["from_state"], last["to_state"], last["detail"]) == (
        "downloading",
        "downloading",
        "output URIs refreshed",
    )


def test_submitting_clears_what_an_earlier_attempt_left(store: Store) -> None:
    store.sync([spec(1)])
    store.mark_submitting("job00001")
    store.mark_queued("job00001", "req-old")
    store.mark_downloading("job00001", ["https://old"])
    store.mark_failed("job00001", "download_failed", "404")
    assert store.reset([F]) == 1
    job = store.mark_submitting("job00001")
    assert job.request_id is None and job.output_uris == [] and job.finished_at is None
    assert job.attempts == 1 and job.submits == 2


def test_money_guarding_commits_are_durable_and_the_rest_normal(file_store: Store) -> None:
    seen: list[str] = []
    file_store.db.conn.set_trace_callback(seen.append)
    file_store.sync([spec(1)])
    seen.clear()
    file_store.mark_submitting("job00001")
    assert seen[0] == "PRAGMA synchronous = FULL" and seen[-1] == "PRAGMA synchronous = NORMAL"
    seen.clear()
    file_store.mark_queued("job00001", "r")
    assert seen[0] == "PRAGMA synchronous = FULL"
    seen.clear()
    file_store.mark_running("job00001")
    assert "PRAGMA synchronous = FULL" not in seen
    assert file_store.db.conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL


def test_failure_unknown_and_release_record_the_reason(store: Store) -> None:
    store.sync(specs(range(3)))
    for n in range(3):
        store.mark_submitting(f"job{n:05d}")
    store.mark_failed("job00000", "rejected", "422: resolution '3K' is not one of 1K, 2K")
    store.mark_unknown("job00001", "read timeout after send")
    store.release("job00002", "rate_limited", "429 Too Many Requests")
    failed, unknown, released = (store.get(f"job{n:05d}") for n in range(3))
    assert (failed.error_class, failed.last_error) == (
        "rejected",
        "422: resolution '3K' is not one of 1K, 2K",
    )
    assert (unknown.error_class, unknown.last_error) == (
        "ambiguous_submit",
        "read timeout after send",
    )
    assert released.state == P and released.attempts == 1 and released.submits == 0
    assert released.error_class == "rate_limited"
    assert (
        store.events("job00000")[-1]["detail"]
        == "rejected: 422: resolution '3K' is not one of 1K, 2K"
    )


def test_release_of_an_ambiguous_submit_counts_a_possible_duplicate(store: Store) -> None:
    store.sync([spec(1)])
    store.mark_submitting("job00001")
    store.release("job00001", "ambiguous_submit", "502 on submit", possible_duplicate=True)
    job = store.get("job00001")
    assert job.state == P and job.submits == 1 and job.possible_duplicates == 1
    assert store.possible_duplicates() == 1
    assert "(possible duplicate)" in store.events("job00001")[-1]["detail"]


def test_done_clears_errors_of_earlier_tries(store: Store) -> None:
    store.sync([spec(1)])
    store.mark_submitting("job00001")
    store.release("job00001", "rate_limited", "429")
    store.mark_submitting("job00001")
    store.mark_queued("job00001", "r")
    store.mark_downloading("job00001", [])
    store.mark_done("job00001")
    job = store.get("job00001")
    assert job.error_class is None and job.last_error is None and job.attempts == 2


def test_messages_are_bounded_and_never_hold_the_token(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = "rc_live_0123456789abcdef"
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", token)
    store.sync(specs(range(2)))
    store.mark_submitting("job00000")
    store.mark_failed("job00000", "fatal", f"401 for Authorization: Bearer {token}")
    store.mark_submitting("job00001")
    store.mark_unknown("job00001", "x" * (MAX_MESSAGE * 3))
    dump = "\n".join(store.db.conn.iterdump())
    assert token not in dump
    assert "Bearer [redacted]" in store.get("job00000").last_error  # type: ignore[operator]
    long = store.get("job00001").last_error
    assert long is not None and len(long) == MAX_MESSAGE and long.endswith("…")


# ------------------------------------------------------------------------------ outputs


def test_outputs_are_recorded_while_downloading_and_replaced_by_index(store: Store) -> None:
    store.sync(specs(range(2)))
    with pytest.raises(TransitionError, match="outputs are recorded while downloading"):
        store.record_output(output("job00000"))
    with pytest.raises(StoreError, match="no job 'ghost'"):
        store.record_output(output("ghost"))
    force(store, "job00000", DL)
    force(store, "job00001", DL)
    store.record_output(output("job00000", 1))
    store.record_output(output("job00000", 0, bytes=10))
    store.record_output(output("job00000", 0, bytes=20, sha256="cd" * 32))  # a re-download
    store.record_output(output("job00001", 0, width=None, height=None, content_type=None))
    outs = store.outputs("job00000")
    assert [(o.index, o.bytes, o.sha256) for o in outs] == [
        (0, 20, "cd" * 32),
        (1, 1234, "ab" * 32),
    ]
    assert [o.job_id for o in store.outputs()] == ["job00000", "job00000", "job00001"]
    assert store.outputs("job00001")[0].width is None


# ------------------------------------------------------------------------------ sync


def _max_updated(store: Store) -> str:
    return str(store.db.conn.execute("SELECT max(updated_at) FROM jobs").fetchone()[0])


def test_sync_inserts_new_jobs_as_pending(store: Store) -> None:
    report = store.sync(specs(range(10)), chunk_size=3)
    assert (report.added, report.unchanged, report.retired, report.restored, report.total) == (
        10,
        0,
        0,
        0,
        10,
    )
    assert store.counts()["pending"] == 10
    job = store.get("job00004")
    assert (job.state, job.in_manifest, job.attempts, job.sweep, job.position) == (
        P,
        True,
        0,
        "s1",
        4,
    )
    assert job.metadata == {"prompt_source": "p.txt:5"} and job.estimated_cost == 0.05
    assert event_count(store) == 0  # planning is not a state change


def test_unchanged_plan_writes_nothing(file_store: Store) -> None:
    file_store.sync(specs(range(50)), chunk_size=7)
    file_store.mark_submitting("job00003")
    stamp, events = _max_updated(file_store), event_count(file_store)
    changes = file_store.db.conn.total_changes
    report = file_store.sync(specs(range(50)), chunk_size=7)
    assert (report.added, report.updated, report.retired, report.restored) == (0, 0, 0, 0)
    assert report.unchanged == report.total == 50
    assert _max_updated(file_store) == stamp and event_count(file_store) == events
    # rows written: the temporary id list (50) and the plan record (2 deleted, 2 inserted)
    writes = file_store.db.conn.total_changes - changes
    assert writes == 50 + 4
    assert file_store.get("job00003").state == S


def test_edited_plan_adds_only_new_jobs_and_keeps_states(store: Store) -> None:
    store.sync(specs(range(5)))
    force(store, "job00000", DN)
    force(store, "job00001", F, error_class="rejected")
    report = store.sync(specs(range(8)))
    assert (report.added, report.unchanged, report.retired, report.total) == (3, 5, 0, 8)
    assert store.get("job00000").state == DN and store.get("job00001").state == F
    assert store.counts()["pending"] == 6


def test_removed_jobs_are_retired_never_claimed_and_come_back(store: Store) -> None:
    store.sync(specs(range(6)))
    force(store, "job00001", DN)
    report = store.sync(specs([0, 1, 2]))
    assert (report.retired, report.unchanged, report.total) == (3, 3, 3)
    assert {j.id for j in store.next_pending(100)} == {"job00000", "job00002"}
    counts = store.counts()
    assert counts["pending"] == 2 and counts["done"] == 1 and counts["retired"] == 3
    assert store.get("job00004").in_manifest is False
    assert [j.id for j in store.jobs()] == ["job00000", "job00001", "job00002"]
    assert len(store.jobs(include_retired=True)) == 6
    report = store.sync(specs([0, 1, 2, 4, 9]))
    assert (report.added, report.restored, report.retired, report.unchanged) == (1, 1, 0, 3)
    assert store.get("job00004").in_manifest is True
    assert {j.id for j in store.next_pending(100)} == {
        "job00000",
        "job00002",
        "job00004",
        "job00009",
    }
    assert store.counts()["retired"] == 2


def test_restored_job_keeps_its_state(store: Store) -> None:
    store.sync(specs(range(2)))
    force(store, "job00001", DN)
    store.sync([spec(0)])
    store.sync(specs(range(2)))
    job = store.get("job00001")
    assert job.in_manifest and job.state == DN


def test_relabelled_jobs_are_updated_not_duplicated(store: Store) -> None:
    store.sync(specs(range(4)))
    force(store, "job00002", DN)
    changed = [
        spec(0),
        spec(1, sweep="renamed"),
        spec(2, cost=0.5),
        spec(3, position=99, metadata={"Category": "Animals"}),
    ]
    report = store.sync(changed)
    assert (report.added, report.updated, report.unchanged, report.total) == (0, 3, 1, 4)
    assert store.get("job00001").sweep == "renamed"
    assert store.get("job00002").estimated_cost == 0.5 and store.get("job00002").state == DN
    assert store.get("job00003").position == 99
    assert store.get("job00003").metadata == {"Category": "Animals"}
    assert store.sync(changed).updated == 0


def test_a_sync_that_fails_half_way_changes_nothing(store: Store) -> None:
    store.sync(specs(range(3)), fingerprint="v1")

    def broken() -> Iterator[JobSpec]:
        yield from specs(range(10, 20))
        raise RuntimeError("the planner broke")

    with pytest.raises(RuntimeError, match="the planner broke"):
        store.sync(broken(), chunk_size=4)
    assert store.counts()["pending"] == 3 and store.counts()["retired"] == 0
    assert store.synced_fingerprint() == "v1"
    assert store.sync(specs(range(3))).added == 0  # the temp table did not leak


def test_unchanged_chunks_are_skipped_and_changed_ones_written(store: Store) -> None:
    store.sync(specs(range(10)), chunk_size=4)
    force(store, "job00005", DN)
    seen: list[str] = []
    store.db.conn.set_trace_callback(seen.append)
    report = store.sync(specs(range(10)), chunk_size=4)
    store.db.conn.set_trace_callback(None)
    assert (report.added, report.unchanged, report.total) == (0, 10, 10)
    assert not [sql for sql in seen if sql.startswith("INSERT INTO jobs")]  # no row looked up
    # a change in the middle chunk is written; its neighbours are still skipped
    edited = [*specs(range(4)), spec(4), spec(5, sweep="renamed"), *specs(range(6, 10))]
    seen.clear()
    store.db.conn.set_trace_callback(seen.append)
    report = store.sync(edited, chunk_size=4)
    store.db.conn.set_trace_callback(None)
    assert (report.updated, report.unchanged) == (1, 9)
    assert len([sql for sql in seen if sql.startswith("INSERT INTO jobs")]) == 4
    assert store.get("job00005").sweep == "renamed" and store.get("job00005").state == DN
    # another chunk size cannot trust the digests: everything is looked up, nothing changes
    assert store.sync(edited, chunk_size=3).unchanged == 10


def test_rows_deleted_behind_the_stores_back_are_noticed(store: Store) -> None:
    store.sync(specs(range(6)), chunk_size=3)
    store.db.conn.execute("DELETE FROM jobs WHERE id = 'job00004'")
    with pytest.raises(StoreError, match="changed outside batchgen"):
        store.sync(specs(range(6)), chunk_size=3)
    report = store.sync(specs(range(6)), chunk_size=3)  # the digests were cleared
    assert (report.added, report.unchanged) == (1, 5)
    assert store.get("job00004").state == P


def test_fingerprint_is_recorded_and_cleared(store: Store) -> None:
    assert store.synced_fingerprint() is None
    store.sync(specs(range(3)), fingerprint="abc")
    assert store.synced_fingerprint() == "abc"
    store.sync(specs(range(3)), fingerprint="def")
    assert store.synced_fingerprint() == "def"
    store.sync(specs(range(4)))
    assert store.synced_fingerprint() is None


def test_empty_plan_retires_everything(store: Store) -> None:
    store.sync(specs(range(3)))
    report = store.sync([])
    assert (report.retired, report.total) == (3, 0)
    assert store.next_pending(10) == []


def test_sync_plans_a_thousand_jobs_in_chunks(file_store: Store) -> None:
    report = file_store.sync(specs(range(1000)), chunk_size=128)
    assert report.added == 1000
    assert [j.position for j in file_store.next_pending(3)] == [0, 1, 2]
    report = file_store.sync(specs(range(500, 1500)), chunk_size=128)
    assert (report.added, report.retired, report.unchanged) == (500, 500, 500)


def test_compare_says_what_sync_would_do_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with Store(path) as s:
        s.sync(specs(range(4)))
        force(s, "job00000", DN)
        force(s, "job00001", F)
    with Store(path, readonly=True) as ro:
        plan = [*specs(range(1, 4)), spec(7, sweep="b", model="m2", cost=None), spec(8, cost=0.25)]
        diff = ro.compare(plan)
        assert (diff.total, diff.new, diff.done, diff.retire) == (5, 2, 0, 1)
        assert diff.by_state["failed"] == 1 and diff.by_state["pending"] == 2
        assert set(diff.by_state) == {s.value for s in JobState}
        assert diff.new_by_sweep == {"b": 1, "s1": 1}
        assert diff.new_by_model == {"m2": 1, "vendor/model/t2i": 1}
        assert (diff.new_cost, diff.new_unpriced) == (0.25, 1)
        assert ro.compare(specs(range(4))).done == 1
        with pytest.raises(StoreError, match="read-only"):
            ro.sync(plan)
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            ro.db.conn.execute("DELETE FROM jobs")
    with Store(path) as s:
        assert s.counts()["pending"] == 2 and s.counts()["retired"] == 0


@pytest.mark.parametrize(
    ("plan", "expected"),
    [
        # (total, new, done, retire, pending, failed)
        pytest.param(list(range(10)), (10, 0, 1, 0, 8, 1), id="unchanged: the counts shortcut"),
        pytest.param(list(range(12)), (12, 2, 1, 0, 8, 1), id="appended after the last chunk"),
        pytest.param(list(range(8)), (8, 0, 1, 2, 6, 1), id="shorter: jobs to retire"),
        pytest.param([0, 1, 2, 3, 5, 4, 6, 7, 8, 9], (10, 0, 1, 0, 8, 1), id="reordered"),
        pytest.param([0, 1, 2, 3, 4, 5, 6, 7, 8, 42], (10, 1, 1, 1, 7, 1), id="last chunk edited"),
    ],
)
def test_compare_agrees_with_what_sync_then_finds(
    tmp_path: Path, plan: list[int], expected: tuple[int, ...]
) -> None:
    path = tmp_path / "s.db"
    with Store(path) as s:
        s.sync(specs(range(10)), chunk_size=4)  # chunks of 4, 4, 2
        force(s, "job00001", DN)
        force(s, "job00007", F)
    with Store(path, readonly=True) as ro:
        diff = ro.compare(specs(plan))
    got = (diff.total, diff.new, diff.done, diff.retire, diff.by_state["pending"])
    assert (*got, diff.by_state["failed"]) == expected
    with Store(path) as s:  # and sync agrees
        report = s.sync(specs(plan), chunk_size=4)
        assert (report.added, report.retired) == (diff.new, diff.retire)


def test_readonly_needs_an_existing_state(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no state database at"):
        Store(tmp_path / "missing.db", readonly=True)
    assert not (tmp_path / "missing.db").exists()


# ------------------------------------------------------------------------------ reads


def test_next_pending_is_in_plan_order_and_claims_nothing(store: Store) -> None:
    store.sync([spec(n, position=10 - n) for n in range(6)])
    force(store, "job00005", S)
    assert [j.id for j in store.next_pending(3)] == ["job00004", "job00003", "job00002"]
    assert [j.id for j in store.next_pending(3)] == ["job00004", "job00003", "job00002"]
    assert store.next_pending(0) == []


def test_next_pending_uses_the_index(store: Store) -> None:
    plan = store.db.conn.execute(
        "EXPLAIN QUERY PLAN SELECT id FROM jobs WHERE in_manifest = 1 AND state = 'pending' "
        "ORDER BY position LIMIT 5"
    ).fetchall()
    detail = " ".join(row[3] for row in plan)
    assert "jobs_in_manifest_state_position" in detail and "TEMP B-TREE" not in detail
    plan = store.db.conn.execute(
        "EXPLAIN QUERY PLAN SELECT in_manifest, state, count(*) FROM jobs "
        "GROUP BY in_manifest, state"
    ).fetchall()
    assert "COVERING INDEX jobs_in_manifest_state_position" in " ".join(r[3] for r in plan)


def test_status_money_queries_read_an_index_not_the_table(store: Store) -> None:
    seen: list[str] = []
    store.db.conn.set_trace_callback(seen.append)
    store.cost()
    store.unpriced()
    store.possible_duplicates()
    store.db.conn.set_trace_callback(None)
    for sql in seen:
        plan = " ".join(r[3] for r in store.db.conn.execute("EXPLAIN QUERY PLAN " + sql))
        assert "COVERING INDEX" in plan, (sql, plan)


def test_jobs_filters_by_state_and_streams(store: Store) -> None:
    store.sync(specs(range(25)))
    for n in (3, 7, 11):
        force(store, f"job{n:05d}", F)
    assert [j.id for j in store.jobs([F])] == ["job00003", "job00007", "job00011"]
    assert [j.id for j in store.jobs([F, P], limit=2)] == ["job00000", "job00001"]
    assert store.jobs([]) == []
    streamed = list(store.iter_jobs(batch=4))
    assert [j.position for j in streamed] == list(range(25))
    assert [j.id for j in store.iter_jobs([F], batch=2)] == ["job00003", "job00007", "job00011"]
    assert all(isinstance(j, Job) for j in streamed)


def test_counts_have_every_state_and_retired(store: Store) -> None:
    assert store.counts() == {**{s.value: 0 for s in JobState}, "retired": 0}
    store.sync(specs(range(6)))
    force(store, "job00000", DN)
    force(store, "job00001", U)
    store.sync(specs(range(1, 6)))
    counts = store.counts()
    assert counts["pending"] == 4 and counts["unknown"] == 1 and counts["retired"] == 1
    assert counts["done"] == 0  # the done job left the manifest: counted as retired only
    assert sum(counts.values()) == 6


def test_top_errors_group_by_class_with_the_latest_message(store: Store) -> None:
    store.sync(specs(range(8)))
    for n, (cls, msg, at) in enumerate(
        [
            ("rejected", "old message", "2026-01-01T00:00:00.000Z"),
            ("rejected", "newest message", "2026-01-03T00:00:00.000Z"),
            ("rejected", "middle message", "2026-01-02T00:00:00.000Z"),
            ("download_failed", "404", "2026-01-01T00:00:00.000Z"),
            ("ambiguous_submit", "timeout", "2026-01-01T00:00:00.000Z"),
            ("ambiguous_submit", "timeout 2", "2026-01-04T00:00:00.000Z"),
        ]
    ):
        state = U if cls == "ambiguous_submit" else F
        force(store, f"job{n:05d}", state, error_class=cls, last_error=msg, updated_at=at)
    force(store, "job00006", DN, error_class="ignored", last_error="done jobs do not count")
    assert store.top_errors() == [
        ("rejected", "newest message", 3),
        ("ambiguous_submit", "timeout 2", 2),
        ("download_failed", "404", 1),
    ]
    assert store.top_errors(1) == [("rejected", "newest message", 3)]


def test_cost_counts_possibly_paid_submits_and_planned_jobs(store: Store) -> None:
    store.sync([spec(0, cost=1.0), spec(1, cost=2.0), spec(2, cost=None), spec(3, cost=4.0)])
    assert store.cost() == (0.0, 7.0) and store.unpriced() == 1
    store.mark_submitting("job00000")  # in flight: may be paid
    store.mark_submitting("job00001")
    store.release("job00001", "rate_limited", "429")  # certainly not paid
    store.mark_submitting("job00003")
    store.mark_unknown("job00003", "timeout")  # may be paid
    store.mark_submitting("job00002")  # unpriced: counts 0
    assert store.cost() == (5.0, 7.0)
    store.sync([spec(0, cost=1.0), spec(1, cost=2.0), spec(2, cost=None)])  # job 3 retired
    assert store.cost() == (5.0, 3.0)  # its money is still spent


def test_pending_cost_sums_the_next_jobs_in_plan_order(store: Store) -> None:
    plan = [
        spec(0, cost=1.0, position=3),
        spec(1, cost=None, position=0),
        spec(2, cost=2.5, position=1),
        spec(3, cost=4.0, position=2),
        spec(4, cost=8.0, position=4),
    ]
    store.sync(plan)
    force(store, "job00003", DN)
    assert store.pending_cost() == (4, 11.5, 1)
    assert store.pending_cost(2) == (2, 2.5, 1)  # positions 0 (unpriced) and 1
    assert store.pending_cost(0) == (0, 0.0, 0)
    store.sync(plan[:4])  # job 4 retired
    assert store.pending_cost() == (3, 3.5, 1)


def test_rate_counts_recently_done_jobs(store: Store) -> None:
    store.sync(specs(range(3)))
    force(store, "job00000", DN, done_at="2020-01-01T00:00:00.000Z")
    for n in (1, 2):
        job_id = f"job{n:05d}"
        force(store, job_id, DL)
        store.mark_done(job_id)
    assert store.rate(60.0) == pytest.approx(2 / 60.0)


def test_runs_are_recorded(store: Store) -> None:
    run_id = store.start_run("/abs/m.yaml", "f" * 64, "0.1.0")
    assert store.run_id == run_id
    store.finish_run(run_id, {"done": 3, "failed": 0})
    (run,) = store.runs()
    assert run["summary"] == {"done": 3, "failed": 0} and run["finished_at"] is not None
    assert run["pid"] == os.getpid() and run["manifest_hash"] == "f" * 64
    assert store.run_id is None
    with pytest.raises(StoreError, match="no run 99"):
        store.finish_run(99, {})


# ------------------------------------------------------------------------------ recovery


def _crashed(store: Store) -> None:
    """Three jobs left in `submitting` by a crash: one with a request id, two without."""
    store.sync(specs(range(4)))
    for n in range(3):
        store.mark_submitting(f"job{n:05d}")
    store.db.conn.execute("UPDATE jobs SET request_id = 'req-0' WHERE id = 'job00000'")
    store.db.conn.execute("UPDATE jobs SET attempts = 5 WHERE id = 'job00002'")


def test_recover_parks_ambiguous_submits(store: Store) -> None:
    _crashed(store)
    assert store.recover("park") == {"queued": 1, "unknown": 2, "pending": 0, "failed": 0}
    assert store.get("job00000").state == Q and store.get("job00000").request_id == "req-0"
    parked = store.get("job00001")
    assert parked.state == U and parked.error_class == "ambiguous_submit"
    assert store.events("job00001")[-1]["detail"].startswith("recovered:")
    assert store.next_pending(10)[0].id == "job00003"  # parked jobs are never resubmitted
    assert store.recover("park") == {"queued": 0, "unknown": 0, "pending": 0, "failed": 0}


def test_recover_retry_resubmits_and_counts_possible_duplicates(store: Store) -> None:
    _crashed(store)
    assert store.recover("retry", max_attempts=5) == {
        "queued": 1,
        "unknown": 0,
        "pending": 1,
        "failed": 1,
    }
    again = store.get("job00001")
    assert again.state == P and again.possible_duplicates == 1 and again.submits == 1
    assert "possible duplicate" in store.events("job00001")[-1]["detail"]
    spent = store.get("job00002")
    assert spent.state == F and "5 of 5 attempts" in (spent.last_error or "")
    with pytest.raises(ValueError, match="'park' or 'retry'"):
        store.recover("resubmit")


def test_reset_sends_failed_and_unknown_back_to_pending(store: Store) -> None:
    store.sync(specs(range(5)))
    force(store, "job00000", F, attempts=5, error_class="rejected", request_id="r0")
    force(store, "job00001", U, attempts=1, error_class="ambiguous_submit")
    force(store, "job00002", DN)
    force(store, "job00003", C)
    with pytest.raises(TransitionError, match="not done"):
        store.reset([F, DN])
    assert store.reset([F]) == 1
    job = store.get("job00000")
    assert (job.state, job.attempts, job.request_id, job.error_class) == (P, 0, None, None)
    assert store.events("job00000")[-1]["detail"] == "reset by the user (was failed: rejected)"
    assert store.reset([U, C]) == 2
    assert store.reset([]) == 0
    assert store.counts()["pending"] == 4 and store.counts()["done"] == 1


def test_reset_leaves_retired_jobs_alone(store: Store) -> None:
    store.sync(specs(range(2)))
    force(store, "job00001", F)
    store.sync([spec(0)])
    assert store.reset([F]) == 0
    assert store.get("job00001").state == F


def test_cancel_pending_in_bulk(store: Store) -> None:
    store.sync(specs(range(5)))
    force(store, "job00000", Q)
    assert store.cancel_pending() == 4
    assert store.counts()["cancelled"] == 4 and store.get("job00000").state == Q
    assert store.events("job00001")[-1]["to_state"] == "cancelled"


# ------------------------------------------------------------------------------ file, WAL, lock


def test_file_state_uses_wal_foreign_keys_and_busy_timeout(file_store: Store) -> None:
    conn = file_store.db.conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 30_000
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
        conn.execute("INSERT INTO events (job_id, at, to_state) VALUES ('ghost', 'now', 'pending')")


def test_store_needs_exactly_one_of_path_or_memory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one of: a path, or memory=True"):
        Store()
    with pytest.raises(ValueError, match="exactly one of: a path, or memory=True"):
        Store(tmp_path / "x.db", memory=True)


def test_not_a_database_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match=r"junk\.db"):
        Store(path)


def test_reader_sees_consistent_counts_while_a_writer_commits(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with Store(path) as writer, Store(path) as reader:
        writer.sync(specs(range(200)))
        reader.db.conn.execute("BEGIN")  # one read snapshot, as a long `status` query has
        before = reader.counts()
        for n in range(50):
            job_id = f"job{n:05d}"
            writer.mark_submitting(job_id)
            writer.mark_queued(job_id, f"r{n}")
            if n % 2:
                writer.mark_failed(job_id, "rejected", "no")
            # the writer is never blocked by the open read, and the reader's view never moves
            assert reader.counts() == before
        assert writer.counts()["failed"] == 25
        reader.db.conn.execute("COMMIT")
        after = reader.counts()
        assert after["queued"] == 25 and after["failed"] == 25 and after["pending"] == 150
        assert sum(after.values()) == sum(before.values()) == 200
        assert writer.integrity_check() == []


def test_integrity_check_after_a_busy_life(file_store: Store) -> None:
    file_store.sync(specs(range(300)))
    for n in range(100):
        job_id = f"job{n:05d}"
        file_store.mark_submitting(job_id)
        file_store.mark_queued(job_id, f"r{n}")
        file_store.mark_downloading(job_id, [f"https://x/{n}"])
        file_store.record_output(output(job_id))
        file_store.mark_done(job_id)
    file_store.sync(specs(range(50, 350)))
    assert file_store.integrity_check() == []
    assert file_store.db.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_memory_store_lock_is_a_no_op(store: Store) -> None:
    with store.lock(), store.lock():
        pass


def test_second_lock_in_one_process_is_refused_with_the_pid(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with Store(path) as first, Store(path) as second:
        with first.lock():
            assert (tmp_path / "s.db.lock").read_text().strip() == str(os.getpid())
            refused = rf"another batchgen run \(pid {os.getpid()}\)"
            with pytest.raises(StateLockedError, match=refused), second.lock():
                pass  # pragma: no cover
            with pytest.raises(StoreError, match="already holds the lock"), first.lock():
                pass  # pragma: no cover
        assert (tmp_path / "s.db.lock").read_text() == ""  # free again: no stale pid
        with second.lock():
            pass


HOLDER = textwrap.dedent(
    """
    import sys, time
    from batchgen.store import Store
    store = Store(sys.argv[1])
    with store.lock():
        print("locked", flush=True)
        time.sleep(60)
    """
)


@pytest.fixture
def lock_holder(tmp_path: Path) -> Iterator[Callable[[Path], subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []

    def start(path: Path) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(path)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_lock_refused_across_processes_and_released_by_sigkill(
    tmp_path: Path, lock_holder: Callable[[Path], subprocess.Popen[str]]
) -> None:
    path = tmp_path / "s.db"
    Store(path).close()
    holder = lock_holder(path)
    with Store(path) as store:
        with pytest.raises(StateLockedError) as info, store.lock():
            pass  # pragma: no cover
        assert f"another batchgen run (pid {holder.pid}) is using the state {path}" in str(
            info.value
        )
        assert info.value.exit_code == 2
        # reads go on while the other process holds the runner lock
        assert store.counts()["pending"] == 0
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        with store.lock():  # the OS released it with the process
            store.sync(specs(range(3)))
        assert store.integrity_check() == []


def test_job_dataclass_round_trips_json_columns(store: Store) -> None:
    meta = {"Category": "Animals", "Challenge": "Perspective", "nested": {"a": [1, 2]}}
    store.sync([spec(0, metadata=meta)])
    raw = store.db.conn.execute("SELECT params, metadata, output_uris FROM jobs").fetchone()
    assert json.loads(raw[1]) == meta and json.loads(raw[2]) == []
    assert store.get("job00000").metadata == meta


def test_page_cache_is_small_for_a_run_and_big_only_while_syncing(file_store: Store) -> None:
    """S4: a run's cache stays CACHE_KIB (it would grow with the file); sync() plans a million
    random ids with SYNC_CACHE_KIB, and gives it back even when the plan raises."""
    conn = file_store.db.conn
    assert conn.execute("PRAGMA cache_size").fetchone()[0] == -CACHE_KIB
    seen: list[int] = []

    def plan() -> Iterator[JobSpec]:
        seen.append(conn.execute("PRAGMA cache_size").fetchone()[0])
        yield from specs(range(3))

    file_store.sync(plan())
    assert seen == [-SYNC_CACHE_KIB]
    assert conn.execute("PRAGMA cache_size").fetchone()[0] == -CACHE_KIB

    def broken() -> Iterator[JobSpec]:
        yield spec(9)
        raise RuntimeError("the plan broke")

    with pytest.raises(RuntimeError):
        file_store.sync(broken())
    assert conn.execute("PRAGMA cache_size").fetchone()[0] == -CACHE_KIB


def test_store_import_leaves_pandas_and_numpy_out_but_importable() -> None:
    """sqlite-utils would import pandas and numpy (0.26 s, 80 MB per command); batchgen's
    import of it blocks them for that one import only."""
    code = textwrap.dedent(
        """
        import importlib.util, sys
        import batchgen.store
        import sqlite_utils.db
        assert "pandas" not in sys.modules and "numpy" not in sys.modules, "imported"
        assert sqlite_utils.db.pd is None and sqlite_utils.db.np is None
        for name in ("numpy", "pandas"):
            if importlib.util.find_spec(name) is not None:
                importlib.import_module(name)  # still importable afterwards
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
