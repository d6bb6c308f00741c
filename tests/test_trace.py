"""The trace model: recording, reading, caps and the JSON form."""

from __future__ import annotations

import json
import os
import re
from typing import TYPE_CHECKING, Any

import pytest

from wsgitrace import SCHEMA_VERSION, ConfigurationError, Event, Trace, TraceLimits, span
from wsgitrace.context import _current_trace
from wsgitrace.trace import TRUNCATION_MARKER, cut, format_error, jsonable

if TYPE_CHECKING:
    from .conftest import FakeClock

MS = 1_000_000


def _lifecycle(clock: FakeClock) -> Trace:
    """A finished trace with hooks, a span, attributes, an error and a warning."""
    trace = Trace("POST", "/orders", query="page=2", remote_addr="127.0.0.1", clock=clock)
    start = trace.start_ns
    trace.record("signal", "signal:request-started", start, start)
    trace.record("url_match", "url_match", start + 1 * MS, start + 1 * MS, {"endpoint": "orders"})
    trace.record("before_request", "before_request:load_user", start + 1 * MS, start + 3 * MS)
    trace.record("view", "view:orders", start + 3 * MS, start + 8 * MS, {"qualname": "orders"})
    trace.record("span", "pricing", start + 4 * MS, start + 6 * MS, {"items": 3})
    trace.record("after_request", "after_request:add_header", start + 8 * MS, start + 9 * MS)
    trace.record("teardown_request", "teardown_request:close_db", start + 9 * MS, start + 9 * MS)
    trace.status = "201 CREATED"
    trace.request_headers = ("Host", "localhost", "Accept", "*/*")
    trace.response_headers = ("Content-Type", "application/json")
    trace.endpoint, trace.rule, trace.view_args = "orders", "/orders", {"id": 7}
    try:
        raise ValueError("no stock")
    except ValueError as exc:
        trace.error = format_error(exc, "app", trace.limits)
    trace.g = {"user": "<User 1>"}
    trace.session_keys = ["user_id"]
    trace.warn("Content-Length mismatch: header says 3, the app's body has 2 bytes")
    trace.first_byte_ns = start + 9 * MS
    trace.bytes_sent, trace.chunks = 2, 1
    trace.end_ns = start + 10 * MS
    trace.finished = True
    trace.cursor = 42
    return trace


