"""Adversarial tests of the two contracts with real servers and real
clients: a traced app must answer byte for byte as the same app untraced
(*transparent*), and nothing wsgitrace does may change a response (*never
breaks the app*); every trace must finish and hold only its own request's
events.

Each app is served twice, untraced and traced, by werkzeug's threaded server
or waitress (in this process) or gunicorn (a subprocess), all on 127.0.0.1;
raw sockets and ``http.client`` send the same bytes to both and the answers
are compared with only the ``Date`` header left out. Every test makes at
most 50 requests per server and every network call has a timeout.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import http.client
import json
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from flask import (
    Flask,
    Response,
    abort,
    g,
    make_response,
    render_template_string,
    request,
    send_file,
    stream_with_context,
)
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.middleware.proxy_fix import ProxyFix

from wsgitrace import Trace, current_trace, span
from wsgitrace.flask import FlaskTrace
from wsgitrace.middleware import internal_error_count

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication

    from .conftest import ServeInThread

TIMEOUT = 10
HERE = Path(__file__).resolve().parent

# -- the app ----------------------------------------------------------------------


class _CloseRaises:
    """A body whose ``close()`` raises after the server sent it all."""

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def __iter__(self) -> Iterator[bytes]:
        return iter([b"closing ", b"body"])

    def close(self) -> None:
        self.log.append("close")
        raise RuntimeError("close failed")


def make_app(*, propagate: bool | None = None, data_file: str | None = None) -> Flask:
    """A Flask app with hooks, error handlers and views that misbehave on
    request (query arguments say which).
    """
    app = Flask("adversarial")
    app.config["PROPAGATE_EXCEPTIONS"] = propagate
    log: list[str] = []
    app.config["TEST_LOG"] = log

    @app.before_request
    def check_before() -> Any:
        what = request.args.get("before")
        if what == "raise":
            raise ValueError("before_request failed")
        if what == "abort":
            abort(418)
        if what == "return":
            return "short-circuited", 202
        g.user = "someone"
        return None

    @app.after_request
    def add_header(response: Response) -> Response:
        what = request.args.get("after")
        if what == "abort":
            abort(409)
        if what == "raise":
            raise KeyError("after_request failed")
        response.headers["X-After"] = "1"
        return response

    @app.teardown_request
    def tear_down(exc: BaseException | None) -> None:
        log.append(f"teardown {request.path} {type(exc).__name__}")
        if request.args.get("teardown") == "raise":
            raise RuntimeError("teardown_request failed")

    @app.errorhandler(418)
    def teapot(e: Exception) -> Any:
        if request.args.get("handler") == "raise":
            raise LookupError("errorhandler failed")
        return "a teapot", 418

    @app.errorhandler(ValueError)
    def value_error(e: Exception) -> Any:
        if request.args.get("handler") == "raise":
            raise LookupError("errorhandler failed")
        return f"handled {e}", 400

    @app.route("/")
    def index() -> str:
        return "hello"

    @app.route("/stream")
    def stream() -> Response:
        count = int(request.args.get("n", 5))
        size = int(request.args.get("size", 10))
        fail_at = int(request.args.get("raise_at", -1))
        tag = request.args.get("tag", "")

        def generate() -> Iterator[bytes]:
            try:
                for i in range(count):
                    if i == fail_at:
                        raise RuntimeError("generator failed mid-body")
                    if i < 8:  # not one per chunk: events per trace are capped
                        with span("chunk", tag=tag):
                            pass
                    # request is usable here only thanks to stream_with_context.
                    yield request.path[-1:].encode() * size
            finally:
                log.append(f"generator closed {tag}")

        return Response(stream_with_context(generate()), mimetype="text/plain")

    @app.route("/close-raises")
    def close_raises() -> Response:
        return Response(_CloseRaises(log), mimetype="text/plain")

    @app.route("/on-close-raises")
    def on_close_raises() -> Response:
        response = Response("on close")

        @response.call_on_close
        def fail() -> None:
            raise RuntimeError("call_on_close failed")

        return response

    @app.route("/file")
    def file() -> Response:
        assert data_file is not None
        return send_file(data_file, conditional=True, etag=True)

    @app.route("/etag")
    def etag() -> Any:
        response = make_response("tagged")
        response.set_etag("abc")
        return response.make_conditional(request)

    @app.route("/echo", methods=["POST", "PUT"])
    def echo() -> Response:
        return Response(request.get_data()[::-1], mimetype="application/octet-stream")

    @app.route("/headers")
    def headers() -> dict[str, int]:
        return {name: len(value) for name, value in request.headers.items()}

    @app.route("/ü/<name>")
    def unicode(name: str) -> str:
        return f"{name}|{request.args.get('q')}|{request.path}"

    @app.route("/raise")
    def fail() -> str:
        raise ZeroDivisionError("view failed")

    @app.route("/abort")
    def teapot_view() -> str:
        abort(418)

    @app.route("/async")
    async def async_view() -> str:
        with span("async", tag=request.args.get("tag", "")):
            await asyncio.sleep(0.001)
        return f"async {request.args.get('tag', '')}"

    @app.route("/favicon.ico")
    def favicon() -> str:
        # Excluded from tracing by default: no trace may be current here.
        log.append(f"favicon current_trace={current_trace()!r}")
        return "icon"

    return app


def gunicorn_app(traced: bool, data_file: str) -> Flask:
    """The app as gunicorn loads it (``test_servers_adversarial:gunicorn_app(...)``)."""
    app = make_app(data_file=data_file)
    if traced:
        FlaskTrace(app, endpoint=True)
    return app


# -- servers and clients ----------------------------------------------------------


@pytest.fixture(name="waitress_server")
def fixture_waitress_server() -> Iterator[Callable[..., int]]:
    """Serve apps with waitress (``threads`` worker threads) in this process;
    returns a function taking the app and giving its port.
    """
    from waitress import wasyncore  # type: ignore[import-untyped]
    from waitress.server import create_server  # type: ignore[import-untyped]

    running: list[tuple[Any, threading.Thread]] = []
    stopping = threading.Event()

    def run(server: Any) -> None:
        try:
            server.run()
        except (OSError, ValueError):
            # Its sockets closed from here while it waits in select().
            if not stopping.is_set():
                raise

    def start(app: WSGIApplication, threads: int = 4) -> int:
        server: Any = create_server(
            # A short select() timeout, so that the loop ends soon after its
            # sockets are closed at teardown.
            app,
            host="127.0.0.1",
            port=0,
            threads=threads,
            asyncore_loop_timeout=0.05,
        )
        thread = threading.Thread(target=run, args=(server,), daemon=True)
        thread.start()
        running.append((server, thread))
        return int(server.effective_port)

    yield start
    stopping.set()
    for server, thread in running:
        server.task_dispatcher.shutdown()
        wasyncore.close_all(server._map)
        thread.join(timeout=TIMEOUT)
        assert not thread.is_alive()


@pytest.fixture(name="serve_with", params=["werkzeug", "waitress"])
def fixture_serve_with(
    request: pytest.FixtureRequest,
    werkzeug_server: ServeInThread,
    waitress_server: Callable[..., int],
) -> Callable[[WSGIApplication], int]:
    """Each test runs once under werkzeug's threaded server, once under waitress."""
    return werkzeug_server if request.param == "werkzeug" else waitress_server


