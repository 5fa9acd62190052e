"""Dataset export: metadata.jsonl loads with `datasets`, CSV/Parquet hold the same table,
failures.jsonl and stats.json agree with the state database."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from PIL import Image

from batchgen import export as export_module
from batchgen.cli import cli
from batchgen.export import (
    FIXED_COLUMNS,
    ExportError,
    iter_metadata,
    write_outputs,
)
from batchgen.manifest import Manifest, load_manifest
from batchgen.plan import JobSpec
from batchgen.store import JobState, Output, Store

NANO = "google/nano-banana/pro/text-to-image"
FLUX = "blackforestlabs/flux-2/max/text-to-image"


def _manifest(tmp_path: Path, *, budget: float | None = 5.0) -> Manifest:
    path = tmp_path / "export.yaml"
    path.write_text(
        "name: export-test\n"
        "provider: simulator\n"
        f"output: {tmp_path / 'out'}\n"
        f"state: {tmp_path / 'state.db'}\n"
        + (f"budget: {{max_usd: {budget}}}\n" if budget is not None else "")
        + "sweeps:\n"
        f"  - model: {NANO}\n"
        "    prompts: ['a red fox']\n",
        encoding="utf-8",
    )
    return load_manifest(path)


def _spec(
    position: int,
    model: str,
    params: dict[str, Any],
    *,
    sample: int = 0,
    sweep: str = "ratios",
    metadata: dict[str, Any] | None = None,
    cost: float | None = 0.15,
) -> JobSpec:
    body = json.dumps({"model": model, "params": params, "sample": sample}, sort_keys=True)
    return JobSpec(
        id=hashlib.sha256(body.encode()).hexdigest()[:24],
        sweep=sweep,
        model=model,
        params=params,
        sample=sample,
        metadata=metadata or {},
        estimated_cost=cost,
        position=position,
    )


def _finish(store: Store, root: Path, spec: JobSpec, sizes: list[tuple[int, int]]) -> None:
    """Walk a job to done through the store's transitions, writing one PNG per size."""
    store.mark_submitting(spec.id)
    store.mark_queued(spec.id, f"req-{spec.position}")
    store.mark_running(spec.id)
    uris = [f"https://cdn.example/{spec.id}/{i}.png" for i in range(len(sizes))]
    store.mark_downloading(spec.id, uris)
    for index, (w, h) in enumerate(sizes):
        rel = (
            f"{spec.model.replace('/', '__')}/p{spec.position:03d}/img__s{spec.sample}_{index}.png"
        )
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (w, h), (spec.position * 20 % 256, 80, 160)).save(path)
        data = path.read_bytes()
        store.record_output(
            Output(
                job_id=spec.id,
                index=index,
                uri=uris[index],
                path=rel,
                bytes=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
                width=w,
                height=h,
                content_type="image/png",
            )
        )
    store.mark_done(spec.id)


@dataclass
class Run:
    store: Store
    manifest: Manifest
    root: Path
    specs: list[JobSpec]
    #: (job position, output index) of every image that should be listed, in order
    images: list[tuple[int, int]]


