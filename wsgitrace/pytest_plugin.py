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

The ``wsgitrace`` fixture (a :class:`TraceCapture`) captures every trace that
any :class:`~wsgitrace.TraceMiddleware` or :class:`~wsgitrace.flask.FlaskTrace`
in the process makes from the moment the fixture is set up to the end of the
test: through Flask's test client, werkzeug's ``Client`` or a server thread.
A trace is there as soon as the app call returns. Requests that reached the
app before the capture started (one still running from an earlier test) are
left out; requests made by fixtures set up before ``wsgitrace`` are too, so
request it first, or mark the test ``wsgitrace_keep``, whose capture starts
before every fixture. ``wsgitrace_capture`` captures one block of a test.

Reports and files:

- ``--wsgitrace-report=failed|always|never`` (ini ``wsgitrace_report``,
  default ``failed``): a test that captured requests gets a ``wsgitrace``
  report section with a table of them and the timelines of the last few
  (the one a :class:`~wsgitrace.HookOrderError` was raised on first), plain
  text. With ``always``, passed tests' sections are printed at the end.
- ``--wsgitrace-json=PATH`` (ini ``wsgitrace_json``): JSON Lines, one object
  per test with ``schema``, ``nodeid``, ``outcome``, ``worker``, ``dropped``,
  ``internal_errors`` and ``traces`` (full :meth:`Trace.to_dict` forms), for
  failed tests, tests marked ``wsgitrace_keep`` and, with
  ``--wsgitrace-keep-passed`` (ini ``wsgitrace_keep_passed``), every test that
  captured. Under pytest-xdist the records travel with the test reports and
  the controller writes the one file.
- ``wsgitrace_max_traces`` (ini, default 1000): traces kept per test; older
  ones are dropped and the count is shown.

Whatever goes wrong inside the plugin is written into the report section;
it never changes a test's outcome.

.. versionadded:: 0.1
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import operator
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

import pytest

from .exceptions import HookOrderError
from .middleware import (
    add_capture_listener,
    internal_error_count,
    remove_capture_listener,
    report_internal_error,
)
from .trace import HOOK_KINDS, SCHEMA_VERSION, Event, Trace, _ids

if TYPE_CHECKING:
    from flask import Flask

    from .flask import FlaskTrace

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
SECTION = "wsgitrace"

#: Timelines shown in one report; the table above them lists every trace.
_REPORT_TIMELINES = 5
_REPORT_TABLE_ROWS = 50
_TEARDOWN_KINDS = ("teardown_request", "teardown_appcontext")


# -- the capture ---------------------------------------------------------------


