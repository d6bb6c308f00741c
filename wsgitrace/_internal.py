"""Process-wide state of wsgitrace's own: the count of errors its code has
caught (see the "never breaks the app" contract) and the listeners told of
every trace any middleware adds to its buffer.

::

    try:
        ...  # recording
    except Exception:
        report_internal_error("where", trace)
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._types import TraceListener
    from .trace import Trace

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
    to its buffer, and that middleware (used by the pytest plugin).
    """
    _capture_listeners.append(listener)


def remove_capture_listener(listener: TraceListener) -> None:
    """Undo :func:`add_capture_listener`."""
    with contextlib.suppress(ValueError):
        _capture_listeners.remove(listener)
