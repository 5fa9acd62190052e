"""How many calls per second the simulator itself sustains on this machine.

Later benchmarks (overhead, polling, rate limits) run batchgen against the simulator; their
figures only mean something if the simulator is not what limits them. This measures its
ceiling: the simulator runs in a child process (``Simulator(subprocess=True)``, its own GIL), and
the load comes from a minimal keep-alive HTTP/1.1 client on raw asyncio streams (far cheaper per
call than any real client, so the figure is the server's, not the client's). Measured:

- ``status_per_s``: ``GET /status`` of one existing request, ``concurrency`` connections;
- ``submit_per_s``: ``POST /v1/models/...`` with a small body (jobs created; zero latency);
- ``round_trip_jobs_per_s``: submit, then result until succeeded, then download its (small)
  image: the most a zero-latency, tiny-image client run could reach.

Run: ``python -m bench simulator_capacity [--small]``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from batchgen.simulator import Simulator, SimulatorConfig

MODEL = "google/nano-banana/pro/text-to-image"


class _Connection:
    """One keep-alive HTTP/1.1 connection speaking just enough of the protocol."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str):
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, host: str, port: int) -> _Connection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer, f"{host}:{port}")

    async def call(
        self, method: str, path: str, token: str, body: bytes = b""
    ) -> tuple[int, bytes]:
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n"
            f"Authorization: Bearer {token}\r\nContent-Length: {len(body)}\r\n"
            + ("Content-Type: application/json\r\n" if body else "")
            + "\r\n"
        )
        self.writer.write(head.encode() + body)
        header = await self.reader.readuntil(b"\r\n\r\n")
        status = int(header[9:12])
        length = 0
        for line in header.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def _load(
    host: str,
    port: int,
    concurrency: int,
    seconds: float,
    unit: Callable[[_Connection], Awaitable[str]],
) -> tuple[float, Counter[str]]:
    """Run ``unit`` in a loop on ``concurrency`` connections for ``seconds``; rate and outcomes."""
    outcomes: Counter[str] = Counter()
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        connection = await _Connection.open(host, port)
        try:
            while time.perf_counter() < deadline:
                outcomes[await unit(connection)] += 1
        finally:
            connection.close()

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return sum(outcomes.values()) / (time.perf_counter() - began), outcomes


def _measure(sim: Simulator, concurrency: int, seconds: float) -> dict[str, Any]:
    parts = urlsplit(sim.base_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    token = sim.token
    body = json.dumps({"prompt": "capacity", "output_format": "png"}).encode()

    async def submit(connection: _Connection) -> str:
        status, _ = await connection.call("POST", f"/v1/models/{MODEL}", token, body)
        return str(status)

    async def round_trip(connection: _Connection) -> str:
        status, answer = await connection.call("POST", f"/v1/models/{MODEL}", token, body)
        if status != 200:
            return f"submit {status}"
        request_id = json.loads(answer)["request_id"]
        while True:
            status, answer = await connection.call(
                "GET", f"/v1/requests/{request_id}/result", token
            )
            result = json.loads(answer)
            if result["status"] not in ("in_queue", "in_progress"):
                break
        if result["status"] != "succeeded":
            return f"result {result['status']}"
        path = urlsplit(result["output"]["image"]).path
        status, _ = await connection.call("GET", path, token)
        return "job ok" if status == 200 else f"file {status}"

    async def main() -> dict[str, Any]:
        first = await _Connection.open(host, port)
        _, answer = await first.call("POST", f"/v1/models/{MODEL}", token, body)
        first.close()
        request_id = json.loads(answer)["request_id"]

        async def status(connection: _Connection) -> str:
            code, _ = await connection.call("GET", f"/v1/requests/{request_id}/status", token)
            return str(code)

        status_rate, status_codes = await _load(host, port, concurrency, seconds, status)
        submit_rate, submit_codes = await _load(host, port, concurrency, seconds, submit)
        trip_rate, trip_outcomes = await _load(host, port, concurrency, seconds, round_trip)
        return {
            "status_per_s": round(status_rate),
            "submit_per_s": round(submit_rate),
            "round_trip_jobs_per_s": round(trip_rate),
            "outcomes": {
                "status": dict(status_codes),
                "submit": dict(submit_codes),
                "round_trip": dict(trip_outcomes),
            },
        }

    return asyncio.run(main())


def run(small: bool) -> dict[str, Any]:
    """Measure and print the simulator's capacity; ``small`` is the quick CI version."""
    seconds = 1.5 if small else 6.0
    concurrency = 16 if small else 32
    config = SimulatorConfig(latency=0, workers=64, image_mode="small", seed=0)
    with Simulator(config, subprocess=True) as sim:
        figures = _measure(sim, concurrency, seconds)
        server = sim.metrics()
    figures["server_max_calls_per_second"] = server["max_calls_per_second"]["all"]
    figures["images_rendered"] = server["images_rendered"]
    figures["setup"] = (
        f"simulator in a child process (latency 0, small images); raw asyncio keep-alive client, "
        f"{concurrency} connections, {seconds:g} s per measure"
    )
    failures = {
        name: {k: v for k, v in counts.items() if k not in ("200", "job ok")}
        for name, counts in figures["outcomes"].items()
    }
    figures["ok"] = not any(failures.values())
    print(f"status calls/s        {figures['status_per_s']:>8}")
    print(f"submits/s             {figures['submit_per_s']:>8}")
    print(f"round-trip jobs/s     {figures['round_trip_jobs_per_s']:>8}  (submit+result+file)")
    print(f"peak calls in 1 s     {figures['server_max_calls_per_second']:>8}  (server's count)")
    print(f"setup: {figures['setup']}")
    if not figures["ok"]:
        print(f"unexpected answers: {failures}")
    return figures


if __name__ == "__main__":
    run(small=False)
