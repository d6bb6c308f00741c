"""wsgitrace: see what every request to a WSGI app did, in order.

::

    from wsgitrace import TraceMiddleware

    app = TraceMiddleware(app)
    trace = app.buffer.latest(1)[0]
    trace.hooks()

For Flask, use :class:`wsgitrace.flask.FlaskTrace`.
"""

from __future__ import annotations

from .buffer import TraceBuffer
from .context import current_trace, span
from .exceptions import (
    ConfigurationError,
    HookOrderError,
    StoreError,
    WsgitraceError,
    WsgitraceWarning,
)
from .middleware import TraceMiddleware
from .redact import Redactor
from .trace import SCHEMA_VERSION, Event, Trace, TraceLimits

__version__ = "0.1.0"

__all__ = [
    "SCHEMA_VERSION",
    "ConfigurationError",
    "Event",
    "HookOrderError",
    "Redactor",
    "StoreError",
    "Trace",
    "TraceBuffer",
    "TraceLimits",
    "TraceMiddleware",
    "WsgitraceError",
    "WsgitraceWarning",
    "current_trace",
    "span",
]
