"""The pytest plugin: the ``wsgitrace`` fixture and its assertions in this
process, and real pytest runs of small suites in subprocesses (through
``pytester``) for loading, reports, isolation, JSON output and xdist.
"""

from __future__ import annotations

import json
import os
import re
import threading
import urllib.request
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from flask import Flask, Response, g, stream_with_context
from werkzeug.serving import make_server
from werkzeug.test import Client

import wsgitrace
from wsgitrace import HookOrderError, Trace, TraceMiddleware
from wsgitrace.demo_app import create_app
from wsgitrace.flask import FlaskTrace
from wsgitrace.pytest_plugin import (
    TraceCapture,
    assert_hook_not_run,
    assert_hook_order,
    assert_short_circuited,
    assert_teardown_after_body,
    capture_traces,
    pytest_assertrepr_compare,
)

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

    from wsgitrace.pytest_plugin import WsgitraceCapture

ADMIN_HOOKS = [
    "before_request:load_user",
    "before_request:admin.require_admin",
    "after_request:add_server_timing",
    "teardown_appcontext:close_db",
]


def hello_app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]


@pytest.fixture(name="app")
def fixture_app() -> Flask:
    """The bundled example app, traced."""
    app = create_app()
    FlaskTrace(app)
    return app


def admin_trace(app: Flask, capture: TraceCapture) -> Trace:
    app.test_client().get("/admin/")
    return capture.last


class TestAssertHookOrder:
    def test_exact_order_passes(self, app: Flask, wsgitrace: TraceCapture) -> None:
        """The exact list of hooks that ran passes."""
        assert_hook_order(admin_trace(app, wsgitrace), ADMIN_HOOKS)

    def test_patterns_match_any_text(self, app: Flask, wsgitrace: TraceCapture) -> None:
        """``*`` in an expected name matches any text."""
        trace = admin_trace(app, wsgitrace)
        wsgitrace.assert_hook_order(
            trace, ["before_request:*", "before_request:admin.*", "after_request:*", "teardown_*"]
        )

    def test_exact_failure_shows_both_lists_and_where_they_diverge(
        self, app: Flask, wsgitrace: TraceCapture
    ) -> None:
        """The message names the first difference, aligns expected and ran,
        and hints at the short-circuit and the blueprint name.
        """
        trace = admin_trace(app, wsgitrace)
        expected = ["before_request:load_user", "before_request:require_admin", "view:dashboard"]
        with pytest.raises(HookOrderError) as info:
            assert_hook_order(trace, expected)
        assert isinstance(info.value, AssertionError)
        assert info.value.trace is trace
        lines = str(info.value).splitlines()
        assert lines[:3] == [
            "hook order differs from the expected one at position 1",
            "  expected: 'before_request:require_admin'",
            "  ran:      'before_request:admin.require_admin'",
        ]
        assert lines[3].startswith("  trace:    GET /admin/ -> 403 FORBIDDEN (4 hooks ran, id ")
        table = lines[lines.index("   exp  ran") + 1 :]
        assert table[:6] == [
            "     0    0    before_request:load_user",
            "     1    .  - before_request:require_admin",
            "     2    .  - view:dashboard",
            "     .    1  + before_request:admin.require_admin  (short-circuit)",
            "     .    2  + after_request:add_server_timing",
            "     .    3  + teardown_appcontext:close_db",
        ]
        assert "hint: did you mean 'before_request:admin.require_admin'?" in str(info.value)
        assert "before_request:admin.require_admin returned a response" in str(info.value)

    def test_missing_tail_is_named(self, app: Flask, wsgitrace: TraceCapture) -> None:
        """When every hook matched but more were expected, the message says
        nothing more ran.
        """
        trace = admin_trace(app, wsgitrace)
        with pytest.raises(HookOrderError, match="  ran:      nothing more"):
            assert_hook_order(trace, [*ADMIN_HOOKS, "teardown_request:close"])

    def test_subsequence_allows_hooks_between(self, app: Flask, wsgitrace: TraceCapture) -> None:
        """With ``exact=False`` other hooks may run between the expected ones."""
        trace = admin_trace(app, wsgitrace)
        assert_hook_order(
            trace, ["before_request:load_user", "teardown_appcontext:close_db"], exact=False
        )

    def test_subsequence_failure_says_why(self, app: Flask, wsgitrace: TraceCapture) -> None:
        """The first expected hook that did not follow the previous one is
        named, with whether it ran earlier or not at all.
        """
        trace = admin_trace(app, wsgitrace)
        with pytest.raises(HookOrderError) as info:
            assert_hook_order(trace, ["after_request:*", "before_request:load_user"], exact=False)
        assert (
            "expected[1] 'before_request:load_user' did not run after"
            " 'after_request:add_server_timing' (position 2): it ran earlier, at position 0"
        ) in str(info.value)
        with pytest.raises(HookOrderError) as info:
            assert_hook_order(trace, ["before_request:load_user", "view:*"], exact=False)
        assert (
            "expected[1] 'view:*' did not run after 'before_request:load_user' (position 0):"
            " it did not run at all"
        ) in str(info.value)
        with pytest.raises(HookOrderError) as info:
            assert_hook_order(trace, ["view:admin.dashboard"], exact=False)
        assert "expected[0] 'view:admin.dashboard' did not run at all\n" in str(info.value)

    def test_no_hooks_hint(self, wsgitrace: TraceCapture) -> None:
        """A trace without hook events (plain middleware) says how to get them."""
        Client(TraceMiddleware(hello_app)).get("/")
        with pytest.raises(HookOrderError, match="use FlaskTrace"):
            assert_hook_order(wsgitrace.last, ["view:index"])

    def test_names_that_can_never_match_are_refused(
        self, app: Flask, wsgitrace: TraceCapture
    ) -> None:
        """Input that could make an assertion pass or fail for the wrong
        reason is refused: unordered collections, non-strings, signals and
        unknown kinds, a kind without a name, a capture instead of a trace.
        """
        trace = admin_trace(app, wsgitrace)
        with pytest.raises(TypeError, match="ordered sequence"):
            assert_hook_order(trace, {"view:index", "before_request:load_user"}, exact=False)
        with pytest.raises(TypeError, match="a hook name is a string"):
            assert_hook_order(trace, ["view:index", 3])  # type: ignore[list-item]
        with pytest.raises(TypeError, match="a hook name is a string"):
            wsgitrace.assert_hook_not_run(trace, ["view:index"])  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="is a signal, not a hook"):
            wsgitrace.assert_hook_not_run(trace, "signal:request-started")
        with pytest.raises(ValueError, match=r"names no hook: .* kind one of"):
            wsgitrace.assert_hook_not_run(trace, "teardown:close_db")
        for bare in ("view", "before_request:"):
            # No hook is named without a function: this would always pass.
            with pytest.raises(ValueError, match=r"names no hook: .* write '\w+:\*'"):
                wsgitrace.assert_hook_not_run(trace, bare)
        with pytest.raises(TypeError, match=r"takes a Trace \(the capture's .last"):
            assert_hook_order(wsgitrace, ["view:index"])  # type: ignore[arg-type]
        wsgitrace.assert_hook_not_run(trace, "*:no_such_hook")  # a kind pattern is fine

    def test_dropped_events_make_negative_assertions_fail(self, wsgitrace: TraceCapture) -> None:
        """Hooks past the max_events cap are dropped: "did not run" cannot
        be asserted then, and failures name the cap instead of blaming a
        missing FlaskTrace.
        """
        from wsgitrace import span

        app = Flask(__name__)

        @app.route("/")
        def index() -> str:
            for _ in range(10):
                with span("query"):
                    pass
            return "ok"

        @app.after_request
        def add_header(response: Response) -> Response:
            return response

        FlaskTrace(app, max_events=12)
        app.test_client().get("/")
        trace = wsgitrace.last
        assert trace.dropped_events > 0
        assert "after_request:add_header" not in trace.hooks()
        with pytest.raises(HookOrderError, match="cannot tell whether") as info:
            wsgitrace.assert_hook_not_run(trace, "after_request:add_header")
        assert "dropped at the trace's max_events cap (12)" in str(info.value)
        with pytest.raises(HookOrderError) as info:
            assert_hook_order(trace, ["view:index", "after_request:add_header"])
        assert "events dropped" in str(info.value)
        assert "max_events" in str(info.value)
        assert "use FlaskTrace" not in str(info.value)

    def test_string_is_refused(self, app: Flask, wsgitrace: TraceCapture) -> None:
        """A single string is a mistake, not a list of one-letter names."""
        with pytest.raises(TypeError, match="not a string"):
            assert_hook_order(admin_trace(app, wsgitrace), "view:index")

    def test_plain_assert_gets_an_aligned_diff(self) -> None:
        """``assert trace.hooks() == [...]`` is explained like assert_hook_order;
        other lists are left to pytest.
        """
        ran = ["before_request:a", "view:index"]
        lines = pytest_assertrepr_compare(None, "==", ran, ["view:index"])  # type: ignore[arg-type]
        assert lines == [
            "hook lists differ (+ only in the left list, - only in the right)",
            "  left right",
            "     0     .  + before_request:a",
            "     1     0    view:index",
        ]
        # Either operand may be the expected list: sides are named, not guessed.
        lines = pytest_assertrepr_compare(None, "==", ["view:index"], ran)  # type: ignore[arg-type]
        assert lines is not None
        assert lines[2:] == ["     .     0  - before_request:a", "     0     1    view:index"]
        # A tuple never equals the list hooks() returns, and the diff says so.
        lines = pytest_assertrepr_compare(None, "==", ran, tuple(ran))  # type: ignore[arg-type]
        assert lines is not None
        assert lines[1] == "note: a list never equals a tuple; trace.hooks() is a list"
        assert pytest_assertrepr_compare(None, "==", ["a", "b"], ["b"]) is None  # type: ignore[arg-type]
        assert pytest_assertrepr_compare(None, "!=", ran, ran) is None  # type: ignore[arg-type]


