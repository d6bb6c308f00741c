"""TraceMiddleware at the WSGI level: PEP 3333 transparency (also under
``wsgiref.validate`` and werkzeug's ``LintMiddleware``), what a trace records,
protocol warnings, fault isolation, concurrency and caps.
"""

from __future__ import annotations

import gc
import io
import itertools
import logging
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any
from wsgiref.validate import validator

import pytest
from werkzeug.middleware.lint import LintMiddleware

from wsgitrace import TraceBuffer, TraceMiddleware, current_trace, span
from wsgitrace import _internal as internal_module
from wsgitrace.middleware import internal_error_count
from wsgitrace.redact import REDACTED, Redactor
from wsgitrace.trace import TRUNCATION_MARKER, HeaderLayout, Trace

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

    from .conftest import Exchanger, FakeClock, MakeEnviron

TEXT = [("Content-Type", "text/plain")]
MS = 1_000_000
MISMATCH = "Content-Length mismatch: header says 10, the app's body has 5 bytes"


class AppError(Exception):
    """Raised by dummy_app on purpose."""


def _fail(environ: WSGIEnvironment, message: str) -> AppError:
    exc = AppError(message)
    environ.get("test.raised", []).append(exc)
    return exc


class ClosingBody:
    """An iterable with ``close()``, like a pooled or file-backed response."""

    def __init__(
        self,
        chunks: list[bytes],
        log: list[Any],
        fail_iter: AppError | None = None,
        fail_close: AppError | None = None,
    ) -> None:
        self.chunks = chunks
        self.log = log
        self.fail_iter = fail_iter
        self.fail_close = fail_close

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.chunks:
            self.log.append("iter")
            yield chunk
            if self.fail_iter is not None:
                raise self.fail_iter

    def close(self) -> None:
        self.log.append("close")
        if self.fail_close is not None:
            raise self.fail_close


def lazy_body(start_response: StartResponse, log: list[Any]) -> Iterator[bytes]:
    log.append("start_response")
    start_response("200 OK", TEXT)
    yield b"lazy-"
    yield b"body"


def failing_body(environ: WSGIEnvironment, start_response: StartResponse) -> Iterator[bytes]:
    start_response("200 OK", TEXT)
    yield b"partial"
    raise _fail(environ, "iteration failed")


def late_error_body(environ: WSGIEnvironment, start_response: StartResponse) -> Iterator[bytes]:
    start_response("200 OK", TEXT)
    yield b"partial"
    try:
        raise _fail(environ, "late failure")
    except AppError:
        start_response("500 Internal Server Error", TEXT, sys.exc_info())
    yield b"never sent"


def infinite_body(start_response: StartResponse, log: list[Any]) -> Iterator[bytes]:
    start_response("200 OK", TEXT)
    try:
        while True:
            yield b"tick"
    except GeneratorExit:
        log.append("generator-exit")
        raise


def timed_body(clock: FakeClock) -> Iterator[bytes]:
    clock.advance(3 * MS)
    yield b"ab"
    clock.advance(1 * MS)
    yield b"cd"
    clock.advance(1 * MS)


def early_body(start_response: StartResponse) -> Iterator[bytes]:
    yield b""
    start_response("200 OK", TEXT)
    yield b"late start"


def counted_chunks(count: int) -> Iterator[bytes]:
    for _ in range(count):
        yield b"x"


def traced_path_body(path: str) -> Iterator[bytes]:
    trace = current_trace()
    assert trace is not None
    assert path.startswith(trace.path.removesuffix(TRUNCATION_MARKER))
    with span(path, step="body"):
        yield path.encode()


def dummy_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    log = environ.get("test.log", [])
    if path == "/":
        start_response("200 OK", [*TEXT, ("Content-Length", "5")])
        return [b"hello"]
    if path == "/lazy":
        return lazy_body(start_response, log)
    if path == "/write":
        write = start_response("200 OK", TEXT)
        write(b"written-")
        return [b"returned"]
    if path == "/closing":
        start_response("200 OK", TEXT)
        return ClosingBody([b"a", b"b", b"c"], log)
    if path == "/closing-fail":
        start_response("200 OK", TEXT)
        return ClosingBody([b"a", b"b"], log, fail_iter=_fail(environ, "chunk failed"))
    if path == "/raise":
        raise _fail(environ, "app failed")
    if path == "/raise-iter":
        return failing_body(environ, start_response)
    if path == "/raise-close":
        start_response("200 OK", TEXT)
        return ClosingBody([b"body"], log, fail_close=_fail(environ, "close failed"))
    if path == "/exc-info":
        start_response("200 OK", TEXT)
        try:
            raise _fail(environ, "handled")
        except AppError:
            start_response("500 Internal Server Error", TEXT, sys.exc_info())
        return [b"error page"]
    if path == "/exc-info-sent":
        return late_error_body(environ, start_response)
    if path == "/file":
        start_response("200 OK", TEXT)
        body = environ["wsgi.file_wrapper"](io.BytesIO(b"file-body"), 4)
        environ.get("test.returned", []).append(body)
        return body  # type: ignore[no-any-return]
    if path == "/empty":
        start_response("200 OK", [*TEXT, ("Content-Length", "0")])
        return []
    if path == "/no-content":
        start_response("204 No Content", [("Content-Length", "0")])
        return []
    if path == "/infinite":
        return infinite_body(start_response, log)
    if path == "/timed":
        clock: FakeClock = environ["test.clock"]
        clock.advance(2 * MS)
        start_response("200 OK", TEXT)
        return timed_body(clock)
    if path == "/mismatch":
        start_response("200 OK", [*TEXT, ("Content-Length", "10")])
        return [b"short"]
    if path == "/head-empty":
        start_response("200 OK", [*TEXT, ("Content-Length", "5")])
        return [] if environ["REQUEST_METHOD"] == "HEAD" else [b"hello"]
    if path == "/twice":
        start_response("200 OK", TEXT)
        start_response("201 Created", TEXT)
        return [b"x"]
    if path == "/early":
        return early_body(start_response)
    if path == "/chunks":
        start_response("200 OK", TEXT)
        return counted_chunks(int(environ["QUERY_STRING"]))
    if path == "/writes":
        write = start_response("200 OK", TEXT)
        for _ in range(int(environ["QUERY_STRING"])):
            write(b"x")
        return []
    if path == "/big-headers":
        start_response("200 OK", [*TEXT, *((f"X-H{i}", "v" * 2000) for i in range(1000))])
        return [b"ok"]
    if path.startswith("/c/"):
        start_response("200 OK", TEXT)
        return traced_path_body(path)
    raise LookupError(path)


def ignore_start_response(
    status: str, headers: list[tuple[str, str]], exc_info: Any = None
) -> Callable[[bytes], object]:
    return len


#: Routes that follow PEP 3333 (no validator or linter complains).
COMPLIANT = [
    ("GET", "/"),
    ("HEAD", "/"),
    ("GET", "/lazy"),
    ("GET", "/write"),
    ("GET", "/closing"),
    ("GET", "/closing-fail"),
    ("GET", "/raise"),
    ("GET", "/raise-iter"),
    ("GET", "/raise-close"),
    ("GET", "/exc-info"),
    ("GET", "/exc-info-sent"),
    ("GET", "/file"),
    ("GET", "/empty"),
    ("GET", "/no-content"),
]

WRAPPERS: dict[str, Callable[[WSGIApplication], WSGIApplication]] = {
    "bare": lambda app: app,
    "validator": validator,
    "lint": LintMiddleware,
}


# -- transparency ---------------------------------------------------------------


#: Every pair of checkers around the middleware, except werkzeug's linter
#: outside wsgiref's validator: the linter's ``wsgi.input`` wrapper has no
#: ``readlines``, which the validator requires (with or without wsgitrace).
CHECKERS = [
    (outer, inner)
    for outer in WRAPPERS
    for inner in WRAPPERS
    if (outer, inner) != ("lint", "validator")
]


@pytest.mark.parametrize(("outer", "inner"), CHECKERS)
@pytest.mark.parametrize(("method", "path"), COMPLIANT)
def test_transparent_between_validators(
    exchange: Exchanger, method: str, path: str, outer: str, inner: str
) -> None:
    wrap_outer, wrap_inner = WRAPPERS[outer], WRAPPERS[inner]
    with warnings.catch_warnings(record=True) as caught:
        # Recorded rather than raised: the linter swallows errors in __del__.
        warnings.simplefilter("always")
        untraced = exchange(wrap_outer(wrap_inner(dummy_app)), path, method)
        middleware = TraceMiddleware(wrap_inner(dummy_app))
        traced = exchange(wrap_outer(middleware), path, method)
        gc.collect()
    assert [str(w.message) for w in caught] == []
    assert traced.response.outcome() == untraced.response.outcome()
    assert traced.log == untraced.log
    # The only errors are the app's own: no validator assertion, no lint warning.
    for run in (untraced, traced):
        assert run.response.error is None or isinstance(run.response.error, AppError)
    if traced.response.error is not None:
        assert any(traced.response.error is exc for exc in traced.raised)
    trace = middleware.buffer.last
    assert trace is not None
    assert trace.finished
    assert middleware.buffer.cursor == 1


