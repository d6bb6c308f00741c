"""Real servers: ``examples/plain_wsgi.py`` served by gunicorn (a sync worker
in a subprocess) and by werkzeug's threaded server (in this process), hit with
``http.client`` and raw sockets, including a streamed response and a client
that disconnects mid-stream. Every network call has a timeout.
"""

from __future__ import annotations

import gc
import http.client
import json
import socket
import struct
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from wsgitrace import Trace, TraceMiddleware
from wsgitrace.middleware import internal_error_count

if TYPE_CHECKING:
    from .conftest import ServeInThread

TIMEOUT = 10
#: Paths whose responses must be byte-identical with and without tracing.
PATHS = [
    ("GET", "/"),
    ("HEAD", "/"),
    ("GET", "/stream?chunks=50&size=100"),
    ("GET", "/write"),
    ("GET", "/error"),
    ("GET", "/missing"),
]
#: A stream far larger than any socket buffer, so a disconnect stops it.
BIG_STREAM = "/stream?chunks=2000&size=65536"
BIG_STREAM_BYTES = 2000 * 65536

Answer = tuple[int, list[tuple[str, str]], bytes]


def request(port: int, method: str, path: str) -> Answer:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        body = response.read()
        headers = [(k, v) for k, v in response.getheaders() if k.lower() not in ("date",)]
        return response.status, headers, body
    finally:
        connection.close()


def read_then_disconnect(port: int, path: str, at_least: int) -> int:
    """Read ``at_least`` bytes of a response, then reset the connection."""
    client = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    try:
        client.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        received = 0
        while received < at_least:
            data = client.recv(65536)
            assert data, "server closed the connection early"
            received += len(data)
        # Linger 0: close() sends a RST, as a client that goes away does.
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        client.close()
    return received


def listing(port: int, query: str = "full=1&limit=1000") -> dict[str, Any]:
    status, _, body = request(port, "GET", f"/_trace?{query}")
    assert status == 200
    data: dict[str, Any] = json.loads(body)
    return data


# -- gunicorn ---------------------------------------------------------------------


def test_gunicorn_bytes_are_identical_with_and_without_tracing(
    gunicorn_traced: int, gunicorn_plain: int
) -> None:
    before = listing(gunicorn_traced)["cursor"]
    for method, path in PATHS:
        traced = request(gunicorn_traced, method, path)
        plain = request(gunicorn_plain, method, path)
        assert traced == plain, (method, path)
    data = listing(gunicorn_traced)
    # Every request of the app was traced once; the endpoint's own are not.
    assert data["cursor"] - before == len(PATHS)
    assert data["dropped"] == 0


def test_gunicorn_traces_have_status_bytes_and_close(gunicorn_traced: int) -> None:
    status, _, body = request(gunicorn_traced, "GET", "/stream?chunks=7&size=1000&tag=full")
    assert (status, len(body)) == (200, 7000)
    [trace] = [t for t in listing(gunicorn_traced)["traces"] if t["query"].endswith("tag=full")]
    assert (trace["status"], trace["bytes"], trace["state"]) == (200, 7000, "finished")
    kinds = [e["kind"] for e in trace["events"]]
    assert {"request", "app", "start_response", "first_byte", "body", "close", "span"} <= set(kinds)
    [body_event] = [e for e in trace["events"] if e["kind"] == "body"]
    assert body_event["attrs"] == {"chunks": 7, "bytes": 7000}
    assert Trace.from_dict(trace).hooks() == []
    request(gunicorn_traced, "GET", "/error?tag=own")  # this test's own, not another's
    [error] = [t for t in listing(gunicorn_traced)["traces"] if t["query"] == "tag=own"]
    assert error["error"]["where"] == "app"
    assert error["error"]["type"] == "builtins.RuntimeError"


def test_gunicorn_client_disconnect_mid_stream(
    gunicorn_traced: int, wait_for: Callable[..., Any]
) -> None:
    received = read_then_disconnect(gunicorn_traced, BIG_STREAM + "&tag=cut", 200_000)

    def finished() -> dict[str, Any] | None:
        for trace in listing(gunicorn_traced)["traces"]:
            if trace["query"].endswith("tag=cut") and trace["state"] != "in_progress":
                return trace  # type: ignore[no-any-return]
        return None

    trace = wait_for(finished)
    assert trace["state"] == "finished"
    assert trace["status"] == 200
    assert received - 1000 < trace["bytes"] < BIG_STREAM_BYTES
    assert "close" in [e["kind"] for e in trace["events"]]
    assert trace["warnings"] == []


# -- werkzeug ---------------------------------------------------------------------