class TestTrace:
    def test_events_are_ordered_by_start_with_enclosing_first(self, clock: FakeClock) -> None:
        """Events sort by start; at equal starts the longer one comes first."""
        trace = Trace(clock=clock)
        base = trace.start_ns
        trace.record("span", "inner", base + 5, base + 6)
        trace.record("span", "later", base + 9, base + 9)
        trace.record("span", "outer", base + 5, base + 9)
        trace.record("span", "tie", base + 5, base + 6)
        assert [e.name for e in trace.events] == ["outer", "inner", "tie", "later"]
        assert [(e.start_ns, e.duration_ns) for e in trace.events][:2] == [(5, 4), (5, 1)]

    def test_hooks_lists_hook_and_view_events_in_order(self, clock: FakeClock) -> None:
        """hooks() keeps hook and view events only, in the order they ran."""
        trace = _lifecycle(clock)
        assert trace.hooks() == [
            "before_request:load_user",
            "view:orders",
            "after_request:add_header",
            "teardown_request:close_db",
        ]
        assert trace.summary()["hooks"] == 4

    def test_find_filters_by_kind_and_name(self, clock: FakeClock) -> None:
        """find() selects events by kind and/or name."""
        trace = _lifecycle(clock)
        assert [e.name for e in trace.find("span")] == ["pricing"]
        assert trace.find(name="view:orders")[0].attrs == {"qualname": "orders"}
        assert trace.find("view", "view:nope") == []

    def test_mark_records_an_instant_at_the_clock(self, clock: FakeClock) -> None:
        """mark() records a zero-length event now and returns the time."""
        trace = Trace(clock=clock)
        clock.advance(3 * MS)
        now = trace.mark("checkpoint", attrs={"n": 1})
        [event] = trace.events
        assert (now - trace.start_ns, event.start_ns, event.duration_ns) == (3 * MS, 3 * MS, 0)
        assert (event.kind, event.name, event.attrs) == ("checkpoint", "checkpoint", {"n": 1})

    def test_events_past_the_cap_are_counted(self, clock: FakeClock) -> None:
        """Past max_events, events are dropped and counted."""
        trace = Trace(clock=clock, limits=TraceLimits(max_events=10))
        for i in range(50):
            trace.mark("span", f"s{i}")
        kept = [e.name for e in trace.events]
        assert 1 <= len(kept) <= 10
        assert kept == [f"s{i}" for i in range(len(kept))]
        assert trace.dropped_events == 50 - len(kept)
        assert trace.to_dict()["dropped_events"] == 50 - len(kept)

    def test_events_from_other_threads_keep_their_thread(self, clock: FakeClock) -> None:
        """An event recorded on another thread names that thread."""
        import threading

        trace = Trace(clock=clock)
        trace.mark("span", "here")
        worker = threading.Thread(target=trace.mark, args=("span", "there"))
        worker.start()
        worker.join()
        here, there = trace.events
        assert here.thread == trace.thread == threading.get_ident()
        assert there.thread not in (trace.thread, 0)

    def test_warnings_are_deduplicated_and_capped(self, clock: FakeClock) -> None:
        """A warning is noted once; at most 32 are kept."""
        trace = Trace(clock=clock)
        trace.warn("same")
        trace.warn("same")
        assert trace.warnings == ["same"]
        for i in range(100):
            trace.warn(f"w{i}")
        assert trace.warnings is not None
        assert len(trace.warnings) == 32

    def test_state_follows_the_lifecycle(self, clock: FakeClock) -> None:
        """in_progress until finished; unclosed when the body was collected."""
        trace = Trace(clock=clock)
        assert trace.state == "in_progress"
        trace.finished = True
        assert trace.state == "finished"
        trace.warn("unclosed: the response body was garbage-collected without close()")
        assert trace.state == "unclosed"

    def test_durations_come_from_the_injected_clock(self, clock: FakeClock) -> None:
        """duration and time to first byte are exact with a fake clock."""
        trace = _lifecycle(clock)
        assert (trace.duration_ns, trace.duration_ms, trace.ttfb_ms) == (10 * MS, 10.0, 9.0)
        assert Trace(clock=clock).duration_ms is None

    def test_status_code_parses_the_status_line(self, clock: FakeClock) -> None:
        """status_code is the status line's number, or None."""
        trace = Trace(clock=clock)
        assert trace.status_code is None
        trace.status = "404 NOT FOUND"
        assert trace.status_code == 404
        trace.status = "bad"
        assert trace.status_code is None

    def test_ids_are_url_safe_unique_and_not_cursors(self, clock: FakeClock) -> None:
        """Ids are URL-safe, distinct and independent of the cursor."""
        traces = [Trace(clock=clock) for _ in range(1000)]
        ids = {t.id for t in traces}
        assert len(ids) == 1000
        assert all(re.fullmatch(r"[A-Za-z0-9_-]{8,}", i) for i in ids)
        assert all(not i.isdigit() for i in ids)

    def test_ids_differ_in_a_forked_child(self, clock: FakeClock) -> None:
        """A forked worker draws a new id prefix."""
        parent_id = Trace(clock=clock).id
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            os.close(read)
            os.write(write, Trace(clock=clock).id.encode())
            os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            child_id = pipe.read().decode()
        os.waitpid(pid, 0)
        assert child_id
        assert child_id.split("-")[0] != parent_id.split("-")[0]

    def test_long_path_and_query_are_cut_and_counted(self, clock: FakeClock) -> None:
        """A path or query longer than max_string is cut and counted."""
        trace = Trace(
            "GET", "/" + "a" * 50, query="b" * 50, clock=clock, limits=TraceLimits(max_string=10)
        )
        assert trace.path == "/aaaaaaaaa" + TRUNCATION_MARKER
        assert trace.query == "b" * 10 + TRUNCATION_MARKER
        assert trace.truncated == {"path": 1, "query": 1}

    def test_rarely_set_attributes_read_as_their_defaults(self, clock: FakeClock) -> None:
        """A fresh trace reads the attributes it leaves unset as their defaults."""
        trace = Trace(clock=clock)
        assert (
            trace.endpoint,
            trace.rule,
            trace.view_args,
            trace.truncated,
            trace.session_keys,
            trace.dropped_events,
            trace.content_length,
        ) == (None, None, None, None, None, 0, None)
        assert re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", trace.id)
        assert trace.id == trace.id
        data = trace.to_dict()
        assert (data["endpoint"], data["rule"], data["view_args"]) == (None, None, None)
        assert (data["truncated"], data["dropped_events"], data["session_keys"]) == ({}, 0, None)

    def test_rarely_set_attributes_keep_what_is_set(self, clock: FakeClock) -> None:
        """Set, they read back; another trace still reads the defaults."""
        trace = Trace(clock=clock)
        other = Trace(clock=clock)
        trace.endpoint, trace.rule = "orders", "/orders/<int:id>"
        trace.view_args = {"id": 7}
        trace.session_keys = ["user_id"]
        trace.dropped_events += 2
        trace.note_truncated("path")
        trace.note_truncated("path", 2)
        assert (
            trace.endpoint,
            trace.rule,
            trace.view_args,
            trace.session_keys,
            trace.dropped_events,
            trace.truncated,
        ) == ("orders", "/orders/<int:id>", {"id": 7}, ["user_id"], 2, {"path": 3})
        assert (other.endpoint, other.view_args, other.dropped_events, other.truncated) == (
            None,
            None,
            0,
            None,
        )
        assert Trace.from_dict({"id": "given-id"}).id == "given-id"

    def test_unknown_attributes_still_raise(self, clock: FakeClock) -> None:
        """Only the known lazy slots have defaults: anything else is an
        AttributeError naming it, and cannot be set."""
        trace = Trace(clock=clock)
        with pytest.raises(AttributeError, match="'Trace' object has no attribute 'no_such_field'"):
            _ = trace.no_such_field  # type: ignore[attr-defined]
        assert not hasattr(trace, "endpoints")
        with pytest.raises(AttributeError):
            trace.no_such_field = 1  # type: ignore[attr-defined]

    def test_event_room_leaves_space_for_the_wsgi_events(self, clock: FakeClock) -> None:
        """The six WSGI-level events count against max_events; at least one
        recorded event always fits."""
        assert TraceLimits(max_events=10).event_room == 4
        assert TraceLimits(max_events=3).event_room == 1
        assert TraceLimits().event_room == 256 - 6
        trace = Trace(clock=clock, limits=TraceLimits(max_events=10))
        for i in range(6):
            trace.mark("span", f"s{i}")
        assert [e.name for e in trace.events] == ["s0", "s1", "s2", "s3"]
        assert trace.dropped_events == 2

    def test_approx_size_grows_with_content(self, clock: FakeClock) -> None:
        """approx_size counts events, headers and strings."""
        small = Trace(clock=clock)
        big = _lifecycle(clock)
        assert 0 < small.approx_size < big.approx_size


