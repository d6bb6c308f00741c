"""The ``/_trace`` endpoint: recent traces as JSON and as a live stream.

:class:`~wsgitrace.TraceMiddleware` answers every request under its prefix
(``/_trace`` by default) with this endpoint *before* the app is called, so it
works for any WSGI app, adds no route to it, and its own requests are never
traced::

    app = TraceMiddleware(app, endpoint=True)

    GET /_trace?limit=20&status=5xx    newest first, as summaries
    GET /_trace?since=41&wait=20       long-poll: traces after cursor 41
    GET /_trace/<id>                   one full trace, with its events
    GET /_trace/stream                 Server-Sent Events, resumable

Listing
-------

``GET /_trace`` returns ``{"schema": 1, "instance": ..., "cursor": ...,
"dropped": ..., "sink_dropped": ..., "missed": ..., "traces": [...]}``. ``traces`` is the only
list and is always newest first. Query parameters:

``limit``
    How many traces (default 100). Values above the cap (at least 1,000)
    are clamped; anything but a non-negative integer is a 400.
``since``
    A cursor: only traces appended after it. ``cursor`` in the answer is
    where to continue from, so ``since=<cursor>`` polling never skips nor
    repeats a trace the buffer still holds, however many threads append.
    When more than ``limit`` traces are new, the *oldest* ``limit`` of them
    are returned and ``cursor`` points just past them. ``missed`` counts
    traces that were evicted before this client could read them. A ``since``
    above the buffer's cursor (the server restarted) counts from 0.
``method``, ``status``, ``path``, ``min_ms``
    Filters: methods (``GET,POST``), status codes or classes (``404``,
    ``5xx``, ``4xx,5xx``), a path prefix, a minimum duration in ms (a
    trace in progress has the duration it has run for so far).
``wait``
    Long-poll: when nothing matches yet, wait up to this many seconds
    (capped at 20) for a matching trace, and answer as soon as one is there.
    Each waiting long-poll and open stream holds a server thread, so at most
    ``max_readers`` (default 3) are served at once by this endpoint (one per
    traced app, in each process); more get a ``503`` with ``Retry-After: 1``
    and ``"busy": true`` in the JSON error (a refused client still gets the
    404). A long-poll whose client hangs up (a ``tail`` stopped with Ctrl-C)
    gives its slot back within a quarter of a second on servers that show
    the connection's plain socket in the environ (werkzeug's, gunicorn's
    sync and threaded workers; not over TLS or under gevent), instead of at
    the end of its wait.
``full``
    ``1`` lists full traces (:meth:`~wsgitrace.Trace.to_dict`) instead of
    summaries.

``instance`` is random per endpoint (so per process), or per store: a client
that sees it change knows the cursors restarted.

With a store
------------

When the ``store`` option names a SQLite file (:mod:`wsgitrace.store`), the
endpoint reads the store instead of the process's buffer, so every worker of
a pre-fork server answers with the traces of all of them, under the store's
cursors and ``instance``. Traces reach the store when they finish (within
about a second), so in-progress ones are not listed. If the store cannot be
read, the endpoint says so in the log (once) and answers from the buffer.

In-progress traces
------------------

A trace enters the buffer when the app returns and is finished when the
server closes the response. A plain listing shows traces as they are
(``state`` says ``in_progress``). The long-poll and the stream, which hand
out each trace once, *settle* them first: they hand traces out in cursor
order and, when the next one is still in progress, wait for it to finish for
up to a second (polling every few milliseconds) before handing it out as it
is. A slow streaming response therefore shows up once, in progress, after a
second, instead of holding back every trace behind it; fetch
``/_trace/<id>`` for its final state. With ``min_ms``, one that passes the
other filters is held until it has run that long or finished, and with
``status`` one whose app has not started its response yet until it has a
status, since only then is it known whether it matches; a ``since``
listing without ``wait`` answers with the cursor just before it.

Stream
------

``GET /_trace/stream`` sends ``event: trace`` messages whose ``id:`` is the
trace's cursor and whose ``data:`` is its summary (the same filters apply).
It resumes after ``Last-Event-ID`` (or ``since``), otherwise starts with the
next trace; the opening ``info`` and the closing ``end`` carry the stream's
position as their ``id:``, so a client that got no trace resumes exactly
too. It sends a ``: heartbeat`` comment every 10 seconds of quiet (which is
also how a departed client is noticed, where the long-poll's check above
cannot be made), an ``event: info`` when the buffer
evicted traces the client had not seen, and ends with an
``event: end`` after 20 seconds (clients reconnect and resume; gunicorn
kills a sync worker's request at 30) or at once when :meth:`TraceEndpoint.
shutdown` is called. An open stream counts against ``max_readers`` like a
waiting long-poll (past it, the same ``503``) until the server closes its
body; a ``HEAD`` of the stream does not.

Access control
--------------

A request is answered only when its ``Host`` header names ``localhost``,
``127.0.0.1`` or ``[::1]`` (any port) or one of the configured ``hosts``
(against DNS rebinding), and its client is

* a loopback address, or in one of the configured ``allow`` networks, or
* anyone presenting the configured token as ``Authorization: Bearer
  <token>`` (compared in constant time).

So a token opens the endpoint to non-loopback clients; loopback clients do
not need it (they could read the process's memory anyway). A token in the
query string is never accepted. The client address is ``REMOTE_ADDR``, or the
last ``X-Forwarded-For`` entry (the one the proxy added) with
``trust_forwarded``. Every refused request gets the same 404 as an unknown
sub-path or trace id, and no CORS header is ever sent.
"""

