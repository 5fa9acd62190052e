"""T6: a 50 MB result file over loopback — ``batchgen.download.fetch`` against ``curl``.

Setup: a PNG of the target size (valid, so that ``fetch`` verifies it like any output) is served
by a small static server in its own process (``sendfile``, keep-alive off) on 127.0.0.1. Then:

- throughput: ``curl -o FILE URL`` and ``fetch(client, URL, FILE)`` alternate ``ROUNDS`` times on
  the same URL into the same folder; each side's best time counts (noise only ever slows a run
  down). Target: fetch >= 0.8 x curl's MB/s. Without curl, a bare ``httpx`` stream-to-file loop
  is the baseline and the figures say so.
- memory: ``fetch`` runs in a fresh child process per size; the child reports its peak RSS
  growth over its own baseline. Target: growth for the big file ≤ growth for the small file
  + 8 MB (memory does not follow the file size).

``--small`` uses a 5 MB file (and compares 1 MB with 5 MB for memory).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 7
MB = 1_000_000
#: a realistic fast link to a CDN (about 1 Gbit/s), for the second comparison
LINK_RATE = 100 * MB
#: allowed RSS growth difference between the big and the small download
MEMORY_SLACK = 8 * 1024 * 1024

_SERVER = r"""
import http.server, sys, functools, os, time
RATE = float(sys.argv[2])  # bytes per second, 0 = as fast as the kernel goes
class Handler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    def copyfile(self, source, outputfile):
        outputfile.flush()
        if not RATE:
            self.connection.sendfile(source)
            return
        size, sent, started, step = os.fstat(source.fileno()).st_size, 0, time.monotonic(), 1 << 20
        while sent < size:
            sent += self.connection.sendfile(source, sent, min(step, size - sent))
            ahead = sent / RATE - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(
    ("127.0.0.1", 0), functools.partial(Handler, directory=sys.argv[1]))
print(server.server_address[1], flush=True)
server.serve_forever()
"""

# The child resets its own peak RSS (VmHWM, via /proc/self/clear_refs) right before the
# download, so the figure is the growth the download caused, not the import-time peak.
_MEMORY_CHILD = r"""
import asyncio, json, sys
from pathlib import Path
from batchgen.download import fetch, make_download_client

def status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)

async def main() -> None:
    url, warm_url, dest = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    async with make_download_client() as client:
        # a small download first: imports and first-use allocations are not growth
        await fetch(client, warm_url, dest.with_name("warm-" + dest.name),
                    max_bytes=10**9, timeout=300)
        before = status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        fetched = await fetch(client, url, dest, max_bytes=10**9, timeout=300)
        peak = status("VmHWM")
    print(json.dumps({"bytes": fetched.bytes, "growth": peak - before, "peak": peak}))