class TestTraceJSON:
    def test_to_dict_is_json_with_schema_version(self, clock: FakeClock) -> None:
        """to_dict carries the schema version and serialises to JSON."""
        data = json.loads(_lifecycle(clock).to_json())
        assert data["schema"] == SCHEMA_VERSION == 1
        assert data["id"]
        assert isinstance(data["id"], str)
        assert (data["cursor"], data["method"], data["path"], data["status"]) == (
            42,
            "POST",
            "/orders",
            201,
        )
        assert (data["duration_ms"], data["ttfb_ms"], data["bytes"], data["hooks"]) == (
            10.0,
            9.0,
            2,
            4,
        )
        assert data["request_headers"] == [["Host", "localhost"], ["Accept", "*/*"]]
        assert data["error"]["type"] == "builtins.ValueError"
        assert data["error"]["where"] == "app"
        assert data["state"] == "finished"

    def test_event_names_and_attributes_are_cut_to_max_string(self, clock: FakeClock) -> None:
        """A span's name and string attributes (a SQL statement, say) are cut
        to the trace's max_string in the JSON form, like every other string.
        """
        trace = Trace("GET", "/", clock=clock, limits=TraceLimits(max_string=10))
        start = trace.start_ns
        sql = "SELECT * FROM a_table_with_a_long_name"
        trace.record("span", "query:" + "x" * 40, start, start + MS, {"sql": sql, "rows": [sql]})
        [event] = [e for e in trace.to_dict()["events"] if e["kind"] == "span"]
        assert event["name"] == "query:xxxx" + TRUNCATION_MARKER
        assert event["attrs"] == {
            "sql": "SELECT * F" + TRUNCATION_MARKER,
            "rows": ["SELECT * F" + TRUNCATION_MARKER],
        }
        # Reading keeps the name as recorded: hooks() and find() match it.
        assert trace.find(kind="span")[0].name == "query:" + "x" * 40

    def test_summary_has_the_listing_keys(self, clock: FakeClock) -> None:
        """summary() holds what /_trace lists, and no event list."""
        summary = _lifecycle(clock).summary()
        required = {"id", "cursor", "method", "path", "status", "duration_ms", "ttfb_ms"}
        assert required | {"bytes", "endpoint", "hooks"} <= set(summary)
        assert "events" not in summary
        assert summary["error"] == "builtins.ValueError"

    def test_from_dict_round_trips(self, clock: FakeClock) -> None:
        """from_dict(to_dict()) gives back the same events, hooks and fields."""
        trace = _lifecycle(clock)
        data = trace.to_dict()
        copy = Trace.from_dict(json.loads(json.dumps(data)))
        assert copy.to_dict() == data
        assert copy.hooks() == trace.hooks()
        assert [
            (e.kind, e.name, e.start_ns, e.duration_ns, dict(e.attrs)) for e in copy.events
        ] == [(e.kind, e.name, e.start_ns, e.duration_ns, dict(e.attrs)) for e in trace.events]
        assert (copy.id, copy.cursor, copy.state, copy.warnings) == (
            trace.id,
            42,
            "finished",
            trace.warnings,
        )

    def test_from_dict_keeps_an_in_progress_state(self, clock: FakeClock) -> None:
        """An in-progress trace read back is still in progress."""
        trace = Trace("GET", "/stream", clock=clock)
        trace.mark("span", "working")
        copy = Trace.from_dict(trace.to_dict())
        assert (copy.state, copy.duration_ms) == ("in_progress", None)
        assert copy.to_dict() == trace.to_dict()

    def test_a_recorded_request_round_trips(self, clock: FakeClock) -> None:
        """A trace made by the middleware (WSGI events) round-trips too."""
        from wsgitrace import TraceMiddleware

        def app(environ, start_response):  # type: ignore[no-untyped-def]
            clock.advance(MS)
            with span("work"):
                clock.advance(MS)
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok"]

        middleware = TraceMiddleware(app, clock=clock)
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "QUERY_STRING": ""}
        body = middleware(environ, lambda *args: len)
        list(body)
        body.close()  # type: ignore[attr-defined]
        trace = middleware.buffer.last
        assert trace is not None
        data = trace.to_dict()
        assert {e["kind"] for e in data["events"]} >= {"request", "app", "span", "close"}
        assert Trace.from_dict(data).to_dict() == data