class TestOtherAssertions:
    def test_hook_not_run(self, app: Flask, wsgitrace: TraceCapture) -> None:
        """A hook that ran fails the assertion, which says where it ran."""
        trace = admin_trace(app, wsgitrace)
        assert_hook_not_run(trace, "view:*")
        with pytest.raises(HookOrderError) as info:
            wsgitrace.assert_hook_not_run(trace, "after_request:*")
        assert "'after_request:*' ran, but should not have (position 2)" in str(info.value)
        assert " >   2  after_request:add_server_timing" in str(info.value).splitlines()

    def test_short_circuit(self, app: Flask, wsgitrace: TraceCapture) -> None:
        """The admin blueprint's hook short-circuits; the index does not."""
        trace = admin_trace(app, wsgitrace)
        assert_short_circuited(trace)
        wsgitrace.assert_short_circuited(trace, "before_request:admin.require_admin")
        with pytest.raises(HookOrderError, match="short-circuited, not 'before_request:load_user'"):
            assert_short_circuited(trace, "before_request:load_user")
        app.test_client().get("/")
        with pytest.raises(HookOrderError, match="no before_request hook short-circuited"):
            assert_short_circuited(wsgitrace.last)

    def test_teardown_after_a_streamed_body(self, app: Flask, wsgitrace: TraceCapture) -> None:
        """A stream_with_context body tears down (again) after the body; a
        plain response tears down before its body, and an unread body has no
        body event yet.
        """
        response = app.test_client().get("/stream")
        with pytest.raises(HookOrderError, match="the response body has not been iterated"):
            assert_teardown_after_body(wsgitrace.last)
        assert response.data.startswith(b"chunk 0")
        wsgitrace.assert_teardown_after_body(wsgitrace.last)
        app.test_client().get("/")
        with pytest.raises(HookOrderError) as info:
            assert_teardown_after_body(wsgitrace.last)
        assert "'teardown_appcontext:close_db' last ran before the body started" in str(info.value)
        assert "hint: Flask tears the request down when the view returns" in str(info.value)

    def test_teardown_request_hooks_are_checked(self, wsgitrace: TraceCapture) -> None:
        """teardown_request hooks count as teardown, and a response without
        any teardown hook says so.
        """
        app = Flask(__name__)
        wsgitrace.watch(app)

        @app.teardown_request
        def close_db(exc: BaseException | None) -> None:
            g.pop("db", None)

        @app.route("/stream")
        def stream() -> Response:
            return Response(stream_with_context(iter(["a", "b"])))

        assert app.test_client().get("/stream").data == b"ab"
        assert_teardown_after_body(wsgitrace.last)
        bare = Flask("bare")
        bare.add_url_rule("/", "index", lambda: "x")
        wsgitrace.watch(bare)
        assert bare.test_client().get("/").data == b"x"
        with pytest.raises(HookOrderError, match="no teardown_request or teardown_appcontext"):
            assert_teardown_after_body(wsgitrace.last)


