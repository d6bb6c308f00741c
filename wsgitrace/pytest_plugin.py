"""pytest plugin: assert the order of an app's hooks, and see the requests
a failing test made.

Installed with wsgitrace and loaded by pytest through its ``pytest11`` entry
point; ``-p no:wsgitrace`` turns it off. Flask and rich are imported only when
a test uses them::

    from wsgitrace.demo_app import create_app

    def test_admin_refuses_guests(wsgitrace):
        app = create_app()
        wsgitrace.watch(app)                  # installs FlaskTrace if missing
        app.test_client().get("/admin/")

        trace = wsgitrace.last
        wsgitrace.assert_hook_order(
            trace,
            ["before_request:load_user", "before_request:admin.require_admin"],
            exact=False,
        )
        wsgitrace.assert_short_circuited(trace, "before_request:admin.require_admin")
        wsgitrace.assert_hook_not_run(trace, "view:*")

The ``wsgitrace`` fixture (a :class:`~wsgitrace.testing.TraceCapture`)
captures every trace that any :class:`~wsgitrace.TraceMiddleware` or
:class:`~wsgitrace.flask.FlaskTrace` in the process makes from the moment the
fixture is set up to the end of the test: through Flask's test client,
werkzeug's ``Client`` or a server thread. A trace is there as soon as the app
call returns. Requests that reached the app before the capture started (one
still running from an earlier test) are left out; requests made by fixtures
set up before ``wsgitrace`` are too, so request it first, or mark the test
``wsgitrace_keep``, whose capture starts before every fixture.
``wsgitrace_capture`` captures one block of a test.

The capture and the assertions are :mod:`wsgitrace.testing`, which does not
need pytest (use it from unittest or any runner); they are importable from
this module too. This module adds the fixtures, the marker, the options and
the hooks that attach the report sections and write the JSON file; the text of
both is built in :mod:`wsgitrace._pytest_report`.

Reports and files:

- ``--wsgitrace-report=failed|always|never`` (ini ``wsgitrace_report``,
  default ``failed``): a test that captured requests gets a ``wsgitrace``
  report section with a table of them and the timelines of the last few
  (the one a :class:`~wsgitrace.HookOrderError` was raised on first), plain
  text. A failed test's section is part of its failure (so ``--junitxml``
  has it and ``--show-capture`` does not hide it); with ``always``, passed
  (and xpassed) tests' sections are printed at the end, except with
  ``--tb=no``. A failed test that did not capture (a unittest ``TestCase`` using
  :func:`~wsgitrace.testing.capture_traces`) gets the timeline of the trace
  its :class:`~wsgitrace.HookOrderError` was raised on.
- ``--wsgitrace-json=PATH`` (ini ``wsgitrace_json``): JSON Lines, one object
  per test with ``schema``, ``nodeid``, ``outcome``, ``worker``, ``dropped``,
  ``internal_errors`` and ``traces`` (full :meth:`Trace.to_dict` forms), for
  failed tests, tests marked ``wsgitrace_keep`` and, with
  ``--wsgitrace-keep-passed`` (ini ``wsgitrace_keep_passed``), every test that
  captured. Under pytest-xdist the records travel with the test reports and
  the controller writes the one file.
- ``wsgitrace_max_traces`` (ini, default 1000): traces kept per test; older
  ones are dropped and the count is shown. So are, per app the test made
  requests to, the traces its buffer evicted and its sinks dropped or failed
  to deliver during the test, when there are any.

Whatever goes wrong inside the plugin is written into the report section;
it never changes a test's outcome.

.. versionadded:: 0.1
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Generator, Iterator
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path
from typing import Literal, Protocol

import pytest

from . import testing
from ._hook_assertions import _align, _printable
from ._pytest_report import _error, _json_record, _JsonWriter, _report_text, _trace_text
from .exceptions import HookOrderError
from .testing import (
    TraceCapture,
    assert_hook_not_run,
    assert_hook_order,
    assert_short_circuited,
    assert_teardown_after_body,
    capture_traces,
)
from .trace import HOOK_KINDS

__all__ = [
    "REPORT_MODES",
    "TraceCapture",
    "WsgitraceCapture",
    "assert_hook_not_run",
    "assert_hook_order",
    "assert_short_circuited",
    "assert_teardown_after_body",
    "capture_traces",
]

#: Values of ``--wsgitrace-report`` and the ``wsgitrace_report`` ini option.
REPORT_MODES = ("failed", "always", "never")

#: Title of the report section.
_SECTION = "wsgitrace"


class WsgitraceCapture(Protocol):
    """The ``wsgitrace_capture`` fixture:
    :func:`~wsgitrace.testing.capture_traces` as a context manager factory,
    for a block of a test::

        def test_second_request(client, wsgitrace_capture):
            client.get("/")
            with wsgitrace_capture() as second:
                client.get("/")
            assert len(second) == 1
    """

    def __call__(self, *, max_traces: int = ...) -> AbstractContextManager[TraceCapture]: ...


# -- fixtures ------------------------------------------------------------------


@pytest.fixture
def wsgitrace() -> Iterator[TraceCapture]:
    """Every trace made in this process during the test, as a
    :class:`~wsgitrace.testing.TraceCapture`: ``.last``, ``.all``,
    ``.filter(path=...)``, ``.watch(app)`` and the hook order assertions.
    """
    # The running item comes from pytest_runtest_setup: asking for the
    # ``request`` fixture (or ``pytestconfig``, which does) would make pytest
    # build a fixture definition, signature and all, on every use.
    item = _running[-1] if _running else None
    state = item.stash.get(_STATE, None) if item is not None else None
    if state is not None and state.capture.active:
        # Started for a ``wsgitrace_keep`` marker, before any fixture.
        yield state.capture
        return
    max_traces = _settings(item.config).max_traces if item is not None else 1000
    with capture_traces(max_traces=max_traces) as capture:
        if item is not None:
            item.stash[_STATE] = _ItemState(capture)
        yield capture


@pytest.fixture
def wsgitrace_capture(wsgitrace: TraceCapture) -> WsgitraceCapture:
    """:func:`~wsgitrace.testing.capture_traces`, to capture the traces of
    one block of a test (the ``wsgitrace`` fixture still captures them all).
    """
    return partial(capture_traces, max_traces=wsgitrace.max_traces)


# -- hooks ---------------------------------------------------------------------


@dataclasses.dataclass
class _Settings:
    report: str
    json_path: Path | None
    keep_passed: bool
    max_traces: int
    writer: _JsonWriter | None = None


@dataclasses.dataclass
class _ItemState:
    capture: TraceCapture
    manager: AbstractContextManager[TraceCapture] | None = None
    failed: bool = False
    skipped: bool = False
    reported: bool = False


_SETTINGS = pytest.StashKey[_Settings]()
_STATE = pytest.StashKey[_ItemState]()
_KEEP = pytest.StashKey[bool]()

# pytest 9's native TOML gives an integer, which a "string" ini option
# refuses; "int" (pytest 8.4+) takes it as well as an ini file's string.
_MAX_TRACES_INI_TYPE: Literal["int", "string"] = (
    "int" if pytest.version_tuple >= (8, 4) else "string"
)

#: Items being run, innermost last (a test may run pytest in process).
_running: list[pytest.Item] = []


def _max_traces(config: pytest.Config) -> int:
    """The ``wsgitrace_max_traces`` ini value: an integer from native TOML,
    a string from an ini file (or older pytest), 1000 when unset.
    """
    try:
        raw: object = config.getini("wsgitrace_max_traces")
    except (TypeError, ValueError, pytest.UsageError) as exc:  # pytest's "int" conversion
        msg = f"wsgitrace_max_traces must be a positive integer: {exc}"
        raise pytest.UsageError(msg) from None
    if raw is None or raw == "":
        return 1000
    try:
        if isinstance(raw, bool):
            raise ValueError(raw)
        max_traces = int(str(raw))  # not int(raw): that would take 2.5 as 2
        if max_traces < 1:
            raise ValueError(raw)
    except (TypeError, ValueError):
        msg = f"wsgitrace_max_traces must be a positive integer, got {raw!r}"
        raise pytest.UsageError(msg) from None
    return max_traces


def _settings(config: pytest.Config) -> _Settings:
    settings = config.stash.get(_SETTINGS, None)
    if settings is None:  # pragma: no cover - configured by pytest_configure
        settings = config.stash[_SETTINGS] = _Settings("failed", None, False, 1000)
    return settings


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add the ``wsgitrace`` option group and ini options."""
    group = parser.getgroup("wsgitrace", "wsgitrace: request lifecycle traces")
    group.addoption(
        "--wsgitrace-report",
        dest="wsgitrace_report",
        choices=REPORT_MODES,
        default=None,
        help="Add the timeline of a test's requests to its report: when it failed"
        " (default), always, or never. Ini option: wsgitrace_report.",
    )
    group.addoption(
        "--wsgitrace-json",
        dest="wsgitrace_json",
        metavar="PATH",
        default=None,
        help="Write the traces of failed tests and of tests marked wsgitrace_keep to PATH,"
        " one JSON object per test (JSON Lines). Ini option: wsgitrace_json.",
    )
    group.addoption(
        "--wsgitrace-keep-passed",
        dest="wsgitrace_keep_passed",
        action="store_true",
        default=None,
        help="With --wsgitrace-json, write the traces of passing tests too."
        " Ini option: wsgitrace_keep_passed.",
    )
    parser.addini("wsgitrace_report", "failed, always or never (--wsgitrace-report)", "string")
    parser.addini("wsgitrace_json", "where to write traces as JSON Lines (--wsgitrace-json)")
    parser.addini(
        "wsgitrace_keep_passed", "write traces of passing tests too", "bool", default=False
    )
    parser.addini(
        "wsgitrace_max_traces",
        "traces kept per test, older ones dropped (1000)",
        _MAX_TRACES_INI_TYPE,
        default=None,
    )


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker, read and check the settings, open the JSON file."""
    testing._under_pytest += 1
    config.addinivalue_line(
        "markers",
        "wsgitrace_keep: capture this test's requests (as the wsgitrace fixture does)"
        " and write their traces to the --wsgitrace-json file even when it passes.",
    )
    report = config.getoption("wsgitrace_report") or config.getini("wsgitrace_report") or "failed"
    if report not in REPORT_MODES:
        msg = f"wsgitrace_report must be one of {', '.join(REPORT_MODES)}, got {report!r}"
        raise pytest.UsageError(msg)
    max_traces = _max_traces(config)
    keep_passed = config.getoption("wsgitrace_keep_passed")
    if keep_passed is None:
        keep_passed = bool(config.getini("wsgitrace_keep_passed"))
    json_path: Path | None = None
    option = config.getoption("wsgitrace_json")
    if option:
        json_path = Path(config.invocation_params.dir, option)
    elif config.getini("wsgitrace_json"):
        base = config.inipath.parent if config.inipath else config.rootpath
        json_path = base / str(config.getini("wsgitrace_json"))
    if json_path is None and config.getoption("wsgitrace_keep_passed"):
        # Typed on the command line for nothing: say so rather than ignore it.
        msg = (
            "--wsgitrace-keep-passed writes passing tests' traces to the --wsgitrace-json"
            " file: give that file too (--wsgitrace-json=PATH or the wsgitrace_json ini option)"
        )
        raise pytest.UsageError(msg)
    settings = _Settings(report, json_path, keep_passed, max_traces)
    config.stash[_SETTINGS] = settings
    if json_path is not None and not hasattr(config, "workerinput"):
        # The controller (or the only process) writes the file; xdist workers
        # send their records along with their test reports.
        try:
            settings.writer = _JsonWriter(json_path)
        except OSError as exc:
            msg = f"wsgitrace: cannot write the --wsgitrace-json file {str(json_path)!r}: {exc}"
            raise pytest.UsageError(msg) from None
        config.pluginmanager.register(settings.writer, "wsgitrace-json")


def pytest_unconfigure(config: pytest.Config) -> None:
    """Close the JSON file."""
    testing._under_pytest -= 1
    settings = config.stash.get(_SETTINGS, None)
    if settings is not None and settings.writer is not None:
        settings.writer.close()
        config.pluginmanager.unregister(settings.writer)
        settings.writer = None


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    """Note the running item; start a marked test's capture before its fixtures.

    The marker is read here, not at collection: a conftest's
    ``pytest_collection_modifyitems`` may add it after this plugin's would run.
    """
    __tracebackhide__ = True  # keeps this wrapper out of fixture errors
    _running.append(item)
    if item.get_closest_marker("wsgitrace_keep") is not None:
        item.stash[_KEEP] = True
        # Start before any fixture, so requests made by fixtures are kept.
        manager = capture_traces(max_traces=_settings(item.config).max_traces)
        item.stash[_STATE] = _ItemState(manager.__enter__(), manager)
    return (yield)


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    """Stop a marked test's capture after its fixtures are torn down."""
    __tracebackhide__ = True
    try:
        return (yield)
    finally:
        if item in _running:
            _running.remove(item)
        state = item.stash.get(_STATE, None)
        if state is not None and state.manager is not None:
            state.manager.__exit__(None, None, None)
            state.manager = None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Add the report section and the JSON record of a test that captured."""
    report = yield
    state = item.stash.get(_STATE, None)
    if state is None:
        if report.failed:
            _annotate_uncaptured(item, call, report)
        return report
    try:
        _annotate(item, call, report, state)
    except Exception as exc:
        # Never let the plugin change a test's outcome.
        report.sections.append((_SECTION, f"wsgitrace: reporting failed: {_error(exc)}"))
    finally:
        if report.when == "teardown":
            del item.stash[_STATE]
    return report


def _annotate(
    item: pytest.Item, call: pytest.CallInfo[None], report: pytest.TestReport, state: _ItemState
) -> None:
    """Add the section to the first failed report (or the passed call report
    with ``always``) and the JSON record to the teardown report.
    """
    settings = _settings(item.config)
    state.failed = state.failed or report.failed
    state.skipped = state.skipped or report.skipped
    capture = state.capture
    if report.failed:
        # Once per test: a teardown error after a failed call does not repeat
        # it, but one after a passed call (shown with ``always``) gets its own.
        show = settings.report != "never" and not state.reported
    else:
        show = report.when == "call" and report.passed and settings.report == "always"
    if show and (len(capture) or capture.internal_errors):
        focus = None
        if call.excinfo is not None and isinstance(call.excinfo.value, HookOrderError):
            focus = call.excinfo.value.trace
        _add_section(report, _report_text(item.config, capture, focus))
        state.reported = state.reported or report.failed
    keep = state.failed or settings.keep_passed or item.stash.get(_KEEP, False)
    if report.when == "teardown" and settings.json_path is not None and len(capture) and keep:
        outcome = "failed" if state.failed else "skipped" if state.skipped else "passed"
        report.wsgitrace_json = _json_record(item, capture, outcome)  # type: ignore[attr-defined]


def _add_section(report: pytest.TestReport, text: str) -> None:
    """Add the report section: a failure's goes into its traceback's own
    sections, which JUnit XML's failure text includes and ``--show-capture``
    does not hide (it is about captured output); a passed test's (``always``)
    goes with the captured output.
    """
    addsection = getattr(report.longrepr, "addsection", None) if report.failed else None
    if callable(addsection):
        addsection(_SECTION, text.rstrip("\n"))
    else:
        report.sections.append((_SECTION, text))


def _annotate_uncaptured(
    item: pytest.Item, call: pytest.CallInfo[None], report: pytest.TestReport
) -> None:
    """Add the timeline of the trace a hook order assertion failed on to the
    report of a test that did not capture (a unittest ``TestCase`` using
    :func:`~wsgitrace.testing.capture_traces`, say).
    """
    excinfo = call.excinfo
    if excinfo is None or not isinstance(excinfo.value, HookOrderError):
        return
    trace = excinfo.value.trace
    if trace is None or _settings(item.config).report == "never":
        return
    try:
        _add_section(report, _trace_text(item.config, trace))
    except Exception as exc:
        # Never let the plugin change a test's outcome.
        report.sections.append((_SECTION, f"wsgitrace: reporting failed: {_error(exc)}"))


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    """With ``always``, show passed (and xpassed) tests' sections unless
    ``-rP`` (``-rX``) does, and not with ``--tb=no``, which hides failed
    tests' sections (and ``-rP``).
    """
    settings = config.stash.get(_SETTINGS, None)
    if settings is None or config.getoption("tbstyle", "auto") == "no":
        return
    if settings.report == "always":
        shown = False
        reports = [
            rep
            for kind, opt in (("passed", "P"), ("xpassed", "X"))
            if not terminalreporter.hasopt(opt)
            for rep in terminalreporter.getreports(kind)
        ]
        for rep in reports:
            for name, content in rep.sections:
                if name != _SECTION:
                    continue
                if not shown:
                    terminalreporter.write_sep("=", "wsgitrace: requests of passed tests")
                    shown = True
                terminalreporter.write_sep("_", rep.nodeid)
                terminalreporter.write_line(content.rstrip("\n"))


def pytest_assertrepr_compare(
    config: pytest.Config, op: str, left: object, right: object
) -> list[str] | None:
    """Explain ``assert trace.hooks() == [...]`` like
    :func:`~wsgitrace.testing.assert_hook_order`.
    """
    if op != "==" or not (_is_hook_list(left) and _is_hook_list(right)):
        return None
    first, second = list(left), list(right)  # type: ignore[call-overload]
    if not first and not second:
        return None
    try:
        # Which operand is trace.hooks() is not known: sides are named as
        # in pytest's own diffs (+ left, - right).
        lines = ["hook lists differ (+ only in the left list, - only in the right)"]
        if type(left) is not type(right):
            lines.append(
                f"note: a {type(left).__name__} never equals a {type(right).__name__};"
                " trace.hooks() is a list"
            )
        if any("*" in name or "?" in name for name in (*first, *second)):
            lines.append(
                "note: == compares names exactly, * and ? match only themselves;"
                " assert_hook_order() takes patterns"
            )
        lines.append("  left right")
        for r, e in _align(second, first, operator.eq):
            left_col = f"{e:>6}" if e is not None else "     ."
            right_col = f"{r:>6}" if r is not None else "     ."
            if e is not None and r is not None:
                lines.append(f"{left_col}{right_col}    {_printable(first[e])}")
            elif e is not None:
                lines.append(f"{left_col}{right_col}  + {_printable(first[e])}")
            else:
                assert r is not None
                lines.append(f"{left_col}{right_col}  - {_printable(second[r])}")
        return lines
    except Exception:
        return None


def _is_hook_list(value: object) -> bool:
    if not isinstance(value, list | tuple):
        return False
    return all(isinstance(v, str) and v.partition(":")[0] in HOOK_KINDS for v in value)