from __future__ import annotations

import json
import secrets
import select
import socket
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from ._access import _AccessPolicy
from ._internal import report_internal_error
from ._trace_query import _INT_RE, _MAX_CURSOR, _TRACE_ID_RE, _BadQueryError, _parse_query, _Query
from ._trace_sources import TraceSource, TraceView, _StoreSource, _summary, _to_dict
from .trace import SCHEMA_VERSION

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

    from .buffer import TraceBuffer
    from .config import Options
    from .sinks import SinkDispatcher

__all__ = ["TraceEndpoint"]

#: Smallest cap on ``limit``; the cap is the larger of this and the buffer size.
_LIMIT_CAP = 1000
#: Seconds after which a stream ends (clients resume).
_STREAM_SECONDS = 20.0
#: Seconds of quiet between two stream heartbeats.
_HEARTBEAT_SECONDS = 10.0
#: Seconds the long-poll and stream wait for an in-progress trace to finish.
_SETTLE_SECONDS = 1.0

_POLL_SECONDS = 0.004
_WAKE_SECONDS = 0.25

#: The body of every 404: werkzeug's, as a missing route of a Flask app has.
_NOT_FOUND_BODY = (
    b"<!doctype html>\n<html lang=en>\n<title>404 Not Found</title>\n"
    b"<h1>Not Found</h1>\n<p>The requested URL was not found on the server."
    b" If you entered the URL manually please check your spelling and try again.</p>\n"
)
_COMMON_HEADERS = [("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff")]
_STREAM_HEADERS = [
    ("Content-Type", "text/event-stream; charset=utf-8"),
    *_COMMON_HEADERS,
    ("X-Accel-Buffering", "no"),
]