def test_lazy_body_is_not_started_before_iteration(make_environ: MakeEnviron) -> None:
    middleware = TraceMiddleware(dummy_app)
    log: list[Any] = []
    statuses: list[str] = []

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Callable[[bytes], int]:
        statuses.append(status)
        return len

    body = middleware(make_environ("/lazy", **{"test.log": log}), start_response)
    trace = middleware.buffer.last
    assert trace is not None
    assert (log, statuses, trace.state, trace.status) == ([], [], "in_progress", None)
    iterator = iter(body)
    assert (log, statuses) == ([], [])
    assert next(iterator) == b"lazy-"
    assert (log, statuses, trace.status) == (["start_response"], ["200 OK"], "200 OK")
    assert list(iterator) == [b"body"]
    assert trace.state == "in_progress"
    body.close()  # type: ignore[attr-defined]
    assert trace.state == "finished"
    assert trace.bytes_sent == 9


def test_exc_info_before_headers_sent_replaces_the_status(exchange: Exchanger) -> None:
    middleware = TraceMiddleware(dummy_app)
    sent = exchange(middleware, "/exc-info")
    assert (sent.response.status, sent.response.body) == (
        "500 Internal Server Error",
        b"error page",
    )
    trace = middleware.buffer.last
    assert trace is not None
    assert trace.status == "500 Internal Server Error"
    events = trace.find("start_response")
    assert [bool(e.attrs.get("exc_info")) for e in events] == [False, True]
    assert trace.warnings is None


