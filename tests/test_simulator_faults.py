"""Every simulator fault, seen by a plain httpx client, with the exact answers and metrics."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from batchgen.simulator import Simulator

NANO = "google/nano-banana/pro/text-to-image"
TOKEN = "fault-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

Factory = Callable[..., Simulator]


@pytest.fixture
def start(simulator_factory: Factory) -> Iterator[Callable[..., Simulator]]:
    def make(**faults: Any) -> Simulator:
        return simulator_factory(token=TOKEN, latency=0, faults=faults)

    yield make


def post_submit(sim: Simulator, **kw: Any) -> httpx.Response:
    return httpx.post(
        f"{sim.base_url}/v1/models/{NANO}", json={"prompt": "fault"}, headers=AUTH, **kw
    )


def finished_request(sim: Simulator) -> str:
    """Create a request while faults are drawn, retrying through them, and wait for it."""
    for _ in range(50):
        try:
            response = post_submit(sim)
        except httpx.TransportError:
            continue
        if response.status_code == 200:
            request_id = str(response.json()["request_id"])
            while sim.state.requests[request_id].finished is None:
                time.sleep(0.01)
            return request_id
    raise AssertionError("no submit got through the faults")


@pytest.mark.parametrize("endpoint", ["submit", "status", "result", "cancel"])
def test_http_429_without_retry_after(start: Callable[..., Simulator], endpoint: str) -> None:
    sim = start(http_429=1.0)
    response = _call(sim, endpoint)
    assert response.status_code == 429
    assert "retry-after" not in response.headers
    assert response.json() == {
        "error_code": 429001,
        "error_message": "Too Many Requests: rate limited, retry later",
    }
    metrics = sim.metrics()
    assert metrics["faults"] == {"http_429": 1}
    assert metrics["calls"]["by_endpoint"][endpoint] == {"429": 1}
    assert metrics["submits"]["total"] == 0


def _call(sim: Simulator, endpoint: str) -> httpx.Response:
    if endpoint == "submit":
        return post_submit(sim)
    method = "POST" if endpoint == "cancel" else "GET"
    return httpx.request(method, f"{sim.base_url}/v1/requests/any-id/{endpoint}", headers=AUTH)


def test_http_429_with_retry_after(start: Callable[..., Simulator]) -> None:
    sim = start(http_429_retry_after=1.0, retry_after="3s")
    response = post_submit(sim)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "3"
    assert response.json()["error_code"] == 429001
    fractional = start(http_429_retry_after=1.0, retry_after="1500ms")
    assert post_submit(fractional).headers["retry-after"] == "1.5"


@pytest.mark.parametrize("endpoint", ["submit", "status", "result", "cancel"])
def test_http_5xx_on_every_endpoint(start: Callable[..., Simulator], endpoint: str) -> None:
    sim = start(http_5xx=1.0)
    response = _call(sim, endpoint)
    assert response.status_code == 500
    assert response.json() == {
        "error_code": 500001,
        "error_message": "Internal Error: simulated server error",
    }
    assert sim.metrics()["jobs"]["created"] == 0


@pytest.mark.parametrize("endpoint", ["submit", "status"])
def test_drop_connection_looks_like_a_real_drop(
    start: Callable[..., Simulator], endpoint: str
) -> None:
    sim = start(drop_connection=1.0)
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        _call(sim, endpoint)
    metrics = sim.metrics()
    assert metrics["calls"]["by_endpoint"][endpoint] == {"dropped": 1}
    assert metrics["faults"] == {"drop_connection": 1}
    assert metrics["jobs"]["created"] == 0
    assert metrics["in_flight"]["now"] == 0


def test_a_client_that_dies_mid_body_creates_no_job(
    start: Callable[..., Simulator], caplog: pytest.LogCaptureFixture
) -> None:
    import socket
    from urllib.parse import urlsplit

    sim = start()
    url = urlsplit(sim.base_url)
    head = (
        f"POST /v1/models/{NANO} HTTP/1.1\r\nHost: {url.netloc}\r\n"
        f"Authorization: Bearer {sim.token}\r\nContent-Type: application/json\r\n"
        "Content-Length: 400\r\n\r\n"
    )
    with socket.create_connection((url.hostname, url.port)) as raw:
        raw.sendall(head.encode() + b'{"prompt": "cut sh')  # then the client dies
    deadline = time.monotonic() + 5
    while sim.metrics()["calls"]["by_endpoint"].get("submit") != {"dropped": 1}:
        assert time.monotonic() < deadline, sim.metrics()["calls"]
        time.sleep(0.02)
    metrics = sim.metrics()
    assert metrics["jobs"]["created"] == 0
    assert metrics["in_flight"]["now"] == 0
    # a disconnect is an expected event, not a crash of the app
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_lost_submit_creates_the_job_and_drops_the_answer(start: Callable[..., Simulator]) -> None:
    sim = start(lost_submit=1.0)
    with httpx.Client(headers=AUTH) as client:  # pooled connection, as a real client has
        for _ in range(2):
            with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                client.post(f"{sim.base_url}/v1/models/{NANO}", json={"prompt": "lost"})
    metrics = sim.metrics()
    assert metrics["jobs"]["created"] == 2
    assert metrics["calls"]["by_endpoint"]["submit"] == {"dropped": 2}
    # the same body twice: what a blind resubmit after a lost answer costs
    assert metrics["submits"]["duplicate_submits"] == 1
    # the job is real: it runs and finishes
    for request_id in metrics["submits"]["duplicates"][0]["request_ids"]:
        response = httpx.get(f"{sim.base_url}/v1/requests/{request_id}/status", headers=AUTH)
        assert response.status_code == 200


def test_slow_response_outlasts_a_client_timeout_but_still_answers(
    start: Callable[..., Simulator],
) -> None:
    sim = start(slow_response=1.0, slow_response_delay="400ms")
    with pytest.raises(httpx.ReadTimeout):
        post_submit(sim, timeout=0.1)
    began = time.monotonic()
    response = post_submit(sim, timeout=5)
    assert response.status_code == 200
    assert time.monotonic() - began >= 0.38
    # the slow submit that timed out on the client still created its job
    assert sim.metrics()["jobs"]["created"] == 2
    assert sim.metrics()["faults"] == {"slow_response": 2}


def test_truncated_download_cuts_the_body(start: Callable[..., Simulator]) -> None:
    sim = start(truncated_download=1.0)
    request_id = finished_request(sim)
    url = f"{sim.base_url}/_files/{request_id}/0.png"
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        httpx.get(url)
    with httpx.stream("GET", url) as response:
        expected = int(response.headers["content-length"])
        received = 0
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            for chunk in response.iter_raw():
                received += len(chunk)
    assert received == expected // 2
    files = sim.metrics()["files"]
    assert files["by_path"][f"/_files/{request_id}/0.png"]["truncated"] == 2
    assert files["by_path"][f"/_files/{request_id}/0.png"]["downloads"] == 0
    assert sim.metrics()["faults"] == {"truncated_download": 2}


def test_url_ttl_expires_links_and_a_fresh_result_renews_them(
    start: Callable[..., Simulator],
) -> None:
    sim = start(url_ttl="300ms")
    request_id = finished_request(sim)
    result_url = f"{sim.base_url}/v1/requests/{request_id}/result"
    url = httpx.get(result_url, headers=AUTH).json()["output"]["image"]
    assert "?expires=" in url
    assert httpx.get(url).status_code == 200
    time.sleep(0.4)
    expired = httpx.get(url)
    assert (expired.status_code, expired.text) == (403, "Request has expired\n")
    assert httpx.get(url.split("?")[0]).status_code == 403  # no expiry given: refused too
    fresh = httpx.get(result_url, headers=AUTH).json()["output"]["image"]
    assert fresh != url and httpx.get(fresh).status_code == 200
    assert sim.metrics()["faults"] == {"url_ttl": 2}


def test_rate_limit_per_token_answers_429_with_retry_after(
    start: Callable[..., Simulator],
) -> None:
    sim = start(rate_limit_rps=4)
    with httpx.Client(base_url=sim.base_url, headers=AUTH) as client:
        codes = [client.get("/v1/requests/x/status") for _ in range(7)]
        assert [r.status_code for r in codes] == [404] * 4 + [429] * 3
        assert codes[4].headers["retry-after"] == "1"
        assert codes[4].json() == {
            "error_code": 429001,
            "error_message": "Too Many Requests: rate limit exceeded",
        }
        time.sleep(1.05)
        assert client.get("/v1/requests/x/status").status_code == 404
    # another token has its own window (and is refused for being wrong, not for the rate)
    other = httpx.get(f"{sim.base_url}/v1/requests/x/status", headers={"Authorization": "Bearer z"})
    assert other.status_code == 400
    assert sim.metrics()["faults"] == {"rate_limit_rps": 3}


def test_faults_are_off_by_default(start: Callable[..., Simulator]) -> None:
    sim = start()
    with httpx.Client(base_url=sim.base_url, headers=AUTH) as client:
        for _ in range(30):
            assert client.post(f"/v1/models/{NANO}", json={"prompt": "x"}).status_code == 200
            assert client.get("/v1/requests/x/result").status_code == 404
    assert sim.metrics()["faults"] == {}
    assert not sim.config.fault_settings.active


def test_probabilities_are_honoured_roughly(start: Callable[..., Simulator]) -> None:
    sim = start(http_5xx=0.3, http_429=0.2)
    with httpx.Client(base_url=sim.base_url, headers=AUTH) as client:
        codes = [client.get("/v1/requests/x/status").status_code for _ in range(300)]
    assert 60 <= codes.count(500) <= 120
    assert 30 <= codes.count(429) <= 90
    assert codes.count(404) == 300 - codes.count(500) - codes.count(429)
