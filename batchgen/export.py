"""Dataset export: what a run leaves behind for people who train on it or account for it.

At the output root, next to the image tree the runner wrote, :func:`write_outputs` writes:

``metadata.jsonl``
    One line per downloaded image of a ``done`` job, in manifest order (job position, then output
    index). ``file_name`` is the image path relative to the output root, so
    ``datasets.load_dataset("imagefolder", data_dir=OUTPUT)`` loads the images with every other
    key as a column. Always written: it is the file the dataset tooling reads.
``images.csv`` / ``images.parquet``
    The very same table (same columns, same order, same rows), on request; once there, every
    later export (the one at the end of each run included) rewrites them too. They are not named
    ``metadata.csv`` / ``metadata.parquet`` on purpose: ``datasets`` refuses a folder holding
    metadata files of two formats ("Found metadata files with different extensions").
``failures.jsonl``
    One line per ``failed`` or ``unknown`` job: its identity, parameters, error class and reason.
``stats.json``
    Counts by state (``Store.counts``), duration (time spent in runs, from the runs table) and
    wall-clock span, images per minute, estimated cost spent / planned / budget, an error
    histogram by error class (like img2dataset's ``status_dict``) and the top error messages.

Invariants:

- Columns are the same on every row (a value a row lacks is ``null``), and every column holds one
  type, so Arrow (hence ``datasets``, pandas, DuckDB) infers one schema. A column whose values mix
  types (``1`` and ``"1"``, a list, a number past int64) is written as text, JSON-encoding the
  non-strings; integers in a column that also holds floats are written as floats.
- Parameters are flattened: ``{"image_size": {"width": 512}}`` becomes the column
  ``image_size.width``. ``prompt`` and ``seed`` are not repeated as parameters: they have their own
  columns.
- Names never collide. The fixed columns (:data:`FIXED_COLUMNS`, plus ``image``, the column
  ``datasets`` makes of ``file_name``) keep their names; a parameter with one of those names is
  prefixed ``param_``; a prompt-metadata column (PartiPrompts' ``Category``, ``Challenge``, ...)
  whose name is taken by a fixed or parameter column is prefixed ``meta_``. A name ``datasets``
  would read as another image path (``*_file_name``, ``*file_names``) gets the suffix ``_value``.
- Rows are in manifest order, with one exception: in an export past several MB, a row holding
  the first value of a column that is empty in all rows before it is moved to the top, because
  ``datasets`` types each column from the first 10 MiB of metadata.jsonl and would type an empty
  column ``null`` and then fail on its first value (:meth:`_Table.promoted`).
- Only images whose file is on disk are listed (a missing one is counted in
  :attr:`ExportReport.missing`), so the dataset always loads.
- Every file is written to a temporary name in the output folder and renamed into place once all
  of them are complete: a reader never sees a half-written file, and a failed export leaves the
  previous one intact.
- Memory does not grow with the number of images beyond the store's own reads: rows are spooled to
  a temporary file in one pass (learning the columns and their types), then rendered in a second.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import math
import os
import re
import secrets
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any

from .errors import BatchgenError
from .store import Job, JobState, Output, Store

if TYPE_CHECKING:
    from .manifest import Manifest

METADATA_FILE = "metadata.jsonl"
CSV_FILE = "images.csv"
PARQUET_FILE = "images.parquet"
FAILURES_FILE = "failures.jsonl"
STATS_FILE = "stats.json"

#: table formats ``write_outputs`` knows; ``jsonl`` is always written (it is what datasets loads)
FORMATS = ("jsonl", "csv", "parquet")

#: columns before the parameters, in this order
LEAD_COLUMNS = ("file_name", "job_id", "output_index", "model", "sweep", "prompt", "sample", "seed")
#: columns after the parameters and the prompt metadata, in this order
TAIL_COLUMNS = (
    "request_id",
    "width",
    "height",
    "bytes",
    "sha256",
    "content_type",
    "submitted_at",
    "finished_at",
    "done_at",
    "seconds",
)
FIXED_COLUMNS = LEAD_COLUMNS + TAIL_COLUMNS
#: names a parameter or metadata column may not take: the fixed ones, and the column datasets
#: builds from ``file_name``
RESERVED_NAMES = frozenset((*FIXED_COLUMNS, "image"))

PARAM_PREFIX = "param_"
META_PREFIX = "meta_"

#: rows per Parquet row group (and per batch held in memory while writing it)
_PARQUET_BATCH = 10_000

#: how far into metadata.jsonl a column's first value may sit without moving its row to the top;
#: below the 10 MiB that datasets reads to infer the schema, with a margin
_ARROW_FIRST_BLOCK = 8 << 20

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class ExportError(BatchgenError):
    """The export cannot be made as asked: an unknown format, or one it cannot write here."""

    exit_code = 2


@dataclass(frozen=True)
class ExportReport:
    """What :func:`write_outputs` wrote."""

    output_dir: Path
    #: every file written, by kind: "jsonl", "csv", "parquet", "failures", "stats"
    files: dict[str, Path]
    #: rows in metadata.jsonl (downloaded images of done jobs)
    images: int
    #: lines in failures.jsonl (failed and unknown jobs)
    failures: int
    #: images of done jobs recorded in the store but absent from disk (left out of the table)
    missing: int
    #: the table's columns, in order
    columns: tuple[str, ...]
    #: the content of stats.json
    stats: dict[str, Any] = field(repr=False)
    #: wall time of the export
    seconds: float = 0.0


def write_outputs(
    store: Store,
    manifest: Manifest,
    *,
    formats: Sequence[str] = ("jsonl",),
    output_dir: Path | None = None,
) -> ExportReport:
    """Write metadata.jsonl (+ images.csv / images.parquet), failures.jsonl and stats.json.

    :param store: the run's state
    :param manifest: the manifest the state belongs to (its ``output`` is the output root)
    :param formats: table formats; ``"jsonl"`` is written whether named or not, and so is a
        ``csv`` / ``parquet`` table an earlier export left in the folder (kept in step)
    :param output_dir: where to write instead of ``manifest.output`` (tests, copies)
    """
    started = time.perf_counter()
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ExportError(
            f"unknown export format {', '.join(map(repr, unknown))}: "
            f"choose from {', '.join(FORMATS)}"
        )
    root = Path(output_dir if output_dir is not None else manifest.output)
    root.mkdir(parents=True, exist_ok=True)
    wanted = set(formats)
    if "parquet" in wanted:
        _require_pyarrow()
    # A table an earlier export wrote is rewritten too, so that it never disagrees with
    # metadata.jsonl (the end-of-run export asks for jsonl only).
    if (root / CSV_FILE).exists():
        wanted.add("csv")
    if (root / PARQUET_FILE).exists() and _have_pyarrow():
        wanted.add("parquet")
    want_csv, want_parquet = "csv" in wanted, "parquet" in wanted

    with _AtomicFiles(root) as files:
        spool = files.scratch("rows")
        table = _spool_rows(store, root, spool)
        columns = table.columns()
        writers: list[_TableWriter] = [_JsonlWriter(files.open(METADATA_FILE))]
        if want_csv:
            writers.append(_CsvWriter(files.open(CSV_FILE, newline=""), columns))
        if want_parquet:
            writers.append(_ParquetWriter(files.path(PARQUET_FILE), columns))
        for spooled in table.replay(spool):
            row = table.render(spooled)
            for writer in writers:
                writer.write(row)
        for writer in writers:
            writer.close()

        failure_count, errors, failed_times = _write_failures(store, files.open(FAILURES_FILE))
        stats = _stats(store, manifest, table, failure_count, errors, failed_times)
        with files.open(STATS_FILE) as fh:
            json.dump(stats, fh, indent=2, ensure_ascii=False)
            fh.write("\n")

    written = {"jsonl": root / METADATA_FILE}
    if want_csv:
        written["csv"] = root / CSV_FILE
    if want_parquet:
        written["parquet"] = root / PARQUET_FILE
    written["failures"] = root / FAILURES_FILE
    written["stats"] = root / STATS_FILE
    return ExportReport(
        output_dir=root,
        files=written,
        images=table.rows,
        failures=failure_count,
        missing=table.missing,
        columns=tuple(c.name for c in columns),
        stats=stats,
        seconds=time.perf_counter() - started,
    )


# --- reading the store ---------------------------------------------------------------------------


def _done_images(store: Store) -> Iterator[tuple[Job, list[Output]]]:
    """Done jobs of the manifest in position order, each with its outputs in index order."""
    # Streamed in pages, outputs fetched per job (primary-key lookups): memory stays flat at
    # 100,000 images instead of holding every job and output at once.
    for job in store.iter_jobs([JobState.DONE]):
        yield job, store.outputs(job.id)


def _failed_jobs(store: Store) -> Iterator[Job]:
    return store.iter_jobs([JobState.FAILED, JobState.UNKNOWN])


# --- the table -----------------------------------------------------------------------------------


def _kind(value: Any) -> str:
    """The column kind a value asks for: null, bool, int, float, str or json (anything else)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int" if _INT64_MIN <= value <= _INT64_MAX else "json"
    if isinstance(value, float):
        return "float" if math.isfinite(value) else "json"
    if isinstance(value, str):
        return "str"
    return "json"