@pytest.mark.parametrize("capture_headers", [True, False])
def test_exc_info_headers_without_content_length_drop_the_first_one(
    exchange: Exchanger, capture_headers: bool
) -> None:
    """The Content-Length of a response replaced by start_response(...,
    exc_info) does not outlive it: no false mismatch warning."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        start_response("200 OK", [("Content-Length", "5")])
        try:
            raise _fail(environ, "handled")
        except AppError:
            start_response("500 Internal Server Error", TEXT, sys.exc_info())
        return [b"error page"]

    middleware = TraceMiddleware(app, capture_headers=capture_headers)
    sent = exchange(middleware, "/")
    assert sent.response.body == b"error page"
    trace = middleware.buffer.last
    assert trace is not None
    assert trace.content_length is None
    assert trace.warnings is None


def test_exc_info_after_headers_sent_reraises_and_keeps_the_sent_status(
    exchange: Exchanger,
) -> None:
    middleware = TraceMiddleware(dummy_app)
    sent = exchange(middleware, "/exc-info-sent")
    [exc] = sent.raised
    assert sent.response.error is exc
    assert (sent.response.status, sent.response.body) == ("200 OK", b"partial")
    trace = middleware.buffer.last
    assert trace is not None
    assert trace.error is not None
    # The server refused the new status: the trace reports what was sent.
    assert trace.status == "200 OK"
    assert trace.error["where"] == "iteration"
    assert trace.error["message"] == "late failure"
    assert [bool(e.attrs.get("exc_info")) for e in trace.find("start_response")] == [False, True]


def test_write_callable_is_recorded(exchange: Exchanger, clock: FakeClock) -> None:
    middleware = TraceMiddleware(dummy_app, clock=clock)
    sent = exchange(middleware, "/write")
    assert sent.response.chunks == [b"written-", b"returned"]
    trace = middleware.buffer.last
    assert trace is not None
    assert trace.bytes_sent == 16
    [write] = trace.find("write")
    assert write.attrs == {"bytes": 8}
    assert [e.kind for e in trace.events if e.kind in ("write", "first_byte")] == [
        "first_byte",
        "write",
    ]


def test_first_byte_is_the_write_when_it_comes_before_the_body(
    exchange: Exchanger, clock: FakeClock
) -> None:
    """A ``write()`` sent the first bytes: the body's first chunk, later,
    does not move ``first_byte`` (nor the time to first byte) onto itself.
    """

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        clock.advance(1 * MS)
        start_response("200 OK", TEXT)(b"written-")
        clock.advance(4 * MS)
        return [b"returned"]

    middleware = TraceMiddleware(app, clock=clock)
    exchange(middleware)
    trace = middleware.buffer.last
    assert trace is not None
    [write] = trace.find("write")
    [first_byte] = trace.find("first_byte")
    assert first_byte.start_ns == write.start_ns
    assert trace.ttfb_ms == 1.0


def test_a_write_after_close_leaves_the_finished_trace_alone(exchange: Exchanger) -> None:
    """A write() made after the response was closed (by a thread the app
    left running) still reaches the server, but does not change the trace,
    which was already published, counted and handed to the sinks.
    """
    kept: list[Callable[[bytes], object]] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        kept.append(start_response("200 OK", [("Content-Length", "2")]))
        return [b"ok"]

    middleware = TraceMiddleware(app)
    sent = exchange(middleware)
    trace = middleware.buffer.last
    assert trace is not None
    assert trace.finished
    before = trace.to_dict()
    kept[0](b"late")
    assert sent.response.chunks == [b"ok", b"late"]
    assert trace.to_dict() == before
    assert not trace.find("write")


def test_close_is_called_once_after_full_iteration(exchange: Exchanger) -> None:
    middleware = TraceMiddleware(dummy_app)
    sent = exchange(middleware, "/closing")
    assert sent.log == ["iter", "iter", "iter", "close"]
    trace = middleware.buffer.last
    assert trace is not None
    assert len(trace.find("close")) == 1
    assert trace.state == "finished"


def test_a_finished_trace_keeps_its_times_packed(exchange: Exchanger) -> None:
    """Retained memory: once closed, the trace's timestamps are int64s in
    one array, not an int object each.
    """
    from array import array

    middleware = TraceMiddleware(dummy_app)
    exchange(middleware, "/closing")
    trace = middleware.buffer.last
    assert trace is not None
    assert trace.finished
    assert isinstance(trace._times, array)
    assert {"request", "body", "close"} <= {e.kind for e in trace.events}


def test_close_is_called_once_after_an_iteration_error(exchange: Exchanger) -> None:
    middleware = TraceMiddleware(dummy_app)
    sent = exchange(middleware, "/closing-fail")
    assert sent.response.error is sent.raised[0]
    assert sent.log == ["iter", "close"]
    trace = middleware.buffer.last
    assert trace is not None
    assert trace.error is not None
    assert trace.error["where"] == "iteration"
    assert len(trace.find("close")) == 1


def test_request_lasts_until_close_after_an_iteration_error(
    exchange: Exchanger, clock: FakeClock
) -> None:
    clock.step = 1000
    middleware = TraceMiddleware(dummy_app, clock=clock)
    exchange(middleware, "/closing-fail")
    trace = middleware.buffer.last
    assert trace is not None
    [request] = trace.find("request")
    [error] = trace.find("error")
    [close] = trace.find("close")
    assert error.start_ns < close.start_ns
    assert request.end_ns == close.end_ns == trace.duration_ns


@pytest.mark.parametrize("chunks", [0, 1, 2])
def test_close_is_called_once_when_the_server_stops_early(exchange: Exchanger, chunks: int) -> None:
    middleware = TraceMiddleware(dummy_app)
    sent = exchange(middleware, "/closing", max_chunks=chunks)
    assert sent.log == ["iter"] * chunks + ["close"]
    trace = middleware.buffer.last
    assert trace is not None
    assert trace.state == "finished"
    assert (trace.chunks, trace.bytes_sent) == (chunks, chunks)
    assert len(trace.find("close")) == 1
    assert trace.warnings is None


def test_client_disconnect_closes_generator_with_generator_exit(exchange: Exchanger) -> None:
    middleware = TraceMiddleware(dummy_app)
    sent = exchange(middleware, "/infinite", max_chunks=3)
    assert sent.response.body == b"tick" * 3
    assert sent.log == ["generator-exit"]
    trace = middleware.buffer.last
    assert trace is not None
    assert trace.state == "finished"
    assert trace.error is None
    assert trace.bytes_sent == 12
    [body] = trace.find("body")
    assert body.attrs == {"chunks": 3, "bytes": 12}


def test_file_wrapper_is_returned_untouched(make_environ: MakeEnviron) -> None:
    middleware = TraceMiddleware(dummy_app)
    returned: list[Any] = []
    environ = make_environ("/file", **{"test.returned": returned})
    body = middleware(environ, ignore_start_response)
    assert body is returned[0]
    trace = middleware.buffer.last
    assert trace is not None
    assert trace.state == "finished"
    assert sorted(e.kind for e in trace.events) == [
        "app",
        "file_wrapper",
        "request",
        "start_response",
    ]
    assert trace.end_ns == trace.find("file_wrapper")[0].start_ns + trace.start_ns
    assert b"".join(body) == b"file-body"


def test_single_element_list_keeps_len(make_environ: MakeEnviron) -> None:
    middleware = TraceMiddleware(dummy_app)
    body = middleware(make_environ("/"), ignore_start_response)
    assert len(body) == 1  # type: ignore[arg-type]
    assert list(body) == [b"hello"]
    body.close()  # type: ignore[attr-defined]


def test_any_body_class_keeps_its_len_and_is_not_kept_alive(make_environ: MakeEnviron) -> None:
    """``__len__`` inherited from a base class is kept, a class whose
    metaclass makes it unhashable is traced like any other, and nothing keeps
    a body class (which may close over an app) alive.
    """
    import weakref

    class Unhashable(type):
        def __eq__(cls, other: object) -> bool:
            return cls is other

        __hash__ = None  # type: ignore[assignment]

    class Sized:
        def __len__(self) -> int:
            return 1

    def make_body_class() -> type:
        class Body(Sized, metaclass=Unhashable):
            def __iter__(self) -> Iterator[bytes]:
                return iter([b"body"])

        return Body

    classes = [make_body_class()]

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", TEXT)
        return classes[0]()  # type: ignore[no-any-return]

    middleware = TraceMiddleware(app)
    body = middleware(make_environ("/"), ignore_start_response)
    assert len(body) == 1  # type: ignore[arg-type]
    assert list(body) == [b"body"]
    body.close()  # type: ignore[attr-defined]
    trace = middleware.buffer.last
    assert trace is not None
    assert (trace.chunks, trace.bytes_sent, trace.state) == (1, 4, "finished")
    assert not trace.find("tracer_error")
    gone = weakref.ref(classes.pop())
    del body
    gc.collect()
    assert gone() is None
    assert middleware.buffer.last is trace  # the trace is still kept


def test_body_without_len_gets_no_len(make_environ: MakeEnviron) -> None:
    middleware = TraceMiddleware(dummy_app)
    body = middleware(make_environ("/lazy"), ignore_start_response)
    assert not hasattr(body, "__len__")
    with pytest.raises(TypeError):
        len(body)  # type: ignore[arg-type]
    body.close()  # type: ignore[attr-defined]


def test_body_driven_by_next_without_iter_is_recorded(make_environ: MakeEnviron) -> None:
    """A caller that calls next() on the body without iter() gets the same
    chunks; they are recorded, and the trace is current only while the app
    produces one."""
    middleware = TraceMiddleware(dummy_app)
    body = middleware(make_environ("/c/next"), ignore_start_response)
    trace = middleware.buffer.last
    assert trace is not None
    # traced_path_body asserts it sees its trace and opens a span across its yield.
    assert next(body) == b"/c/next"  # type: ignore[call-overload]
    assert current_trace() is None
    assert (trace.chunks, trace.bytes_sent, trace.find("span")) == (1, 7, [])
    with pytest.raises(StopIteration):
        next(body)  # type: ignore[call-overload]
    [user_span] = trace.find("span")
    assert (user_span.name, dict(user_span.attrs)) == ("/c/next", {"step": "body"})
    body.close()  # type: ignore[attr-defined]
    assert trace.state == "finished"
    assert [e.attrs for e in trace.find("body")] == [{"chunks": 1, "bytes": 7}]


@pytest.mark.parametrize("driven_by", ["server", "next"])
def test_trace_is_current_whenever_the_app_produces_a_chunk(
    exchange: Exchanger, make_environ: MakeEnviron, driven_by: str
) -> None:
    """Resumed for each chunk and for its end, a generator body sees its
    trace; the code iterating it never does."""
    seen: list[Trace | None] = []

    def generate() -> Iterator[bytes]:
        for _ in range(3):
            seen.append(current_trace())
            yield b"x"
            assert current_trace() is seen[0]
        seen.append(current_trace())

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", TEXT)
        return generate()

    middleware = TraceMiddleware(app)
    if driven_by == "server":
        assert exchange(middleware, "/").response.body == b"xxx"
    else:
        body = middleware(make_environ("/"), ignore_start_response)
        for _ in range(3):
            assert next(body) == b"x"  # type: ignore[call-overload]
            assert current_trace() is None
        with pytest.raises(StopIteration):
            next(body)  # type: ignore[call-overload]
        body.close()  # type: ignore[attr-defined]
    trace = middleware.buffer.last
    assert trace is not None
    assert seen == [trace] * 4
    assert current_trace() is None
    assert (trace.state, trace.chunks, trace.error) == ("finished", 3, None)


def test_body_exhausted_by_next_is_checked_against_its_content_length(
    make_environ: MakeEnviron,
) -> None:
    """Exhaustion seen through next() counts as a full body for the check."""
    middleware = TraceMiddleware(dummy_app)
    body = middleware(make_environ("/mismatch"), ignore_start_response)
    assert next(body) == b"short"  # type: ignore[call-overload]
    with pytest.raises(StopIteration):
        next(body)  # type: ignore[call-overload]
    body.close()  # type: ignore[attr-defined]
    trace = middleware.buffer.last
    assert trace is not None
    assert trace.warnings == [MISMATCH]


def test_head_with_content_length_and_no_body_is_not_a_mismatch(exchange: Exchanger) -> None:
    middleware = TraceMiddleware(dummy_app)
    sent = exchange(middleware, "/head-empty", "HEAD")
    assert (sent.response.status, sent.response.body) == ("200 OK", b"")
    trace = middleware.buffer.last
    assert trace is not None
    assert (trace.method, trace.content_length, trace.bytes_sent) == ("HEAD", 5, 0)
    assert trace.warnings is None


def test_empty_body(exchange: Exchanger) -> None:
    middleware = TraceMiddleware(dummy_app)
    exchange(middleware, "/empty")
    trace = middleware.buffer.last
    assert trace is not None
    assert trace.state == "finished"
    assert (trace.bytes_sent, trace.chunks, trace.ttfb_ms) == (0, 0, None)
    assert trace.find("first_byte") == []
    assert [e.attrs for e in trace.find("body")] == [{"chunks": 0, "bytes": 0}]
    assert trace.warnings is None


def _frames(exc: BaseException) -> list[tuple[str, int | None, str]]:
    return [(f.filename, f.lineno, f.name) for f in traceback.extract_tb(exc.__traceback__)]


@pytest.mark.parametrize(
    ("path", "app_frame", "where"),
    [
        ("/raise", "dummy_app", "app"),
        ("/raise-iter", "failing_body", "iteration"),
        ("/raise-close", "close", "close"),
    ],
)
def test_app_exceptions_are_reraised_unchanged(
    exchange: Exchanger, path: str, app_frame: str, where: str
) -> None:
    untraced = exchange(dummy_app, path)
    middleware = TraceMiddleware(dummy_app)
    traced = exchange(middleware, path)
    [exc] = traced.raised
    assert traced.response.error is exc
    frames = _frames(exc)
    assert app_frame in [name for _, _, name in frames]
    # The app's frames are all there; only wsgitrace's own wrapper frames are added.
    ours = [f for f in frames if "wsgitrace" not in f[0].replace("test_", "")]
    assert ours == _frames(untraced.raised[0])
    trace = middleware.buffer.last
    assert trace is not None
    assert trace.error is not None
    assert trace.finished
    assert trace.error["type"].endswith("AppError")
    assert trace.error["where"] == where
    assert app_frame in trace.error["traceback"]
    assert [e.attrs["where"] for e in trace.find("error")] == [where]


def test_wsgi_input_is_never_read(exchange: Exchanger) -> None:
    middleware = TraceMiddleware(dummy_app)
    sent = exchange(
        middleware,
        "/",
        "POST",
        headers={"Content-Type": "application/x-www-form-urlencoded", "Content-Length": "9"},
    )
    assert (sent.response.status, sent.response.error) == ("200 OK", None)
    trace = middleware.buffer.last
    assert trace is not None
    assert ("Content-Length", "9") in zip(
        trace.request_headers[::2], trace.request_headers[1::2], strict=True
    )


def test_environ_is_only_touched_under_its_namespace(make_environ: MakeEnviron) -> None:
    middleware = TraceMiddleware(dummy_app)
    environ = make_environ("/lazy", query="a=1", headers={"Cookie": "s=1"})
    before = dict(environ)
    body = middleware(environ, ignore_start_response)
    list(body)
    body.close()  # type: ignore[attr-defined]
    added = set(environ) - set(before)
    assert added == {"wsgitrace.trace"}
    assert environ["wsgitrace.trace"] is middleware.buffer.last
    assert all(environ[key] is value for key, value in before.items())


def test_durations_are_exact_with_an_injected_clock(exchange: Exchanger, clock: FakeClock) -> None:
    middleware = TraceMiddleware(dummy_app, clock=clock)
    exchange(middleware, "/timed", extra={"test.clock": clock})
    trace = middleware.buffer.last
    assert trace is not None
    timeline = [(e.kind, e.start_ns, e.duration_ns) for e in trace.events]
    assert timeline == [
        ("request", 0, 7 * MS),
        ("app", 0, 2 * MS),
        ("start_response", 2 * MS, 0),
        ("body", 5 * MS, 2 * MS),
        ("first_byte", 5 * MS, 0),
        ("close", 7 * MS, 0),
    ]
    assert (trace.duration_ms, trace.ttfb_ms) == (7.0, 5.0)
    summary = trace.summary()
    assert (summary["duration_ms"], summary["ttfb_ms"], summary["bytes"]) == (7.0, 5.0, 4)


def test_stepping_clock_orders_events(exchange: Exchanger, clock: FakeClock) -> None:
    clock.step = 1000
    middleware = TraceMiddleware(dummy_app, clock=clock)
    exchange(middleware, "/closing")
    trace = middleware.buffer.last
    assert trace is not None
    assert trace.duration_ns == (clock.value - trace.start_ns)
    assert all(e.start_ns % 1000 == 0 and e.duration_ns % 1000 == 0 for e in trace.events)
    assert [e.kind for e in trace.events] == [
        "request",
        "app",
        "start_response",
        "body",
        "first_byte",
        "close",
    ]


# -- protocol warnings ----------------------------------------------------------


def test_unclosed_body_finishes_its_trace_when_collected(make_environ: MakeEnviron) -> None:
    middleware = TraceMiddleware(dummy_app)
    log: list[Any] = []
    body = middleware(make_environ("/closing", **{"test.log": log}), ignore_start_response)
    assert next(iter(body)) == b"a"
    trace = middleware.buffer.last
    assert trace is not None
    assert trace.state == "in_progress"
    del body
    gc.collect()
    assert trace.state == "unclosed"
    assert trace.finished
    assert trace.end_ns is not None
    assert trace.warnings is not None
    assert trace.warnings[0].startswith("unclosed")
    # Nothing of the app's was called by the finalizer.
    assert log == ["iter"]
    # The finished trace is accounted in the buffer's bytes.
    assert middleware.buffer.bytes == trace.approx_size


def test_content_length_mismatch_is_a_warning(exchange: Exchanger) -> None:
    middleware = TraceMiddleware(dummy_app)
    sent = exchange(middleware, "/mismatch")
    assert sent.response.outcome() == exchange(dummy_app, "/mismatch").response.outcome()
    trace = middleware.buffer.last
    assert trace is not None
    assert trace.warnings == ["Content-Length mismatch: header says 10, the app's body has 5 bytes"]
    assert trace.summary()["warnings"] == trace.warnings


#: Ways to read a finished trace first, and what each gives for /mismatch.
FIRST_READS: dict[str, tuple[Callable[[Trace], object], object]] = {
    "warnings": (lambda trace: trace.warnings, [MISMATCH]),
    "state": (lambda trace: trace.state, "finished"),
    "summary": (lambda trace: trace.summary()["warnings"], [MISMATCH]),
    "to_dict": (lambda trace: trace.to_dict()["warnings"], [MISMATCH]),
    "response_headers": (lambda trace: trace.response_headers[-2:], ("Content-Length", "10")),
    "content_length": (lambda trace: trace.content_length, 10),
}


@pytest.mark.parametrize("capture_headers", [True, False], ids=["headers", "no-headers"])
@pytest.mark.parametrize("first_read", FIRST_READS)
def test_content_length_mismatch_whatever_is_read_first(
    exchange: Exchanger, first_read: str, capture_headers: bool
) -> None:
    """The check waits for the headers to be read; whatever is read first
    gives the right answer, and the warning is there, once."""
    middleware = TraceMiddleware(dummy_app, capture_headers=capture_headers)
    exchange(middleware, "/mismatch")
    trace = middleware.buffer.last
    assert trace is not None
    read, expected = FIRST_READS[first_read]
    if first_read == "response_headers" and not capture_headers:
        expected = ()
    assert read(trace) == expected
    assert trace.state == "finished"
    assert trace.warnings == [MISMATCH]
    assert trace.summary()["warnings"] == [MISMATCH]
    assert trace.to_dict()["warnings"] == [MISMATCH]


def test_content_length_mismatch_when_headers_were_read_in_progress(
    make_environ: MakeEnviron,
) -> None:
    """Headers read while the body is pending: the check still runs at the end."""
    middleware = TraceMiddleware(dummy_app)
    body = middleware(make_environ("/mismatch"), ignore_start_response)
    trace = middleware.buffer.last
    assert trace is not None
    assert trace.response_headers == ("Content-Type", "text/plain", "Content-Length", "10")
    assert (trace.state, trace.warnings) == ("in_progress", None)
    assert list(body) == [b"short"]
    body.close()  # type: ignore[attr-defined]
    assert trace.state == "finished"
    assert trace.warnings == [MISMATCH]


@pytest.mark.parametrize("capture_headers", [True, False], ids=["headers", "no-headers"])
@pytest.mark.parametrize(
    ("method", "status", "mismatch"),
    [
        ("GET", "200 OK", True),
        ("HEAD", "200 OK", False),
        ("GET", "204 No Content", False),
        ("GET", "304 Not Modified", False),
    ],
)
def test_no_content_length_mismatch_for_head_204_and_304(
    exchange: Exchanger, method: str, status: str, mismatch: bool, capture_headers: bool
) -> None:
    """HEAD, 204 and 304 send no body whatever their Content-Length says."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        start_response(status, [("Content-Length", "10")])
        return []

    middleware = TraceMiddleware(app, capture_headers=capture_headers)
    exchange(middleware, "/", method)
    trace = middleware.buffer.last
    assert trace is not None
    assert (trace.content_length, trace.bytes_sent, trace.state) == (10, 0, "finished")
    expected = ["Content-Length mismatch: header says 10, the app's body has 0 bytes"]
    assert trace.warnings == (expected if mismatch else None)


