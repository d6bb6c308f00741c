"""The pytest plugin under the options and test shapes real suites use:
JUnit XML, ``--show-capture``, ``--tb``, fixture teardown errors with
``--wsgitrace-report=always``. Each runs a small suite through ``pytester``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

import pytest
from werkzeug.test import Client

from wsgitrace import TraceMiddleware
from wsgitrace.testing import capture_traces

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment


def hello_app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]


CONFTEST = """
import pytest

from wsgitrace.demo_app import create_app
from wsgitrace.flask import FlaskTrace


@pytest.fixture
def app():
    app = create_app()
    FlaskTrace(app)
    return app
"""


def test_failure_report_is_in_junit_xml_and_not_hidden_by_show_capture(
    pytester: pytest.Pytester,
) -> None:
    """A failed test's timeline is part of its failure: JUnit XML's failure
    text (what CI shows) has it, and ``--show-capture=no``, which is about
    captured output, does not hide it. Under xdist too.
    """
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        """
        def test_fails(app, wsgitrace):
            app.test_client().get("/admin/")
            print("captured output")
            assert False

        def test_setup_fails(app, wsgitrace, broken):
            pass

        import pytest

        @pytest.fixture
        def broken(app):
            app.test_client().get("/from-a-fixture")
            raise RuntimeError("fixture is broken")
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:xdist", "--junitxml=out.xml")
    result.assert_outcomes(failed=1, errors=1)
    cases = {
        case.get("name"): case for case in ET.parse(pytester.path / "out.xml").iter("testcase")
    }
    failure = cases["test_fails"].findtext("failure") or ""
    assert "1 request traced during this test" in failure
    assert "GET /admin/ → 403 FORBIDDEN" in failure
    error = cases["test_setup_fails"].findtext("error") or ""
    assert "GET /from-a-fixture → 404 NOT FOUND" in error

    for args in (["-p", "no:xdist"], ["-n", "2"]):
        hidden = pytester.runpytest_subprocess(*args, "--show-capture=no")
        hidden.assert_outcomes(failed=1, errors=1)
        out = hidden.stdout.str()
        assert "Captured stdout call" not in out
        assert out.count("- wsgitrace -") == 2, out
        hidden.stdout.fnmatch_lines(["*GET /admin/ → 403 FORBIDDEN*"])


def test_teardown_error_after_a_passed_call_gets_the_timeline_with_always(
    pytester: pytest.Pytester,
) -> None:
    """With ``always`` the passed call report gets a section; a fixture's
    teardown error after it still gets its own, with the requests the
    teardown made. A failed call's section is not repeated at teardown.
    """
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture
        def cleanup(app, wsgitrace):
            yield
            app.test_client().get("/cleanup")
            raise RuntimeError("cleanup failed")

        def test_passes(cleanup, app):
            app.test_client().get("/")

        def test_fails(cleanup, app):
            app.test_client().get("/")
            assert False
        """
    )
    for mode in ("always", "failed"):
        result = pytester.runpytest_subprocess("-p", "no:xdist", f"--wsgitrace-report={mode}")
        result.assert_outcomes(passed=1, failed=1, errors=2)
        out = result.stdout.str()
        errors = out.split("= ERRORS =")[1].split("= FAILURES =")[0]
        passes = errors.split("ERROR at teardown of test_passes")[1].split("ERROR at teardown")[0]
        assert "2 requests traced during this test" in passes, out
        assert "GET /cleanup → 404 NOT FOUND" in passes
        fails = errors.split("ERROR at teardown of test_fails")[1]
        assert "- wsgitrace -" not in fails, out
        failures = out.split("= FAILURES =")[1].split("= wsgitrace: requests of passed")[0]
        assert failures.count("1 request traced during this test") == 1, out


def test_tb_no_shows_no_passed_sections_when_failed_ones_are_hidden(
    pytester: pytest.Pytester,
) -> None:
    """``--tb=no`` hides a failed test's section; ``always`` then does not
    print pages of passed tests' timelines alone (pytest's ``-rP`` does the
    same). Without ``--tb=no`` they are printed.
    """
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        """
        def test_passes(app, wsgitrace):
            app.test_client().get("/")

        def test_fails(app, wsgitrace):
            app.test_client().get("/admin/")
            assert False
        """
    )
    quiet = pytester.runpytest_subprocess("-p", "no:xdist", "--wsgitrace-report=always", "--tb=no")
    quiet.assert_outcomes(passed=1, failed=1)
    assert "traced during this test" not in quiet.stdout.str()
    shown = pytester.runpytest_subprocess("-p", "no:xdist", "--wsgitrace-report=always")
    shown.stdout.fnmatch_lines(["*= wsgitrace: requests of passed tests =*", "*GET / → 200 OK*"])


def test_without_autoload_the_entry_point_name_loads_it(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``PYTEST_DISABLE_PLUGIN_AUTOLOAD=1`` (common in CI), the README's
    ``-p wsgitrace`` loads the plugin: fixture, options and report.
    """
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        """
        def test_fails(app, wsgitrace):
            app.test_client().get("/admin/")
            assert False
        """
    )
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    missing = pytester.runpytest_subprocess()
    loaded = pytester.runpytest_subprocess("-p", "wsgitrace", "--wsgitrace-report=failed")
    missing.stdout.fnmatch_lines(["*fixture 'wsgitrace' not found*"])
    loaded.assert_outcomes(failed=1)
    loaded.stdout.fnmatch_lines(["*- wsgitrace -*", "1 request traced during this test"])