class TraceCapture:
    """The traces made in this process while a capture was active, oldest
    first. This is what the ``wsgitrace`` fixture returns.

    A trace is here as soon as the app call returns, still in progress until
    its response is closed (test clients never close one), so :attr:`last`
    sees it at once.

    :param max_traces: Traces kept; older ones are dropped and counted in
        :attr:`dropped`.
    """

    def __init__(self, *, max_traces: int = 1000) -> None:
        self.max_traces = max_traces
        #: Traces dropped because :attr:`max_traces` were held.
        self.dropped = 0
        self._traces: deque[Trace] = deque(maxlen=max_traces)
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        # Traces are numbered as they are made; a smaller number means the
        # request started before this capture (in an earlier test).
        self._since = next(_ids.counter)
        self._errors_at_start = internal_error_count()
        self.active = False

    def _on_trace(self, trace: Trace) -> None:
        """The capture listener: runs on whatever thread served the request."""
        try:
            if trace._seq <= self._since:
                return
            with self._lock:
                if len(self._traces) == self.max_traces:
                    self.dropped += 1
                self._traces.append(trace)
                self._arrived.notify_all()
        except Exception:
            report_internal_error("pytest.capture", trace)

    # -- reading ------------------------------------------------------------

    @property
    def all(self) -> list[Trace]:
        """Every trace captured, oldest first."""
        with self._lock:
            return list(self._traces)

    @property
    def last(self) -> Trace:
        """The newest trace; fails the test when there is none."""
        __tracebackhide__ = True
        with self._lock:
            if self._traces:
                return self._traces[-1]
        pytest.fail(_NOTHING_TRACED, pytrace=False)

    def filter(
        self,
        *,
        path: str | None = None,
        endpoint: str | None = None,
        method: str | None = None,
        status: int | None = None,
    ) -> list[Trace]:
        """The traces that match every criterion given, oldest first.

        :param path: The path, or a pattern with ``*`` (``"/admin/*"``).
        :param endpoint: The Flask endpoint, or a pattern.
        :param method: The HTTP method (any case).
        :param status: The status code.
        """
        found = []
        for trace in self.all:
            if path is not None and not _match(trace.path, path):
                continue
            if endpoint is not None and not _match(trace.endpoint or "", endpoint):
                continue
            if method is not None and trace.method.upper() != method.upper():
                continue
            if status is not None and trace.status_code != status:
                continue
            found.append(trace)
        return found

    def __len__(self) -> int:
        return len(self._traces)

    def __iter__(self) -> Iterator[Trace]:
        return iter(self.all)

    def clear(self) -> None:
        """Forget the traces captured so far."""
        with self._lock:
            self._traces.clear()

    @property
    def internal_errors(self) -> int:
        """Errors wsgitrace's own code caught (and logged) since the capture
        started.
        """
        return internal_error_count() - self._errors_at_start

    def wait(self, count: int = 1, *, timeout: float = 5.0, finished: bool = True) -> list[Trace]:
        """Wait until ``count`` traces are captured and, with ``finished``,
        until all of them are finished (their response closed). Useful with a
        live server, which closes a response after the client has it.

        :return: :attr:`all`.
        """
        __tracebackhide__ = True
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self._traces) + self.dropped < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    pytest.fail(
                        f"wsgitrace: {len(self._traces)} traces captured after {timeout}s,"
                        f" waited for {count}",
                        pytrace=False,
                    )
                self._arrived.wait(remaining)
        while finished and not all(t.finished for t in self.all):
            if time.monotonic() >= deadline:
                pending = [_describe(t) for t in self.all if not t.finished]
                pytest.fail(
                    f"wsgitrace: responses not closed after {timeout}s: {', '.join(pending)}"
                    " (a test client never closes one: call response.close(), or pass"
                    " finished=False)",
                    pytrace=False,
                )
            time.sleep(0.002)
        return self.all

    # -- set-up -------------------------------------------------------------

    def watch(self, app: Flask, **options: Any) -> FlaskTrace:
        """Make sure a Flask app is traced: install
        :class:`~wsgitrace.flask.FlaskTrace` with ``options`` unless it has
        one, and return the extension. Apps traced some other way are captured
        too; this is for apps the test did not set up itself.
        """
        from flask import Flask

        from .flask import FlaskTrace

        if not isinstance(app, Flask):
            msg = (
                f"watch() takes a Flask app, got {app!r}; wrap a plain WSGI app in"
                " wsgitrace.TraceMiddleware(app) and its traces are captured too"
            )
            raise TypeError(msg)
        existing = app.extensions.get("wsgitrace")
        if isinstance(existing, FlaskTrace):
            return existing
        return FlaskTrace(app, **options)

    # -- assertions, also importable from this module -----------------------

    @staticmethod
    def assert_hook_order(trace: Trace, expected: Sequence[str], *, exact: bool = True) -> None:
        """See :func:`assert_hook_order`."""
        __tracebackhide__ = True
        assert_hook_order(trace, expected, exact=exact)

    @staticmethod
    def assert_hook_not_run(trace: Trace, hook: str) -> None:
        """See :func:`assert_hook_not_run`."""
        __tracebackhide__ = True
        assert_hook_not_run(trace, hook)

    @staticmethod
    def assert_short_circuited(trace: Trace, hook: str | None = None) -> None:
        """See :func:`assert_short_circuited`."""
        __tracebackhide__ = True
        assert_short_circuited(trace, hook)

    @staticmethod
    def assert_teardown_after_body(trace: Trace) -> None:
        """See :func:`assert_teardown_after_body`."""
        __tracebackhide__ = True
        assert_teardown_after_body(trace)

    def __repr__(self) -> str:
        state = "active" if self.active else "stopped"
        return f"<TraceCapture {len(self)} traces, dropped={self.dropped}, {state}>"


