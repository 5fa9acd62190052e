"""The simulator's API through plain httpx: endpoints, exact bodies, queue, images, metrics."""

from __future__ import annotations

import asyncio
import hashlib
import io
import re
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from batchgen.registry import ModelRegistry
from batchgen.simulator import Faults, Simulator, SimulatorConfig
from batchgen.simulator.images import image_size, output_format, small_size

NANO = "google/nano-banana/pro/text-to-image"
FLUX = "blackforestlabs/flux-2/max/text-to-image"
TOKEN = "test-token"
REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")

Factory = Callable[..., Simulator]


@pytest.fixture
def api(simulator_factory: Factory) -> Callable[..., tuple[Simulator, httpx.Client]]:
    """Start a simulator with settings, return it and a client carrying its token."""
    clients: list[httpx.Client] = []

    def make(**settings: Any) -> tuple[Simulator, httpx.Client]:
        settings.setdefault("token", TOKEN)
        settings.setdefault("latency", 0)
        sim = simulator_factory(**settings)
        client = httpx.Client(
            base_url=sim.base_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
        )
        clients.append(client)
        return sim, client

    yield make  # type: ignore[misc]
    for client in clients:
        client.close()


def submit(client: httpx.Client, model: str = NANO, **params: Any) -> str:
    params.setdefault("prompt", "a red bicycle")
    response = client.post(f"/v1/models/{model}", json=params)
    assert response.status_code == 200, response.text
    return str(response.json()["request_id"])


def wait_done(client: httpx.Client, request_id: str, timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body: dict[str, Any] = client.get(f"/v1/requests/{request_id}/result").json()
        if body["status"] not in ("in_queue", "in_progress"):
            return body
        time.sleep(0.01)
    raise AssertionError(f"request {request_id} did not finish in {timeout} s")


def assert_timestamp(text: str) -> datetime:
    # ISO-8601 with microseconds and an offset, like 2026-01-02T15:04:05.999999+00:00
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}[+-]\d\d:\d\d$", text), text
    value = datetime.fromisoformat(text)
    assert value.utcoffset() == timedelta(0)
    return value


# submit / status / result / cancel -------------------------------------------------------------