def test_start_response_twice_without_exc_info_is_a_warning(exchange: Exchanger) -> None:
    middleware = TraceMiddleware(dummy_app)
    sent = exchange(middleware, "/twice")
    assert sent.response.status == "201 Created"
    trace = middleware.buffer.last
    assert trace is not None
    assert trace.warnings == ["start_response called twice without exc_info"]
    assert trace.status == "201 Created"


def test_body_before_start_response_is_a_warning(make_environ: MakeEnviron) -> None:
    middleware = TraceMiddleware(dummy_app)
    body = middleware(make_environ("/early"), ignore_start_response)
    assert list(body) == [b"", b"late start"]
    body.close()  # type: ignore[attr-defined]
    trace = middleware.buffer.last
    assert trace is not None
    assert trace.warnings == ["body yielded before start_response was called"]


@pytest.mark.parametrize(
    ("chunks", "kind"),
    [([None, b"x"], "NoneType"), ([b"x", 1], "int"), (["text", b"x"], "str"), ([b"x", "t"], "str")],
)
def test_a_chunk_that_is_not_bytes_is_the_apps_mistake(
    exchange: Exchanger, chunks: list[Any], kind: str
) -> None:
    """A chunk without a length is a protocol warning on the trace, and the
    server sees what it would see without tracing.
    """

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[Any]:
        start_response("200 OK", TEXT)
        return iter(chunks)

    errors = internal_error_count()
    middleware = TraceMiddleware(app)
    traced = exchange(middleware)
    assert traced.response.outcome() == exchange(app).response.outcome()
    # A protocol problem on the trace, not an error of wsgitrace's own.
    assert internal_error_count() == errors
    trace = middleware.buffer.last
    assert trace is not None
    assert trace.find("tracer_error") == []
    assert trace.warnings == [f"body yielded a {kind}, not bytes"]
    assert trace.state == "finished"
    # A str has a length too, but no server sends it: not counted as sent
    # (the server stops at the chunk it refuses).
    assert trace.bytes_sent == (1 if chunks[0] == b"x" else 0)


@pytest.mark.parametrize("body", ["hello", b"hello"])
def test_a_str_or_bytes_body_reaches_a_linter_outside_as_it_is(
    exchange: Exchanger, body: str | bytes
) -> None:
    """A str or bytes body is handed on unwrapped, so werkzeug's
    LintMiddleware outside says what it says without tracing; the trace
    notes it as a protocol warning.
    """

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Any:
        start_response("200 OK", TEXT)
        return body

    errors = internal_error_count()
    middleware = TraceMiddleware(app)
    outcomes = []
    messages = []
    for wrapped in (app, middleware):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outcomes.append(exchange(LintMiddleware(wrapped)).response.outcome())
            gc.collect()
        messages.append([str(w.message) for w in caught])
    assert outcomes[1] == outcomes[0]
    # For a str, "The application returned a string. ..." (checked by type).
    assert messages[1] == messages[0]
    assert internal_error_count() == errors
    trace = middleware.buffer.last
    assert trace is not None
    assert trace.state == "finished"
    kind = type(body).__name__
    assert trace.warnings == [f"the app returned a {kind} as its body, not an iterable of bytes"]


def test_compliant_requests_have_no_warnings(exchange: Exchanger) -> None:
    middleware = TraceMiddleware(dummy_app)
    for method, path in COMPLIANT:
        exchange(middleware, path, method)
    assert [t.warnings for t in middleware.buffer] == [None] * len(COMPLIANT)


# -- fault isolation ------------------------------------------------------------


class FailingClock:
    """Raises on its ``fail_at``-th call (and after it, unless ``once``)."""

    def __init__(self, fail_at: int, once: bool) -> None:
        self.fail_at = fail_at
        self.once = once
        self.calls = 0
        self.failures = 0

    def __call__(self) -> int:
        self.calls += 1
        if self.calls == self.fail_at or (not self.once and self.calls > self.fail_at):
            self.failures += 1
            msg = "clock broke"
            raise RuntimeError(msg)
        return self.calls * 1000