class TestCapture:
    def test_last_sees_a_response_still_open(self, app: Flask, wsgitrace: TraceCapture) -> None:
        """A test client's response is never closed; its trace is there at once."""
        response = app.test_client().get("/admin/")
        trace = wsgitrace.last
        assert not trace.finished
        assert trace.hooks() == ADMIN_HOOKS
        response.close()
        assert trace.finished
        assert wsgitrace.all == [trace]
        assert list(wsgitrace) == [trace]
        assert len(wsgitrace) == 1

    def test_nothing_traced_fails_with_a_hint(self, wsgitrace: TraceCapture) -> None:
        """``.last`` without a traced request fails the test, saying why."""
        Client(hello_app).get("/")
        with pytest.raises(pytest.fail.Exception, match=r"wsgitrace\.watch\(app\)"):
            _ = wsgitrace.last

    def test_filter(self, app: Flask, wsgitrace: TraceCapture) -> None:
        """Traces are filtered by path (or pattern), endpoint, method and status."""
        client = app.test_client()
        client.get("/")
        client.get("/admin/")
        client.post("/admin/")
        client.get("/api/v1/items/tea")
        paths = [t.path for t in wsgitrace.filter(path="/admin/")]
        assert paths == ["/admin/", "/admin/"]
        assert [t.method for t in wsgitrace.filter(path="/admin/", method="post")] == ["POST"]
        assert [t.path for t in wsgitrace.filter(endpoint="api.*")] == ["/api/v1/items/tea"]
        assert [t.path for t in wsgitrace.filter(status=403)] == ["/admin/"]
        assert [t.path for t in wsgitrace.filter(status=405)] == ["/admin/"]
        assert wsgitrace.filter(path="/nowhere") == []
        wsgitrace.clear()
        assert wsgitrace.all == []

    def test_filter_pattern_takes_brackets_literally(self, wsgitrace: TraceCapture) -> None:
        """In a pattern, ``[`` is itself, not the start of a character class:
        ``/files/[id]/*`` finds the path with ``[id]`` in it, and not
        ``/files/i/raw``.
        """
        client = Client(TraceMiddleware(hello_app))
        for path in ("/files/[id]/raw", "/files/i/raw", "/files/d/raw"):
            client.get(path)
        assert [t.path for t in wsgitrace.filter(path="/files/[id]/*")] == ["/files/[id]/raw"]
        assert [t.path for t in wsgitrace.filter(path="/files/[?d]/*")] == ["/files/[id]/raw"]
        assert [t.path for t in wsgitrace.filter(path="/files/[!x]/*")] == []
        assert [t.path for t in wsgitrace.filter(path="/files/?/raw")] == [
            "/files/i/raw",
            "/files/d/raw",
        ]

    def test_watch_installs_flask_trace_once(self, wsgitrace: TraceCapture) -> None:
        """``watch`` traces an untraced app, returns an existing extension,
        and refuses anything but a Flask app.
        """
        app = create_app()
        ext = wsgitrace.watch(app)
        assert app.extensions["wsgitrace"] is ext
        assert wsgitrace.watch(app) is ext
        traced = create_app()
        existing = FlaskTrace(traced)
        assert wsgitrace.watch(traced) is existing
        app.test_client().get("/")
        assert wsgitrace.last.endpoint == "index"
        with pytest.raises(TypeError, match="TraceMiddleware"):
            wsgitrace.watch(hello_app)  # type: ignore[arg-type]

    def test_plain_middleware_and_werkzeug_client(self, wsgitrace: TraceCapture) -> None:
        """Any TraceMiddleware in the process is captured."""
        Client(TraceMiddleware(hello_app)).get("/plain", query_string="a=1")
        assert (wsgitrace.last.path, wsgitrace.last.query) == ("/plain", "a=1")

    def test_live_server_thread(self, app: Flask, wsgitrace: TraceCapture) -> None:
        """Requests served by a server thread are captured; ``wait`` waits
        until the server closed the response.
        """
        server = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            url = f"http://127.0.0.1:{server.server_port}/api/v1/items/jam"
            with urllib.request.urlopen(url, timeout=5) as response:
                assert response.read() == b'{"item":"jam"}\n'
            assert wsgitrace.last.path == "/api/v1/items/jam"
            (trace,) = wsgitrace.wait(1, timeout=5)
            assert trace.finished
            assert trace.thread != threading.get_ident()
        finally:
            server.shutdown()
            thread.join(5)

    def test_wait_times_out(self, app: Flask, wsgitrace: TraceCapture) -> None:
        """``wait`` fails when traces do not come, or stay open."""
        with pytest.raises(pytest.fail.Exception, match=r"0 traces captured after 0\.01s"):
            wsgitrace.wait(1, timeout=0.01)
        response = app.test_client().get("/")
        with pytest.raises(pytest.fail.Exception, match=r"call response\.close\(\)"):
            wsgitrace.wait(1, timeout=0.01)
        assert wsgitrace.wait(1, timeout=0.01, finished=False)[0].path == "/"
        response.close()
        assert wsgitrace.wait(1, timeout=1)[0].finished

    def test_request_started_before_the_capture_is_left_out(self, app: Flask) -> None:
        """A request still running from before the capture (an earlier test's)
        is not captured, even though it is published during it.
        """
        release = threading.Event()
        entered = threading.Event()

        @app.route("/held")
        def held() -> str:
            entered.set()
            release.wait(5)
            return "late"

        client = app.test_client()
        worker = threading.Thread(target=client.get, args=("/held",))
        worker.start()
        assert entered.wait(5)
        with capture_traces() as capture:
            release.set()
            worker.join(5)
            client.get("/")
        assert [t.path for t in capture.all] == ["/"]

    def test_clear_forgets_the_dropped_count(self, app: Flask) -> None:
        """After clear(), wait(n) waits for n new traces even when earlier
        ones were dropped at the cap.
        """
        with capture_traces(max_traces=2) as captured:
            for _ in range(3):
                app.test_client().get("/")
            assert captured.dropped == 1
            captured.clear()
            assert captured.dropped == 0
            with pytest.raises(pytest.fail.Exception, match="0 traces captured"):
                captured.wait(1, timeout=0.05, finished=False)

    def test_bad_max_traces_is_refused(self) -> None:
        for bad in (0, -1, None, 1.5, True):
            with pytest.raises(ValueError, match="max_traces must be a positive integer"):
                capture_traces(max_traces=bad).__enter__()  # type: ignore[arg-type]

    def test_capture_block_and_cap(
        self, app: Flask, wsgitrace: TraceCapture, wsgitrace_capture: WsgitraceCapture
    ) -> None:
        """``wsgitrace_capture`` captures one block; past ``max_traces`` the
        oldest are dropped and counted. The fixture still sees everything.
        """
        client = app.test_client()
        client.get("/")
        with wsgitrace_capture(max_traces=2) as block:
            for path in ("/a", "/b", "/c"):
                client.get(path)
        assert not block.active
        client.get("/after")
        assert [t.path for t in block.all] == ["/b", "/c"]
        assert block.dropped == 1
        assert "dropped=1" in repr(block)
        assert [t.path for t in wsgitrace.all] == ["/", "/a", "/b", "/c", "/after"]

    def test_a_broken_trace_never_reaches_the_app(self) -> None:
        """The listener swallows (and counts) its own errors."""
        with capture_traces() as capture:
            before = capture.internal_errors
            capture._on_trace(object())  # type: ignore[arg-type]
            assert capture.internal_errors == before + 1
        assert capture.all == []


def test_a_nested_session_leaves_failures_as_pytest_fail(pytester: pytest.Pytester) -> None:
    """After a pytest run inside this one (pytester, in process), wsgitrace's
    failures still go through pytest.fail, not a bare AssertionError.
    """
    pytester.makepyfile(test_inner="def test_ok():\n    pass\n")
    pytester.runpytest_inprocess("-p", "no:xdist").assert_outcomes(passed=1)
    with capture_traces() as captured, pytest.raises(pytest.fail.Exception):
        captured.last  # noqa: B018 - the property fails