def test_submit_answers_the_four_documented_fields_built_on_its_own_base_url(api: Any) -> None:
    sim, client = api()
    response = client.post(f"/v1/models/{NANO}", json={"prompt": "a cat"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    request_id = body["request_id"]
    assert REQUEST_ID.match(request_id)
    base = f"{sim.base_url}/v1/requests/{request_id}"
    assert body == {
        "request_id": request_id,
        "status_url": f"{base}/status",
        "result_url": f"{base}/result",
        "cancel_url": f"{base}/cancel",
    }


def test_queue_positions_are_true_with_one_worker_and_cancel_only_takes_queued(api: Any) -> None:
    sim, client = api(workers=1, latency=60)
    ids = [submit(client, prompt=f"job {i}") for i in range(4)]

    def status(request_id: str) -> dict[str, Any]:
        response = client.get(f"/v1/requests/{request_id}/status")
        assert response.status_code == 200
        return dict(response.json())

    base = f"{sim.base_url}/v1/requests/{ids[0]}"
    assert status(ids[0]) == {
        "request_id": ids[0],
        "status": "in_progress",
        "status_url": f"{base}/status",
        "result_url": f"{base}/result",
    }
    assert [status(i).get("queue_position") for i in ids] == [None, 0, 1, 2]
    assert status(ids[2])["status"] == "in_queue"

    # cancelling the middle of the queue moves the ones behind it up
    cancelled = client.post(f"/v1/requests/{ids[2]}/cancel")
    assert cancelled.status_code == 202
    assert cancelled.json() == {"request_id": ids[2], "status": "cancelled", "outcome": "cancelled"}
    assert [status(i).get("queue_position") for i in ids] == [None, 0, None, 1]
    assert status(ids[2])["status"] == "cancelled"
    # a repeated cancel answers the same (harmless to retry)
    assert client.post(f"/v1/requests/{ids[2]}/cancel").json()["outcome"] == "cancelled"

    running = client.post(f"/v1/requests/{ids[0]}/cancel")
    assert running.status_code == 202
    assert running.json() == {
        "request_id": ids[0],
        "status": "in_progress",
        "outcome": "not_cancellable",
    }

    queued = client.get(f"/v1/requests/{ids[1]}/result").json()
    assert set(queued) == {"request_id", "status", "created_at"}
    assert queued["status"] == "in_queue"
    assert client.get(f"/v1/requests/{ids[0]}/result").json()["status"] == "in_progress"

    result = client.get(f"/v1/requests/{ids[2]}/result?include_cost=true").json()
    assert set(result) == {"request_id", "status", "created_at", "finished_at", "cost"}
    assert (result["status"], result["cost"]) == ("cancelled", 0.0)
    metrics = sim.metrics()
    assert metrics["jobs"] == {
        "created": 4,
        "in_queue": 2,
        "in_progress": 1,
        "succeeded": 0,
        "failed": 0,
        "cancelled": 1,
    }
    assert metrics["unfinished_jobs"] == {"now": 3, "peak": 4}


def test_queue_drains_in_order_as_workers_free_up(api: Any) -> None:
    sim, client = api(workers=2, latency=0.05)
    ids = [submit(client, prompt=f"job {i}") for i in range(6)]
    for request_id in ids:
        assert wait_done(client, request_id)["status"] == "succeeded"
    timeline = sim.metrics(timeline=True)["timeline"]
    starts = [timeline[i]["started"] for i in ids]
    assert starts == sorted(starts)
    # never more than two ran at once
    events = sorted(
        [(timeline[i]["started"], 1) for i in ids] + [(timeline[i]["finished"], -1) for i in ids]
    )
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    assert peak == 2


def test_completed_result_has_output_times_and_cost(api: Any) -> None:
    sim, client = api()
    request_id = submit(client, prompt="a lighthouse", resolution="4K")
    body = wait_done(client, request_id)
    url = f"{sim.base_url}/_files/{request_id}/0.png"
    assert body == {
        "request_id": request_id,
        "status": "succeeded",
        "output": {"image": url},
        "created_at": body["created_at"],
        "finished_at": body["finished_at"],
    }
    assert assert_timestamp(body["created_at"]) <= assert_timestamp(body["finished_at"])
    status = client.get(f"/v1/requests/{request_id}/status").json()
    assert status["status"] == "completed" and "queue_position" not in status
    with_cost = client.get(f"/v1/requests/{request_id}/result", params={"include_cost": "true"})
    assert with_cost.json()["cost"] == 0.30  # nano-banana 4K, spec/models/README.md
    flux_id = submit(client, FLUX, prompt="a mountain")
    wait_done(client, flux_id)
    flux = client.get(f"/v1/requests/{flux_id}/result?include_cost=true").json()
    assert flux["cost"] == 0.05  # price_per_image default for models without a known price


def test_num_images_gives_image_and_images(api: Any) -> None:
    sim, client = api()
    request_id = submit(client, FLUX, prompt="three cats", num_images=3, output_format="png")
    output = wait_done(client, request_id)["output"]
    urls = [f"{sim.base_url}/_files/{request_id}/{i}.png" for i in range(3)]
    assert output == {"image": urls[0], "images": urls}
    digests = set()
    for url in urls:
        response = httpx.get(url)
        assert response.status_code == 200
        digests.add(hashlib.sha256(response.content).hexdigest())
    assert len(digests) == 3  # each image says which one it is


@pytest.mark.parametrize("failed_status", ["completed", "failed"])
def test_failed_job_says_completed_on_status_and_failed_on_result(
    api: Any, failed_status: str
) -> None:
    sim, client = api(faults={"job_failure": 1.0}, failed_status=failed_status)
    request_id = submit(client)
    body = wait_done(client, request_id)
    assert body == {
        "request_id": request_id,
        "status": "failed",
        "error": {
            "error_code": 500101,
            "error_message": "the model failed to generate an image (simulated job_failure)",
        },
        "created_at": body["created_at"],
        "finished_at": body["finished_at"],
    }
    assert client.get(f"/v1/requests/{request_id}/status").json()["status"] == failed_status
    assert client.get(f"/v1/requests/{request_id}/result?include_cost=1").json()["cost"] == 0.0
    assert httpx.get(f"{sim.base_url}/_files/{request_id}/0.png").status_code == 404
    assert sim.metrics()["jobs"]["failed"] == 1


# errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "UserAccountError: missing API token"),
        ({"Authorization": "Bearer wrong"}, "UserAccountError: invalid API token"),
        ({"Authorization": f"Basic {TOKEN}"}, "UserAccountError: invalid API token"),
    ],
)
def test_missing_or_wrong_token_is_400004_on_every_endpoint(
    api: Any, headers: dict[str, str], message: str
) -> None:
    sim, client = api()
    request_id = submit(client)
    calls = [
        ("POST", f"/v1/models/{NANO}"),
        ("GET", f"/v1/requests/{request_id}/status"),
        ("GET", f"/v1/requests/{request_id}/result"),
        ("POST", f"/v1/requests/{request_id}/cancel"),
    ]
    for method, path in calls:
        response = httpx.request(method, sim.base_url + path, headers=headers, json={"prompt": "x"})
        assert response.status_code == 400
        assert response.json() == {"error_code": 400004, "error_message": message}
    assert sim.metrics()["submits"]["total"] == 1


