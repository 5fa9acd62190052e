"""The planning commands: validate, plan (a dry run that writes nothing) and models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from batchgen.cli import cli
from batchgen.manifest import load_manifest
from batchgen.plan import iter_jobs
from batchgen.registry import ModelRegistry
from batchgen.store import Store

NANO = "google/nano-banana/pro/text-to-image"
FLUX = "blackforestlabs/flux-2/max/text-to-image"
EXAMPLES = Path(__file__).resolve().parents[1] / "manifests"

MANIFEST = f"""\
name: cli
state: state.db
sweeps:
  - name: ratios
    model: {NANO}
    prompts: ["a fox", "an owl"]
    grid:
      aspect_ratio: ["1:1", "16:9"]
      resolution: [1K, 4K]
  - name: flux
    model: {FLUX}
    prompts: ["a fox"]
    repeat: 3
"""


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


@pytest.fixture
def manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "m.yaml"
    path.write_text(MANIFEST, encoding="utf-8")
    return path


def test_validate_ok_prints_one_summary_line(manifest: Path) -> None:
    result = run("validate", str(manifest))
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        f"{manifest}: ok: 11 jobs in 2 sweeps on 2 models, estimated cost $1.80 + 3 unpriced\n"
    )


def test_validate_reports_every_problem_and_exits_2(manifest: Path) -> None:
    manifest.write_text(
        MANIFEST.replace("resolution: [1K, 4K]", "resolution: [1K, 3K]").replace(
            "repeat: 3", "repeat: 3\n    params: {image_size: huge}"
        ),
        encoding="utf-8",
    )
    result = run("validate", str(manifest))
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert f"{manifest}:9: sweeps[0].grid.resolution: '3K' is not one of 1K, 2K, 4K (4 jobs)" in (
        result.stderr
    )
    assert f"{manifest}:14: sweeps[1].params.image_size: 'huge' is not one of" in result.stderr


def test_validate_warns_about_unknown_models_on_stderr(manifest: Path) -> None:
    manifest.write_text(MANIFEST.replace(FLUX, "acme/new"), encoding="utf-8")
    result = run("validate", str(manifest))
    assert result.exit_code == 0
    assert "warning:" in result.stderr and "'acme/new' is not in the registry" in result.stderr


def test_plan_without_state_writes_nothing(manifest: Path, tmp_path: Path) -> None:
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run("plan", str(manifest))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    out = result.stdout
    assert "ratios" in out and "flux" in out and "unknown" in out
    assert "$1.80 + 3 unpriced" in out
    assert "does not exist yet: every job is new" in out
    assert "Sample jobs:" in out


def plan_json(*args: str) -> dict[str, Any]:
    result = run("plan", *args, "--json")
    assert result.exit_code == 0, result.output
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_plan_json_counts_per_sweep_and_model(manifest: Path) -> None:
    data = plan_json(str(manifest))
    assert (data["total"], data["new"], data["done"], data["state_exists"]) == (11, 11, 0, False)
    assert [(s["sweep"], s["jobs"], s["new"], s["estimated_cost"]) for s in data["sweeps"]] == [
        ("ratios", 8, 8, 1.8),
        ("flux", 3, 3, None),
    ]
    assert {m["model"]: m["jobs"] for m in data["models"]} == {NANO: 8, FLUX: 3}
    assert data["estimated_cost"] == 1.8 and data["unpriced_jobs"] == 3
    assert len(data["samples"]) == 3 and {s["sweep"] for s in data["samples"]} == {"ratios", "flux"}


def test_plan_reads_an_existing_state_read_only(manifest: Path, tmp_path: Path) -> None:
    loaded = load_manifest(manifest)
    jobs = list(iter_jobs(loaded, ModelRegistry.default()))
    store = Store(tmp_path / "state.db")
    store.sync(jobs)
    done = jobs[0].id
    store.mark_submitting(done)
    store.mark_queued(done, "req-1")
    store.mark_downloading(done, ["http://127.0.0.1/x.png"])
    store.mark_done(done)
    store.close()
    stamp = (tmp_path / "state.db").stat().st_mtime_ns

    # one more prompt: 4 new cells on ratios
    manifest.write_text(MANIFEST.replace('"an owl"]', '"an owl", "a cat"]'), encoding="utf-8")
    data = plan_json(str(manifest))
    assert (data["total"], data["new"], data["done"], data["state_exists"]) == (15, 4, 1, True)
    assert data["by_state"]["pending"] == 10
    assert {s["sweep"]: s["new"] for s in data["sweeps"]} == {"ratios": 4, "flux": 0}
    assert (tmp_path / "state.db").stat().st_mtime_ns == stamp

    text = run("plan", str(manifest)).stdout
    assert "1 done, 4 new" in text and "New jobs would cost $0.90" in text


def test_plan_state_flag_points_elsewhere_and_is_not_created(
    manifest: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other" / "x.db"
    data = plan_json(str(manifest), "--state", str(other))
    assert data["state"] == str(other) and not other.exists() and not other.parent.exists()


def test_plan_refuses_a_too_large_manifest_before_building(manifest: Path) -> None:
    manifest.write_text(
        MANIFEST.replace("repeat: 3", "repeat: 3\n    grid: {seed: {range: [1, 1000000]}}"),
        encoding="utf-8",
    )
    result = run("plan", str(manifest))
    assert result.exit_code == 2
    assert "expands to 3,000,008 jobs, over limits.max_jobs = 100,000" in result.stderr
    assert "limits: {max_jobs: 3000008}" in result.stderr


def test_models_lists_parameters_types_enums_defaults() -> None:
    result = run("models")
    assert result.exit_code == 0
    assert NANO in result.stdout and FLUX in result.stdout
    assert "resolution: string  one of 1K, 2K, 4K, default '1K'" in result.stdout
    assert "prompt: string  required" in result.stdout


def test_models_one_model_as_json_and_an_unknown_one() -> None:
    result = run("models", FLUX, "--json")
    assert result.exit_code == 0
    (model,) = json.loads(result.stdout)
    assert model["model_id"] == FLUX
    assert model["parameters"]["seed"] == {"type": "integer", "required": False, "default": 0}
    bad = run("models", "blackforestlabs/flux-2/max/text-to-imag")
    assert bad.exit_code == 2 and f"did you mean '{FLUX}'" in bad.output


def test_models_dir_adds_models(tmp_path: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "acme.json").write_text(
        json.dumps(
            {
                "model_id": "acme/painter",
                "input": {
                    "type": "object",
                    "required": ["prompt"],
                    "properties": {
                        "prompt": {"type": "string"},
                        "steps": {"type": "integer", "default": 30},
                    },
                },
            }
        ),
        encoding="utf-8",
    )
    result = run("models", "acme/painter", "--models-dir", str(folder))
    assert result.exit_code == 0 and "steps: integer  default 30" in result.stdout


@pytest.mark.parametrize("name", ["demo", "dataset", "sweep"])
def test_example_manifests_validate_and_plan(name: str) -> None:
    path = EXAMPLES / f"{name}.yaml"
    assert run("validate", str(path)).exit_code == 0
    data = plan_json(str(path))
    assert data["total"] == sum(s["jobs"] for s in data["sweeps"]) > 0


def test_demo_is_about_twelve_jobs_on_both_models() -> None:
    data = plan_json(str(EXAMPLES / "demo.yaml"))
    assert data["total"] == 12 and len(data["models"]) == 2 and data["provider"] == "simulator"