class TestHelpers:
    def test_cut_marks_the_cut(self) -> None:
        """cut() keeps short text and marks cut text."""
        assert cut("abc", 3) == "abc"
        assert cut("abcd", 3) == "abc" + TRUNCATION_MARKER

    def test_jsonable_keeps_json_and_reprs_the_rest(self) -> None:
        """jsonable() passes JSON through and cuts reprs of other objects."""

        class Broken:
            def __repr__(self) -> str:
                raise RuntimeError

        assert jsonable({"a": [1, 2.5, None, True]}) == {"a": [1, 2.5, None, True]}
        assert jsonable(("x", b"y")) == ["x", "b'y'"]
        assert jsonable(object(), limit=5).endswith(TRUNCATION_MARKER)
        assert jsonable(Broken()) == "<repr failed: RuntimeError>"
        assert len(jsonable(list(range(500)))) == 100

    def test_jsonable_stops_at_its_depth(self) -> None:
        """Containers below ``depth`` levels, a container holding itself
        among them, are shown by their bounded repr.
        """
        looped: list[Any] = [1]
        looped.append(looped)
        assert jsonable(looped) == [1, [1, [1, "[1, [...]]"]]]
        assert jsonable({"a": {"b": [1]}}, depth=1) == {"a": "{'b': [1]}"}
        assert jsonable({("k", 1): 2}) == {"('k', 1)": 2}
        huge = jsonable([list(range(10**6))], limit=50, depth=1)
        assert huge[0].endswith(TRUNCATION_MARKER)
        assert len(huge[0]) < 100

    def test_format_error_describes_the_exception(self) -> None:
        """format_error() gives type, message, traceback and where."""
        try:
            raise KeyError("missing")
        except KeyError as exc:
            error = format_error(exc, "iteration", TraceLimits())
            short = format_error(exc, "iteration", TraceLimits(max_string=8))
        assert error["type"] == "builtins.KeyError"
        assert error["message"] == "'missing'"
        assert "test_format_error_describes_the_exception" in error["traceback"]
        assert error["traceback"].rstrip().endswith("KeyError: 'missing'")
        assert error["where"] == "iteration"
        assert short["message"] == "'missing" + TRUNCATION_MARKER
        assert len(short["traceback"]) <= 8 * 16 + len(TRUNCATION_MARKER)

    @pytest.mark.parametrize("bad", [0, -1, True, 1.5, "8"])
    def test_limits_reject_bad_values(self, bad: object) -> None:
        """TraceLimits refuses non-positive or non-integer caps, naming the value."""
        with pytest.raises(ConfigurationError, match=re.escape(repr(bad))):
            TraceLimits(max_events=bad)  # type: ignore[arg-type]

    def test_event_properties(self) -> None:
        """Event exposes milliseconds and its end."""
        event = Event("span", "s", 2 * MS, 3 * MS, 1, {"k": object()})
        assert (event.start_ms, event.duration_ms, event.end_ns) == (2.0, 3.0, 5 * MS)
        assert event.to_dict()["attrs"]["k"].startswith("<object object")

    def test_current_trace_var_is_unset_by_default(self) -> None:
        """No trace is current outside a request."""
        assert _current_trace.get() is None