class Boom:
    """Stands in for a method of wsgitrace and raises, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        msg = "wsgitrace internals broke"
        raise RuntimeError(msg)


FAULT_PATHS = [path for method, path in COMPLIANT if method == "GET"] + ["/timed", "/infinite"]


def _untraced_and_traced(
    exchange: Exchanger, app: WSGIApplication, path: str, clock: FakeClock
) -> None:
    max_chunks = 5 if path == "/infinite" else None
    extra = {"test.clock": clock}
    query = "page=2&access_token=abc"
    untraced = exchange(dummy_app, path, query=query, max_chunks=max_chunks, extra=extra)
    traced = exchange(app, path, query=query, max_chunks=max_chunks, extra=extra)
    assert traced.response.outcome() == untraced.response.outcome()
    assert traced.log == untraced.log
    if traced.response.error is not None:
        assert any(traced.response.error is exc for exc in traced.raised)
    buffer = getattr(app, "buffer", None)
    if buffer is not None and buffer.last is not None:
        # Parts of a trace are laid out when read: reading must not raise.
        buffer.last.to_dict()


@pytest.mark.parametrize("path", FAULT_PATHS)
def test_a_failing_clock_never_changes_the_response(
    exchange: Exchanger, clock: FakeClock, path: str
) -> None:
    for once in (True, False):
        for fail_at in range(1, 14):
            failing = FailingClock(fail_at, once)
            before = internal_error_count()
            middleware = TraceMiddleware(dummy_app, clock=failing)
            _untraced_and_traced(exchange, middleware, path, clock)
            if failing.failures:
                assert internal_error_count() > before, (once, fail_at)
            else:
                assert internal_error_count() == before


def test_a_failing_clock_keeps_its_last_good_reading(exchange: Exchanger) -> None:
    """A user clock that breaks after one reading: the app (which reads it
    through a span) sees no exception, every failure is counted, and every
    timestamp is that last good reading."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        with span("work"):
            start_response("200 OK", TEXT)
        return [b"ok"]

    failing = FailingClock(fail_at=2, once=False)
    middleware = TraceMiddleware(app, clock=failing)
    before = internal_error_count()
    sent = exchange(middleware, "/")
    assert sent.response.outcome() == exchange(app, "/").response.outcome()
    assert failing.failures > 1
    assert internal_error_count() - before == failing.failures
    trace = middleware.buffer.last
    assert trace is not None
    assert trace.state == "finished"
    assert (trace.start_ns, trace.end_ns) == (1000, 1000)
    assert {e.kind for e in trace.events} >= {"request", "app", "span", "body", "close"}
    assert {(e.start_ns, e.duration_ns) for e in trace.events} == {(0, 0)}


FAULTS = {
    "TraceBuffer.append": (TraceBuffer, "append"),
    "TraceBuffer.finished": (TraceBuffer, "finished"),
    "Trace.record": (Trace, "record"),
    "Trace.warn": (Trace, "warn"),
    "Redactor.is_secret": (Redactor, "is_secret"),
    "Redactor.query": (Redactor, "query"),
    "TraceMiddleware.response_headers": (TraceMiddleware, "response_headers"),
}


#: Requests that surely reach a fault (default: every request).
REACHED_BY = {
    "Trace.warn": {"/mismatch", "/twice"},
    "Trace.record": {"/write", "/raise", "/raise-iter", "/raise-close", "/closing-fail"},
    # Response headers are flattened when first read, not while serving.
    "TraceMiddleware.response_headers": set(),
}


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("path", [*FAULT_PATHS, "/mismatch", "/twice"])
def test_failing_internals_never_change_the_response(
    exchange: Exchanger, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, fault: str, path: str
) -> None:
    middleware = TraceMiddleware(dummy_app)
    owner, name = FAULTS[fault]
    boom = Boom()
    monkeypatch.setattr(owner, name, boom)
    before = internal_error_count()
    _untraced_and_traced(exchange, middleware, path, clock)
    # Every failure that was reached is counted; none escaped.
    assert (internal_error_count() > before) is (boom.calls > 0)
    if path in REACHED_BY.get(fault, {path}):
        assert boom.calls > 0


def test_internal_errors_are_counted_and_logged_once_per_place(
    exchange: Exchanger, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(internal_module, "_internal_errors", {})
    monkeypatch.setattr(Redactor, "query", Boom())
    middleware = TraceMiddleware(dummy_app)
    with caplog.at_level(logging.ERROR, logger="wsgitrace"):
        for _ in range(3):
            assert exchange(middleware, "/", query="a=1").response.body == b"hello"
    assert internal_error_count() == 3
    assert [r.getMessage() for r in caplog.records] == [
        "wsgitrace: internal error in begin (logged once)"
    ]
    assert caplog.records[0].exc_info is not None


# -- concurrency ----------------------------------------------------------------


def _hammer(
    make_environ: MakeEnviron, middleware: TraceMiddleware, threads: int, per_thread: int
) -> list[BaseException]:
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads)

    def worker(number: int) -> None:
        try:
            barrier.wait()
            for i in range(per_thread):
                path = f"/c/{number}/{i}"
                body = middleware(make_environ(path), ignore_start_response)
                try:
                    assert b"".join(body) == path.encode()
                finally:
                    body.close()  # type: ignore[attr-defined]
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in workers)
    return errors


def test_concurrent_requests_each_get_only_their_own_events(make_environ: MakeEnviron) -> None:
    threads, per_thread = 8, 2500
    total = threads * per_thread
    middleware = TraceMiddleware(dummy_app, max_traces=total)
    assert _hammer(make_environ, middleware, threads, per_thread) == []
    buffer = middleware.buffer
    assert buffer.cursor == total
    traces = buffer.latest()
    assert len(traces) == total
    assert sorted(t.cursor for t in traces) == list(range(1, total + 1))
    assert {t.path for t in traces} == {
        f"/c/{n}/{i}" for n in range(threads) for i in range(per_thread)
    }
    expected_kinds = sorted(
        ["request", "app", "start_response", "first_byte", "body", "close", "span"]
    )
    for trace in traces:
        events = trace.events
        assert sorted(e.kind for e in events) == expected_kinds, trace
        [user_span] = trace.find("span")
        assert (user_span.name, dict(user_span.attrs)) == (trace.path, {"step": "body"})
        assert {e.thread for e in events} == {trace.thread}
        assert (trace.state, trace.status, trace.bytes_sent) == (
            "finished",
            "200 OK",
            len(trace.path),
        )


def test_concurrent_requests_keep_the_buffer_within_its_bounds(
    make_environ: MakeEnviron,
) -> None:
    threads, per_thread = 8, 1000
    total = threads * per_thread
    buffer = TraceBuffer(max_traces=200, max_bytes=120_000)
    middleware = TraceMiddleware(dummy_app, buffer=buffer)
    samples: list[tuple[int, int]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append((buffer.bytes, len(buffer)))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        assert _hammer(make_environ, middleware, threads, per_thread) == []
    finally:
        done.set()
        sampler.join(timeout=10)
    assert samples
    assert all(size <= 120_000 and count <= 200 for size, count in samples)
    assert buffer.cursor == total
    assert buffer.bytes <= 120_000
    assert len(buffer) <= 200
    assert buffer.dropped == total - len(buffer)
    assert buffer.dropped_bytes > 0


# -- request headers ------------------------------------------------------------


def _served(middleware: TraceMiddleware, environ: WSGIEnvironment) -> Trace:
    """Serve one request to the end; its trace, not read yet."""
    body = middleware(environ, ignore_start_response)
    list(body)
    body.close()  # type: ignore[attr-defined]
    trace = middleware.buffer.last
    assert trace is not None
    return trace


def _header_pairs(trace: Trace) -> list[tuple[str, str]]:
    flat = trace.request_headers
    return list(zip(flat[::2], flat[1::2], strict=True))


def test_request_headers_follow_each_environs_key_order(make_environ: MakeEnviron) -> None:
    """Same headers in another environ key order, then the first order again
    with new values: every trace lays out its own values, in its own order."""
    middleware = TraceMiddleware(dummy_app)
    forward = {"Accept": "text/html", "X-One": "1", "X-Two": "2"}
    backward = {"X-Two": "two", "X-One": "one", "Accept": "*/*"}
    traces = [
        _served(middleware, make_environ("/", headers=headers))
        for headers in (forward, backward, {**forward, "X-One": "uno"})
    ]
    host = ("Host", "127.0.0.1")
    assert [_header_pairs(trace) for trace in reversed(traces)] == [
        [("Accept", "text/html"), ("X-One", "uno"), ("X-Two", "2"), host],
        [("X-Two", "two"), ("X-One", "one"), ("Accept", "*/*"), host],
        [("Accept", "text/html"), ("X-One", "1"), ("X-Two", "2"), host],
    ]
    assert len(middleware._plans) == 2


def test_secret_request_headers_are_redacted_and_never_copied(make_environ: MakeEnviron) -> None:
    """Secret header values are not even kept pending on the trace."""
    middleware = TraceMiddleware(dummy_app)
    secrets = {
        "Authorization": "Bearer s3cret-bearer",
        "Cookie": "sid=c00kie-value",
        "X-Api-Key": "k3y-value",
    }
    trace = _served(middleware, make_environ("/", headers={"X-Plain": "visible", **secrets}))
    pending = trace._request_values
    assert "visible" in pending
    assert not [value for value in secrets.values() if value in repr(pending)]
    pairs = dict(_header_pairs(trace))
    assert {name: pairs[name] for name in secrets} == dict.fromkeys(secrets, REDACTED)
    assert pairs["X-Plain"] == "visible"
    text = trace.to_json()
    assert not [value for value in secrets.values() if value in text]


def test_an_environ_with_only_secret_headers_keeps_them_redacted() -> None:
    middleware = TraceMiddleware(dummy_app)
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/",
        "QUERY_STRING": "",
        "HTTP_AUTHORIZATION": "Bearer s3cret",
    }
    trace = _served(middleware, environ)
    assert _header_pairs(trace) == [("Authorization", REDACTED)]