def test_capture_failures_show_the_line_of_the_test(pytester: pytest.Pytester) -> None:
    """``.last`` with nothing captured and a ``.wait()`` that times out fail
    at the test's line, shown with pytest's traceback, without a frame of
    wsgitrace's own: not a bare message that leaves the user to guess which
    call of the test failed.
    """
    pytester.makepyfile(
        test_where="""
        def test_last(wsgitrace):
            assert len(wsgitrace) == 0
            wsgitrace.last

        def test_wait(wsgitrace):
            wsgitrace.wait(1, timeout=0.01)
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:xdist")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            "*_ test_last _*",
            ">*wsgitrace.last",
            "E*Failed: wsgitrace: no request was traced while capturing (during this test, or*",
            "test_where.py:3: Failed",
            "*_ test_wait _*",
            ">*wsgitrace.wait(1, timeout=0.01)",
            "E*Failed: wsgitrace: 0 traces captured after 0.01s, waited for 1",
            "test_where.py:6: Failed",
        ]
    )
    assert "testing.py" not in result.stdout.str()


def test_hook_order_failure_without_the_fixture_shows_its_trace(
    pytester: pytest.Pytester,
) -> None:
    """A unittest ``TestCase`` (which cannot take the fixture) using
    ``capture_traces`` gets the timeline of the trace its hook order
    assertion failed on, as a test with the fixture does; ``never`` still
    turns it off, and other failures of such a test get no section.
    """
    pytester.makepyfile(
        test_unit="""
        import unittest

        from wsgitrace.demo_app import create_app
        from wsgitrace.flask import FlaskTrace
        from wsgitrace.testing import assert_hook_not_run, capture_traces

        class AdminTest(unittest.TestCase):
            def setUp(self):
                self.app = create_app()
                FlaskTrace(self.app)

            def test_guest_reaches_the_dashboard(self):
                with capture_traces() as captured:
                    self.app.test_client().get("/admin/")
                assert_hook_not_run(captured.last, "before_request:admin.*")

            def test_other_failure(self):
                with capture_traces():
                    self.app.test_client().get("/admin/")
                self.assertEqual(1, 2)
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:xdist")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            "*_ AdminTest.test_guest_reaches_the_dashboard _*",
            "E*HookOrderError: 'before_request:admin.*' ran, but should not have*",
            "*- wsgitrace -*",
            "--- assertion failed on this trace",
            "GET /admin/ → 403 FORBIDDEN",
            "*before_request:admin.require_admin*",
            "*short-circuit*",
        ]
    )
    output = result.stdout.str()
    assert "- wsgitrace -" not in section(output, "AdminTest.test_other_failure")
    never = pytester.runpytest_subprocess("-p", "no:xdist", "--wsgitrace-report=never")
    never.assert_outcomes(failed=2)
    assert "- wsgitrace -" not in never.stdout.str()


