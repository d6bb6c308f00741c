"""The trace model: what happened to one request.

On the request path a :class:`Trace` only appends compact records (a shared
``(kind, name, attrs)`` key and two timestamps per event, packed into an
:class:`array.array` of ``int64`` when the trace finishes). :class:`Event`
objects, offsets, JSON (:mod:`wsgitrace._trace_json`) and everything else are
built when something reads the trace::

    trace = wsgitrace.current_trace()
    for event in trace.events:
        print(event.name, event.start_ms, event.duration_ms)
    trace.hooks()  # ["before_request:load_user", "view:index", ...]
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import threading
import time
from array import array
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import chain
from sys import getsizeof
from typing import Any, NamedTuple, Protocol, TypeAlias, overload

from . import _trace_json
from ._internal import report_internal_error
from ._limits import DEFAULT_LIMITS as DEFAULT_LIMITS
from ._limits import TRUNCATION_MARKER as TRUNCATION_MARKER
from ._limits import TraceLimits as TraceLimits
from ._limits import cut as cut
from ._limits import format_error as format_error
from ._limits import jsonable as jsonable
from ._trace_json import SCHEMA_VERSION as SCHEMA_VERSION
from ._types import Clock
from .redact import DEFAULT_REDACTOR, Redactor

#: Event kinds listed by :meth:`Trace.hooks`.
HOOK_KINDS = frozenset(
    {
        "url_value_preprocessor",
        "url_defaults",
        "before_request",
        "view",
        "after_request",
        "teardown_request",
        "teardown_appcontext",
        "errorhandler",
        "context_processor",
    }
)


def _hook_that_raised(trace: Trace, exception: BaseException) -> str | None:
    """The kind of hook (``before_request``, ``errorhandler``, ...) an
    unhandled exception came from: that of the newest hook event that
    records it as its error, as the request's own thread recorded it, or
    ``None``.

    A hook's error of another type is not this one: a ``before_request``
    that aborted with a 401 Flask answered did not raise an exception that
    came later from outside any hook. Nor is one an error handler answered
    (an ``errorhandler`` event without an error of its own comes after it).
    """
    name = type(exception).__name__
    for kind, _name, attrs in reversed(trace._keys[-16:]):
        if kind == "errorhandler" and not (attrs and "error" in attrs):
            return None  # what came before was handled
        if attrs and attrs.get("error") == name and kind in HOOK_KINDS:
            return kind
    return None


# Serialises events recorded by threads other than the request's (rare).
# Reentrant: a garbage collection while it is held may run a finalizer
# that records on the same thread.
_FOREIGN_LOCK = threading.RLock()

# Serialises laying out a trace's headers the first time they are read.
# The request path takes it only when start_response is called again (with
# exc_info) to replace headers a reader may be laying out.
_LAYOUT_LOCK = threading.RLock()

_get_ident = threading.get_ident

# Positions of the WSGI-level timestamps at the head of Trace._times; events
# follow from _EVENTS on. UNSET marks a step that has not happened.
END, APP_END, START_RESPONSE, FIRST_BYTE, BODY_START, BODY_END, CLOSE_START, CLOSE_END = range(8)
_EVENTS = 8
UNSET = -(2**63)
# While a trace records, its timestamps are a list (appending an int to a
# list is a specialised bytecode; to an array, a method call that parses its
# argument). When it finishes they are packed into an array of int64s, an
# eighth of the memory. C long where it has 64 bits: the array converts
# Python ints to it by a faster path than to long long (PyLong_AsLong vs
# _PyLong_AsByteArray for values of two digits, as every timestamp is).
_STAMP_TYPECODE = "l" if array("l").itemsize == 8 else "q"
_NO_STAMPS = [UNSET] * _EVENTS


#: What a trace stores per event: kind, name and attributes (or ``None``).
EventKey: TypeAlias = "tuple[str, str, Mapping[str, Any] | None]"


class _ForeignEvents(list[tuple[EventKey, int, int, int]]):
    """Events recorded by threads other than the request's, as
    ``(key, start, end, thread)``, and the bytes of the keys among them
    made by :meth:`Trace.record`. Changed only under ``_FOREIGN_LOCK``.
    """

    __slots__ = ("key_bytes",)

    def __init__(self) -> None:
        super().__init__()
        self.key_bytes = 0


def _key_bytes(name: str, attrs: Mapping[str, Any] | None) -> int:
    """Bytes of a key made by :meth:`Trace.record` with its name and attributes."""
    try:
        size = 64 + getsizeof(name)
        if attrs:
            size += getsizeof(attrs) + sum(map(getsizeof, attrs.values()))
    except Exception:  # a value whose __sizeof__ fails: a rough guess
        size = 512
    return size


class HeaderLayout(NamedTuple):
    """Response headers laid out for a trace, and what laying them out found.
    Applied to the trace only if its headers were not replaced meanwhile.
    """

    #: Flat ``(name, value, ...)``, redacted and cut.
    headers: tuple[str, ...]
    #: The valid ``Content-Length``, if any.
    content_length: int | None
    #: Protocol problems (an invalid ``Content-Length``).
    warnings: tuple[str, ...]
    #: Headers past ``max_headers``.
    dropped: int
    #: Values cut to ``max_string``.
    cut: int


#: Flattens, redacts and cuts a response header list.
HeaderFlattener: TypeAlias = "Callable[[list[tuple[str, str]]], HeaderLayout]"


class RequestHeaderPlan(Protocol):
    """Lays out request header values copied from an environ (see
    :class:`~wsgitrace.middleware.TraceMiddleware`).
    """

    def expand(self, values: tuple[Any, ...]) -> tuple[str, ...]:
        """The flat ``(name, value, ...)`` tuple of the headers, redacted."""
        ...


class _Stamp:
    """A WSGI-level timestamp of a trace, stored in its int64 array."""

    def __init__(self, index: int, doc: str) -> None:
        self.index = index
        self.__doc__ = doc

    @overload
    def __get__(self, trace: None, owner: type[Trace]) -> _Stamp: ...

    @overload
    def __get__(self, trace: Trace, owner: type[Trace]) -> int | None: ...

    def __get__(self, trace: Trace | None, owner: type[Trace]) -> int | _Stamp | None:
        if trace is None:
            return self
        value = trace._times[self.index]
        return None if value == UNSET else value

    def __set__(self, trace: Trace, value: int | None) -> None:
        trace._times[self.index] = UNSET if value is None else value


class _IdSource:
    """Makes trace ids: a random per-process prefix plus a counter.

    The prefix is drawn again in a forked child, so ids stay unique across the
    worker processes of a pre-fork server and across restarts.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.prefix = secrets.token_hex(6)
        self.counter = itertools.count(1)


