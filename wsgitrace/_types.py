"""Type aliases shared by wsgitrace's modules."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

    from .middleware import TraceMiddleware
    from .trace import Trace

#: A monotonic clock returning nanoseconds, like :func:`time.perf_counter_ns`.
Clock: TypeAlias = "Callable[[], int]"

#: Decides per request whether to trace it: a rate in ``[0, 1]`` or a callable
#: taking the WSGI environ.
Sampler: TypeAlias = "float | Callable[[WSGIEnvironment], bool]"

#: Called with each trace a middleware adds to its buffer, and that
#: middleware (the test capture).
TraceListener: TypeAlias = "Callable[[Trace, TraceMiddleware], None]"

#: Attributes attached to an event.
Attributes: TypeAlias = "dict[str, Any]"

__all__ = [
    "Attributes",
    "Clock",
    "Sampler",
    "StartResponse",
    "TraceListener",
    "WSGIApplication",
    "WSGIEnvironment",
]
