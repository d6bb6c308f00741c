"""current_trace() and span(): user code reaching the trace of its request."""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import threading
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from wsgitrace import Trace, TraceMiddleware, current_trace, span
from wsgitrace.middleware import internal_error_count
from wsgitrace.trace import TRUNCATION_MARKER

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

    from .conftest import Exchanger, FakeClock, MakeEnviron

MS = 1_000_000


class ViewError(Exception):
    """Raised inside a span on purpose."""


@span("load_cart", source="db")
def load_cart(clock: FakeClock, items: int) -> list[int]:
    """Load the cart."""
    clock.advance(2 * MS)
    return list(range(items))


@span("fetch_prices")
async def fetch_prices(clock: FakeClock) -> int:
    clock.advance(3 * MS)
    await asyncio.sleep(0)
    return 42


@span("rows", table="cart")
def rows(clock: FakeClock, count: int) -> Iterator[int]:
    for i in range(count):
        clock.advance(1 * MS)
        yield i
    if count == 1:
        raise ViewError("one row")


@span("async_rows")
async def async_rows(clock: FakeClock, count: int) -> AsyncIterator[int]:
    for i in range(count):
        clock.advance(1 * MS)
        await asyncio.sleep(0)
        yield i


async def collect_async_rows(clock: FakeClock) -> list[int]:
    return [row async for row in async_rows(clock, 3)]


def streamed_body(seen: list[Any], clock: FakeClock) -> Iterator[bytes]:
    seen.append(current_trace())
    with span("render_chunk", n=1):
        clock.advance(1 * MS)
        yield b"one"
    seen.append(current_trace())
    yield b"two"


class ClosingBody:
    def __init__(self, seen: list[Any]) -> None:
        self.seen = seen

    def __iter__(self) -> Iterator[bytes]:
        yield b"body"

    def close(self) -> None:
        self.seen.append(current_trace())


def dummy_app(environ: WSGIEnvironment, start_response: StartResponse) -> Any:
    path = environ["PATH_INFO"]
    clock: FakeClock = environ["test.clock"]
    seen: list[Any] = environ["test.log"]
    seen.append(current_trace())
    start_response("200 OK", [("Content-Type", "text/plain")])
    if path == "/span":
        with span("pricing", items=3) as recorded:
            seen.append(recorded)
            clock.advance(5 * MS)
            with span("tax"):
                clock.advance(1 * MS)
        return [b"ok"]
    if path == "/decorated":
        seen.append(load_cart(clock, 3))
        seen.append(asyncio.run(fetch_prices(clock)))
        return [b"ok"]
    if path == "/generators":
        seen.append(list(rows(clock, 2)))
        seen.append(asyncio.run(collect_async_rows(clock)))
        try:
            list(rows(clock, 1))
        except ViewError as exc:
            seen.append(exc)
        return [b"ok"]
    if path == "/error":
        try:
            with span("risky"):
                clock.advance(1 * MS)
                raise ViewError("boom")
        except ViewError as exc:
            seen.append(exc)
        return [b"handled"]
    if path == "/stream":
        return streamed_body(seen, clock)
    if path == "/closing":
        return ClosingBody(seen)
    raise LookupError(path)


def _run(exchange: Exchanger, clock: FakeClock, path: str) -> tuple[Trace, list[Any]]:
    middleware = TraceMiddleware(dummy_app, clock=clock)
    sent = exchange(middleware, path, extra={"test.clock": clock})
    assert sent.response.error is None
    trace = middleware.buffer.last
    assert trace is not None
    assert current_trace() is None
    return trace, sent.log


def test_span_repr_shows_its_name_and_attributes() -> None:
    """repr(span) reads like the call that made it."""
    assert repr(span("db", table="users")) == "span('db', table='users')"


def test_span_used_as_a_bare_decorator_fails_where_it_is_used() -> None:
    """``@span`` without a name (like ``@app.before_request``) fails at
    decoration time, saying how to write it, instead of turning the
    function into a span whose every call raises an unrelated TypeError.
    """
    with pytest.raises(TypeError, match=r"@span\("):

        @span  # type: ignore[arg-type]
        def load_user() -> None:
            pass


def test_current_trace_is_none_outside_a_request() -> None:
    assert current_trace() is None