def raw_exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` on a new connection and read until the server closes it;
    the answer without its ``Date`` line (and a mark when the server reset
    the connection or went silent).
    """
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as client:
        client.sendall(data)
        try:
            while chunk := client.recv(65536):
                answer += chunk
        except ConnectionResetError:
            answer += b"<reset>"
        except TimeoutError:
            answer += b"<timeout>"
    return b"\r\n".join(
        line for line in answer.split(b"\r\n") if not line.lower().startswith(b"date:")
    )


def get(
    port: int, path: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, list[tuple[str, str]], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        body = response.read()
        kept = [(k, v) for k, v in response.getheaders() if k.lower() != "date"]
        return response.status, kept, body
    finally:
        connection.close()


def read_then_reset(port: int, path: str, at_least: int) -> int:
    """Read ``at_least`` bytes of a response, then reset the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as client:
        client.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        received = 0
        while received < at_least:
            data = client.recv(65536)
            assert data, "the server closed the connection early"
            received += len(data)
        # Linger 0: close() sends a RST, as a client that goes away does.
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return received


def request_bytes(target: str, *headers: str, body: bytes = b"", method: str = "GET") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", *headers, "Connection: close"]
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body


def seen_from_outside(app: WSGIApplication, seen: list[Trace | None]) -> WSGIApplication:
    """``app`` behind a WSGI middleware that notes the current trace before
    calling it: on a server's thread between requests, there must be none.
    """

    def outside(environ: Any, start_response: Any) -> Any:
        seen.append(current_trace())
        return app(environ, start_response)

    return outside


def settled(ext: FlaskTrace, count: int) -> list[Trace]:
    """The buffer's traces, oldest first, once ``count`` are there and all
    have finished (a collection finishes those whose body was dropped).
    """
    deadline = time.monotonic() + TIMEOUT
    while True:
        gc.collect()
        traces = list(ext.buffer)
        if len(traces) >= count and all(t.finished for t in traces):
            return traces
        if time.monotonic() > deadline:
            pending = [(t.method, t.path, t.query, t.state) for t in traces if not t.finished]
            pytest.fail(f"{len(traces)}/{count} traces, not finished: {pending}")
        time.sleep(0.02)


@pytest.fixture(name="data_file", scope="module")
def fixture_data_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A file larger than any socket buffer, for ``send_file``."""
    path = tmp_path_factory.mktemp("data") / "data.bin"
    path.write_bytes(os.urandom(300_000))
    return str(path)


# -- byte for byte ----------------------------------------------------------------

#: Requests whose answers are compared; each is sent to both apps.
RESPONSES = [
    request_bytes("/"),
    request_bytes("/", method="HEAD"),
    request_bytes("/stream?n=5"),
    request_bytes("/stream?n=5", method="HEAD"),
    request_bytes("/stream?n=5&raise_at=2"),
    request_bytes("/close-raises"),
    request_bytes("/on-close-raises"),
    request_bytes("/file"),
    request_bytes("/file", method="HEAD"),
    request_bytes("/file", "Range: bytes=10-99"),
    request_bytes("/etag", 'If-None-Match: "abc"'),
    request_bytes(
        "/echo", "Transfer-Encoding: chunked", body=b"5\r\nhello\r\n0\r\n\r\n", method="POST"
    ),
    request_bytes(
        "/echo", "Content-Length: 5", "Expect: 100-continue", body=b"hello", method="PUT"
    ),
    request_bytes("/headers", "X-Big: " + "a" * 30_000, *(f"X-H{i}: {i}" for i in range(100))),
    request_bytes("/%C3%BC/%E2%9C%93?q=%E2%9C%93&token=secret"),
    request_bytes("/ü/x?q=é"),  # raw latin-1 bytes in the request line
    request_bytes("/async?tag=a"),
    request_bytes("/nowhere"),
    request_bytes("/", method="OPTIONS"),
    request_bytes("/_trace"),  # the endpoint is off: the app answers
    request_bytes("/favicon.ico"),
]

#: Requests whose hooks, handlers or views fail.
FAILURES = [
    request_bytes("/raise"),
    request_bytes("/abort"),
    request_bytes("/abort?handler=raise"),
    request_bytes("/?before=raise"),
    request_bytes("/?before=raise&handler=raise"),
    request_bytes("/?before=abort"),
    request_bytes("/?before=return"),
    request_bytes("/?after=abort"),
    request_bytes("/?after=raise"),
    request_bytes("/?teardown=raise"),
    request_bytes("/stream?n=3&teardown=raise"),
]


def compare(
    serve_with: Callable[[WSGIApplication], int],
    requests: list[bytes],
    **options: Any,
) -> tuple[FlaskTrace, Flask, Flask]:
    plain = make_app(**options)
    traced = make_app(**options)
    ext = FlaskTrace(traced)
    plain_port = serve_with(plain)
    traced_port = serve_with(traced)
    for data in requests:
        expected = raw_exchange(plain_port, data)
        assert raw_exchange(traced_port, data) == expected, data[:80]
    return ext, plain, traced


def test_responses_are_byte_identical(
    serve_with: Callable[[WSGIApplication], int], data_file: str
) -> None:
    errors = internal_error_count()
    ext, plain, traced = compare(serve_with, RESPONSES, data_file=data_file)
    traces = settled(ext, len(RESPONSES) - 2)  # not /favicon.ico; waitress refuses /headers
    assert internal_error_count() == errors
    assert all(t.warnings is None for t in traces), [(t.path, t.warnings) for t in traces]
    by_target = {(t.method, t.path, t.query): t for t in traces}
    stream = by_target["GET", "/stream", "n=5"]
    assert (stream.status_code, stream.bytes_sent, stream.error) == (200, 50, None)
    assert stream.hooks()[:3] == [
        "before_request:check_before",
        "view:stream",
        "after_request:add_header",
    ]
    failed = by_target["GET", "/stream", "n=5&raise_at=2"]
    assert failed.error is not None
    assert (failed.error["where"], failed.bytes_sent) == ("iteration", 20)
    for path in ("/close-raises", "/on-close-raises"):
        closed = by_target["GET", path, ""]
        assert closed.error is not None
        assert closed.error["where"] == "close"
        assert len(closed.find("close")) == 1
    assert by_target["GET", "/etag", ""].status_code == 304
    # The query is redacted in the trace, the path kept as the server gave it.
    assert ("GET", "/ü/✓".encode().decode("latin-1"), "q=%E2%9C%93&token=[redacted]") in by_target
    # Both apps ran the same code: their logs say the same.
    assert plain.config["TEST_LOG"] == traced.config["TEST_LOG"]
    # The excluded path was served with no trace current.
    assert "favicon current_trace=None" in traced.config["TEST_LOG"]


@pytest.mark.parametrize("propagate", [None, True, False])
def test_failures_are_byte_identical(
    serve_with: Callable[[WSGIApplication], int], propagate: bool | None
) -> None:
    errors = internal_error_count()
    ext, plain, traced = compare(serve_with, FAILURES, propagate=propagate)
    traces = settled(ext, len(FAILURES))
    assert internal_error_count() == errors
    assert plain.config["TEST_LOG"] == traced.config["TEST_LOG"]
    by_query = {(t.path, t.query): t for t in traces}
    raised = by_query["/raise", ""]
    assert raised.error is not None
    assert raised.error["type"] == "builtins.ZeroDivisionError"
    handler = by_query["/abort", "handler=raise"]
    assert "errorhandler:teapot" in handler.hooks()
    torn = by_query["/", "teardown=raise"]
    assert torn.error is not None
    assert torn.error["where"] == "teardown_request"
    assert torn.hooks()[-1] == "teardown_request:tear_down"


# -- keep-alive, concurrency, disconnects ----------------------------------------

KEEP_ALIVE = [
    ("GET", "/?tag=k0"),
    ("HEAD", "/?tag=k1"),
    ("GET", "/stream?n=4&size=3&tag=k2"),
    ("GET", "/etag?tag=k3"),
    ("GET", "/raise?tag=k4"),
    ("GET", "/nowhere?tag=k5"),
    ("GET", "/abort?tag=k6"),
    ("GET", "/?before=return&tag=k7"),
    ("GET", "/async?tag=k8"),
    ("GET", "/favicon.ico"),
]


def test_keep_alive_many_requests_on_one_connection(
    waitress_server: Callable[..., int],
) -> None:
    """Twenty requests on one waitress connection (werkzeug's server closes
    every connection), all served by one worker thread, request after
    request: the same answers, and no trace is left current on the thread
    between requests (where a WSGI middleware outside the app would see it).
    """
    errors = internal_error_count()
    plain = make_app()
    traced = make_app()
    ext = FlaskTrace(traced)
    outside: list[Trace | None] = []
    answers: dict[int, list[Any]] = {}
    ports = [
        waitress_server(plain, threads=1),
        waitress_server(seen_from_outside(traced, outside), threads=1),
    ]
    for port in ports:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        got = answers[port] = []
        reused = 0
        try:
            for _ in range(2):
                for method, path in KEEP_ALIVE:
                    connection.request(method, path, headers={"If-None-Match": '"abc"'})
                    response = connection.getresponse()
                    body = response.read()
                    kept = [(k, v) for k, v in response.getheaders() if k.lower() != "date"]
                    got.append((response.status, kept, body))
                    # Waitress closes after a chunked answer; http.client
                    # then opens the next connection itself.
                    reused += response.will_close is False
        finally:
            connection.close()
        assert reused >= len(KEEP_ALIVE)
    plain_answers, traced_answers = answers.values()
    assert traced_answers == plain_answers
    # Pipelined: seven requests sent at once, answered in turn.
    pipelined = b"".join(
        f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
        for method, target in [
            ("GET", "/?tag=p0"),
            ("HEAD", "/?tag=p1"),
            ("GET", "/raise?tag=p2"),
            ("GET", "/etag?tag=p3"),
            ("GET", "/nowhere?tag=p4"),
            ("GET", "/favicon.ico"),
        ]
    )
    pipelined += request_bytes("/stream?n=3&tag=p5")  # the last: Connection: close
    answer = raw_exchange(ports[0], pipelined)
    assert answer.count(b"HTTP/1.1 ") == 7
    assert raw_exchange(ports[1], pipelined) == answer
    assert outside == [None] * (2 * len(KEEP_ALIVE) + 7)
    count = 2 * (len(KEEP_ALIVE) - 1) + 6
    traces = settled(ext, count)
    assert internal_error_count() == errors
    assert len(traces) == count
    assert len({t.id for t in traces}) == len(traces)
    for trace in traces:
        tag = trace.query.rpartition("tag=")[2]
        # Each trace holds only its own request's spans.
        assert {e.attrs["tag"] for e in trace.find(kind="span")} <= {tag}
    assert "favicon current_trace=None" in traced.config["TEST_LOG"]
    assert plain.config["TEST_LOG"] == traced.config["TEST_LOG"]


def test_concurrent_clients_never_mix_traces(
    serve_with: Callable[[WSGIApplication], int],
) -> None:
    """40 requests from 10 client threads at once (streams, failures, async
    views): every trace finishes, holds its own request's events only, and
    each client got what the untraced app gives.
    """
    errors = internal_error_count()
    app = make_app()
    ext = FlaskTrace(app)
    seen: list[tuple[str, str | None]] = []

    def note_current() -> None:
        trace = current_trace()
        seen.append((request.args.get("tag", ""), None if trace is None else trace.query))

    app.before_request_funcs[None].insert(0, note_current)  # before check_before

    port = serve_with(app)
    kinds = ["/stream?n=6&size=2&", "/raise?", "/async?", "/?before=raise&", "/?"]

    def one(n: int) -> tuple[int, bytes]:
        status, _, body = get(port, f"{kinds[n % len(kinds)]}tag=t{n}")
        return status, body

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        results = list(pool.map(one, range(40)))
    for n, (status, body) in enumerate(results):
        expected = {0: (200, b"m" * 12), 2: (200, f"async t{n}".encode()), 4: (200, b"hello")}
        if n % 5 in expected:
            assert (status, body) == expected[n % 5]
        else:
            assert status in (400, 500)
    traces = settled(ext, 40)
    assert internal_error_count() == errors
    assert len(traces) == 40
    for trace in traces:
        tag = trace.query.rpartition("tag=")[2]
        spans = trace.find(kind="span")
        assert {e.attrs["tag"] for e in spans} <= {tag}
        if trace.path == "/stream":
            assert len(spans) == 6
            assert trace.bytes_sent == 12
        if trace.path == "/async":
            assert len(spans) == 1
        assert trace.hooks()[:2] == ["before_request:note_current", "before_request:check_before"]
    # Inside each request, the current trace is that request's.
    assert sorted(tag for tag, _ in seen) == sorted(f"t{n}" for n in range(40))
    for tag, query in seen:
        assert query is not None
        assert query.rpartition("tag=")[2] == tag


def test_client_disconnects_mid_stream_with_context(
    werkzeug_server: ServeInThread, waitress_server: Callable[..., int]
) -> None:
    """A client that resets the connection in the middle of a streamed
    ``stream_with_context`` response: the generator is closed (its request
    context popped, teardown run) once, the trace finishes with the bytes
    sent so far, and the next request on the same worker thread runs with
    no trace left current.
    """
    errors = internal_error_count()
    app = make_app()
    ext = FlaskTrace(app)
    big = "/stream?n=2000&size=65536&tag="
    outside: list[Trace | None] = []
    app_outside = seen_from_outside(app, outside)
    ports = {
        "werkzeug": werkzeug_server(app_outside),
        "waitress": waitress_server(app_outside, threads=1),
    }
    for name, port in ports.items():
        received = read_then_reset(port, big + name, 300_000)
        assert get(port, "/favicon.ico")[2] == b"icon"
        traces = settled(ext, 1)
        [trace] = [t for t in traces if t.query.endswith(name)]
        assert trace.state == "finished"
        assert trace.status_code == 200
        assert 0 < trace.bytes_sent < 2000 * 65536
        assert received <= trace.bytes_sent + 65536 * 2
        assert len(trace.find("close")) == 1
        assert trace.warnings is None
        # The request's teardown, then stream_with_context's at close().
        assert trace.hooks().count("teardown_request:tear_down") == 2
        assert {e.attrs["tag"] for e in trace.find(kind="span")} == {name}
    log = app.config["TEST_LOG"]
    assert log.count("generator closed werkzeug") == log.count("generator closed waitress") == 1
    assert log.count("favicon current_trace=None") == 2
    assert outside == [None] * 4
    assert internal_error_count() == errors


def test_endpoint_readers_race_requests_in_progress(
    serve_with: Callable[[WSGIApplication], int],
) -> None:
    """Two clients read ``/_trace`` (full listings and single traces, laid
    out while their requests still stream) as eight others make requests:
    every read is valid JSON, every request gets the untraced answer, and
    wsgitrace's own code never fails.
    """
    errors = internal_error_count()
    app = make_app()

    @app.after_request
    def add_cookie(response: Response) -> Response:
        response.set_cookie("session", "s3cret")
        return response

    ext = FlaskTrace(app, endpoint=True, max_events=40)
    port = serve_with(app)
    stop = threading.Event()
    reads: list[int] = []
    problems: list[Any] = []

    def read() -> None:
        while not stop.is_set():
            status, _, body = get(port, "/_trace?full=1&limit=1000")
            try:
                listing = json.loads(body)
                for summary in listing["traces"][:3]:
                    status, _, one = get(port, f"/_trace/{summary['id']}")
                    # A trace evicted meanwhile is a 404, nothing else.
                    assert status in (200, 404), one
                    if status == 200:
                        assert json.loads(one)["id"] == summary["id"]
                        assert "s3cret" not in one.decode()
                reads.append(status)
            except Exception as exc:
                problems.append((exc, body[:200]))

    readers = [threading.Thread(target=read) for _ in range(2)]
    for reader in readers:
        reader.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            paths = [f"/stream?n=30&size=100&tag=r{n}" if n % 2 else "/" for n in range(30)]
            results = list(pool.map(lambda p: get(port, p)[::2], paths))
    finally:
        stop.set()
        for reader in readers:
            reader.join(TIMEOUT)
    assert results == [(200, b"m" * 3000) if n % 2 else (200, b"hello") for n in range(30)]
    assert problems == []
    assert reads
    traces = settled(ext, 30)
    assert len(traces) == 30  # the endpoint's own requests are not traced
    assert internal_error_count() == errors


# -- apps composed with other WSGI code --------------------------------------------


def _composed(traced: bool) -> tuple[WSGIApplication, list[FlaskTrace]]:
    """Two apps behind a DispatcherMiddleware, the first behind ProxyFix
    (set after ``init_app``), the second replaced by a wrapper that calls
    it; each view can call the other app in-process.
    """
    first, second = make_app(), make_app()
    first.name, second.name = "first", "second"
    exts = [FlaskTrace(first), FlaskTrace(second)] if traced else []
    for app, other in ((first, second), (second, first)):

        @app.route("/whoami")
        def whoami(app: Flask = app) -> str:
            with span("whoami", tag=app.name):
                pass
            return f"{app.name} {request.remote_addr} {request.host} {request.script_root}"

        @app.context_processor
        def name_context(app: Flask = app) -> dict[str, str]:
            return {"name": app.name}

        @app.route("/nested")
        def nested(other: Flask = other) -> str:
            with other.test_client() as client:
                inner = client.get("/whoami")
                text = inner.get_data(as_text=True)
                inner.close()
            # The other app's context and template, with no request of its
            # own: its context processor is not this request's hook.
            with other.app_context():
                rendered = render_template_string("{{ name }}")
            return f"nested: {text} {rendered}"

    first.wsgi_app = ProxyFix(first.wsgi_app, x_for=1, x_host=1)  # type: ignore[method-assign]
    inner = second.wsgi_app

    def replaced(environ: Any, start_response: Any) -> Any:
        environ["HTTP_X_REPLACED"] = "1"
        return inner(environ, start_response)

    second.wsgi_app = replaced  # type: ignore[method-assign]
    return DispatcherMiddleware(first, {"/second": second}), exts


def test_dispatcher_proxy_fix_and_nested_apps(
    serve_with: Callable[[WSGIApplication], int],
) -> None:
    errors = internal_error_count()
    plain, _ = _composed(traced=False)
    traced, (first, second) = _composed(traced=True)
    plain_port, traced_port = serve_with(plain), serve_with(traced)
    targets = ["/whoami", "/nested", "/second/whoami", "/second/nested", "/second", "/third"]
    for target in targets:
        data = request_bytes(target, "X-Forwarded-For: 203.0.113.9", "X-Forwarded-Host: ex.com")
        assert raw_exchange(traced_port, data) == raw_exchange(plain_port, data), target
    one = settled(first, 3)
    two = settled(second, 4)
    assert internal_error_count() == errors
    # Each app's traces hold its own requests: the nested one included.
    assert sorted(t.path for t in one) == ["/nested", "/third", "/whoami", "/whoami"]
    assert sorted(t.path for t in two) == ["/", "/nested", "/whoami", "/whoami"]
    for trace in (*one, *two):
        spans = trace.find(kind="span")
        owner = "first" if trace in one else "second"
        assert {e.attrs["tag"] for e in spans} <= {owner}
        if trace.path == "/whoami":
            assert [e.attrs["tag"] for e in spans] == [owner]
            assert trace.hooks()[1] == "view:whoami"
        if trace.path == "/nested":
            assert spans == []
            assert trace.hooks() == [
                "before_request:check_before",
                "view:nested",
                "after_request:add_header",
                "teardown_request:tear_down",
            ]
            # One app context of its own: pushed and popped once.
            names = [e.name for e in trace.find(kind="signal")]
            assert names.count("signal:appcontext-pushed") == 1
            assert names.count("signal:appcontext-popped") == 1


def test_untraced_requests_of_a_traced_app(
    serve_with: Callable[[WSGIApplication], int],
) -> None:
    """Requests a traced app serves untraced run Flask's own methods and
    answer as the untraced app does: sampled out (every other one, by a
    callable), and every one once ``app.wsgi_app`` is replaced after
    ``init_app`` by a function that calls Flask's own ``wsgi_app``
    directly, bypassing the middleware.
    """
    errors = internal_error_count()
    plain = make_app()
    sampled = make_app()
    sampled_ext = FlaskTrace(sampled, sample=lambda environ: "odd" in environ["QUERY_STRING"])
    bypassed = make_app()
    bypassed_ext = FlaskTrace(bypassed)

    def direct(environ: Any, start_response: Any) -> Any:
        return Flask.wsgi_app(bypassed, environ, start_response)

    bypassed.wsgi_app = direct  # type: ignore[method-assign]
    ports = [serve_with(app) for app in (plain, sampled, bypassed)]
    targets = ["/", "/stream?n=3", "/raise", "/abort", "/?after=abort", "/async", "/?before=return"]
    for n, target in enumerate(targets * 2):
        query = f"{'&' if '?' in target else '?'}{'odd' if n % 2 else 'even'}={n}"
        data = request_bytes(target + query)
        expected = raw_exchange(ports[0], data)
        assert [raw_exchange(port, data) for port in ports[1:]] == [expected, expected]
    traces = settled(sampled_ext, len(targets))
    assert len(traces) == len(targets)
    assert all("odd=" in t.query for t in traces)
    assert all(t.hooks()[0] == "before_request:check_before" for t in traces)
    assert len(bypassed_ext.buffer) == 0
    assert plain.config["TEST_LOG"] == sampled.config["TEST_LOG"] == bypassed.config["TEST_LOG"]
    assert internal_error_count() == errors


# -- gunicorn: wsgi.file_wrapper and sendfile -------------------------------------


GUNICORN_REQUESTS = [
    request_bytes("/file"),
    request_bytes("/file", method="HEAD"),
    request_bytes("/file", "Range: bytes=100-199"),
    request_bytes("/file", "Range: bytes=0-9,20-29"),
    request_bytes("/stream?n=5&raise_at=3"),
    request_bytes("/close-raises"),
    request_bytes(
        "/echo", "Transfer-Encoding: chunked", body=b"3\r\nabc\r\n0\r\n\r\n", method="POST"
    ),
    request_bytes("/%C3%BC/x?q=%C3%A9"),
    request_bytes("/?teardown=raise"),
    request_bytes("/async?tag=g"),
]


@pytest.mark.parametrize("worker_class", ["sync", "gthread"])
def test_gunicorn_file_wrapper_and_failures(
    tmp_path: Path,
    data_file: str,
    worker_class: str,
    gunicorn: Callable[..., contextlib.AbstractContextManager[int]],
) -> None:
    """gunicorn sends a ``send_file`` body with sendfile(2) only if it gets
    its own ``wsgi.file_wrapper`` back: the traced app's answers (whole,
    HEAD, ranges, a 304) are the untraced app's, and each trace is finished;
    with threads, also on one keep-alive connection.
    """
    plain = f"test_servers_adversarial:gunicorn_app(False, {data_file!r})"
    traced = f"test_servers_adversarial:gunicorn_app(True, {data_file!r})"
    with (
        gunicorn(
            plain, tmp_path / "plain.log", chdir=HERE, worker_class=worker_class
        ) as plain_port,
        gunicorn(
            traced, tmp_path / "traced.log", chdir=HERE, worker_class=worker_class
        ) as traced_port,
    ):
        if worker_class == "gthread":
            answers = []
            for port in (plain_port, traced_port):
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
                try:
                    for method in ("GET", "HEAD"):
                        for target in ("/file", "/", "/stream?n=3", "/etag", "/raise", "/file"):
                            connection.request(method, target, headers={"If-None-Match": '"abc"'})
                            response = connection.getresponse()
                            body = response.read()
                            kept = [(k, v) for k, v in response.getheaders() if k != "Date"]
                            answers.append((response.status, kept, body, response.will_close))
                finally:
                    connection.close()
            assert answers[:12] == answers[12:]
            assert not any(will_close for *_, will_close in answers)
        _, headers, _ = get(plain_port, "/file")
        etag = dict(headers)["ETag"]
        conditional = request_bytes("/file", f"If-None-Match: {etag}")
        for data in [*GUNICORN_REQUESTS, conditional]:
            expected = raw_exchange(plain_port, data)
            assert raw_exchange(traced_port, data) == expected, data[:60]
        listing = json.loads(get(traced_port, "/_trace?full=1&limit=100")[2])
    traces = {(t["method"], t["path"], t["query"], t["status"]): t for t in listing["traces"]}
    assert all(t["state"] == "finished" for t in traces.values()), traces
    whole = traces["GET", "/file", "", 200]
    # Handed back untouched, so the trace finishes when the app returns.
    assert "file_wrapper" in [e["kind"] for e in whole["events"]]
    assert traces["GET", "/file", "", 304]["bytes"] == 0
    failed = traces["GET", "/stream", "n=5&raise_at=3", 200]
    assert failed["error"]["where"] == "iteration"
    assert traces["GET", "/close-raises", "", 200]["error"]["where"] == "close"


# -- wsgitrace failing inside a request ------------------------------------------


class _OddEndpoint:
    """An endpoint that is not a string (Flask does not insist on one) and
    cannot be made one: naming its view fails inside wsgitrace.
    """

    def __hash__(self) -> int:
        return 7

    def __contains__(self, item: object) -> bool:
        return False  # no blueprint, as request.blueprint asks

    def __str__(self) -> str:
        raise TypeError("no text for this endpoint")


def _odd_endpoint_app() -> Flask:
    app = Flask("odd")

    def current_error() -> str:
        return f"handling {sys.exc_info()[1]!r}"

    def failing() -> str:
        raise ValueError("view failed")

    app.add_url_rule("/current", endpoint=_OddEndpoint(), view_func=current_error)
    app.add_url_rule("/failing", endpoint=_OddEndpoint(), view_func=failing)

    @app.errorhandler(500)
    def context(e: Any) -> tuple[str, int]:
        original = e.original_exception
        return f"{original!r} during {original.__context__!r}", 500

    return app


def test_error_naming_a_hook_is_not_seen_by_the_hook(
    serve_with: Callable[[WSGIApplication], int],
) -> None:
    """When wsgitrace cannot name a view, the view still runs, unrecorded,
    and not inside wsgitrace's ``except`` block: ``sys.exc_info()`` in the
    view and the ``__context__`` of what it raises are what they are
    untraced.
    """
    errors = internal_error_count()
    plain = _odd_endpoint_app()
    traced = _odd_endpoint_app()
    ext = FlaskTrace(traced)
    plain_port, traced_port = serve_with(plain), serve_with(traced)
    for target in ("/current", "/failing"):
        expected = raw_exchange(plain_port, request_bytes(target))
        assert raw_exchange(traced_port, request_bytes(target)) == expected
    assert b"handling None" in raw_exchange(traced_port, request_bytes("/current"))
    assert internal_error_count() > errors  # counted, and logged once
    traces = settled(ext, 3)
    assert all(t.status_code in (200, 500) for t in traces)
    for trace in traces:
        # Named neither for the URL match nor as a view; noted on the trace.
        assert "flask.hook_key" in [e.attrs["where"] for e in trace.find(kind="tracer_error")]
        assert [h for h in trace.hooks() if h.startswith("view:")] == []


# -- when a trace becomes visible --------------------------------------------------


def test_streamed_trace_is_visible_in_progress_then_finished(
    serve_with: Callable[[WSGIApplication], int],
) -> None:
    """While a streamed response waits between chunks, ``/_trace`` already
    shows its trace, in progress, with the bytes sent so far; once the
    server closes the body, it is finished, with its close event.
    """
    app = make_app()
    gate = threading.Event()

    @app.route("/gated")
    def gated() -> Response:
        def generate() -> Iterator[bytes]:
            yield b"first,"
            gate.wait(TIMEOUT)
            yield b"second"

        return Response(stream_with_context(generate()), mimetype="text/plain")

    FlaskTrace(app, endpoint=True)
    port = serve_with(app)
    errors = internal_error_count()
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as client:
        client.sendall(request_bytes("/gated"))
        received = b""
        while b"first," not in received:
            chunk = client.recv(65536)
            assert chunk, received
            received += chunk

        def listed() -> dict[str, Any]:
            listing = json.loads(get(port, "/_trace?full=1")[2])
            [summary] = [t for t in listing["traces"] if t["path"] == "/gated"]
            return summary  # type: ignore[no-any-return]

        during = listed()
        assert (during["state"], during["status"], during["bytes"]) == ("in_progress", 200, 6)
        kinds = [e["kind"] for e in during["events"]]
        assert "close" not in kinds
        assert "view" in kinds
        gate.set()
        while chunk := client.recv(65536):
            received += chunk
    assert received.endswith(b"second\r\n0\r\n\r\n") or received.endswith(b"second")
    deadline = time.monotonic() + TIMEOUT
    while (after := listed())["state"] == "in_progress" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (after["id"], after["state"], after["bytes"]) == (during["id"], "finished", 12)
    assert [e["kind"] for e in after["events"]].count("close") == 1
    assert internal_error_count() == errors


def test_app_failing_after_start_response_keeps_what_it_gave_the_server(
    serve_with: Callable[[WSGIApplication], int],
) -> None:
    """As the README says, status and headers are what the app gave the
    server: an app that started a 200 and then failed before anything was
    sent (a teardown hook raising, a stream failing on its first chunk)
    gets the server's own 500 to the client, and its trace keeps the 200
    with the error that explains the difference.
    """
    app = make_app()
    ext = FlaskTrace(app)
    port = serve_with(app)
    targets = ["/?teardown=raise", "/stream?n=3&raise_at=0", "/stream?n=3&raise_at=1"]
    got = [raw_exchange(port, request_bytes(target))[:12] for target in targets]
    assert got == [b"HTTP/1.1 500", b"HTTP/1.1 500", b"HTTP/1.1 200"]
    traces = settled(ext, 3)
    assert [t.status_code for t in traces] == [200, 200, 200]
    assert [t.error["where"] if t.error else None for t in traces] == [
        "teardown_request",
        "iteration",
        "iteration",
    ]
    assert [t.bytes_sent for t in traces] == [0, 0, 10]


def _sse_events(port: int, count: int, last_event_id: int | None) -> list[tuple[int, str]]:
    """Read ``count`` trace events (cursor, id) from ``/_trace/stream``."""
    headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    events: list[tuple[int, str]] = []
    try:
        connection.request("GET", "/_trace/stream", headers=headers)
        response = connection.getresponse()
        assert response.status == 200
        cursor, kind = None, None
        while len(events) < count:
            line = response.readline().decode().rstrip("\r\n")
            if line.startswith("id: "):
                cursor = int(line[4:])
            elif line.startswith("event: "):
                kind = line[7:]
                assert kind != "end", events
            elif line.startswith("data: ") and kind == "trace":
                assert cursor is not None
                events.append((cursor, json.loads(line[6:])["id"]))
            elif not line:
                cursor, kind = None, None
    finally:
        connection.close()
    return events


def test_long_poll_and_stream_hand_out_each_trace_once_under_load(
    serve_with: Callable[[WSGIApplication], int],
) -> None:
    """While ten clients make 40 requests (streams among them), a long-poll
    walking ``since=<cursor>`` and a Server-Sent Events stream each see
    every trace exactly once, in cursor order, and a stream resumed with
    ``Last-Event-ID`` continues exactly where the first left off.
    """
    app = make_app()
    ext = FlaskTrace(app, endpoint=True)
    port = serve_with(app)
    errors = internal_error_count()
    polled: list[tuple[int, str]] = []
    streamed: list[list[tuple[int, str]]] = []

    def poll() -> None:
        since = 0
        while len(polled) < 40:
            body = json.loads(get(port, f"/_trace?since={since}&wait=5&limit=7")[2])
            assert body["missed"] == 0
            polled.extend((t["cursor"], t["id"]) for t in reversed(body["traces"]))
            since = body["cursor"]

    def stream() -> None:
        streamed.append(_sse_events(port, 20, last_event_id=0))

    watchers = [threading.Thread(target=poll), threading.Thread(target=stream)]
    for watcher in watchers:
        watcher.start()
    time.sleep(0.2)  # both are waiting before the first request
    kinds = ["/stream?n=6&size=2&", "/raise?", "/async?", "/?"]
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        list(pool.map(lambda n: get(port, f"{kinds[n % 4]}tag=t{n}"), range(40)))
    for watcher in watchers:
        watcher.join(TIMEOUT)
    rest = _sse_events(port, 20, last_event_id=streamed[0][-1][0])
    endpoint = ext.middleware.endpoint
    assert endpoint is not None
    endpoint.shutdown()  # ends any stream the server still holds
    traces = settled(ext, 40)
    expected = [(t.cursor, t.id) for t in traces]
    assert polled == expected
    assert streamed[0] + rest == expected
    assert internal_error_count() == errors


# -- the hooks a trace lists are the hooks that ran ---------------------------------


def _blueprint_app(calls: list[str]) -> Flask:
    """Nested blueprints with every kind of hook; each hook appends the name
    the trace should give it to ``calls``.
    """
    from flask import Blueprint, after_this_request, render_template_string

    app = Flask("blueprints")
    parent = Blueprint("parent", __name__, url_prefix="/<lang>")
    child = Blueprint("child", __name__, url_prefix="/child")

    def hook(scaffold: Any, kind: str) -> Callable[..., Any]:
        def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
            prefix = {app: "", parent: "parent.", child: "parent.child."}[scaffold]

            def recorded(*args: Any) -> Any:
                calls.append(f"{kind}:{prefix}{func.__name__}")
                return func(*args)

            recorded.__name__ = func.__name__
            getattr(scaffold, kind)(recorded)
            return func

        return decorate

    @hook(app, "url_value_preprocessor")
    def app_values(endpoint: str, values: dict[str, Any] | None) -> None:
        pass

    @hook(parent, "url_value_preprocessor")
    def pull_lang(endpoint: str, values: dict[str, Any] | None) -> None:
        g.lang = values.pop("lang", None) if values else None

    @hook(parent, "url_defaults")
    def add_lang(endpoint: str, values: dict[str, Any]) -> None:
        values.setdefault("lang", g.get("lang", "en"))

    @hook(app, "before_request")
    def app_before() -> None:
        pass

    @hook(child, "before_request")
    def child_before() -> str | None:
        return "stopped" if request.args.get("stop") else None

    @hook(parent, "after_request")
    def parent_after(response: Response) -> Response:
        return response

    @hook(child, "after_request")
    def child_after(response: Response) -> Response:
        return response

    @hook(child, "teardown_request")
    def child_teardown(exc: BaseException | None) -> None:
        pass

    @hook(app, "teardown_appcontext")
    def app_teardown(exc: BaseException | None) -> None:
        pass

    @hook(child, "context_processor")
    def child_context() -> dict[str, int]:
        return {"y": 2}

    @child.errorhandler(404)
    def child_404(e: Exception) -> tuple[str, int]:
        calls.append("errorhandler:parent.child.child_404")
        return "child 404", 404

    @child.route("/page/<int:n>")
    def page(n: int) -> str:
        calls.append("view:parent.child.page")

        @after_this_request
        def once(response: Response) -> Response:
            calls.append("after_request:once")
            return response

        if n == 404:
            abort(404)
        return render_template_string("{{ y }} {{ url_for('parent.child.page', n=n + 1) }}", n=n)

    parent.register_blueprint(child)
    app.register_blueprint(parent)
    return app


def _same_answers_and_calls(
    serve_with: Callable[[WSGIApplication], int],
    factory: Callable[[list[str]], Flask],
    targets: list[str],
) -> tuple[list[Trace], list[list[str]]]:
    """Serve ``factory``'s app plain and traced, send each of ``targets`` to
    both and check the raw answers and the functions that ran are the same;
    return the traced app's settled traces and, per target, what ran.
    """
    plain_calls: list[str] = []
    calls: list[str] = []
    plain, traced = factory(plain_calls), factory(calls)
    ext = FlaskTrace(traced)
    plain_port, traced_port = serve_with(plain), serve_with(traced)
    ran: list[list[str]] = []
    for target in targets:
        expected = raw_exchange(plain_port, request_bytes(target))
        before = len(calls)
        assert raw_exchange(traced_port, request_bytes(target)) == expected
        ran.append(calls[before:])
    assert plain_calls == calls
    return settled(ext, len(targets)), ran


def test_trace_hooks_are_the_hooks_that_ran(serve_with: Callable[[WSGIApplication], int]) -> None:
    """With nested blueprints, ``after_this_request``, a short-circuiting
    ``before_request``, a blueprint error handler, context processors and
    ``url_for`` in a template, each trace's ``hooks()`` are exactly the
    functions that ran, in order (plus Flask's own default context
    processor), and the answers are the untraced app's.
    """
    errors = internal_error_count()
    targets = ["/en/child/page/1", "/fr/child/page/2?stop=1", "/de/child/page/404", "/en/child/x"]
    traces, ran = _same_answers_and_calls(serve_with, _blueprint_app, targets)
    listed = [[h for h in t.hooks() if "_default_template_ctx_processor" not in h] for t in traces]
    assert listed == ran
    assert "url_defaults:parent.add_lang" in ran[0]
    assert "errorhandler:parent.child.child_404" in ran[2]
    assert internal_error_count() == errors


def _async_hooks_app(calls: list[str]) -> Flask:
    """Every hook, the view and the error handler are coroutines (run by
    asgiref on another thread); the before_request hook records a span.
    """
    app = Flask("async_hooks")

    @app.before_request
    async def before() -> None:
        calls.append("before_request:before")
        g.seen = request.args.get("tag", "")
        with span("in before", tag=g.seen):
            await asyncio.sleep(0)
        if request.args.get("fail") == "before":
            raise ValueError("before")

    @app.after_request
    async def after(response: Response) -> Response:
        calls.append("after_request:after")
        response.headers["X-Seen"] = g.seen
        return response

    @app.teardown_request
    async def teardown(exc: BaseException | None) -> None:
        calls.append("teardown_request:teardown")

    @app.errorhandler(ValueError)
    async def handle(e: ValueError) -> tuple[str, int]:
        calls.append("errorhandler:handle")
        return f"handled {e}", 400

    @app.route("/")
    async def view() -> str:
        calls.append("view:view")
        if request.args.get("fail") == "view":
            raise ValueError("view")
        return "async"

    return app


def test_async_hooks_and_handlers(serve_with: Callable[[WSGIApplication], int]) -> None:
    errors = internal_error_count()
    targets = ["/?tag=a", "/?tag=b&fail=before", "/?tag=c&fail=view"]
    traces, ran = _same_answers_and_calls(serve_with, _async_hooks_app, targets)
    assert [t.hooks() for t in traces] == ran
    for trace, tag in zip(traces, "abc", strict=True):
        # Recorded on asgiref's thread, into this request's trace.
        [event] = trace.find(kind="span")
        assert (event.attrs["tag"], event.thread != trace.thread) == (tag, True)
    assert internal_error_count() == errors


def test_non_ascii_static_path_and_exclude_are_not_traced(
    serve_with: Callable[[WSGIApplication], int], tmp_path: Path
) -> None:
    """The static folder (excluded by default) and an ``exclude`` prefix
    may be non-ASCII: servers give the path as the request's UTF-8 bytes
    read as latin-1 (PEP 3333), and the prefixes still match it.
    """
    (tmp_path / "a.css").write_text("body {}")
    app = Flask("static", static_folder=str(tmp_path), static_url_path="/stätic")

    @app.route("/<path:anything>")
    def anything(anything: str) -> str:
        return anything

    ext = FlaskTrace(app)
    other = Flask("excluded")
    other.add_url_rule("/<path:anything>", view_func=lambda anything: anything)
    other_ext = FlaskTrace(other, exclude=["/prívate/"])
    ports = serve_with(app), serve_with(other)
    assert get(ports[0], "/st%C3%A4tic/a.css")[::2] == (200, b"body {}")
    assert get(ports[1], "/pr%C3%ADvate/x")[::2] == (200, "prívate/x".encode())
    for port in ports:
        assert get(port, "/caf%C3%A9")[::2] == (200, "café".encode())
    assert [t.path for t in settled(ext, 1)] == ["/café".encode().decode("latin-1")]
    assert [t.path for t in settled(other_ext, 1)] == ["/café".encode().decode("latin-1")]
