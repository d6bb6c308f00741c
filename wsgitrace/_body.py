"""The per-request recorder of :class:`~wsgitrace.TraceMiddleware`: the
``start_response`` and ``write`` it hands the app, and the response body it
hands the server.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator
from itertools import chain
from typing import TYPE_CHECKING, cast

from ._internal import report_internal_error
from .context import _reset_trace, _set_trace
from .redact import scrubber
from .trace import (
    _LAYOUT_LOCK,
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
    _hook_that_raised,
    format_error,
)

if TYPE_CHECKING:
    from _typeshed import OptExcInfo
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

    from .middleware import TraceMiddleware

_flatten = chain.from_iterable
# How a body of a class is handed on: wrapped, wrapped with __len__, or as
# it is (a str or bytes, see _body_kind).
_ITERABLE, _SIZED, _TEXT = 0, 1, 2
# id(body class) -> (a weak reference to it, its _body_kind). Asked per
# request: hasattr() on a type that lacks the name builds an AttributeError
# each time. By id and weakly, so a class made in an app factory is not kept
# alive and an unhashable class is no problem.
_body_kinds: dict[int, tuple[weakref.ref[type], int]] = {}


class _TracedBody:
    """Per-request recorder and the app's response iterable, wrapped to
    record chunks and ``close()`` (in the manner of werkzeug's
    ``lint.GuardedIterator``). One object per request: it hands the app the
    recording ``start_response`` and ``write``, then becomes the body.
    """

    __slots__ = (
        "__weakref__",
        "_app_iter",
        "_body_start",
        "_closed",
        "_environ",
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
                # Called through a local: CPython 3.11 does not specialise
                # obj.attr() when attr is a stored callable, not a method.
                clock = trace._clock
                trace._times[START_RESPONSE] = clock()
                trace.status = status
                if self._middleware._capture_headers:
                    # Kept as given; flattened, redacted and cut when read.
                    trace._raw_response_headers = headers
                    if trace._flatten_headers is None:  # else set by FlaskTrace
                        trace._flatten_headers = self._middleware._flatten_response_headers
                else:
                    trace.content_length = _content_length(headers)
            except Exception:
                report_internal_error("start_response", trace)
            server_start_response = self._server_start_response
            try:
                self._server_write = server_start_response(status, headers)
            except BaseException:
                trace.status = None
                trace.set_raw_response_headers(None, None)
                raise
            return self.write
        now = trace._clock()
        try:
            if exc_info is None:
                self._server_write = self._server_start_response(status, headers)
            else:
                self._server_write = self._server_start_response(status, headers, exc_info)
        except BaseException:
            # Refused by the server (exc_info once headers were sent): the
            # trace keeps the status and headers the client got.
            self._start_response_again(status, headers, exc_info, now, accepted=False)
            raise
        self._start_response_again(status, headers, exc_info, now, accepted=True)
        return self.write

    def _start_response_again(
        self,
        status: str,
        headers: list[tuple[str, str]],
        exc_info: OptExcInfo | None,
        now: int,
        *,
        accepted: bool,
    ) -> None:
        """Record a ``start_response`` call other than the first plain one,
        after the server took or refused it.
        """
        try:
            trace = self.trace
            if self._starts and exc_info is None:
                trace.warn("start_response called twice without exc_info")
            self._starts += 1
            if accepted and self._middleware._capture_headers:
                # Kept raw, as the first time. Under the read-side lock: a
                # reader may be laying out the headers these replace.
                with _LAYOUT_LOCK:
                    trace.status = status
                    trace._response_headers = ()
                    trace._content_length = None
                    if trace._flatten_headers is None:
                        trace._flatten_headers = self._middleware._flatten_response_headers
                    trace._raw_response_headers = headers
            elif accepted:
                trace.status = status
                trace.content_length = _content_length(headers)
            # Never the first plain call (start_response handles that), so
            # always an event of its own.
            attrs = {"exc_info": True} if exc_info is not None else None
            trace.record("start_response", "start_response", now, now, attrs)
        except Exception:
            report_internal_error("start_response", self.trace)

    def write(self, data: bytes) -> object:
        write = self._server_write
        if write is None:
            # Same failure the server would give for write() before
            # start_response, without touching our own state first.
            msg = "write() called before start_response()"
            raise AssertionError(msg)
        start = self.trace.now()  # clocks never raise (see _SafeClock)
        result = write(data)
        try:
            trace = self.trace
            if trace.finished:
                # A write after close() (a thread the app left behind): the
                # server decides what it means; the published trace, already
                # counted and sent to the sinks, is left as it was.
                return result
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

    def app_raised(self, exc: BaseException, environ: WSGIEnvironment) -> None:
        try:
            trace = self.trace
            now = trace._times[APP_END] = trace._clock()
            self._environ = environ  # for _error, as after a return
            self._error(exc, "app", now)
            self._middleware.publish(trace)
            self._finish(now)
        except Exception:
            report_internal_error("app_raised", self.trace)

    def app_returned(self, app_iter: Iterable[bytes], environ: WSGIEnvironment) -> Iterable[bytes]:
        try:
            trace = self.trace
            clock = trace._clock
            now = trace._times[APP_END] = clock()
            raw = trace._raw_response_headers
            if type(raw) is list:
                # One flat tuple of the strings, a third of the list's memory,
                # made before the trace is published: no reader can hold the
                # list yet. (Headers started later stay a list.)
                trace._raw_response_headers = tuple(_flatten(raw))
            self._middleware.publish(trace)
            # Kept for an error while the body is sent: its message may hold
            # one of the request's secrets, which _error cuts out.
            self._environ = environ
            file_wrapper = environ.get("wsgi.file_wrapper")
            if file_wrapper is not None and (
                isinstance(app_iter, file_wrapper)
                if isinstance(file_wrapper, type)
                # A factory function: PEP 3333 file wrappers keep the file as
                # ``filelike``; uWSGI's returns the file itself, and sends it
                # with sendfile only if it gets that very object back.
                else hasattr(app_iter, "filelike") or hasattr(app_iter, "read")
            ):
                # Returned untouched so the server can still use sendfile.
                trace.record("file_wrapper", "file_wrapper", now, now)
                self._finish(now)
                return app_iter
            cls = type(app_iter)
            entry = _body_kinds.get(id(cls))
            if entry is not None and entry[0]() is cls:
                kind = entry[1]
            else:
                kind = _body_kind(cls)
                if len(_body_kinds) >= 256:
                    _body_kinds.clear()
                _body_kinds[id(cls)] = (weakref.ref(cls), kind)
            if kind == _TEXT:
                trace.warn(
                    f"the app returned a {cls.__name__} as its body, not an iterable of bytes"
                )
                self._finish(now)
                return app_iter
            self._app_iter = app_iter
            if kind == _SIZED:
                self.__class__ = _SizedTracedBody
            self._returned = True
            return self
        except Exception:
            report_internal_error("app_returned", self.trace)
            # The body goes back unwrapped, so nothing else would finish the
            # trace (published already, or about to be left in progress).
            try:
                self._finish(self.trace._clock())
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
        # Only for callers that skip iter() (not PEP 3333 servers). The
        # generator is kept here, so it gets this body through a weak proxy:
        # a cycle would keep an abandoned body from being finished.
        iterator = self._iterator
        if iterator is None:
            body = cast("_TracedBody", weakref.proxy(self))
            iterator = self._iterator = _iterate(body, iter(self._app_iter))
        return next(iterator)

    def close(self) -> None:
        trace = self.trace
        first = not self._closed
        self._closed = True
        clock = trace._clock
        start = clock()  # clocks never raise (see _SafeClock)
        token = _set_trace(trace)
        error: BaseException | None = None
        try:
            close = getattr(self._app_iter, "close", None)
            if close is not None:
                close()
        except BaseException as exc:
            error = exc
            raise
        finally:
            _reset_trace(token)
            if first:
                try:
                    times = trace._times
                    now = clock()
                    self._record_body(start)
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
            # Set when the app call returned or raised (an error can come
            # only after that).
            environ = getattr(self, "_environ", None)
            scrub = None
            if environ is not None:
                # The request's secrets are cut out of the message and traceback.
                try:
                    scrub = scrubber(trace.redactor.request_secrets(environ))
                except Exception:
                    report_internal_error("body.scrub", trace)
            # An error out of the app call that a hook raised (a Flask
            # teardown function's: no got_request_exception names it).
            kind = _hook_that_raised(trace, exc) if where == "app" else None
            trace.error = format_error(exc, kind or where, trace.limits, scrub)
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
        trace._times[END] = end
        trace._pack_times()
        trace.finished = True
        middleware = self._middleware
        middleware.buffer.finished(trace)  # lock-free: safe from __del__
        if middleware.sinks is not None:
            middleware.sinks.submit(trace)


def _iterate(body: _TracedBody, iterator: Iterator[bytes]) -> Iterator[bytes]:
    """Yield the app's chunks, recording them, with the trace current while
    the app produces each one.
    """
    trace = body.trace
    clock = trace._clock
    set_current = _set_trace
    reset_current = _reset_trace
    # A for loop, not next() in a try: the app's StopIteration then ends
    # the loop in C instead of being raised into this frame.
    token = set_current(trace)
    producing = True
    try:
        for chunk in iterator:
            reset_current(token)
            producing = False
            try:
                # A str has a length too: only bytes are what servers send.
                size = len(chunk) if type(chunk) is bytes else _other_chunk_size(trace, chunk)
                if trace.chunks:
                    trace.chunks += 1
                    if size:
                        trace.bytes_sent += size
                        # Read anew: the trace may have finished (and packed
                        # its times) while a server held the body.
                        times = trace._times
                        if times[FIRST_BYTE] == UNSET:
                            times[FIRST_BYTE] = clock()
                else:
                    now = body._body_start = clock()
                    trace.chunks = 1
                    if not body._starts:
                        trace.warn("body yielded before start_response was called")
                    if size:
                        times = trace._times
                        if times[FIRST_BYTE] == UNSET:  # else a write() came first
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
        body._record_body(clock())
    except Exception:
        report_internal_error("body_done", trace)


class _SizedTracedBody(_TracedBody):
    """A traced body whose app iterable has a length, so servers can still
    use ``len()`` (e.g. to set ``Content-Length`` for one-element lists).
    """

    __slots__ = ()

    def __len__(self) -> int:
        return len(self._app_iter)  # type: ignore[arg-type]


def _other_chunk_size(trace: Trace, chunk: object) -> int:
    """The size of a chunk that is not exactly ``bytes``: its length if it
    is a bytes subclass; otherwise (a ``str``, ``None``...) the app's
    mistake, which servers refuse to send: a protocol warning, no bytes.
    """
    if isinstance(chunk, bytes):
        return len(chunk)
    trace.warn(f"body yielded a {type(chunk).__name__}, not bytes")
    return 0


def _body_kind(cls: type) -> int:
    """How :meth:`_TracedBody.app_returned` hands on a body of class ``cls``.

    A ``str`` or ``bytes`` body (an app's mistake: servers send it one item
    at a time) goes on as it is, so a checker outside, such as werkzeug's
    ``LintMiddleware``, still recognises it by its type.
    """
    if issubclass(cls, (str, bytes)):
        return _TEXT
    return _SIZED if hasattr(cls, "__len__") else _ITERABLE


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