def test_current_trace_is_the_request_trace(exchange: Exchanger, clock: FakeClock) -> None:
    trace, seen = _run(exchange, clock, "/span")
    assert seen[0] is trace
    assert trace.path == "/span"


def test_span_context_manager_records_exact_durations(
    exchange: Exchanger, clock: FakeClock
) -> None:
    trace, seen = _run(exchange, clock, "/span")
    assert isinstance(seen[1], span)
    spans = [(e.name, e.start_ns, e.duration_ns, dict(e.attrs)) for e in trace.find("span")]
    assert spans == [("pricing", 0, 6 * MS, {"items": 3}), ("tax", 5 * MS, 1 * MS, {})]


def test_span_decorator_sync_and_async(exchange: Exchanger, clock: FakeClock) -> None:
    trace, seen = _run(exchange, clock, "/decorated")
    assert seen[1:] == [[0, 1, 2], 42]
    spans = [(e.name, e.start_ns, e.duration_ns, dict(e.attrs)) for e in trace.find("span")]
    assert spans == [
        ("load_cart", 0, 2 * MS, {"source": "db"}),
        ("fetch_prices", 2 * MS, 3 * MS, {}),
    ]
    assert load_cart.__name__ == "load_cart"
    assert load_cart.__doc__ == "Load the cart."
    assert asyncio.iscoroutinefunction(fetch_prices)


def test_span_decorator_on_generators_covers_their_iteration(
    exchange: Exchanger, clock: FakeClock
) -> None:
    """A decorated generator (sync or async) is timed from its first value
    until it is exhausted, not for the instant its call returns; an error
    raised while it is iterated is recorded and propagates.
    """
    trace, seen = _run(exchange, clock, "/generators")
    assert seen[1:3] == [[0, 1], [0, 1, 2]]
    assert isinstance(seen[3], ViewError)
    spans = [(e.name, e.start_ns, e.duration_ns, dict(e.attrs)) for e in trace.find("span")]
    assert spans == [
        ("rows", 0, 2 * MS, {"table": "cart"}),
        ("async_rows", 2 * MS, 3 * MS, {}),
        ("rows", 5 * MS, 1 * MS, {"table": "cart", "error": "ViewError"}),
    ]
    assert rows.__name__ == "rows"
    assert inspect.isgeneratorfunction(rows)
    assert inspect.isasyncgenfunction(async_rows)


def test_span_records_an_error_and_reraises_it(exchange: Exchanger, clock: FakeClock) -> None:
    trace, seen = _run(exchange, clock, "/error")
    assert isinstance(seen[1], ViewError)
    assert str(seen[1]) == "boom"
    [risky] = trace.find("span")
    assert (risky.name, risky.duration_ns, dict(risky.attrs)) == (
        "risky",
        MS,
        {"error": "ViewError"},
    )


def test_current_trace_inside_a_lazily_iterated_body(exchange: Exchanger, clock: FakeClock) -> None:
    trace, seen = _run(exchange, clock, "/stream")
    assert seen == [trace, trace, trace]
    [chunk] = trace.find("span")
    assert (chunk.name, chunk.duration_ns, dict(chunk.attrs)) == ("render_chunk", MS, {"n": 1})


def test_current_trace_is_not_leaked_between_chunks(
    make_environ: MakeEnviron, clock: FakeClock
) -> None:
    middleware = TraceMiddleware(dummy_app, clock=clock)
    seen: list[Any] = []
    environ = make_environ("/stream", **{"test.clock": clock, "test.log": seen})
    body = middleware(environ, lambda *args: len)
    assert current_trace() is None
    iterator = iter(body)
    assert next(iterator) == b"one"
    assert current_trace() is None
    assert list(iterator) == [b"two"]
    body.close()  # type: ignore[attr-defined]
    assert current_trace() is None
    assert seen == [middleware.buffer.last] * 3


def test_current_trace_inside_close(exchange: Exchanger, clock: FakeClock) -> None:
    trace, seen = _run(exchange, clock, "/closing")
    assert seen == [trace, trace]