def test_plain_assert_with_a_pattern_says_patterns_need_assert_hook_order(
    pytester: pytest.Pytester,
) -> None:
    """``assert trace.hooks() == ["before_request:*", ...]`` reads like
    ``assert_hook_order``, but ``==`` takes ``*`` literally: the diff says
    so, since the aligned lists alone only show the pattern as missing.
    """
    pytester.makepyfile(
        test_pattern="""
        from wsgitrace.demo_app import create_app

        def test_index(wsgitrace):
            app = create_app()
            wsgitrace.watch(app)
            app.test_client().get("/admin/", headers={"X-User": "admin"})
            assert wsgitrace.last.hooks() == [
                "before_request:*",
                "before_request:admin.require_admin",
                "view:admin.dashboard",
                "after_request:add_server_timing",
                "teardown_appcontext:close_db",
            ]

        def test_exact(wsgitrace):
            app = create_app()
            wsgitrace.watch(app)
            app.test_client().get("/admin/", headers={"X-User": "admin"})
            assert wsgitrace.last.hooks() == ["view:admin.dashboard"]
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:xdist")
    result.assert_outcomes(failed=2)
    note = "note: == compares names exactly, * and ? match only themselves;"
    result.stdout.fnmatch_lines(
        [
            "*_ test_index _*",
            "E*assert hook lists differ (+ only in the left list, - only in the right)",
            f"E*{note}*",
            "E*  -*before_request:[*]",
        ]
    )
    assert note in section(result.stdout.str(), "test_index")
    assert note not in section(result.stdout.str(), "test_exact")


def test_report_explains_unclosed_responses_of_a_test_client(pytester: pytest.Pytester) -> None:
    """Flask's test client never closes a response: its traces end
    ``unclosed``, a warning that in a failure report reads as a bug of the
    app. The report says what it usually means in a test; a test that closes
    its responses gets no such line.
    """
    pytester.makepyfile(
        test_responses="""
        from wsgitrace.demo_app import create_app

        def test_left_open(wsgitrace):
            app = create_app()
            wsgitrace.watch(app)
            app.test_client().get("/")
            assert False

        def test_closed(wsgitrace):
            app = create_app()
            wsgitrace.watch(app)
            app.test_client().get("/").close()
            assert False
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:xdist")
    result.assert_outcomes(failed=2)
    note = "⚠ unclosed, in a test, usually means the test did not close a response"
    output = result.stdout.str()
    left_open = section(output, "test_left_open")
    assert "⚠ unclosed: the response body was garbage-collected without close()" in left_open
    assert note in left_open
    closed = section(output, "test_closed")
    assert "- wsgitrace -" in closed
    assert "unclosed" not in closed


def test_keep_marker_added_by_a_conftest_hook_is_honoured(pytester: pytest.Pytester) -> None:
    """A conftest that marks a directory's tests ``wsgitrace_keep`` from its
    own ``pytest_collection_modifyitems`` (``trylast``, after pytest's) gets
    them captured from before their fixtures, like a decorated test.
    """
    pytester.makeconftest(
        """
        import pytest

        @pytest.hookimpl(trylast=True)
        def pytest_collection_modifyitems(items):
            for item in items:
                if "api" in item.nodeid:
                    item.add_marker(pytest.mark.wsgitrace_keep)
        """
    )
    pytester.makepyfile(
        test_api="""
        import pytest
        from wsgitrace.demo_app import create_app
        from wsgitrace.flask import FlaskTrace

        @pytest.fixture
        def client():
            app = create_app()
            FlaskTrace(app)
            client = app.test_client()
            client.get("/")  # a warm-up request, made before the wsgitrace fixture
            return client

        def test_warm_up_is_captured(client, wsgitrace):
            assert [t.path for t in wsgitrace.all] == ["/"]
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:xdist", "--wsgitrace-json=out.jsonl")
    result.assert_outcomes(passed=1)
    assert list(read_jsonl(pytester.path / "out.jsonl")) == ["test_warm_up_is_captured"]


def test_no_hooks_hint_names_a_mounted_app(pytester: pytest.Pytester) -> None:
    """An app mounted inside another (werkzeug's DispatcherMiddleware), both
    traced: the outer app's trace is the last one to arrive, with no hooks,
    though FlaskTrace is installed. The hint does not stop at "use
    FlaskTrace": it says the mounted app's trace is a separate one.
    """
    pytester.makepyfile(
        test_mounted="""
        from flask import Flask
        from werkzeug.middleware.dispatcher import DispatcherMiddleware
        from wsgitrace.flask import FlaskTrace

        def test_api_ping(wsgitrace):
            front, api = Flask("front"), Flask("api")

            @api.route("/ping")
            def ping():
                return "pong"

            FlaskTrace(api)
            front.wsgi_app = DispatcherMiddleware(front.wsgi_app, {"/api": api})
            FlaskTrace(front)
            front.test_client().get("/api/ping")
            assert [t.hooks() for t in wsgitrace.all] == [["view:ping"], []]
            wsgitrace.assert_hook_order(wsgitrace.last, ["view:ping"])
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:xdist")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "E*hint: no hooks were recorded; TraceMiddleware alone records WSGI events only,"
            "*DispatcherMiddleware*the other app's trace is a separate one",
        ]
    )


def test_report_cuts_long_timelines_but_keeps_every_hook(pytester: pytest.Pytester) -> None:
    """A view that opens 150 spans makes a trace of about 170 events: the
    report shows every hook and WSGI step of it, the first spans, and one row
    counting the spans left out, not 170 rows for each of its five timelines.
    """
    pytester.makepyfile(
        test_spans="""
        from flask import Flask
        from wsgitrace import span
        from wsgitrace.flask import FlaskTrace

        def test_busy_view(wsgitrace):
            app = Flask(__name__)
            FlaskTrace(app)

            @app.after_request
            def add_header(response):
                return response

            @app.route("/")
            def index():
                for i in range(150):
                    with span(f"query{i}"):
                        pass
                return "ok"

            client = app.test_client()
            for _ in range(5):
                client.get("/").close()
            assert False
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:xdist")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*- wsgitrace -*",
            "5 requests traced during this test",
            "long timelines are cut to about 40 events*",
            "*query0",
            "*… 1?? events not shown (span ×1??)",
            "*view:index",
            "*after_request:add_header",
            "*close",
        ]
    )
    report = result.stdout.str().partition("- wsgitrace -")[2]
    assert "query149" not in report
    assert len(report.splitlines()) < 300


OTHER_PROCESS_SERVER = """
from werkzeug.serving import make_server
from wsgitrace import TraceMiddleware

def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]

server = make_server("127.0.0.1", 0, TraceMiddleware(app))
print(server.port, flush=True)
server.handle_request()
"""


def test_nothing_captured_names_a_server_in_another_process(pytester: pytest.Pytester) -> None:
    """A server in another process (pytest-flask's ``live_server`` forks
    one) serves requests the capture never sees: ``.wait()`` and ``.last``
    say so, instead of only suggesting the app is not traced.
    """
    pytester.path.joinpath("server.py").write_text(OTHER_PROCESS_SERVER)
    pytester.makepyfile(
        test_live="""
        import subprocess, sys, urllib.request

        def test_server_in_a_subprocess(wsgitrace):
            proc = subprocess.Popen([sys.executable, "server.py"], stdout=subprocess.PIPE)
            try:
                port = int(proc.stdout.readline())
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
                    assert r.read() == b"ok"
            finally:
                proc.wait(10)
                proc.stdout.close()
            wsgitrace.wait(1, timeout=0.05)

        def test_last(wsgitrace):
            wsgitrace.last
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:xdist")
    result.assert_outcomes(failed=2)
    hint = "E*hint: only requests served in this process are captured; a server run in*"
    result.stdout.fnmatch_lines(
        [
            "*_ test_server_in_a_subprocess _*",
            "E*Failed: wsgitrace: 0 traces captured after 0.05s, waited for 1",
            hint,
            "*_ test_last _*",
            "E*Failed: wsgitrace: no request was traced while capturing (during this test, or*",
            "E*hint: trace the app with FlaskTrace(app)*",
            hint,
        ]
    )


def test_fixture_errors_show_no_plugin_frames(pytester: pytest.Pytester) -> None:
    """A fixture of a conftest failing in setup or teardown shows the same
    traceback as without the plugin: none of its frames.
    """
    pytester.makeconftest(
        """
        import pytest

        @pytest.fixture
        def db():
            raise RuntimeError("cannot connect to db")

        @pytest.fixture
        def tmpthing():
            yield
            raise RuntimeError("cannot clean up")
        """
    )
    pytester.makepyfile(
        test_errors="""
        def test_setup(db):
            pass

        def test_teardown(tmpthing):
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:xdist")
    result.assert_outcomes(passed=1, errors=2)
    assert "cannot connect to db" in result.stdout.str()
    assert "cannot clean up" in result.stdout.str()
    assert "pytest_plugin.py" not in result.stdout.str()


def test_entry_point_is_installed() -> None:
    """pytest loads the plugin from the ``pytest11`` entry point."""
    names = {ep.name: ep.value for ep in entry_points(group="pytest11")}
    assert names.get("wsgitrace") == "wsgitrace.pytest_plugin", (
        "install the package (pip install -e .) to register its pytest11 entry point"
    )


# -- real pytest runs -------------------------------------------------------------


@pytest.fixture(autouse=True)
def _subprocesses_import_this_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    """pytester's subprocesses run in a temporary directory, where
    ``import wsgitrace`` would find the installed copy (an editable install
    may point at another checkout): put this one first on their path.
    """
    root = os.path.dirname(os.path.dirname(wsgitrace.__file__))
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    monkeypatch.setenv("PYTHONPATH", path)


CONFTEST = """
import threading

import pytest
from werkzeug.serving import make_server

from wsgitrace.demo_app import create_app
from wsgitrace.flask import FlaskTrace

RELEASE = threading.Event()
ENTERED = threading.Event()


@pytest.fixture
def app():
    app = create_app()
    FlaskTrace(app)
    return app


@pytest.fixture(scope="session")
def live_url():
    app = create_app()
    FlaskTrace(app)

    @app.route("/held")
    def held():
        ENTERED.set()
        RELEASE.wait(10)
        return "held"

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    RELEASE.set()
    server.shutdown()
"""

TEST_HOOKS = """
import threading
import urllib.request

import pytest

from wsgitrace.demo_app import create_app


def test_passes(app, wsgitrace):
    app.test_client().get("/admin/")
    wsgitrace.assert_hook_order(
        wsgitrace.last,
        ["before_request:load_user", "before_request:admin.require_admin"],
        exact=False,
    )


def test_order_fails(app, wsgitrace):
    app.test_client().get("/")
    app.test_client().get("/admin/")
    wsgitrace.assert_hook_order(
        wsgitrace.last,
        ["before_request:load_user", "before_request:admin.require_admin", "view:admin.dashboard"],
    )


def test_without_fixture(app):
    app.test_client().get("/admin/")
    assert False, "fails without the fixture"


def test_factory_watched(wsgitrace):
    app = create_app({"TESTING": True})
    wsgitrace.watch(app)
    app.test_client().get("/")
    app.test_client().get("/api/v1/items/tea")
    assert [t.endpoint for t in wsgitrace.all] == ["index", "api.v1.item"]


def test_sees_only_its_own(app, wsgitrace):
    app.test_client().get("/api/v1/items/jam")
    assert [t.path for t in wsgitrace.all] == ["/api/v1/items/jam"]


def test_leaves_a_request_running(live_url):
    from conftest import ENTERED

    threading.Thread(target=urllib.request.urlopen, args=(live_url + "/held",)).start()
    assert ENTERED.wait(5)


def test_live_server_request_of_earlier_test_left_out(live_url, wsgitrace):
    from conftest import RELEASE

    RELEASE.set()
    assert urllib.request.urlopen(live_url + "/").status == 200
    wsgitrace.wait(1)
    assert [t.path for t in wsgitrace.all] == ["/"]


@pytest.mark.wsgitrace_keep
def test_kept_without_fixture(app):
    app.test_client().get("/admin/")


@pytest.fixture
def early_request(app):
    app.test_client().get("/early")


@pytest.mark.wsgitrace_keep
def test_kept_captures_fixture_requests(early_request, app, wsgitrace):
    app.test_client().get("/late")
    assert [t.path for t in wsgitrace.all] == ["/early", "/late"]


def test_unmarked_misses_earlier_fixture_requests(early_request, app, wsgitrace):
    app.test_client().get("/late")
    assert [t.path for t in wsgitrace.all] == ["/late"]


def test_fails_without_requests(wsgitrace):
    assert False
"""


def section(output: str, test: str) -> str:
    """The failure (or pass) block of one test in pytest's output."""
    match = re.search(
        rf"_{{3,}} {re.escape(test)} _{{3,}}\n(.*?)(?=\n_{{3,}} |\n={{3,}} )", output, re.S
    )
    assert match, f"no block for {test} in:\n{output}"
    return match.group(1)


def read_jsonl(path: Any) -> dict[str, dict[str, Any]]:
    records = [json.loads(line) for line in path.read_text("utf-8").splitlines()]
    return {r["nodeid"].rpartition("::")[2]: r for r in records}


def test_failure_report_isolation_and_json(pytester: pytest.Pytester) -> None:
    """One run: a passing test, a failing order assertion with its diff and
    the timeline section, failing tests without the fixture or without
    requests (no section), factories, tests that do not see each other's
    traces (even a live server request left running by an earlier test), the
    ``wsgitrace_keep`` marker (capturing from before the fixtures), and the
    JSON Lines file.
    """
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_hooks=TEST_HOOKS)
    result = pytester.runpytest_subprocess("--wsgitrace-json=out/traces.jsonl", "-p", "no:xdist")
    result.assert_outcomes(passed=8, failed=3)
    result.stdout.fnmatch_lines(
        [
            "*_ test_order_fails _*",
            "E*HookOrderError: hook order differs from the expected one at position 2",
            "E*  expected: 'view:admin.dashboard'",
            "E*  ran:      'after_request:add_server_timing'",
            "E*  trace:    GET /admin/ -> 403 FORBIDDEN (4 hooks ran, id *",
            "E*   exp  ran",
            "E*     0    0    before_request:load_user",
            "E*     1    1    before_request:admin.require_admin  (short-circuit)",
            "E*     2    .  - view:admin.dashboard",
            "E*     .    2  + after_request:add_server_timing",
            "E*hint: before_request:admin.require_admin returned a response (short-circuit)*",
            "*- wsgitrace -*",
            "2 requests traced during this test",
            "TIME * METHOD * PATH * ST * DUR * TTFB * BYTES * HOOKS",
            "*GET * /admin/ * 403 *",
            "--- assertion failed on this trace",
            "GET /admin/ → 403 FORBIDDEN",
            "*before_request:admin.require_admin*",
            "*short-circuit*",
            "GET / → 200 OK",
            "*view:index*",
            "*_ test_without_fixture _*",
            "wsgitrace: traces of 3 tests written to *traces.jsonl",
        ]
    )
    output = result.stdout.str()
    assert "wsgitrace -" not in section(output, "test_without_fixture")
    assert "wsgitrace -" not in section(output, "test_fails_without_requests")
    assert "\x1b[" not in output
    records = read_jsonl(pytester.path / "out" / "traces.jsonl")
    assert sorted(records) == [
        "test_kept_captures_fixture_requests",
        "test_kept_without_fixture",
        "test_order_fails",
    ]
    failed = records["test_order_fails"]
    assert (failed["outcome"], failed["schema"], failed["dropped"]) == ("failed", 1, 0)
    # The README's option table lists every key of a record.
    readme = (Path(__file__).parent.parent / "README.md").read_text("utf-8")
    row = re.search(r"^\| `--wsgitrace-json=PATH` \|.*$", readme, re.M)
    assert row is not None
    listed = re.search(r"one object per test \(([^)]*)\)", row.group(0))
    assert listed is not None
    assert set(re.findall(r"`(\w+)`", listed.group(1))) == set(failed)
    assert [t["path"] for t in failed["traces"]] == ["/", "/admin/"]
    assert "before_request:admin.require_admin" in [
        e["name"] for e in failed["traces"][1]["events"]
    ]
    kept = records["test_kept_without_fixture"]
    assert (kept["outcome"], kept["worker"]) == ("passed", None)
    assert kept["traces"][0]["status"] == 403


def test_xdist_workers_report_to_one_file(pytester: pytest.Pytester) -> None:
    """Under xdist each worker captures its own tests; the controller shows
    their sections and writes one JSON Lines file with every kept test.
    """
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        test_one="""
        def test_one_fails(app, wsgitrace):
            app.test_client().get("/one")
            assert len(wsgitrace.all) == 1
            assert False
        """,
        test_two="""
        def test_two_fails(app, wsgitrace):
            app.test_client().get("/two")
            app.test_client().get("/two")
            assert len(wsgitrace.all) == 2
            assert False

        def test_two_passes(app, wsgitrace):
            app.test_client().get("/admin/")
            wsgitrace.assert_short_circuited(wsgitrace.last)
        """,
    )
    result = pytester.runpytest_subprocess(
        "-n", "2", "--dist", "loadfile", "--wsgitrace-json", "t.jsonl", "--wsgitrace-keep-passed"
    )
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(["*_ test_one_fails _*", "*- wsgitrace -*", "1 request traced*"])
    result.stdout.fnmatch_lines(["*_ test_two_fails _*", "*- wsgitrace -*", "2 requests traced*"])
    result.stdout.fnmatch_lines(["wsgitrace: traces of 3 tests written to *t.jsonl"])
    records = read_jsonl(pytester.path / "t.jsonl")
    assert {name: len(r["traces"]) for name, r in records.items()} == {
        "test_one_fails": 1,
        "test_two_fails": 2,
        "test_two_passes": 1,
    }
    assert {r["worker"] for r in records.values()} <= {"gw0", "gw1"}
    assert records["test_two_passes"]["outcome"] == "passed"