@pytest.mark.parametrize("model", ["acme/unknown/model", "google/nano-banana/pro", "bad model!"])
def test_unknown_model_is_400001(api: Any, model: str) -> None:
    _, client = api()
    response = client.post(f"/v1/models/{model}", json={"prompt": "x"})
    assert response.status_code == 400
    assert response.json() == {
        "error_code": 400001,
        "error_message": f"InvalidResourceIdentifier: unknown model_id {model!r}",
    }


@pytest.mark.parametrize("endpoint", ["status", "result", "cancel"])
def test_unknown_request_id_is_404001(api: Any, endpoint: str) -> None:
    _, client = api()
    method = "POST" if endpoint == "cancel" else "GET"
    response = client.request(method, f"/v1/requests/no-such-id/{endpoint}")
    assert response.status_code == 404
    assert response.json() == {
        "error_code": 404001,
        "error_message": "ResourceNotFound: no request with id 'no-such-id'",
    }


def test_unknown_endpoint_is_a_json_404(api: Any) -> None:
    sim, client = api()
    response = client.get("/v2/nothing")
    assert response.status_code == 404
    assert response.json() == {
        "error_code": 404001,
        "error_message": "ResourceNotFound: no endpoint /v2/nothing",
    }
    assert sim.metrics()["calls"]["by_endpoint"]["other"] == {"404": 1}


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (
            {"prompt": "x", "resolution": "8K"},
            [
                {
                    "loc": ["body", "resolution"],
                    "msg": "'8K' is not one of ['1K', '2K', '4K']",
                    "type": "enum",
                }
            ],
        ),
        (
            {"aspect_ratio": 3},
            [
                {
                    "loc": ["body", "aspect_ratio"],
                    "msg": "3 is not one of ['21:9', '16:9', '3:2', '4:3', '5:4', '1:1', '4:5', "
                    "'3:4', '2:3', '9:16']",
                    "type": "enum",
                },
                {
                    "loc": ["body", "aspect_ratio"],
                    "msg": "3 is not of type 'string'",
                    "type": "type",
                },
                {"loc": ["body", "prompt"], "msg": "field required", "type": "missing"},
            ],
        ),
        (
            ["not", "an", "object"],
            [{"loc": ["body"], "msg": "the body must be a JSON object", "type": "type"}],
        ),
    ],
)
def test_schema_violations_are_422_naming_the_field(
    api: Any, body: Any, detail: list[dict[str, Any]]
) -> None:
    sim, client = api()
    response = client.post(f"/v1/models/{NANO}", json=body)
    assert response.status_code == 422
    assert response.json() == {
        "error_code": 422001,
        "error_message": "Validation Error",
        "detail": detail,
    }
    assert sim.metrics()["submits"]["total"] == 0


def test_a_body_that_is_not_json_is_422(api: Any) -> None:
    _, client = api()
    response = client.post(f"/v1/models/{NANO}", content=b"{not json")
    assert response.status_code == 422
    (entry,) = response.json()["detail"]
    assert entry["loc"] == ["body"] and entry["type"] == "json_invalid"


