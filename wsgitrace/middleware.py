"""WSGI middleware that records the lifecycle of every request.

::

    from wsgitrace import TraceMiddleware

    app = TraceMiddleware(app)          # any WSGI app
    app.buffer.latest(5)                # the newest traces

It records ``request``, ``app``, ``start_response``, ``first_byte``, ``body``,
``write``, ``close``, ``error`` and ``file_wrapper`` events (and a
``tracer_error`` where its own code failed), and notes WSGI protocol problems
as warnings on the trace. It is transparent: the app sees the same environ (plus
``wsgitrace.trace``, the request's trace, under wsgitrace's own name as PEP
3333 allows) and callables, the server gets the same status, headers, body,
laziness, ``len()``, ``close()`` and exceptions. An error inside wsgitrace is logged once and never
changes the response.
"""

from __future__ import annotations

import operator
import random
import time
from collections.abc import Callable, Iterable
from sys import getsizeof
from typing import TYPE_CHECKING, Any

from ._body import _parse_content_length, _TracedBody
from ._internal import _capture_listeners as _capture_listeners
from ._internal import add_capture_listener as add_capture_listener
from ._internal import internal_error_count as internal_error_count
from ._internal import remove_capture_listener as remove_capture_listener
from ._internal import report_internal_error
from .buffer import TraceBuffer
from .config import Options, resolve_options
from .context import _get_trace, _reset_trace, _set_trace
from .redact import REDACTED, URL_HEADERS, Redactor
from .trace import (
    HeaderFlattener,
    HeaderLayout,
    Trace,
    TraceLimits,
    cut,
)

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

    from ._types import Clock
    from .endpoint import TraceEndpoint
    from .sinks import SinkDispatcher


# Bound once: a method looked up on a type is not cached by CPython 3.11.
_plain_str = str.__str__

#: Environ key orders whose header plans are kept (the oldest goes first).
_PLAN_CACHE_SIZE = 512
#: Environs whose keys add up to more characters get no kept plan.
_PLAN_KEY_CHARS = 4096