_ids = _IdSource()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_ids.reset)


@dataclass(frozen=True)
class Event:
    """One step of a request, as read from a :class:`Trace`.

    :param kind: Snake-case kind, e.g. ``before_request`` or ``signal``.
    :param name: Full name, e.g. ``before_request:admin.require_admin``.
    :param start_ns: Start, in nanoseconds from the start of the request.
    :param duration_ns: Duration in nanoseconds (0 for instants).
    :param thread: Identifier of the thread that recorded the event.
    :param attrs: Small dict of attributes.
    :param seq: Position in recording order, to order ties.
    """

    kind: str
    name: str
    start_ns: int
    duration_ns: int
    thread: int
    attrs: Mapping[str, Any] = field(default_factory=dict)
    seq: int = 0

    @property
    def start_ms(self) -> float:
        """Start, in milliseconds from the start of the request."""
        return self.start_ns / 1e6

    @property
    def duration_ms(self) -> float:
        """Duration in milliseconds (0 for instants)."""
        return self.duration_ns / 1e6

    @property
    def end_ns(self) -> int:
        """End, in nanoseconds from the start of the request."""
        return self.start_ns + self.duration_ns

    def to_dict(self, max_string: int = DEFAULT_LIMITS.max_string) -> dict[str, Any]:
        """The JSON-safe form of the event.

        :param max_string: Length its name and string attributes are cut
            to (a trace's JSON form passes its own ``limits.max_string``).
        """
        return {
            "kind": self.kind,
            "name": cut(self.name, max_string),
            "start_ms": round(self.start_ns / 1e6, 6),
            "duration_ms": round(self.duration_ns / 1e6, 6),
            "thread": self.thread,
            "attrs": {k: jsonable(v, max_string) for k, v in self.attrs.items()},
        }


