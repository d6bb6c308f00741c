"""Flask extension: every hook, signal and URL match of a request, in order.

::

    from flask import Flask
    from wsgitrace.flask import FlaskTrace

    app = Flask(__name__)
    trace = FlaskTrace(app)            # or: ext = FlaskTrace(); ext.init_app(app)

    # after a request:
    trace.buffer.latest(1)[0].hooks()
    # ['url_value_preprocessor:pull_lang', 'before_request:load_user',
    #  'view:index', 'after_request:add_header', 'teardown_request:close_db']

How it records. Flask calls its hooks from a handful of app methods
(``preprocess_request``, ``process_response``, ``do_teardown_request``, ...).
The extension sets instance attributes that shadow those methods with
versions that run the *same registries in the same order* as Flask 3.0/3.1
and read the clock either side of each hook, instead of wrapping every hook
function or connecting a blinker receiver per signal (each would cost about a
microsecond per event). Signals are recorded where Flask sends them (an
instant when the signal has no receivers at all, else with the time its
receivers took; ``appcontext_pushed`` spans the push of the app context,
which it ends);
the rarer ones (``got_request_exception``, template and flash signals) are
recorded by receivers connected for this app only, strongly referenced, and
disconnected when the app is freed.
A method that the app's class overrides is left alone (its phase is
listed in :attr:`FlaskTrace.skipped`), so subclass behaviour is kept.

The extension holds the app only weakly and creates no reference cycle
through it.
"""

from __future__ import annotations

import os
import types
import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from flask import Flask

from ._flask_phases import _PHASES as _PHASES
from ._flask_phases import _install_phases
from ._flask_receivers import _capture_logs, _connect_receivers
from ._flask_recorder import _AppTracer
from .buffer import TraceBuffer
from .config import env_name, resolve_options
from .exceptions import ConfigurationError, WsgitraceWarning
from .middleware import TraceMiddleware

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

    from ._types import Clock

__all__ = ["FlaskTrace"]

_SUPPORTED = ("3.0", "3.1")


class _WeakWsgiApp:
    """Calls the ``wsgi_app`` of an app held weakly, so that
    ``app.wsgi_app = TraceMiddleware(...)`` adds no reference cycle: a
    function set on the app as its method, or else the class's method,
    looked up at each call so that a wrapper put on ``Flask.wsgi_app`` (by an
    APM agent, before or after ``init_app``) still runs.
    """

    __slots__ = ("_app", "_func")

    def __init__(self, app: Flask, func: Callable[..., Iterable[bytes]] | None = None) -> None:
        self._app = weakref.ref(app)
        self._func = func

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        app = self._app()
        if app is None:  # pragma: no cover - the app is gone but still called
            msg = "the Flask app traced by wsgitrace no longer exists"
            raise RuntimeError(msg)
        func = self._func if self._func is not None else type(app).wsgi_app
        return func(app, environ, start_response)

    def __repr__(self) -> str:
        what = "wsgi_app" if self._func is None else repr(self._func)
        return f"<{what} of {self._app()!r}>"


