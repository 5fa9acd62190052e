"""The state database: one row per job, every state change, the runner lock.

``Store`` owns every SQL statement and every change of a job's state; nothing else in batchgen
writes to the database. The schema lives in ``migrations.py``.

Invariants:

- A job's state only changes along ``TRANSITIONS``; anything else raises TransitionError and
  changes nothing.
- Each transition is one short ``BEGIN IMMEDIATE`` transaction that updates the job and appends
  its ``events`` row, committed before the method returns: the caller may act on the new state
  (for instance POST a paid submit after ``mark_submitting``) knowing a crash cannot undo it.
- The two commits that guard money — ``mark_submitting`` (intent to pay, before the POST) and
  ``mark_queued`` (the request id, the only link to a paid request) — are written with
  ``synchronous=FULL`` so they survive power loss too; all other commits use ``NORMAL``, which in
  WAL mode loses at most the last few commits on power loss (never on a process crash) and never
  corrupts the file. Whatever ``NORMAL`` could lose is recovered on the next start: a lost
  ``done`` re-downloads, a lost ``running`` is polled again.
- ``sync`` is idempotent: job ids are content hashes, rows are inserted once, an unchanged plan
  writes no row; jobs that left the manifest keep their row and state with ``in_manifest = 0``
  and are never returned by ``next_pending``.
- One runner per state database: ``lock()`` holds ``fcntl.flock`` on ``<db>.lock`` (the holder's
  pid written inside, for the refusal message); the OS releases it when the process dies, even on
  SIGKILL. Readers (``batchgen status``) need no lock: WAL lets them read while the runner writes.
- All timestamps are ISO 8601 UTC strings with milliseconds (``2026-01-31T12:00:00.000Z``), so they
  sort as text. ``params``, ``metadata``, ``output_uris`` and run summaries are JSON text.
- Store calls stay on one thread (sqlite3 connections are thread-bound) and stay short.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import StateLockedError, StoreError, TransitionError

# migrations imports sqlite_utils first, without pandas and numpy (see its _import_sqlite_utils)
from .migrations import Database, migrations

if TYPE_CHECKING:
    from .plan import JobSpec

__all__ = [
    "TERMINAL_STATES",
    "TRANSITIONS",
    "Job",
    "JobState",
    "Output",
    "PlanDiff",
    "Store",
    "SyncReport",
]


class JobState(StrEnum):
    """Where a job is in its life; the values are the spec's names (and the DB's).

    A StrEnum: members are str, and ``str(state)``/f-strings give the bare value.
    """

    #: planned, not submitted yet (or released after a submit that certainly did not arrive)
    PENDING = "pending"
    #: committed intent to submit: the paid POST is in flight or was cut off by a crash
    SUBMITTING = "submitting"
    #: the API accepted the submit and gave a request id; waiting in the remote queue
    QUEUED = "queued"
    #: the remote worker is generating
    RUNNING = "running"
    #: finished remotely; output files are being fetched
    DOWNLOADING = "downloading"
    #: every output file is on disk and recorded
    DONE = "done"
    #: gave up, with error_class and last_error saying why
    FAILED = "failed"
    #: a submit may or may not have created a paid job; parked until `batchgen retry --unknown`
    UNKNOWN = "unknown"
    #: cancelled by the user (or remotely); never run again unless reset
    CANCELLED = "cancelled"


P, S, Q, R, DL = (
    JobState.PENDING,
    JobState.SUBMITTING,
    JobState.QUEUED,
    JobState.RUNNING,
    JobState.DOWNLOADING,
)
DN, F, U, C = JobState.DONE, JobState.FAILED, JobState.UNKNOWN, JobState.CANCELLED

#: every allowed change of state: from → the states it may go to (the only authority)
TRANSITIONS: Mapping[JobState, frozenset[JobState]] = {
    P: frozenset({S, F, C}),  # claim; fail before submit (e.g. attempts cap); cancel
    S: frozenset({Q, P, U, F}),  # accepted; certainly not arrived (release/recover);
    # ambiguous (park); rejected
    Q: frozenset({R, DL, F, C}),  # started; finished before we saw it run; failed; cancelled
    R: frozenset({DL, F, C}),  # finished; failed or timed out; cancelled remotely
    DL: frozenset({DN, F}),  # files stored; download failed for good
    DN: frozenset(),
    F: frozenset({P}),  # `batchgen retry --failed`
    U: frozenset({P, C}),  # `batchgen retry --unknown`; user gives up on it
    C: frozenset({P}),  # reset by the user
}

#: states a run does not move on its own (the spec's "ends", plus done)
TERMINAL_STATES = frozenset({DN, F, U, C})

#: states `reset()` may send back to pending
RESETTABLE_STATES = frozenset({F, U, C})

#: rows per executemany/commit in sync(): large enough to amortise a commit, small enough
#: to keep memory flat and the WAL short
SYNC_CHUNK = 20_000
#: page cache of the connection (KiB): what a run's short transactions need. A run touches every
#: page of the jobs, events and outputs tables once, so a bigger cache just grows with the file
#: (S4: 20,000 jobs ended at x1.195 of the RSS at 2,000 with 16 MiB, x1.089 with 4 MiB, at the
#: same jobs/s); pages it drops are re-read from the OS cache
CACHE_KIB = 4_096
#: page cache while ``sync`` writes a plan: random job ids make the primary-key index its hot
#: spot, and 64 MiB holds it for a million jobs (S1); dropped back to CACHE_KIB afterwards
SYNC_CACHE_KIB = 65_536

#: longest error text kept on a row or event; providers should be terse, HTML error pages are not
MAX_MESSAGE = 4_000


def _json_encoder() -> Callable[[Any], str]:
    """Compact JSON (UTF-8 kept, NaN refused), the fastest way the stdlib offers.

    sync() encodes params and metadata of every job: the C encoder called directly costs a
    third of ``JSONEncoder.encode``, which rebuilds it on every call. Without the C
    accelerator (another Python implementation) the public encoder does the same job.
    """
    import json.encoder

    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # pragma: no cover - CPython always has it
        return json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode

    def default(value: object) -> object:
        raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")

    # (markers, default, encoder, indent, key_separator, item_separator, sort_keys, skipkeys,
    # allow_nan): no circular-reference markers — plan data is a tree.
    iterencode = make(
        None, default, json.encoder.encode_basestring, None, ":", ",", False, False, False
    )
    join = "".join

    def encode(value: Any) -> str:
        return join(iterencode(value, 0))

    return encode


_ENCODE = _json_encoder()

_JOB_COLUMNS = (
    "id, sweep, model, params, prompt, sample, seed, metadata, state, in_manifest, attempts, "
    "request_id, output_uris, error_class, last_error, estimated_cost, position, created_at, "
    "updated_at, submitted_at, finished_at, done_at, submits, possible_duplicates"
)


@dataclass
class Job:
    """One job as stored."""

    id: str
    sweep: str
    model: str
    #: exactly the JSON body to submit
    params: dict[str, Any]
    prompt: str
    sample: int
    seed: int | None
    metadata: dict[str, Any]
    state: JobState
    #: False once the job left the manifest ("retired"): kept, never run
    in_manifest: bool
    #: submits tried since the last reset (the `max_attempts` counter)
    attempts: int
    request_id: str | None
    output_uris: list[str]
    error_class: str | None
    last_error: str | None
    estimated_cost: float | None
    position: int
    created_at: str
    updated_at: str
    #: when the latest submit was committed
    submitted_at: str | None
    #: when the remote finish was noticed
    finished_at: str | None
    done_at: str | None
    #: submits that may have reached the API (and may be billed); never reset
    submits: int = 0
    #: ambiguous submits that were resubmitted on purpose (`on_ambiguous_submit: retry`)
    possible_duplicates: int = 0


@dataclass
class Output:
    """One stored output file of a job."""

    job_id: str
    index: int
    uri: str
    #: relative to the output root
    path: str
    bytes: int
    sha256: str
    width: int | None
    height: int | None
    content_type: str | None


@dataclass(frozen=True)
class SyncReport:
    """What `sync` did: jobs are counted once each."""

    #: new jobs inserted as pending
    added: int
    #: already there, left as they were
    unchanged: int
    #: were in the manifest, are not any more (in_manifest set to 0)
    retired: int
    #: had left the manifest, are back in it
    restored: int
    #: jobs in the plan (distinct ids)
    total: int
    #: already there, relabelled: sweep, metadata, estimated cost or position changed
    updated: int = 0


@dataclass(frozen=True)
class PlanDiff:
    """What `sync` would do with a plan, computed without writing (for `batchgen plan`)."""

    #: jobs in the plan
    total: int
    #: jobs the state does not have yet
    new: int
    #: jobs of the plan already done
    done: int
    #: jobs of the plan the state has, by their current state (every JobState value present)
    by_state: dict[str, int]
    #: jobs in the manifest now that the plan no longer has (sync would retire them)
    retire: int = 0
    #: new jobs per sweep and per model
    new_by_sweep: dict[str, int] = field(default_factory=dict)
    new_by_model: dict[str, int] = field(default_factory=dict)
    #: estimated cost of the new jobs (known prices only) and how many new jobs have no price
    new_cost: float = 0.0
    new_unpriced: int = 0


class _StaleDigests(Exception):
    """Internal: sync skipped chunks whose rows turned out to be missing."""


def _chunk_digest(chunk: list[JobSpec], meta_text: dict[int, str], size: int) -> str:
    """What sync stores about a chunk of a plan: its ids and every label sync would write.

    The id already covers model, params and sample; repr() keeps the fields unambiguous.
    """
    body = "\n".join(
        [
            repr((s.id, s.sweep, meta_text[id(s.metadata)], s.estimated_cost, s.position))
            for s in chunk
        ]
    )
    return hashlib.sha256(f"{size}\n{body}".encode()).hexdigest()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _clip(text: str) -> str:
    """Bound an error text and strip the API token from it, should a caller have let it in."""
    token = os.environ.get("RUNCOMFY_API_TOKEN")
    if token and len(token) >= 8 and token in text:
        text = text.replace(token, "[redacted]")
    if len(text) > MAX_MESSAGE:
        text = text[: MAX_MESSAGE - 1] + "…"
    return text


def _job(row: tuple[Any, ...]) -> Job:
    return Job(
        row[0],
        row[1],
        row[2],
        json.loads(row[3]),
        row[4],
        row[5],
        row[6],
        json.loads(row[7]),
        JobState(row[8]),
        bool(row[9]),
        row[10],
        row[11],
        json.loads(row[12]),
        row[13],
        row[14],
        row[15],
        row[16],
        row[17],
        row[18],
        row[19],
        row[20],
        row[21],
        row[22],
        row[23],
    )


class Store:
    """The state database of one manifest.

    :param path: the SQLite file; created (with its folder) and migrated when missing
    :param memory: use a private in-memory database instead (tests)
    :param readonly: never write: no migrations, no WAL switch, ``PRAGMA query_only``; the file
        must exist and be up to date (for `batchgen plan`, which must write nothing)
    :param busy_timeout: seconds a statement waits for another connection's write lock
    """

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        memory: bool = False,
        readonly: bool = False,
        busy_timeout: float = 30.0,
    ) -> None:
        if (path is None) == (not memory):
            raise ValueError("Store needs exactly one of: a path, or memory=True")
        self.path: Path | None = None if path is None else Path(path).resolve()
        #: the run transitions are attributed to in events (set by start_run)
        self.run_id: int | None = None
        self._lock_fd: int | None = None
        self.readonly = readonly
        if self.path is None:
            self.db = Database(memory=True, execute_plugins=False)
        else:
            if readonly and not self.path.exists():
                raise StoreError(f"no state database at {self.path}")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.db = Database(self.path, execute_plugins=False)
            except sqlite3.Error as exc:
                raise StoreError(f"cannot open the state database {self.path}: {exc}") from exc
        conn = self.db.conn
        # Every transaction below is explicit (BEGIN IMMEDIATE ... COMMIT); autocommit mode
        # stops the sqlite3 module from opening implicit ones behind our back.
        conn.isolation_level = None
        try:
            self._configure(busy_timeout)
            if readonly:
                migrations.check_current(self.db)
                conn.execute("PRAGMA query_only = ON")
            else:
                migrations.apply(self.db)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreError(f"cannot use the state database {self.path}: {exc}") from exc
        except BaseException:
            conn.close()
            raise

    def _switch_to_wal(self, busy_timeout: float) -> str:
        """``PRAGMA journal_mode = WAL``, waiting out other openers of a fresh file."""
        deadline = time.monotonic() + busy_timeout
        while True:
            try:
                return str(self.db.conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            except sqlite3.OperationalError as exc:
                # The switch takes the file exclusively for a moment, and SQLite reports another
                # connection opening the same fresh file (`run` and `status` started together)
                # as "locked" at once, without waiting on busy_timeout: wait for it here.
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.005)

    def _configure(self, busy_timeout: float) -> None:
        conn = self.db.conn
        # busy_timeout first: switching to WAL needs a moment of exclusive access.
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        conn.execute("PRAGMA foreign_keys = ON")
        if self.path is not None and not self.readonly:
            mode = self._switch_to_wal(busy_timeout)
            if mode != "wal":
                raise StoreError(f"cannot switch {self.path} to WAL (journal_mode is {mode})")
        # NORMAL is safe in WAL: the file is never corrupted and a process crash loses nothing;
        # the money-guarding commits raise it to FULL themselves (see _transaction).
        conn.execute("PRAGMA synchronous = NORMAL")
        # Used on demand, not allocated up front; sync() raises it while it plans.
        conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        # A million-job sync is one transaction, so the WAL grows to the size of the new rows;
        # once checkpointed it is cut back to this instead of staying that big on disk.
        conn.execute("PRAGMA journal_size_limit = 67108864")

    def close(self) -> None:
        """Release the lock if held and close the database."""
        if self._lock_fd is not None:
            self._unlock()
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ transactions

    @contextmanager
    def _transaction(self, *, durable: bool = False) -> Iterator[sqlite3.Connection]:
        """One write transaction, committed on exit; ``durable`` fsyncs the commit."""
        conn = self.db.conn
        if durable:
            conn.execute("PRAGMA synchronous = FULL")
        # IMMEDIATE takes the write lock now, so a concurrent writer (a `retry` while a run
        # goes) waits on busy_timeout instead of failing on a read-to-write upgrade.
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")
        finally:
            if durable:
                conn.execute("PRAGMA synchronous = NORMAL")

    # ------------------------------------------------------------------ runner lock

    @property
    def lock_path(self) -> Path | None:
        """``<db>.lock``, or None for an in-memory store."""
        return None if self.path is None else self.path.with_name(self.path.name + ".lock")

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the runner lock of this state for the block; refuse if another process holds it.

        Raises StateLockedError naming the holder's pid. The lock file stays (empty when free):
        deleting it would let two runners lock two different files.
        """
        lock_path = self.lock_path
        if lock_path is None:
            yield
            return
        if self._lock_fd is not None:
            raise StoreError(f"this process already holds the lock on {self.path}")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"pid {holder}" if holder else "pid unknown"
            raise StateLockedError(
                f"another batchgen run ({who}) is using the state {self.path}; "
                "wait for it to finish or stop it, then run again"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        try:
            yield
        finally:
            if self._lock_fd == fd:
                self._unlock()

    def _unlock(self) -> None:
        fd = self._lock_fd
        assert fd is not None
        self._lock_fd = None
        try:
            os.ftruncate(fd, 0)  # a finished run's pid must not be named later
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ runs

    def start_run(self, manifest_path: str, manifest_hash: str, tool_version: str) -> int:
        """Record the start of a run; later transitions are attributed to it."""
        with self._transaction() as conn:
            cursor = conn.execute(
                "INSERT INTO runs (manifest_path, manifest_hash, tool_version, pid, started_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (manifest_path, manifest_hash, tool_version, os.getpid(), _now()),
            )
        run_id = cursor.lastrowid
        assert run_id is not None
        self.run_id = run_id
        return run_id

    def finish_run(self, run_id: int, summary: dict[str, Any]) -> None:
        """Record the end of a run with its summary (JSON)."""
        with self._transaction() as conn:
            cursor = conn.execute(
                "UPDATE runs SET finished_at = ?, summary = ? WHERE id = ?",
                (_now(), _clip(json.dumps(summary, default=str, ensure_ascii=False)), run_id),
            )
            if cursor.rowcount != 1:
                raise StoreError(f"no run {run_id} in the state database")
        if self.run_id == run_id:
            self.run_id = None

    def runs(self) -> list[dict[str, Any]]:
        """Every run, oldest first, summaries decoded."""
        cursor = self.db.conn.execute(
            "SELECT id, manifest_path, manifest_hash, tool_version, pid, started_at, "
            "finished_at, summary FROM runs ORDER BY id"
        )
        keys = [d[0] for d in cursor.description]
        result = []
        for row in cursor:
            run = dict(zip(keys, row, strict=True))
            run["summary"] = json.loads(run["summary"]) if run["summary"] else None
            result.append(run)
        return result

    # ------------------------------------------------------------------ planning

    @contextmanager
    def _cache(self, kib: int) -> Iterator[None]:
        """A page cache of ``kib`` KiB for the block; CACHE_KIB again after (pages freed)."""
        self.db.conn.execute(f"PRAGMA cache_size = -{int(kib)}")
        try:
            yield
        finally:
            self.db.conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")

    def sync(
        self,
        specs: Iterable[JobSpec],
        *,
        fingerprint: str | None = None,
        chunk_size: int = SYNC_CHUNK,
    ) -> SyncReport:
        """Write a plan into the state: insert new jobs as pending, keep existing ones' state.

        Jobs the plan does not contain get ``in_manifest = 0``; jobs that come back get 1.
        Existing jobs are only written when their label (sweep, metadata, estimated cost,
        position) changed, so an unchanged plan writes no row. ``specs`` is streamed in
        chunks (memory stays flat for millions of jobs) inside one transaction: if the stream
        raises half-way, the state is left exactly as it was. A digest of each chunk (ids and
        labels) is kept with the plan, so a chunk identical to the last complete sync's is not
        even looked up: re-planning an unchanged million-job manifest costs the planner's time
        plus little more. The ids of ``specs`` must be
        distinct (``plan.iter_jobs`` yields each job once); a repeated id would be counted
        twice in the report and could hide a job that left the manifest.

        ``fingerprint`` (whatever identifies the plan, e.g. a hash of the manifest and the
        files it reads) is recorded with the plan, for `synced_fingerprint`; without one, any
        fingerprint recorded before is cleared, since it no longer describes the state.
        """
        with self._cache(SYNC_CACHE_KIB):
            return self._sync(specs, fingerprint, chunk_size)

    def _sync(
        self, specs: Iterable[JobSpec], fingerprint: str | None, chunk_size: int
    ) -> SyncReport:
        self._writable()
        conn = self.db.conn
        now = _now()
        insert = (
            "INSERT INTO jobs (id, sweep, model, params, prompt, sample, seed, metadata, "
            "estimated_cost, position, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET in_manifest = 1, sweep = excluded.sweep, "
            "metadata = excluded.metadata, estimated_cost = excluded.estimated_cost, "
            "position = excluded.position, updated_at = excluded.updated_at "
            "WHERE jobs.in_manifest = 0 OR jobs.sweep IS NOT excluded.sweep "
            "OR jobs.metadata IS NOT excluded.metadata "
            "OR jobs.estimated_cost IS NOT excluded.estimated_cost "
            "OR jobs.position IS NOT excluded.position"
        )
        encode = _ENCODE
        specs_iter = iter(specs)
        seen = changed = skipped = 0
        digests: list[str] = []
        staging = False
        try:
            with self._transaction() as tx:
                before, retired_before = tx.execute(
                    "SELECT count(*), count(*) FILTER (WHERE in_manifest = 0) FROM jobs"
                ).fetchone()
                # A fresh state has nothing to retire, restore or skip: no need to stage ids.
                staging = before > 0
                previous = self._chunk_digests(tx, chunk_size) if staging else []
                if staging:
                    tx.execute("DROP TABLE IF EXISTS temp.sync_ids")
                    # A plain (heap) table: appending costs a fifth of keeping a key order,
                    # and it is only searched when the counts say some job left the manifest.
                    tx.execute("CREATE TEMP TABLE sync_ids (id TEXT NOT NULL)")
                while chunk := list(islice(specs_iter, chunk_size)):
                    # metadata dicts are shared by the jobs of one prompt: encode each once
                    # (the chunk list keeps them alive, so their ids stay unique meanwhile).
                    meta = {id(s.metadata): s.metadata for s in chunk}
                    meta_text = {key: encode(value) for key, value in meta.items()}
                    digest = _chunk_digest(chunk, meta_text, chunk_size)
                    if staging:
                        # One statement per chunk: a JSON array unpacked by SQLite is ~9x
                        # cheaper than binding a million one-column rows.
                        tx.execute(
                            "INSERT INTO temp.sync_ids (id) SELECT value FROM json_each(?)",
                            (encode([s.id for s in chunk]),),
                        )
                    if (
                        staging
                        and len(digests) < len(previous)
                        and previous[len(digests)] == digest
                    ):
                        # The same jobs with the same labels as this chunk of the last complete
                        # sync: every row is there, unchanged, in the manifest. Nothing to write.
                        skipped += len(chunk)
                    else:
                        rows = [
                            (
                                s.id,
                                s.sweep,
                                s.model,
                                encode(s.params),
                                s.params["prompt"],
                                s.sample,
                                s.params.get("seed"),
                                meta_text[id(s.metadata)],
                                s.estimated_cost,
                                s.position,
                                now,
                                now,
                            )
                            for s in chunk
                        ]
                        changed += tx.executemany(insert, rows).rowcount
                    digests.append(digest)
                    seen += len(chunk)
                after, retired_mid, in_manifest = tx.execute(
                    "SELECT count(*), count(*) FILTER (WHERE in_manifest = 0), "
                    "count(*) FILTER (WHERE in_manifest = 1) FROM jobs"
                ).fetchone()
                if skipped and in_manifest < seen:
                    # Skipped chunks promised rows that are not there: the file was changed
                    # behind batchgen's back. Roll back, forget the digests, plan in full.
                    raise _StaleDigests
                retired = 0
                # Every id of the plan is in the manifest now; anything else in it has left.
                # With distinct ids the counts tell whether there is anything to look for.
                if staging and in_manifest != seen:
                    retired = tx.execute(
                        "UPDATE jobs SET in_manifest = 0, updated_at = ? WHERE in_manifest = 1 "
                        "AND id NOT IN (SELECT id FROM temp.sync_ids)",
                        (now,),
                    ).rowcount
                record = {"fingerprint": fingerprint, "synced_at": now}
                record["chunks"] = _ENCODE({"size": chunk_size, "digests": digests})
                tx.execute("DELETE FROM sync WHERE key IN ('fingerprint', 'synced_at', 'chunks')")
                tx.executemany(
                    "INSERT INTO sync (key, value) VALUES (?, ?)",
                    [(key, value) for key, value in record.items() if value is not None],
                )
        except _StaleDigests:
            with self._transaction() as tx:
                tx.execute("DELETE FROM sync")
            raise StoreError(
                "the state database lacks jobs its last plan wrote (was it changed outside "
                "batchgen?); its plan record is now cleared: run the same command again"
            ) from None
        finally:
            if staging:
                conn.execute("DROP TABLE IF EXISTS temp.sync_ids")
        added = after - before
        restored = retired_before - retired_mid
        updated = changed - added - restored
        return SyncReport(
            added=added,
            unchanged=seen - added - restored - updated,
            retired=retired,
            restored=restored,
            total=seen,
            updated=updated,
        )

    @staticmethod
    def _chunk_digests(conn: sqlite3.Connection, chunk_size: int) -> list[str]:
        """The chunk digests of the last complete sync, if it used this chunk size."""
        row = conn.execute("SELECT value FROM sync WHERE key = 'chunks'").fetchone()
        if row is None:
            return []
        record = json.loads(row[0])
        return list(record["digests"]) if record.get("size") == chunk_size else []

    def synced_fingerprint(self) -> str | None:
        """The fingerprint given to the last complete `sync`, or None.

        A runner that computes the same fingerprint for its manifest may skip re-planning: the
        state already holds exactly that plan (S2: a rerun starts submitting at once).
        """
        row = self.db.conn.execute("SELECT value FROM sync WHERE key = 'fingerprint'").fetchone()
        return None if row is None else str(row[0])

    def compare(self, specs: Iterable[JobSpec]) -> PlanDiff:
        """What `sync(specs)` would find, without writing anything (ids assumed distinct).

        Chunks identical to the last complete sync's (same digests, see `sync`) are not looked
        up one by one: when every chunk of that plan is matched, their jobs are exactly the
        jobs in the manifest, whose states one `counts()` gives.
        """
        by_state = {state.value: 0 for state in JobState}
        new_by_sweep: dict[str, int] = {}
        new_by_model: dict[str, int] = {}
        total = new = matched_in_manifest = new_unpriced = 0
        new_cost = 0.0
        conn = self.db.conn
        row = conn.execute("SELECT value FROM sync WHERE key = 'chunks'").fetchone()
        chunk_size = int(json.loads(row[0])["size"]) if row is not None else SYNC_CHUNK
        previous = self._chunk_digests(conn, chunk_size)
        deferred: list[str] = []  # ids of matched chunks, looked up only if the shortcut fails
        shortcut, compared = bool(previous), 0

        def look_up(ids: list[str]) -> dict[str, tuple[str, int]]:
            return {
                row[0]: (row[1], row[2])
                for row in conn.execute(
                    "SELECT id, state, in_manifest FROM jobs "
                    "WHERE id IN (SELECT value FROM json_each(?))",
                    (_ENCODE(ids),),
                )
            }

        specs_iter = iter(specs)
        while chunk := list(islice(specs_iter, chunk_size)):
            total += len(chunk)
            if shortcut and compared < len(previous):
                meta_text = {id(s.metadata): _ENCODE(s.metadata) for s in chunk}
                if _chunk_digest(chunk, meta_text, chunk_size) == previous[compared]:
                    deferred.extend(s.id for s in chunk)
                    compared += 1
                    continue
                shortcut = False  # a chunk of the last plan differs: look everything up
            found = look_up([s.id for s in chunk])
            for spec in chunk:
                hit = found.get(spec.id)
                if hit is None:
                    new += 1
                    new_by_sweep[spec.sweep] = new_by_sweep.get(spec.sweep, 0) + 1
                    new_by_model[spec.model] = new_by_model.get(spec.model, 0) + 1
                    if spec.estimated_cost is None:
                        new_unpriced += 1
                    else:
                        new_cost += spec.estimated_cost
                else:
                    by_state[hit[0]] += 1
                    matched_in_manifest += hit[1]
        if shortcut and compared == len(previous):
            # Every chunk of the last plan matched, in order: its jobs are exactly the jobs in
            # the manifest (chunks after them hold no job in the manifest: ids are distinct).
            counts = self.counts()
            for state in JobState:
                by_state[state.value] += counts[state.value]
            matched_in_manifest += len(deferred)
        else:
            for start in range(0, len(deferred), chunk_size):
                for state_value, listed in look_up(deferred[start : start + chunk_size]).values():
                    by_state[state_value] += 1
                    matched_in_manifest += listed
        in_manifest = conn.execute("SELECT count(*) FROM jobs WHERE in_manifest = 1").fetchone()[0]
        return PlanDiff(
            total=total,
            new=new,
            done=by_state[JobState.DONE.value],
            by_state=by_state,
            retire=in_manifest - matched_in_manifest,
            new_by_sweep=new_by_sweep,
            new_by_model=new_by_model,
            new_cost=new_cost,
            new_unpriced=new_unpriced,
        )

    # ------------------------------------------------------------------ reads

    def counts(self) -> dict[str, int]:
        """Jobs in the manifest per state (every state, 0 included), plus "retired"."""
        result = {state.value: 0 for state in JobState}
        result["retired"] = 0
        # Grouping on the (in_manifest, state, ...) index: a scan of the index, not the table.
        for in_manifest, state, n in self.db.conn.execute(
            "SELECT in_manifest, state, count(*) FROM jobs GROUP BY in_manifest, state"
        ):
            if in_manifest:
                result[state] = n
            else:
                result["retired"] += n
        return result

    def get(self, job_id: str) -> Job:
        """One job by id; StoreError when there is none."""
        row = self.db.conn.execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)
        ).fetchone()
        if row is None:
            raise StoreError(f"no job {job_id!r} in the state database")
        return _job(row)

    def jobs(
        self,
        states: Iterable[JobState] | None = None,
        *,
        limit: int | None = None,
        include_retired: bool = False,
    ) -> list[Job]:
        """Jobs (in the manifest unless ``include_retired``) in plan order, optionally by state.

        Builds every matching Job at once: on large states prefer `iter_jobs`, `next_pending`,
        `counts` or `pending_cost` (a million pending jobs take seconds and gigabytes here).
        """
        where, args = self._job_filter(states, include_retired)
        sql = f"SELECT {_JOB_COLUMNS} FROM jobs{where} ORDER BY position, id"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return [_job(row) for row in self.db.conn.execute(sql, args)]

    def iter_jobs(
        self,
        states: Iterable[JobState] | None = None,
        *,
        include_retired: bool = False,
        batch: int = 1_000,
    ) -> Iterator[Job]:
        """Like `jobs`, streamed in batches (keyset pages, no cursor held between them)."""
        where, args = self._job_filter(states, include_retired)
        glue = " AND " if where else " WHERE "
        last: tuple[int, str] | None = None
        while True:
            page_where, page_args = where, list(args)
            if last is not None:
                page_where += glue + "(position, id) > (?, ?)"
                page_args += list(last)
            rows = self.db.conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs{page_where} ORDER BY position, id LIMIT ?",
                [*page_args, batch],
            ).fetchall()
            if not rows:
                return
            for row in rows:
                yield _job(row)
            last = (rows[-1][16], rows[-1][0])

    @staticmethod
    def _job_filter(
        states: Iterable[JobState] | None, include_retired: bool
    ) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        args: list[Any] = []
        if not include_retired:
            clauses.append("in_manifest = 1")
        if states is not None:
            values = [JobState(s).value for s in states]
            clauses.append(f"state IN ({', '.join('?' * len(values))})" if values else "0")
            args.extend(values)
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), args

    def outputs(self, job_id: str | None = None) -> list[Output]:
        """Recorded output files, of one job or of all, by job and index."""
        sql = (
            'SELECT job_id, "index", uri, path, bytes, sha256, width, height, content_type '
            "FROM outputs"
        )
        if job_id is None:
            cursor = self.db.conn.execute(sql + ' ORDER BY job_id, "index"')
        else:
            cursor = self.db.conn.execute(sql + ' WHERE job_id = ? ORDER BY "index"', (job_id,))
        return [Output(*row) for row in cursor]

    def top_errors(self, n: int = 5) -> list[tuple[str, str, int]]:
        """Commonest error classes of failed and unknown jobs: (class, latest message, count)."""
        # SQLite's bare-column rule: with max(updated_at), last_error comes from that same row.
        rows = self.db.conn.execute(
            "SELECT coalesce(error_class, 'unclassified'), coalesce(last_error, ''), "
            "max(updated_at), count(*) FROM jobs "
            "WHERE in_manifest = 1 AND state IN ('failed', 'unknown') "
            "GROUP BY 1 ORDER BY 4 DESC, 1 LIMIT ?",
            (n,),
        ).fetchall()
        return [(row[0], row[1], row[3]) for row in rows]

    def cost(self) -> tuple[float, float]:
        """(spent, planned) in USD, from estimates; jobs without a price count 0.

        spent: each submit that may have reached the API (retired jobs too — the money is gone);
        planned: every job in the manifest, once.
        """
        spent, planned = self.db.conn.execute(
            "SELECT total(estimated_cost * submits), "
            "total(estimated_cost) FILTER (WHERE in_manifest = 1) FROM jobs"
        ).fetchone()
        return float(spent), float(planned)

    def pending_cost(self, limit: int | None = None) -> tuple[int, float, int]:
        """The next ``limit`` pending jobs (all when None), in plan order: (count, USD, unpriced).

        What a run is about to submit, for its cost confirmation, without loading the jobs:
        on a million pending jobs this is one index range, not a million Job objects.
        """
        row = self.db.conn.execute(
            "SELECT count(*), total(estimated_cost), "
            "count(*) FILTER (WHERE estimated_cost IS NULL) FROM ("
            "SELECT estimated_cost FROM jobs WHERE in_manifest = 1 AND state = 'pending' "
            "ORDER BY position LIMIT ?)",
            (-1 if limit is None else limit,),
        ).fetchone()
        return int(row[0]), float(row[1]), int(row[2])

    def unpriced(self) -> int:
        """Jobs in the manifest whose cost is unknown (no price for their model)."""
        row = self.db.conn.execute(
            "SELECT count(*) FROM jobs WHERE in_manifest = 1 AND estimated_cost IS NULL"
        ).fetchone()
        return int(row[0])

    def possible_duplicates(self) -> int:
        """Ambiguous submits that were resubmitted on purpose (may have been paid twice)."""
        row = self.db.conn.execute(
            "SELECT total(possible_duplicates) FROM jobs WHERE possible_duplicates > 0"
        ).fetchone()
        return int(row[0])

    def rate(self, window: float = 300.0) -> float:
        """Jobs done per second over the last ``window`` seconds (for status' ETA)."""
        since = (datetime.now(UTC) - timedelta(seconds=window)).strftime("%Y-%m-%dT%H:%M:%S.%f")
        row = self.db.conn.execute(
            "SELECT count(*) FROM jobs WHERE done_at >= ? AND state = 'done'",
            (since[:-3] + "Z",),
        ).fetchone()
        return float(row[0]) / window

    def events(self, job_id: str) -> list[dict[str, Any]]:
        """The state changes of one job, oldest first."""
        cursor = self.db.conn.execute(
            "SELECT id, job_id, run_id, at, from_state, to_state, detail FROM events "
            "WHERE job_id = ? ORDER BY id",
            (job_id,),
        )
        keys = [d[0] for d in cursor.description]
        return [dict(zip(keys, row, strict=True)) for row in cursor]

    def next_pending(self, limit: int) -> list[Job]:
        """Up to ``limit`` pending jobs of the manifest, in plan order (nothing is claimed)."""
        rows = self.db.conn.execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE in_manifest = 1 AND state = 'pending' "
            "ORDER BY position LIMIT ?",
            (limit,),
        ).fetchall()
        return [_job(row) for row in rows]

    # ------------------------------------------------------------------ transitions

    def _writable(self) -> None:
        if self.readonly:
            raise StoreError(f"the state {self.path} was opened read-only")

    def _move(
        self,
        conn: sqlite3.Connection,
        job_id: str,
        to: JobState,
        sources: frozenset[JobState],
        *,
        sets: str = "",
        args: tuple[Any, ...] = (),
        detail: str | None = None,
        now: str | None = None,
    ) -> JobState:
        """Inside an open transaction: check, update, log. Returns the state it came from."""
        row = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise StoreError(f"no job {job_id!r} in the state database")
        current = JobState(row[0])
        if current not in sources or to not in TRANSITIONS[current]:
            allowed = ", ".join(s.value for s in JobState if s in sources)
            raise TransitionError(
                f"job {job_id} is {current.value}: it cannot go to {to.value} (only from {allowed})"
            )
        now = now or _now()
        conn.execute(
            f"UPDATE jobs SET state = ?, updated_at = ?{sets} WHERE id = ?",
            (to.value, now, *args, job_id),
        )
        conn.execute(
            "INSERT INTO events (job_id, run_id, at, from_state, to_state, detail) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (job_id, self.run_id, now, current.value, to.value, detail),
        )
        return current

    def mark_submitting(self, job_id: str) -> Job:
        """pending → submitting: the intent to pay, durable before the POST goes out."""
        self._writable()
        now = _now()
        with self._transaction(durable=True) as conn:
            # request_id and outputs are cleared: a stale id from an earlier attempt would make
            # recover() poll the wrong request after a crash.
            self._move(
                conn,
                job_id,
                S,
                frozenset({P}),
                sets=", attempts = attempts + 1, submits = submits + 1, submitted_at = ?, "
                "request_id = NULL, output_uris = '[]', finished_at = NULL",
                args=(now,),
                now=now,
            )
            row = conn.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
            job = _job(row.fetchone())
        return job

    def mark_queued(self, job_id: str, request_id: str) -> None:
        """submitting → queued: the request id, durable (it is the only link to a paid job)."""
        self._writable()
        with self._transaction(durable=True) as conn:
            self._move(
                conn,
                job_id,
                Q,
                frozenset({S}),
                sets=", request_id = ?",
                args=(request_id,),
                detail=f"request {request_id}",
            )

    def mark_running(self, job_id: str) -> None:
        """queued → running."""
        self._writable()
        with self._transaction() as conn:
            self._move(conn, job_id, R, frozenset({Q}))

    def mark_downloading(self, job_id: str, uris: list[str]) -> None:
        """queued|running → downloading, with the output URIs; finished_at = now."""
        self._writable()
        now = _now()
        with self._transaction() as conn:
            self._move(
                conn,
                job_id,
                DL,
                frozenset({Q, R}),
                sets=", output_uris = ?, finished_at = ?",
                args=(_ENCODE(list(uris)), now),
                detail=f"{len(uris)} output(s)",
                now=now,
            )

    def update_output_uris(self, job_id: str, uris: list[str]) -> None:
        """Replace a downloading job's output URIs with fresh ones (the old ones expired).

        Not a change of state, but logged as an event so the history shows why the URIs moved.
        """
        self._writable()
        now = _now()
        with self._transaction() as conn:
            row = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise StoreError(f"no job {job_id!r} in the state database")
            if row[0] != DL.value:
                raise TransitionError(
                    f"job {job_id} is {row[0]}: output URIs are refreshed while downloading"
                )
            conn.execute(
                "UPDATE jobs SET output_uris = ?, updated_at = ? WHERE id = ?",
                (_ENCODE(list(uris)), now, job_id),
            )
            conn.execute(
                "INSERT INTO events (job_id, run_id, at, from_state, to_state, detail) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (job_id, self.run_id, now, DL.value, DL.value, "output URIs refreshed"),
            )

    def record_output(self, output: Output) -> None:
        """Record (or replace) one stored output file of a downloading job."""
        self._writable()
        with self._transaction() as conn:
            row = conn.execute("SELECT state FROM jobs WHERE id = ?", (output.job_id,)).fetchone()
            if row is None:
                raise StoreError(f"no job {output.job_id!r} in the state database")
            if row[0] != DL.value:
                raise TransitionError(
                    f"job {output.job_id} is {row[0]}: outputs are recorded while downloading"
                )
            conn.execute(
                'INSERT INTO outputs (job_id, "index", uri, path, bytes, sha256, width, height, '
                "content_type, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                'ON CONFLICT (job_id, "index") DO UPDATE SET uri = excluded.uri, '
                "path = excluded.path, bytes = excluded.bytes, sha256 = excluded.sha256, "
                "width = excluded.width, height = excluded.height, "
                "content_type = excluded.content_type, created_at = excluded.created_at",
                (
                    output.job_id,
                    output.index,
                    output.uri,
                    output.path,
                    output.bytes,
                    output.sha256,
                    output.width,
                    output.height,
                    output.content_type,
                    _now(),
                ),
            )

    def mark_done(self, job_id: str) -> None:
        """downloading → done; done_at = now, error fields cleared."""
        self._writable()
        now = _now()
        with self._transaction() as conn:
            self._move(
                conn,
                job_id,
                DN,
                frozenset({DL}),
                sets=", done_at = ?, error_class = NULL, last_error = NULL",
                args=(now,),
                now=now,
            )

    def mark_failed(self, job_id: str, error_class: str, message: str) -> None:
        """Any state a run moves (pending … downloading) → failed, with the reason."""
        self._writable()
        message = _clip(message)
        with self._transaction() as conn:
            self._move(
                conn,
                job_id,
                F,
                frozenset({P, S, Q, R, DL}),
                sets=", error_class = ?, last_error = ?",
                args=(error_class, message),
                detail=f"{error_class}: {message}",
            )

    def mark_unknown(self, job_id: str, message: str) -> None:
        """submitting → unknown: the submit may have created a paid job; parked."""
        self._writable()
        message = _clip(message)
        with self._transaction() as conn:
            self._move(
                conn,
                job_id,
                U,
                frozenset({S}),
                sets=", error_class = 'ambiguous_submit', last_error = ?",
                args=(message,),
                detail=message,
            )

    def mark_cancelled(self, job_id: str) -> None:
        """pending|queued|running|unknown → cancelled."""
        self._writable()
        with self._transaction() as conn:
            self._move(conn, job_id, C, frozenset({P, Q, R, U}))

    def cancel_pending(self) -> int:
        """Every pending job of the manifest → cancelled at once (`batchgen cancel`)."""
        self._writable()
        now = _now()
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO events (job_id, run_id, at, from_state, to_state, detail) "
                "SELECT id, ?, ?, 'pending', 'cancelled', 'cancelled by the user' FROM jobs "
                "WHERE in_manifest = 1 AND state = 'pending'",
                (self.run_id, now),
            )
            return conn.execute(
                "UPDATE jobs SET state = 'cancelled', updated_at = ? "
                "WHERE in_manifest = 1 AND state = 'pending'",
                (now,),
            ).rowcount

    def release(
        self, job_id: str, error_class: str, message: str, *, possible_duplicate: bool = False
    ) -> None:
        """submitting → pending: the submit certainly did not arrive (429, refused): not paid.

        Keeps attempts. ``possible_duplicate=True`` is for an ambiguous submit resubmitted on
        purpose (``on_ambiguous_submit: retry``): it stays counted as possibly paid.
        """
        self._writable()
        message = _clip(message)
        paid = (
            ", possible_duplicates = possible_duplicates + 1"
            if possible_duplicate
            else (", submits = submits - 1")
        )
        with self._transaction() as conn:
            self._move(
                conn,
                job_id,
                P,
                frozenset({S}),
                sets=", error_class = ?, last_error = ?" + paid,
                args=(error_class, message),
                detail=f"{error_class}: {message}"
                + (" (possible duplicate)" if possible_duplicate else ""),
            )

    def recover(self, on_ambiguous: str, *, max_attempts: int | None = None) -> dict[str, int]:
        """Start of a run: settle every job a crash left in `submitting`.

        With a request id it was accepted → queued (to be polled, never resubmitted). Without
        one the POST may have gone out: ``park`` → unknown; ``retry`` → pending, counted as a
        possible duplicate — or failed when ``max_attempts`` is reached. Returns how many jobs
        went to each state.
        """
        self._writable()
        if on_ambiguous not in ("park", "retry"):
            raise ValueError(f"on_ambiguous must be 'park' or 'retry', not {on_ambiguous!r}")
        result = {Q.value: 0, U.value: 0, P.value: 0, F.value: 0}
        now = _now()
        lost = "the run stopped while this submit was in flight; it may have been accepted"
        with self._transaction() as conn:
            rows = conn.execute(
                "SELECT id, request_id, attempts FROM jobs WHERE state = 'submitting'"
            ).fetchall()
            for job_id, request_id, attempts in rows:
                if request_id is not None:
                    self._move(
                        conn,
                        job_id,
                        Q,
                        frozenset({S}),
                        now=now,
                        detail=f"recovered: request {request_id}",
                    )
                    result[Q.value] += 1
                elif on_ambiguous == "park":
                    self._move(
                        conn,
                        job_id,
                        U,
                        frozenset({S}),
                        sets=", error_class = 'ambiguous_submit', last_error = ?",
                        args=(lost,),
                        detail=f"recovered: {lost}",
                        now=now,
                    )
                    result[U.value] += 1
                elif max_attempts is not None and attempts >= max_attempts:
                    message = f"{lost}; not resubmitted: {attempts} of {max_attempts} attempts used"
                    self._move(
                        conn,
                        job_id,
                        F,
                        frozenset({S}),
                        sets=", error_class = 'ambiguous_submit', last_error = ?",
                        args=(message,),
                        detail=f"recovered: {message}",
                        now=now,
                    )
                    result[F.value] += 1
                else:
                    self._move(
                        conn,
                        job_id,
                        P,
                        frozenset({S}),
                        sets=", error_class = 'ambiguous_submit', last_error = ?, "
                        "possible_duplicates = possible_duplicates + 1",
                        args=(lost,),
                        detail=f"recovered: {lost}; resubmitting (possible duplicate)",
                        now=now,
                    )
                    result[P.value] += 1
        return result

    def reset(self, states: Iterable[JobState]) -> int:
        """Jobs of the manifest in ``states`` (failed, unknown, cancelled) → pending, attempts 0.

        For `batchgen retry --failed/--unknown`; returns how many jobs were reset.
        """
        self._writable()
        wanted = {JobState(s) for s in states}
        refused = sorted(s.value for s in wanted - RESETTABLE_STATES)
        if refused:
            raise TransitionError(
                f"only failed, unknown and cancelled jobs can be reset, not {', '.join(refused)}"
            )
        if not wanted:
            return 0
        values = sorted(s.value for s in wanted)
        marks = ", ".join("?" * len(values))
        now = _now()
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO events (job_id, run_id, at, from_state, to_state, detail) "
                "SELECT id, ?, ?, state, 'pending', "
                "'reset by the user (was ' || state || coalesce(': ' || error_class, '') || ')' "
                f"FROM jobs WHERE in_manifest = 1 AND state IN ({marks})",
                (self.run_id, now, *values),
            )
            return conn.execute(
                "UPDATE jobs SET state = 'pending', updated_at = ?, attempts = 0, "
                "request_id = NULL, output_uris = '[]', error_class = NULL, last_error = NULL, "
                "finished_at = NULL, done_at = NULL "
                f"WHERE in_manifest = 1 AND state IN ({marks})",
                (now, *values),
            ).rowcount

    # ------------------------------------------------------------------ upkeep

    def integrity_check(self) -> list[str]:
        """``PRAGMA integrity_check`` plus the foreign-key check: [] when the file is sound."""
        problems = [
            row[0] for row in self.db.conn.execute("PRAGMA integrity_check") if row[0] != "ok"
        ]
        problems += [
            f"foreign key: {row[0]} row {row[1]} points at a missing {row[2]}"
            for row in self.db.conn.execute("PRAGMA foreign_key_check")
        ]
        return problems


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
