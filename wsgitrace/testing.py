"""Hook order assertions and trace capture, for any test runner.

The core of the pytest plugin (:mod:`wsgitrace.pytest_plugin`), without
pytest: :func:`capture_traces` collects the traces made in this process
inside a ``with`` block, and the ``assert_*`` functions raise
:class:`~wsgitrace.HookOrderError` (an :exc:`AssertionError`) with a diff and
a hint, so they work under unittest or any other runner::

    import unittest

    from wsgitrace.demo_app import create_app
    from wsgitrace.flask import FlaskTrace
    from wsgitrace.testing import assert_hook_not_run, capture_traces

    class AdminTest(unittest.TestCase):
        def test_guest_is_refused(self):
            app = create_app()
            FlaskTrace(app)
            with capture_traces() as captured:
                app.test_client().get("/admin/")
            assert_hook_not_run(captured.last, "view:*")

Neither pytest, Flask nor rich is imported by this module; Flask is imported
when :meth:`TraceCapture.watch` is called.

.. versionadded:: 0.1
"""

from __future__ import annotations

import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NoReturn

# The assertions and their failure messages live in _hook_assertions; this
# module stays their public home (they are in __all__ below).
from ._hook_assertions import (
    _describe,
    _match,
    assert_hook_not_run,
    assert_hook_order,
    assert_short_circuited,
    assert_teardown_after_body,
)
from ._internal import (
    add_capture_listener,
    internal_error_count,
    remove_capture_listener,
    report_internal_error,
)
from .buffer import TraceBuffer, _buffers
from .trace import Trace, _ids

if TYPE_CHECKING:
    from flask import Flask

    from .flask import FlaskTrace
    from .middleware import TraceMiddleware
    from .sinks import SinkDispatcher

__all__ = [
    "TraceCapture",
    "assert_hook_not_run",
    "assert_hook_order",
    "assert_short_circuited",
    "assert_teardown_after_body",
    "capture_traces",
]

# Documented here, where users import them from (help(), autodoc, pickling).
for _assertion in (
    assert_hook_not_run,
    assert_hook_order,
    assert_short_circuited,
    assert_teardown_after_body,
):
    _assertion.__module__ = __name__
del _assertion


# -- the capture ---------------------------------------------------------------