PARTI = {"Category": "Animals", "Challenge": "Basic", "prompt_source": "parti.tsv:12"}


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Run]:
    """A finished-ish run: two sweeps, done / failed / unknown / pending jobs, one 2-image job."""
    manifest = _manifest(tmp_path)
    root = Path(manifest.output)
    specs = [
        _spec(
            0,
            NANO,
            {"prompt": "a red fox", "aspect_ratio": "1:1", "resolution": "1K"},
            metadata=PARTI,
        ),
        _spec(
            1,
            NANO,
            {"prompt": "a red fox", "aspect_ratio": "16:9", "resolution": "1K"},
            metadata=PARTI,
        ),
        _spec(
            2,
            NANO,
            {"prompt": "a lighthouse", "aspect_ratio": "1:1", "resolution": "1K"},
            metadata={**PARTI, "Category": "Outdoor Scenes"},
        ),
        _spec(
            3,
            NANO,
            {"prompt": "a lighthouse", "aspect_ratio": "16:9", "resolution": "1K"},
            metadata={**PARTI, "Category": "Outdoor Scenes"},
        ),
        # a second sweep: a nested parameter, a seed, a parameter named like a fixed column
        # ("width"), and metadata named like a parameter ("aspect_ratio")
        _spec(
            4,
            FLUX,
            {
                "prompt": "a red fox",
                "seed": 7,
                "width": 512,
                "image_size": {"width": 512, "height": 384},
                "num_images": 2,
            },
            sweep="flux",
            metadata={"aspect_ratio": "4:3"},
            cost=None,
        ),
        _spec(
            5,
            FLUX,
            {
                "prompt": "a red fox",
                "seed": 8,
                "width": 512,
                "image_size": {"width": 512, "height": 384},
            },
            sweep="flux",
        ),
        _spec(
            6,
            FLUX,
            {
                "prompt": "a red fox",
                "seed": 9,
                "width": 512,
                "image_size": {"width": 512, "height": 384},
            },
            sweep="flux",
        ),
        _spec(
            7,
            FLUX,
            {
                "prompt": "a red fox",
                "seed": 10,
                "width": 512,
                "image_size": {"width": 512, "height": 384},
            },
            sweep="flux",
        ),
    ]
    store = Store(memory=True)
    store.sync(specs)
    _finish(store, root, specs[0], [(12, 12)])
    _finish(store, root, specs[1], [(16, 9)])
    _finish(store, root, specs[2], [(12, 12)])
    # 3 fails, 4 has two images, 5 is parked unknown, 6 stays pending, 7 done
    store.mark_submitting(specs[3].id)
    store.mark_failed(specs[3].id, "rejected", "prompt blocked by the safety filter")
    _finish(store, root, specs[4], [(16, 12), (12, 16)])
    store.mark_submitting(specs[5].id)
    store.mark_unknown(specs[5].id, "read timeout after the submit was sent")
    _finish(store, root, specs[7], [(10, 10)])
    yield Run(store, manifest, root, specs, [(0, 0), (1, 0), (2, 0), (4, 0), (4, 1), (7, 0)])
    store.close()


EXPECTED_COLUMNS = [
    *FIXED_COLUMNS[:8],
    "aspect_ratio",
    "resolution",
    "param_width",  # clashes with the image width column
    "image_size.width",  # nested parameters are flattened
    "image_size.height",
    "num_images",
    "Category",
    "Challenge",
    "prompt_source",
    "meta_aspect_ratio",  # prompt metadata clashing with a parameter
    *FIXED_COLUMNS[8:],
]


def test_metadata_lists_done_images_with_consistent_columns(run: Run) -> None:
    report = write_outputs(run.store, run.manifest)
    rows = list(iter_metadata(run.root / "metadata.jsonl"))
    assert report.images == len(rows) == len(run.images)
    assert list(report.columns) == EXPECTED_COLUMNS
    for row in rows:
        assert list(row) == EXPECTED_COLUMNS  # same keys, same order, on every row
        assert (run.root / row["file_name"]).is_file()
    by_spec = {s.id: s for s in run.specs}
    assert [(by_spec[r["job_id"]].position, r["output_index"]) for r in rows] == run.images

    fox = rows[0]
    assert fox["model"] == NANO and fox["sweep"] == "ratios" and fox["prompt"] == "a red fox"
    assert fox["aspect_ratio"] == "1:1" and fox["Category"] == "Animals"
    assert fox["seed"] is None and fox["param_width"] is None and fox["meta_aspect_ratio"] is None
    assert fox["request_id"] == "req-0" and (fox["width"], fox["height"]) == (12, 12)
    data = (run.root / fox["file_name"]).read_bytes()
    assert fox["bytes"] == len(data) and fox["sha256"] == hashlib.sha256(data).hexdigest()
    assert fox["submitted_at"] and fox["finished_at"] and fox["done_at"]
    assert isinstance(fox["seconds"], float) and fox["seconds"] >= 0

    flux = rows[3]
    assert flux["seed"] == 7 and flux["param_width"] == 512
    assert flux["image_size.width"] == 512 and flux["image_size.height"] == 384
    assert flux["meta_aspect_ratio"] == "4:3" and flux["Category"] is None
    assert (flux["width"], flux["height"]) == (16, 12)
    assert rows[4]["output_index"] == 1 and (rows[4]["width"], rows[4]["height"]) == (12, 16)


