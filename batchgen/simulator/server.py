"""Start and stop a simulator: in a thread of this process, or in a child process.

``Simulator(config)`` serves on a daemon thread with its own event loop (uvicorn, log level
warning, no access log) on a loopback port; ``Simulator(config, subprocess=True)`` runs
``python -m batchgen.simulator`` in a child process so that a benchmark's client does not share
its GIL. Both expose the same ``base_url``, ``token``, ``metrics()`` and ``reset_metrics()``.
Invariants: ``start()`` returns only once the server accepts connections; ``stop()`` returns
once it no longer does (idempotent); the heavy imports (uvicorn, starlette, PIL) happen in
``start()``, so importing this module stays cheap.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import subprocess as sp
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .config import SimulatorConfig

if TYPE_CHECKING:
    from ..registry import ModelRegistry
    from .app import SimulatorState

logger = logging.getLogger(__name__)

#: first line a simulator prints; the subprocess variant reads its base URL from it
BANNER_PREFIX = "batchgen simulator listening on "
_START_TIMEOUT = 15.0


class Simulator:
    """A running RunComfy Model API simulator (a context manager).

    :param config: its settings; ``None`` uses the defaults (with a generated token)
    :param subprocess: run it in a child process (``python -m batchgen.simulator``) instead of
        a thread of this one
    :param registry: models it knows (thread mode only); default ``ModelRegistry.default()``
        (the child process reads the same default, including ``BATCHGEN_MODELS_DIR``)
    """

    def __init__(
        self,
        config: SimulatorConfig | None = None,
        *,
        subprocess: bool = False,
        registry: ModelRegistry | None = None,
    ) -> None:
        self.config = config if config is not None else SimulatorConfig()
        self.subprocess = subprocess
        self._registry = registry
        self._base_url: str | None = None
        self._state: SimulatorState | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._process: sp.Popen[str] | None = None

    # lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> Simulator:
        """Start serving; returns once the port accepts connections."""
        if self._base_url is not None:
            raise RuntimeError("this simulator is already running")
        if self.subprocess:
            self._start_process()
        else:
            self._start_thread()
        return self

    def stop(self) -> None:
        """Stop serving and wait until the port is closed; safe to call twice."""
        if self._process is not None:
            process, self._process = self._process, None
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(timeout=10)
                except sp.TimeoutExpired:
                    process.kill()
                    process.wait()
            if process.stdout is not None:
                process.stdout.close()
        if self._thread is not None:
            thread, self._thread = self._thread, None
            self._server.should_exit = True
            thread.join(timeout=15)
            if thread.is_alive():
                logger.warning("the simulator thread did not stop within 15 s")
        self._base_url = None

    @property
    def running(self) -> bool:
        """Whether the simulator is serving."""
        return self._base_url is not None

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` (no ``/v1``)."""
        if self._base_url is None:
            raise RuntimeError("the simulator is not running: use it as a context manager")
        return self._base_url

    @property
    def token(self) -> str:
        """The bearer token it accepts."""
        return self.config.api_token

    @property
    def state(self) -> SimulatorState:
        """The live state (thread mode only): requests, pool, metrics."""
        if self._state is None:
            raise RuntimeError("state is only available for a running in-process simulator")
        return self._state

    # metrics -------------------------------------------------------------------------------

    def metrics(self, *, timeline: bool = False) -> dict[str, Any]:
        """The JSON of ``GET /_simulator/metrics`` (``timeline=True`` adds per-request rows).

        In-process simulators still answer after ``stop()`` (the final figures); a subprocess
        one only while it runs.
        """
        if self._state is not None and self._thread is None:
            return self._state.snapshot(timeline=timeline)  # stopped: no other thread writes
        if self._state is not None and self._loop is not None:
            state = self._state

            async def snapshot() -> dict[str, Any]:
                return state.snapshot(timeline=timeline)

            data: dict[str, Any] = self._on_loop(snapshot())
            return data
        query = "?timeline=true" if timeline else ""
        return self._control("GET", f"/_simulator/metrics{query}")

    def reset_metrics(self) -> None:
        """Zero the counters (requests and their states are kept)."""
        if self._state is not None and self._thread is None:
            self._state.metrics.reset()
            return
        if self._state is not None and self._loop is not None:
            state = self._state

            async def reset() -> None:
                state.metrics.reset()

            self._on_loop(reset())
            return
        self._control("POST", "/_simulator/reset")

    def _on_loop(self, coroutine: Any) -> Any:
        # The state is only touched from its loop thread: hop there instead of locking.
        assert self._loop is not None
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result(timeout=30)

    def _control(self, method: str, path: str) -> dict[str, Any]:
        request = urllib.request.Request(self.base_url + path, method=method, data=None)
        with urllib.request.urlopen(request, timeout=30) as response:
            data: dict[str, Any] = json.loads(response.read())
            return data

    # thread mode ---------------------------------------------------------------------------

    def _start_thread(self) -> None:
        import uvicorn

        from .app import SimulatorState, build_app

        state = SimulatorState(self.config, self._registry)
        # proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on accepted sockets whose
        # proto says TCP, and without it every answer (headers, then body) waits ~40 ms for a
        # delayed ACK. The option on the listening socket is inherited as a second guard.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.bind((self.config.host, self.config.port))
        except OSError:
            sock.close()
            raise
        host, port = sock.getsockname()[:2]
        server = uvicorn.Server(
            uvicorn.Config(
                build_app(state),
                log_level="warning",
                log_config=None,
                access_log=False,
                lifespan="off",
                timeout_graceful_shutdown=1,
                timeout_keep_alive=30,
            )
        )
        failure: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                loop.run_until_complete(server.serve(sockets=[sock]))
            except BaseException as exc:  # reported to start(), which is waiting
                failure.append(exc)
            finally:
                state.pool.close()
                sock.close()
                loop.close()

        thread = threading.Thread(target=serve, name="batchgen-simulator", daemon=True)
        self._server, self._thread, self._state = server, thread, state
        thread.start()
        deadline = time.monotonic() + _START_TIMEOUT
        while not server.started:
            if failure or not thread.is_alive():
                self._thread = None
                raise RuntimeError(f"the simulator failed to start: {failure[:1] or 'exited'}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the simulator did not start within {_START_TIMEOUT:g} s")
            time.sleep(0.005)
        shown = "127.0.0.1" if host == "0.0.0.0" else host
        self._base_url = f"http://{shown}:{port}"

    # subprocess mode -----------------------------------------------------------------------

    def _start_process(self) -> None:
        # The config (token included) goes through stdin, not argv, which any local user can
        # read in the process list.
        command = [sys.executable, "-m", "batchgen.simulator", "--config-json", "-"]
        process = sp.Popen(command, stdin=sp.PIPE, stdout=sp.PIPE, text=True, bufsize=1)
        self._process = process
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(json.dumps(self.config.to_dict()))
        process.stdin.close()
        deadline = time.monotonic() + _START_TIMEOUT
        # readline blocks; a timer kills a child that never prints its banner.
        timer = threading.Timer(_START_TIMEOUT, process.kill)
        timer.start()
        try:
            for line in process.stdout:
                if line.startswith(BANNER_PREFIX):
                    self._base_url = line[len(BANNER_PREFIX) :].strip()
                    break
        finally:
            timer.cancel()
        if self._base_url is None:
            self.stop()
            late = " (timed out)" if time.monotonic() > deadline else ""
            raise RuntimeError(f"the simulator process exited before it was ready{late}")


def banner(sim: Simulator) -> list[str]:
    """What ``batchgen simulate`` prints once the simulator is up."""
    return [
        BANNER_PREFIX + sim.base_url,
        f"token: {sim.token}",
        "point batchgen (or any RunComfy client) at it:",
        f"  export RUNCOMFY_BASE_URL={sim.base_url}",
        f"  export RUNCOMFY_API_TOKEN={sim.token}",
        f"metrics: {sim.base_url}/_simulator/metrics",
        "Ctrl-C to stop",
    ]


def serve_forever(config: SimulatorConfig, echo: Callable[[str], None] | None = None) -> None:
    """Run a simulator until SIGINT or SIGTERM, printing its banner once it is up."""
    write = echo or (lambda line: print(line, flush=True))
    stop = threading.Event()
    with _terminate_sets(stop), Simulator(config) as sim:
        for line in banner(sim):
            write(line)
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass


@contextlib.contextmanager
def _terminate_sets(event: threading.Event) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: event.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