def test_span_outside_a_request_does_nothing() -> None:
    with span("nothing", a=1) as recorded:
        assert current_trace() is None
    assert isinstance(recorded, span)
    assert load_cart.__wrapped__ is not None  # type: ignore[attr-defined]

    class Clock:
        def advance(self, ns: int) -> None:
            pass

    assert load_cart(Clock(), 2) == [0, 1]  # type: ignore[arg-type]
    assert asyncio.run(fetch_prices(Clock())) == 42  # type: ignore[arg-type]
    with pytest.raises(ViewError), span("failing"):
        raise ViewError


def test_span_never_breaks_user_code(
    exchange: Exchanger, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_record(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError

    before = internal_error_count()
    monkeypatch.setattr(Trace, "record", broken_record)
    _, seen = _run(exchange, clock, "/span")
    assert internal_error_count() > before
    assert isinstance(seen[1], span)


def test_span_attributes_are_copied_when_the_span_ends(make_environ: MakeEnviron) -> None:
    """The trace keeps a copy of each attribute made when the span ended:
    the app's later changes don't show, its objects are not kept alive,
    and reading the trace runs none of their code.
    """
    reprs: list[str] = []

    class Connection:
        def __repr__(self) -> str:
            reprs.append("repr")
            return "<Connection db=1>"

    tables = ["users"]
    held = [Connection()]
    alive = weakref.ref(held[0])

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        with span("query", tables=tables, conn=held[0], note="x" * 5000):
            pass
        tables.append("orders")
        start_response("200 OK", [])
        return [b"ok"]

    middleware = TraceMiddleware(app, max_string=100)
    body = middleware(make_environ("/"), lambda *args: len)
    body.close()  # type: ignore[attr-defined]
    held.clear()
    assert alive() is None
    assert reprs == ["repr"]
    trace = middleware.buffer.last
    assert trace is not None
    [query] = trace.find("span")
    assert query.attrs["tables"] == ["users"]
    assert query.attrs["conn"] == "<Connection db=1>"
    assert query.attrs["note"] == "x" * 100 + TRUNCATION_MARKER
    trace.to_json()
    assert reprs == ["repr"]


def test_span_attributes_of_odd_types_stay_json(make_environ: MakeEnviron) -> None:
    """Attributes JSON cannot hold as they are (NaN, infinities, sets,
    bytes, objects) are kept as text, so the trace stays strict JSON.
    """

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        with span("odd", ratio=math.nan, limit=-math.inf, tags={"a"}, raw=b"\xff", n=None):
            pass
        start_response("200 OK", [])
        return [b"ok"]

    middleware = TraceMiddleware(app)
    body = middleware(make_environ("/"), lambda *args: len)
    body.close()  # type: ignore[attr-defined]
    trace = middleware.buffer.last
    assert trace is not None
    [odd] = [event for event in trace.to_dict()["events"] if event["kind"] == "span"]
    assert odd["attrs"] == {
        "ratio": "nan",
        "limit": "-inf",
        "tags": "{'a'}",
        "raw": "b'\\xff'",
        "n": None,
    }
    json.dumps(trace.to_dict(), allow_nan=False)


SHARED = span("shared")


def test_a_span_object_shared_by_concurrent_requests(make_environ: MakeEnviron) -> None:
    a_entered, b_entered, a_left = threading.Event(), threading.Event(), threading.Event()

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        # A enters, B enters, A leaves, B leaves: the exits are not LIFO.
        if environ["PATH_INFO"] == "/a":
            with SHARED:
                a_entered.set()
                assert b_entered.wait(5)
            a_left.set()
        else:
            assert a_entered.wait(5)
            with SHARED:
                b_entered.set()
                assert a_left.wait(5)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    middleware = TraceMiddleware(app)
    errors: list[BaseException] = []

    def request(path: str) -> None:
        try:
            body = middleware(make_environ(path), lambda *args: len)
            list(body)
            body.close()  # type: ignore[attr-defined]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=request, args=(path,)) for path in ("/a", "/b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert errors == []
    traces = {t.path: t for t in middleware.buffer}
    for path in ("/a", "/b"):
        [shared] = traces[path].find("span")
        assert shared.thread == traces[path].thread
        assert shared.end_ns <= traces[path].duration_ns  # type: ignore[operator]
    assert SHARED._starts == []