def test_long_and_non_string_request_header_values(make_environ: MakeEnviron) -> None:
    """A value past max_string is cut, marked and counted (secrets are not
    copied, so not counted); a non-str environ value is kept as its repr."""
    middleware = TraceMiddleware(dummy_app, max_string=16)
    environ = make_environ(
        "/", headers={"X-Long": "x" * 100, "Authorization": "a" * 100}, HTTP_X_NUMBER=42
    )
    trace = _served(middleware, environ)
    assert _header_pairs(trace) == [
        ("X-Long", "x" * 16 + TRUNCATION_MARKER),
        ("Authorization", REDACTED),
        ("X-Number", "42"),
        ("Host", "127.0.0.1"),
    ]
    assert trace.truncated == {"header_values": 1}


def test_a_bytes_request_header_value_is_recorded_as_its_repr(make_environ: MakeEnviron) -> None:
    middleware = TraceMiddleware(dummy_app)
    trace = _served(middleware, make_environ("/", HTTP_X_RAW=b"raw"))
    assert ("X-Raw", "b'raw'") in _header_pairs(trace)
    trace.to_json()


def test_request_headers_past_max_headers_are_counted_on_every_request(
    make_environ: MakeEnviron,
) -> None:
    """The first max_headers headers are kept (a secret one included, its
    value redacted); the rest are counted, also when the plan is reused."""
    middleware = TraceMiddleware(dummy_app, max_headers=3)
    headers = {"X-A": "a", "Authorization": "secret", "X-B": "b", "X-C": "c", "X-D": "d"}
    for _ in range(2):
        trace = _served(middleware, make_environ("/", headers=headers))
        assert _header_pairs(trace) == [("X-A", "a"), ("Authorization", REDACTED), ("X-B", "b")]
        # X-C, X-D and Host.
        assert trace.truncated == {"request_headers": 3}
    assert len(middleware._plans) == 1


def test_request_header_plans_are_bounded(make_environ: MakeEnviron) -> None:
    """Many environ key orders: the plan cache stays bounded and the requests
    past its bound still get their headers right."""
    middleware = TraceMiddleware(dummy_app)
    names = [f"X-{letter}" for letter in "ABCDEF"]
    orders = list(itertools.permutations(names))[:600]
    for order in orders:
        headers = {name: f"{name}={position}" for position, name in enumerate(order)}
        trace = _served(middleware, make_environ("/", headers=headers))
        assert len(middleware._plans) <= 512
    assert len(middleware._plans) == 512
    assert _header_pairs(trace) == [
        *((name, f"{name}={position}") for position, name in enumerate(orders[-1])),
        ("Host", "127.0.0.1"),
    ]


# -- caps -----------------------------------------------------------------------


def test_a_megabyte_of_headers_is_capped(exchange: Exchanger) -> None:
    headers = {f"X-Filler-{i}": "v" * 1024 for i in range(1024)}
    headers["X-Huge"] = "h" * 1_000_000
    middleware = TraceMiddleware(dummy_app, max_headers=16, max_string=256)
    sent = exchange(middleware, "/big-headers", headers=headers)
    assert sent.response.status == "200 OK"
    assert len(sent.response.headers) == 1001
    trace = middleware.buffer.last
    assert trace is not None
    assert len(trace.request_headers) == len(trace.response_headers) == 32
    assert all(len(v) <= 256 + len(TRUNCATION_MARKER) for v in trace.request_headers)
    assert all(len(v) <= 256 + len(TRUNCATION_MARKER) for v in trace.response_headers)
    assert trace.request_headers[1] == "v" * 256 + TRUNCATION_MARKER
    # 1025 test headers plus Host; 16 kept, 15 of the kept response values cut.
    assert trace.truncated == {
        "request_headers": 1026 - 16,
        "header_values": 16 + 15,
        "response_headers": 1001 - 16,
    }
    # 32 cut strings of about 270 characters, two bytes each (the marker is
    # not ASCII), and the rest of the trace.
    assert trace.approx_size < 30_000
    assert len(trace.to_json()) < 20_000
    assert trace.to_dict()["truncated"] == trace.truncated


def test_ten_thousand_writes_are_capped_in_events(exchange: Exchanger) -> None:
    middleware = TraceMiddleware(dummy_app, max_events=32)
    sent = exchange(middleware, "/writes", query="10000")
    assert len(sent.response.body) == 10_000
    trace = middleware.buffer.last
    assert trace is not None
    assert trace.finished
    assert len(trace.events) <= 32
    assert {"request", "app", "start_response", "body", "close"} <= {e.kind for e in trace.events}
    # Every write is either an event or counted as dropped.
    kept = len(trace.find("write"))
    assert kept > 0
    assert trace.dropped_events == 10_000 - kept
    assert trace.to_dict()["dropped_events"] == 10_000 - kept
    assert trace.bytes_sent == 10_000
    assert trace.duration_ns is not None
    assert len(trace.to_json()) < 20_000


def test_ten_thousand_chunks_stay_one_body_event(exchange: Exchanger) -> None:
    middleware = TraceMiddleware(dummy_app, max_events=32)
    sent = exchange(middleware, "/chunks", query="10000")
    assert len(sent.response.chunks) == 10_000
    trace = middleware.buffer.last
    assert trace is not None
    assert (trace.chunks, trace.bytes_sent, trace.dropped_events) == (10_000, 10_000, 0)
    assert [e.attrs for e in trace.find("body")] == [{"chunks": 10_000, "bytes": 10_000}]


def test_long_path_and_query_are_cut_and_marked(make_environ: MakeEnviron) -> None:
    middleware = TraceMiddleware(dummy_app, max_string=64)
    path = "/c/" + "p" * 500
    body = middleware(make_environ(path, query="q=" + "x" * 500), ignore_start_response)
    assert b"".join(body) == path.encode()
    body.close()  # type: ignore[attr-defined]
    trace = middleware.buffer.last
    assert trace is not None
    assert trace.path == path[:64] + TRUNCATION_MARKER
    assert trace.query == ("q=" + "x" * 500)[:64] + TRUNCATION_MARKER
    assert trace.truncated == {"path": 1, "query": 1}


def test_header_name_memo_is_bounded(make_environ: MakeEnviron) -> None:
    middleware = TraceMiddleware(dummy_app, max_headers=4)
    for batch in range(5):
        headers = {f"X-Name-{batch}-{i}": "v" for i in range(1000)}
        body = middleware(make_environ("/", headers=headers), ignore_start_response)
        body.close()  # type: ignore[attr-defined]
    assert len(middleware._header_memo) <= 2048
    assert len(middleware.redactor._memo) <= 4096


# -- options on the request path ------------------------------------------------


def test_disabled_middleware_passes_through(make_environ: MakeEnviron) -> None:
    middleware = TraceMiddleware(dummy_app, enabled=False)
    body = middleware(make_environ("/"), ignore_start_response)
    assert body == [b"hello"]
    assert middleware.buffer.cursor == 0


def test_excluded_paths_and_sampling_skip_tracing(exchange: Exchanger) -> None:
    middleware = TraceMiddleware(
        dummy_app, exclude=["/closing"], sample=lambda e: e["PATH_INFO"] != "/empty"
    )
    for path in ("/closing", "/empty", "/"):
        exchange(middleware, path)
    assert [t.path for t in middleware.buffer] == ["/"]
    never = TraceMiddleware(dummy_app, sample=0.0)
    exchange(never, "/")
    assert never.buffer.cursor == 0


def test_capture_headers_off_still_notes_content_length(exchange: Exchanger) -> None:
    middleware = TraceMiddleware(dummy_app, capture_headers=False)
    exchange(middleware, "/mismatch")
    trace = middleware.buffer.last
    assert trace is not None
    assert (trace.request_headers, trace.response_headers) == ((), ())
    assert trace.content_length == 10
    assert trace.warnings is not None
    assert "Content-Length mismatch" in trace.warnings[0]