def test_json_file_takes_text_that_is_not_utf8(pytester: pytest.Pytester) -> None:
    """A trace holding a lone surrogate (an error message with a file name
    decoded with surrogateescape) is written to the JSON file, with or
    without xdist, instead of crashing the run with an INTERNALERROR.
    """
    pytester.makepyfile(
        """
        import pytest
        from flask import Flask

        from wsgitrace.flask import FlaskTrace


        def test_bad_file_name(wsgitrace):
            app = Flask(__name__)
            app.testing = True
            FlaskTrace(app)

            @app.route("/")
            def index():
                name = b"report-\\xff.txt".decode("utf-8", "surrogateescape")
                raise FileNotFoundError("no file " + name)

            with pytest.raises(FileNotFoundError):
                app.test_client().get("/")
            assert False
        """
    )
    for args in (["-p", "no:xdist"], ["-n", "2"]):
        result = pytester.runpytest_subprocess("--wsgitrace-json=t.jsonl", *args)
        result.assert_outcomes(failed=1)
        assert "INTERNALERROR" not in result.stdout.str()
        (record,) = read_jsonl(pytester.path / "t.jsonl").values()
        assert record["traces"][0]["error"]["message"] == "no file report-\udcff.txt"


def test_loading_costs_no_flask_or_rich_and_can_be_disabled(pytester: pytest.Pytester) -> None:
    """The plugin is loaded from its entry point without importing Flask or
    rich, even when a plain WSGI test uses the fixture; ``-p no:wsgitrace``
    removes it, options included.
    """
    pytester.makepyfile(
        """
        import sys

        from werkzeug.test import Client

        from wsgitrace import TraceMiddleware


        def hello(environ, start_response):
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"hi"]


        def test_plugin_loaded(request):
            assert request.config.pluginmanager.has_plugin("wsgitrace")
            assert "flask" not in sys.modules and "rich" not in sys.modules


        def test_fixture_on_plain_wsgi(wsgitrace):
            Client(TraceMiddleware(hello)).get("/x")
            assert wsgitrace.last.path == "/x"
            assert wsgitrace.last.hooks() == []
            assert "flask" not in sys.modules and "rich" not in sys.modules
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:xdist", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    disabled = pytester.runpytest_subprocess("-p", "no:wsgitrace", "-p", "no:xdist")
    disabled.assert_outcomes(failed=1, errors=1)
    disabled.stdout.fnmatch_lines(["*fixture 'wsgitrace' not found*"])
    refused = pytester.runpytest_subprocess("-p", "no:wsgitrace", "--wsgitrace-report=always")
    refused.stderr.fnmatch_lines(["*unrecognized arguments: --wsgitrace-report=always*"])


def test_report_modes_and_fault_isolation(pytester: pytest.Pytester) -> None:
    """``wsgitrace_report = always`` shows passing tests' requests (and the
    dropped count); a renderer that raises only changes the section's text,
    never a test's outcome; the command line beats the ini file.
    """
    pytester.makeini(
        """
        [pytest]
        wsgitrace_report = always
        wsgitrace_max_traces = 2
        """
    )
    pytester.makeconftest(
        CONFTEST
        + """