# images ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "params", "size", "fmt"),
    [
        (NANO, {}, (1376, 768), "PNG"),  # defaults: 16:9, 1K, png
        (
            NANO,
            {"aspect_ratio": "1:1", "resolution": "2K", "output_format": "jpeg"},
            (2048, 2048),
            "JPEG",
        ),
        (NANO, {"aspect_ratio": "9:16", "output_format": "webp"}, (768, 1376), "WEBP"),
        (FLUX, {}, (1024, 768), "JPEG"),  # defaults: landscape_4_3, jpeg
        (FLUX, {"image_size": "portrait_16_9", "output_format": "png"}, (576, 1024), "PNG"),
    ],
)
def test_round_trip_downloads_a_decodable_image_of_the_asked_size_and_format(
    api: Any, model: str, params: dict[str, Any], size: tuple[int, int], fmt: str
) -> None:
    sim, client = api()
    request_id = submit(client, model, prompt="a round trip", seed=5, **params)
    url = wait_done(client, request_id)["output"]["image"]
    assert url.startswith(sim.base_url + "/_files/")
    response = httpx.get(url)  # no token: result files are public links
    assert response.status_code == 200
    assert int(response.headers["content-length"]) == len(response.content)
    assert response.headers["content-type"] == f"image/{fmt.lower()}"
    image = Image.open(io.BytesIO(response.content))
    assert (image.format, image.size) == (fmt, size)
    files = sim.metrics()["files"]
    path = url[len(sim.base_url) :]
    assert files["by_path"][path]["sha256"] == hashlib.sha256(response.content).hexdigest()
    assert files["by_path"][path]["bytes"] == len(response.content)
    assert files["with_authorization"] == 0


def test_small_mode_keeps_format_and_ratio(api: Any) -> None:
    _, client = api(image_mode="small")
    request_id = submit(
        client, prompt="tiny", aspect_ratio="21:9", resolution="4K", output_format="webp"
    )
    image = Image.open(
        io.BytesIO(httpx.get(wait_done(client, request_id)["output"]["image"]).content)
    )
    assert image.format == "WEBP"
    assert image.size == small_size((1584 * 4, 672 * 4), 256) == (256, 109)


def test_seeded_body_gives_the_same_image_and_unseeded_differs(api: Any) -> None:
    _, client = api()

    def download(**params: Any) -> bytes:
        request_id = submit(client, prompt="same", output_format="png", **params)
        return httpx.get(wait_done(client, request_id)["output"]["image"]).content

    assert download(seed=1) == download(seed=1)
    assert download(seed=1) != download(seed=2)
    assert download() != download()


def test_file_requests_with_a_token_are_counted(api: Any) -> None:
    sim, client = api()
    url = wait_done(client, submit(client))["output"]["image"]
    assert client.get(url).status_code == 200  # this client sends its token
    assert sim.metrics()["files"]["with_authorization"] == 1


def test_unknown_files_are_404(api: Any) -> None:
    sim, client = api()
    request_id = submit(client, output_format="png")
    wait_done(client, request_id)
    for name in ("1.png", "0.jpg", "x.png"):
        assert httpx.get(f"{sim.base_url}/_files/{request_id}/{name}").status_code == 404
    assert httpx.get(f"{sim.base_url}/_files/nope/0.png").status_code == 404


def test_nano_banana_sizes_follow_the_spec() -> None:
    spec = ModelRegistry.default().get(NANO)
    for ratio in spec.properties["aspect_ratio"]["enum"]:  # type: ignore[union-attr]
        one = image_size(spec, {"aspect_ratio": ratio, "resolution": "1K"})
        assert all(side % 16 == 0 for side in one)
        w, h = (float(x) for x in ratio.split(":"))
        assert one[0] / one[1] == pytest.approx(w / h, rel=0.03)
        assert one[0] * one[1] == pytest.approx(1024 * 1024, rel=0.06)
        assert image_size(spec, {"aspect_ratio": ratio, "resolution": "4K"}) == (
            one[0] * 4,
            one[1] * 4,
        )
    assert image_size(spec, {"aspect_ratio": "1:1", "resolution": "2K"}) == (2048, 2048)
    assert image_size(None, {}) == (1024, 1024)
    assert image_size(None, {"width": 640, "height": 480}) == (640, 480)
    assert output_format(spec, {}) == "png"
    assert output_format(None, {"output_format": "jpg"}) == "jpeg"


