"""What keeps a trace bounded and safe to show: per-trace caps, cutting long
strings, bounded reprs, JSON-safe values and exception descriptions::

    limits = TraceLimits(max_string=256)
    cut("x" * 1000, limits.max_string)  # 256 characters and the marker
"""

from __future__ import annotations

import math
import reprlib
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: Marker appended to a string that was cut to its cap.
TRUNCATION_MARKER = "…[truncated]"

#: The invisible bidi controls, which can reorder what a terminal shows: the
#: viewers (:func:`wsgitrace.render.safe`) and ``run``'s request log escape them.
BIDI_CONTROLS = (
    "\u061c\u200e\u200f\u2028\u2029\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)

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
    :param max_headers: Request headers kept per trace, and as many response
        headers.
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


def jsonable(value: Any, limit: int = 1024, depth: int = 3) -> Any:
    """Return ``value`` if JSON can hold it as is, else a cut ``repr``.

    Lists, tuples and dicts become new lists and dicts of their first 100
    items, ``depth`` levels deep; anything deeper is shown by its repr.
    """
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        # NaN and infinities are not JSON: json.dumps writes them as bare
        # NaN/Infinity, which JSON.parse (a browser, jq) refuses, whole trace.
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, str):
        return cut(value, limit)
    if depth > 0:
        if isinstance(value, list | tuple):
            return [jsonable(v, limit, depth - 1) for v in value[:100]]
        if isinstance(value, dict):
            return {
                (cut(k, limit) if isinstance(k, str) else safe_repr(k, limit)): jsonable(
                    v, limit, depth - 1
                )
                for k, v in list(value.items())[:100]
            }
    return safe_repr(value, limit)


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


#: Built-in containers, whose repr grows with their contents: a big one is
#: shown through :mod:`reprlib`, which stops early (text and bytes are
#: sliced first), so that ``g.rows = list(range(10**7))`` costs a bounded
#: repr at teardown, not a string of tens of megabytes; a small one keeps
#: its own repr.
_BOUNDED_TYPES = frozenset({list, tuple, dict, set, frozenset, deque})
_BOUNDED_BASES = tuple(_BOUNDED_TYPES)


def safe_repr(value: Any, limit: int) -> str:
    """``repr(value)`` cut to ``limit`` characters, bounded while it is
    built for big built-in containers, text and bytes; never fails.
    """
    try:
        kind = type(value)
        if kind is str or kind is bytes or kind is bytearray:
            # Only what is kept: the whole repr of a request body read
            # into g would be a copy of it at every teardown.
            text = repr(value[: limit + 1])
        elif kind in _BOUNDED_TYPES:
            text = repr(value) if _fits(value, limit) else _bounded_repr(limit).repr(value)
        elif isinstance(value, _BOUNDED_BASES) and len(value) > 4 * limit:
            # A subclass (Counter, OrderedDict, a namedtuple) has a repr of
            # its own that reprlib cannot bound; one this big would be cut
            # to its first characters anyway after being built in full.
            text = f"<{kind.__qualname__} of {len(value):,} items>"
        else:
            text = repr(value)
    except Exception as exc:
        text = f"<repr failed: {type(exc).__name__}>"
    return cut(text, limit)


def _fits(value: Any, limit: int) -> bool:
    """Whether a built-in container is small enough for its own ``repr``:
    about ``limit`` elements and characters in all, counted without calling
    any code of the app's and stopping as soon as there are more.

    Small values keep the ``repr`` users know (a dict in insertion order,
    every level of a nested one, a deque's ``maxlen``), which :mod:`reprlib`
    does not give; only big ones need its bounded form.
    """
    budget = limit
    seen: set[int] = set()
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind in _BOUNDED_TYPES:
            if id(item) in seen:
                continue  # a container holding itself: repr shows [...]
            seen.add(id(item))
            budget -= len(item) + 1
            if budget < 0:
                return False
            if kind is dict:
                stack.extend(item.keys())
                stack.extend(item.values())
            else:
                stack.extend(item)
            continue
        if kind is str or kind is bytes or kind is bytearray:
            budget -= len(item)
        elif kind is int:
            budget -= item.bit_length() // 3 + 1
        else:
            budget -= 1
        if budget < 0:
            return False
    return True


def _bounded_repr(limit: int) -> reprlib.Repr:
    """A :class:`reprlib.Repr` that shows at most ``limit`` characters of
    any element and a few dozen elements of any container, three levels
    deep, and stops once it has shown about ``limit`` characters in all.
    """
    bounded = _BudgetRepr(limit)
    bounded.maxlevel = 3
    bounded.maxlist = bounded.maxtuple = bounded.maxdict = 32
    bounded.maxset = bounded.maxfrozenset = bounded.maxdeque = 32
    bounded.maxstring = bounded.maxlong = bounded.maxother = limit
    return bounded


class _BudgetRepr(reprlib.Repr):
    """A :class:`reprlib.Repr` that shows ``...`` for every element after
    its first ``budget`` characters: the text is cut there anyway, and 32
    elements on each of three levels, each up to ``max_string`` characters,
    would otherwise still be tens of megabytes.
    """

    def __init__(self, budget: int) -> None:
        super().__init__()
        self.left = budget

    def repr1(self, x: Any, level: int) -> str:
        if self.left <= 0:
            return "..."
        text = super().repr1(x, level)
        if type(x) not in _BOUNDED_TYPES:
            # A container's elements have been counted already.
            self.left -= len(text) + 2
        return text