class TraceCapture:
    """The traces made in this process while a capture was active, oldest
    first. This is what the ``wsgitrace`` fixture returns, and what
    :func:`capture_traces` yields.

    A trace is here as soon as the app call returns, still in progress until
    its response is closed (test clients never close one), so :attr:`last`
    sees it at once. :attr:`last` and :meth:`wait` fail through
    ``pytest.fail`` in a pytest run with the wsgitrace plugin, and raise
    :exc:`AssertionError` otherwise (pytest merely imported does not count).

    :param max_traces: Traces kept; older ones are dropped and counted in
        :attr:`dropped`.
    :raise ValueError: ``max_traces`` is not a positive integer.
    """

    def __init__(self, *, max_traces: int = 1000) -> None:
        if not isinstance(max_traces, int) or isinstance(max_traces, bool) or max_traces < 1:
            msg = f"max_traces must be a positive integer, got {max_traces!r}"
            raise ValueError(msg)
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
        # What every app's buffer and sinks had dropped when the capture
        # started, and the apps whose traces it captured (see _app_drops).
        self._baseline = _DropBaseline()
        self._sources: dict[tuple[int, int], _AppSource] = {}
        self.active = False

    def _on_trace(self, trace: Trace, middleware: TraceMiddleware | None = None) -> None:
        """The capture listener: runs on whatever thread served the request."""
        try:
            if trace._seq <= self._since:
                return
            with self._lock:
                if len(self._traces) == self.max_traces:
                    self.dropped += 1
                self._traces.append(trace)
                if middleware is not None:
                    self._note_source(middleware)
                self._arrived.notify_all()
        except Exception:
            report_internal_error("testing.capture", trace)

    def _note_source(self, middleware: TraceMiddleware) -> None:
        """Remember the app that made a trace: its buffer and sinks."""
        buffer, sinks = middleware.buffer, middleware.sinks
        key = (id(buffer), id(sinks))
        if key not in self._sources:
            self._sources[key] = _AppSource(_app_name(middleware), buffer, sinks, self._baseline)

    def _app_drops(self) -> list[tuple[str, str, int, int]]:
        """What the buffers and sinks of the apps whose traces were captured
        dropped since the capture started: ``(app, cap, count, limit)`` for
        each count that is not zero, ``cap`` being ``max_traces``,
        ``max_bytes``, ``sink_queue`` or ``sink_failed`` (``limit`` 0).
        """
        with self._lock:
            sources = list(self._sources.values())
        found = []
        for source in sources:
            for cap, count, limit in source.drops():
                if count > 0:
                    found.append((source.name, cap, count, limit))
        return found

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
        _fail(_NOTHING_TRACED)

    def filter(
        self,
        *,
        path: str | None = None,
        endpoint: str | None = None,
        method: str | None = None,
        status: int | None = None,
    ) -> list[Trace]:
        """The traces that match every criterion given, oldest first.

        :param path: The path, or a pattern (``"/admin/*"``): ``*`` matches
            any text, ``?`` one character, anything else itself (``[`` too).
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
        """Forget the traces captured so far, and the count of dropped ones."""
        with self._lock:
            self._traces.clear()
            self.dropped = 0
            self._baseline = _DropBaseline()
            for source in self._sources.values():
                source.rebase(self._baseline)

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

        :param count: Traces to wait for (dropped ones count too).
        :param timeout: Seconds to wait in all; then the test fails.
        :param finished: Also wait until every captured trace is finished.
        :return: :attr:`all`.
        """
        __tracebackhide__ = True
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self._traces) + self.dropped < count:
                if not self.active:
                    # Nothing can arrive: do not wait out the timeout for it.
                    got = len(self._traces)
                    _fail(
                        f"wsgitrace: wait() for {count} trace{'s' if count != 1 else ''} on a"
                        f" capture that is not capturing ({got} captured): its"
                        " capture_traces() block has ended; wait inside the block"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    got = len(self._traces)
                    # None at all: most likely an app that is not traced.
                    hints = f"{_HINT_NOT_TRACED}\n" if got + self.dropped == 0 else ""
                    _fail(
                        f"wsgitrace: {got} trace{'s' if got != 1 else ''} captured"
                        f" after {timeout}s, waited for {count}\n{hints}{_HINT_OTHER_PROCESS}"
                    )
                self._arrived.wait(remaining)
        while finished and not all(t.finished for t in self.all):
            if time.monotonic() >= deadline:
                pending = [_describe(t) for t in self.all if not t.finished]
                _fail(
                    f"wsgitrace: responses not closed after {timeout}s: {', '.join(pending)}"
                    " (a test client never closes one: call response.close(), or pass"
                    " finished=False)"
                )
            time.sleep(0.002)
        return self.all

    # -- set-up -------------------------------------------------------------

    def watch(self, app: Flask, **options: Any) -> FlaskTrace:
        """Make sure a Flask app is traced: install
        :class:`~wsgitrace.flask.FlaskTrace` with ``options`` unless it has
        one, and return the extension. Apps traced some other way are captured
        too; this is for apps the test did not set up itself.

        :param app: The Flask app.
        :param options: Options for a new :class:`~wsgitrace.flask.FlaskTrace`
            (unused when the app has one).
        :return: The app's ``FlaskTrace``.
        :raise TypeError: ``app`` is not a Flask app.
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

    # -- the module's assertions, as methods ---------------------------------

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
        count = len(self)
        traces = f"{count} trace{'' if count == 1 else 's'}"
        return f"<TraceCapture {traces}, dropped={self.dropped}, {state}>"


class _DropBaseline:
    """The drop counts of every buffer and sink dispatcher of the process at
    one moment, held weakly: one made later starts from zero.
    """

    def __init__(self) -> None:
        self.buffers: weakref.WeakKeyDictionary[TraceBuffer, tuple[int, int]] = (
            weakref.WeakKeyDictionary()
        )
        self.sinks: weakref.WeakKeyDictionary[SinkDispatcher, tuple[int, int]] = (
            weakref.WeakKeyDictionary()
        )
        for buffer in _alive(_buffers):
            self.buffers[buffer] = (buffer.dropped_count, buffer.dropped_bytes)
        # Not imported: no app has sinks (and loading the plugin stays cheap).
        sinks_module = sys.modules.get("wsgitrace.sinks")
        if sinks_module is not None:
            for sinks in _alive(sinks_module._dispatchers):
                self.sinks[sinks] = (sinks.dropped, sinks.failed)


def _alive(objects: weakref.WeakSet[Any]) -> list[Any]:
    """The members of a weak set another thread may add to meanwhile."""
    for _ in range(5):
        try:
            return list(objects)
        except RuntimeError:  # the set changed size during iteration
            continue
    return []


class _AppSource:
    """An app whose traces a capture holds: its buffer and sinks (held, so
    their counts can be read after the app is gone) and their drop counts
    when the capture started.
    """

    __slots__ = ("buffer", "buffer_base", "name", "sinks", "sinks_base")

    def __init__(
        self, name: str, buffer: TraceBuffer, sinks: SinkDispatcher | None, base: _DropBaseline
    ) -> None:
        self.name = name
        self.buffer = buffer
        self.sinks = sinks
        self.buffer_base = (0, 0)
        self.sinks_base = (0, 0)
        self.rebase(base)

    def rebase(self, base: _DropBaseline) -> None:
        self.buffer_base = base.buffers.get(self.buffer, (0, 0))
        if self.sinks is not None:
            self.sinks_base = base.sinks.get(self.sinks, (0, 0))

    def drops(self) -> list[tuple[str, int, int]]:
        buffer, sinks = self.buffer, self.sinks
        buffer.bytes  # noqa: B018 - evicts for traces finished since the last append
        found = [
            ("max_traces", buffer.dropped_count - self.buffer_base[0], buffer.max_traces),
            ("max_bytes", buffer.dropped_bytes - self.buffer_base[1], buffer.max_bytes),
        ]
        if sinks is not None:
            found.append(("sink_queue", sinks.dropped - self.sinks_base[0], sinks.max_queue))
            found.append(("sink_failed", sinks.failed - self.sinks_base[1], 0))
        return found


def _app_name(middleware: TraceMiddleware) -> str:
    """A name for the app a middleware traces: a Flask app's ``name``, else
    the WSGI callable's qualified name.
    """
    app: Any = middleware.app
    flask_module = sys.modules.get("wsgitrace.flask")
    if flask_module is not None and isinstance(app, flask_module._WeakWsgiApp):
        flask_app = app._app()
        if flask_app is not None:
            return str(flask_app.name)
    name = getattr(app, "__qualname__", None)
    return name if isinstance(name, str) else type(app).__qualname__


_HINT_OTHER_PROCESS = (
    "hint: only requests served in this process are captured; a server run in"
    " another process (pytest-flask's live_server, a subprocess) is not: serve"
    " the app from a thread (werkzeug.serving.make_server) instead"
)

_HINT_NOT_TRACED = (
    "hint: trace the app with FlaskTrace(app) or TraceMiddleware(app), or call"
    " wsgitrace.watch(app) before making requests; check that tracing is not"
    " disabled (WSGITRACE_ENABLED, enabled=False) and the path not excluded or"
    " sampled out"
)

_NOTHING_TRACED = (
    "wsgitrace: no request was traced while capturing (during this test, or"
    " inside its capture_traces() block).\n"
    f"{_HINT_NOT_TRACED}\n"
    f"{_HINT_OTHER_PROCESS}"
)


#: How many pytest sessions with the plugin are running here (pytester runs
#: one inside another): failures then go through ``pytest.fail``. Merely
#: importing pytest does not count.
_under_pytest = 0


def _fail(msg: str) -> NoReturn:
    """Fail the test: with ``pytest.fail`` under pytest with the plugin, else
    with an :exc:`AssertionError`. pytest shows the test's line that failed
    (the capture's frames hide themselves), so a test that reads
    :attr:`TraceCapture.last` twice tells which one had nothing.
    """
    __tracebackhide__ = True
    pytest = sys.modules.get("pytest")
    if _under_pytest > 0 and pytest is not None:
        pytest.fail(msg)
    raise AssertionError(msg)


@contextmanager
def capture_traces(*, max_traces: int = 1000) -> Iterator[TraceCapture]:
    """Capture every trace made in this process inside the ``with`` block::

        with capture_traces() as captured:
            client.get("/")
        assert captured.last.hooks() == [...]

    Traces of requests that started before the block are left out, so a
    request still running from an earlier test is not mixed in.

    :param max_traces: See :class:`TraceCapture`.
    :raise ValueError: ``max_traces`` is not a positive integer.
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