class TraceEndpoint:
    """The WSGI app behind ``/_trace``; made by :class:`~wsgitrace.TraceMiddleware`.

    :param buffer: The buffer to read (unless ``options.store`` names a store).
    :param options: Resolved options: ``prefix``, ``token``/``token_file``,
        ``allow``, ``hosts``, ``trust_forwarded``, ``max_readers`` and
        ``store`` are used.
    :param stream_seconds: Seconds after which a stream ends.
    :param heartbeat: Seconds of quiet between stream heartbeats.
    :param settle: Seconds the long-poll and stream wait for an in-progress
        trace to finish before handing it out as it is.
    :param source: Read traces from this instead of ``buffer`` or the store
        (``wsgitrace tail --store`` passes a :class:`~wsgitrace.store.TraceStore`).

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        buffer: TraceBuffer,
        options: Options,
        *,
        stream_seconds: float = _STREAM_SECONDS,
        heartbeat: float = _HEARTBEAT_SECONDS,
        settle: float = _SETTLE_SECONDS,
        source: TraceSource | None = None,
    ) -> None:
        self.buffer = buffer
        self._instance = secrets.token_hex(8)
        #: Where traces are read: the buffer, or the store shared by workers.
        self.source: TraceSource = buffer if source is None else source
        self._store_source: _StoreSource | None = None
        if options.store and source is None:
            from .store import TraceStore

            store = TraceStore(options.store, options.store_max_traces, options.store_max_bytes)
            self._store_source = _StoreSource(store, buffer, self._instance)
            self.source = self._store_source
        self.prefix = options.prefix
        self.stream_seconds = stream_seconds
        self.heartbeat = heartbeat
        self.settle = settle
        self._access = _AccessPolicy(options)
        #: Long-polls and streams served at once; each holds a server thread.
        self.max_readers = options.max_readers
        self._readers = threading.BoundedSemaphore(options.max_readers)
        self._stopping = threading.Event()
        #: The sinks of the traced app (set by its middleware), whose losses
        #: are reported as ``sink_dropped``.
        self.sinks: SinkDispatcher | None = None

    @property
    def instance(self) -> str:
        """Random per endpoint, or per store: changes when cursors restart."""
        instance = getattr(self.source, "instance", None)
        return instance if isinstance(instance, str) and instance else self._instance

    @property
    def limit_cap(self) -> int:
        """The most traces one listing returns."""
        return max(_LIMIT_CAP, self.source.max_traces)

    def shutdown(self) -> None:
        """End every open stream and long-poll now (when the server stops)."""
        self._stopping.set()
        self.source.notify()

    # -- access control -----------------------------------------------------

    @property
    def has_token(self) -> bool:
        """Whether a token is configured (it opens the endpoint to other clients)."""
        return self._access.has_token

    def is_allowed(self, environ: WSGIEnvironment) -> bool:
        """Whether this request may read traces (see the module docstring)."""
        return self._access.allows(environ)

    # -- dispatch -----------------------------------------------------------

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        try:
            return self._dispatch(environ, start_response)
        except Exception:
            report_internal_error("endpoint")
            return _json(start_response, "500 Internal Server Error", {"error": "internal error"})

    def _dispatch(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if not self.is_allowed(environ):
            return _not_found(start_response)
        path: str = environ.get("PATH_INFO") or "/"
        rest = path[len(self.prefix) :].strip("/") if path.startswith(self.prefix) else None
        if (
            rest is None
            or "/" in rest
            or (rest and rest != "stream" and not _TRACE_ID_RE.match(rest))
        ):
            return _not_found(start_response)
        method = environ.get("REQUEST_METHOD", "GET").upper()
        if method not in ("GET", "HEAD"):
            return _json(
                start_response,
                "405 Method Not Allowed",
                {"error": "only GET and HEAD are allowed"},
                [("Allow", "GET, HEAD")],
            )
        head = method == "HEAD"
        start = 0
        try:
            query = _parse_query(environ.get("QUERY_STRING") or "", self.limit_cap)
            if rest == "stream":
                start = self._stream_start(environ, query)
        except _BadQueryError as exc:
            body = {"error": exc.message, "param": exc.param}
            return _json(start_response, "400 Bad Request", body, head=head)
        if rest == "" and not (query.wait > 0 and query.limit > 0):
            return _json(start_response, "200 OK", self.listing(query), head=head)
        if rest == "":
            if not self._readers.acquire(blocking=False):
                return self._busy(start_response, head)
            try:
                page = self.listing(query, gone=_hangup_check(environ))
                return _json(start_response, "200 OK", page, head=head)
            finally:
                self._readers.release()
        if rest == "stream":
            if head:
                start_response("200 OK", list(_STREAM_HEADERS))
                return []
            if not self._readers.acquire(blocking=False):
                return self._busy(start_response, head)
            try:
                start_response("200 OK", list(_STREAM_HEADERS))
            except BaseException:
                self._readers.release()
                raise
            events = self.stream(start, query, gone=_hangup_check(environ))
            return _ReaderBody(events, self._readers.release)
        trace = self.source.get(rest)
        if trace is None:
            return _not_found(start_response)
        return _json(start_response, "200 OK", trace.to_dict(), head=head)

    def _busy(self, start_response: StartResponse, head: bool) -> list[bytes]:
        """The 503 for a long-poll or stream past :attr:`max_readers`."""
        message = (
            f"busy: {self.max_readers} long-polls and streams are already being served"
            " (max_readers); retry later"
        )
        return _json(
            start_response,
            "503 Service Unavailable",
            {"error": message, "busy": True},
            [("Retry-After", "1")],
            head=head,
        )

    # -- listing ------------------------------------------------------------

    def listing(self, query: _Query, *, gone: Callable[[], bool] | None = None) -> dict[str, Any]:
        """The ``GET /_trace`` answer for parsed query parameters.

        :param gone: Whether the client hung up: a long-poll then ends early.
        """
        if query.wait > 0 and query.limit > 0:
            traces, cursor, missed = self._long_poll(query, gone)
        else:
            traces, cursor, missed = self._scan(query)
        dump = _to_dict if query.full else _summary
        return {
            "schema": SCHEMA_VERSION,
            "instance": self.instance,
            "cursor": cursor,
            "dropped": self.source.dropped,
            "sink_dropped": self.sink_dropped,
            "missed": missed,
            "traces": [dump(t) for t in traces],
        }

    @property
    def sink_dropped(self) -> int:
        """Traces a sink (store, OTLP) did not get: its queue was full or it
        failed. (A store's losses also count in its ``dropped``.)
        """
        sinks = self.sinks
        return 0 if sinks is None else sinks.dropped + sinks.failed

    def _start_cursor(self, since: int) -> int:
        """``since``, or 0 when it is above the buffer's cursor (a restart)."""
        return since if since <= self.source.cursor else 0

    def _scan(self, query: _Query) -> tuple[list[TraceView], int, int]:
        """Answer at once: traces newest first, the cursor, the missed count."""
        buffer = self.source
        top = buffer.cursor
        if query.since is None:
            newest_first = buffer.latest()
            cursor = max(top, newest_first[0].cursor if newest_first else 0)
            found: list[TraceView] = []
            if query.limit:
                for trace in newest_first:
                    if query.match(trace):
                        found.append(trace)
                        if len(found) >= query.limit:
                            break
            return found, cursor, 0
        since = self._start_cursor(query.since)
        candidates = buffer.since(since)
        found = []
        position = since
        limited = False
        for trace in candidates:
            # One that may still match min_ms is not passed over: the cursor
            # stops before it, as the long-poll's does (see _follow).
            if len(found) >= query.limit or query.pending(trace):
                limited = True
                break
            position = trace.cursor
            if query.match(trace):
                found.append(trace)
        if not limited:
            position = max(position, top)
        missed = (candidates[0].cursor if candidates else position + 1) - since - 1
        found.reverse()
        return found, position, max(missed, 0)

    def _long_poll(
        self, query: _Query, gone: Callable[[], bool] | None = None
    ) -> tuple[list[TraceView], int, int]:
        """Answer as soon as a matching, settled trace is there, or after
        ``wait`` seconds with none.
        """
        if query.since is None:
            found, position, missed = self._scan(query)
            if found:
                return found, position, missed
        else:
            position = self._start_cursor(query.since)
        deadline = time.monotonic() + query.wait
        missed = 0
        for batch, moved_to, gap in self._follow(position, query, deadline, query.limit, gone):
            position = moved_to
            missed += gap
            if batch:
                batch.reverse()
                return batch, position, missed
        return [], position, missed

    # -- following ----------------------------------------------------------

    def _follow(
        self,
        position: int,
        query: _Query,
        deadline: float,
        limit: int | None,
        gone: Callable[[], bool] | None = None,
    ) -> Iterator[tuple[list[TraceView], int, int]]:
        """Hand out the traces after ``position`` in cursor order, settled
        (see the module docstring) and filtered, until ``deadline`` or until
        ``gone()`` says the client hung up (checked before each quiet wait).

        Yields ``(matching traces oldest first, new position, evicted count)``
        after every pass that moved, and ``([], position, 0)`` whenever the
        buffer stayed quiet for :attr:`heartbeat` seconds.
        """
        buffer = self.source
        first_seen: dict[int, float] = {}
        stopping = self._stopping
        last_yield = time.monotonic()
        while not stopping.is_set():
            now = time.monotonic()
            if now >= deadline:
                return
            top = buffer.cursor
            candidates = buffer.since(position)
            gap = candidates[0].cursor - position - 1 if candidates else 0
            if not candidates and top > position:
                gap = top - position  # evicted (or cleared) before we looked
            found: list[TraceView] = []
            blocked = False
            moved = bool(gap)
            for index, trace in enumerate(candidates):
                if not trace.finished:
                    seen = first_seen.setdefault(trace.cursor, now)
                    if now - seen < self.settle or query.pending(trace):
                        blocked = True
                        # Start the settle time of the later ones too, so
                        # that traces in progress together settle together
                        # instead of holding readers back one second each.
                        for later in candidates[index + 1 :]:
                            if not later.finished:
                                first_seen.setdefault(later.cursor, now)
                        break
                first_seen.pop(trace.cursor, None)
                position = trace.cursor
                moved = True
                if query.match(trace):
                    found.append(trace)
                    if limit is not None and len(found) >= limit:
                        break
            if not candidates:
                position = max(position, top)
            if moved or now - last_yield >= self.heartbeat:
                yield found, position, max(gap, 0)
                last_yield = now
            elif blocked:
                stopping.wait(_POLL_SECONDS)
            elif gone is not None and gone():
                return
            else:
                # Short slices, so that shutdown() and a hang-up are noticed promptly.
                remaining = min(deadline - now, self.heartbeat - (now - last_yield))
                buffer.wait(position, min(remaining, _WAKE_SECONDS))

    def _stream_start(self, environ: WSGIEnvironment, query: _Query) -> int:
        last_id = (environ.get("HTTP_LAST_EVENT_ID") or "").strip()
        if last_id:
            if not _INT_RE.match(last_id) or len(last_id) > 1024:
                raise _BadQueryError("Last-Event-ID", "'Last-Event-ID' must be a trace cursor")
            # Clamped as since is: int() refuses over 4,300 digits, and a
            # store's cursors are 64-bit.
            return self._start_cursor(min(int(last_id), _MAX_CURSOR))
        if query.since is not None:
            return self._start_cursor(query.since)
        return self.source.cursor

    def stream(
        self, position: int, query: _Query, *, gone: Callable[[], bool] | None = None
    ) -> Generator[bytes, None, None]:
        """The Server-Sent Events body: traces after ``position`` as they
        settle, heartbeats, and an ``end`` event (none once ``gone()`` says
        the client hung up).
        """
        dump: Callable[[TraceView], dict[str, Any]] = _to_dict if query.full else _summary
        # The opening and closing events carry the position as their id too,
        # so a client that got no trace resumes where it left off, not at
        # whatever is newest when it reconnects.
        yield b"retry: 1000\n" + _sse("info", self._info(position, 0), position)
        deadline = time.monotonic() + self.stream_seconds
        last_write = time.monotonic()
        for batch, moved_to, gap in self._follow(position, query, deadline, None, gone):
            position = moved_to
            now = time.monotonic()
            parts = []
            if gap:
                parts.append(_sse("info", self._info(position, gap)))
            parts.extend(_sse("trace", dump(t), t.cursor) for t in batch)
            if parts:
                yield b"".join(parts)
                last_write = now
            elif now - last_write >= self.heartbeat:
                yield b": heartbeat\n\n"
                last_write = now
        if gone is not None and gone():
            return
        reason = "shutdown" if self._stopping.is_set() else "timeout"
        yield _sse("end", {"reason": reason, "cursor": position}, position)

    def _info(self, position: int, missed: int) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "instance": self.instance,
            "cursor": position,
            "dropped": self.source.dropped,
            "sink_dropped": self.sink_dropped,
            "missed": missed,
        }

    def __repr__(self) -> str:
        return f"<TraceEndpoint {self.prefix!r} {self.source!r}>"