class TraceMiddleware:
    """Trace every request the wrapped WSGI app serves.

    Options (see :mod:`wsgitrace.config`) may also come from ``WSGITRACE_*``
    environment variables; keywords win.

    :param app: The WSGI application to wrap.
    :param buffer: Where traces go; a new :class:`TraceBuffer` sized by
        ``max_traces`` and ``max_bytes`` when not given.
    :param clock: Nanosecond clock (tests inject one to assert durations).
        Events are ordered by their readings, so a test clock should advance
        on every reading: with one that repeats (a frozen clock), events that
        start on the same reading may be listed out of call order.
    :param options: Any option of :data:`~wsgitrace.config.OPTION_SPECS`.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        app: WSGIApplication,
        buffer: TraceBuffer | None = None,
        *,
        clock: Clock | None = None,
        **options: Any,
    ) -> None:
        config = options.pop("_config", None)
        self._endpoint_auto: Callable[[], bool] | None = options.pop("_endpoint_auto", None)
        self.app = app
        self.options: Options = resolve_options(options, config)
        opts = self.options
        self.buffer = buffer if buffer is not None else TraceBuffer(opts.max_traces, opts.max_bytes)
        self.enabled = opts.enabled
        self.limits = TraceLimits(opts.max_events, opts.max_string, opts.max_headers)
        if opts.redact_defaults:
            self.redactor = Redactor(extra_headers=opts.redact, extra_patterns=opts.redact)
        else:
            self.redactor = Redactor(headers=opts.redact, patterns=opts.redact)
        self.clock: Clock = time.perf_counter_ns if clock is None else _SafeClock(clock)
        self._sample = opts.sample
        # Compared with PATH_INFO, which holds the request's bytes as latin-1
        # (PEP 3333): a prefix such as a non-ASCII static_url_path is
        # matched in that form.
        self._exclude = tuple(map(_wsgi_path, opts.exclude))
        self._capture_headers = opts.capture_headers
        self._header_memo: dict[str, tuple[str, bool]] = {}
        self._plans: dict[tuple[str, ...], _RequestHeaderPlan] = {}
        # One flattener for every trace to keep (not one per request); it
        # holds no reference to this middleware, so a kept trace never keeps
        # the app (through a wrapper made before FlaskTrace) alive.
        self._flatten_response_headers: HeaderFlattener = _ResponseHeaderFlattener(
            self.redactor, self.limits
        )
        if type(self).response_headers is not TraceMiddleware.response_headers:
            self._flatten_response_headers = self.response_headers  # a subclass's own
        self._prefix = opts.prefix
        self._endpoint_app: TraceEndpoint | None = None
        if opts.endpoint is not False:
            # Build it now so bad endpoint options fail at set-up time.
            self._endpoint_app = self._make_endpoint()
        #: Where finished traces also go (store, OTLP), or ``None``.
        self.sinks: SinkDispatcher | None = None
        if opts.enabled and (opts.store or opts.otlp):
            from .sinks import build_sinks

            self.sinks = build_sinks(opts)
        if self._endpoint_app is not None:
            self._endpoint_app.sinks = self.sinks

    # -- the endpoint -------------------------------------------------------

    def _make_endpoint(self) -> TraceEndpoint | None:
        if self.options.endpoint is None and self._endpoint_auto is None:
            return None
        from .endpoint import TraceEndpoint

        return TraceEndpoint(self.buffer, self.options)

    @property
    def endpoint(self) -> WSGIApplication | None:
        """The ``/_trace`` WSGI app this middleware serves under its prefix,
        or ``None`` when it has none.
        """
        return self._endpoint_app

    def endpoint_enabled(self) -> bool:
        """Whether requests under the prefix are answered by the endpoint now."""
        if self._endpoint_app is None:
            return False
        if self.options.endpoint is not None:
            return self.options.endpoint
        auto = self._endpoint_auto
        try:
            return auto is not None and bool(auto())
        except Exception:
            report_internal_error("endpoint_auto")
            return False

    # -- the request path ---------------------------------------------------

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if not self.enabled:
            return self.app(environ, start_response)
        path: str = environ.get("PATH_INFO") or "/"
        if self._endpoint_app is not None and path.startswith(self._prefix):
            rest = path[len(self._prefix) :]
            if (not rest or rest[0] == "/") and self.endpoint_enabled():
                return self._endpoint_app(environ, start_response)
        try:
            trace = self._begin(environ, path)
            body = None if trace is None else _TracedBody(self, trace, start_response)
        except Exception:
            report_internal_error("begin")
            body = None
        if body is None:
            if _get_trace() is None:
                return self.app(environ, start_response)
            # Served inside another traced request (an app calling another
            # app): this request is not traced, so nothing may record into
            # the outer request's trace meanwhile.
            outer = _set_trace(None)
            try:
                return self.app(environ, start_response)
            finally:
                _reset_trace(outer)
        token = _set_trace(body.trace)
        app = self.app
        try:
            app_iter = app(environ, body.start_response)
        except BaseException as exc:
            _reset_trace(token)
            body.app_raised(exc, environ)
            raise
        _reset_trace(token)
        return body.app_returned(app_iter, environ)

    def _begin(self, environ: WSGIEnvironment, path: str) -> Trace | None:
        if self._exclude and path.startswith(self._exclude):
            return None
        sample = self._sample
        if sample != 1.0:
            if callable(sample):
                if not sample(environ):
                    return None
            elif random.random() >= sample:  # noqa: S311 - sampling, not security
                return None
        query = environ.get("QUERY_STRING")
        trace = Trace(
            environ.get("REQUEST_METHOD", "GET"),
            # Path parameters (/cart;jsessionid=...) are checked as a query is.
            self.redactor.path(path) if ";" in path else path,
            query=self.redactor.query(query) if query else "",
            remote_addr=environ.get("REMOTE_ADDR"),
            clock=self.clock,
            limits=self.limits,
            redactor=self.redactor,
        )
        if self._capture_headers:
            self._capture_request_headers(environ, trace)
        # Kept apart from the headers (which may not be captured): an
        # OpenTelemetry export continues the caller's trace from it.
        traceparent = environ.get("HTTP_TRACEPARENT")
        if traceparent is not None and type(traceparent) is str:
            trace.traceparent = traceparent[:256]
            tracestate = environ.get("HTTP_TRACESTATE")
            if tracestate is not None and type(tracestate) is str:
                trace.tracestate = tracestate[:1024]
        environ["wsgitrace.trace"] = trace
        return trace

    def _capture_request_headers(self, environ: WSGIEnvironment, trace: Trace) -> None:
        # Environs of one server and client share a key order, so a plan
        # made once per order copies the values with one C-level call; names
        # and redaction are laid out when the trace is read.
        shape = tuple(environ)
        plans = self._plans
        plan = plans.get(shape)
        shared = plan is not None
        if plan is None:
            plan = _RequestHeaderPlan(shape, self)
            if sum(map(len, shape)) <= _PLAN_KEY_CHARS:
                if len(plans) >= _PLAN_CACHE_SIZE:
                    plans.pop(next(iter(plans)), None)  # the oldest
                plans[shape] = plan
                shared = True
        if plan.dropped:
            trace.note_truncated("request_headers", plan.dropped)
        if not plan.layout:
            return
        values: tuple[Any, ...] = ()
        fetch = plan.fetch
        if fetch is not None:  # None: only secret headers, nothing to copy
            values = fetch(environ)
            if plan.single:
                values = (values,)
            try:
                # str.__str__ takes only strings and makes a subclass a plain
                # one (no code of its own runs); any other value, whose repr
                # may run code, is made a string in fit(), not when read.
                values = tuple(map(_plain_str, values))
                fits = max(map(len, values)) <= self.limits.max_string
            except TypeError:
                fits = False
            if not fits:
                values = plan.fit(values, trace)
        if shared:
            trace._request_plan = plan
            trace._request_values = values
        else:
            # An environ too unusual to keep a plan for: laid out now, so the
            # trace keeps (and its size counts) only the cut strings.
            trace.request_headers = plan.expand(values)

    def _header_entry(self, key: str) -> tuple[str, bool]:
        if key.startswith("HTTP_"):
            raw = key[5:]
        elif key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            raw = key
        else:
            raw = ""
        name = "-".join(part.capitalize() for part in raw.split("_")) if raw else ""
        entry = (cut(name, self.limits.max_string), bool(name) and self.redactor.is_secret(name))
        if len(self._header_memo) < 2048 and len(key) <= 256:
            self._header_memo[key] = entry
        return entry

    def response_headers(self, headers: list[tuple[str, str]]) -> HeaderLayout:
        """Flatten, redact and cap the response headers, and find their
        valid Content-Length. Called when a trace's headers are first read,
        not while serving; changes nothing, the trace applies the result.
        """
        return self._flatten_response_headers(headers)

    def publish(self, trace: Trace) -> None:
        """Put a trace into the buffer and tell the sinks and capture listeners."""
        self.buffer.append(trace)
        if self.sinks is not None or _capture_listeners:
            self._announce(trace)

    def _announce(self, trace: Trace) -> None:
        sinks = self.sinks
        if sinks is not None and not sinks.running:
            # Here, not when the trace finishes (maybe in a finalizer): the
            # sinks' threads start in each process, e.g. after a fork.
            sinks.start()
        for listener in _capture_listeners:
            # A failing listener must not stop the others or the trace's finish.
            try:
                listener(trace, self)
            except Exception:
                report_internal_error("capture_listener", trace)

    def __repr__(self) -> str:
        return f"<TraceMiddleware {self.app!r} {self.buffer!r}>"


def _wsgi_path(path: str) -> str:
    """A path as a WSGI server gives it in ``PATH_INFO``: its UTF-8 bytes
    read as latin-1 (an ASCII path is unchanged). Bytes that were not
    UTF-8 (an environment variable's, kept as surrogate escapes) stay as
    they were.
    """
    return path.encode("utf-8", "surrogateescape").decode("latin-1")


class _ResponseHeaderFlattener:
    """Lays out a response's header list for a trace when it is first read
    (see :meth:`TraceMiddleware.response_headers`).
    """

    __slots__ = ("_limits", "_redactor")

    def __init__(self, redactor: Redactor, limits: TraceLimits) -> None:
        self._redactor = redactor
        self._limits = limits

    def __call__(self, headers: list[tuple[str, str]]) -> HeaderLayout:
        """Flatten, redact and cap the response headers, and find their
        valid Content-Length. Called when a trace's headers are first read,
        not while serving; changes nothing, the trace applies the result.
        """
        is_secret = self._redactor.is_secret
        max_string = self._limits.max_string
        room = self._limits.max_headers
        content_length = None
        warnings: list[str] = []
        dropped = cut_count = 0
        out: list[str] = []
        for name, value in headers:
            lowered = name.lower()
            if lowered == "content-length":
                length = _parse_content_length(value)
                if length is None:
                    warnings.append(f"invalid Content-Length header: {value!r}")
                else:
                    content_length = length
            if room == 0:
                dropped += 1
                continue
            room -= 1
            if is_secret(name):
                value = REDACTED
            else:
                if lowered in URL_HEADERS:
                    value = self._redactor.url(value)
                if len(value) > max_string:
                    cut_count += 1
                    value = cut(value, max_string)
            out.append(name)
            out.append(value)
        return HeaderLayout(tuple(out), content_length, tuple(warnings), dropped, cut_count)


class _SafeClock:
    """A clock given by the user, made unable to fail: when it raises, the
    error is counted and its last good reading is returned, so the code on
    the request path reads clocks without guarding each call.
    """

    __slots__ = ("_clock", "_last")

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._last = 0

    def __call__(self) -> int:
        try:
            self._last = now = int(self._clock())
        except Exception:
            report_internal_error("clock")
            return self._last
        return now


class _RequestHeaderPlan:
    """Which environ keys of one key order are headers, their names, and
    which are secret (their values are never copied).
    """

    __slots__ = ("dropped", "fetch", "layout", "max_string", "redactor", "single")

    def __init__(self, keys: tuple[str, ...], middleware: TraceMiddleware) -> None:
        self.redactor = middleware.redactor
        room = middleware.limits.max_headers
        self.max_string = middleware.limits.max_string
        layout: list[tuple[str, bool]] = []
        fetched: list[str] = []
        self.dropped = 0
        for key in keys:
            entry = middleware._header_memo.get(key) or middleware._header_entry(key)
            if not entry[0]:
                continue
            if len(layout) == room:
                self.dropped += 1
                continue
            layout.append(entry)
            if not entry[1]:
                fetched.append(key)
        self.layout = tuple(layout)
        self.single = len(fetched) == 1
        self.fetch: Callable[[WSGIEnvironment], Any] | None = (
            operator.itemgetter(*fetched) if fetched else None
        )

    def fit(self, values: tuple[Any, ...], trace: Trace) -> tuple[str, ...]:
        """Values as strings, cut to the string cap (the rare path). What
        they take beyond the latin-1 size the estimate counts (a cut
        string's marker makes it two bytes a character) is added here.
        """
        out: list[str] = []
        for value in values:
            text = str.__str__(value) if isinstance(value, str) else repr(value)
            if len(text) > self.max_string:
                trace.note_truncated("header_values")
                text = cut(text, self.max_string)
            latin1 = len(text) + (49 if text.isascii() else 73)
            trace._own_key_bytes += max(0, getsizeof(text) - latin1)
            out.append(text)
        return tuple(out)

    def expand(self, values: tuple[Any, ...]) -> tuple[str, ...]:
        """The flat ``(name, value, ...)`` tuple, secrets redacted."""
        out: list[str] = []
        fetched = iter(values)
        for name, secret in self.layout:
            out.append(name)
            if secret:
                out.append(REDACTED)
                continue
            value = next(fetched)
            out.append(self.redactor.url(value) if name.lower() in URL_HEADERS else value)
        return tuple(out)