_NOTHING_TRACED = (
    "wsgitrace: no request was traced during this test.\n"
    "hint: trace the app with FlaskTrace(app) or TraceMiddleware(app), or call"
    " wsgitrace.watch(app) before making requests; check that tracing is not"
    " disabled (WSGITRACE_ENABLED, enabled=False) and the path not excluded or"
    " sampled out"
)


@contextmanager
def capture_traces(*, max_traces: int = 1000) -> Iterator[TraceCapture]:
    """Capture every trace made in this process inside the ``with`` block::

        with capture_traces() as captured:
            client.get("/")
        assert captured.last.hooks() == [...]

    Traces of requests that started before the block are left out, so a
    request still running from an earlier test is not mixed in.

    :param max_traces: See :class:`TraceCapture`.
    """
    capture = TraceCapture(max_traces=max_traces)
    listener = capture._on_trace
    add_capture_listener(listener)
    capture.active = True
    try:
        yield capture
    finally:
        capture.active = False
        remove_capture_listener(listener)


class WsgitraceCapture(Protocol):
    """The ``wsgitrace_capture`` fixture: :func:`capture_traces` as a
    context manager factory, for a block of a test::

        def test_second_request(client, wsgitrace_capture):
            client.get("/")
            with wsgitrace_capture() as second:
                client.get("/")
            assert len(second) == 1
    """

    def __call__(self, *, max_traces: int = ...) -> AbstractContextManager[TraceCapture]: ...


# -- assertions ----------------------------------------------------------------


def assert_hook_order(trace: Trace, expected: Sequence[str], *, exact: bool = True) -> None:
    """Assert the hooks of ``trace`` (:meth:`Trace.hooks`) ran in this order.

    :param trace: The trace of the request.
    :param expected: Event names such as ``"before_request:load_user"`` or
        ``"view:admin.dashboard"``; ``*`` matches any text
        (``"teardown_request:*"``).
    :param exact: ``True``: these hooks and no others ran, in this order.
        ``False``: they ran in this order, other hooks may have run between.
    :raise HookOrderError: With what ran, what was expected, where they
        diverge, and a hint.
    """
    __tracebackhide__ = True
    if isinstance(expected, str):
        msg = f"expected must be a sequence of hook names, not a string: {expected!r}"
        raise TypeError(msg)
    expected = list(expected)
    ran = trace.hooks()
    if exact:
        ok = len(ran) == len(expected) and all(map(_match, ran, expected))
    else:
        ok = _is_subsequence(expected, ran)
    if not ok:
        raise HookOrderError(_order_message(trace, ran, expected, exact), trace=trace)


def assert_hook_not_run(trace: Trace, hook: str) -> None:
    """Assert no hook named ``hook`` (``*`` matches any text) ran.

    :raise HookOrderError: Naming where it ran.
    """
    __tracebackhide__ = True
    ran = trace.hooks()
    where = [i for i, name in enumerate(ran) if _match(name, hook)]
    if where:
        lines = [f"{hook!r} ran, but should not have (position {', '.join(map(str, where))})"]
        lines += _trace_line(trace)
        lines += _numbered(ran, set(where))
        raise HookOrderError("\n".join(lines), trace=trace)


def assert_short_circuited(trace: Trace, hook: str | None = None) -> None:
    """Assert a ``before_request`` hook (``hook``, when given) returned a
    response, so the view did not run.

    :raise HookOrderError: Naming the hooks that ran.
    """
    __tracebackhide__ = True
    stopped = [e.name for e in trace.events if e.attrs.get("short_circuit")]
    views = [name for name in trace.hooks() if name.startswith("view:")]
    problem = None
    if not stopped:
        problem = "no before_request hook short-circuited (returned a response)"
    elif hook is not None and not any(_match(name, hook) for name in stopped):
        problem = f"{stopped[0]!r} short-circuited, not {hook!r}"
    elif views:
        problem = f"{stopped[0]!r} short-circuited, but the view ran: {views[0]!r}"
    if problem is not None:
        lines = [problem, *_trace_line(trace), *_numbered(trace.hooks(), set())]
        if not trace.hooks():
            lines.append(_HINT_NO_HOOKS)
        raise HookOrderError("\n".join(lines), trace=trace)