class Trace:
    """What happened to one request: its events, timings and state.

    Traces are made by :class:`~wsgitrace.TraceMiddleware`; read them from a
    :class:`~wsgitrace.TraceBuffer` or with :func:`~wsgitrace.current_trace`.
    A trace is readable as soon as the app call returns (:attr:`finished` is
    false until the response is closed).

    :param method: The request's method.
    :param path: Its path (cut to ``limits.max_string``).
    :param query: Its query string, already redacted.
    :param remote_addr: The client's address, if known.
    :param clock: Nanosecond clock used for every timestamp of the trace.
    :param limits: Per-trace caps.
    :param start_ns: When the request started; ``clock()`` when not given.
    :param redactor: Decides which attributes of :func:`~wsgitrace.span`
        events are secret (the middleware's, with its ``redact`` options);
        the default list when not given.
    """

    __slots__ = (
        "_clock",
        "_content_length",
        "_flatten_headers",
        "_foreign",
        "_g",
        "_id",
        "_id_prefix",
        "_keys",
        "_length_check",
        "_limits",
        "_live",
        "_own_key_bytes",
        "_raw_response_headers",
        "_request_headers",
        "_request_plan",
        "_request_values",
        "_response_headers",
        "_seq",
        "_size",
        "_times",
        "_warnings",
        "bytes_sent",
        "chunks",
        "cursor",
        "dropped_events",
        "endpoint",
        "error",
        "evicted",
        "finished",
        "method",
        "path",
        "query",
        "redactor",
        "remote_addr",
        "rule",
        "session_keys",
        "start_ns",
        "status",
        "thread",
        "traceparent",
        "tracestate",
        "truncated",
        "view_args",
        "wall_time",
    )

    def __init__(
        self,
        method: str = "GET",
        path: str = "/",
        *,
        query: str = "",
        remote_addr: str | None = None,
        clock: Clock = time.perf_counter_ns,
        limits: TraceLimits = DEFAULT_LIMITS,
        start_ns: int | None = None,
        redactor: Redactor = DEFAULT_REDACTOR,
    ) -> None:
        # Every slot is set here: a class with __getattr__ (for lazy
        # defaults) would make each attribute read on the request path slower.
        # The prefix of the process that made the trace (it changes in a
        # forked child); the id string itself is built when asked for.
        self._id_prefix = _ids.prefix
        self._seq = next(_ids.counter)
        self._clock = clock
        self._limits = limits
        #: Decides which :func:`~wsgitrace.span` attributes are redacted.
        self.redactor = redactor
        self._live = True
        self.start_ns = clock() if start_ns is None else start_ns
        self.wall_time = time.time()
        self.thread = _get_ident()
        # One (kind, name, attrs) key per event; hooks pass shared constant
        # keys, so an event costs a list slot and two int64 timestamps.
        self._keys: list[EventKey] = []
        # Events recorded by other threads: (key, start, end, thread).
        self._foreign: _ForeignEvents | None = None
        # Bytes of the keys made by record() on the request's thread (not
        # shared between traces; other threads' are in _foreign).
        self._own_key_bytes = 0
        # The WSGI-level timestamps (see _STAMPS), then two per recorded event;
        # packed into an array of int64s when the trace finishes.
        self._times: list[int] | array[int] = _NO_STAMPS[:]
        self._size = 0
        self.cursor = 0
        self._id: str | None = None
        #: Counts of what caps cut (``path``, ``header_values``, ...), or ``None``.
        self.truncated: dict[str, int] | None = None
        # Flattens, redacts and cuts the app's header list, kept as given, the
        # first time someone reads it (see ``response_headers``).
        self._flatten_headers: HeaderFlattener | None = None
        self._content_length: int | None = None
        #: The matched endpoint and rule (Flask), or ``None``.
        self.endpoint: str | None = None
        self.rule: str | None = None
        #: ``request.view_args`` with safe values (Flask), or ``None``.
        self.view_args: dict[str, Any] | None = None
        #: Keys of the session at teardown (Flask), or ``None``.
        self.session_keys: list[str] | None = None
        # The Content-Length check waits for the headers to be read.
        self._length_check = False
        #: Events not kept because the trace held ``max_events``, or
        #: recorded by another thread after the trace finished.
        self.dropped_events = 0
        #: The request's ``traceparent`` header (W3C trace context), kept
        #: whether or not headers are captured, for OpenTelemetry export.
        self.traceparent: str | None = None
        #: Its ``tracestate`` header (vendor data the caller's trace carries
        #: on), kept along with ``traceparent``.
        self.tracestate: str | None = None
        self.method = method
        max_string = limits.max_string
        self.path = path if len(path) <= max_string else self._cut("path", path)
        self.query = query if len(query) <= max_string else self._cut("query", query)
        self.remote_addr = remote_addr
        # Read by the size estimate when the trace finishes, so always set.
        # Values copied out of the environ by a plan shared by every request
        # with the same environ keys, which lays them out when they are read.
        self._request_plan: RequestHeaderPlan | None = None
        self._request_values: tuple[Any, ...] = ()
        self._request_headers: tuple[str, ...] = ()
        self._raw_response_headers: list[tuple[str, str]] | tuple[str, ...] | None = None
        self._response_headers: tuple[str, ...] = ()
        self.error: dict[str, str] | None = None
        self._g: tuple[str, ...] | None = None
        self._warnings: list[str] | None = None
        self.status: str | None = None
        self.bytes_sent = 0
        self.chunks = 0
        self.finished = False
        self.evicted = False

    end_ns = _Stamp(END, "When the response was closed (clock ns), or ``None``.")
    app_end_ns = _Stamp(APP_END, "When the app callable returned or raised.")
    start_response_ns = _Stamp(START_RESPONSE, "When ``start_response`` was first called.")
    first_byte_ns = _Stamp(FIRST_BYTE, "When the first non-empty chunk went to the server.")
    body_start_ns = _Stamp(BODY_START, "When the first chunk was produced.")
    body_end_ns = _Stamp(BODY_END, "When iteration ended.")
    close_start_ns = _Stamp(CLOSE_START, "When the server called ``close()``.")
    close_end_ns = _Stamp(CLOSE_END, "When ``close()`` returned.")

    # -- write side ---------------------------------------------------------

    def record(
        self,
        kind: str,
        name: str,
        start_ns: int,
        end_ns: int,
        attrs: Mapping[str, Any] | None = None,
    ) -> None:
        """Append one event. Past :attr:`TraceLimits.max_events` the event is
        counted in :attr:`dropped_events` instead.
        """
        # A key of its own (unlike the shared keys of hooks): counted in the
        # trace's size with its name and attributes.
        key = (kind, name, attrs or None)
        if _get_ident() != self.thread:
            self._record_foreign(key, start_ns, end_ns, _key_bytes(name, attrs))
        elif self.record_key(key, start_ns, end_ns):
            self._own_key_bytes += _key_bytes(name, attrs)

    def record_key(self, key: EventKey, start_ns: int, end_ns: int) -> bool:
        """Append one event described by a (usually shared) ``(kind, name,
        attrs)`` key. Only the request's own thread appends to the key list
        and timestamp array (the timestamps first, so a reader never sees an
        event without its times); other threads add whole tuples to a list
        of their own, so concurrent writers never interleave. Returns
        whether the event was kept (``False`` past the cap, or from another
        thread once the trace finished).
        """
        keys = self._keys
        foreign = self._foreign
        if _get_ident() != self.thread:
            return self._record_foreign(key, start_ns, end_ns)
        if len(keys) + (0 if foreign is None else len(foreign)) < self._limits.event_room:
            times = self._times
            times.append(start_ns)
            try:
                times.append(end_ns)
            except BaseException:
                # Packed (finished) times take int64s only: keep them paired.
                times.pop()
                raise
            keys.append(key)
            return True
        # Past the cap (rare): counted under the lock other threads count
        # under, so two threads overflowing at once lose no count.
        with _FOREIGN_LOCK:
            self.dropped_events += 1
        return False

    def _record_foreign(
        self, key: EventKey, start_ns: int, end_ns: int, key_bytes: int = 0
    ) -> bool:
        with _FOREIGN_LOCK:
            foreign = self._foreign
            if foreign is None:
                # Made before ``finished`` is read: a size estimate that
                # finds no list yet ran before this check sees the trace
                # finished (see _estimate_size).
                foreign = self._foreign = _ForeignEvents()
            # A finished trace was counted against the byte cap and handed
            # to the sinks: a thread the app left running no longer adds to it.
            if not self.finished and len(self._keys) + len(foreign) < self._limits.event_room:
                foreign.append((key, start_ns, end_ns, _get_ident()))
                foreign.key_bytes += key_bytes
                return True
            self.dropped_events += 1
            return False

    def mark(self, kind: str, name: str | None = None, attrs: dict[str, Any] | None = None) -> int:
        """Record an instant event at the current time and return that time."""
        now = self._clock()
        self.record(kind, kind if name is None else name, now, now, attrs)
        return now

    def warn(self, message: str) -> None:
        """Note a protocol problem seen while serving (never raised)."""
        warnings = self._warnings
        if warnings is None:
            self._warnings = [message]
        elif message not in warnings and len(warnings) < 32:
            warnings.append(message)

    @property
    def warnings(self) -> list[str] | None:
        """Protocol problems seen while serving, or ``None``."""
        if self._length_check:
            _ = self.response_headers
        return self._warnings

    @warnings.setter
    def warnings(self, value: list[str] | None) -> None:
        self._warnings = value

    def _check_length(self) -> None:
        """Warn when an exhausted body did not match its Content-Length."""
        try:
            expected = self._content_length
            if (
                expected is not None
                and self.bytes_sent != expected
                and self.status_code not in (204, 304)
            ):
                self.warn(
                    f"Content-Length mismatch: header says {expected},"
                    f" the app's body has {self.bytes_sent} bytes"
                )
        finally:
            # Cleared last: a reader that finds it clear finds the warning
            # there. Cleared on failure too, so the check runs once.
            self._length_check = False

    def note_truncated(self, what: str, count: int = 1) -> None:
        """Count something cut by a cap."""
        if self.truncated is None:
            self.truncated = {what: count}
        else:
            self.truncated[what] = self.truncated.get(what, 0) + count

    def _cut(self, what: str, text: str) -> str:
        self.note_truncated(what)
        return cut(text, self._limits.max_string)

    def now(self) -> int:
        """The trace's clock, in nanoseconds."""
        return self._clock()

    @property
    def limits(self) -> TraceLimits:
        """The caps this trace was recorded under."""
        return self._limits

    def set_raw_response_headers(
        self, headers: list[tuple[str, str]] | None, flatten: HeaderFlattener | None
    ) -> None:
        """Keep the app's response headers as given; ``flatten`` redacts and
        cuts them into :attr:`response_headers` when they are first read.
        """
        self._raw_response_headers = headers
        self._flatten_headers = flatten
        self._response_headers = ()
        self._content_length = None

    @property
    def g(self) -> dict[str, str] | None:
        """The final ``flask.g`` snapshot: key to cut ``repr`` (secret-looking
        keys redacted), or ``None``.
        """
        flat = self._g
        return None if flat is None else dict(zip(flat[::2], flat[1::2], strict=True))

    @g.setter
    def g(self, snapshot: Mapping[str, str] | None) -> None:
        # Kept as one flat tuple: a fraction of a dict's memory per trace.
        self._g = None if snapshot is None else tuple(chain.from_iterable(snapshot.items()))

    @property
    def request_headers(self) -> tuple[str, ...]:
        """Request headers as a flat ``(name, value, ...)`` tuple, redacted."""
        if self._request_plan is not None:
            with _LAYOUT_LOCK:  # readers on several threads lay them out once
                plan = self._request_plan
                if plan is not None:
                    try:
                        self._request_headers = plan.expand(self._request_values)
                    except Exception:
                        report_internal_error("request_headers", self)
                    self._request_plan = None
                    self._request_values = ()
        return self._request_headers

    @request_headers.setter
    def request_headers(self, value: tuple[str, ...]) -> None:
        self._request_plan = None
        self._request_values = ()
        self._request_headers = value

    @property
    def response_headers(self) -> tuple[str, ...]:
        """Response headers as a flat ``(name, value, ...)`` tuple, redacted."""
        if self._raw_response_headers is not None or self._length_check:
            with _LAYOUT_LOCK:  # readers on several threads lay them out once
                self._settle_response_headers()
        return self._response_headers

    @response_headers.setter
    def response_headers(self, value: tuple[str, ...]) -> None:
        self._raw_response_headers = None
        self._response_headers = value

    def _settle_response_headers(self) -> None:
        if self._raw_response_headers is not None:
            self._lay_out_response_headers()
        if self._length_check and self._raw_response_headers is None:
            try:
                self._check_length()
            except Exception:
                report_internal_error("length_check", self)

    def _lay_out_response_headers(self) -> None:
        raw = self._raw_response_headers
        if raw is None:
            return
        flatten = self._flatten_headers
        pairs = list(zip(raw[::2], raw[1::2], strict=True)) if isinstance(raw, tuple) else raw
        layout = None
        try:
            if flatten is not None:
                layout = flatten(pairs)
        except Exception:
            report_internal_error("response_headers", self)
        # Kept, with what it found, only if the request did not replace
        # the headers meanwhile (start_response with exc_info).
        if self._raw_response_headers is raw:
            if layout is None:
                self._response_headers = ()
                self._content_length = None
            else:
                self._response_headers = layout.headers
                self._content_length = layout.content_length
                for warning in layout.warnings:
                    self.warn(warning)
                if layout.dropped:
                    self.note_truncated("response_headers", layout.dropped)
                if layout.cut:
                    self.note_truncated("header_values", layout.cut)
            self._raw_response_headers = None

    @property
    def content_length(self) -> int | None:
        """The response's ``Content-Length``, if it had a valid one."""
        if self._raw_response_headers is not None:
            _ = self.response_headers
        return self._content_length

    @content_length.setter
    def content_length(self, value: int | None) -> None:
        self._content_length = value

    # -- read side ----------------------------------------------------------

    @property
    def id(self) -> str:
        """URL-safe id, unique across processes; not a cursor."""
        if self._id is not None:
            return self._id
        return f"{self._id_prefix}-{self._seq:x}"

    @property
    def events(self) -> list[Event]:
        """The events, ordered by start time; at equal starts the enclosing
        (longer) event comes first, then recording order.
        """
        return sorted(self._iter_events(), key=lambda e: (e.start_ns, -e.duration_ns, e.seq))

    def _wsgi_events(self) -> Iterator[Event]:
        """The WSGI-level events, kept as timestamps on the hot path."""
        base = self.start_ns
        thread = self.thread
        spans: list[tuple[str, int | None, int | None, dict[str, Any]]] = [
            ("request", base, self.end_ns, {}),
            ("app", base, self.app_end_ns, {}),
            ("start_response", self.start_response_ns, self.start_response_ns, {}),
            ("first_byte", self.first_byte_ns, self.first_byte_ns, {}),
            (
                "body",
                self.body_start_ns,
                self.body_end_ns,
                {"chunks": self.chunks, "bytes": self.bytes_sent},
            ),
            ("close", self.close_start_ns, self.close_end_ns, {}),
        ]
        for seq, (kind, start, end, attrs) in enumerate(spans, start=-len(spans)):
            if start is not None and end is not None:
                yield Event(kind, kind, start - base, end - start, thread, attrs, seq)

    def _iter_events(self) -> Iterator[Event]:
        if self._live:
            yield from self._wsgi_events()
        times = self._times
        keys = self._keys
        base = self.start_ns
        thread = self.thread
        # The request thread may be between appending the times and the key:
        # read only the events whose key is there.
        count = min(len(keys), (len(times) - _EVENTS) // 2)
        for index in range(count):
            start = times[_EVENTS + 2 * index]
            kind, name, attrs = keys[index]
            yield Event(
                kind=kind,
                name=name,
                start_ns=start - base,
                duration_ns=times[_EVENTS + 2 * index + 1] - start,
                thread=thread,
                attrs=attrs or {},
                seq=index,
            )
        for seq, ((kind, name, attrs), start, end, ident) in enumerate(
            list(self._foreign or ()), start=count
        ):
            yield Event(kind, name, start - base, end - start, ident, attrs or {}, seq)

    def event_keys(self) -> list[EventKey]:
        """The ``(kind, name, attrs)`` of every recorded event, cheaply (no
        :class:`Event` objects, no sorting).
        """
        return self._keys + [entry[0] for entry in self._foreign or ()]

    def find(self, kind: str | None = None, name: str | None = None) -> list[Event]:
        """Events with the given kind and/or name, in order."""
        return [
            e
            for e in self.events
            if (kind is None or e.kind == kind) and (name is None or e.name == name)
        ]

    def hooks(self) -> list[str]:
        """Names of the hook and view events in the order they ran."""
        return [e.name for e in self.events if e.kind in HOOK_KINDS]

    @property
    def status_code(self) -> int | None:
        """The status as a number (``404``), or ``None`` before
        ``start_response`` or when the status line does not start with one.
        """
        if not self.status:
            return None
        try:
            return int(self.status[:3])
        except (TypeError, ValueError):  # a test client may pass an int
            return None

    @property
    def duration_ns(self) -> int | None:
        """From the request's start until its response was closed, or
        ``None`` while it is in progress.
        """
        return None if self.end_ns is None else self.end_ns - self.start_ns

    @property
    def duration_ms(self) -> float | None:
        """:attr:`duration_ns` in milliseconds, or ``None``."""
        d = self.duration_ns
        return None if d is None else d / 1e6

    @property
    def ttfb_ms(self) -> float | None:
        """Milliseconds from the request's start to its first non-empty body
        chunk, or ``None`` when none was sent yet.
        """
        if self.first_byte_ns is None:
            return None
        return (self.first_byte_ns - self.start_ns) / 1e6

    @property
    def state(self) -> str:
        """``in_progress``, ``finished`` or ``unclosed``."""
        if not self.finished:
            return "in_progress"
        if self.warnings and any(w.startswith("unclosed") for w in self.warnings):
            return "unclosed"
        return "finished"

    @property
    def approx_size(self) -> int:
        """Approximate bytes retained by the trace (counted against byte caps)."""
        return self._size or self._estimate_size()

    def _pack_times(self) -> None:
        """Pack the timestamps of a finished trace into an array of int64s.
        A clock that returned something else (a test's floats) leaves them
        as they are.
        """
        times = self._times
        if type(times) is list:
            try:
                packed = array(_STAMP_TYPECODE, times)
            except (TypeError, OverflowError):
                return
            self._times = packed

    def _estimate_size(self) -> int:
        # An upper bound of what tracemalloc sees a finished trace keep, on
        # the bench's /hello and on a bare app with no request headers and up
        # to 50 hooks (tests/test_flask.py): the object, its arrays and the
        # strings it alone keeps alive. The
        # environ's and the app's header strings are latin-1 (PEP 3333), one
        # byte a character plus a 49-byte header; values cut on capture (the
        # marker makes them two bytes a character) are counted in
        # _own_key_bytes then, as are keys made by record(). Strings laid out
        # or made later are measured with getsizeof. Hook keys are shared
        # between traces and not counted.
        # The base: the object, its key list, the array with the eight
        # WSGI-level stamps, its own ints; per event, two int64s and a list
        # slot with the list's spare room.
        size = 560 + 28 * len(self._keys) + getsizeof(self.path) + getsizeof(self.query)
        size += self._own_key_bytes
        if self.status is not None:
            size += getsizeof(self.status)
        foreign = self._foreign
        if foreign is not None:
            # A list slot and a tuple of the key, two ints and the thread,
            # and the keys made by record(). Read under the lock other
            # threads record under: an event is counted here, or recorded
            # after the trace finished and dropped.
            with _FOREIGN_LOCK:
                size += 180 * len(foreign) + foreign.key_bytes
        values = self._request_values
        if values:
            # Names are shared by every trace of the same header layout. A
            # latin-1 string that is not ASCII has a 24-byte longer header.
            size += 40 + 81 * len(values) + sum(map(len, values))
            size -= 24 * sum(map(str.isascii, values))
        raw = self._raw_response_headers
        if isinstance(raw, tuple):
            size += 40 + 81 * len(raw) + sum(map(len, raw)) - 24 * sum(map(str.isascii, raw))
        elif raw is not None:
            size += sum(218 + len(name) + len(value) for name, value in raw)
        laid_out = self._request_headers + self._response_headers
        if laid_out:
            size += 40 + 8 * len(laid_out) + sum(map(getsizeof, laid_out))
        if self.error:
            size += 300 + sum(map(getsizeof, self.error.values()))
        if self._g:
            size += 40 + 8 * len(self._g) + sum(map(getsizeof, self._g))
        if self._warnings:
            size += sum(getsizeof(w) + 8 for w in self._warnings)
        return size

    def _hook_count(self) -> int:
        """How many hook and view events the trace holds (cheaply)."""
        return sum(1 for key in self.event_keys() if key[0] in HOOK_KINDS)

    def summary(self) -> dict[str, Any]:
        """The short JSON form listed by ``/_trace``."""
        return _trace_json.summary(self)

    def to_dict(self) -> dict[str, Any]:
        """The full JSON-safe form, with its ``schema`` version."""
        return _trace_json.to_dict(self)

    def to_json(self) -> str:
        """:meth:`to_dict` as a JSON string."""
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Trace:
        """Rebuild a read-only trace from :meth:`to_dict`'s output (for
        viewers that read ``/_trace``).
        """
        return _trace_json.from_dict(cls, data)

    def __repr__(self) -> str:
        return (
            f"<Trace {self.id} {self.method} {self.path!r} {self.status or '-'}"
            f" {self.state} events={len(self.events)}>"
        )
