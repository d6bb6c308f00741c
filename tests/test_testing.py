"""``wsgitrace.testing`` on its own: capture and hook order assertions as
plain functions, with no pytest fixture, and an import that loads neither
pytest, Flask nor rich (so unittest or any runner can use it).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable

from flask import Flask, Response, g, request

from wsgitrace import HookOrderError, Trace
from wsgitrace.flask import FlaskTrace
from wsgitrace.testing import (
    assert_hook_not_run,
    assert_hook_order,
    assert_short_circuited,
    capture_traces,
)

HOOKS = [
    "before_request:load_user",
    "before_request:require_user",
    "view:index",
    "after_request:add_header",
    "teardown_request:close_db",
]


def create_app() -> Flask:
    """A small traced app: a guest is refused by ``require_user``."""
    app = Flask("test_testing")

    @app.before_request
    def load_user() -> None:
        g.user = request.headers.get("X-User")

    @app.before_request
    def require_user() -> tuple[str, int] | None:
        return ("who are you?", 401) if g.user is None else None

    @app.get("/")
    def index() -> str:
        return f"hello {g.user}"

    @app.after_request
    def add_header(response: Response) -> Response:
        response.headers["X-Seen"] = "1"
        return response

    @app.teardown_request
    def close_db(exc: BaseException | None) -> None:
        pass

    FlaskTrace(app)
    return app


def request_trace(headers: dict[str, str] | None = None) -> Trace:
    with capture_traces() as captured:
        create_app().test_client().get("/", headers=headers or {})
    assert len(captured) == 1
    return captured.last


def hook_order_error(check: Callable[[], None]) -> HookOrderError:
    """The :class:`HookOrderError` ``check`` raised; fails if it raised none."""
    try:
        check()
    except HookOrderError as exc:
        return exc
    raise AssertionError("no HookOrderError raised")


def test_passing_assertions_return_none() -> None:
    trace = request_trace({"X-User": "ann"})
    assert assert_hook_order(trace, HOOKS) is None  # type: ignore[func-returns-value]
    assert (
        assert_hook_order(  # type: ignore[func-returns-value]
            trace, ["before_request:*", "view:index", "teardown_*"], exact=False
        )
        is None
    )
    assert assert_hook_not_run(trace, "teardown_appcontext:*") is None  # type: ignore[func-returns-value]


def test_exact_order_error_has_a_diff_and_a_hint() -> None:
    trace = request_trace()
    error = hook_order_error(lambda: assert_hook_order(trace, HOOKS))
    assert isinstance(error, AssertionError)
    assert error.trace is trace
    lines = str(error).splitlines()
    assert lines[:3] == [
        "hook order differs from the expected one at position 2",
        "  expected: 'view:index'",
        "  ran:      'after_request:add_header'",
    ]
    assert lines[3].startswith("  trace:    GET / -> 401 UNAUTHORIZED (4 hooks ran, id ")
    assert lines[lines.index("   exp  ran") + 1 :] == [
        "     0    0    before_request:load_user",
        "     1    1    before_request:require_user  (short-circuit)",
        "     2    .  - view:index",
        "     3    2    after_request:add_header",
        "     4    3    teardown_request:close_db",
        "   (- expected, did not run there; + ran, not expected)",
        "hint: before_request:require_user returned a response (short-circuit), so the view"
        " and the before_request hooks after it did not run",
    ]


def test_subsequence_error_names_the_missing_hook() -> None:
    trace = request_trace()
    error = hook_order_error(
        lambda: assert_hook_order(trace, ["before_request:load_user", "view:*"], exact=False)
    )
    assert str(error).startswith(
        "hooks did not run in the expected order (other hooks may run between them)\n"
        "  expected[1] 'view:*' did not run after 'before_request:load_user' (position 0):"
        " it did not run at all\n"
    )


def test_not_run_and_short_circuit_errors_name_the_hooks() -> None:
    refused, served = request_trace(), request_trace({"X-User": "ann"})
    assert_short_circuited(refused, "before_request:require_user")
    error = hook_order_error(lambda: assert_hook_not_run(served, "view:*"))
    assert str(error).splitlines()[0] == "'view:*' ran, but should not have (position 2)"
    assert " >   2  view:index" in str(error).splitlines()
    error = hook_order_error(lambda: assert_short_circuited(served))
    assert str(error).startswith("no before_request hook short-circuited (returned a response)")


def test_hints_name_the_error_an_open_response_and_a_plain_trace() -> None:
    """Hints name the request's exception, a response still open, and a
    trace with no hooks at all (made by TraceMiddleware alone).
    """
    app = Flask("test_testing_error")

    @app.get("/")
    def index() -> str:
        raise RuntimeError("no database")

    FlaskTrace(app)
    with capture_traces() as captured:
        app.test_client().get("/")
    error = hook_order_error(
        lambda: assert_hook_order(captured.last, ["view:index", "after_request:log"])
    )
    assert str(error).splitlines()[-1] == (
        "hint: the request raised builtins.RuntimeError (view): no database"
    )

    open_trace = Trace("GET", "/")
    error = hook_order_error(lambda: assert_hook_order(open_trace, ["teardown_request:close"]))
    assert str(error).splitlines()[-2:] == [
        "hint: the response is still open; a streamed response tears down when its body"
        " is exhausted: read response.data first",
        "hint: no hooks were recorded; TraceMiddleware alone records WSGI events only,"
        " use FlaskTrace(app) (or wsgitrace.watch(app)) for hooks; an app that passes"
        " a request on to another (werkzeug's DispatcherMiddleware) records none either:"
        " the other app's trace is a separate one",
    ]
    error = hook_order_error(lambda: assert_short_circuited(open_trace))
    assert str(error).splitlines()[-1].startswith("hint: no hooks were recorded;")


def test_short_circuit_by_abort_is_named_in_the_error() -> None:
    """A before_request hook that calls abort() raises instead of returning
    a response: the error says so rather than only "no hook short-circuited".
    """
    from flask import abort

    app = Flask("test_testing_abort")

    @app.before_request
    def require_token() -> None:
        abort(401)

    @app.get("/")
    def index() -> str:
        return "hello"

    FlaskTrace(app)
    with capture_traces() as captured:
        assert app.test_client().get("/").status_code == 401
    error = hook_order_error(lambda: assert_short_circuited(captured.last))
    assert str(error).splitlines()[0] == (
        "no before_request hook short-circuited (returned a response);"
        " 'before_request:require_token' raised Unauthorized instead"
        " (abort() raises: assert on the status, or use assert_hook_order)"
    )
    error = hook_order_error(lambda: assert_short_circuited(captured.last, "before_request:other"))
    assert "raised" not in str(error).splitlines()[0]


def test_short_circuit_with_a_view_and_unprintable_names() -> None:
    """A view that ran after a short-circuit is named, and invisible
    characters in hook names are escaped in the diff.
    """
    trace = Trace("GET", "/")
    trace.record("before_request", "before_request:deny", 1, 2, {"short_circuit": True})
    trace.record("view", "view:index", 3, 4)
    error = hook_order_error(lambda: assert_short_circuited(trace))
    assert str(error).splitlines()[0] == (
        "'before_request:deny' short-circuited, but the view ran: 'view:index'"
    )
    error = hook_order_error(
        lambda: assert_hook_order(trace, ["before_request:deny", "view:inde\u200bx"])
    )
    lines = str(error).splitlines()
    assert lines[1] == "  expected: 'view:inde\\u200bx'"
    assert "     1    .  - view:inde\\u200bx" in lines


def run_python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout


def test_import_does_not_load_pytest_flask_or_rich() -> None:
    out = run_python(
        """
        import json, sys
        import wsgitrace.testing
        heavy = ("pytest", "_pytest", "flask", "rich")
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in heavy)))
        """
    )
    assert json.loads(out) == []


def test_without_pytest_failures_are_assertion_errors() -> None:
    """Under unittest a failed assertion is a failure, not an error, and
    ``.last`` with nothing captured raises an AssertionError, even when
    pytest is imported (but not running).
    """
    out = run_python(
        """
        import json, sys, unittest
        import pytest  # imported, not running: failures stay AssertionErrors
        from wsgitrace.testing import assert_hook_order, capture_traces
        from wsgitrace.trace import Trace

        class HookOrderTest(unittest.TestCase):
            def test_empty_trace(self):
                assert_hook_order(Trace("GET", "/"), ["view:index"])

            def test_nothing_captured(self):
                with capture_traces() as captured:
                    pass
                captured.last

        suite = unittest.defaultTestLoader.loadTestsFromTestCase(HookOrderTest)
        result = unittest.TextTestRunner(stream=open("/dev/null", "w")).run(suite)
        print(json.dumps({
            "failures": [
                next(line for line in text.splitlines() if "Error: " in line)
                for _, text in result.failures
            ],
            "errors": len(result.errors),
            "pytest": "pytest" in sys.modules,
        }))
        """
    )
    report = json.loads(out)
    assert report["errors"] == 0
    assert report["pytest"] is True
    failures = report["failures"]
    assert len(failures) == 2
    assert failures[0].startswith("wsgitrace.exceptions.HookOrderError: hook order differs")
    assert failures[1].startswith("AssertionError: wsgitrace: no request was traced")