def assert_teardown_after_body(trace: Trace) -> None:
    """Assert each teardown hook (``teardown_request:*``,
    ``teardown_appcontext:*``) ran after the response body started, as it
    does for a response streamed with ``stream_with_context``.

    Flask runs teardown hooks when the view returns and, for such a
    response, again when the body is exhausted; the check is on each hook's
    last run. Read the whole body first (``response.data``).

    :raise HookOrderError: With the order the events ran in.
    """
    __tracebackhide__ = True
    events = trace.events
    body = next((e for e in events if e.kind == "body"), None)
    last: dict[str, Event] = {}
    for event in events:
        if event.kind in _TEARDOWN_KINDS:
            last[event.name] = event
    problem = hint = None
    if body is None:
        problem = "the response body has not been iterated"
        hint = (
            "read the body (response.data, or iterate the response) before asserting;"
            " a body is recorded once the server or test client iterates it"
        )
    elif not last:
        problem = "no teardown_request or teardown_appcontext hook ran"
        hint = (
            "register one, or read the whole body first: a streamed response's"
            " teardown runs when its body is exhausted"
        )
    else:
        early = [name for name, event in last.items() if event.start_ns < body.start_ns]
        if early:
            problem = f"{early[0]!r} last ran before the body started"
            hint = (
                "Flask tears the request down when the view returns; only a response"
                " streamed with stream_with_context tears down again after its body"
            )
    if problem is not None:
        lines = [f"teardown did not run after the body: {problem}", *_trace_line(trace)]
        for event in events:
            if event.kind in {"body", "view", *_TEARDOWN_KINDS}:
                mark = ">" if event is body else " "
                lines.append(f" {mark} {event.start_ms:9.3f}ms  {_printable(event.name)}")
        lines.append(f"hint: {hint}")
        raise HookOrderError("\n".join(lines), trace=trace)


_HINT_NO_HOOKS = (
    "hint: no hooks were recorded; TraceMiddleware alone records WSGI events only,"
    " use FlaskTrace(app) (or wsgitrace.watch(app)) for hooks"
)


def _match(name: str, pattern: str) -> bool:
    if "*" in pattern or "?" in pattern:
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern


def _is_subsequence(expected: list[str], ran: list[str]) -> bool:
    position = 0
    for pattern in expected:
        while position < len(ran) and not _match(ran[position], pattern):
            position += 1
        if position == len(ran):
            return False
        position += 1
    return True


def _align(
    expected: list[str], ran: list[str], match: Callable[[str, str], bool] = _match
) -> list[tuple[int | None, int | None]]:
    """A longest common subsequence alignment of the two lists (an item of
    ``ran`` matches one of ``expected`` by ``match``), as (expected index,
    ran index) pairs; ``None`` on the side an item is missing from.
    """
    n, m = len(expected), len(ran)
    lengths = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            if match(ran[j], expected[i]):
                lengths[i][j] = lengths[i + 1][j + 1] + 1
            else:
                lengths[i][j] = max(lengths[i + 1][j], lengths[i][j + 1])
    pairs: list[tuple[int | None, int | None]] = []
    i = j = 0
    while i < n and j < m:
        if match(ran[j], expected[i]):
            pairs.append((i, j))
            i += 1
            j += 1
        elif lengths[i + 1][j] >= lengths[i][j + 1]:
            pairs.append((i, None))
            i += 1
        else:
            pairs.append((None, j))
            j += 1
    pairs.extend((k, None) for k in range(i, n))
    pairs.extend((None, k) for k in range(j, m))
    return pairs


