"""Schema migrations: order, records, upgrades of older states, refusals."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from sqlite_utils import Database

from batchgen.errors import StoreError
from batchgen.migrations import Migrations, migrations
from batchgen.store import JobState, Store

SHIPPED = ["m001_create_tables", "m002_create_indexes", "m003_create_money_indexes"]


def _indexes(db: Database) -> set[str]:
    rows = db.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")
    return {row[0] for row in rows}


def test_shipped_migrations_in_order() -> None:
    # Appending is fine; editing, renaming or reordering a shipped step is not.
    assert migrations.names[: len(SHIPPED)] == SHIPPED


def test_fresh_state_gets_every_migration_once(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    Store(path).close()
    db = Database(path)
    assert migrations.applied(db) == migrations.names
    rows = db.execute("SELECT migration_set, name, applied_at FROM _migrations").fetchall()
    assert [(r[0], r[1]) for r in rows] == [("batchgen", n) for n in migrations.names]
    assert all(r[2].endswith("Z") for r in rows)
    assert migrations.apply(db) == []  # nothing left to do
    assert set(db.table_names()) >= {"runs", "jobs", "outputs", "events", "sync", "_migrations"}
    db.close()


def test_a_state_made_by_m001_only_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = Database(path)
    db.conn.isolation_level = None
    assert migrations.apply(db, stop_after="m001_create_tables") == ["m001_create_tables"]
    assert "jobs_in_manifest_state_position" not in _indexes(db)
    db.execute(
        "INSERT INTO jobs (id, sweep, model, params, prompt, sample, metadata, state, position, "
        "created_at, updated_at) VALUES ('old1', 's', 'm', '{\"prompt\": \"p\"}', 'p', 0, '{}', "
        "'failed', 0, '2025-01-01T00:00:00.000Z', '2025-01-01T00:00:00.000Z')"
    )
    db.close()
    with Store(path) as store:
        assert migrations.applied(store.db) == migrations.names
        assert {
            "jobs_in_manifest_state_position",
            "events_job_id",
            "jobs_done_at",
            "jobs_cost",
            "jobs_possible_duplicates",
        } <= _indexes(store.db)
        job = store.get("old1")
        assert job.state == JobState.FAILED and job.params == {"prompt": "p"}
        assert store.reset([JobState.FAILED]) == 1
        assert store.integrity_check() == []


def test_readonly_refuses_a_state_that_needs_upgrading(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = Database(path)
    db.conn.isolation_level = None
    migrations.apply(db, stop_after="m001_create_tables")
    db.close()
    with pytest.raises(
        StoreError,
        match=r"needs upgrading \(m002_create_indexes, m003_create_money_indexes not applied\)",
    ):
        Store(path, readonly=True)
    Store(path).close()
    Store(path, readonly=True).close()


def test_state_from_a_newer_batchgen_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    Store(path).close()
    db = Database(path)
    db.execute("INSERT INTO _migrations VALUES ('batchgen', 'm999_from_the_future', '2030-01-01')")
    db.close()
    with pytest.raises(StoreError, match=r"newer batchgen.*m999_from_the_future"):
        Store(path)


def test_a_failing_step_leaves_nothing_behind(tmp_path: Path) -> None:
    steps = Migrations("t")

    @steps()
    def m001_create_a(db: Database) -> None:
        db.execute("CREATE TABLE a (x)")

    @steps()
    def m002_break(db: Database) -> None:
        db.execute("CREATE TABLE b (x)")
        raise RuntimeError("boom")

    db = Database(tmp_path / "t.db")
    db.conn.isolation_level = None
    with pytest.raises(RuntimeError, match="boom"):
        steps.apply(db)
    assert steps.applied(db) == ["m001_create_a"]
    assert "a" in db.table_names() and "b" not in db.table_names()


def test_registry_wants_names_in_order() -> None:
    steps = Migrations("t")

    @steps()
    def m002_second(db: Database) -> None: ...

    with pytest.raises(ValueError, match="registered after 'm002_second'"):

        @steps()
        def m001_first(db: Database) -> None: ...

    with pytest.raises(ValueError, match="mNNN_verb_noun"):

        @steps()
        def create_things(db: Database) -> None: ...

    with pytest.raises(ValueError, match="no migration named 'm404_x'"):
        steps.apply(Database(memory=True), stop_after="m404_x")


def test_apply_refuses_to_run_inside_a_transaction() -> None:
    db = Database(memory=True)
    db.conn.isolation_level = None
    db.conn.execute("BEGIN")
    with pytest.raises(StoreError, match="outside a transaction"):
        migrations.apply(db)


@pytest.mark.parametrize("round_", range(60))
def test_two_openers_of_a_fresh_state_apply_each_step_once(tmp_path: Path, round_: int) -> None:
    # many rounds: SQLite answers "locked" to a racing WAL switch only now and then (≈ 1 in 100)
    path = tmp_path / "race.db"
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def open_it() -> None:
        try:
            barrier.wait()
            Store(path).close()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    conn = sqlite3.connect(path)
    names = [r[0] for r in conn.execute("SELECT name FROM _migrations ORDER BY rowid")]
    conn.close()
    assert names == migrations.names


def test_opening_an_up_to_date_state_takes_no_write_lock(tmp_path: Path) -> None:
    path = tmp_path / "busy.db"
    with Store(path) as runner:
        runner.db.conn.execute("BEGIN IMMEDIATE")  # a runner mid-way through a long sync
        try:
            with Store(path, busy_timeout=0.1) as status:
                assert status.counts()["pending"] == 0
        finally:
            runner.db.conn.execute("ROLLBACK")
