"""WSGI middleware that records the lifecycle of every request.

::

    from wsgitrace import TraceMiddleware

    app = TraceMiddleware(app)          # any WSGI app
    app.buffer.latest(5)                # the newest traces

It records ``request``, ``app``, ``start_response``, ``first_byte``, ``body``,
``write``, ``close`` and ``error`` events, and notes WSGI protocol problems as
warnings on the trace. It is transparent: the app sees the same environ and
callables, the server gets the same status, headers, body, laziness, ``len()``,
``close()`` and exceptions. An error inside wsgitrace is logged once and never
changes the response.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import random
import time
from collections.abc import Callable, Iterable, Iterator
from itertools import chain
from typing import TYPE_CHECKING, Any

from .buffer import TraceBuffer
from .config import Options, resolve_options
from .context import _current_trace
from .redact import REDACTED, Redactor
from .trace import (
    APP_END,
    BODY_END,
    BODY_START,
    CLOSE_END,
    CLOSE_START,
    END,
    FIRST_BYTE,
    START_RESPONSE,
    UNSET,
    Trace,
    TraceLimits,
    cut,
    format_error,
)

if TYPE_CHECKING:
    from _typeshed import OptExcInfo
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

    from ._types import Clock, TraceListener
    from .sinks import SinkDispatcher

logger = logging.getLogger("wsgitrace")

_internal_errors: dict[str, int] = {}
_capture_listeners: list[TraceListener] = []


def internal_error_count() -> int:
    """How many errors wsgitrace's own code has caught in this process."""
    return sum(_internal_errors.values())


def report_internal_error(where: str, trace: Trace | None = None) -> None:
    """Count an error of wsgitrace's own code (call from an ``except``
    block), log it once per place, and note it on the trace. Never raises.
    """
    try:
        count = _internal_errors.get(where, 0)
        _internal_errors[where] = count + 1
        if count == 0:
            logger.error("wsgitrace: internal error in %s (logged once)", where, exc_info=True)
        if trace is not None:
            now = trace.now()
            trace.record("tracer_error", "tracer_error", now, now, {"where": where})
    except Exception:  # noqa: S110 - the last line of defence must not raise
        pass


def add_capture_listener(listener: TraceListener) -> None:
    """Call ``listener`` with every trace any middleware in this process adds
    to its buffer (used by the pytest plugin).
    """
    _capture_listeners.append(listener)


def remove_capture_listener(listener: TraceListener) -> None:
    """Undo :func:`add_capture_listener`."""
    with contextlib.suppress(ValueError):
        _capture_listeners.remove(listener)