class _ReaderBody:
    """A stream's body that gives its reader slot back when the server
    closes it (or, failing that, when it is collected), exactly once.
    """

    __slots__ = ("_body", "_release")

    def __init__(self, body: Generator[bytes, None, None], release: Callable[[], None]) -> None:
        self._body = body
        self._release: Callable[[], None] | None = release

    def __iter__(self) -> Iterator[bytes]:
        return self._body

    def close(self) -> None:
        try:
            self._body.close()
        finally:
            self._free()

    def _free(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    def __del__(self) -> None:
        self._free()


#: Peek without blocking: where the platform has it, a hang-up can be told.
_PEEK_FLAGS = socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)


def _hangup_check(environ: WSGIEnvironment) -> Callable[[], bool] | None:
    """A check whether the request's client closed its connection, for a
    server that puts the connection's plain socket in the environ (werkzeug,
    gunicorn's sync and threaded workers); ``None`` when it cannot be told.
    """
    sock = environ.get("werkzeug.socket") or environ.get("gunicorn.socket")
    if (
        type(sock) is not socket.socket
        or not getattr(socket, "MSG_DONTWAIT", 0)
        or not hasattr(select, "poll")
    ):
        return None  # not a plain socket (TLS wraps it), or no way to look without waiting
    # Polled first: on a socket with a timeout (a server's handler may set
    # one) even a non-blocking peek waits that long for data, then fails.
    poller = select.poll()
    poller.register(sock, select.POLLIN)

    def gone() -> bool:
        try:
            if not poller.poll(0):
                return False  # nothing to read: still there
            return sock.recv(1, _PEEK_FLAGS) == b""  # end of file: the client closed
        except (BlockingIOError, InterruptedError):
            return False  # nothing to read: still there
        except OSError:
            return True  # reset or broken: gone too

    return gone


def _sse(event: str, data: dict[str, Any], event_id: int | None = None) -> bytes:
    """One Server-Sent Events message (the JSON has no raw newlines)."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=True)
    return f"{head}event: {event}\ndata: {text}\n\n".encode()


def _json(
    start_response: StartResponse,
    status: str,
    data: dict[str, Any],
    extra_headers: list[tuple[str, str]] | None = None,
    *,
    head: bool = False,
) -> list[bytes]:
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    # A lone surrogate (e.g. in an exception message) must not fail the answer.
    body = text.encode("utf-8", "replace")
    headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        *_COMMON_HEADERS,
        *(extra_headers or ()),
    ]
    start_response(status, headers)
    return [] if head else [body]


def _not_found(start_response: StartResponse) -> list[bytes]:
    """The one 404 for refusals, unknown sub-paths and unknown trace ids."""
    start_response(
        "404 NOT FOUND",
        [
            ("Content-Type", "text/html; charset=utf-8"),
            ("Content-Length", str(len(_NOT_FOUND_BODY))),
        ],
    )
    # No headers of the endpoint's own: a refusal is a plain 404 whatever
    # its reason, and carries nothing that says wsgitrace is there.
    return [_NOT_FOUND_BODY]