def test_always_shows_an_unexpectedly_passing_xfail_test(pytester: pytest.Pytester) -> None:
    """An xfail test that passes (XPASS) passed: ``always`` shows its
    requests with the other passed tests' (or ``-rX`` does, once).
    """
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.xfail(reason="thought to be broken")
        def test_xpasses(app, wsgitrace):
            app.test_client().get("/admin/")
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:xdist", "--wsgitrace-report=always")
    result.assert_outcomes(xpassed=1)
    result.stdout.fnmatch_lines(
        [
            "*= wsgitrace: requests of passed tests =*",
            "*_ test_always_shows_*.py::test_xpasses _*",
            "1 request traced during this test",
        ]
    )
    with_rx = pytester.runpytest_subprocess("-p", "no:xdist", "--wsgitrace-report=always", "-rX")
    assert with_rx.stdout.str().count("1 request traced during this test") == 1


def test_report_explains_a_response_the_failed_test_still_holds(
    pytester: pytest.Pytester,
) -> None:
    """``r = client.get(...)`` then a failed ``assert r.status_code``: the
    test's frame keeps ``r`` alive, so its trace is still in progress when
    the report is made. The report says why, rather than leave a duration of
    ``…`` looking like a hung request.
    """
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        """
        def test_holds_its_response(app, wsgitrace):
            response = app.test_client().get("/admin/")
            assert response.status_code == 200

        def test_closes_its_response(app, wsgitrace):
            app.test_client().get("/admin/").close()
            assert False
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:xdist")
    result.assert_outcomes(failed=2)
    out = result.stdout.str()
    held = out.split("_ test_holds_its_response _")[1].split("_ test_closes_its_response _")[0]
    assert "in progress" in held
    assert "in progress, in a test, usually means a response the test still holds" in held
    closed = out.split("_ test_closes_its_response _")[1]
    assert "- wsgitrace -" in closed
    assert "in progress" not in closed


def test_a_list_of_traces_is_refused_at_the_tests_line_with_a_hint(
    pytester: pytest.Pytester,
) -> None:
    """``.filter()`` and ``.all`` give lists; passing one where a trace goes
    is refused with what to pass instead, and pytest points at the test's
    line, not at wsgitrace's checks.
    """
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        """
        def test_filtered(app, wsgitrace):
            app.test_client().get("/admin/")
            wsgitrace.assert_hook_order(wsgitrace.filter(path="/admin/"), ["view:*"])

        def test_nothing_matched(app, wsgitrace):
            app.test_client().get("/admin/")
            wsgitrace.assert_hook_not_run(wsgitrace.filter(path="/nope"), "view:*")

        def test_bad_name(app, wsgitrace):
            app.test_client().get("/admin/")
            wsgitrace.assert_hook_order(wsgitrace.last, ["dashboard"])
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:xdist")
    result.assert_outcomes(failed=3)
    result.stdout.fnmatch_lines(
        [
            '>*wsgitrace.assert_hook_order(wsgitrace.filter(path="/admin/"), *',
            "E   *TypeError: assert_hook_order() takes a Trace (one of this list of 1 trace,"
            " as .all and .filter() give: *] is the newest), got list",
            '>*wsgitrace.assert_hook_not_run(wsgitrace.filter(path="/nope"), *',
            "E   *TypeError: assert_hook_not_run() takes a Trace (an empty list, as .filter()"
            " gives when no trace matched), got list",
            ">*wsgitrace.assert_hook_order(wsgitrace.last, *",
            "E   *ValueError: 'dashboard' names no hook*",
        ]
    )
    assert "give: [-1] is the newest" in result.stdout.str()
    assert "_hook_assertions.py" not in result.stdout.str()