# seeds, reproducibility ------------------------------------------------------------------------


def _curls(text: str) -> Iterator[dict[str, Any]]:
    """Each curl command in a seed page: method, url, headers, data."""
    for block in re.findall(r"curl (--request .*?)(?=modelApiDoc_|\Z)", text, flags=re.S):
        method = re.search(r"--request (\w+)", block)
        url = re.search(r"--url (\S+)", block)
        assert method and url
        headers = dict(h.split(": ", 1) for h in re.findall(r'--header "([^"]+)"', block))
        data = re.search(r"--data '(\{.*?\})'", block, flags=re.S)
        yield {
            "method": method.group(1),
            "url": url.group(1),
            "headers": headers,
            "data": data.group(1) if data else None,
        }


@pytest.mark.parametrize(
    ("seed_file", "model"),
    [("000_6b3053ee277d5467.txt", NANO), ("004_118be48d9a4e9720.txt", FLUX)],
)
def test_seed_page_curl_requests_get_the_documented_answers(
    api: Any, shared_dir: Path, seed_file: str, model: str
) -> None:
    sim, _ = api()
    curls = list(_curls((shared_dir / "seeds" / seed_file).read_text(encoding="utf-8")))
    real = "https://model-api.runcomfy.net"
    assert {c["method"] for c in curls} == {"POST", "GET"}

    def run(curl: dict[str, Any], request_id: str = "") -> httpx.Response:
        url = curl["url"].replace(real, sim.base_url).replace("{request_id}", request_id)
        headers = {k: v.replace("<token>", TOKEN) for k, v in curl["headers"].items()}
        content = curl["data"].encode() if curl["data"] else None
        return httpx.request(curl["method"], url, headers=headers, content=content)

    submits = [c for c in curls if c["url"].endswith(model)]
    assert submits and all(c["data"] for c in submits)
    answer = run(submits[0])
    assert answer.status_code == 200
    request_id = answer.json()["request_id"]
    assert set(answer.json()) == {"request_id", "status_url", "result_url", "cancel_url"}
    by_action = {c["url"].rsplit("/", 1)[1]: c for c in curls if "{request_id}" in c["url"]}
    assert set(by_action) == {"status", "result", "cancel"}
    status = run(by_action["status"], request_id)
    assert status.status_code == 200
    assert status.json()["status"] in ("in_queue", "in_progress", "completed")
    cancel = run(by_action["cancel"], request_id)
    assert cancel.status_code == 202 and cancel.json()["outcome"] in (
        "cancelled",
        "not_cancellable",
    )
    result = run(by_action["result"], request_id)
    assert result.status_code == 200
    assert result.json()["status"] in ("in_queue", "in_progress", "succeeded", "cancelled")


