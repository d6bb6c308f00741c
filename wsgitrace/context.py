"""The trace of the request being served, and user events.

::

    from wsgitrace import current_trace, span

    @span("load_cart")
    def load_cart(user_id): ...

    def view():
        with span("pricing", items=3):
            ...
        current_trace()  # the Trace of this request, or None
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable
from contextvars import ContextVar
from types import TracebackType
from typing import Any, TypeVar

from ._limits import jsonable
from .redact import REDACTED
from .trace import Trace

F = TypeVar("F", bound=Callable[..., Any])

_current_trace: ContextVar[Trace | None] = ContextVar("wsgitrace.trace", default=None)
# Bound once for the request path: CPython 3.11 makes a new bound method for
# each ``_current_trace.get()`` written in a module that imported the name.
_get_trace = _current_trace.get
_set_trace = _current_trace.set
_reset_trace = _current_trace.reset

#: Guards the start stacks of span objects shared between threads.
_starts_lock = threading.Lock()


def current_trace() -> Trace | None:
    """The trace of the request being served in this context, or ``None``
    outside a traced request.
    """
    return _get_trace()


class span:  # noqa: N801 - used like a function, as contextlib's helpers are
    """Record a user event named ``name`` on the current trace, as a context
    manager or a decorator (sync or async functions, or generators, timed
    while they are iterated). Outside a traced request
    it does nothing. An exception raised inside is recorded in the event's
    ``error`` attribute and propagates unchanged. An attribute under a
    secret-looking name (``password=...``) is recorded as ``[redacted]``.

    :param name: Event name (kind ``span``).
    :param attrs: Attributes stored on the event, copied when it ends:
        numbers, ``None`` and text (cut to ``max_string``) as they are,
        lists, tuples and dicts as lists and dicts of their first 100
        items, anything else (and any deeper level) as its cut ``repr``.
    :raise TypeError: ``name`` is a function: ``@span`` was used without
        a name.
    """

    __slots__ = ("_starts", "attrs", "name")

    def __init__(self, name: str, **attrs: Any) -> None:
        if callable(name):
            # ``@span`` alone would make the function a span object whose
            # every call fails with an unrelated TypeError.
            what = getattr(name, "__name__", repr(name))
            msg = f'span() takes the event\'s name: use @span("{what}"), not @span'
            raise TypeError(msg)
        self.name = name
        self.attrs = attrs
        self._starts: list[tuple[Trace, int]] = []

    def __enter__(self) -> span:
        trace = _get_trace()
        if trace is not None:
            self._starts.append((trace, trace.now()))
        else:
            self._starts.append((None, 0))  # type: ignore[arg-type]
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        starts = self._starts
        current = _get_trace()
        with _starts_lock:
            # One span object may be used by concurrent requests (a module-level
            # ``timer = span("db")``): close this request's innermost entry,
            # not whichever was entered last.
            for index in range(len(starts) - 1, -1, -1):
                if starts[index][0] is current:
                    break
            else:
                index = -1
            trace, start = starts.pop(index)
        if trace is None:
            return
        try:
            is_secret = trace.redactor.is_secret
            limit = trace.limits.max_string
            # Copied now, JSON-safe and cut: the trace keeps none of the
            # app's objects, and no repr of theirs runs when it is read.
            attrs = {
                k: REDACTED if is_secret(k) else jsonable(v, limit, 1)
                for k, v in self.attrs.items()
            }
            if exc_type is not None:
                attrs["error"] = exc_type.__name__
            trace.record("span", self.name, start, trace.now(), attrs)
        except Exception:
            from ._internal import report_internal_error

            report_internal_error("span", trace)

    def __repr__(self) -> str:
        attrs = "".join(f", {k}={v!r}" for k, v in self.attrs.items())
        return f"span({self.name!r}{attrs})"

    def __call__(self, func: F) -> F:
        # A generator function returns at once: the span covers its
        # iteration, from the first next() until it is exhausted or closed.
        if inspect.isgeneratorfunction(func):

            @functools.wraps(func)
            def generator_wrapper(*args: Any, **kwargs: Any) -> Any:
                with span(self.name, **self.attrs):
                    return (yield from func(*args, **kwargs))

            return generator_wrapper  # type: ignore[return-value]

        if inspect.isasyncgenfunction(func):

            @functools.wraps(func)
            async def async_generator_wrapper(*args: Any, **kwargs: Any) -> Any:
                with span(self.name, **self.attrs):
                    agen = func(*args, **kwargs)
                    try:
                        # As ``yield from`` would: values sent and exceptions
                        # thrown in go to the wrapped generator.
                        step = agen.asend(None)
                        while True:
                            try:
                                value = await step
                            except StopAsyncIteration:
                                return
                            try:
                                sent = yield value
                            except GeneratorExit:
                                raise
                            except BaseException as exc:
                                step = agen.athrow(exc)
                            else:
                                step = agen.asend(sent)
                    finally:
                        await agen.aclose()

            return async_generator_wrapper  # type: ignore[return-value]

        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                with span(self.name, **self.attrs):
                    return await func(*args, **kwargs)

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with span(self.name, **self.attrs):
                return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]
