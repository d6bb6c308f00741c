"""Sinks under adversarial conditions: racing starts, bursts, forks, stores
that go away, collectors that misbehave. Each test is a way traces were (or
could be) lost, duplicated, corrupted, blocked on or leaked.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any
from wsgiref.util import setup_testing_defaults

import pytest

from wsgitrace import Trace, TraceMiddleware
from wsgitrace.sinks import SinkDispatcher

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment


def dummy_app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


def request(app: WSGIApplication, path: str = "/") -> str:
    """Serve one GET as a server does (closing the body); the status."""
    environ: dict[str, Any] = {"PATH_INFO": path, "REMOTE_ADDR": "127.0.0.1"}
    setup_testing_defaults(environ)
    status: list[str] = []

    def start_response(s: str, h: list[tuple[str, str]], exc_info: Any = None) -> Any:
        status.append(s)
        return lambda data: None

    body = app(environ, start_response)
    try:
        b"".join(body)
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()
    return status[-1]


def make_traces(count: int) -> list[Trace]:
    """``count`` finished traces of real requests, oldest first."""
    app = TraceMiddleware(dummy_app, max_traces=max(count, 1))
    for i in range(count):
        request(app, f"/t{i}")
    return app.buffer.latest()[::-1]


class OverlapSink:
    """Records how many ``write`` calls ran at once, at most."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lock = threading.Lock()
        self.active = 0
        self.most = 0
        self.written = 0

    def write(self, traces: Sequence[Trace]) -> None:
        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)
        time.sleep(0.005)  # widen the window a second writer would use
        with self.lock:
            self.active -= 1
            self.written += len(traces)

    def close(self) -> None:
        pass


@pytest.fixture(name="dispatchers")
def fixture_dispatchers() -> Iterator[list[SinkDispatcher]]:
    made: list[SinkDispatcher] = []
    yield made
    for dispatcher in made:
        dispatcher.close(timeout=5)


def test_concurrent_first_requests_start_one_thread_per_sink(
    dispatchers: list[SinkDispatcher],
) -> None:
    """The first requests of a threaded worker (after a fork, say) all find
    the sinks not running and start them at once: each sink must still get
    one thread, never two writing to it together (a store's connection in
    the middle of another thread's transaction loses the batch).
    """
    sink = OverlapSink("overlap-probe")
    dispatcher = SinkDispatcher([sink], max_queue=10_000)
    dispatchers.append(dispatcher)
    trace = make_traces(1)[0]
    for _ in range(3000):
        dispatcher.submit(trace)
    barrier = threading.Barrier(8)

    def start() -> None:
        barrier.wait(10)
        dispatcher.start()

    starters = [threading.Thread(target=start) for _ in range(8)]
    for thread in starters:
        thread.start()
    for thread in starters:
        thread.join(10)
    assert dispatcher.flush(30)
    threads = [t for t in threading.enumerate() if t.name == "wsgitrace-sink-overlap-probe"]
    assert (sink.most, sink.written, len(threads)) == (1, 3000, 1)
