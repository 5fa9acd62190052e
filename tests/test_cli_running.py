"""``batchgen run / status / retry / cancel`` through click, against a simulator in this process."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from batchgen.cli import cli
from batchgen.store import JobState

MODEL = "blackforestlabs/flux-2/max/text-to-image"
STATES = [s.value for s in JobState]


def write_manifest(tmp_path: Path, jobs: int, extra: str = "") -> Path:
    path = tmp_path / "cli.yaml"
    path.write_text(
        "name: clitest\n"
        "provider: runcomfy\n"
        f"output: {tmp_path / 'out'}\n"
        f"state: {tmp_path / 'state.db'}\n"
        "limits:\n"
        "  max_in_flight: 8\n"
        "  poll_interval: 0.05\n"
        f"{extra}"
        "prices:\n"
        f"  {MODEL}: 0.07\n"
        "sweeps:\n"
        f"  - model: {MODEL}\n"
        '    prompts: ["a red fox in fresh snow"]\n'
        "    grid:\n"
        f"      seed: {{range: [1, {jobs}]}}\n"
    )
    return path


@pytest.fixture
def api(
    simulator_factory: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Any]:
    """Start a simulator and point RUNCOMFY_* at it."""

    def start(**settings: Any) -> Any:
        settings.setdefault("workers", 8)
        settings.setdefault("latency", (0.05, 0.1))
        sim = simulator_factory(**settings)
        monkeypatch.setenv("RUNCOMFY_BASE_URL", sim.base_url)
        monkeypatch.setenv("RUNCOMFY_API_TOKEN", sim.token)
        return sim

    return start


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def status_json(manifest: Path) -> dict[str, Any]:
    result = invoke("status", str(manifest), "--json")
    assert result.exit_code == 0, result.output
    data: dict[str, Any] = json.loads(result.output)
    return data


def test_status_before_any_run(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, 3)
    data = status_json(manifest)
    assert data["counts"] == {**{s: 0 for s in STATES}, "retired": 0}
    assert data["running"] is False and "nothing has run" in data["note"]
    assert not (tmp_path / "state.db").exists()  # status never creates a state


def test_run_then_status_json_shape(api: Callable[..., Any], tmp_path: Path) -> None:
    sim = api()
    manifest = write_manifest(tmp_path, 6)
    result = invoke("run", str(manifest), "--yes", "--quiet")
    assert result.exit_code == 0, result.output
    assert "clitest: 6 jobs (6 new, 0 done), 6 to submit" in result.output
    assert f"images in {tmp_path / 'out'}" in result.output
    assert "done 6" in result.output
    data = status_json(manifest)
    assert set(data["counts"]) == {*STATES, "retired"}
    assert data["counts"]["done"] == 6 and data["total"] == 6
    assert data["running"] is False and data["eta_seconds"] is None
    assert data["spent_usd"] == pytest.approx(data["planned_usd"]) == pytest.approx(6 * 0.07)
    assert data["rate_per_minute"] > 0
    assert data["last_run"]["stop_reason"] == "done"
    assert sim.token not in json.dumps(data)
    text = invoke("status", str(manifest)).output
    assert "done" in text and "estimated cost" in text


def test_retry_failed(api: Callable[..., Any], tmp_path: Path) -> None:
    api(faults={"job_failure": 0.5}, seed=2)
    manifest = write_manifest(tmp_path, 12)
    result = invoke("run", str(manifest), "--yes", "--quiet")
    failed = status_json(manifest)["counts"]["failed"]
    assert failed > 0 and result.exit_code == 1
    assert "job_failed" in result.output and "retry" in result.output
    result = invoke("retry", str(manifest), "--failed")
    assert result.exit_code == 0
    assert f"{failed} failed job{'s' * (failed != 1)} back to pending" in result.output
    counts = status_json(manifest)["counts"]
    assert counts["failed"] == 0 and counts["pending"] == failed


def test_retry_needs_a_flag(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["retry", str(write_manifest(tmp_path, 2))])
    assert result.exit_code == 2 and "--failed" in result.output


def test_cancel_pending(api: Callable[..., Any], tmp_path: Path) -> None:
    sim = api()
    manifest = write_manifest(tmp_path, 5)
    result = invoke("run", str(manifest), "--yes", "--quiet", "--max-jobs", "0")
    assert result.exit_code == 0, result.output
    assert status_json(manifest)["counts"]["pending"] == 5
    result = invoke("cancel", str(manifest))
    assert result.exit_code == 0 and "cancelled 5 pending jobs" in result.output
    assert status_json(manifest)["counts"]["cancelled"] == 5
    assert sim.metrics()["submits"]["total"] == 0
    # and back
    assert invoke("retry", str(manifest), "--cancelled").exit_code == 0
    assert status_json(manifest)["counts"]["pending"] == 5


def test_large_run_needs_yes_without_a_terminal(api: Callable[..., Any], tmp_path: Path) -> None:
    sim = api()
    manifest = write_manifest(tmp_path, 1001)
    result = CliRunner().invoke(cli, ["run", str(manifest)], input="")
    assert result.exit_code == 2
    assert "pass --yes" in result.output
    assert sim.metrics()["submits"]["total"] == 0


def test_bad_token_exits_3(
    api: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = api()
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", "wrong-token")
    manifest = write_manifest(tmp_path, 3)
    result = invoke("run", str(manifest), "--yes", "--quiet")
    assert result.exit_code == 3, result.output
    assert "stopped by the API" in result.output
    assert status_json(manifest)["counts"]["pending"] == 3
    assert sim.metrics()["submits"]["total"] == 0


def test_missing_token_exits_3(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, 1)
    result = CliRunner().invoke(cli, ["run", str(manifest), "--yes", "--quiet"])
    assert result.exit_code == 3
    assert "RUNCOMFY_API_TOKEN is not set" in result.output


def test_bad_manifest_exits_2(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, 1, extra="  max_in_fligth: 3\n")
    result = CliRunner().invoke(cli, ["run", str(manifest), "--yes"])
    assert result.exit_code == 2
    assert "max_in_fligth" in result.output and "Traceback" not in result.output
