"""Sinks: finished traces handed to background threads behind bounded queues.
A sink that hangs or raises never slows or fails a request.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from wsgiref.util import setup_testing_defaults

import pytest

from wsgitrace import ConfigurationError, Trace, TraceMiddleware
from wsgitrace.config import resolve_options
from wsgitrace.sinks import SinkDispatcher, build_sinks
from wsgitrace.store import TraceStore

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment


def dummy_app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


def request(app: WSGIApplication, path: str = "/", **headers: str) -> tuple[str, bytes]:
    """Serve one GET as a server does (closing the body); status and body."""
    environ: dict[str, Any] = {"PATH_INFO": path, "REMOTE_ADDR": "127.0.0.1"}
    for name, value in headers.items():
        environ["HTTP_" + name.upper()] = value
    setup_testing_defaults(environ)
    status: list[str] = []

    def start_response(s: str, h: list[tuple[str, str]], exc_info: Any = None) -> Any:
        status.append(s)
        return lambda data: None

    body = app(environ, start_response)
    try:
        data = b"".join(body)
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()
    return status[-1], data


def make_traces(count: int) -> list[Trace]:
    """``count`` finished traces of real requests."""
    app = TraceMiddleware(dummy_app, max_traces=max(count, 1))
    for i in range(count):
        request(app, f"/t{i}")
    return app.buffer.latest()[::-1]


class ListSink:
    """Keeps what it is given."""

    def __init__(self) -> None:
        self.traces: list[Trace] = []
        self.batches = 0
        self.closed = False

    def write(self, traces: Sequence[Trace]) -> None:
        self.batches += 1
        self.traces.extend(traces)

    def close(self) -> None:
        self.closed = True


class HangingSink(ListSink):
    """Blocks in ``write`` until released."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.entered = threading.Event()

    def write(self, traces: Sequence[Trace]) -> None:
        self.entered.set()
        self.release.wait(30)
        super().write(traces)


class FailingSink(ListSink):
    """Raises on every write (and on close when asked)."""

    def __init__(self, fail_close: bool = False) -> None:
        super().__init__()
        self.fail_close = fail_close
        self.calls = 0

    def write(self, traces: Sequence[Trace]) -> None:
        self.calls += 1
        msg = "sink is down"
        raise OSError(msg)

    def close(self) -> None:
        super().close()
        if self.fail_close:
            msg = f"close failed {id(self)}"
            raise RuntimeError(msg)


@pytest.fixture(name="dispatchers")
def fixture_dispatchers() -> Iterator[list[SinkDispatcher]]:
    """Dispatchers made by a test, closed at its end."""
    made: list[SinkDispatcher] = []
    yield made
    for dispatcher in made:
        for worker in dispatcher._workers:
            sink = worker.sink
            if isinstance(sink, HangingSink):
                sink.release.set()
        with contextlib.suppress(Exception):  # some tests' sinks fail on purpose
            dispatcher.close(timeout=5)