asyncio.run(main())
"""


def write_png(path: Path, size: int, *, width: int = 2048) -> int:
    """Write a valid RGB PNG of about ``size`` bytes (stored deflate of noise); return its size."""
    row = width * 3 + 1
    height = max(1, size // row)
    compressor = zlib.compressobj(level=0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    with open(path, "wb") as out:
        out.write(b"\x89PNG\r\n\x1a\n")
        out.write(chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)))
        noise = os.urandom(row * 64)
        for start in range(0, height, 64):
            rows = min(64, height - start)
            block = bytearray(noise[: rows * row])
            for r in range(rows):
                block[r * row] = 0  # filter type "none" for each scanline
            data = compressor.compress(bytes(block))
            if data:
                out.write(chunk(b"IDAT", data))
        out.write(chunk(b"IDAT", compressor.flush()))
        out.write(chunk(b"IEND", b""))
    return path.stat().st_size


def _start_server(folder: Path, rate: float = 0.0) -> tuple[subprocess.Popen[str], str]:
    """A static file server in its own process; ``rate`` bytes/s caps each response (0: none)."""
    server = subprocess.Popen(
        [sys.executable, "-c", _SERVER, str(folder), str(rate)], stdout=subprocess.PIPE, text=True
    )
    assert server.stdout is not None
    port = int(server.stdout.readline())
    return server, f"http://127.0.0.1:{port}"


def _curl(url: str, dest: Path) -> float:
    started = time.perf_counter()
    subprocess.run(["curl", "-sS", "-f", "-o", str(dest), url], check=True)
    return time.perf_counter() - started


async def _fetch_timed(url: str, dest: Path) -> float:
    from batchgen.download import fetch, make_download_client

    async with make_download_client() as client:
        started = time.perf_counter()
        await fetch(client, url, dest, max_bytes=10**9, timeout=300)
        return time.perf_counter() - started


async def _httpx_loop(url: str, dest: Path) -> float:
    """The no-curl baseline: the plainest httpx stream-to-file loop."""
    import httpx

    async with httpx.AsyncClient() as client:
        started = time.perf_counter()
        async with client.stream("GET", url) as response:
            with open(dest, "wb") as out:
                async for chunk in response.aiter_raw():
                    out.write(chunk)
        return time.perf_counter() - started


def _compare(url: str, folder: Path, size: int, rounds: int) -> dict[str, Any]:
    """Alternate baseline, fetch and a bare httpx loop ``rounds`` times; best MB/s of each."""
    curl = shutil.which("curl")
    baseline_times: list[float] = []
    fetch_times: list[float] = []
    httpx_times: list[float] = []
    for round_ in range(rounds):
        if curl:
            # the ceiling of any httpx-based client on this machine, for context
            loop_target = folder / f"httpx-{round_}.png"
            httpx_times.append(asyncio.run(_httpx_loop(url, loop_target)))
            loop_target.unlink()
        target = folder / f"baseline-{round_}.png"
        if curl:
            baseline_times.append(_curl(url, target))
        else:
            baseline_times.append(asyncio.run(_httpx_loop(url, target)))
        target.unlink()
        dest = folder / f"fetch-{round_}.png"
        fetch_times.append(asyncio.run(_fetch_timed(url, dest)))
        dest.unlink()
    baseline = size / min(baseline_times) / MB
    fetched = size / min(fetch_times) / MB
    ceiling = size / min(httpx_times) / MB if httpx_times else None
    return {
        "baseline": "curl" if curl else "httpx stream loop (curl not installed)",
        "httpx_loop_mb_per_s": round(ceiling, 1) if ceiling else None,
        "fetch_vs_httpx_loop": round(fetched / ceiling, 3) if ceiling else None,
        "baseline_mb_per_s": round(baseline, 1),
        "fetch_mb_per_s": round(fetched, 1),
        "ratio": round(fetched / baseline, 3),
        "baseline_seconds": [round(t, 4) for t in baseline_times],
        "fetch_seconds": [round(t, 4) for t in fetch_times],
    }


def _memory_growth(url: str, warm_url: str, dest: Path) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_CHILD, url, warm_url, str(dest)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    growth: int = json.loads(out.stdout)["growth"]
    return growth


def run(small: bool) -> dict[str, Any]:
    """Measure fetch vs curl throughput and fetch's memory growth; print and return figures."""
    big = 5 * MB if small else 50 * MB
    little = 1 * MB if small else 5 * MB
    rounds = 3 if small else ROUNDS
    with tempfile.TemporaryDirectory(prefix="bench-downloads-") as tmp:
        folder = Path(tmp)
        served = folder / "served"
        served.mkdir()
        big_size = write_png(served / "big.png", big)
        little_size = write_png(served / "little.png", little)
        write_png(served / "warm.png", 100_000)
        fast, fast_url = _start_server(served)
        link, link_url = _start_server(served, rate=LINK_RATE)
        try:
            loopback = _compare(f"{fast_url}/big.png", folder, big_size, rounds)
            linked = _compare(f"{link_url}/big.png", folder, big_size, max(2, rounds // 2))
            warm = f"{fast_url}/warm.png"
            grow_big = _memory_growth(f"{fast_url}/big.png", warm, folder / "mem-big.png")
            grow_little = _memory_growth(f"{fast_url}/little.png", warm, folder / "mem-little.png")
        finally:
            for server in (fast, link):
                server.terminate()
                server.wait()
    delta = grow_big - grow_little
    figures: dict[str, Any] = {
        "file_bytes": big_size,
        "loopback": loopback,
        f"link_{LINK_RATE // MB}MBps": linked,
        "rss_growth_bytes": {
            f"{round(little_size / MB)} MB": grow_little,
            f"{round(big_size / MB)} MB": grow_big,
        },
        "rss_growth_delta_bytes": delta,
        "targets": {
            "loopback ratio >= 0.8": loopback["ratio"] >= 0.8,
            "memory flat": delta <= MEMORY_SLACK,
        },
    }
    figures["ok"] = all(figures["targets"].values())
    name = loopback["baseline"]
    print(
        f"T6 downloads, {big_size / MB:.0f} MB file:\n"
        f"   loopback, unthrottled: fetch {loopback['fetch_mb_per_s']:.0f} MB/s, {name} "
        f"{loopback['baseline_mb_per_s']:.0f} MB/s, ratio {loopback['ratio']:.2f} (target ≥ 0.8); "
        f"bare httpx loop {loopback['httpx_loop_mb_per_s']} MB/s\n"
        f"   link at {LINK_RATE / MB:.0f} MB/s: fetch {linked['fetch_mb_per_s']:.0f} MB/s, {name} "
        f"{linked['baseline_mb_per_s']:.0f} MB/s, ratio {linked['ratio']:.2f}\n"
        f"   RSS growth: {grow_little / 2**20:.1f} MiB for {little_size / MB:.0f} MB, "
        f"{grow_big / 2**20:.1f} MiB for {big_size / MB:.0f} MB "
        f"(delta {delta / 2**20:.1f} MiB, target ≤ {MEMORY_SLACK / 2**20:.0f} MiB)"
    )
    return figures