def test_a_failing_header_flattener_at_read_time_is_counted_not_raised(
    exchange: Exchanger, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Headers flattened when read: a failure there leaves them empty and is counted."""
    from wsgitrace.middleware import _ResponseHeaderFlattener

    boom = Boom()
    monkeypatch.setattr(_ResponseHeaderFlattener, "__call__", lambda self, headers: boom(headers))
    middleware = TraceMiddleware(dummy_app)
    before = internal_error_count()
    exchange(middleware, "/", extra={"test.clock": clock})
    trace = middleware.buffer.last
    assert trace is not None
    assert internal_error_count() == before
    assert boom.calls == 0
    assert trace.response_headers == ()
    assert internal_error_count() == before + 1
    assert trace.to_dict()["response_headers"] == []


def test_file_wrapper_factory_function_is_returned_untouched(make_environ: MakeEnviron) -> None:
    """A wsgi.file_wrapper that is a function (uWSGI's) still passes through."""
    from wsgiref.util import FileWrapper

    def file_wrapper_factory(filelike: Any, block_size: int = 8192) -> FileWrapper:
        return FileWrapper(filelike, block_size)

    middleware = TraceMiddleware(dummy_app)
    returned: list[Any] = []
    environ = make_environ(
        "/file", **{"test.returned": returned, "wsgi.file_wrapper": file_wrapper_factory}
    )
    body = middleware(environ, ignore_start_response)
    assert body is returned[0]
    trace = middleware.buffer.last
    assert trace is not None
    assert trace.state == "finished"
    assert trace.find("file_wrapper")


def test_an_untraced_request_inside_a_traced_one_records_nothing_into_it(
    make_environ: MakeEnviron,
) -> None:
    """An excluded inner app call sees no current trace, then the outer one again."""

    inner_saw: list[object] = []

    def inner_app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        inner_saw.append(current_trace())
        with span("inner-work"):
            pass
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"inner"]

    inner = TraceMiddleware(inner_app, exclude=["/"])

    def outer_app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        body = inner(make_environ("/inner"), ignore_start_response)
        inner_saw.append(current_trace())
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"".join(body)]

    outer = TraceMiddleware(outer_app)
    body = outer(make_environ("/outer"), ignore_start_response)
    assert b"".join(body) == b"inner"
    trace = outer.buffer.last
    assert trace is not None
    assert inner_saw == [None, trace]
    assert not trace.find("span")
    assert len(inner.buffer) == 0


def test_endpoint_property() -> None:
    """The endpoint app is public, None when the endpoint is off."""
    assert TraceMiddleware(dummy_app).endpoint is None
    assert TraceMiddleware(dummy_app, endpoint=True).endpoint is not None


@pytest.mark.parametrize(
    ("value", "expected"), [("5", 5), (" 5 ", 5), ("+5", None), ("5_0", None), ("٥", None)]
)
def test_content_length_is_read_one_way_when_served_and_when_read(
    make_environ: MakeEnviron, value: str, expected: int | None
) -> None:
    """The finish-time mismatch check and the read side agree on what a
    valid Content-Length is: digits only, surrounding spaces allowed."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        start_response("200 OK", [("Content-Length", value)])
        return [b"12345"]

    middleware = TraceMiddleware(app)
    body = middleware(make_environ("/"), ignore_start_response)
    list(body)
    body.close()  # type: ignore[attr-defined]
    trace = middleware.buffer.last
    assert trace is not None
    assert trace.content_length == expected
    invalid = [w for w in trace.warnings or () if w.startswith("invalid Content-Length")]
    assert bool(invalid) is (expected is None)
    assert not [w for w in trace.warnings or () if w.startswith("Content-Length mismatch")]


# -- found in review: next() without iter(), concurrent first reads, publish ---------


def _mismatched_length_app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
    # Content-Length says 10, the body sends 2 bytes: a mismatch warning is due.
    start_response("200 OK", [("X-A", "1"), ("Content-Length", "10")])
    return [b"hi"]


def _served_mismatch() -> Trace:
    middleware = TraceMiddleware(_mismatched_length_app)
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "HTTP_HOST": "h", "HTTP_ACCEPT": "*/*"}
    body = middleware(environ, ignore_start_response)
    assert b"".join(body) == b"hi"
    body.close()  # type: ignore[attr-defined]
    trace = middleware.buffer.last
    assert trace is not None
    return trace


def test_body_driven_by_next_and_dropped_is_finished_unclosed() -> None:
    """A server that calls next() on the body and drops it unclosed: the
    trace finishes by reference counting alone (no cycle keeps the body)."""
    middleware = TraceMiddleware(dummy_app)
    body = middleware({"REQUEST_METHOD": "GET", "PATH_INFO": "/"}, ignore_start_response)
    gc.disable()
    try:
        assert next(body) == b"hello"  # type: ignore[call-overload]
        del body
        trace = middleware.buffer.last
        assert trace is not None
        assert trace.finished
        assert trace.state == "unclosed"
    finally:
        gc.enable()


def _pause_in(
    monkeypatch: pytest.MonkeyPatch, owner: Any, method: str, thread: str = "A"
) -> tuple[threading.Event, threading.Event]:
    """Make ``owner.method`` stop, when the thread named ``thread`` calls it,
    until released (as a thread switch would stop it there). Returns the
    (entered, release) events."""
    entered, release = threading.Event(), threading.Event()
    real = getattr(owner, method)

    def paused(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread().name == thread:
            entered.set()
            release.wait(5)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, method, paused)
    return entered, release


def _two_readers(
    read: Callable[[], Any], entered: threading.Event, release: threading.Event
) -> dict[str, Any]:
    """Reader A starts and is stopped inside ``read``; reader B reads then;
    A is released. Returns what each read."""
    seen: dict[str, Any] = {}

    def reader(name: str) -> None:
        seen[name] = read()

    a = threading.Thread(target=reader, args=("A",), name="A")
    a.start()
    assert entered.wait(5)
    b = threading.Thread(target=reader, args=("B",), name="B")
    b.start()
    b.join(0.2)
    # B waits for A (the layout lock) rather than reading a half-done state.
    assert b.is_alive()
    release.set()
    a.join(5)
    b.join(5)
    return seen


@pytest.mark.parametrize("read", ["response_headers", "request_headers"])
def test_two_first_readers_both_get_the_laid_out_headers(
    monkeypatch: pytest.MonkeyPatch, read: str
) -> None:
    """Reader A is paused inside the lazy layout (as a thread switch would
    pause it) while reader B reads: B gets the full headers, and the
    Content-Length warning is produced exactly once."""
    from wsgitrace.middleware import _RequestHeaderPlan

    trace = _served_mismatch()
    if read == "response_headers":
        entered, release = _pause_in(monkeypatch, Redactor, "is_secret")
    else:
        entered, release = _pause_in(monkeypatch, _RequestHeaderPlan, "expand")
    seen = _two_readers(
        lambda: (getattr(trace, read), trace.to_dict()["warnings"]), entered, release
    )
    assert seen["A"][0] == seen["B"][0] != ()
    mismatch = ["Content-Length mismatch: header says 10, the app's body has 2 bytes"]
    assert seen["A"][1] == seen["B"][1] == trace.warnings == mismatch


def test_publish_is_called_for_every_trace() -> None:
    """TraceMiddleware.publish is the one place traces enter the buffer, so a
    subclass overriding it sees requests whose app returned or raised."""
    published: list[str] = []

    class Recording(TraceMiddleware):
        def publish(self, trace: Trace) -> None:
            published.append(trace.path)
            super().publish(trace)

    middleware = Recording(dummy_app)
    body = middleware({"REQUEST_METHOD": "GET", "PATH_INFO": "/"}, ignore_start_response)
    b"".join(body)
    body.close()  # type: ignore[attr-defined]
    with pytest.raises(AppError):
        middleware({"REQUEST_METHOD": "GET", "PATH_INFO": "/raise"}, ignore_start_response)
    assert published == ["/", "/raise"]
    assert len(middleware.buffer) == 2


def _unusual_environ(rng: Any, names: int, name_chars: int) -> dict[str, Any]:
    """An environ with header names a client invented: long, and in a new
    order (so a new key layout) every time."""
    environ: dict[str, Any] = {"REQUEST_METHOD": "GET", "PATH_INFO": "/"}
    for _ in range(names):
        name = "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=name_chars))
        environ["HTTP_" + name] = "v"
    return environ


def test_unusual_environs_keep_the_byte_cap_and_no_plans() -> None:
    """Traces of environs with long invented header names are counted at
    what they keep, so the buffer's real memory stays near its byte cap,
    and the middleware keeps no plan, memo entry or name for them."""
    import random
    import tracemalloc

    rng = random.Random(0)
    buffer = TraceBuffer(max_traces=1000, max_bytes=200_000)
    middleware = TraceMiddleware(dummy_app, buffer, max_string=64)
    environs = [_unusual_environ(rng, 20, 500) for _ in range(150)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for environ in environs:
            body = middleware(environ, ignore_start_response)
            b"".join(body)
            body.close()  # type: ignore[attr-defined]
        del environs, environ, body
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert buffer.bytes <= 200_000
    assert held <= 1.25 * 200_000, held
    assert middleware._plans == {}
    assert all(len(key) <= 256 for key in middleware._header_memo)
    trace = buffer.last
    assert trace is not None
    names = trace.request_headers[::2]
    assert len(names) == 20
    assert all(name.endswith(TRUNCATION_MARKER) for name in names)


def test_a_reader_laying_out_headers_never_holds_up_a_plain_request(
    make_environ: MakeEnviron,
) -> None:
    """A request with one start_response does not wait for the read-side
    layout lock (held here by a reader): its headers are compacted before
    the trace is published, without the lock, and read the same."""
    import time

    from wsgitrace.trace import _LAYOUT_LOCK

    middleware = TraceMiddleware(dummy_app)
    held, release = threading.Event(), threading.Event()

    def slow_reader() -> None:
        with _LAYOUT_LOCK:
            held.set()
            release.wait(5)

    reader = threading.Thread(target=slow_reader)
    reader.start()
    try:
        assert held.wait(5)
        started = time.monotonic()
        body = middleware(make_environ("/"), ignore_start_response)
        assert b"".join(body) == b"hello"
        body.close()  # type: ignore[attr-defined]
        assert time.monotonic() - started < 2
        trace = middleware.buffer.last
        assert trace is not None
        assert type(trace._raw_response_headers) is tuple
    finally:
        release.set()
        reader.join(5)
    assert trace.response_headers == ("Content-Type", "text/plain", "Content-Length", "5")
    assert trace.content_length == 5


def test_a_reader_never_sees_the_length_check_done_without_its_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Reader A is paused while it adds the Content-Length warning; reader
    B, arriving then, waits for it instead of reading no warning."""
    trace = _served_mismatch()
    entered, release = _pause_in(monkeypatch, Trace, "warn")
    seen = _two_readers(lambda: trace.warnings, entered, release)
    mismatch = ["Content-Length mismatch: header says 10, the app's body has 2 bytes"]
    assert seen["A"] == seen["B"] == mismatch


