"""What keeps a trace bounded and safe to show: per-trace caps, cutting long
strings, JSON-safe values and exception descriptions::

    limits = TraceLimits(max_string=256)
    cut("x" * 1000, limits.max_string)  # 256 characters and the marker
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: Marker appended to a string that was cut to its cap.
TRUNCATION_MARKER = "…[truncated]"

#: request, app, start_response, first_byte, body, close.
_WSGI_EVENT_COUNT = 6


@dataclass(frozen=True)
class TraceLimits:
    """Per-trace caps. Whatever is cut is counted and marked on the trace.

    :param max_events: Events kept per trace; later ones are counted in
        :attr:`Trace.dropped_events`. The six WSGI-level events (``request``,
        ``app``, ``start_response``, ``first_byte``, ``body``, ``close``) are
        always kept and count against it, with room for at least one more:
        a trace keeps at least seven.
    :param max_string: Length of any captured string (header value, path,
        query, ``repr``); longer ones end with :data:`TRUNCATION_MARKER`.
    :param max_headers: Request and response headers kept per trace.
    """

    max_events: int = 256
    max_string: int = 1024
    max_headers: int = 64

    #: Events a trace records besides its WSGI-level ones, which are kept
    #: as timestamps but count against ``max_events``.
    event_room: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        from .exceptions import ConfigurationError

        for name in ("max_events", "max_string", "max_headers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                msg = f"{name} must be a positive integer, got {value!r}"
                raise ConfigurationError(msg)
        object.__setattr__(self, "event_room", max(1, self.max_events - _WSGI_EVENT_COUNT))


DEFAULT_LIMITS = TraceLimits()


def cut(text: str, limit: int) -> str:
    """Cut ``text`` to ``limit`` characters, marking the cut."""
    if len(text) <= limit:
        return text
    return text[:limit] + TRUNCATION_MARKER


def jsonable(value: Any, limit: int = 1024) -> Any:
    """Return ``value`` if JSON can hold it as is, else a cut ``repr``."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        # NaN and infinities are not JSON: json.dumps writes them as bare
        # NaN/Infinity, which JSON.parse (a browser, jq) refuses, whole trace.
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, str):
        return cut(value, limit)
    if isinstance(value, list | tuple):
        return [jsonable(v, limit) for v in value[:100]]
    if isinstance(value, dict):
        return {str(k): jsonable(v, limit) for k, v in list(value.items())[:100]}
    try:
        return cut(repr(value), limit)
    except Exception:
        return f"<unrepresentable {type(value).__name__}>"


def format_error(
    exc: BaseException,
    where: str,
    limits: TraceLimits,
    scrub: Callable[[str], str] | None = None,
) -> dict[str, str]:
    """Describe an exception for a trace: type, message, traceback, where.

    :param scrub: Applied to the message and traceback before they are cut
        (it replaces the request's secrets).
    """
    try:
        message = str(exc)
    except Exception:
        message = "<str() failed>"
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if scrub is not None:
        message = scrub(message)
        tb = scrub(tb)
    return {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": cut(message, limits.max_string),
        "traceback": cut(tb, limits.max_string * 16),
        "where": where,
    }