def test_werkzeug_bytes_are_identical_and_traced(
    plain_wsgi: types.ModuleType, werkzeug_server: ServeInThread, wait_for: Callable[..., Any]
) -> None:
    errors = internal_error_count()
    middleware = TraceMiddleware(plain_wsgi.app)
    traced_port = werkzeug_server(middleware)
    plain_port = werkzeug_server(plain_wsgi.app)
    for method, path in PATHS:
        assert request(traced_port, method, path) == request(plain_port, method, path)
    buffer = middleware.buffer
    assert buffer.cursor == len(PATHS)
    traces = buffer.since(0)
    assert [(t.method, t.path, t.status_code) for t in traces] == [
        ("GET", "/", 200),
        ("HEAD", "/", 200),
        ("GET", "/stream", 200),
        ("GET", "/write", 200),
        ("GET", "/error", None),
        ("GET", "/missing", 404),
    ]
    # The server closes each body just after the client got the response.
    wait_for(lambda: gc.collect() >= 0 and all(t.finished for t in traces))
    assert [t.state for t in traces if t.method != "HEAD"] == ["finished"] * (len(PATHS) - 1)
    # werkzeug's server skips close() now and then for a HEAD whose client has
    # already hung up (its discard-the-rest read fails first); the trace then
    # shows the body as unclosed, with no close event, rather than hanging.
    [head] = [t for t in traces if t.method == "HEAD"]
    assert (head.state, len(head.find("close"))) in (("finished", 1), ("unclosed", 0))
    stream = traces[2]
    assert (stream.bytes_sent, stream.chunks) == (5000, 50)
    [close] = stream.find("close")
    assert stream.end_ns == stream.start_ns + close.end_ns
    assert traces[3].bytes_sent == len(b"written, then returned\n")
    assert traces[4].error is not None
    assert traces[4].error["where"] == "app"
    assert internal_error_count() == errors


def test_werkzeug_client_disconnect_mid_stream(
    plain_wsgi: types.ModuleType,
    werkzeug_server: ServeInThread,
    wait_for: Callable[..., Any],
) -> None:
    errors = internal_error_count()
    middleware = TraceMiddleware(plain_wsgi.app)
    port = werkzeug_server(middleware)
    received = read_then_disconnect(port, BIG_STREAM, 200_000)

    def finished() -> Trace | None:
        last = middleware.buffer.last
        return last if last is not None and last.finished else None

    trace = wait_for(finished)
    assert middleware.buffer.cursor == 1
    assert trace.state == "finished"
    assert trace.status == "200 OK"
    assert received - 1000 < trace.bytes_sent < BIG_STREAM_BYTES
    assert len(trace.find("close")) == 1
    assert trace.warnings is None
    assert trace.error is None
    assert internal_error_count() == errors


def test_werkzeug_thread_left_running_by_the_app_leaves_finished_traces_alone(
    werkzeug_server: ServeInThread, wait_for: Callable[..., Any]
) -> None:
    """Concurrent requests whose app starts a thread (in a copy of the
    request's contextvars) that records spans while the request is served
    and after it finished: each trace holds its own request's spans only;
    once finished (counted against the byte cap, handed to the sinks) it
    no longer grows, the later spans are counted as dropped, and the
    buffer's bytes are exactly what its traces hold.
    """
    import contextvars
    import threading

    from wsgitrace import span

    requests = 24
    finished = threading.Barrier(requests + 1, timeout=TIMEOUT)
    recorded: list[int] = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        tag = environ["PATH_INFO"]

        def work() -> None:
            with span(f"during {tag}"):
                pass
            finished.wait()  # every response has been closed
            for _ in range(10):
                with span(f"after {tag}"):
                    pass
            recorded.append(1)

        thread = threading.Thread(target=contextvars.copy_context().run, args=(work,))
        thread.start()
        wait_for(lambda: current_spans() >= 1)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [tag.encode()]

    def current_spans() -> int:
        from wsgitrace import current_trace

        trace = current_trace()
        return 0 if trace is None else len(trace.find(kind="span"))

    errors = internal_error_count()
    middleware = TraceMiddleware(app, max_traces=requests)
    port = werkzeug_server(middleware)
    clients = [
        threading.Thread(target=request, args=(port, "GET", f"/{n}")) for n in range(requests)
    ]
    for client in clients:
        client.start()
    for client in clients:
        client.join(TIMEOUT)
    buffer = middleware.buffer
    traces = wait_for(
        lambda: len(buffer) == requests and all(t.finished for t in buffer) and buffer.latest()
    )
    before = {t.id: [e.to_dict() for e in t.events] for t in traces}
    size = buffer.bytes
    assert size == sum(t._estimate_size() for t in traces)
    finished.wait()
    wait_for(lambda: len(recorded) == requests)

    for trace in traces:
        assert [e.name for e in trace.find(kind="span")] == [f"during {trace.path}"]
        assert [e.to_dict() for e in trace.events] == before[trace.id]
        assert trace.dropped_events == 10
    assert buffer.bytes == size == sum(t._estimate_size() for t in traces)
    assert internal_error_count() == errors
