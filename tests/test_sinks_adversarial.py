"""Sinks under adversarial conditions: racing starts, bursts, forks, stores
that go away, collectors that misbehave. Each test is a way traces were (or
could be) lost, duplicated, corrupted, blocked on or leaked.
"""

from __future__ import annotations

import http.server
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
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


class _Collector(http.server.ThreadingHTTPServer):
    """An OTLP/HTTP collector on 127.0.0.1 that refuses (413) a request
    body over ``limit`` bytes, as real collectors and vendors do.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        #: Requests answered 200 before every later one gets 400 (None: all).
        self.accept: int | None = None
        self.accepted: list[bytes] = []
        self.refused = 0
        super().__init__(("127.0.0.1", 0), _CollectorHandler)


class _CollectorHandler(http.server.BaseHTTPRequestHandler):
    server: _Collector

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if len(body) > self.server.limit:
            self.server.refused += 1
            self.send_response(413)
        elif self.server.accept is not None and len(self.server.accepted) >= self.server.accept:
            self.send_response(400)
        else:
            self.server.accepted.append(body)
            self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(name="collector")
def fixture_collector(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Collector]:
    """A collector on 127.0.0.1 (taking any size until a test says otherwise),
    with the OTLP exporter's variables pointing at it.
    """
    collector = _Collector(limit=1 << 30)
    server = threading.Thread(target=collector.serve_forever, kwargs={"poll_interval": 0.05})
    server.start()
    for name in ("TRACES_ENDPOINT", "HEADERS", "TRACES_HEADERS", "COMPRESSION"):
        monkeypatch.delenv(f"OTEL_EXPORTER_OTLP_{name}", raising=False)
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{collector.server_port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "10")
    try:
        yield collector
    finally:
        collector.shutdown()
        collector.server_close()
        server.join(10)


def _exported_ids(bodies: list[bytes]) -> list[str]:
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

    ids = []
    for body in bodies:
        request = trace_service_pb2.ExportTraceServiceRequest()
        request.ParseFromString(body)
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    for kv in span.attributes:
                        if kv.key == "wsgitrace.id":
                            ids.append(kv.value.string_value)
    return ids


def span_heavy_traces(count: int, note: str = "") -> list[Trace]:
    """``count`` finished traces of 100 spans each (OTLP spans to export),
    oldest first; ``note`` is an attribute of every span, to make them big.
    """
    import wsgitrace

    def busy(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        for i in range(100):
            with wsgitrace.span(f"step{i}", **({"note": note} if note else {})):
                pass
        start_response("200 OK", [])
        return [b"ok"]

    app = TraceMiddleware(busy, max_traces=100)
    for i in range(count):
        request(app, f"/big{i}")
    return app.buffer.latest()[::-1]


def test_otlp_a_large_batch_is_exported_in_requests_a_collector_takes(
    collector: _Collector, caplog: pytest.LogCaptureFixture
) -> None:
    """A queue's worth of big traces (many spans each) is not one request
    the collector refuses as too large, losing every trace in it: each
    request holds a bounded number of spans, so all are exported.
    """
    from wsgitrace.otlp import OtlpSink

    traces = span_heavy_traces(40, note="x" * 400)
    collector.limit = 1024 * 1024
    dispatcher = SinkDispatcher([OtlpSink()])
    for trace in traces:
        dispatcher.submit(trace)
    with caplog.at_level(logging.CRITICAL, logger="wsgitrace"):
        dispatcher.close(timeout=60)
    assert (dispatcher.delivered, dispatcher.failed, collector.refused) == (40, 0, 0)
    assert sorted(set(_exported_ids(collector.accepted))) == sorted(t.id for t in traces)


def test_otlp_a_batch_exported_in_part_counts_only_what_failed(
    collector: _Collector, caplog: pytest.LogCaptureFixture
) -> None:
    """A collector that takes the first request of a batch and then fails:
    the traces it took are delivered, only the others are counted failed
    (the endpoint's sink_dropped is what was really lost).
    """
    from wsgitrace.otlp import OtlpSink

    traces = span_heavy_traces(20)
    collector.accept = 1
    dispatcher = SinkDispatcher([OtlpSink()])
    for trace in traces:
        dispatcher.submit(trace)
    with caplog.at_level(logging.CRITICAL):
        dispatcher.close(timeout=60)
    exported = set(_exported_ids(collector.accepted))
    assert 0 < len(exported) < len(traces)
    assert exported == {t.id for t in traces[: len(exported)]}
    assert (dispatcher.delivered, dispatcher.failed) == (len(exported), 20 - len(exported))


def in_child(fork: Callable[[], int], tmp_path: Path, work: Callable[[], str]) -> str:
    """Fork, run ``work`` in the child, and return what it returned (passed
    back through a file), once the child has exited cleanly.
    """
    result = tmp_path / "child.txt"
    pid = fork()
    if pid == 0:  # pragma: no cover - the child reports through a file
        code = 1
        try:
            result.write_text(work())
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    return result.read_text()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_during_a_store_write_can_write_the_store(
    tmp_path: Path, fork: Callable[[], int]
) -> None:
    """A fork while another thread's store write holds SQLite's write lock:
    the child inherits SQLite's in-process record of that lock, which no
    thread of the child ever releases, so every write of the child's own
    connection found the store locked, for good. The fork waits for the
    write to end instead.
    """
    from wsgitrace.store import TraceStore

    db = str(tmp_path / "traces.db")
    store = TraceStore(db, timeout=1)
    first, second, child_trace = make_traces(3)
    store.write([first])
    inside = threading.Event()
    release = threading.Event()
    prune = store._prune

    def slow_prune(conn: Any) -> int:
        inside.set()
        release.wait(10)
        return prune(conn)

    store._prune = slow_prune  # type: ignore[method-assign]
    writer = threading.Thread(target=store.write, args=([second],))
    writer.start()
    assert inside.wait(10)
    timer = threading.Timer(0.3, release.set)
    timer.start()

    def write_in_child() -> str:
        try:
            store.write([child_trace])
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return "written"

    try:
        assert in_child(fork, tmp_path, write_in_child) == "written"
    finally:
        release.set()
        writer.join(10)
        timer.join(10)
    paths = sorted(t.path for t in TraceStore(db, create=False).latest())
    assert paths == sorted([first.path, second.path, child_trace.path])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_fork_waits_for_a_thread_opening_or_reading_the_store(
    tmp_path: Path, fork: Callable[[], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not only a write transaction: any use of SQLite by another thread at
    the fork (opening the file, reading it) can leave the child with a
    mutex or lock of SQLite's that nothing there releases (a gunicorn
    --preload worker forked while the master stored its warm-up requests
    hung in its first connect). The fork waits for that use to end.
    """
    from wsgitrace import store as store_module

    db = str(tmp_path / "traces.db")
    store_module.TraceStore(db).write(make_traces(1))
    reader = store_module.TraceStore(db, create=False)
    inside = threading.Event()
    release = threading.Event()
    done = threading.Event()
    connect = store_module._connect

    def slow_connect(*args: Any, **kwargs: Any) -> Any:
        conn = connect(*args, **kwargs)
        inside.set()
        release.wait(10)
        done.set()
        return conn

    monkeypatch.setattr(store_module, "_connect", slow_connect)
    thread = threading.Thread(target=reader.latest)
    thread.start()
    assert inside.wait(10)
    timer = threading.Timer(0.3, release.set)
    timer.start()
    try:
        assert in_child(fork, tmp_path, lambda: repr(done.is_set())) == "True"
    finally:
        release.set()
        thread.join(10)
        timer.join(10)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_childs_drops_before_its_first_write_reach_the_store(
    tmp_path: Path, fork: Callable[[], int]
) -> None:
    """Traces a forked child's full queue dropped before its first write are
    counted in the store's ``dropped`` (what ``tail --store`` and every
    worker's ``/_trace`` show), not wiped when the store then starts the
    child's own counts.
    """
    from wsgitrace.store import TraceStore

    db = str(tmp_path / "traces.db")
    store = TraceStore(db)
    dispatcher = SinkDispatcher([store], max_queue=5)
    traces = make_traces(8)
    dispatcher.submit(traces[0])
    assert dispatcher.flush(10)  # the parent has written with its connection

    def submit_in_child() -> str:
        for trace in traces[1:]:
            dispatcher.submit(trace)
        dispatcher.flush(10)
        reader = TraceStore(db, create=False)
        return repr((dispatcher.dropped, len(reader), reader.dropped))

    try:
        assert in_child(fork, tmp_path, submit_in_child) == repr((2, 6, 2))
    finally:
        dispatcher.close(timeout=5)


def test_a_request_never_waits_for_another_starting_the_sinks(
    dispatchers: list[SinkDispatcher], monkeypatch: pytest.MonkeyPatch
) -> None:
    """While one request starts the sinks' threads, another that finds them
    not running returns at once rather than wait for it (under gevent,
    where starting a thread yields to other greenlets, a greenlet waiting
    on that lock would block the whole worker, the starting one included).
    """
    from wsgitrace import sinks as sinks_module

    sink = OverlapSink("wait-probe")
    dispatcher = SinkDispatcher([sink])
    dispatchers.append(dispatcher)
    starting = threading.Event()
    release = threading.Event()
    start = sinks_module._SinkWorker.start

    def slow_start(worker: Any) -> None:
        starting.set()
        release.wait(10)
        start(worker)

    monkeypatch.setattr(sinks_module._SinkWorker, "start", slow_start)
    first = threading.Thread(target=dispatcher.start)
    first.start()
    assert starting.wait(10)
    second = threading.Thread(target=dispatcher.start)
    second.start()
    second.join(5)
    returned = not second.is_alive()
    release.set()
    first.join(10)
    second.join(10)
    assert returned
    assert dispatcher.running


class GateSink(OverlapSink):
    """An :class:`OverlapSink` whose first ``write`` waits for ``release``."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.writing = threading.Event()
        self.release = threading.Event()

    def write(self, traces: Sequence[Trace]) -> None:
        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)
            first = not self.writing.is_set()
            self.writing.set()
        if first:
            self.release.wait(10)
        with self.lock:
            self.active -= 1
            self.written += len(traces)


def test_a_flush_and_a_start_never_write_to_one_sink_at_once(
    dispatchers: list[SinkDispatcher], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flush before the sinks run writes from its own thread; a thread
    started meanwhile (a first request's) waits for that batch instead of
    writing another to the same sink at once, and the flush then leaves
    the rest to it. Neither ever waits on a lock.
    """
    from wsgitrace import sinks as sinks_module

    sink = GateSink("flush-probe")
    dispatcher = SinkDispatcher([sink])
    dispatchers.append(dispatcher)
    tried = threading.Event()
    deliver = sinks_module._SinkWorker.deliver

    def noted_deliver(worker: Any, limit: int = sinks_module.BATCH_SIZE) -> bool:
        delivered = deliver(worker, limit)
        if threading.current_thread().name == "wsgitrace-sink-flush-probe":
            tried.set()
        return delivered

    monkeypatch.setattr(sinks_module._SinkWorker, "deliver", noted_deliver)
    first, second = make_traces(2)
    dispatcher.submit(first)
    flushed: list[bool] = []
    flusher = threading.Thread(target=lambda: flushed.append(dispatcher.flush(30)))
    flusher.start()
    assert sink.writing.wait(10)
    dispatcher.submit(second)
    dispatcher.start()
    # The sink's thread has had its try at the queue while the flush writes.
    assert tried.wait(10)
    sink.release.set()
    flusher.join(30)
    assert flushed == [True]
    assert dispatcher.flush(10)
    assert (sink.most, sink.written, dispatcher.failed) == (1, 2, 0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_by_a_thread_using_the_store_can_end_that_use(
    tmp_path: Path, fork: Callable[[], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fork from a thread that is itself using a store waits only so long
    (the guard's bound) and goes on; the child then ends that use and writes
    the store. The forking thread held the guard's lock through the fork, and
    the child's use ended on that guard: it waited for the lock for good.
    """
    from wsgitrace import _store_file
    from wsgitrace.store import TraceStore

    monkeypatch.setattr(_store_file, "FORK_WAIT_SECONDS", 0.05)
    db = str(tmp_path / "traces.db")
    store = TraceStore(db)
    first, child_trace = make_traces(2)
    store.write([first])
    result = tmp_path / "child.txt"
    with _store_file._using_store():
        pid = fork()
    if pid == 0:  # pragma: no cover - the child reports through a file
        code = 1
        try:
            store.write([child_trace])
            result.write_text("written")
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + 30
    while not os.waitpid(pid, os.WNOHANG)[0]:
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the child hung ending the use of the store it was forked in")
        time.sleep(0.05)
    assert result.read_text() == "written"
    assert len(TraceStore(db, create=False)) == 2


def test_otlp_an_exporter_that_raises_after_a_part_counts_only_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An exporter that takes the first request of a batch and raises on the
    next (not a FAILURE result: an error of its own): the traces of the first
    request are delivered, only the others are counted failed.
    """
    pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.sdk.trace.export import SpanExportResult

    from wsgitrace.otlp import OtlpSink

    class RaisingExporter:
        def __init__(self) -> None:
            self.exported: list[int] = []

        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            if self.exported:
                raise ValueError("cannot encode")
            self.exported.append(len({span.context.trace_id for span in spans}))
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            pass

    exporter = RaisingExporter()
    dispatcher = SinkDispatcher([OtlpSink(exporter)])  # type: ignore[arg-type]
    for trace in span_heavy_traces(10):
        dispatcher.submit(trace)
    with caplog.at_level(logging.CRITICAL):
        dispatcher.close(timeout=30)
    assert len(exporter.exported) == 1
    first = exporter.exported[0]  # traces in the request it took
    assert 0 < first < 10
    assert (dispatcher.delivered, dispatcher.failed) == (first, 10 - first)


class CloseProbeSink(GateSink):
    """A :class:`GateSink` that records each ``close`` and what ran wrongly:
    a close during a write, a write after a close.
    """

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.closes = 0
        self.wrong: list[str] = []

    def write(self, traces: Sequence[Trace]) -> None:
        if self.closes:
            self.wrong.append("write after close")
        super().write(traces)

    def close(self) -> None:
        with self.lock:
            if self.active:
                self.wrong.append("close during write")
            self.closes += 1


def test_close_never_closes_a_sink_a_flush_is_writing_to() -> None:
    """A flush before the sinks run writes from its own thread; a close that
    times out meanwhile leaves the sink to be closed when that write returns,
    not during it (a store's connection closed mid-transaction).
    """
    sink = CloseProbeSink("close-flush-probe")
    dispatcher = SinkDispatcher([sink])
    dispatcher.submit(make_traces(1)[0])
    flusher = threading.Thread(target=dispatcher.flush, args=(30,))
    flusher.start()
    try:
        assert sink.writing.wait(10)
        dispatcher.close(timeout=0.2)  # returns within its timeout, the write still held
        closes_during_write = sink.closes
    finally:
        sink.release.set()
        flusher.join(30)
    assert closes_during_write == 0
    assert (sink.closes, sink.wrong, sink.written) == (1, [], 1)


def test_a_second_close_neither_writes_nor_closes_again() -> None:
    """close() is idempotent: a trace submitted after it is not written to
    the closed sink by a second close (or a flush), which does not close it
    again.
    """
    sink = CloseProbeSink("close-twice-probe")
    sink.release.set()
    dispatcher = SinkDispatcher([sink])
    first, second = make_traces(2)
    dispatcher.submit(first)
    dispatcher.start()
    dispatcher.close(timeout=10)
    dispatcher.submit(second)
    dispatcher.flush(1)
    dispatcher.close(timeout=1)
    assert (sink.closes, sink.wrong, sink.written) == (1, [], 1)


def test_a_start_racing_close_leaves_no_thread_running(monkeypatch: pytest.MonkeyPatch) -> None:
    """A first request starts the sinks just as the app closes them: the
    start found them not closed, the close then stopped the thread it saw
    (none yet). The thread started after must end, and never write to the
    closed sink; it polled its queue for good.
    """
    from wsgitrace import sinks as sinks_module

    sink = CloseProbeSink("close-start-probe")
    sink.release.set()
    checked = threading.Event()
    go_on = threading.Event()

    def get_closed(worker: Any) -> bool:
        closed: bool = worker.__dict__["_closed"]
        if threading.current_thread().name == "starter" and not checked.is_set():
            checked.set()  # start() read 'not closed'; close() runs now
            go_on.wait(10)
        return closed

    def set_closed(worker: Any, value: bool) -> None:
        worker.__dict__["_closed"] = value

    monkeypatch.setattr(
        sinks_module._SinkWorker, "closed", property(get_closed, set_closed), raising=False
    )
    dispatcher = SinkDispatcher([sink])
    dispatcher.submit(make_traces(1)[0])
    starter = threading.Thread(target=dispatcher.start, name="starter")
    starter.start()
    try:
        assert checked.wait(10)
        dispatcher.close(timeout=10)
        dispatcher.submit(make_traces(1)[0])  # a request that finished meanwhile
    finally:
        go_on.set()
        starter.join(10)
    thread = dispatcher._workers[0].thread
    assert thread is not None
    thread.join(10)
    alive = thread.is_alive()
    dispatcher._workers[0].stop.set()  # end it anyway, when it did not
    assert not alive
    assert (sink.closes, sink.wrong, sink.written) == (1, [], 1)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_childs_read_and_write_both_starting_the_store_lose_no_count(
    tmp_path: Path, fork: Callable[[], int]
) -> None:
    """A new worker's first ``/_trace`` read and its sink thread's first write
    meet a store still set up for the parent at the same moment: the reader's
    reset, done after the writer's, wiped the losses the writer had been told
    of (``note_lost``) and left its new connection among the inherited ones,
    never closed.
    """
    from wsgitrace import store as store_module

    checked = threading.Event()
    go_on = threading.Event()

    class PausingStore(store_module.TraceStore):
        """Its first look at ``_pid`` from the "reader" thread waits for the writer."""

        @property  # type: ignore[override]
        def _pid(self) -> int:
            pid: int = self.__dict__["pid_"]
            if threading.current_thread().name == "reader" and not checked.is_set():
                checked.set()  # the reader read the pid; the writer goes first
                go_on.wait(10)
            return pid

        @_pid.setter
        def _pid(self, value: int) -> None:
            self.__dict__["pid_"] = value

    db = str(tmp_path / "traces.db")
    store = PausingStore(db)
    traces = make_traces(3)
    store.write(traces[:1])  # the parent's connection

    def read_and_write_in_child() -> str:
        reader = threading.Thread(target=store.latest, args=(1,), name="reader")
        reader.start()
        try:
            assert checked.wait(10)
            store.write(traces[1:2])
            conn = store._writer
            store.note_lost(3)  # the sink's dropped count, told before a write
        finally:
            go_on.set()
            reader.join(10)
        store.write(traces[2:])
        leaked = any(c is conn for c in store_module._inherited)
        return repr((store_module.TraceStore(db, create=False).dropped, leaked))

    assert in_child(fork, tmp_path, read_and_write_in_child) == repr((3, False))


class _UnconvertibleTrace(Trace):
    """A trace whose JSON cannot be made (a bug, a value that breaks it)."""

    __slots__ = ()

    def to_dict(self) -> dict[str, Any]:
        msg = "cannot convert this trace"
        raise ValueError(msg)


def with_bad_traces(traces: list[Trace], *bad: int) -> list[Trace]:
    """``traces``, those at the ``bad`` indexes made unconvertible."""
    for index in bad:
        traces[index].__class__ = _UnconvertibleTrace
    return traces


def test_a_trace_the_store_cannot_convert_costs_only_itself(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One trace of a batch whose row cannot be made: the others are
    stored and delivered, only it is counted failed (and lost in the
    store's count), and the failure is logged once however often it recurs.
    """
    from wsgitrace.store import TraceStore

    traces = with_bad_traces(make_traces(6), 1, 4)
    store = TraceStore(tmp_path / "traces.db")
    dispatcher = SinkDispatcher([store])
    with caplog.at_level(logging.ERROR, logger="wsgitrace"):
        for trace in traces[:3]:
            dispatcher.submit(trace)
        assert dispatcher.flush(10)  # one batch, written from this thread
        for trace in traces[3:]:
            dispatcher.submit(trace)
        dispatcher.close(timeout=10)
    assert (dispatcher.delivered, dispatcher.failed, dispatcher.dropped) == (4, 2, 0)
    reader = TraceStore(tmp_path / "traces.db", create=False)
    assert sorted(t.id for t in reader.latest()) == sorted(traces[i].id for i in (0, 2, 3, 5))
    assert reader.dropped == 2
    failures = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == 1
    assert "1 trace(s) not delivered (cannot convert this trace)" in failures[0].getMessage()


def test_otlp_a_trace_that_cannot_become_spans_costs_only_itself(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One trace of a batch that cannot be turned into spans: the others are
    exported and delivered, only it is counted failed, logged once.
    """
    pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from wsgitrace.otlp import OtlpSink

    traces = with_bad_traces(make_traces(6), 0, 4)
    exporter = InMemorySpanExporter()
    dispatcher = SinkDispatcher([OtlpSink(exporter)])
    with caplog.at_level(logging.ERROR, logger="wsgitrace"):
        for trace in traces[:3]:
            dispatcher.submit(trace)
        assert dispatcher.flush(10)
        for trace in traces[3:]:
            dispatcher.submit(trace)
        dispatcher.close(timeout=10)
    assert (dispatcher.delivered, dispatcher.failed, dispatcher.dropped) == (4, 2, 0)
    exported = [
        span.attributes["wsgitrace.id"]
        for span in exporter.get_finished_spans()
        if span.attributes is not None and "wsgitrace.id" in span.attributes
    ]
    assert sorted(exported) == sorted(traces[i].id for i in (1, 2, 3, 5))
    failures = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == 1
    assert "1 trace(s) not delivered (cannot convert this trace)" in failures[0].getMessage()


def test_a_partial_failure_that_refuses_attributes_still_says_what_was_lost() -> None:
    """An exception that takes no ``undelivered`` (its own ``__setattr__``
    refuses it) is wrapped, so only the traces it lost are counted failed.
    """
    from wsgitrace.sinks import _undelivered, partial_failure

    class FrozenError(Exception):
        def __setattr__(self, name: str, value: object) -> None:
            raise AttributeError(name)

    error = FrozenError("frozen")
    failure = partial_failure(error, 2)
    assert failure is not error
    assert failure.__cause__ is error
    assert _undelivered(failure, 5) == 2


def test_a_trace_submitted_after_close_is_counted_failed_not_pending() -> None:
    """A request that finishes after the sinks were closed (at exit, say):
    its trace is never delivered, so it is counted as failed (in the
    endpoint's sink_dropped), not shown as pending for good and never
    counted; a second close or flush does not change that.
    """
    sink = CloseProbeSink("after-close-probe")
    sink.release.set()
    dispatcher = SinkDispatcher([sink])
    first, second, third = make_traces(3)
    dispatcher.submit(first)
    dispatcher.close(timeout=10)
    dispatcher.submit(second)
    assert (dispatcher.pending, dispatcher.failed, dispatcher.dropped) == (0, 1, 0)
    assert dispatcher.flush(1)
    dispatcher.submit(third)
    dispatcher.close(timeout=1)
    assert (dispatcher.pending, dispatcher.failed, dispatcher.dropped) == (0, 2, 0)
    assert (dispatcher.delivered, sink.written, sink.closes, sink.wrong) == (1, 1, 1, [])


def test_a_trace_queued_just_as_close_shuts_the_queue_is_counted_failed() -> None:
    """A submit that passed the queue's check just before close() shut it
    and appended after the sink was closed: that trace is counted as
    failed once the counts or the queue are read, not left queued.
    """
    sink = CloseProbeSink("close-race-probe")
    sink.release.set()
    dispatcher = SinkDispatcher([sink])
    worker = dispatcher._workers[0]
    first, second = make_traces(2)
    dispatcher.submit(first)

    class LateQueue(deque[Trace]):
        def append(self, trace: Trace) -> None:
            dispatcher.close(timeout=10)  # between the submit's check and its append
            super().append(trace)

    worker.queue = LateQueue(worker.queue)
    dispatcher.submit(second)
    assert (dispatcher.pending, dispatcher.failed, dispatcher.dropped) == (0, 1, 0)
    assert (dispatcher.delivered, sink.written, sink.closes, sink.wrong) == (1, 1, 1, [])