import wsgitrace.render


def broken(*args, **kwargs):
    raise RuntimeError("renderer is broken")


wsgitrace.render.build_timeline = broken
"""
    )
    pytester.makepyfile(
        """
        def test_passes(app, wsgitrace):
            for path in ("/", "/admin/", "/api/v1/items/tea"):
                app.test_client().get(path)
            assert len(wsgitrace.all) == 2

        def test_fails(app, wsgitrace):
            app.test_client().get("/")
            assert False
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:xdist")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*_ test_fails _*",
            "*- wsgitrace -*",
            "1 request traced during this test",
            "wsgitrace: rendering failed (RuntimeError: renderer is broken); hook lists:",
            "  GET / -> 200 OK: ?'before_request:load_user', 'view:index', *",
            "*= wsgitrace: requests of passed tests =*",
            "*_ test_*.py::test_passes _*",
            "2 requests traced during this test",
            "1 earlier trace dropped (wsgitrace_max_traces=2)",
            "wsgitrace: rendering failed (RuntimeError: renderer is broken); hook lists:",
            "  GET /admin/ -> 403 FORBIDDEN: *",
            "  GET /api/v1/items/tea -> 200 OK: *",
        ]
    )
    never = pytester.runpytest_subprocess("-p", "no:xdist", "--wsgitrace-report=never")
    never.assert_outcomes(passed=1, failed=1)
    assert "- wsgitrace -" not in never.stdout.str()
    assert "rendering failed" not in never.stdout.str()
    pytester.makeini("[pytest]\nwsgitrace_report = sometimes\n")
    bad = pytester.runpytest_subprocess("-p", "no:xdist")
    bad.stderr.fnmatch_lines(["*wsgitrace_report must be one of failed, always, never*"])


def _write_toml_ini(pytester: pytest.Pytester, text: str) -> None:
    """Write ``text`` (``key = value`` lines) as TOML settings: pytest 9's
    native ``pytest.toml``, which keeps TOML's types; pytest 8 reads no
    ``pytest.toml``, and gives ``[tool.pytest.ini_options]`` values as strings.
    """
    if pytest.version_tuple >= (9,):
        pytester.path.joinpath("pytest.toml").write_text(f"[pytest]\n{text}\n")
    else:
        pytester.path.joinpath("pyproject.toml").write_text(f"[tool.pytest.ini_options]\n{text}\n")


def test_max_traces_from_native_toml_and_bad_values(pytester: pytest.Pytester) -> None:
    """``wsgitrace_max_traces`` takes native TOML's integer as well as an ini
    file's string; a value that is not a positive integer stops the run
    with a one-line usage error naming the option.
    """
    pytester.makepyfile(
        """
        def test_three_requests(wsgitrace):
            from wsgitrace import TraceMiddleware
            from werkzeug.test import Client

            def app(environ, start_response):
                start_response("200 OK", [("Content-Type", "text/plain")])
                return [b"ok"]

            client = Client(TraceMiddleware(app))
            for path in ("/a", "/b", "/c"):
                client.get(path).close()
            assert [t.path for t in wsgitrace.all] == ["/b", "/c"]
            assert wsgitrace.dropped == 1
        """
    )
    _write_toml_ini(pytester, "wsgitrace_max_traces = 2")
    pytester.runpytest_subprocess("-p", "no:xdist").assert_outcomes(passed=1)
    for value in ("0", "2.5", "true", '"lots"'):
        _write_toml_ini(pytester, f"wsgitrace_max_traces = {value}")
        bad = pytester.runpytest_subprocess("-p", "no:xdist")
        # wsgitrace's message, or pytest's own for a TOML value of another type.
        assert bad.ret == pytest.ExitCode.USAGE_ERROR, value
        bad.stderr.fnmatch_lines(["ERROR: *wsgitrace_max_traces*"])
        assert "Traceback" not in bad.stderr.str()
    for name in ("pytest.toml", "pyproject.toml"):
        pytester.path.joinpath(name).unlink(missing_ok=True)
    pytester.makeini("[pytest]\nwsgitrace_max_traces = lots\n")
    bad = pytester.runpytest_subprocess("-p", "no:xdist")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*wsgitrace_max_traces must be a positive integer*lots*"])


@pytest.fixture(autouse=True)
def _no_leftover_listeners() -> Iterator[None]:
    """Every capture removes its listener."""
    from wsgitrace._internal import _capture_listeners

    before = list(_capture_listeners)
    yield
    assert _capture_listeners == before