def _script(sim: Simulator) -> list[Any]:
    seen: list[Any] = []
    with httpx.Client(base_url=sim.base_url, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        for i in range(8):
            r = c.post(f"/v1/models/{NANO}", json={"prompt": f"p{i}"})
            seen.append(
                (r.status_code, r.json().get("request_id") if r.status_code == 200 else None)
            )
    timeline = sim.metrics(timeline=True)["timeline"]
    seen.append(sorted((v["planned_seconds"], v["will_fail"]) for v in timeline.values()))
    return seen


def test_same_seed_same_ids_run_times_failures_and_faults(simulator_factory: Factory) -> None:
    settings = {
        "token": TOKEN,
        "latency": "10-20s",
        "faults": Faults(job_failure=0.5, http_5xx=0.3),
    }
    first = _script(simulator_factory(seed=7, **settings))
    again = _script(simulator_factory(seed=7, **settings))
    other = _script(simulator_factory(seed=8, **settings))
    assert first == again
    assert first != other
    codes = [code for code, _ in first[:-1]]
    assert 500 in codes and 200 in codes  # the 5xx fault fired on some calls, not all
    assert {fail for _, fail in first[-1]} == {True, False}


# metrics --------------------------------------------------------------------------------------


def test_metrics_count_calls_duplicates_windows_and_notice_delays(api: Any) -> None:
    sim, client = api(workers=4)
    ids = [submit(client, prompt="same body") for _ in range(3)]
    ids.append(submit(client, prompt="other body"))
    for request_id in ids:
        wait_done(client, request_id)
    client.get("/v1/requests/nope/status")
    metrics = sim.metrics()
    assert metrics["calls"]["by_endpoint"]["submit"] == {"200": 4}
    assert metrics["calls"]["by_endpoint"]["status"] == {"404": 1}
    assert metrics["calls"]["total"] == sum(
        n for codes in metrics["calls"]["by_endpoint"].values() for n in codes.values()
    )
    submits = metrics["submits"]
    assert (submits["total"], submits["distinct_bodies"], submits["duplicate_submits"]) == (4, 2, 2)
    (duplicate,) = submits["duplicates"]
    assert duplicate["count"] == 3 and duplicate["request_ids"] == ids[:3]
    assert metrics["max_calls_per_second"]["submit"] == 4
    assert metrics["max_calls_per_second"]["all"] >= 9
    assert sum(metrics["per_second"]["all"]) == metrics["calls"]["total"]
    assert metrics["in_flight"] == {"now": 0, "peak": 1}
    assert metrics["notice_delay"]["count"] == 4
    assert metrics["result_notice_delay"]["count"] == 4
    assert 0 <= metrics["notice_delay"]["mean"] <= metrics["notice_delay"]["max"] < 5
    timeline = sim.metrics(timeline=True)["timeline"][ids[0]]
    assert timeline["created"] <= timeline["started"] <= timeline["finished"]
    assert timeline["first_terminal_result"] >= timeline["finished"]
    assert timeline["state"] == "succeeded"
    one = httpx.get(f"{sim.base_url}/_simulator/requests/{ids[0]}").json()
    assert one["request_id"] == ids[0] and one["finished"] == timeline["finished"]
    # the HTTP endpoint and the method agree; control calls are never counted
    assert httpx.get(f"{sim.base_url}/_simulator/metrics").json()["calls"] == metrics["calls"]
    assert "timeline" not in metrics
    assert httpx.post(f"{sim.base_url}/_simulator/reset").json() == {"reset": True}
    after = sim.metrics()
    assert after["calls"]["total"] == 0 and after["submits"]["total"] == 0
    assert after["jobs"]["succeeded"] == 4  # requests survive a reset


def test_sliding_window_counts_any_one_second_span(api: Any) -> None:
    sim, client = api()
    # 5 calls, a pause just under a second, 5 more: a fixed bucket could split them, the
    # sliding window must see all 10 within one second.
    for _ in range(5):
        client.get("/v1/requests/x/status")
    time.sleep(0.6)
    for _ in range(5):
        client.get("/v1/requests/x/status")
    time.sleep(1.1)
    client.get("/v1/requests/x/status")
    metrics = sim.metrics()
    assert metrics["max_calls_per_second"]["status"] == 10
    assert metrics["max_calls_per_second"]["all"] == 10
    sim.reset_metrics()
    assert sim.metrics()["max_calls_per_second"]["status"] == 0


def test_default_fixture_runs_with_default_settings(simulator: Simulator) -> None:
    assert simulator.config.latency_range == (0.5, 1.5)
    assert simulator.config.workers == 8
    assert httpx.get(f"{simulator.base_url}/_simulator/health").json() == {"ok": True}
    assert simulator.token and simulator.token == simulator.config.token


# config ---------------------------------------------------------------------------------------


def test_config_parses_what_users_type() -> None:
    config = SimulatorConfig.from_dict(
        {"latency": "500ms-2s", "workers": 3, "faults": {"http_429": "5%", "url_ttl": "2m"}}
    )
    assert config.latency_range == (0.5, 2.0)
    assert config.fault_settings.http_429 == 0.05
    assert config.fault_settings.url_ttl == 120.0
    assert SimulatorConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
    assert SimulatorConfig(latency=2).latency_range == (2.0, 2.0)
    assert SimulatorConfig(rate_limit_rps=5).fault_settings.rate_limit_rps == 5.0
    assert SimulatorConfig(faults={"rate_limit_rps": 3}).rate_limit_rps == 3.0
    assert len(SimulatorConfig().api_token) >= 20


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"faults": {"http_492": 0.1}},
            "unknown simulator fault 'http_492' (did you mean 'http_429'?)",
        ),
        ({"faults": {"http_5xx": 1.5}}, "fault http_5xx: a probability is in [0, 1], got 1.5"),
        ({"faults": {"http_5xx": "often"}}, "fault http_5xx: expected a probability like 0.05"),
        ({"faults": {"http_5xx": 0.6, "http_429": 0.6}}, "their sum must be at most 1"),
        ({"faults": {"url_ttl": "soon"}}, "fault url_ttl: expected a duration"),
        ({"latency": "5-1s"}, "latency: range '5-1s' goes down"),
        ({"workers": 0}, "workers: expected an integer ≥ 1, got 0"),
        ({"image_mode": "huge"}, "image_mode: expected 'full' or 'small'"),
        ({"wokers": 2}, "unknown simulator setting 'wokers' (did you mean 'workers'?)"),
        ({"rate_limit_rps": 2, "faults": {"rate_limit_rps": 3}}, "rate_limit_rps given twice"),
    ],
)
def test_config_errors_name_the_setting(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as caught:
        SimulatorConfig.from_dict(settings)
    assert message in str(caught.value)


async def test_queue_positions_stay_exact_through_growth_and_cancellations() -> None:
    import random

    from batchgen.simulator.gpu import GpuPool, RequestState, SimRequest

    finished: list[str] = []
    pool = GpuPool(2, on_finish=lambda r: finished.append(r.request_id))

    def request(i: int, seconds: float) -> SimRequest:
        return SimRequest(f"r{i}", NANO, {}, "", seconds, False, [], 0.0)

    requests = [request(i, 3600) for i in range(3000)]  # past the tree's first size (1024)
    for item in requests:
        pool.submit(item)
    rng = random.Random(1)
    for victim in rng.sample(requests[2:], 700):
        assert pool.cancel(victim)
    queued = [r for r in requests if r.state is RequestState.QUEUED]
    assert pool.queued == len(queued) == 2298 and pool.running == 2
    assert [pool.queue_position(r) for r in queued] == list(range(len(queued)))
    assert pool.queue_position(requests[0]) is None
    assert not pool.cancel(requests[0])  # running: not cancellable
    pool.close()

    # a short job frees its worker for the first request still queued (cancelled ones skipped)
    quick = GpuPool(1, on_finish=lambda r: finished.append(r.request_id))
    first, second, third = request(10_001, 0.01), request(10_002, 3600), request(10_003, 3600)
    for item in (first, second, third):
        quick.submit(item)
    quick.cancel(second)
    while first.state is not RequestState.SUCCEEDED:
        await asyncio.sleep(0.005)
    assert finished == ["r10001"]
    assert third.state is RequestState.RUNNING and second.state is RequestState.CANCELLED
    quick.close()


def test_metrics_window_is_sliding_and_series_fixed(monkeypatch: pytest.MonkeyPatch) -> None:
    from batchgen.simulator import metrics as metrics_module

    now = [100.0]
    monkeypatch.setattr(metrics_module.time, "monotonic", lambda: now[0])
    metrics = metrics_module.Metrics()
    # 3 calls at 0.6 s, 3 at 1.4 s: fixed buckets see 3 + 3, the sliding window sees 6
    for at in (0.6, 0.6, 0.6, 1.4, 1.4, 1.4, 2.5):
        now[0] = 100.0 + at
        metrics.call_started("status")
        metrics.call_finished("status", "200")
    snapshot = metrics.snapshot()
    assert snapshot["per_second"]["status"] == [3, 3, 1]
    assert snapshot["max_calls_per_second"]["status"] == 6
    # exactly one second apart is not "within one second": (t - 1, t] excludes t - 1
    now[0] = 103.5
    metrics.call_started("submit")
    now[0] = 104.5
    metrics.call_started("submit")
    assert metrics.snapshot()["max_calls_per_second"]["submit"] == 1
    assert metrics.snapshot()["in_flight"] == {"now": 2, "peak": 2}