@dataclass
class _Column:
    """One output column: its name, the key it reads from a spooled row, the kinds seen."""

    name: str
    kinds: set[str] = field(default_factory=set)

    @property
    def type(self) -> str:
        """The column's single type: null, bool, int, float or str (text, JSON for non-strings)."""
        kinds = self.kinds - {"null"}
        if not kinds:
            return "null"
        if len(kinds) == 1 and kinds <= {"bool", "int", "float", "str"}:
            return next(iter(kinds))
        if kinds == {"int", "float"}:
            return "float"
        return "str"

    def convert(self, value: Any) -> Any:
        """The value as this column's type holds it."""
        if value is None:
            return None
        kind = self.type
        if kind == "float":
            return float(value)
        if kind == "str" and not isinstance(value, str):
            return json.dumps(value, ensure_ascii=False, sort_keys=True)
        return value


def _flatten(params: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _flatten(value, f"{name}.")
        else:
            yield name, value


def _looks_like_file_column(name: str) -> bool:
    # datasets turns `file_name`, `*_file_name`, `file_names`, `*_file_names` into image columns
    return name.endswith(("file_name", "file_names"))


def _timestamp(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _seconds_between(start: str | None, end: str | None) -> float | None:
    a, b = _timestamp(start), _timestamp(end)
    if a is None or b is None:
        return None
    return round((b - a).total_seconds(), 3)


class _Table:
    """The columns learned while spooling, and how to render a spooled row with them."""

    def __init__(self) -> None:
        self.fixed = {name: _Column(name) for name in FIXED_COLUMNS}
        self.params: dict[str, _Column] = {}
        self.meta: dict[str, _Column] = {}
        self.rows = 0
        self.missing = 0
        self.bytes = 0
        self.first_submit: datetime | None = None
        self.last_done: datetime | None = None
        self.jobs = 0
        #: per column reference ("fixed"/"param"/"meta", key): where its first non-null value is,
        #: as (row index, spool offset of that row, spool bytes of that row)
        self.first_value: dict[tuple[str, str], tuple[int, int, int]] = {}

    def observe(
        self,
        lead: list[Any],
        params: dict[str, Any],
        meta: dict[str, Any],
        tail: list[Any],
        offset: int,
        size: int,
    ) -> None:
        """Learn the kinds of one row's values; the row sits at ``offset`` in the spool."""
        where = (self.rows, offset, size)
        for name, value in zip(FIXED_COLUMNS, (*lead, *tail), strict=True):
            self._see(self.fixed[name], ("fixed", name), value, where)
        for key, value in params.items():
            self._see(self.params.setdefault(key, _Column(key)), ("param", key), value, where)
        for key, value in meta.items():
            self._see(self.meta.setdefault(key, _Column(key)), ("meta", key), value, where)
        self.rows += 1

    def _see(
        self, column: _Column, ref: tuple[str, str], value: Any, where: tuple[int, int, int]
    ) -> None:
        kind = _kind(value)
        column.kinds.add(kind)
        if kind != "null" and ref not in self.first_value:
            self.first_value[ref] = where

    def promoted(self, columns: list[_Column]) -> list[int]:
        """Spool offsets of the rows to write first, so that Arrow sees every column typed.

        ``datasets`` infers the table's schema from the first block of metadata.jsonl it reads
        (10 MiB); a column that is null throughout that block is typed ``null`` and a later
        string fails the whole load. The row holding a column's first value is moved to the top
        when it could lie past :data:`_ARROW_FIRST_BLOCK` bytes of output. The estimate errs
        high: the spool is ASCII (so at least as long as the UTF-8 output of its values), doubled
        for JSON re-encoding, plus every column name and its punctuation on every row.
        """
        per_row = sum(len(c.name) + 8 for c in columns)
        late = {
            offset
            for row, offset, size in self.first_value.values()
            if 2 * (offset + size) + (row + 1) * per_row > _ARROW_FIRST_BLOCK
        }
        return sorted(late)

    def replay(self, spool: IO[bytes]) -> Iterator[list[Any]]:
        """Second pass over the spool: the promoted rows, then every other row in order."""
        promoted = self.promoted(self._ordered)
        for offset in promoted:
            spool.seek(offset)
            yield json.loads(spool.readline())
        skip = set(promoted)
        spool.seek(0)
        offset = 0
        for line in spool:
            if offset not in skip:
                yield json.loads(line)
            offset += len(line)

    def columns(self) -> list[_Column]:
        """Final columns in order, renamed so that no two share a name (see module docstring)."""
        taken = set(RESERVED_NAMES)

        def claim(name: str, prefix: str) -> str:
            if name in taken:
                name = prefix + name
            if _looks_like_file_column(name):
                name += "_value"
            while name in taken:  # only when a prefixed name is itself taken
                name = prefix + name
            taken.add(name)
            return name

        # Parameters claim first: they are what the model was given, metadata only describes it.
        params = [
            (key, _Column(claim(key, PARAM_PREFIX), col.kinds)) for key, col in self.params.items()
        ]
        meta = [
            (key, _Column(claim(key, META_PREFIX), col.kinds)) for key, col in self.meta.items()
        ]
        self._lead = [self.fixed[n] for n in LEAD_COLUMNS]
        self._params = params
        self._meta = meta
        self._tail = [self.fixed[n] for n in TAIL_COLUMNS]
        self._ordered = [*self._lead, *(c for _, c in params), *(c for _, c in meta), *self._tail]
        return self._ordered

    def render(self, spooled: list[Any]) -> dict[str, Any]:
        """A spooled row as an ordered dict of final column name → converted value."""
        lead, params, meta, tail = spooled
        row: dict[str, Any] = {}
        for col, value in zip(self._lead, lead, strict=True):
            row[col.name] = col.convert(value)
        for key, col in self._params:
            row[col.name] = col.convert(params.get(key))
        for key, col in self._meta:
            row[col.name] = col.convert(meta.get(key))
        for col, value in zip(self._tail, tail, strict=True):
            row[col.name] = col.convert(value)
        return row


def _spool_rows(store: Store, root: Path, spool: IO[bytes]) -> _Table:
    """First pass: one compact JSON line per image into ``spool``; learn columns and types."""
    table = _Table()
    offset = 0
    for job, outputs in _done_images(store):
        table.jobs += 1
        submitted = _timestamp(job.submitted_at)
        done = _timestamp(job.done_at)
        if submitted and (table.first_submit is None or submitted < table.first_submit):
            table.first_submit = submitted
        if done and (table.last_done is None or done > table.last_done):
            table.last_done = done
        params = {k: v for k, v in _flatten(job.params) if k not in ("prompt", "seed")}
        meta = dict(job.metadata)
        seconds = _seconds_between(job.submitted_at, job.done_at)
        for output in outputs:
            rel = PurePosixPath(output.path)
            if rel.is_absolute() or ".." in rel.parts or not (root / rel).is_file():
                table.missing += 1
                continue
            lead = [
                rel.as_posix(),
                job.id,
                output.index,
                job.model,
                job.sweep,
                job.prompt,
                job.sample,
                job.seed,
            ]
            tail = [
                job.request_id,
                output.width,
                output.height,
                output.bytes,
                output.sha256,
                output.content_type,
                job.submitted_at,
                job.finished_at,
                job.done_at,
                seconds,
            ]
            # ASCII on purpose: byte offsets are exact and the size bounds the UTF-8 output.
            line = json.dumps([lead, params, meta, tail], ensure_ascii=True).encode("ascii") + b"\n"
            table.observe(lead, params, meta, tail, offset, len(line))
            table.bytes += output.bytes or 0
            spool.write(line)
            offset += len(line)
    spool.flush()
    return table


# --- writers -------------------------------------------------------------------------------------


class _TableWriter:
    def write(self, row: dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _JsonlWriter(_TableWriter):
    def __init__(self, fh: IO[str]) -> None:
        self.fh = fh

    def write(self, row: dict[str, Any]) -> None:
        self.fh.write(json.dumps(row, ensure_ascii=False))
        self.fh.write("\n")

    def close(self) -> None:
        self.fh.close()


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


class _CsvWriter(_TableWriter):
    def __init__(self, fh: IO[str], columns: list[_Column]) -> None:
        self.fh = fh
        self.writer = csv.writer(fh)
        self.writer.writerow([c.name for c in columns])

    def write(self, row: dict[str, Any]) -> None:
        self.writer.writerow([_csv_cell(v) for v in row.values()])

    def close(self) -> None:
        self.fh.close()


def _have_pyarrow() -> bool:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


def _require_pyarrow() -> None:
    if not _have_pyarrow():
        raise ExportError(
            "--format parquet needs pyarrow, which is not installed: pip install pyarrow"
        )


class _ParquetWriter(_TableWriter):
    def __init__(self, path: Path, columns: list[_Column]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        types = {
            "null": pa.null(),
            "bool": pa.bool_(),
            "int": pa.int64(),
            "float": pa.float64(),
            "str": pa.string(),
        }
        self.pa = pa
        self.schema = pa.schema([(c.name, types[c.type]) for c in columns])
        self.names = [c.name for c in columns]
        self.writer = pq.ParquetWriter(str(path), self.schema)
        self.batch: list[dict[str, Any]] = []

    def write(self, row: dict[str, Any]) -> None:
        self.batch.append(row)
        if len(self.batch) >= _PARQUET_BATCH:
            self._flush()

    def _flush(self) -> None:
        self.writer.write_table(self.pa.Table.from_pylist(self.batch, schema=self.schema))
        self.batch = []

    def close(self) -> None:
        if self.batch:
            self._flush()
        self.writer.close()


# --- failures and stats --------------------------------------------------------------------------


def _write_failures(store: Store, fh: IO[str]) -> tuple[int, Counter[str], list[datetime]]:
    """failures.jsonl; returns (lines, histogram by error class, their last-update times)."""
    errors: Counter[str] = Counter()
    times: list[datetime] = []
    count = 0
    with fh:
        for job in _failed_jobs(store):
            error_class = job.error_class or job.state.value
            errors[error_class] += 1
            stamp = _timestamp(job.updated_at)
            if stamp is not None:
                times.append(stamp)
            record = {
                "job_id": job.id,
                "state": job.state.value,
                "error_class": error_class,
                "reason": job.last_error,
                "attempts": job.attempts,
                "model": job.model,
                "sweep": job.sweep,
                "prompt": job.prompt,
                "sample": job.sample,
                "seed": job.seed,
                "params": job.params,
                "metadata": job.metadata,
                "request_id": job.request_id,
                "submitted_at": job.submitted_at,
                "updated_at": job.updated_at,
            }
            fh.write(json.dumps(record, ensure_ascii=False, default=str))
            fh.write("\n")
            count += 1
    return count, errors, times


def _iso(value: datetime | None) -> str | None:
    """ISO 8601 UTC with milliseconds, as the state database writes its timestamps."""
    if value is None:
        return None
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _runs_seconds(runs: list[dict[str, Any]], last_activity: datetime | None) -> float | None:
    """Seconds batchgen spent running, summed over runs (None when no run was recorded).

    A run that never finished (killed, or still going) counts up to the last job activity, or to
    the start of the next run if that came first.
    """
    total, counted = 0.0, False
    for i, run in enumerate(runs):
        start = _timestamp(run.get("started_at"))
        if start is None:
            continue
        end = _timestamp(run.get("finished_at"))
        if end is None:
            following = _timestamp(runs[i + 1].get("started_at")) if i + 1 < len(runs) else None
            bounds = [t for t in (last_activity, following) if t is not None]
            end = min(bounds) if bounds else None
        if end is None or end < start:
            continue
        total += (end - start).total_seconds()
        counted = True
    return total if counted else None


def _stats(
    store: Store,
    manifest: Manifest,
    table: _Table,
    failures: int,
    errors: Counter[str],
    failed_times: list[datetime],
) -> dict[str, Any]:
    counts = store.counts()
    spent, planned = store.cost()
    runs = store.runs()
    ends = [t for t in (table.last_done, *failed_times) if t is not None]
    last = max(ends) if ends else None
    # Wall-clock span from the first submit of a listed image to the last job that ended; the
    # duration proper is the time batchgen was running (gaps between runs excluded), which is
    # what images per minute is measured against. Without recorded runs the span stands in.
    span = (last - table.first_submit).total_seconds() if last and table.first_submit else None
    running = _runs_seconds(runs, last)
    duration = running if running is not None else span
    per_minute = round(table.rows / duration * 60, 3) if duration and duration > 0 else None
    return {
        "manifest": manifest.name,
        "generated_at": _iso(datetime.now(UTC)),
        "counts": counts,
        "jobs": sum(v for k, v in counts.items() if k != "retired"),
        "done_jobs": table.jobs,
        "images": table.rows,
        "missing_images": table.missing,
        "image_bytes": table.bytes,
        "failures": failures,
        "runs": len(runs),
        "first_submitted_at": _iso(table.first_submit),
        "last_finished_at": _iso(last),
        "duration_seconds": round(duration, 3) if duration is not None else None,
        "span_seconds": round(span, 3) if span is not None else None,
        "images_per_minute": per_minute,
        "estimated_cost_usd": {
            "spent": round(spent, 6),
            "planned": round(planned, 6),
            "budget": manifest.budget.max_usd,
        },
        "errors": dict(errors.most_common()),
        "top_errors": [
            {"error_class": cls, "example": message, "count": n}
            for cls, message, n in store.top_errors(10)
        ],
    }


# --- atomic files --------------------------------------------------------------------------------


#: the names ``_AtomicFiles._temp`` gives its temporaries: ``.<name>.<12 hex>.tmp``
_TEMPORARY = re.compile(r"^\.[^/]+\.[0-9a-f]{12}\.tmp$")


class _AtomicFiles:
    """Files written under temporary names in ``root``, renamed into place together on success."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._pending: list[tuple[Path, Path]] = []  # (temporary, final)
        self._scratch: list[Path] = []
        self._handles: list[IO[Any]] = []
        self._lock_fd: int | None = None

    def __enter__(self) -> _AtomicFiles:
        # One export at a time per output folder (the end of a run, `batchgen export`): the lock
        # is a flock on the folder itself, so no lock file joins the dataset, and the OS drops it
        # when a process dies. Holding it, any temporary of ours still here was left by an export
        # that was killed, and is removed, so kills never pile up stray files.
        self._lock_fd = os.open(self.root, os.O_RDONLY)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        for entry in os.scandir(self.root):
            if entry.is_file(follow_symlinks=False) and _TEMPORARY.match(entry.name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
        return self

    def _temp(self, name: str) -> Path:
        # Not tempfile.mkstemp: its files are 0600, and the renamed files must get the usual
        # permissions (0666 less the umask) like any other file the user writes.
        while True:
            tmp = self.root / f".{name}.{secrets.token_hex(6)}.tmp"
            try:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            except FileExistsError:
                continue
            return tmp

    def path(self, name: str) -> Path:
        """A temporary path that becomes ``root/name`` on success."""
        tmp = self._temp(name)
        self._pending.append((tmp, self.root / name))
        return tmp

    def open(self, name: str, newline: str | None = None) -> IO[str]:
        """A text file that becomes ``root/name`` on success."""
        fh = self.path(name).open("w", encoding="utf-8", newline=newline)
        self._handles.append(fh)
        return fh

    def scratch(self, name: str) -> IO[bytes]:
        """A read-write binary file removed at the end, whatever happens."""
        tmp = self._temp(name)
        self._scratch.append(tmp)
        fh = tmp.open("w+b")
        self._handles.append(fh)
        return fh

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        for fh in self._handles:
            fh.close()  # flushes what a writer left open; closing twice is harmless
        try:
            if exc_type is None:
                for tmp, final in self._pending:
                    os.replace(tmp, final)
        finally:
            for tmp in [t for t, _ in self._pending] + self._scratch:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None


def iter_metadata(path: Path) -> Iterable[dict[str, Any]]:
    """Rows of a metadata.jsonl, one dict per image (a convenience for scripts and tests)."""
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)
