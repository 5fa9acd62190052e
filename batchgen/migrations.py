"""Schema migrations of the state database, applied in order and recorded in ``_migrations``.

The shape follows sqlite-utils' and llm's migrations: a small registry, one decorated function per
step, named ``mNNN_verb_noun``::

    migrations = Migrations("batchgen")

    @migrations()
    def m001_create_tables(db: Database) -> None: ...

Invariants:

- A migration that has shipped is never edited or renamed: a state database made by any released
  batchgen records the names it applied, and an edited step would leave old databases with a
  schema no code expects. Change the schema by adding the next ``mNNN_`` function.
- Steps run in the order they were registered (which is also their name order), each inside one
  ``BEGIN IMMEDIATE`` transaction together with its ``_migrations`` row, so a crash or a concurrent
  opener never leaves a half-applied step: two processes opening a fresh database at once
  serialise on the write lock and the second finds the work already recorded.
- A database that records a step this code does not know was written by a newer batchgen; it is
  refused instead of being used with a schema we cannot vouch for.
- A step that rewrites what ``Store.sync`` writes into ``jobs`` (sweep, metadata, estimated cost,
  position) must also ``DELETE FROM sync``: the chunk digests kept there promise that those
  columns still hold what the last plan wrote.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime


def _import_sqlite_utils() -> None:
    """Import ``sqlite_utils`` without the pandas and numpy it pulls in when they are installed.

    sqlite-utils only uses them to map their scalar types to column types on insert, which
    batchgen never does. Importing them cost every command 0.26 s of start-up and 80 MB of
    memory (measured: batchgen's imports 0.51 -> 0.25 s, RSS 136 -> 53 MB). The block covers
    this one import only (a ``None`` in ``sys.modules`` makes ``import`` raise ImportError):
    a later ``import pandas`` works as usual, and when either is already loaded nothing changes.
    """
    if "sqlite_utils" in sys.modules:
        return
    blocked = [name for name in ("pandas", "numpy") if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        importlib.import_module("sqlite_utils")
    finally:
        for name in blocked:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


_import_sqlite_utils()

from sqlite_utils import Database as Database  # noqa: E402 - after the guarded import above

from .errors import StoreError  # noqa: E402

#: a migration step: receives the database, runs inside the transaction the registry opened
MigrationFn = Callable[[Database], None]

_NAME = re.compile(r"^m\d{3}_[a-z0-9_]+$")


@dataclass(frozen=True)
class Migration:
    """One registered step."""

    name: str
    fn: MigrationFn


class Migrations:
    """An ordered registry of migration steps for one schema (``migration_set``).

    :param name: the set's name, recorded beside each applied step so several sets could share
        one database file (as llm's plugins do)
    """

    #: the table that records which steps a database has had
    TABLE = "_migrations"

    def __init__(self, name: str) -> None:
        self.name = name
        self._steps: list[Migration] = []

    def __call__(self) -> Callable[[MigrationFn], MigrationFn]:
        """Decorator registering the next step: ``@migrations()``."""

        def register(fn: MigrationFn) -> MigrationFn:
            name = fn.__name__
            if not _NAME.match(name):
                raise ValueError(f"migration {name!r} must be named mNNN_verb_noun")
            if self._steps and name <= self._steps[-1].name:
                raise ValueError(
                    f"migration {name!r} registered after {self._steps[-1].name!r}: "
                    "steps must be added in name order"
                )
            self._steps.append(Migration(name, fn))
            return fn

        return register

    @property
    def names(self) -> list[str]:
        """Every registered step, in order."""
        return [step.name for step in self._steps]

    def applied(self, db: Database) -> list[str]:
        """The steps this database records, in the order they were applied."""
        if not _has_table(db, self.TABLE):
            return []
        rows = db.execute(
            f"SELECT name FROM {self.TABLE} WHERE migration_set = ? ORDER BY rowid",
            [self.name],
        ).fetchall()
        return [row[0] for row in rows]

    def pending(self, db: Database) -> list[str]:
        """The registered steps this database has not had yet."""
        done = set(self.applied(db))
        return [name for name in self.names if name not in done]

    def apply(self, db: Database, *, stop_after: str | None = None) -> list[str]:
        """Apply every pending step in order (up to and including ``stop_after``); return them.

        Raises StoreError when the database records steps this code does not know.
        """
        if stop_after is not None and stop_after not in self.names:
            raise ValueError(f"no migration named {stop_after!r} in {self.name!r}")
        conn = db.conn
        if conn.in_transaction:
            raise StoreError("migrations must run outside a transaction")
        self._ensure_table(db)
        if not self.pending(db):
            # Up to date (the common case): no write lock taken, so opening a state while a
            # runner is in a long transaction does not wait for it.
            self._refuse_unknown(set(self.applied(db)))
            return []
        ran: list[str] = []
        for step in self._steps:
            # Each step re-checks under the write lock: another process may have applied it
            # between our first look and the moment we got the lock.
            conn.execute("BEGIN IMMEDIATE")
            try:
                done = set(self.applied(db))
                self._refuse_unknown(done)
                if step.name not in done:
                    step.fn(db)
                    conn.execute(
                        f"INSERT INTO {self.TABLE} (migration_set, name, applied_at) "
                        "VALUES (?, ?, ?)",
                        (self.name, step.name, _now()),
                    )
                    ran.append(step.name)
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            if step.name == stop_after:
                break
        return ran

    def check_current(self, db: Database) -> None:
        """Raise StoreError unless the database has exactly the registered steps (read-only use)."""
        done = set(self.applied(db))
        self._refuse_unknown(done)
        missing = [name for name in self.names if name not in done]
        if missing:
            raise StoreError(
                f"the state database needs upgrading ({', '.join(missing)} not applied); "
                "open it once without read-only (e.g. `batchgen run`) to upgrade it"
            )

    def _refuse_unknown(self, done: set[str]) -> None:
        unknown = sorted(done - set(self.names))
        if unknown:
            raise StoreError(
                f"the state database was written by a newer batchgen (unknown migrations: "
                f"{', '.join(unknown)}); upgrade batchgen to use it"
            )

    def _ensure_table(self, db: Database) -> None:
        db.conn.execute(
            f"CREATE TABLE IF NOT EXISTS {self.TABLE} ("
            "migration_set TEXT NOT NULL, name TEXT NOT NULL, applied_at TEXT NOT NULL, "
            "PRIMARY KEY (migration_set, name))"
        )


def _has_table(db: Database, name: str) -> bool:
    row = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", [name]
    ).fetchone()
    return row is not None


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


migrations = Migrations("batchgen")

#: the job states the schema accepts; the same strings as store.JobState (a test pins them)
_STATES = (
    "pending",
    "submitting",
    "queued",
    "running",
    "downloading",
    "done",
    "failed",
    "unknown",
    "cancelled",
)


@migrations()
def m001_create_tables(db: Database) -> None:
    """Runs, jobs, outputs, the events log and the planner's sync record."""
    states = ", ".join(f"'{s}'" for s in _STATES)
    statements = [
        """
        CREATE TABLE runs (
            id INTEGER PRIMARY KEY,
            manifest_path TEXT NOT NULL,
            manifest_hash TEXT NOT NULL,
            tool_version TEXT NOT NULL,
            pid INTEGER NOT NULL,
            started_at TEXT NOT NULL,
            finished_at TEXT,
            summary TEXT            -- JSON object, set by finish_run
        )
        """,
        f"""
        CREATE TABLE jobs (
            id TEXT PRIMARY KEY,                   -- plan.JobSpec.id: hash of model, params, sample
            sweep TEXT NOT NULL,
            model TEXT NOT NULL,
            params TEXT NOT NULL,                  -- JSON object: exactly the body to submit
            prompt TEXT NOT NULL,
            sample INTEGER NOT NULL,
            seed INTEGER,
            metadata TEXT NOT NULL DEFAULT '{{}}', -- JSON object: prompt metadata
            state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ({states})),
            in_manifest INTEGER NOT NULL DEFAULT 1 CHECK (in_manifest IN (0, 1)),
            attempts INTEGER NOT NULL DEFAULT 0,   -- submits tried (reset by `retry`)
            submits INTEGER NOT NULL DEFAULT 0,    -- submits that may have been paid (never reset)
            possible_duplicates INTEGER NOT NULL DEFAULT 0,
            request_id TEXT,
            output_uris TEXT NOT NULL DEFAULT '[]', -- JSON array
            error_class TEXT,
            last_error TEXT,
            estimated_cost REAL,
            position INTEGER NOT NULL,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            submitted_at TEXT,
            finished_at TEXT,
            done_at TEXT
        )
        """,
        """
        CREATE TABLE outputs (
            job_id TEXT NOT NULL REFERENCES jobs (id),
            "index" INTEGER NOT NULL,
            uri TEXT NOT NULL,
            path TEXT NOT NULL,
            bytes INTEGER NOT NULL,
            sha256 TEXT NOT NULL,
            width INTEGER,
            height INTEGER,
            content_type TEXT,
            created_at TEXT NOT NULL,
            PRIMARY KEY (job_id, "index")
        )
        """,
        """
        CREATE TABLE events (
            id INTEGER PRIMARY KEY,
            job_id TEXT NOT NULL REFERENCES jobs (id),
            run_id INTEGER REFERENCES runs (id),
            at TEXT NOT NULL,
            from_state TEXT,
            to_state TEXT NOT NULL,
            detail TEXT
        )
        """,
        """
        CREATE TABLE sync (
            key TEXT PRIMARY KEY,
            value TEXT
        )
        """,
    ]
    for sql in statements:
        db.execute(sql)


@migrations()
def m002_create_indexes(db: Database) -> None:
    """The indexes behind counts(), next_pending(), events() and the recent-rate query."""
    statements = [
        # (in_manifest, state) makes counts() a scan of a covering index; position after it
        # makes next_pending() an ordered index range instead of a sort of every pending job.
        "CREATE INDEX jobs_in_manifest_state_position ON jobs (in_manifest, state, position)",
        "CREATE INDEX events_job_id ON events (job_id)",
        "CREATE INDEX jobs_done_at ON jobs (done_at) WHERE done_at IS NOT NULL",
    ]
    for sql in statements:
        db.execute(sql)


@migrations()
def m003_create_money_indexes(db: Database) -> None:
    """Indexes that keep `status`'s money questions off a full scan of a million rows."""
    statements = [
        # cost() sums estimated_cost over submits and over the manifest: a covering index
        # makes that a scan of ~25 bytes per job instead of every row's JSON.
        "CREATE INDEX jobs_cost ON jobs (in_manifest, estimated_cost, submits)",
        # possible_duplicates() adds up a column that is 0 on all but a handful of jobs.
        "CREATE INDEX jobs_possible_duplicates ON jobs (possible_duplicates) "
        "WHERE possible_duplicates > 0",
    ]
    for sql in statements:
        db.execute(sql)