class TestSinkDispatcher:
    def test_delivers_in_order_within_a_second(
        self, dispatchers: list[SinkDispatcher], wait_for: Callable[..., Any]
    ) -> None:
        """Submitted traces reach the sink, oldest first, from its own thread."""
        sink = ListSink()
        dispatcher = SinkDispatcher([sink])
        dispatchers.append(dispatcher)
        dispatcher.start()
        traces = make_traces(20)
        start = time.monotonic()
        for trace in traces:
            dispatcher.submit(trace)
        wait_for(lambda: len(sink.traces) == 20, timeout=5)
        assert time.monotonic() - start < 1.0
        assert sink.traces == traces
        assert (dispatcher.delivered, dispatcher.dropped, dispatcher.failed) == (20, 0, 0)

    def test_flush_without_threads_delivers_here(self) -> None:
        """flush() delivers inline when no thread runs (never started)."""
        sink = ListSink()
        dispatcher = SinkDispatcher([sink])
        traces = make_traces(3)
        for trace in traces:
            dispatcher.submit(trace)
        assert dispatcher.pending == 3
        assert dispatcher.flush()
        assert sink.traces == traces
        dispatcher.close()
        assert sink.closed

    def test_full_queue_drops_and_counts(self, dispatchers: list[SinkDispatcher]) -> None:
        """A hung sink fills its queue; later traces are dropped and counted."""
        sink = HangingSink()
        dispatcher = SinkDispatcher([sink], max_queue=5)
        dispatchers.append(dispatcher)
        dispatcher.start()
        traces = make_traces(1) * 30
        dispatcher.submit(traces[0])
        assert sink.entered.wait(5)
        for trace in traces[1:]:
            dispatcher.submit(trace)
        assert dispatcher.pending == 5
        assert dispatcher.dropped == 24
        sink.release.set()
        assert dispatcher.flush(5)
        assert len(sink.traces) == 6

    def test_failing_sink_is_counted_logged_once_and_isolated(
        self,
        dispatchers: list[SinkDispatcher],
        caplog: pytest.LogCaptureFixture,
        wait_for: Callable[..., Any],
    ) -> None:
        """A sink that raises loses its batches (counted, logged once); the
        other sinks still get every trace.
        """
        failing, good = FailingSink(), ListSink()
        dispatcher = SinkDispatcher([failing, good])
        dispatchers.append(dispatcher)
        dispatcher.start()
        traces = make_traces(10)
        with caplog.at_level(logging.ERROR, logger="wsgitrace"):
            dispatcher.submit(traces[0])
            wait_for(lambda: failing.calls == 1, timeout=5)  # a first batch failed
            for trace in traces[1:]:
                dispatcher.submit(trace)
            wait_for(lambda: len(good.traces) == 10 and dispatcher.failed == 10, timeout=5)
        assert failing.calls >= 2
        messages = [r.getMessage() for r in caplog.records if "sink" in r.getMessage()]
        assert len(messages) == 1
        assert "FailingSink failed" in messages[0]
        assert "sink is down" in messages[0]

    def test_a_thread_that_cannot_start_fails_once_and_spares_the_requests(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A sink thread that cannot start ("can't start new thread") is
        tried once, by the first request; its traces are counted as failed
        and that is logged once. The requests and their traces are whole.
        """
        starts: list[str] = []
        start = threading.Thread.start

        def refusing_start(thread: threading.Thread) -> None:
            if thread.name.startswith("wsgitrace-sink-"):
                starts.append(thread.name)
                msg = "can't start new thread"
                raise RuntimeError(msg)
            start(thread)

        monkeypatch.setattr(threading.Thread, "start", refusing_start)
        app = TraceMiddleware(dummy_app, store=str(tmp_path / "traces.db"), endpoint=True)
        assert app.sinks is not None
        with caplog.at_level(logging.ERROR, logger="wsgitrace"):
            answers = [request(app, f"/t{i}") for i in range(3)]
        assert answers == [("200 OK", b"ok")] * 3
        assert starts == ["wsgitrace-sink-store"]
        for trace in app.buffer.latest():
            assert trace.finished
            names = [event.name for event in trace.events]
            assert "body" in names
            assert "close" in names
            assert "tracer_error" not in names
        assert (app.sinks.failed, app.sinks.dropped, app.sinks.pending) == (3, 0, 0)
        messages = [r.getMessage() for r in caplog.records]
        assert len(messages) == 1
        assert "sink store cannot start its thread (can't start new thread)" in messages[0]
        status, body = request(app, "/_trace")
        assert status.startswith("200")
        assert json.loads(body)["sink_dropped"] == 3
        app.sinks.close()

    def test_a_trace_queued_as_the_thread_fails_to_start_is_counted(
        self, dispatchers: list[SinkDispatcher], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A trace submitted on one thread while another fails to start the
        sink's thread (it passed the queue's check before the queue was shut,
        and appends after it was emptied) is counted as failed, not left
        queued uncounted, nor written later by a flush.
        """
        start = threading.Thread.start

        def refusing_start(thread: threading.Thread) -> None:
            if thread.name.startswith("wsgitrace-sink-"):
                msg = "can't start new thread"
                raise RuntimeError(msg)
            start(thread)

        monkeypatch.setattr(threading.Thread, "start", refusing_start)
        sink = ListSink()
        dispatcher = SinkDispatcher([sink])
        dispatchers.append(dispatcher)
        worker = dispatcher._workers[0]

        class LateQueue(deque[Trace]):
            def append(self, trace: Trace) -> None:
                dispatcher.start()  # between the submit's check and its append
                super().append(trace)

        worker.queue = LateQueue()
        first, second = make_traces(2)
        dispatcher.submit(first)
        assert worker.start_failed
        assert (dispatcher.failed, dispatcher.dropped, dispatcher.pending) == (1, 0, 0)
        dispatcher.submit(second)  # refused by the shut queue: failed too
        assert dispatcher.flush(5)
        assert (dispatcher.failed, dispatcher.dropped, dispatcher.pending) == (2, 0, 0)
        assert sink.traces == []

    def test_close_runs_every_sink_then_raises(self) -> None:
        """close() closes every sink even when some fail, then raises them
        together, like Flask's _CollectErrors.
        """
        sinks = [FailingSink(fail_close=True), ListSink(), FailingSink(fail_close=True)]
        dispatcher = SinkDispatcher(sinks)
        if sys.version_info >= (3, 11):
            with pytest.raises(ExceptionGroup) as info:  # noqa: F821
                dispatcher.close()
            assert len(info.value.exceptions) == 2
        else:
            with pytest.raises(RuntimeError):
                dispatcher.close()
        assert all(sink.closed for sink in sinks)

    def test_close_is_bounded_and_never_runs_during_a_write(
        self, wait_for: Callable[..., Any]
    ) -> None:
        """close() returns within its timeout while a write hangs (a store
        waiting out a lock at exit); the sink is closed by its thread once the
        write returns, never under it.
        """
        sink = HangingSink()
        closed_during_write: list[bool] = []
        sink.close = lambda: closed_during_write.append(not sink.release.is_set())  # type: ignore[method-assign]
        dispatcher = SinkDispatcher([sink])
        dispatcher.start()
        dispatcher.submit(make_traces(1)[0])
        assert sink.entered.wait(5)
        started = time.monotonic()
        dispatcher.close(timeout=0.2)
        assert time.monotonic() - started < 2
        assert closed_during_write == []
        sink.release.set()
        wait_for(lambda: closed_during_write == [False], timeout=5)
        assert len(sink.traces) == 1

    def test_submit_from_a_finalizer(self, dispatchers: list[SinkDispatcher]) -> None:
        """submit() works inside __del__ during a garbage collection."""
        sink = ListSink()
        dispatcher = SinkDispatcher([sink])
        dispatchers.append(dispatcher)
        trace = make_traces(1)[0]

        class Finalized:
            def __init__(self) -> None:
                self.me = self

            def __del__(self) -> None:
                dispatcher.submit(trace)

        Finalized()
        gc.collect()
        assert dispatcher.flush()
        assert sink.traces == [trace]

    def test_thread_ends_when_the_dispatcher_is_freed(self, wait_for: Callable[..., Any]) -> None:
        """The worker thread holds its dispatcher only weakly."""
        dispatcher = SinkDispatcher([ListSink()])
        dispatcher.start()
        thread = dispatcher._workers[0].thread
        assert thread is not None
        assert thread.is_alive()
        del dispatcher
        gc.collect()
        wait_for(lambda: not thread.is_alive(), timeout=5)

    @pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
    def test_fork_gives_the_child_its_own_queue_and_thread(
        self, dispatchers: list[SinkDispatcher], tmp_path: Path, fork: Callable[[], int]
    ) -> None:
        """After fork the child starts empty, starts its own thread, and
        delivers its own traces; the parent's queue is untouched.
        """
        sink = HangingSink()
        dispatcher = SinkDispatcher([sink])
        dispatchers.append(dispatcher)
        dispatcher.start()
        traces = make_traces(3)
        dispatcher.submit(traces[0])
        assert sink.entered.wait(5)
        dispatcher.submit(traces[1])
        result = tmp_path / "child.txt"
        pid = fork()
        if pid == 0:  # pragma: no cover - the child reports through a file
            code = 1
            try:
                state = (dispatcher.running, dispatcher.pending)
                sink.release.set()
                worker = dispatcher._workers[0]
                worker.sink = ListSink()
                dispatcher.start()
                dispatcher.submit(traces[2])
                deadline = time.monotonic() + 5
                while not worker.sink.traces and time.monotonic() < deadline:  # type: ignore[attr-defined]
                    time.sleep(0.01)
                alive = worker.thread is not None and worker.thread.is_alive()
                got = [t.path for t in worker.sink.traces]  # type: ignore[attr-defined]
                result.write_text(repr((state, alive, got)))
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0
        assert result.read_text() == repr(((False, 0), True, ["/t2"]))
        assert dispatcher.pending == 1  # the parent's, still waiting

    def test_a_sink_drops_its_connections_on_its_thread_not_in_the_fork_handler(
        self, dispatchers: list[SinkDispatcher]
    ) -> None:
        """The fork handler only marks the sink; ``after_fork()`` runs before
        the child's first write, off the handler, where a lock another thread
        held at the fork (an exporter's thread pool) would hang the child.
        """
        calls: list[str] = []

        class ForkAwareSink(ListSink):
            def after_fork(self) -> None:
                calls.append("after_fork")

            def write(self, traces: Sequence[Trace]) -> None:
                calls.append("write")
                super().write(traces)

        dispatcher = SinkDispatcher([ForkAwareSink()])
        dispatchers.append(dispatcher)
        dispatcher.submit(make_traces(1)[0])
        assert dispatcher.flush(5)
        calls.clear()
        assert dispatcher.delivered == 1
        dispatcher._after_fork()  # what the child's fork handler runs
        assert calls == []
        assert dispatcher.delivered == 0  # the child counts its own
        dispatcher.submit(make_traces(1)[0])
        assert dispatcher.flush(5)
        dispatcher.submit(make_traces(1)[0])
        assert dispatcher.flush(5)
        assert calls == ["after_fork", "write", "write"]

    def test_a_forked_child_that_never_wrote_drops_the_parents_connection_before_close(
        self,
    ) -> None:
        """Closing the child's sinks (at its exit) first drops what they
        inherited, so a sink never closes the parent's connection.
        """
        calls: list[str] = []

        class ForkAwareSink(ListSink):
            def after_fork(self) -> None:
                calls.append("after_fork")

            def close(self) -> None:
                calls.append("close")

        dispatcher = SinkDispatcher([ForkAwareSink()])
        dispatcher._after_fork()
        dispatcher.close()
        assert calls == ["after_fork", "close"]

    def test_a_sink_that_cannot_drop_its_connections_never_writes_with_them(
        self, dispatchers: list[SinkDispatcher]
    ) -> None:
        """If ``after_fork()`` fails, the batch fails (counted) instead of
        being written on the parent's connection, and the next one retries.
        """
        calls: list[str] = []

        class FailingOnceSink(ListSink):
            def after_fork(self) -> None:
                calls.append("after_fork")
                if calls.count("after_fork") == 1:
                    msg = "cannot reconnect"
                    raise ConnectionError(msg)

            def write(self, traces: Sequence[Trace]) -> None:
                calls.append("write")
                super().write(traces)

        dispatcher = SinkDispatcher([FailingOnceSink()])
        dispatchers.append(dispatcher)
        dispatcher._after_fork()
        dispatcher.submit(make_traces(1)[0])
        dispatcher.flush(5)
        assert (calls, dispatcher.failed) == (["after_fork"], 1)
        dispatcher.submit(make_traces(1)[0])
        dispatcher.flush(5)
        assert (calls, dispatcher.delivered) == (["after_fork", "after_fork", "write"], 1)

    def test_flushed_at_exit(self, tmp_path: Path) -> None:
        """Traces still queued when the interpreter exits are delivered."""
        script = textwrap.dedent(
            f"""
            import sys, time
            from werkzeug.test import Client
            from wsgitrace import TraceMiddleware

            def app(environ, start_response):
                start_response("200 OK", [])
                return [b"ok"]

            app = TraceMiddleware(app, store={str(tmp_path / "exit.db")!r})
            client = Client(app)
            for i in range(50):
                client.get(f"/exit{{i}}").close()
            # No flush, no close: the exit handler delivers.
            """
        )
        subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
        store = TraceStore(tmp_path / "exit.db", create=False)
        assert len(store) == 50
        store.close()


class TestBuildSinks:
    def test_none_without_options(self) -> None:
        """No store and no otlp: no dispatcher, no thread."""
        assert build_sinks(resolve_options({}, None, {})) is None
        assert TraceMiddleware(dummy_app).sinks is None

    def test_store_from_the_environment(self, tmp_path: Path) -> None:
        """WSGITRACE_STORE alone turns the store on."""
        path = str(tmp_path / "env.db")
        options = resolve_options({}, None, {"WSGITRACE_STORE": path})
        dispatcher = build_sinks(options)
        assert dispatcher is not None
        [store] = dispatcher.sinks
        assert isinstance(store, TraceStore)
        assert store.path == path
        dispatcher.close()

    def test_otlp_without_the_extra_is_a_clear_error(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """otlp=True without the OpenTelemetry SDK names the extra to install."""
        monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
        with pytest.raises(ConfigurationError, match=r"pip install 'wsgitrace\[otlp\]'"):
            TraceMiddleware(dummy_app, otlp=True)

    def test_disabled_tracing_builds_no_sinks(self, tmp_path: Path) -> None:
        """enabled=False costs nothing, sinks included."""
        app = TraceMiddleware(dummy_app, enabled=False, store=str(tmp_path / "off.db"))
        assert app.sinks is None
        assert not (tmp_path / "off.db").exists()


# -- sinks on the request path ----------------------------------------------------


def test_hanging_or_raising_sink_never_blocks_or_fails_requests() -> None:
    """Requests served while a sink hangs (its queue full, dropping) and
    while a sink raises all succeed, none waiting for the sink: the hung
    sink is still inside its first batch when every request has returned.
    (How long they take is measured by bench/sinks.py, not asserted here.)
    """
    count = 400
    hanging_sink, failing_sink = HangingSink(), FailingSink()
    hanging = TraceMiddleware(dummy_app)
    hanging.sinks = SinkDispatcher([hanging_sink], max_queue=50)
    failing = TraceMiddleware(dummy_app)
    failing.sinks = SinkDispatcher([failing_sink])
    try:
        request(hanging, "/first")
        assert hanging_sink.entered.wait(5)
        for app in (hanging, failing):
            assert [request(app) for _ in range(count)] == [("200 OK", b"ok")] * count
        assert hanging_sink.traces == []  # still blocked in its first write
        assert hanging.sinks.dropped == count - 50
        assert failing.sinks.flush(5)
        assert failing.sinks.failed == count
    finally:
        hanging_sink.release.set()
        for app in (hanging, failing):
            assert app.sinks is not None
            app.sinks.close()
