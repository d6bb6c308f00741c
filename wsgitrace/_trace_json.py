"""The JSON form of a trace: what ``/_trace`` serves, the store keeps,
``wsgitrace tail`` reads and OTLP export turns into spans.

::

    summary(trace)           # one entry of the /_trace listing
    to_dict(trace)           # the whole trace, with its "schema" version
    from_dict(Trace, data)   # a read-only Trace rebuilt from to_dict()'s output

Reached through :meth:`Trace.summary`, :meth:`Trace.to_dict` and
:meth:`Trace.from_dict`; kept apart from the model, which records on the
request path and builds nothing until it is read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._limits import TraceLimits, jsonable

if TYPE_CHECKING:
    from .trace import Trace

#: Version of the JSON form produced by :meth:`Trace.to_dict`.
SCHEMA_VERSION = 1


#: The keys of :func:`summary`, in its order: the one list of them, which a
#: store's row keeps and its damaged row lists too (unknown values null).
SUMMARY_KEYS: tuple[str, ...] = (
    "id",
    "cursor",
    "state",
    "time",
    "method",
    "path",
    "query",
    "status",
    "duration_ms",
    "ttfb_ms",
    "bytes",
    "endpoint",
    "hooks",
    "error",
    "warnings",
)


def summary(trace: Trace) -> dict[str, Any]:
    """The short JSON form listed by ``/_trace``: :data:`SUMMARY_KEYS`."""
    values = (
        trace.id,
        trace.cursor,
        trace.state,
        trace.wall_time,
        trace.method,
        trace.path,
        trace.query,
        trace.status_code,
        _round(trace.duration_ms),
        _round(trace.ttfb_ms),
        trace.bytes_sent,
        trace.endpoint,
        trace._hook_count(),
        trace.error["type"] if trace.error else None,
        list(trace.warnings or ()),
    )
    return dict(zip(SUMMARY_KEYS, values, strict=True))


def to_dict(trace: Trace) -> dict[str, Any]:
    """The full JSON-safe form, with its ``schema`` version."""
    data = summary(trace)
    data.update(
        {
            "schema": SCHEMA_VERSION,
            "status_line": trace.status,
            "remote_addr": trace.remote_addr,
            "chunks": trace.chunks,
            "content_length": trace.content_length,
            "rule": trace.rule,
            "view_args": jsonable(trace.view_args),
            "request_headers": _pairs(trace.request_headers),
            "response_headers": _pairs(trace.response_headers),
            "error": trace.error,
            "g": trace.g,
            "session_keys": trace.session_keys,
            "truncated": dict(trace.truncated or {}),
            "dropped_events": trace.dropped_events,
            "events": [e.to_dict(trace.limits.max_string) for e in trace.events],
        }
    )
    return data


def from_dict(cls: type[Trace], data: Mapping[str, Any]) -> Trace:
    """Rebuild a read-only trace of class ``cls`` from :func:`to_dict`'s
    output (for viewers that read ``/_trace``).
    """
    trace = cls(
        str(data.get("method", "")),
        str(data.get("path", "")),
        query=str(data.get("query") or ""),
        remote_addr=data.get("remote_addr"),
        start_ns=0,
        limits=TraceLimits(max_events=max(1, len(data.get("events") or ()) + 1)),
    )
    trace._live = False
    trace._id = str(data.get("id", ""))
    trace.cursor = int(data.get("cursor") or 0)
    trace.wall_time = float(data.get("time") or 0.0)
    trace.status = data.get("status_line") or (
        str(data["status"]) if data.get("status") is not None else None
    )
    duration = data.get("duration_ms")
    trace.end_ns = None if duration is None else round(duration * 1e6)
    ttfb = data.get("ttfb_ms")
    trace.first_byte_ns = None if ttfb is None else round(ttfb * 1e6)
    trace.bytes_sent = int(data.get("bytes") or 0)
    trace.chunks = int(data.get("chunks") or 0)
    trace.content_length = data.get("content_length")
    trace.endpoint = data.get("endpoint")
    trace.rule = data.get("rule")
    trace.view_args = data.get("view_args")
    error = data.get("error")
    trace.error = error if isinstance(error, dict) else None
    trace.g = data.get("g")
    trace.session_keys = data.get("session_keys")
    trace.warnings = list(data.get("warnings") or ()) or None
    trace.truncated = dict(data.get("truncated") or {}) or None
    trace.dropped_events = int(data.get("dropped_events") or 0)
    trace.request_headers = _flat(data.get("request_headers"))
    trace.response_headers = _flat(data.get("response_headers"))
    trace.finished = data.get("state", "finished") != "in_progress"
    trace.thread = 0
    # Every event with its own thread, as other threads' events are kept.
    from .trace import _ForeignEvents  # trace.py imports this module

    trace._foreign = foreign = _ForeignEvents()
    for event in data.get("events") or ():
        start = round(float(event.get("start_ms", 0)) * 1e6)
        end = start + round(float(event.get("duration_ms", 0)) * 1e6)
        key = (
            str(event.get("kind", "")),
            str(event.get("name", "")),
            event.get("attrs") or None,
        )
        foreign.append((key, start, end, int(event.get("thread") or 0)))
    return trace


def _round(value: float | None) -> float | None:
    """A duration in ms, rounded to the microsecond."""
    return None if value is None else round(value, 3)


def _pairs(flat: tuple[str, ...]) -> list[list[str]]:
    """``(name, value, name, value, ...)`` as ``[[name, value], ...]``."""
    return [[flat[i], flat[i + 1]] for i in range(0, len(flat) - 1, 2)]


def _flat(pairs: Any) -> tuple[str, ...]:
    """Header pairs from JSON (checked) as one flat tuple of strings."""
    out: list[str] = []
    for pair in pairs or ():
        if isinstance(pair, list | tuple) and len(pair) == 2:
            out.extend((str(pair[0]), str(pair[1])))
    return tuple(out)