def test_metadata_loads_with_datasets_imagefolder(
    run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    datasets = pytest.importorskip("datasets")
    write_outputs(run.store, run.manifest)
    # A picture at the root that no row names (a contact sheet) must not disturb the load.
    Image.new("RGB", (4, 4)).save(run.root / "contact-sheet.png")

    ds = datasets.load_dataset(
        "imagefolder", data_dir=str(run.root), split="train", cache_dir=str(tmp_path / "cache")
    )

    assert ds.num_rows == len(run.images)
    assert ds.column_names == ["image", *EXPECTED_COLUMNS[1:]]
    assert ds[0]["prompt"] == "a red fox" and ds[0]["Category"] == "Animals"
    assert ds[3]["image_size.width"] == 512 and ds[3]["seed"] == 7
    # images come from the nested folders, decoded at their real sizes
    assert [ds[i]["image"].size for i in range(ds.num_rows)] == [
        (12, 12),
        (16, 9),
        (12, 12),
        (16, 12),
        (12, 16),
        (10, 10),
    ]


def _csv_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def test_csv_and_parquet_hold_the_jsonl_table(run: Run) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    report = write_outputs(run.store, run.manifest, formats=("csv", "parquet"))
    assert report.files["csv"].name == "images.csv"
    assert report.files["parquet"].name == "images.parquet"
    rows = list(iter_metadata(report.files["jsonl"]))

    with report.files["csv"].open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        body = list(reader)
    assert header == EXPECTED_COLUMNS
    assert body == [[_csv_text(v) for v in row.values()] for row in rows]

    table = pq.read_table(report.files["parquet"])
    assert table.column_names == EXPECTED_COLUMNS
    assert table.to_pylist() == rows
    types = {f.name: str(f.type) for f in table.schema}
    assert types["seed"] == "int64" and types["seconds"] == "double"
    assert types["image_size.width"] == "int64" and types["Category"] == "string"


def test_mixed_types_give_one_type_per_column(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path)
    root = Path(manifest.output)
    specs = [
        _spec(0, NANO, {"prompt": "a", "guidance": 3, "steps": 20, "tags": ["x", "y"]}),
        _spec(1, NANO, {"prompt": "b", "guidance": 3.5, "steps": "20", "tags": None}),
    ]
    with Store(memory=True) as store:
        store.sync(specs)
        for spec in specs:
            _finish(store, root, spec, [(8, 8)])
        report = write_outputs(store, manifest, formats=("parquet",))
    rows = list(iter_metadata(report.files["jsonl"]))
    assert [r["guidance"] for r in rows] == [3.0, 3.5]  # ints widened in a float column
    assert [r["steps"] for r in rows] == ["20", "20"]  # number and text: text
    assert [r["tags"] for r in rows] == ['["x", "y"]', None]  # lists: JSON text
    assert '"guidance": 3.0' in report.files["jsonl"].read_text(encoding="utf-8")


def test_reserved_and_file_like_names_are_renamed(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path)
    spec = _spec(
        0,
        NANO,
        {"prompt": "a", "image": "https://x/y.png", "mask_file_name": "m.png", "sha256": "abc"},
        metadata={"image": "meta", "prompt": "dup"},
    )
    with Store(memory=True) as store:
        store.sync([spec])
        _finish(store, Path(manifest.output), spec, [(8, 8)])
        report = write_outputs(store, manifest)
    params_and_meta = list(report.columns[8 : -len(FIXED_COLUMNS[8:])])
    assert params_and_meta == [
        "param_image",
        "mask_file_name_value",
        "param_sha256",
        "meta_image",
        "meta_prompt",
    ]


def test_missing_files_are_left_out_and_counted(run: Run) -> None:
    first = next(iter_metadata(write_outputs(run.store, run.manifest).files["jsonl"]))
    (run.root / first["file_name"]).unlink()
    report = write_outputs(run.store, run.manifest)
    assert report.missing == 1 and report.images == len(run.images) - 1
    assert report.stats["missing_images"] == 1
    names = [r["file_name"] for r in iter_metadata(report.files["jsonl"])]
    assert first["file_name"] not in names


def test_failures_jsonl_lists_failed_and_unknown_jobs(run: Run) -> None:
    report = write_outputs(run.store, run.manifest)
    lines = [json.loads(x) for x in report.files["failures"].read_text("utf-8").splitlines()]
    assert report.failures == 2
    assert [(x["job_id"], x["state"], x["error_class"]) for x in lines] == [
        (run.specs[3].id, "failed", "rejected"),
        (run.specs[5].id, "unknown", "ambiguous_submit"),
    ]
    assert lines[0]["reason"] == "prompt blocked by the safety filter"
    assert lines[0]["params"]["aspect_ratio"] == "16:9" and lines[0]["prompt"] == "a lighthouse"
    assert lines[1]["reason"] == "read timeout after the submit was sent"
    assert lines[1]["seed"] == 8 and lines[1]["attempts"] == 1


def test_stats_agree_with_the_store(run: Run) -> None:
    report = write_outputs(run.store, run.manifest)
    stats = json.loads(report.files["stats"].read_text("utf-8"))
    assert stats == report.stats
    counts = run.store.counts()
    assert stats["counts"] == counts
    assert (counts["done"], counts["failed"], counts["unknown"], counts["pending"]) == (5, 1, 1, 1)
    assert stats["jobs"] == 8 and stats["done_jobs"] == 5 and stats["images"] == 6
    assert stats["errors"] == {"rejected": 1, "ambiguous_submit": 1}
    spent, planned = run.store.cost()
    assert stats["estimated_cost_usd"] == {
        "spent": pytest.approx(spent),
        "planned": pytest.approx(planned),
        "budget": 5.0,
    }
    assert planned == pytest.approx(7 * 0.15)  # one job has no price
    assert stats["image_bytes"] == sum(
        (run.root / r["file_name"]).stat().st_size for r in iter_metadata(report.files["jsonl"])
    )
    assert stats["duration_seconds"] is not None and stats["duration_seconds"] >= 0
    assert stats["runs"] == 0  # no run recorded: the wall-clock span stands in
    assert stats["duration_seconds"] == stats["span_seconds"]
    assert {e["error_class"] for e in stats["top_errors"]} == {"rejected", "ambiguous_submit"}


def test_duration_comes_from_the_runs(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path)
    spec = _spec(0, NANO, {"prompt": "a"})
    with Store(tmp_path / "state.db") as store:
        run_id = store.start_run(str(manifest.path), "hash", "test")
        store.sync([spec])
        _finish(store, Path(manifest.output), spec, [(8, 8)])
        store.finish_run(run_id, {})
        runs = store.runs()
        report = write_outputs(store, manifest)
    start = export_module._timestamp(runs[0]["started_at"])
    end = export_module._timestamp(runs[0]["finished_at"])
    assert start is not None and end is not None
    assert report.stats["runs"] == 1
    assert report.stats["duration_seconds"] == pytest.approx(
        (end - start).total_seconds(), abs=1e-3
    )


def test_runs_seconds_counts_an_unfinished_run_up_to_the_next() -> None:
    ts = export_module._timestamp
    runs = [
        {"started_at": "2026-01-01T00:00:00.000Z", "finished_at": None},  # killed
        {"started_at": "2026-01-01T01:00:00.000Z", "finished_at": "2026-01-01T01:00:30.000Z"},
        {"started_at": "2026-01-01T02:00:00.000Z", "finished_at": None},  # still going
    ]
    last = ts("2026-01-01T02:00:10.000Z")
    assert export_module._runs_seconds(runs, last) == 3600 + 30 + 10
    assert export_module._runs_seconds([], last) is None


def test_late_first_values_are_moved_to_the_top(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # datasets types columns from the first 10 MiB; shrink the margin to see the reordering.
    monkeypatch.setattr(export_module, "_ARROW_FIRST_BLOCK", 2_000)
    manifest = _manifest(tmp_path)
    specs = [_spec(i, NANO, {"prompt": f"p{i}", "aspect_ratio": "1:1"}) for i in range(12)]
    specs.append(_spec(12, FLUX, {"prompt": "late", "image_size": "square_hd"}, sweep="flux"))
    with Store(memory=True) as store:
        store.sync(specs)
        for spec in specs:
            _finish(store, Path(manifest.output), spec, [(8, 8)])
        report = write_outputs(store, manifest, formats=("parquet",))
    rows = list(iter_metadata(report.files["jsonl"]))
    assert rows[0]["prompt"] == "late" and rows[0]["image_size"] == "square_hd"
    assert [r["prompt"] for r in rows[1:]] == [f"p{i}" for i in range(12)]
    pq = pytest.importorskip("pyarrow.parquet")
    assert pq.read_table(report.files["parquet"]).to_pylist() == rows


def test_a_failed_export_leaves_the_previous_files(
    run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_outputs(run.store, run.manifest)
    before = (run.root / "metadata.jsonl").read_bytes()
    run.store.reset([JobState.FAILED])  # changes the failures: a new export would differ

    def boom(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "_write_failures", boom)
    with pytest.raises(OSError, match="disk full"):
        write_outputs(run.store, run.manifest, formats=("csv",))
    assert (run.root / "metadata.jsonl").read_bytes() == before
    assert not (run.root / "images.csv").exists()
    assert sorted(p.name for p in run.root.iterdir() if p.is_file()) == [
        "failures.jsonl",
        "metadata.jsonl",
        "stats.json",
    ]


def test_unknown_format_is_refused(run: Run) -> None:
    with pytest.raises(ExportError, match="unknown export format 'xlsx'"):
        write_outputs(run.store, run.manifest, formats=("jsonl", "xlsx"))


def test_empty_state_writes_empty_files(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, budget=None)
    with Store(memory=True) as store:
        report = write_outputs(store, manifest, formats=("csv", "parquet"))
    assert report.images == 0 and report.failures == 0
    assert report.files["jsonl"].read_text() == ""
    assert report.stats["images_per_minute"] is None
    assert report.stats["estimated_cost_usd"]["budget"] is None


def test_cli_export_writes_every_format(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path)
    spec = _spec(0, NANO, {"prompt": "a red fox", "aspect_ratio": "1:1"}, metadata=PARTI)
    with Store(manifest.state) as store:
        store.sync([spec])
        _finish(store, Path(manifest.output), spec, [(8, 8)])
    runner = CliRunner()
    result = runner.invoke(
        cli,
        ["export", str(manifest.path), "--format", "csv", "--format", "parquet"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert "1 images" in result.output and "metadata.jsonl" in result.output
    for name in ("metadata.jsonl", "images.csv", "images.parquet", "failures.jsonl", "stats.json"):
        assert (Path(manifest.output) / name).is_file(), name

    result = runner.invoke(cli, ["export", str(manifest.path), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["images"] == 1 and data["stats"]["counts"]["done"] == 1
    assert data["columns"][:3] == ["file_name", "job_id", "output_index"]


def test_cli_export_without_state_exits_2(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path)
    result = CliRunner().invoke(cli, ["export", str(manifest.path)], catch_exceptions=False)
    assert result.exit_code == 2
    assert f"no state database at {tmp_path / 'state.db'}" in result.output
    assert not (tmp_path / "state.db").exists()  # nothing created by looking


def test_tables_of_an_earlier_export_are_kept_in_step(run: Run) -> None:
    first = write_outputs(run.store, run.manifest, formats=("csv", "parquet"))
    (run.root / next(iter_metadata(first.files["jsonl"]))["file_name"]).unlink()
    second = write_outputs(run.store, run.manifest)  # jsonl only, as at the end of a run
    assert set(second.files) == {"jsonl", "csv", "parquet", "failures", "stats"}
    with second.files["csv"].open(encoding="utf-8") as fh:
        assert sum(1 for _ in fh) == 1 + second.images == len(run.images)
    pq = pytest.importorskip("pyarrow.parquet")
    assert pq.read_table(second.files["parquet"]).num_rows == second.images


def test_files_get_ordinary_permissions(run: Run) -> None:
    old = os.umask(0o022)
    try:
        report = write_outputs(run.store, run.manifest, formats=("csv", "parquet"))
    finally:
        os.umask(old)
    for path in report.files.values():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name
    assert not [p for p in run.root.iterdir() if p.name.endswith(".tmp")]


def test_temporaries_a_killed_export_left_are_removed_and_nothing_else(run: Run) -> None:
    run.root.mkdir(parents=True, exist_ok=True)
    stale = [run.root / ".metadata.jsonl.0123456789ab.tmp", run.root / ".rows.ba9876543210.tmp"]
    for path in stale:
        path.write_text("half an export")
    mine = [run.root / ".notes.tmp", run.root / "draft.0123456789ab.tmp"]  # not our names
    for path in mine:
        path.write_text("the user's")
    write_outputs(run.store, run.manifest)
    assert not [p for p in stale if p.exists()]
    assert all(p.read_text() == "the user's" for p in mine)


def test_exports_of_one_folder_take_turns(run: Run) -> None:
    import fcntl
    import threading

    run.root.mkdir(parents=True, exist_ok=True)
    assert not (run.root / "metadata.jsonl").exists()
    held = os.open(run.root, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)  # another export is writing this folder

    def export_in_another_thread() -> None:
        store = Store(memory=True)  # sqlite connections are thread-bound: an empty state of its own
        try:
            write_outputs(store, run.manifest)
        finally:
            store.close()

    waiting = threading.Thread(target=export_in_another_thread)
    try:
        waiting.start()
        waiting.join(0.5)
        assert waiting.is_alive(), "the export did not wait for the folder's lock"
        assert not (run.root / "metadata.jsonl").exists()
    finally:
        os.close(held)  # the other export is done
    waiting.join(10)
    assert not waiting.is_alive()
    assert (run.root / "metadata.jsonl").exists()


def test_retired_jobs_are_not_listed(run: Run) -> None:
    gone = run.specs[7]
    run.store.sync([s for s in run.specs if s.id != gone.id])  # the job left the manifest
    report = write_outputs(run.store, run.manifest)
    assert gone.id not in {r["job_id"] for r in iter_metadata(report.files["jsonl"])}
    assert report.images == len(run.images) - 1
    assert report.stats["counts"]["retired"] == 1


def test_hostile_prompts_round_trip_through_datasets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    datasets = pytest.importorskip("datasets")
    manifest = _manifest(tmp_path)
    prompts = ["🦊 in snow", "\u202eevil RTL\u202c and a NUL\x00", "../../etc/passwd", "x" * 10_000]
    specs = [_spec(i, NANO, {"prompt": p}) for i, p in enumerate(prompts)]
    with Store(memory=True) as store:
        store.sync(specs)
        for spec in specs:
            _finish(store, Path(manifest.output), spec, [(8, 8)])
        write_outputs(store, manifest)
    ds = datasets.load_dataset(
        "imagefolder",
        data_dir=str(manifest.output),
        split="train",
        cache_dir=str(tmp_path / "cache"),
    )
    assert ds["prompt"] == prompts