class FlaskTrace:
    """Trace every request of a Flask app: hooks, signals, URL matching,
    ``g`` and session state, templates, on top of :class:`TraceMiddleware`.

    Options come from keywords, then ``app.config["WSGITRACE_*"]``, then
    ``WSGITRACE_*`` environment variables. The ``/_trace`` endpoint is on
    when the app is in debug or testing mode (checked per request) unless
    ``endpoint`` says otherwise.

    :param app: The app, or ``None`` to call :meth:`init_app` later.
    :param buffer: One buffer for every app this extension traces. Without
        it, each app gets its own, sized by its own options (so a factory
        with a module-level ``FlaskTrace()`` keeps its apps apart).
    :param clock: Nanosecond clock for every timestamp.
        Events are ordered by their readings, so a test clock should advance
        on every reading: with one that repeats (a frozen clock), events that
        start on the same reading may be listed out of call order.
    :param options: See :mod:`wsgitrace.config`.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        buffer: TraceBuffer | None = None,
        clock: Clock | None = None,
        **options: Any,
    ) -> None:
        resolve_options(options, {}, {})  # fail early on unknown or bad keywords
        self._options = options
        self._buffer = buffer
        # The last app's buffer, kept when that app is gone (it holds no app).
        self._last_buffer: TraceBuffer | None = None
        self._clock = clock
        self._tracers: weakref.WeakKeyDictionary[Flask, _AppTracer] = weakref.WeakKeyDictionary()
        if app is not None:
            self.init_app(app)

    @property
    def buffer(self) -> TraceBuffer:
        """The :class:`TraceBuffer` given, or else the one of the (single or
        last) app initialised.
        """
        buffer = self._last_buffer if self._buffer is None else self._buffer
        if buffer is None:
            msg = "FlaskTrace.buffer is made by init_app(app); call it first"
            raise RuntimeError(msg)
        return buffer

    @property
    def middleware(self) -> TraceMiddleware:
        """The middleware of the (single or last) app initialised."""
        tracers = list(self._tracers.values())
        if not tracers and self._last_buffer is not None:
            msg = (
                "the app FlaskTrace was initialised with no longer exists"
                " (FlaskTrace holds apps weakly); its traces are still in .buffer"
            )
            raise RuntimeError(msg)
        if not tracers:
            msg = "FlaskTrace.middleware is made by init_app(app); call it first"
            raise RuntimeError(msg)
        return tracers[-1].middleware

    @property
    def skipped(self) -> list[str]:
        """Phases left untraced because the app's class overrides them (or,
        on a Flask version other than 3.0 and 3.1, all of them).
        """
        return [p for t in self._tracers.values() for p in t.skipped]

    def init_app(self, app: Flask) -> None:
        """Install tracing on ``app``. Calling it again for the same app does
        nothing.

        :param app: The Flask app; its ``WSGITRACE_*`` config is read now.
        :raise RuntimeError: Another ``FlaskTrace`` already traces ``app``.
        :raise ConfigurationError: A bad option or ``WSGITRACE_*`` setting, or
            options given here for an app whose ``wsgi_app`` is already a
            :class:`~wsgitrace.TraceMiddleware`.
        """
        existing = app.extensions.get("wsgitrace")
        if existing is self and app in self._tracers:
            return
        if existing is not None and existing is not self:
            msg = f"{app!r} already has a FlaskTrace (app.extensions['wsgitrace'])"
            raise RuntimeError(msg)
        if not _phases_supported():
            warnings.warn(
                f"wsgitrace traces Flask's hooks by mirroring the request methods of"
                f" Flask {', '.join(_SUPPORTED)}; this is Flask {flask_version()}, so"
                " hooks are not traced (requests, signals with receivers, templates and"
                " logs still are)",
                WsgitraceWarning,
                stacklevel=2,
            )
        if isinstance(app.wsgi_app, TraceMiddleware):
            self._adopt(app, app.wsgi_app)
            return
        options = dict(self._options)
        name = env_name("exclude")
        if "exclude" not in options and name not in app.config and name not in os.environ:
            static = (app.static_url_path or "").rstrip("/")
            default_exclude = ["/favicon.ico"]
            if static and app.has_static_folder:
                default_exclude.insert(0, static + "/")
            options.setdefault("exclude", default_exclude)
        resolved = resolve_options(options, app.config)
        buffer = self._buffer
        if buffer is None:
            buffer = TraceBuffer(resolved.max_traces, resolved.max_bytes)
        app_ref = weakref.ref(app)

        def endpoint_auto() -> bool:
            traced = app_ref()
            return traced is not None and bool(traced.debug or traced.testing)

        original = app.wsgi_app
        inner: Any = original
        if getattr(original, "__self__", None) is app and "wsgi_app" not in vars(app):
            # The class's method: looked up on the class at each call.
            inner = _WeakWsgiApp(app)
        elif type(original) is types.MethodType and original.__self__ is app:
            # A method bound to the app and set on it: kept, held weakly. (A
            # wrapt wrapper set on the app also has __self__; it is kept as
            # it is, wrapper and all.)
            inner = _WeakWsgiApp(app, original.__func__)
        middleware = TraceMiddleware(
            inner,
            buffer,
            clock=self._clock,
            _config=app.config,
            _endpoint_auto=endpoint_auto,
            **options,
        )
        app.wsgi_app = middleware  # type: ignore[method-assign]
        self._record_hooks(app, middleware)

    def _record_hooks(self, app: Flask, middleware: TraceMiddleware) -> None:
        """Record the app's hooks, signals and logs into the traces of its
        middleware, and register the extension.
        """
        tracer = _AppTracer(self, app, middleware, middleware.clock)
        if middleware.enabled:
            # Disabled tracing leaves Flask's own methods in place, so the
            # only cost is the middleware's one attribute check.
            if _phases_supported():
                _install_phases(app, tracer)
            else:
                # Mirroring another version's methods could change what the
                # app does: they are left to Flask (see init_app's warning).
                tracer.skipped.extend(_PHASES)
            _connect_receivers(app, tracer)
            if middleware.options.capture_logs:
                _capture_logs(app, tracer, middleware.options.capture_logs)
        app.extensions["wsgitrace"] = self
        self._tracers[app] = tracer
        self._last_buffer = middleware.buffer

    def _adopt(self, app: Flask, middleware: TraceMiddleware) -> None:
        """Record hooks into the traces of the :class:`TraceMiddleware` the
        app's ``wsgi_app`` already is, instead of wrapping it in a second one
        (whose traces would hold no hooks).
        """
        if self._options:
            msg = (
                "app.wsgi_app is already a TraceMiddleware: give the options"
                f" ({', '.join(sorted(self._options))}) to it, not to FlaskTrace"
            )
            raise ConfigurationError(msg)
        if self._buffer is not None and self._buffer is not middleware.buffer:
            msg = (
                "app.wsgi_app is already a TraceMiddleware with a buffer of its own;"
                " FlaskTrace cannot use another one"
            )
            raise ConfigurationError(msg)
        self._record_hooks(app, middleware)

    def __repr__(self) -> str:
        apps = [app.name for app in list(self._tracers)]
        return f"<FlaskTrace {', '.join(map(repr, apps)) or 'no app'}>"

    def tracer_for(self, app: Flask) -> _AppTracer:
        """The per-app recording state (for diagnostics)."""
        return self._tracers[app]


def _phases_supported() -> bool:
    """Whether this Flask's request methods are those the shadowing phases
    mirror (Flask 3.0 and 3.1).
    """
    return ".".join(flask_version().split(".")[:2]) in _SUPPORTED


def flask_version() -> str:
    from importlib.metadata import version

    return version("flask")
