"""What the ``/_trace`` endpoint's JSON must look like for ``tail`` and
``show`` to use it: anything else (another server's JSON, fields of the
wrong type, a newer schema) is refused with one message, never a traceback.

::

    _check_listing(page, full=False)   # GET /_trace
    _check_trace(data)                 # GET /_trace/<id>
"""

from __future__ import annotations

from typing import Any

from ._trace_json import SCHEMA_VERSION


class _BadAnswerError(Exception):
    """The server answered something else than the endpoint's JSON."""


_NOT_ENDPOINT = "the server's answer is not a wsgitrace {} (is this a wsgitrace endpoint?)"


def _check_listing(page: object, *, full: bool = False) -> None:
    """Refuse JSON that is not the endpoint's listing (of full traces with
    ``full``).
    """
    _check_schema(page)
    if not (
        isinstance(page, dict)
        and isinstance(page.get("traces"), list)
        and all(isinstance(t, dict) for t in page["traces"])
        and type(page.get("cursor")) is int
        and all(type(page.get(k, 0)) is int for k in ("dropped", "missed", "sink_dropped"))
        and all(_summary_fields_ok(t) and (not full or _trace_fields_ok(t)) for t in page["traces"])
    ):
        raise _BadAnswerError(_NOT_ENDPOINT.format("listing"))


def _check_trace(data: object) -> None:
    """Refuse JSON that is not one of the endpoint's traces."""
    _check_schema(data)
    if not (
        isinstance(data, dict)
        and isinstance(data.get("id"), str)
        and "events" in data
        and _summary_fields_ok(data)
        and _trace_fields_ok(data)
    ):
        raise _BadAnswerError(_NOT_ENDPOINT.format("trace"))


def _number(value: object) -> bool:
    """Absent, or a JSON number the viewers can compute with (not NaN, not
    infinite, not so large that it overflows a float).
    """
    return value is None or (isinstance(value, int | float) and -1e300 < value < 1e300)


def _summary_fields_ok(item: dict[str, Any]) -> bool:
    """Whether the fields the trace table computes with have their types."""
    return all(_number(item.get(key)) for key in ("duration_ms", "ttfb_ms", "bytes"))


def _trace_fields_ok(data: dict[str, Any]) -> bool:
    """Whether the fields :meth:`Trace.from_dict` and the timeline convert
    or iterate have their types.
    """
    numbers = ("cursor", "time", "chunks", "dropped_events")
    objects = ("error", "g", "truncated")
    lists = ("events", "warnings", "session_keys", "request_headers", "response_headers")
    if not (
        all(_number(data.get(key)) for key in numbers)
        and all(isinstance(data.get(key), dict | None) for key in objects)
        and all(isinstance(data.get(key), list | None) for key in lists)
        and all(
            isinstance(text, str)
            for key in ("warnings", "session_keys")
            for text in data.get(key) or ()
        )
    ):
        return False
    error = data.get("error") or {}
    if not (
        isinstance(error.get("type", ""), str) and isinstance(error.get("traceback"), str | None)
    ):
        return False
    return all(
        isinstance(event, dict)
        and all(event.get(key, 0) is not None for key in ("start_ms", "duration_ms"))
        and all(_number(event.get(key)) for key in ("start_ms", "duration_ms", "thread"))
        and isinstance(event.get("attrs"), dict | None)
        for event in data.get("events") or ()
    )


def _check_schema(data: object) -> None:
    """Refuse JSON of a schema version newer than this wsgitrace reads: its
    fields may not mean what the viewers take them to mean, or have other
    types, so this is checked before them (the fix is an upgrade, not
    another URL).
    """
    if not isinstance(data, dict):
        return
    schema = data.get("schema", SCHEMA_VERSION)
    if type(schema) is not int or schema > SCHEMA_VERSION:
        msg = (
            f"the server's answer has schema version {schema!r}; this wsgitrace reads"
            f" version {SCHEMA_VERSION}: upgrade it (pip install -U wsgitrace)"
        )
        raise _BadAnswerError(msg)