def _order_message(trace: Trace, ran: list[str], expected: list[str], exact: bool) -> str:
    pairs = _align(expected, ran)
    if exact:
        first = next(
            (
                k
                for k in range(max(len(ran), len(expected)))
                if k >= len(ran) or k >= len(expected) or not _match(ran[k], expected[k])
            ),
            0,
        )
        want = repr(expected[first]) if first < len(expected) else "nothing more"
        got = repr(ran[first]) if first < len(ran) else "nothing more"
        head = [
            f"hook order differs from the expected one at position {first}",
            f"  expected: {_printable(want)}",
            f"  ran:      {_printable(got)}",
        ]
    else:
        # Walk as _is_subsequence does, to the first entry not found.
        missing, after = 0, -1
        for missing, pattern in enumerate(expected):  # noqa: B007 - used after the loop
            found = next((k for k in range(after + 1, len(ran)) if _match(ran[k], pattern)), None)
            if found is None:
                break
            after = found
        anywhere = [k for k, name in enumerate(ran) if _match(name, expected[missing])]
        what = f"expected[{missing}] {expected[missing]!r} did not run"
        if after >= 0:
            what += f" after {ran[after]!r} (position {after}): "
            earlier = f"it ran earlier, at position {anywhere[0]}" if anywhere else ""
            what += earlier or "it did not run at all"
        else:
            what += " at all"
        head = [
            "hooks did not run in the expected order (other hooks may run between them)",
            f"  {_printable(what)}",
        ]
    lines = [*head, *_trace_line(trace), "", "   exp  ran"]
    short = _short_circuits(trace)
    for e, r in pairs:
        e_col = f"{e:>6}" if e is not None else "     ."
        r_col = f"{r:>5}" if r is not None else "    ."
        if e is not None and r is not None:
            name, sign = ran[r], " "
        elif e is not None:
            name, sign = expected[e], "-"
        else:
            assert r is not None
            name, sign = ran[r], "+" if exact else " "
        note = "  (short-circuit)" if r is not None and ran[r] in short else ""
        lines.append(f"{e_col}{r_col}  {sign} {_printable(name)}{note}")
    legend = "- expected, did not run there"
    if exact:
        legend += "; + ran, not expected"
    lines += [f"   ({legend})", *_hints(trace, ran, expected, pairs)]
    return "\n".join(lines)


def _short_circuits(trace: Trace) -> set[str]:
    return {e.name for e in trace.events if e.attrs.get("short_circuit")}


def _hints(
    trace: Trace,
    ran: list[str],
    expected: list[str],
    pairs: list[tuple[int | None, int | None]],
) -> list[str]:
    hints = []
    missing = [expected[e] for e, r in pairs if e is not None and r is None]
    for name in missing:
        kind, _, short = name.partition(":")
        similar = [
            other
            for other in ran
            if other.partition(":")[0] == kind
            and (other.endswith("." + short) or short.endswith("." + other.partition(":")[2]))
        ]
        if similar and similar[0] != name:
            hints.append(
                f"hint: did you mean {similar[0]!r}? Hooks of a blueprint are named"
                " <kind>:<blueprint>.<function>"
            )
    for name in sorted(_short_circuits(trace)):
        hints.append(
            f"hint: {name} returned a response (short-circuit), so the view and the"
            " before_request hooks after it did not run"
        )
    if trace.error:
        hints.append(
            f"hint: the request raised {trace.error.get('type')}"
            f" ({trace.error.get('where')}): {trace.error.get('message')}"
        )
    if not trace.finished and any(n.startswith("teardown") for n in missing):
        hints.append(
            "hint: the response is still open; a streamed response tears down when its"
            " body is exhausted: read response.data first"
        )
    if not ran:
        hints.append(_HINT_NO_HOOKS)
    return [_printable(h) for h in hints]


def _describe(trace: Trace) -> str:
    query = f"?{trace.query}" if trace.query else ""
    return _printable(f"{trace.method} {trace.path}{query} -> {trace.status or 'no response'}")


def _trace_line(trace: Trace) -> list[str]:
    ran = len(trace.hooks())
    return [f"  trace:    {_describe(trace)} ({ran} hooks ran, id {trace.id}, {trace.state})"]


def _numbered(names: list[str], marked: set[int]) -> list[str]:
    return [
        f" {'>' if i in marked else ' '} {i:>3}  {_printable(name)}" for i, name in enumerate(names)
    ]


