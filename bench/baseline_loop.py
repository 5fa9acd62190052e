"""The hand-written loop that batchgen is measured against (TARGETS.md T1, T2, T5).

This is the minimal asyncio + httpx program a user would write to push a list of request bodies
through the RunComfy Model API: ``concurrency`` workers, each one takes the next body, submits it,
polls until the request is terminal, fetches the result and downloads every output. It keeps no
state, plans nothing, has no rate limiter and retries only trivially (a 429 or a 5xx on a GET
waits a second and tries again, a few times; a submit is never retried on a 5xx, because it is
paid). Whatever batchgen adds on top of this loop is batchgen's own overhead.

Two polling styles, both as users write them (spec/runcomfy-model-api.md §6):

- ``poll="result"``: GET ``/result`` until its ``status`` is terminal (the official ComfyUI nodes);
- ``poll="status"``: GET ``/status`` until terminal, then ``/result`` once (the official CLI).

``poll_interval`` is the sleep between two polls of one request: 2 s as users write it (T1, T5),
0 to measure pure overhead (T2). The first poll comes right after the submit.

Use it as a library (other benchmarks import it)::

    figures = await run_baseline(base_url, token, model, bodies, concurrency=32, poll_interval=0)

or as a script, against a running server or a simulator it starts in a subprocess::

    python -m bench.baseline_loop --jobs 500 --concurrency 32 --poll-interval 0

Figures: ``jobs`` (requests that ended succeeded and downloaded), ``failed``, ``seconds`` (the
whole loop, first submit to last download), ``jobs_per_s``, ``calls`` (HTTP calls this client
made to the API, downloads excluded) with ``calls_by_endpoint`` and ``calls_per_job``,
``downloads``, ``cpu_seconds`` (user + system CPU of *this process* over the loop: only the
client's cost when the server runs in another process) and ``notice_delay_s_mean`` (mean time from
the server's ``finished_at`` to this loop seeing the result, when the server reports it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import httpx

PollStyle = Literal["result", "status"]

#: /result statuses after which polling stops (spec §1.3)
RESULT_TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
#: /status statuses after which the status-style loop fetches /result (spec §1.2, §6)
STATUS_TERMINAL = frozenset({"completed", "succeeded", "failed", "cancelled", "canceled"})
#: the trivial retry: this many tries, one second apart, on 429 (any call) or 5xx / network (GETs)
TRIES = 5
RETRY_SLEEP = 1.0


class BaselineError(Exception):
    """A request the loop gave up on (it counts the job as failed and goes on)."""


@dataclass
class _Tally:
    """What the workers count; only the event-loop thread touches it."""

    calls: Counter[str] = field(default_factory=Counter)
    done: int = 0
    failed: int = 0
    downloads: int = 0
    download_bytes: int = 0
    notice_delays: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)


def output_uris(output: Any) -> list[str]:
    """Every URI in a result's ``output`` object: single strings and arrays, in key order."""
    if not isinstance(output, dict):
        return []
    uris: list[str] = []
    for value in output.values():
        if isinstance(value, str):
            uris.append(value)
        elif isinstance(value, list):
            uris.extend(v for v in value if isinstance(v, str))
    return uris


def _finished_at(body: dict[str, Any]) -> float | None:
    """The server's ``finished_at`` as a POSIX time, or None when absent or unparseable."""
    raw = body.get("finished_at")
    if not isinstance(raw, str):
        return None
    try:
        stamp = datetime.fromisoformat(raw)
    except ValueError:
        return None
    if stamp.tzinfo is None:  # a naive stamp cannot be placed on our clock
        return None
    return stamp.timestamp()