def test_the_request_thread_and_another_record_at_once_without_mixing() -> None:
    """The request's thread and a worker (contextvars copied) recording into
    one trace at the same time: every event keeps its own timestamps and
    thread, and none is lost.
    """
    import sys
    import threading

    trace = Trace("GET", "/", clock=lambda: 0, limits=TraceLimits(max_events=100_000))
    count = 20_000
    worker_base = 10**9

    def record(tag: str, base: int) -> None:
        for i in range(count):
            trace.record_key((tag, tag, None), base + i, base + i)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        worker = threading.Thread(target=record, args=("worker", worker_base))
        worker.start()
        record("request", 0)
        worker.join()
    finally:
        sys.setswitchinterval(interval)
    events = trace.events
    assert len(events) == 2 * count
    for event in events:
        assert (event.kind == "worker") == (event.start_ns >= worker_base)
        assert event.duration_ns == 0
        assert (event.thread == trace.thread) == (event.kind == "request")
    assert trace.dropped_events == 0


def test_a_finalizer_recording_while_the_foreign_lock_is_held_does_not_deadlock() -> None:
    """A garbage collection inside a foreign thread's record can run a
    finalizer that records on the same thread (e.g. through app.logger):
    the lock it holds must let it in again.
    """
    import threading

    from wsgitrace.trace import _FOREIGN_LOCK

    trace = Trace("GET", "/")

    def worker() -> None:
        with _FOREIGN_LOCK:  # as inside Trace._record_foreign
            trace.record("log", "log:error", 1, 1)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    thread.join(5)
    assert not thread.is_alive()
    assert [e.name for e in trace.events if e.kind == "log"] == ["log:error"]