def _printable(text: str) -> str:
    """``text`` with control and invisible formatting characters escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


# -- fixtures ------------------------------------------------------------------


@pytest.fixture
def wsgitrace() -> Iterator[TraceCapture]:
    """Every trace made in this process during the test, as a
    :class:`TraceCapture`: ``.last``, ``.all``, ``.filter(path=...)``,
    ``.watch(app)`` and the hook order assertions.
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
    """:func:`capture_traces`, to capture the traces of one block of a test
    (the ``wsgitrace`` fixture still captures them all).
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

#: Items being run, innermost last (a test may run pytest in process).
_running: list[pytest.Item] = []


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
        "wsgitrace_max_traces", "traces kept per test, older ones dropped (1000)", "string"
    )


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker, read and check the settings, open the JSON file."""
    config.addinivalue_line(
        "markers",
        "wsgitrace_keep: capture this test's requests (as the wsgitrace fixture does)"
        " and write their traces to the --wsgitrace-json file even when it passes.",
    )
    report = config.getoption("wsgitrace_report") or config.getini("wsgitrace_report") or "failed"
    if report not in REPORT_MODES:
        msg = f"wsgitrace_report must be one of {', '.join(REPORT_MODES)}, got {report!r}"
        raise pytest.UsageError(msg)
    raw_max = config.getini("wsgitrace_max_traces") or "1000"
    try:
        max_traces = int(raw_max)
        if max_traces < 1:
            raise ValueError(raw_max)
    except ValueError:
        msg = f"wsgitrace_max_traces must be a positive integer, got {raw_max!r}"
        raise pytest.UsageError(msg) from None
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
    settings = config.stash.get(_SETTINGS, None)
    if settings is not None and settings.writer is not None:
        settings.writer.close()
        config.pluginmanager.unregister(settings.writer)
        settings.writer = None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Note the tests marked ``wsgitrace_keep``, once, at collection."""
    for item in items:
        if item.get_closest_marker("wsgitrace_keep") is not None:
            item.stash[_KEEP] = True


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    """Note the running item; start a marked test's capture before its fixtures."""
    _running.append(item)
    if item.stash.get(_KEEP, False):
        # Start before any fixture, so requests made by fixtures are kept.
        manager = capture_traces(max_traces=_settings(item.config).max_traces)
        item.stash[_STATE] = _ItemState(manager.__enter__(), manager)
    return (yield)


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    """Stop a marked test's capture after its fixtures are torn down."""
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
        return report
    try:
        _annotate(item, call, report, state)
    except Exception as exc:
        # Never let the plugin change a test's outcome.
        report.sections.append((SECTION, f"wsgitrace: reporting failed: {_error(exc)}"))
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
    show = (report.failed and settings.report != "never") or (
        report.when == "call" and report.passed and settings.report == "always"
    )
    if show and not state.reported and (len(capture) or capture.internal_errors):
        focus = None
        if call.excinfo is not None and isinstance(call.excinfo.value, HookOrderError):
            focus = call.excinfo.value.trace
        report.sections.append((SECTION, _report_text(item.config, capture, focus)))
        state.reported = True
    keep = state.failed or settings.keep_passed or item.stash.get(_KEEP, False)
    if report.when == "teardown" and settings.json_path is not None and len(capture) and keep:
        outcome = "failed" if state.failed else "skipped" if state.skipped else "passed"
        report.wsgitrace_json = _json_record(item, capture, outcome)  # type: ignore[attr-defined]


def _json_record(item: pytest.Item, capture: TraceCapture, outcome: str) -> str:
    """One line of the JSON Lines file: the test and its full traces."""
    traces = []
    for trace in capture.all:
        try:
            traces.append(trace.to_dict())
        except Exception as exc:
            traces.append({"id": trace.id, "error": f"to_dict() failed: {_error(exc)}"})
    workerinput = getattr(item.config, "workerinput", None)
    record = {
        "schema": SCHEMA_VERSION,
        "nodeid": item.nodeid,
        "outcome": outcome,
        "worker": workerinput.get("workerid") if isinstance(workerinput, dict) else None,
        "dropped": capture.dropped,
        "internal_errors": capture.internal_errors,
        "traces": traces,
    }
    return json.dumps(record, ensure_ascii=False, default=repr)


class _JsonWriter:
    """Writes the records attached to test reports, one line per test. Runs
    in the controller, so xdist workers' records end up in the one file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.written = 0
        self.error: str | None = None
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file: IO[str] | None = path.open("w", encoding="utf-8")

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # Popped once written: the terminal reporter keeps every report.
        data = report.__dict__.pop("wsgitrace_json", None)
        if not isinstance(data, str) or self.file is None:
            return
        try:
            self.file.write(data + "\n")
            self.file.flush()
            self.written += 1
        except OSError as exc:
            self.error = _error(exc)

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        tests = "test" if self.written == 1 else "tests"
        line = f"wsgitrace: traces of {self.written} {tests} written to {self.path}"
        if self.error:
            line += f" (writing failed: {self.error})"
        terminalreporter.write_line(line)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    """With ``always``, show passed tests' sections unless ``-rP`` does."""
    settings = config.stash.get(_SETTINGS, None)
    if settings is None:
        return
    if settings.report == "always" and not terminalreporter.hasopt("P"):
        shown = False
        for rep in terminalreporter.getreports("passed"):
            for name, content in rep.sections:
                if name != SECTION:
                    continue
                if not shown:
                    terminalreporter.write_sep("=", "wsgitrace: requests of passed tests")
                    shown = True
                terminalreporter.write_sep("_", rep.nodeid)
                terminalreporter.write_line(content.rstrip("\n"))