class _Loop:
    """One run of the loop: a shared client, a shared iterator of bodies, N workers."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        base_url: str,
        token: str,
        model: str,
        *,
        poll_interval: float,
        poll: PollStyle,
        out_dir: Path | None,
    ) -> None:
        self.client = client
        self.base_url = base_url.rstrip("/")
        self.auth = {"Authorization": f"Bearer {token}"}
        self.model = model
        self.poll_interval = poll_interval
        self.poll = poll
        self.out_dir = out_dir
        self.tally = _Tally()

    async def _call(self, endpoint: str, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One API call with the trivial retry; returns a 2xx response or raises BaselineError."""
        for attempt in range(1, TRIES + 1):
            self.tally.calls[endpoint] += 1
            try:
                response = await self.client.request(method, url, headers=self.auth, **kwargs)
            except httpx.TransportError as exc:
                # A submit that may have been sent is not retried: it is paid, with no idempotency.
                if method != "GET" or attempt == TRIES:
                    raise BaselineError(f"{endpoint}: {type(exc).__name__}") from exc
                await asyncio.sleep(RETRY_SLEEP)
                continue
            retryable = response.status_code == 429 or (
                method == "GET" and response.status_code >= 500
            )
            if retryable and attempt < TRIES:
                await asyncio.sleep(RETRY_SLEEP)
                continue
            if response.status_code >= 300:
                raise BaselineError(f"{endpoint}: HTTP {response.status_code}")
            return response
        raise AssertionError("unreachable: the last try returns or raises")

    async def _job(self, index: int, body: dict[str, Any]) -> None:
        """Submit, poll, fetch, download one body."""
        submitted = (
            await self._call("submit", "POST", f"{self.base_url}/v1/models/{self.model}", json=body)
        ).json()
        request_id = submitted["request_id"]
        status_url = (
            submitted.get("status_url") or f"{self.base_url}/v1/requests/{request_id}/status"
        )
        result_url = (
            submitted.get("result_url") or f"{self.base_url}/v1/requests/{request_id}/result"
        )
        if self.poll == "status":
            while (await self._call("status", "GET", status_url)).json()["status"] not in (
                STATUS_TERMINAL
            ):
                await asyncio.sleep(self.poll_interval)
            result = (await self._call("result", "GET", result_url)).json()
        else:
            while (result := (await self._call("result", "GET", result_url)).json())[
                "status"
            ] not in RESULT_TERMINAL:
                await asyncio.sleep(self.poll_interval)
        finished = _finished_at(result)
        if finished is not None:
            self.tally.notice_delays.append(time.time() - finished)
        if result["status"] != "succeeded":
            raise BaselineError(f"result: {result['status']}")
        for number, uri in enumerate(output_uris(result.get("output"))):
            # Download hosts never get the API token (TARGETS.md R3), so no auth header here.
            response = await self.client.get(uri)
            self.tally.downloads += 1
            if response.status_code != 200:
                raise BaselineError(f"download: HTTP {response.status_code}")
            self.tally.download_bytes += len(response.content)
            if self.out_dir is not None:
                suffix = Path(httpx.URL(uri).path).suffix or ".bin"
                (self.out_dir / f"{index:06d}_{number}{suffix}").write_bytes(response.content)

    async def worker(self, work: Iterator[tuple[int, dict[str, Any]]]) -> None:
        """Take bodies from the shared iterator until it is empty."""
        for index, body in work:
            try:
                await self._job(index, body)
            except (BaselineError, httpx.HTTPError, KeyError, ValueError) as exc:
                self.tally.failed += 1
                self.tally.errors[str(exc) if isinstance(exc, BaselineError) else repr(exc)] += 1
            else:
                self.tally.done += 1


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_baseline(
    base_url: str,
    token: str,
    model: str,
    bodies: Sequence[dict[str, Any]],
    *,
    concurrency: int,
    poll_interval: float,
    out_dir: str | Path | None = None,
    poll: PollStyle = "result",
    timeout: float = 60.0,
) -> dict[str, Any]:
    """Run the loop over ``bodies`` and return its figures (see the module docstring).

    :param base_url: the API's scheme, host and port, without ``/v1``.
    :param token: the bearer token.
    :param model: the model id every body is submitted to.
    :param bodies: request bodies, submitted in order by ``concurrency`` workers.
    :param concurrency: requests in flight at once (workers), also the connection pool size.
    :param poll_interval: seconds between two polls of one request (0 = poll back to back).
    :param out_dir: write each download there (``<index>_<n>.<ext>``); None reads and drops it.
    :param poll: ``"result"`` polls /result; ``"status"`` polls /status, then /result once.
    :param timeout: httpx timeout of every call, seconds.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    if poll_interval < 0:
        raise ValueError(f"poll_interval must be >= 0, got {poll_interval}")
    if poll not in ("result", "status"):
        raise ValueError(f"poll must be 'result' or 'status', got {poll!r}")
    folder = Path(out_dir) if out_dir is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    cpu_before = _cpu_seconds()
    started = time.perf_counter()
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        loop = _Loop(
            client, base_url, token, model, poll_interval=poll_interval, poll=poll, out_dir=folder
        )
        work = iter(enumerate(bodies))  # shared: each worker's next() takes a distinct body
        await asyncio.gather(*(loop.worker(work) for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    cpu = _cpu_seconds() - cpu_before
    tally = loop.tally
    calls = sum(tally.calls.values())
    delays = tally.notice_delays
    return {
        "jobs": tally.done,
        "failed": tally.failed,
        "seconds": round(seconds, 3),
        "jobs_per_s": round(tally.done / seconds, 2) if seconds > 0 else 0.0,
        "calls": calls,
        "calls_by_endpoint": dict(sorted(tally.calls.items())),
        "calls_per_job": round(calls / tally.done, 3) if tally.done else None,
        "downloads": tally.downloads,
        "download_bytes": tally.download_bytes,
        "cpu_seconds": round(cpu, 3),
        "cpu_ms_per_job": round(1000 * cpu / tally.done, 3) if tally.done else None,
        "notice_delay_s_mean": round(sum(delays) / len(delays), 3) if delays else None,
        "errors": dict(tally.errors.most_common(5)),
        "concurrency": concurrency,
        "poll_interval": poll_interval,
        "poll": poll,
    }


def main(argv: list[str] | None = None) -> int:
    """Script entry: run the loop once and print its figures (``--json FILE`` also writes them)."""
    from bench import common  # the script path only: the library function needs none of it

    parser = argparse.ArgumentParser(
        prog="python -m bench.baseline_loop",
        description="The minimal asyncio + httpx loop batchgen is compared with. Without "
        "--base-url it uses RUNCOMFY_BASE_URL / RUNCOMFY_API_TOKEN, else starts a simulator "
        "(zero latency, small images) in a subprocess.",
    )
    parser.add_argument("--base-url", help="API base URL without /v1 (default: env or simulator)")
    parser.add_argument("--token", help="bearer token (default: env RUNCOMFY_API_TOKEN)")
    parser.add_argument("--model", default=common.BENCH_MODEL)
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--poll-interval", type=float, default=2.0)
    parser.add_argument("--poll", choices=["result", "status"], default="result")
    parser.add_argument("--out", type=Path, help="write downloads into this folder")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    bodies = common.bench_bodies(args.jobs)
    base_url, token = common.api_from_env(args.base_url, args.token)

    def go(url: str, tok: str) -> dict[str, Any]:
        return asyncio.run(
            run_baseline(
                url,
                tok,
                args.model,
                bodies,
                concurrency=args.concurrency,
                poll_interval=args.poll_interval,
                poll=args.poll,
                out_dir=args.out,
            )
        )

    if base_url is None or token is None:
        with common.simulator(workers=args.concurrency) as sim:
            figures = go(sim.base_url, sim.token)
    else:
        figures = go(base_url, token)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0 if figures["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
