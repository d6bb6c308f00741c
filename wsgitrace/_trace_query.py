"""The query string of ``GET /_trace`` and ``/_trace/stream``, parsed and
checked (see :mod:`wsgitrace.endpoint` for what each parameter means)::

    query = _parse_query("limit=20&status=5xx", cap=1000)
    matching = [t for t in traces if query.match(t)]
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from .trace import Trace

if TYPE_CHECKING:
    from ._trace_sources import TraceView

#: ``limit`` used when none is given.
DEFAULT_LIMIT = 100
#: Most seconds a long-poll waits.
MAX_WAIT = 20.0

_STATUS_RE = re.compile(r"([1-5])(xx|\d\d)\Z", re.IGNORECASE)
_METHOD_RE = re.compile(r"[A-Za-z]{1,20}\Z")
# ASCII digits only (\d would take any script's); any length, clamped when read.
_INT_RE = re.compile(r"[0-9]+\Z")
#: What a trace id looks like (URL-safe, see ``Trace.id``).
_TRACE_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
#: Cursors are SQLite integers in a store; a larger one means "after all".
_MAX_CURSOR = 2**63 - 1
_QUERY_TOKEN_KEYS = frozenset({"token", "access_token", "auth", "authorization"})


class _BadQueryError(Exception):
    """A query value the endpoint cannot use (answered with a 400)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


@dataclass(frozen=True)
class _Query:
    """The parsed query parameters of one request."""

    limit: int
    since: int | None
    wait: float
    methods: frozenset[str] | None
    statuses: tuple[tuple[int, int], ...] | None
    path: str | None
    min_ms: float | None
    full: bool

    def match(self, trace: TraceView) -> bool:
        """Whether ``trace`` passes every filter."""
        if not self._method_and_path_match(trace):
            return False
        if self.statuses is not None and not self._status_matches(trace.status_code):
            return False
        if self.min_ms is not None:
            duration = _ms_so_far(trace)
            if duration is None or duration < self.min_ms:
                return False
        return True

    def pending(self, trace: TraceView) -> bool:
        """Whether ``trace`` is in progress and fails only a filter it may
        still pass: ``min_ms``, which it has not run for yet, or ``status``
        before the app has started its response (a lazy body calls
        ``start_response`` when first iterated). A reader that hands each
        trace out once must wait before deciding.
        """
        if trace.finished or (self.min_ms is None and self.statuses is None):
            return False
        if not self._method_and_path_match(trace):
            return False
        if self.statuses is not None:
            code = trace.status_code
            if code is None:
                return True
            if not self._status_matches(code):
                return False
        if self.min_ms is None:
            return False
        duration = _ms_so_far(trace)
        return duration is not None and duration < self.min_ms

    def _method_and_path_match(self, trace: TraceView) -> bool:
        if self.methods is not None and trace.method.upper() not in self.methods:
            return False
        return self.path is None or trace.path.startswith(self.path)

    def _status_matches(self, code: int | None) -> bool:
        statuses = self.statuses or ()
        return code is not None and any(low <= code <= high for low, high in statuses)


def _ms_so_far(trace: TraceView) -> float | None:
    """The duration of ``trace``, or how long it has run when it is still in
    progress (its duration will be at least that).
    """
    if isinstance(trace, Trace) and not trace.finished:
        duration = trace.duration_ms  # read after finished: its end is set first
        return (trace.now() - trace.start_ns) / 1e6 if duration is None else duration
    return trace.duration_ms


def _parse_query(query_string: str, cap: int) -> _Query:
    """Parse and check the query string; raise :class:`_BadQueryError`."""
    try:
        raw = parse_qs(query_string, keep_blank_values=True, max_num_fields=64)
    except ValueError:
        raise _BadQueryError("query", "too many query parameters") from None
    if _QUERY_TOKEN_KEYS & raw.keys():
        msg = "a token is never accepted in the query string; send 'Authorization: Bearer <token>'"
        raise _BadQueryError("token", msg)

    def one(name: str) -> str | None:
        values = raw.get(name)
        if not values:
            return None
        if len(values) > 1:
            raise _BadQueryError(name, f"'{name}' is given more than once")
        value = values[0].strip()
        if len(value) > 1024:
            raise _BadQueryError(name, f"'{name}' is too long")
        return value

    limit = DEFAULT_LIMIT
    text = one("limit")
    if text is not None:
        if not _INT_RE.match(text):
            raise _BadQueryError("limit", f"'limit' must be a non-negative integer{_got(text)}")
        limit = min(int(text), cap)

    since: int | None = None
    text = one("since")
    if text is not None:
        if not _INT_RE.match(text):
            raise _BadQueryError(
                "since", f"'since' must be a cursor (a non-negative integer){_got(text)}"
            )
        since = min(int(text), _MAX_CURSOR)

    wait = 0.0
    text = one("wait")
    if text is not None:
        wait = _non_negative_float("wait", text, "seconds")
        wait = min(wait, MAX_WAIT)

    methods: frozenset[str] | None = None
    text = one("method")
    if text:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts or not all(_METHOD_RE.match(p) for p in parts):
            msg = f"'method' must be HTTP methods such as GET or GET,POST{_got(text)}"
            raise _BadQueryError("method", msg)
        methods = frozenset(p.upper() for p in parts)

    statuses: tuple[tuple[int, int], ...] | None = None
    text = one("status")
    if text:
        ranges = []
        for part in (p.strip() for p in text.split(",")):
            found = _STATUS_RE.match(part)
            if found is None:
                msg = "'status' must be status codes or classes such as 404, 5xx or 4xx,5xx" + _got(
                    text
                )
                raise _BadQueryError("status", msg)
            if found.group(2).lower() == "xx":
                low = int(found.group(1)) * 100
                ranges.append((low, low + 99))
            else:
                ranges.append((int(part), int(part)))
        statuses = tuple(ranges)

    path: str | None = None
    text = one("path")
    if text:
        if not text.startswith("/"):
            msg = f"'path' must be a path prefix starting with '/'{_got(text)}"
            raise _BadQueryError("path", msg)
        # Compare like for like: PATH_INFO holds the request's bytes as latin-1.
        path = text.encode("utf-8").decode("latin-1")

    min_ms: float | None = None
    text = one("min_ms")
    if text:
        min_ms = _non_negative_float("min_ms", text, "milliseconds")

    full = False
    text = one("full")
    if text is not None:
        if text.lower() not in ("", "0", "1", "true", "false"):
            raise _BadQueryError("full", f"'full' must be 1 or 0{_got(text)}")
        full = text.lower() in ("", "1", "true")

    return _Query(limit, since, wait, methods, statuses, path, min_ms, full)


def _non_negative_float(name: str, text: str, unit: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _BadQueryError(name, f"'{name}' must be a number of {unit}{_got(text)}") from None
    if not math.isfinite(value) or value < 0:
        raise _BadQueryError(name, f"'{name}' must be a non-negative number of {unit}{_got(text)}")
    return value


def _got(text: str) -> str:
    """What the query said, for an error message (cut, quoted)."""
    return f", got {text[:64]!r}"