def test_report_shows_what_the_apps_buffers_and_sinks_dropped(pytester: pytest.Pytester) -> None:
    """The report says what the buffers (max_traces, max_bytes) and sinks
    (full queue, failed delivery) of the apps the test made requests to
    dropped during the test, per app; a later test of the same app that
    dropped nothing gets no such line. The ``--wsgitrace-json`` records
    have the same counts, in ``app_drops``.
    """
    pytester.makepyfile(
        test_drops="""
        import threading

        import pytest
        from werkzeug.test import Client

        from wsgitrace import TraceMiddleware
        from wsgitrace.demo_app import create_app
        from wsgitrace.flask import FlaskTrace
        from wsgitrace.sinks import SinkDispatcher

        def hello(environ, start_response):
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"hello"]

        def slow_app(environ, start_response):
            return hello(environ, start_response)

        def broken_app(environ, start_response):
            return hello(environ, start_response)

        class Blocking:
            def __init__(self):
                self.entered = threading.Event()
                self.release = threading.Event()
            def write(self, traces):
                self.entered.set()
                self.release.wait(10)
            def close(self):
                pass

        class Raising:
            def write(self, traces):
                raise OSError("disk full")
            def close(self):
                pass

        @pytest.fixture(scope="module")
        def apps():
            flask_app = create_app()
            FlaskTrace(flask_app, max_traces=2)
            small = TraceMiddleware(hello, max_bytes=1)
            slow = TraceMiddleware(slow_app)
            blocking = Blocking()
            slow.sinks = SinkDispatcher([blocking], max_queue=1)
            broken = TraceMiddleware(broken_app)
            broken.sinks = SinkDispatcher([Raising()])
            yield flask_app, small, slow, blocking, broken
            blocking.release.set()

        def test_drops(apps, wsgitrace):
            flask_app, small, slow, blocking, broken = apps
            for n in range(4):
                flask_app.test_client().get(f"/p{n}").close()
            for n in range(2):
                Client(small).get("/").close()
            Client(slow).get("/").close()
            assert blocking.entered.wait(10)  # the queue is empty again
            for n in range(3):
                Client(slow).get("/").close()
            Client(broken).get("/").close()
            assert broken.sinks.flush(10)
            assert False

        def test_nothing_dropped(apps, wsgitrace):
            flask_app, small, slow, blocking, broken = apps
            flask_app.extensions["wsgitrace"].buffer.clear()  # room for one more
            flask_app.test_client().get("/").close()
            assert False
        """
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:xdist", "-p", "no:randomly", "--wsgitrace-json=out.jsonl"
    )
    result.assert_outcomes(failed=2)
    output = result.stdout.str()
    drops = section(output, "test_drops")
    for line in (
        "app 'wsgitrace.demo_app': 2 traces evicted from its buffer (max_traces=2): gone from"
        " its /_trace and tail, not from this report",
        "app 'hello': 2 traces evicted from its buffer (max_bytes=1): gone from its /_trace"
        " and tail, not from this report",
        "app 'slow_app': 2 traces dropped by its sinks' full queues (sink_queue=1)",
        "app 'broken_app': 1 trace not delivered by its sinks, which failed (the 'wsgitrace'"
        " logger logs each sink's first failure)",
    ):
        assert line in drops
    assert drops.count("app '") == 4
    nothing = section(output, "test_nothing_dropped")
    assert "- wsgitrace -" in nothing
    assert "app '" not in nothing
    records = read_jsonl(pytester.path / "out.jsonl")
    assert records["test_drops"]["app_drops"] == [
        {"app": "wsgitrace.demo_app", "cap": "max_traces", "count": 2, "limit": 2},
        {"app": "hello", "cap": "max_bytes", "count": 2, "limit": 1},
        {"app": "slow_app", "cap": "sink_queue", "count": 2, "limit": 1},
        {"app": "broken_app", "cap": "sink_failed", "count": 1, "limit": None},
    ]
    assert records["test_nothing_dropped"]["app_drops"] == []


def test_module_fixture_captures_with_capture_traces_not_the_fixture(
    pytester: pytest.Pytester,
) -> None:
    """As the README says: a module-scoped fixture cannot request the
    function-scoped ``wsgitrace`` (ScopeMismatch), and captures its requests
    with ``capture_traces()``, while a test's ``wsgitrace`` sees the test's.
    """
    pytester.makepyfile(
        test_scopes="""
        import pytest
        from wsgitrace.demo_app import create_app
        from wsgitrace.flask import FlaskTrace
        from wsgitrace.testing import capture_traces

        @pytest.fixture(scope="module")
        def app():
            app = create_app()
            FlaskTrace(app)
            with capture_traces() as warm_up:
                app.test_client().get("/").close()
            assert [t.path for t in warm_up.all] == ["/"]
            return app

        @pytest.fixture(scope="module")
        def wrong(wsgitrace):
            return wsgitrace

        def test_uses_capture_traces(app, wsgitrace):
            app.test_client().get("/admin/").close()
            assert [t.path for t in wsgitrace.all] == ["/admin/"]

        def test_requests_the_fixture(wrong):
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:xdist", "-p", "no:randomly")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*ScopeMismatch*function scoped fixture wsgitrace*"])


def test_report_counts_one_of_a_kind_in_the_singular(
    app: Flask, pytestconfig: pytest.Config
) -> None:
    """One dropped trace, one internal error, one hook: no stray plurals."""
    from wsgitrace._hook_assertions import _trace_line
    from wsgitrace._internal import report_internal_error
    from wsgitrace._pytest_report import _report_text

    with capture_traces(max_traces=1) as captured:
        app.test_client().get("/p0")
        app.test_client().get("/p1")
        try:
            raise RuntimeError("a bug in wsgitrace")
        except RuntimeError:
            report_internal_error("test_report_counts")
        with pytest.raises(pytest.fail.Exception, match=r"1 trace captured after 0\.01s"):
            captured.wait(3, timeout=0.01)
    text = _report_text(pytestconfig, captured, None)
    assert "1 earlier trace dropped (wsgitrace_max_traces=1)" in text
    assert "wsgitrace caught 1 internal error during this test" in text
    one_hook = Flask(__name__)
    FlaskTrace(one_hook)
    one_hook.before_request(lambda: None)
    with capture_traces() as captured:
        one_hook.test_client().get("/missing")  # a 404: no view ran
    assert captured.last.hooks() == ["before_request:<lambda>"]
    assert "(1 hook ran, id " in "\n".join(_trace_line(captured.last))


def test_report_shows_the_failed_trace_and_the_newest_others(
    app: Flask, pytestconfig: pytest.Config
) -> None:
    """When the assertion failed on an early trace, the report's timelines
    are that trace and the newest others: the last request is never left out.
    """
    from wsgitrace._pytest_report import _report_text

    with capture_traces() as captured:
        focus = admin_trace(app, captured)
        for n in range(6):
            app.test_client().get(f"/p{n}")
    text = _report_text(pytestconfig, captured, focus)
    timelines = re.findall(r"^GET (\S+) →", text, re.M)
    assert timelines == ["/admin/", "/p2", "/p3", "/p4", "/p5"]
    assert "timelines of the one the assertion failed on and the last 4 shown" in text


@pytest.mark.parametrize(
    ("columns", "width"), [("120", 120), ("40", 80), ("999", 160), ("wide", 100), ("", 100)]
)
def test_report_width_without_a_terminal_writer_reads_columns(
    monkeypatch: pytest.MonkeyPatch, columns: str, width: int
) -> None:
    """Without a terminal writer (e.g. ``-p no:terminal``), the report is as
    wide as ``COLUMNS`` says, within 80 to 160; a value that is not a number
    gives the default instead of losing the report.
    """
    from wsgitrace._pytest_report import _width

    class NoTerminal:
        def get_terminal_writer(self) -> Any:
            raise AttributeError("no terminal reporter")

    monkeypatch.setenv("COLUMNS", columns)
    assert _width(NoTerminal()) == width  # type: ignore[arg-type]


def test_keep_passed_without_a_json_file_is_a_usage_error(pytester: pytest.Pytester) -> None:
    """--wsgitrace-keep-passed alone would do nothing: the run stops and says
    what is missing; with the file it runs.
    """
    pytester.makepyfile("def test_nothing():\n    pass\n")
    bad = pytester.runpytest_subprocess("-p", "no:xdist", "--wsgitrace-keep-passed")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["ERROR: --wsgitrace-keep-passed writes*give that file too*"])
    good = pytester.runpytest_subprocess(
        "-p", "no:xdist", "--wsgitrace-keep-passed", "--wsgitrace-json=out.jsonl"
    )
    good.assert_outcomes(passed=1)
