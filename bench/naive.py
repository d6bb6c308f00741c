"""The naive recorder issue #6 measures wsgitrace against.

Issue #6 calibrates its budget with "a naive recorder appending 20 tuples to
a deque" (about 1.35× bare Flask there) and asks full Flask tracing to cost
less. This is that recorder, so the bench measures it side by side instead of
quoting it: every step of a request appends one ``(name, perf_counter_ns())``
tuple to one shared, bounded deque. It keeps no per-request state, redacts
nothing, keeps no headers, ``g`` or view args, and is not safe against an app
that raises; it is a yardstick, not a tracer.

On the bench's ``/hello`` it appends 20 tuples: the WSGI call (2),
``start_response``, the body chunk and ``close`` (3), the URL match (1), the
six signals Flask sends, and a start and an end around each of the three
hooks and the view (8).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from functools import wraps
from typing import Any

import flask
from flask import Flask

#: Flask's signals, by name; the recorder connects a receiver to each.
SIGNALS = (
    "request_started",
    "request_finished",
    "got_request_exception",
    "request_tearing_down",
    "appcontext_pushed",
    "appcontext_tearing_down",
    "appcontext_popped",
    "before_render_template",
    "template_rendered",
    "message_flashed",
)

_clock = time.perf_counter_ns


class NaiveRecorder:
    """Appends a ``(name, time)`` tuple per request step to :attr:`events`.

    :param app: The Flask app to record; its routes and hooks must already
        be registered (they are wrapped as they are now).
    :param maxlen: The deque's bound.
    """

    def __init__(self, app: Flask, maxlen: int = 20_000) -> None:
        self.events: deque[tuple[str, int]] = deque(maxlen=maxlen)
        #: Requests seen (the deque drops old tuples, so it cannot count them).
        self.requests = 0
        self._app = app
        self._receivers: list[tuple[Any, Callable[..., None]]] = []
        self._connected = False
        self._wrap_wsgi(app)
        self._make_receivers()
        self.connect()
        self._wrap_hooks(app)

    def _wrap_wsgi(self, app: Flask) -> None:
        append = self.events.append
        inner = app.wsgi_app

        def wsgi_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
            self.requests += 1
            append(("request", _clock()))

            def traced_start_response(*args: Any) -> Any:
                append(("start_response", _clock()))
                return start_response(*args)

            app_iter = inner(environ, traced_start_response)
            append(("app", _clock()))
            return _Body(app_iter, append)

        app.wsgi_app = wsgi_app  # type: ignore[method-assign]

    def _make_receivers(self) -> None:
        append = self.events.append
        for name in SIGNALS:

            def receiver(sender: Any, _name: str = f"signal:{name}", **extra: Any) -> None:
                append((_name, _clock()))
                if _name == "signal:request_started":
                    append(("url_match", _clock()))

            self._receivers.append((getattr(flask, name), receiver))

    def connect(self) -> None:
        """Connect the signal receivers (done when the recorder is made)."""
        if not self._connected:
            for signal, receiver in self._receivers:
                # Strong references: blinker would drop these closures otherwise.
                signal.connect(receiver, self._app, weak=False)
            self._connected = True

    def disconnect(self) -> None:
        """Disconnect the signal receivers.

        A signal's receivers are global: while one is connected, for any
        sender, every Flask app of the process sends that signal the slow way,
        and FlaskTrace times it instead of recording an instant. So the bench
        connects them only while it times this recorder's own app.
        """
        for signal, receiver in self._receivers:
            signal.disconnect(receiver)
        self._connected = False

    def _wrap_hooks(self, app: Flask) -> None:
        for registry in (
            app.before_request_funcs,
            app.after_request_funcs,
            app.teardown_request_funcs,
        ):
            for funcs in registry.values():
                funcs[:] = [self._timed(f.__name__, f) for f in funcs]
        for endpoint, view in list(app.view_functions.items()):
            app.view_functions[endpoint] = self._timed(f"view:{endpoint}", view)

    def _timed(self, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        append = self.events.append
        start_name, end_name = f"{name}:start", f"{name}:end"

        @wraps(func)
        def timed(*args: Any, **kwargs: Any) -> Any:
            append((start_name, _clock()))
            try:
                return func(*args, **kwargs)
            finally:
                append((end_name, _clock()))

        return timed


class _Body:
    """The app's body: a tuple per chunk, and one when the server closes it,
    which closes the app's however far it was iterated (a generator's
    ``close()`` before its first ``next`` would run none of its code).
    """

    __slots__ = ("_app_iter", "_append")

    def __init__(
        self, app_iter: Iterable[bytes], append: Callable[[tuple[str, int]], None]
    ) -> None:
        self._app_iter = app_iter
        self._append = append

    def __iter__(self) -> Iterator[bytes]:
        append = self._append
        for chunk in self._app_iter:
            append(("body", _clock()))
            yield chunk

    def close(self) -> None:
        try:
            close = getattr(self._app_iter, "close", None)
            if close is not None:
                close()
        finally:
            self._append(("close", _clock()))