def test_internal_error_repeated_in_a_later_test_says_where_it_was_logged(
    pytester: pytest.Pytester,
) -> None:
    """wsgitrace logs an internal error once per place and process: a later
    test hitting it again has no log record of it, and its report must not
    send the user looking for one in its captured log.
    """
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        """
        from wsgitrace._internal import report_internal_error

        def fail_inside_wsgitrace():
            try:
                raise RuntimeError("inside wsgitrace")
            except RuntimeError:
                report_internal_error("adversarial")

        def test_first(app, wsgitrace):
            app.test_client().get("/")
            fail_inside_wsgitrace()
            assert False

        def test_second(app, wsgitrace):
            app.test_client().get("/")
            fail_inside_wsgitrace()
            assert False
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:xdist")
    result.assert_outcomes(failed=2)
    out = result.stdout.str()
    first = out.split("_ test_first _")[1].split("_ test_second _")[0]
    second = out.split("_ test_second _")[1]
    assert "internal error in adversarial (logged once)" in first
    assert "internal error in adversarial" not in second
    assert "logs each kind once per process, at its first: maybe in an earlier test" in second


def test_wait_with_nothing_captured_names_an_untraced_app_first() -> None:
    """``wait()`` that saw no trace at all: the likely cause is an app that
    is not traced (a server thread of a bare app), not only a server in
    another process. Once some arrived, that hint is left out.
    """
    with capture_traces() as captured:
        Client(hello_app).get("/")  # not traced
        with pytest.raises(pytest.fail.Exception) as nothing:
            captured.wait(1, timeout=0.01)
        Client(TraceMiddleware(hello_app)).get("/").close()
        with pytest.raises(pytest.fail.Exception) as some:
            captured.wait(2, timeout=0.01)
    assert str(nothing.value).startswith("wsgitrace: 0 traces captured after 0.01s, waited for 1")
    assert "hint: trace the app with FlaskTrace(app) or TraceMiddleware(app)" in str(nothing.value)
    assert "another process" in str(nothing.value)
    assert "1 trace captured after 0.01s, waited for 2" in str(some.value)
    assert "hint: trace the app" not in str(some.value)


def test_wait_after_the_capture_block_fails_at_once_saying_so() -> None:
    """``wait()`` after its ``capture_traces()`` (``wsgitrace_capture()``)
    block can never see a trace arrive: it fails at once and says why,
    rather than wait out the timeout and blame the app's tracing.
    """
    with capture_traces() as captured:
        Client(TraceMiddleware(hello_app)).get("/").close()
    assert captured.wait(1) == captured.all
    with pytest.raises(pytest.fail.Exception) as ended:
        captured.wait(2, timeout=30)
    message = str(ended.value)
    assert message == (
        "wsgitrace: wait() for 2 traces on a capture that is not capturing (1 captured):"
        " its capture_traces() block has ended; wait inside the block"
    )