class TraceMiddleware:
    """Trace every request the wrapped WSGI app serves.

    Options (see :mod:`wsgitrace.config`) may also come from ``WSGITRACE_*``
    environment variables; keywords win.

    :param app: The WSGI application to wrap.
    :param buffer: Where traces go; a new :class:`TraceBuffer` sized by
        ``max_traces`` and ``max_bytes`` when not given.
    :param clock: Nanosecond clock (tests inject one to assert durations).
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
        self._exclude = opts.exclude
        self._capture_headers = opts.capture_headers
        self._header_memo: dict[str, tuple[str, bool]] = {}
        self._plans: dict[tuple[str, ...], _RequestHeaderPlan] = {}
        # One bound method for every trace to keep, not one per request.
        self._flatten_response_headers = self.response_headers
        self._prefix = opts.prefix
        self._endpoint_app: WSGIApplication | None = None
        if opts.endpoint is not False:
            # Build it now so bad endpoint options fail at set-up time.
            self._endpoint_app = self._make_endpoint()
        #: Where finished traces also go (store, OTLP), or ``None``.
        self.sinks: SinkDispatcher | None = None
        if opts.enabled and (opts.store or opts.otlp):
            from .sinks import build_sinks

            self.sinks = build_sinks(opts)

    # -- the endpoint -------------------------------------------------------

    def _make_endpoint(self) -> WSGIApplication | None:
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
            if _current_trace.get() is None:
                return self.app(environ, start_response)
            # Served inside another traced request (an app calling another
            # app): this request is not traced, so nothing may record into
            # the outer request's trace meanwhile.
            outer = _current_trace.set(None)
            try:
                return self.app(environ, start_response)
            finally:
                _current_trace.reset(outer)
        token = _current_trace.set(body.trace)
        try:
            app_iter = self.app(environ, body.start_response)
        except BaseException as exc:
            _current_trace.reset(token)
            body.app_raised(exc)
            raise
        _current_trace.reset(token)
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
            path,
            query=self.redactor.query(query) if query else "",
            remote_addr=environ.get("REMOTE_ADDR"),
            clock=self.clock,
            limits=self.limits,
        )
        if self._capture_headers:
            self._capture_request_headers(environ, trace)
        environ["wsgitrace.trace"] = trace
        return trace

    def _capture_request_headers(self, environ: WSGIEnvironment, trace: Trace) -> None:
        # Environs of one server and client share a key order, so a plan
        # made once per order copies the values with one C-level call; names
        # and redaction are laid out when the trace is read.
        shape = tuple(environ)
        plan = self._plans.get(shape)
        if plan is None:
            plan = _RequestHeaderPlan(shape, self)
            if len(self._plans) < 512:
                self._plans[shape] = plan
        if plan.dropped:
            trace.note_truncated("request_headers", plan.dropped)
        if not plan.layout:
            return
        trace._request_plan = plan
        fetch = plan.fetch
        if fetch is None:
            return  # only secret headers: nothing to copy
        values = fetch(environ)
        if plan.single:
            values = (values,)
        try:
            # Strings are the rule; anything else with a length (bytes) is
            # kept and shown as its repr when read.
            fits = max(map(len, values)) <= self.limits.max_string
        except TypeError:
            fits = False
        if not fits:
            values = plan.fit(values, trace)
        trace._request_values = values

    def _header_entry(self, key: str) -> tuple[str, bool]:
        if key.startswith("HTTP_"):
            raw = key[5:]
        elif key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            raw = key
        else:
            raw = ""
        name = "-".join(part.capitalize() for part in raw.split("_")) if raw else ""
        entry = (name, bool(name) and self.redactor.is_secret(name))
        if len(self._header_memo) < 2048:
            self._header_memo[key] = entry
        return entry

    def response_headers(self, headers: list[tuple[str, str]], trace: Trace) -> tuple[str, ...]:
        """Flatten, redact and cap the response headers; note Content-Length.
        Called when the trace's headers are first read, not while serving.
        """
        is_secret = self.redactor.is_secret
        max_string = self.limits.max_string
        room = self.limits.max_headers
        # A later start_response (with exc_info) may drop Content-Length.
        trace.content_length = None
        out: list[str] = []
        for name, value in headers:
            if name.lower() == "content-length":
                length = _parse_content_length(value)
                if length is None:
                    trace.warn(f"invalid Content-Length header: {value!r}")
                else:
                    trace.content_length = length
            if room == 0:
                trace.note_truncated("response_headers")
                continue
            room -= 1
            if is_secret(name):
                value = REDACTED
            elif len(value) > max_string:
                trace.note_truncated("header_values")
                value = cut(value, max_string)
            out.append(name)
            out.append(value)
        return tuple(out)

    def publish(self, trace: Trace) -> None:
        """Put a trace into the buffer and tell the sinks and capture listeners."""
        self.buffer.append(trace)
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
                listener(trace)
            except Exception:
                report_internal_error("capture_listener", trace)

    def __repr__(self) -> str:
        return f"<TraceMiddleware {self.app!r} {self.buffer!r}>"


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
            self._last = now = self._clock()
        except Exception:
            report_internal_error("clock")
            return self._last
        return now


class _RequestHeaderPlan:
    """Which environ keys of one key order are headers, their names, and
    which are secret (their values are never copied).
    """

    __slots__ = ("dropped", "fetch", "layout", "max_string", "single")

    def __init__(self, keys: tuple[str, ...], middleware: TraceMiddleware) -> None:
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
        """Values as strings, cut to the string cap (the rare path)."""
        out: list[str] = []
        for value in values:
            text = value if type(value) is str else repr(value)
            if len(text) > self.max_string:
                trace.note_truncated("header_values")
                text = cut(text, self.max_string)
            out.append(text)
        return tuple(out)

    def expand(self, values: tuple[Any, ...], trace: Trace) -> tuple[str, ...]:
        """The flat ``(name, value, ...)`` tuple, secrets redacted."""
        out: list[str] = []
        fetched = iter(values)
        for name, secret in self.layout:
            out.append(name)
            if secret:
                out.append(REDACTED)
                continue
            value = next(fetched)
            if type(value) is not str:
                value = cut(repr(value), self.max_string)
            out.append(value)
        return tuple(out)


class _TracedBody:
    """Per-request recorder and the app's response iterable, wrapped to
    record chunks and ``close()`` (in the manner of werkzeug's
    ``lint.GuardedIterator``). One object per request: it hands the app the
    recording ``start_response`` and ``write``, then becomes the body.
    """

    __slots__ = (
        "_app_iter",
        "_body_start",
        "_closed",
        "_exhausted",
        "_iterator",
        "_middleware",
        "_returned",
        "_server_start_response",
        "_server_write",
        "_starts",
        "trace",
    )

    def __init__(
        self, middleware: TraceMiddleware, trace: Trace, start_response: StartResponse
    ) -> None:
        self._middleware = middleware
        self.trace = trace
        self._server_start_response = start_response
        self._server_write: Callable[[bytes], object] | None = None
        self._starts = 0
        self._body_start = 0
        self._exhausted = False
        self._returned = False
        self._closed = False
        self._app_iter: Iterable[bytes] = ()
        self._iterator: Iterator[bytes] | None = None

    # -- callables handed to the app ---------------------------------------

    def start_response(
        self,
        status: str,
        headers: list[tuple[str, str]],
        exc_info: OptExcInfo | None = None,
    ) -> Callable[[bytes], object]:
        trace = self.trace
        if exc_info is None and not self._starts:
            # The common case: two stores, the headers flattened when read.
            self._starts = 1
            try:
                trace._times[START_RESPONSE] = trace._clock()
                trace.status = status
                if self._middleware._capture_headers:
                    # Kept as given; flattened, redacted and cut when read.
                    trace._raw_response_headers = headers
                    trace._flatten_headers = self._middleware._flatten_response_headers
                else:
                    trace.content_length = _content_length(headers)
            except Exception:
                report_internal_error("start_response", trace)
            try:
                self._server_write = self._server_start_response(status, headers)
            except BaseException:
                trace.status = None
                trace.set_raw_response_headers(None, None)
                raise
            return self.write
        sent = (trace.status, trace.response_headers, trace.content_length)
        try:
            self._on_start_response_again(status, headers, exc_info)
        except Exception:
            report_internal_error("start_response", trace)
        try:
            if exc_info is None:
                self._server_write = self._server_start_response(status, headers)
            else:
                self._server_write = self._server_start_response(status, headers, exc_info)
        except BaseException:
            # Refused by the server (exc_info once headers were sent): the
            # trace keeps the status and headers the client got.
            trace.status, trace.response_headers, trace.content_length = sent
            raise
        return self.write

    def _on_start_response_again(
        self, status: str, headers: list[tuple[str, str]], exc_info: OptExcInfo | None
    ) -> None:
        trace = self.trace
        now = trace.now()
        if self._starts and exc_info is None:
            trace.warn("start_response called twice without exc_info")
        first = not self._starts
        self._starts += 1
        trace.status = status
        if self._middleware._capture_headers:
            trace.response_headers = self._middleware.response_headers(headers, trace)
        else:
            trace.content_length = _content_length(headers)
        if first and exc_info is None:
            trace.start_response_ns = now
        else:
            attrs = {"exc_info": True} if exc_info is not None else None
            trace.record("start_response", "start_response", now, now, attrs)

    def write(self, data: bytes) -> object:
        write = self._server_write
        if write is None:
            # Same failure the server would give for write() before
            # start_response, without touching our own state first.
            msg = "write() called before start_response()"
            raise AssertionError(msg)
        start: int | None
        try:
            start = self.trace.now()
        except Exception:
            report_internal_error("write", self.trace)
            start = None
        result = write(data)
        if start is None:
            return result
        try:
            trace = self.trace
            end = trace.now()
            size = len(data)
            if size and trace.first_byte_ns is None:
                trace.first_byte_ns = start
            trace.bytes_sent += size
            trace.record("write", "write", start, end, {"bytes": size})
        except Exception:
            report_internal_error("write", self.trace)
        return result

    # -- the app call -------------------------------------------------------

    def app_raised(self, exc: BaseException) -> None:
        try:
            trace = self.trace
            now = trace._times[APP_END] = trace._clock()
            self._error(exc, "app", now)
            self._middleware.publish(trace)
            self._finish(now)
        except Exception:
            report_internal_error("app_raised", self.trace)

    def app_returned(self, app_iter: Iterable[bytes], environ: WSGIEnvironment) -> Iterable[bytes]:
        try:
            trace = self.trace
            now = trace._times[APP_END] = trace._clock()
            middleware = self._middleware
            middleware.buffer.append(trace)
            if middleware.sinks is not None or _capture_listeners:
                middleware._announce(trace)
            file_wrapper = environ.get("wsgi.file_wrapper")
            if file_wrapper is not None and (
                isinstance(app_iter, file_wrapper)
                if isinstance(file_wrapper, type)
                # A factory function (uWSGI's, for one): PEP 3333 file
                # wrappers keep the file as ``filelike``.
                else hasattr(app_iter, "filelike")
            ):
                # Returned untouched so the server can still use sendfile.
                trace.record("file_wrapper", "file_wrapper", now, now)
                self._finish(now)
                return app_iter
            self._app_iter = app_iter
            if hasattr(type(app_iter), "__len__"):
                self.__class__ = _SizedTracedBody
            self._returned = True
            return self
        except Exception:
            report_internal_error("app_returned", self.trace)
            return app_iter

    # -- the body -----------------------------------------------------------

    def __iter__(self) -> Iterator[bytes]:
        # A generator, not __next__ on this object: resuming a frame costs
        # less than a method call per chunk. It holds this body, not the
        # other way round, so no reference cycle delays __del__.
        return _iterate(self, iter(self._app_iter))

    def __next__(self) -> bytes:
        # Only for callers that skip iter() (not PEP 3333 servers).
        iterator = self._iterator
        if iterator is None:
            iterator = self._iterator = _iterate(self, iter(self._app_iter))
        return next(iterator)

    def close(self) -> None:
        trace = self.trace
        first = not self._closed
        self._closed = True
        start: int | None
        try:
            start = trace._clock()
        except Exception:
            report_internal_error("close", trace)
            start = None
        token = _current_trace.set(trace)
        error: BaseException | None = None
        try:
            close = getattr(self._app_iter, "close", None)
            if close is not None:
                close()
        except BaseException as exc:
            error = exc
            raise
        finally:
            _current_trace.reset(token)
            if first:
                try:
                    times = trace._times
                    now = trace._clock()
                    if start is None:
                        start = now
                    if times[BODY_END] == UNSET:
                        times[BODY_START] = self._body_start or start
                        times[BODY_END] = start
                    times[CLOSE_START] = start
                    times[CLOSE_END] = now
                    if error is not None:
                        self._error(error, "close", now)
                    if not trace.finished:
                        self._finish(now)
                    elif times[END] < now:
                        # Finished early by an iteration error: the exchange
                        # still ends when the server closes the body.
                        times[END] = now
                except Exception:
                    report_internal_error("closed", trace)

    def __del__(self) -> None:
        if self._returned and not self._closed:
            self._collected()

    # -- finishing ----------------------------------------------------------

    def _record_body(self, end: int) -> None:
        trace = self.trace
        times = trace._times
        if times[BODY_END] == UNSET:
            times[BODY_START] = self._body_start or end
            times[BODY_END] = end

    def _iteration_failed(self, exc: BaseException) -> None:
        try:
            now = self.trace._clock()
            self._record_body(now)
            if not isinstance(exc, GeneratorExit):
                self._error(exc, "iteration", now)
            self._finish(now)
        except Exception:
            report_internal_error("iteration_failed", self.trace)

    def _collected(self) -> None:
        """The body was garbage-collected without ``close()``."""
        try:
            trace = self.trace
            if trace.finished:
                return
            trace.warn("unclosed: the response body was garbage-collected without close()")
            now = trace._clock()
            self._record_body(now)
            self._finish(now)
        except Exception:
            report_internal_error("collected", self.trace)

    def _error(self, exc: BaseException, where: str, now: int) -> None:
        trace = self.trace
        if trace.error is None:
            trace.error = format_error(exc, where, trace.limits)
        trace.record("error", "error", now, now, {"where": where, "type": type(exc).__name__})

    def _finish(self, end: int) -> None:
        trace = self.trace
        if trace.finished:
            return
        if self._exhausted and trace.method != "HEAD":
            if trace._raw_response_headers is None:
                trace._check_length()
            else:
                # Compared when the headers are first read, not while serving.
                trace._length_check = True
        times = trace._times
        times[END] = end
        trace.finished = True
        raw = trace._raw_response_headers
        if type(raw) is list:
            # One flat tuple of the strings: a third of the list's memory.
            trace._raw_response_headers = tuple(chain.from_iterable(raw))
        middleware = self._middleware
        middleware.buffer.finished(trace)  # lock-free: safe from __del__
        if middleware.sinks is not None:
            middleware.sinks.submit(trace)


def _iterate(body: _TracedBody, iterator: Iterator[bytes]) -> Iterator[bytes]:
    """Yield the app's chunks, recording them, with the trace current while
    the app produces each one.
    """
    trace = body.trace
    times = trace._times
    clock = trace._clock
    set_current = _current_trace.set
    reset_current = _current_trace.reset
    # A for loop, not next() in a try: the app's StopIteration then ends
    # the loop in C instead of being raised into this frame.
    token = set_current(trace)
    producing = True
    try:
        for chunk in iterator:
            reset_current(token)
            producing = False
            try:
                size = len(chunk)
                if trace.chunks:
                    trace.chunks += 1
                    if size:
                        trace.bytes_sent += size
                        if times[FIRST_BYTE] == UNSET:
                            times[FIRST_BYTE] = clock()
                else:
                    now = body._body_start = clock()
                    trace.chunks = 1
                    if not body._starts:
                        trace.warn("body yielded before start_response was called")
                    if size:
                        times[FIRST_BYTE] = now
                        trace.bytes_sent += size
            except Exception:
                report_internal_error("chunk", trace)
            yield chunk
            token = set_current(trace)
            producing = True
    except BaseException as exc:
        if not producing:
            # Thrown in where the chunk was yielded (close() of this
            # generator, or throw()): not the app's iteration failing.
            raise
        reset_current(token)
        body._iteration_failed(exc)
        raise
    reset_current(token)
    try:
        body._exhausted = True
        if times[BODY_END] == UNSET:
            end = clock()
            times[BODY_START] = body._body_start or end
            times[BODY_END] = end
    except Exception:
        report_internal_error("body_done", trace)


class _SizedTracedBody(_TracedBody):
    """A traced body whose app iterable has a length, so servers can still
    use ``len()`` (e.g. to set ``Content-Length`` for one-element lists).
    """

    __slots__ = ()

    def __len__(self) -> int:
        return len(self._app_iter)  # type: ignore[arg-type]


def _content_length(headers: list[tuple[str, str]]) -> int | None:
    """The valid ``Content-Length`` of a header list, if any."""
    for name, value in headers:
        if name.lower() == "content-length":
            return _parse_content_length(value)
    return None


def _parse_content_length(value: str) -> int | None:
    """A ``Content-Length`` value as an int, ``None`` unless it is all digits
    (``int()`` would also take ``+5``, `` 5`` or ``5_0``).
    """
    value = value.strip()
    return int(value) if value.isdigit() and value.isascii() else None