def test_keys_made_by_record_are_counted_in_the_size() -> None:
    """Spans, logs and other record() events build keys of their own: the
    byte accounting counts them (at least what tracemalloc sees), whether
    recorded on the request's thread or another.
    """
    import gc
    import threading
    import tracemalloc

    def fill(trace: Trace) -> None:
        for i in range(500):
            trace.record("span", f"span:step-{i}", i, i + 1, {"n": i, "label": f"item {i}"})

    for other_thread in (False, True):
        trace = Trace("GET", "/", limits=TraceLimits(max_events=1000))
        before_size = trace._estimate_size()
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            if other_thread:
                thread = threading.Thread(target=fill, args=(trace,))
                thread.start()
                thread.join()
            else:
                fill(trace)
            # Sizes are estimated when a trace finishes, its times packed.
            trace._pack_times()
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert len(trace.find(kind="span")) == 500
        assert trace._estimate_size() - before_size >= held, other_thread


def test_an_attribute_whose_size_cannot_be_read_is_still_recorded() -> None:
    """record() measures its attributes for the byte cap; a value whose
    __sizeof__ raises is recorded anyway, with a guessed size."""

    class Unsizable:
        def __sizeof__(self) -> int:
            raise ValueError("no size")

    trace = Trace("GET", "/")
    value = Unsizable()
    trace.record("span", "span:odd", 1, 2, {"value": value})
    [event] = trace.find(kind="span")
    assert event.attrs == {"value": value}
    assert trace._estimate_size() > 512


def test_dropped_events_add_nothing_to_the_size() -> None:
    """Events past max_events are counted as dropped, not in the bytes the
    trace is said to hold (which would evict it and others wrongly)."""
    trace = Trace("GET", "/", limits=TraceLimits(max_events=16))
    for i in range(10):
        trace.record("write", "write", i, i, {"bytes": i})
    kept = trace._estimate_size()
    for i in range(1000):
        trace.record("write", "write", i, i, {"bytes": i})
    assert trace.dropped_events == 1000
    assert trace._estimate_size() == kept


def test_an_int_status_reads_as_no_code_and_the_length_check_runs_once() -> None:
    """A test client may pass start_response an int: status_code is None
    (not an error), and the Content-Length check runs once."""
    trace = Trace("GET", "/")
    trace.status = 200  # type: ignore[assignment]
    assert trace.status_code is None
    trace.content_length = 10
    trace._length_check = True
    assert trace.warnings == ["Content-Length mismatch: header says 10, the app's body has 0 bytes"]
    assert trace._length_check is False


def test_a_finished_traces_times_are_packed_without_changing_its_events() -> None:
    """Timestamps are a list while recording and int64s once finished (an
    eighth of the memory); every event reads the same before and after.
    """
    from array import array

    trace = Trace("GET", "/")
    for i in range(5):
        trace.record("span", f"span:{i}", trace.start_ns + i, trace.start_ns + 2 * i)
    trace.end_ns = trace.start_ns + 100
    before = [(e.name, e.start_ns, e.duration_ns) for e in trace.events]
    assert isinstance(trace._times, list)

    trace._pack_times()

    assert isinstance(trace._times, array)
    assert trace._times.itemsize == 8
    assert [(e.name, e.start_ns, e.duration_ns) for e in trace.events] == before
    assert trace.duration_ms == pytest.approx(100 / 1e6)


def test_times_that_do_not_fit_int64_are_kept_as_recorded() -> None:
    start = 2**70
    trace = Trace("GET", "/", start_ns=start)
    trace.record("span", "span:big", start + 5, start + 9)

    trace._pack_times()

    assert isinstance(trace._times, list)
    [event] = trace.find(kind="span")
    assert (event.start_ns, event.duration_ns) == (5, 4)


def test_an_event_that_does_not_fit_a_finished_trace_leaves_it_consistent() -> None:
    """Times too large for a packed trace fail that one record, whole: the
    events before and after it keep their own times.
    """
    trace = Trace("GET", "/")
    start = trace.start_ns
    trace.record("span", "span:before", start + 1, start + 2)
    trace._pack_times()

    with pytest.raises(OverflowError):
        trace.record("span", "span:huge", start + 3, 2**70)
    trace.record("span", "span:after", start + 4, start + 6)

    spans = [(e.name, e.start_ns, e.duration_ns) for e in trace.find(kind="span")]
    assert spans == [("span:before", 1, 1), ("span:after", 4, 2)]
