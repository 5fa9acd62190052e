"""Starting the simulator the other ways: ``batchgen simulate``, ``python -m``, a child process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
from click.testing import CliRunner

from batchgen.cli import cli
from batchgen.simulator import Simulator, SimulatorConfig

NANO = "google/nano-banana/pro/text-to-image"


def _start(command: list[str]) -> tuple[subprocess.Popen[str], list[str]]:
    """Run a simulator command; return it and its banner lines (up to 'Ctrl-C to stop')."""
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    lines: list[str] = []
    for line in process.stdout:
        lines.append(line.rstrip("\n"))
        if line.startswith("Ctrl-C to stop"):
            break
    return process, lines


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_batchgen_simulate_prints_url_and_token_and_stops_cleanly(
    processes: list[subprocess.Popen[str]], stop: signal.Signals
) -> None:
    batchgen = os.path.join(os.path.dirname(sys.executable), "batchgen")
    command = [batchgen, "simulate", "--port", "0", "--latency", "0", "--fail-rate", "1"]
    process, lines = _start(command)
    processes.append(process)
    assert lines[0].startswith("batchgen simulator listening on http://127.0.0.1:")
    base_url = lines[0].rsplit(" ", 1)[1]
    assert lines[1].startswith("token: ")
    token = lines[1].split(": ", 1)[1]
    assert len(token) >= 20  # generated with secrets
    assert f"  export RUNCOMFY_BASE_URL={base_url}" in lines
    headers = {"Authorization": f"Bearer {token}"}
    response = httpx.post(f"{base_url}/v1/models/{NANO}", json={"prompt": "x"}, headers=headers)
    assert response.status_code == 200
    process.send_signal(stop)
    assert process.wait(timeout=15) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base_url}/_simulator/health")


def test_python_m_simulator_takes_the_same_flags(processes: list[subprocess.Popen[str]]) -> None:
    command = [
        sys.executable, "-m", "batchgen.simulator", "--port", "0", "--token", "flag-token",
        "--latency", "0", "--http-5xx", "100%",
    ]  # fmt: skip
    process, lines = _start(command)
    processes.append(process)
    assert lines[1] == "token: flag-token"
    base_url = lines[0].rsplit(" ", 1)[1]
    headers = {"Authorization": "Bearer flag-token"}
    assert httpx.get(f"{base_url}/v1/requests/x/status", headers=headers).status_code == 500
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=15) == 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--http-5xx", "2"], "fault http_5xx: a probability is in [0, 1], got 2.0"),
        (["--latency", "fast"], "latency: expected a duration"),
        (["--url-ttl", "-1"], "fault url_ttl"),
        (["--fail-rate", "0.1", "--job-failure", "0.2"], "--fail-rate and --job-failure disagree"),
    ],
)
def test_bad_flags_exit_2_with_a_message(flags: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["simulate", *flags])
    assert result.exit_code == 2
    assert message in result.output


def test_help_names_every_fault_flag() -> None:
    from batchgen.simulator import FAULT_OPTIONS

    result = CliRunner().invoke(cli, ["simulate", "--help"])
    assert result.exit_code == 0
    for option in FAULT_OPTIONS:
        assert option.flag in result.output


def test_subprocess_simulator_serves_metrics_and_resets_over_http() -> None:
    config = SimulatorConfig(latency=0, workers=2, faults={"job_failure": 1.0}, seed=3)
    with Simulator(config, subprocess=True) as sim:
        assert sim.base_url.startswith("http://127.0.0.1:")
        assert sim._process is not None
        with open(f"/proc/{sim._process.pid}/cmdline", "rb") as cmdline:
            assert sim.token.encode() not in cmdline.read()  # passed on stdin, not argv
        headers = {"Authorization": f"Bearer {sim.token}"}
        with httpx.Client(base_url=sim.base_url, headers=headers) as client:
            request_id = client.post(f"/v1/models/{NANO}", json={"prompt": "x"}).json()[
                "request_id"
            ]
            for _ in range(500):
                if client.get(f"/v1/requests/{request_id}/result").json()["status"] == "failed":
                    break
        metrics = sim.metrics(timeline=True)
        assert metrics["config"]["workers"] == 2 and metrics["config"]["seed"] == 3
        assert metrics["jobs"]["failed"] == 1
        assert metrics["timeline"][request_id]["state"] == "failed"
        assert metrics["calls"]["by_endpoint"]["submit"] == {"200": 1}
        sim.reset_metrics()
        assert sim.metrics()["calls"]["total"] == 0
        process = sim._process
    assert process is not None and process.returncode == 0
    assert not sim.running


def test_simulator_refuses_to_start_twice_and_stop_is_idempotent() -> None:
    sim = Simulator(SimulatorConfig(latency=0))
    with sim:
        with pytest.raises(RuntimeError, match="already running"):
            sim.start()
        httpx.get(f"{sim.base_url}/v1/requests/x/status")
    sim.stop()
    # the final figures stay readable once it stopped
    assert sim.metrics()["calls"]["by_endpoint"]["status"] == {"400": 1}
    with pytest.raises(RuntimeError, match="not running"):
        _ = sim.base_url