def test_a_reader_laying_out_replaced_headers_keeps_none_of_them() -> None:
    """A reader lays out the first response headers while the app replaces
    them (start_response with exc_info, accepted: nothing was sent yet):
    the trace ends with the headers the client got, not the first ones."""
    in_flatten, release, published, go_on = (threading.Event() for _ in range(4))

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Length", "5"), ("X-Which", "first")])

        def body() -> Iterator[bytes]:
            published.set()
            assert go_on.wait(5)
            try:
                raise _fail(environ, "late, before any byte")
            except AppError:
                start_response("500 Internal Server Error", [("X-Which", "error")], sys.exc_info())
            yield b"error page!!"

        return body()

    middleware = TraceMiddleware(app)
    flatten = middleware._flatten_response_headers

    def paused_flatten(headers: list[tuple[str, str]]) -> HeaderLayout:
        if threading.current_thread().name == "reader":
            in_flatten.set()
            release.wait(5)
        return flatten(headers)

    middleware._flatten_response_headers = paused_flatten  # type: ignore[method-assign]
    body = middleware({"REQUEST_METHOD": "GET", "PATH_INFO": "/"}, ignore_start_response)
    chunks: list[bytes] = []

    def serve() -> None:
        chunks.extend(body)
        body.close()  # type: ignore[attr-defined]

    server = threading.Thread(target=serve)
    server.start()
    assert published.wait(5)
    trace = middleware.buffer.last
    assert trace is not None
    reader = threading.Thread(target=lambda: trace.response_headers, name="reader")
    reader.start()
    assert in_flatten.wait(5)
    go_on.set()
    server.join(0.2)  # the app replaces the headers while the reader lays out the first
    release.set()
    reader.join(5)
    server.join(5)
    assert chunks == [b"error page!!"]
    assert trace.status == "500 Internal Server Error"
    assert trace.response_headers == ("X-Which", "error")
    assert trace.content_length is None
    assert trace.warnings is None


def test_refused_exc_info_headers_leave_nothing_on_the_trace() -> None:
    """start_response(..., exc_info) refused because headers were sent: the
    trace keeps what the client got, with no warning or cut counted from
    the refused headers."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Length", "7")])
        yield b"partial"
        try:
            raise _fail(environ, "late")
        except AppError:
            bad = [("Content-Length", "oops"), ("X-Long", "v" * 5000)]
            start_response("500 Internal Server Error", bad, sys.exc_info())
        yield b"never"

    sent: list[str] = []

    def server_start_response(
        status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], None]:
        if exc_info is not None and sent:
            raise exc_info[1].with_traceback(exc_info[2])  # PEP 3333: already sent
        sent.append(status)
        return lambda data: None

    middleware = TraceMiddleware(app)
    body = middleware({"REQUEST_METHOD": "GET", "PATH_INFO": "/"}, server_start_response)
    with pytest.raises(AppError):
        for _chunk in body:
            pass
    body.close()  # type: ignore[attr-defined]
    trace = middleware.buffer.last
    assert trace is not None
    assert sent == ["200 OK"]
    assert (trace.status, trace.response_headers) == ("200 OK", ("Content-Length", "7"))
    assert trace.truncated is None
    assert not [w for w in trace.warnings or () if "Content-Length" in w]


def test_a_str_subclass_header_value_is_kept_as_a_plain_cut_string(
    make_environ: MakeEnviron,
) -> None:
    """A str subclass (whose len() may lie) is copied as a plain string and
    cut to max_string like any other value."""

    class Lying(str):
        def __len__(self) -> int:
            return 1

    middleware = TraceMiddleware(dummy_app, max_string=32)
    trace = _served(middleware, make_environ("/", HTTP_X_ODD=Lying("x" * 1000)))
    value = dict(_header_pairs(trace))["X-Odd"]
    assert type(value) is str
    assert value == "x" * 32 + TRUNCATION_MARKER


def test_a_body_collected_during_a_header_layout_keeps_that_layout() -> None:
    """A collection during a header layout can finish the very trace being
    laid out (its body dropped unclosed) on the same thread: the finish then
    leaves the header list alone, and the read gets the headers."""
    seen: dict[str, Any] = {}

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        seen["trace"] = current_trace()
        start_response("200 OK", [("Content-Type", "text/plain"), ("X-A", "1")])
        return [b"hi"]

    middleware = TraceMiddleware(app)
    seen["body"] = middleware({"REQUEST_METHOD": "GET", "PATH_INFO": "/"}, ignore_start_response)
    trace: Trace = seen["trace"]
    flatten = trace._flatten_headers
    assert flatten is not None

    def collecting_flatten(pairs: list[tuple[str, str]]) -> HeaderLayout:
        del seen["body"]  # the body goes, unclosed, in the middle of the layout
        gc.collect()
        return flatten(pairs)

    trace._flatten_headers = collecting_flatten
    assert not trace.finished
    assert trace.response_headers == ("Content-Type", "text/plain", "X-A", "1")
    assert trace.finished
    assert trace.state == "unclosed"


def test_non_ascii_header_strings_are_counted_at_their_size() -> None:
    """Latin-1 header values that are not ASCII (PEP 3333's decoding of
    UTF-8 bytes) take 24 bytes more each; the size counts them."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        start_response("200 OK", [("X-Name", environ["HTTP_X_NAME"])])
        return [b""]

    sizes = {}
    for text in ("aaaa", "\xe9\xe9\xe9\xe9"):
        middleware = TraceMiddleware(app)
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "HTTP_X_NAME": text}
        body = middleware(environ, ignore_start_response)
        b"".join(body)
        body.close()  # type: ignore[attr-defined]
        trace = middleware.buffer.last
        assert trace is not None
        sizes[text] = trace.approx_size
    # The request value and the response value.
    assert sizes["\xe9\xe9\xe9\xe9"] - sizes["aaaa"] == 2 * 24


def test_a_file_returned_through_a_wrapper_function_is_untouched(
    make_environ: MakeEnviron, tmp_path: Any
) -> None:
    """uWSGI's wsgi.file_wrapper is a function returning the file itself,
    and uses sendfile only if it gets that very object back.
    """
    path = tmp_path / "data.bin"
    path.write_bytes(b"x" * 100)

    def uwsgi_file_wrapper(filelike: Any, block_size: int = 8192) -> Any:
        return filelike

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Any:
        start_response("200 OK", [("Content-Length", "100")])
        return environ["wsgi.file_wrapper"](open(path, "rb"))

    middleware = TraceMiddleware(app)
    environ = make_environ("/file")
    environ["wsgi.file_wrapper"] = uwsgi_file_wrapper
    body = middleware(environ, ignore_start_response)
    try:
        assert type(body).__name__ == "BufferedReader"
    finally:
        body.close()  # type: ignore[attr-defined]
    trace = middleware.buffer.last
    assert trace is not None
    assert trace.finished
    assert [e.kind for e in trace.events if e.kind == "file_wrapper"] == ["file_wrapper"]


def test_a_failure_after_publishing_still_finishes_the_trace(make_environ: MakeEnviron) -> None:
    """A body whose attributes raise makes wsgitrace's own code fail after
    the trace is published: the body goes back unwrapped, the trace is
    finished (not left in progress), the error counted.
    """
    from wsgitrace.middleware import internal_error_count

    class Hostile:
        def __iter__(self) -> Any:
            return iter([b"ok"])

        def __getattr__(self, name: str) -> Any:
            raise RuntimeError(name)

    hostile = Hostile()

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Any:
        start_response("200 OK", [])
        return hostile

    middleware = TraceMiddleware(app)
    environ = make_environ("/hostile")
    environ["wsgi.file_wrapper"] = lambda filelike, block_size=8192: filelike
    before = internal_error_count()
    assert middleware(environ, ignore_start_response) is hostile
    assert internal_error_count() > before
    trace = middleware.buffer.last
    assert trace is not None
    assert trace.state == "finished"
