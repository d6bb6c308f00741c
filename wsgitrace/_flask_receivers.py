"""The blinker receivers and the log filter of a traced app.

::

    _connect_receivers(app, tracer)  # got_request_exception, templates, flash
    _capture_logs(app, tracer, 100)  # app.logger records as log:<level> events

Receivers are connected with ``sender=app`` and ``weak=False``, for the rarer
signals that Flask does not send from a shadowed method (and for
``request_started`` when no shadowed method can record the URL match); they
are disconnected when the app is freed.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flask import signals

from ._flask_state import (
    _record_url_match,
    _request_environ_secrets,
    _scrubber,
    redact_request_path,
)
from ._internal import report_internal_error
from .context import _get_trace
from .trace import Trace, _hook_that_raised, cut, format_error

if TYPE_CHECKING:
    from flask import Flask

    from ._flask_recorder import _AppTracer

#: Traces with a template render in progress kept per app (see _template_starts).
_MAX_PENDING_TEMPLATES = 256


def _connect_receivers(app: Flask, tracer: _AppTracer) -> None:
    clock = tracer.clock
    limits = tracer.limits
    starts = tracer._template_starts
    # Where an unhandled error came from when no hook's event records it:
    # Flask's own work (``app``: saving the session, a signal's receiver),
    # unless the app's class keeps its own dispatch_request (views are not
    # recorded, so it may be the view's).
    fallback = "view" if "dispatch_request" in tracer.skipped else "app"

    def _on_got_request_exception(sender: Any, exception: BaseException, **_: Any) -> None:
        trace = _get_trace()
        if trace is None or trace._limits is not limits:
            return
        try:
            now = clock()
            trace.record(
                "signal",
                "signal:got-request-exception",
                now,
                now,
                {"exception": type(exception).__name__},
            )
            if trace.error is None:
                trace.error = format_error(
                    exception,
                    _hook_that_raised(trace, exception)
                    # max_events may have left out the event that would say.
                    or ("app" if trace.dropped_events else fallback),
                    trace.limits,
                    _scrubber(tracer.redactor),
                )
        except Exception:
            report_internal_error("flask.got_request_exception", trace)

    def _on_before_render_template(sender: Any, template: Any, **_: Any) -> None:
        trace = _get_trace()
        if trace is None or trace._limits is not limits:
            return
        try:
            now = clock()
            name = template.name or "<string>"  # as template_rendered names it
            trace.record("signal", "signal:before-render-template", now, now, {"template": name})
            entry = starts.get(id(trace))
            if entry is None or entry[0] is not trace:
                if len(starts) >= _MAX_PENDING_TEMPLATES:
                    starts.pop(next(iter(starts)), None)
                entry = starts[id(trace)] = (trace, [])
            entry[1].append(now)
        except Exception:
            report_internal_error("flask.before_render_template", trace)

    def _on_template_rendered(sender: Any, template: Any, **_: Any) -> None:
        trace = _get_trace()
        if trace is None or trace._limits is not limits:
            return
        try:
            now = clock()
            entry = starts.get(id(trace))
            pending = entry[1] if entry is not None and entry[0] is trace else None
            start = pending.pop() if pending else now
            if pending == []:
                starts.pop(id(trace), None)
            name = template.name or "<string>"
            trace.record("template", f"template:{name}", start, now, {"template": name})
            trace.record("signal", "signal:template-rendered", now, now, {"template": name})
        except Exception:
            report_internal_error("flask.template_rendered", trace)

    def _on_message_flashed(sender: Any, message: Any, category: Any, **_: Any) -> None:
        trace = _get_trace()
        if trace is None or trace._limits is not limits:
            return
        try:
            now = clock()
            trace.record("signal", "signal:message-flashed", now, now, {"category": str(category)})
        except Exception:
            report_internal_error("flask.message_flashed", trace)

    pairs: list[tuple[Any, Callable[..., None]]] = [
        (signals.got_request_exception, _on_got_request_exception),
        (signals.before_render_template, _on_before_render_template),
        (signals.template_rendered, _on_template_rendered),
        (signals.message_flashed, _on_message_flashed),
    ]
    if "full_dispatch_request" in tracer.skipped and "preprocess_request" in tracer.skipped:
        # No phase of wsgitrace's records the URL match (an agent patched
        # both, or this Flask is not mirrored): it redacts the trace's path.
        def _on_request_started(sender: Any, **_: Any) -> None:
            trace = _get_trace()
            if trace is not None and trace._limits is limits:
                _record_url_match(tracer, trace)

        pairs.append((signals.request_started, _on_request_started))
    for signal, receiver in pairs:
        signal.connect(receiver, sender=app, weak=False)
    tracer.receivers = pairs
    # Blinker forgets a dead sender, not the strong receivers connected for
    # it: they (and through them the tracer, the extension and its buffer of
    # traces) would stay for the life of the process.
    weakref.finalize(app, _disconnect, pairs)


def _disconnect(pairs: list[tuple[Any, Callable[..., None]]]) -> None:
    for signal, receiver in pairs:
        signal.disconnect(receiver)


class _RequestLogState:
    """A request's log records so far and its environ's secrets."""

    __slots__ = ("environ_secrets", "logs", "trace")

    def __init__(self, trace: Trace, environ_secrets: set[str] | None, logs: int) -> None:
        self.trace = trace
        self.environ_secrets = environ_secrets
        self.logs = logs


class _LogCapture(logging.Filter):
    """Adds the records logged on ``app.logger`` during a traced request of
    this app to its trace, as ``log:<level>`` events (at most ``limit`` per
    trace). It formats nothing but the record's message, and lets every
    record through.

    A filter, not a handler: Flask looks at the logger's handlers when it
    makes ``app.logger`` (to decide whether to add its default handler), and
    so does Python's logging (to fall back on its last-resort handler).
    """

    def __init__(self, tracer: _AppTracer, limit: int) -> None:
        super().__init__()
        self._limits = tracer.limits
        self._clock = tracer.clock
        self._limit = limit
        self._max_string = tracer.max_string
        self._redactor = tracer.redactor
        # What the last record's request needs for the next one (see filter).
        self._last: _RequestLogState | None = None
        self._is_secret = tracer.redactor.is_secret

    def filter(self, record: logging.LogRecord) -> bool:
        trace = _get_trace()
        if trace is None or trace._limits is not self._limits:
            return True
        try:
            # The request's log count and environ secrets are worked out on
            # its first record (or when another request's came in between),
            # not on every record.
            state = self._last
            if state is None or state.trace is not trace:
                state = self._last = _RequestLogState(
                    trace,
                    _request_environ_secrets(self._redactor),
                    sum(1 for key in trace.event_keys() if key[0] == "log"),
                )
            if state.logs >= self._limit:
                trace.note_truncated("logs")
                return True
            now = self._clock()
            message = record.getMessage()
            scrub = _scrubber(self._redactor, state.environ_secrets)
            attrs = {
                "level": record.levelname,
                "logger": record.name,
                "message": cut(
                    redact_request_path(
                        message if scrub is None else scrub(message), self._is_secret
                    ),
                    self._max_string,
                ),
            }
            if record.exc_info and record.exc_info[0] is not None:
                attrs["exc_type"] = record.exc_info[0].__name__
            trace.record("log", f"log:{record.levelname.lower()}", now, now, attrs)
            state.logs += 1
        except Exception:
            report_internal_error("flask.log", trace)
        return True


def _capture_logs(app: Flask, tracer: _AppTracer, limit: int) -> None:
    # The logger app.logger is, without making app.logger: Flask makes it on
    # first use, setting its level from app.debug and adding its default
    # handler from the state at that time, which may be after init_app.
    logger = logging.getLogger(app.name)
    capture = _LogCapture(tracer, limit)
    logger.addFilter(capture)
    # The logger outlives the app (logging keeps it): detach with the app.
    weakref.finalize(app, logger.removeFilter, capture)