def pytest_assertrepr_compare(
    config: pytest.Config, op: str, left: object, right: object
) -> list[str] | None:
    """Explain ``assert trace.hooks() == [...]`` like :func:`assert_hook_order`."""
    if op != "==" or not (_is_hook_list(left) and _is_hook_list(right)):
        return None
    ran, expected = list(left), list(right)  # type: ignore[call-overload]
    if not ran and not expected:
        return None
    try:
        lines = ["hook lists differ (left: ran, right: expected)", "   exp  ran"]
        for e, r in _align(expected, ran, operator.eq):
            e_col = f"{e:>6}" if e is not None else "     ."
            r_col = f"{r:>5}" if r is not None else "    ."
            if e is not None and r is not None:
                lines.append(f"{e_col}{r_col}    {_printable(ran[r])}")
            elif e is not None:
                lines.append(f"{e_col}{r_col}  - {_printable(expected[e])}")
            else:
                assert r is not None
                lines.append(f"{e_col}{r_col}  + {_printable(ran[r])}")
        lines.append("   (- expected, did not run there; + ran, not expected)")
        return lines
    except Exception:
        return None


def _is_hook_list(value: object) -> bool:
    if not isinstance(value, list | tuple):
        return False
    return all(isinstance(v, str) and v.partition(":")[0] in HOOK_KINDS for v in value)


# -- the report section --------------------------------------------------------


def _report_text(config: pytest.Config, capture: TraceCapture, focus: Trace | None) -> str:
    """The report section: a table of the test's requests and the timelines
    of the last few (the one an assertion failed on first). Plain text.
    """
    traces = capture.all
    lines = [f"{len(traces)} request{'s' if len(traces) != 1 else ''} traced during this test"]
    if capture.dropped:
        lines.append(
            f"{capture.dropped} earlier traces dropped (wsgitrace_max_traces={capture.max_traces})"
        )
    if capture.internal_errors:
        lines.append(
            f"wsgitrace caught {capture.internal_errors} internal errors during this test"
            " (logged by the 'wsgitrace' logger)"
        )
    chosen = traces[-_REPORT_TIMELINES:]
    if focus is not None:
        chosen = [focus, *(t for t in chosen if t is not focus)][:_REPORT_TIMELINES]
    if len(traces) > len(chosen):
        lines.append(f"timelines of the last {len(chosen)} shown")
    try:
        from . import render

        width = _width(config)
        if len(traces) > 1:
            rows = traces[-_REPORT_TABLE_ROWS:]
            if len(traces) > len(rows):
                lines.append(f"(table: last {len(rows)} of {len(traces)})")
            table = render.build_trace_table(rows)
            lines += ["", render.render_text(table, width=width).rstrip("\n")]
        for trace in chosen:
            title = "assertion failed on this trace" if trace is focus else ""
            text = render.render_text(render.build_timeline(trace), width=width).rstrip("\n")
            lines += ["", *([f"--- {title}"] if title else []), text]
    except Exception as exc:
        lines.append(f"wsgitrace: rendering failed ({_error(exc)}); hook lists:")
        for trace in chosen:
            try:
                lines.append(f"  {_describe(trace)}: {trace.hooks()}")
            except Exception as inner:
                lines.append(f"  <trace {trace.id}: {_error(inner)}>")
    return "\n".join(lines) + "\n"


def _width(config: pytest.Config) -> int:
    try:
        width = config.get_terminal_writer().fullwidth
    except Exception:
        width = int(os.environ.get("COLUMNS", "100") or 100)
    return max(80, min(width, 160))


def _error(exc: BaseException) -> str:
    try:
        return f"{type(exc).__name__}: {exc}"
    except Exception:
        return type(exc).__name__
