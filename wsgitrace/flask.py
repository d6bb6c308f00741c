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
and take one clock reading per hook, instead of wrapping every hook function
or connecting a blinker receiver per signal (each would cost about a
microsecond per event). Signals are recorded where Flask sends them;
the rarer ones (``got_request_exception``, template and flash signals) are
recorded by receivers connected for this app only, strongly referenced.
A method that the app's class overrides is left alone (its phase is
listed in :attr:`FlaskTrace.skipped`), so subclass behaviour is kept.

The extension holds the app only weakly and creates no reference cycle
through it.
"""

from __future__ import annotations

import logging
import sys
import warnings
import weakref
from collections.abc import Callable, Iterable
from itertools import chain
from typing import TYPE_CHECKING, Any

import flask
from flask import Flask, signals
from flask.ctx import AppContext
from flask.ctx import _sentinel as _ctx_sentinel
from flask.globals import _cv_app, _cv_request, request_ctx
from flask.helpers import _split_blueprint_path
from flask.sansio.scaffold import _sentinel as _app_sentinel

from .buffer import TraceBuffer
from .config import env_name, resolve_options
from .context import _current_trace
from .exceptions import WsgitraceWarning
from .middleware import TraceMiddleware, report_internal_error
from .redact import REDACTED
from .trace import EventKey, Trace, cut, format_error

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

    from ._types import Clock

__all__ = ["FlaskTrace"]

_MISSING = object()

_URL_MATCH_KEY: EventKey = ("url_match", "url_match", None)

# Shared keys of the signals sent on every request (no attributes).
_SIGNAL_KEYS: dict[str, EventKey] = {
    name: ("signal", name, None)
    for name in (
        "signal:request-started",
        "signal:request-finished",
        "signal:request-tearing-down",
        "signal:appcontext-pushed",
        "signal:appcontext-tearing-down",
        "signal:appcontext-popped",
    )
}
#: Traces with a template render in progress kept per app (see _template_starts).
_MAX_PENDING_TEMPLATES = 256
_SUPPORTED = ("3.0", "3.1")

# Phases whose Flask methods are shadowed, with the Flask function each
# replaces; a class that overrides one keeps its own.
_PHASES = (
    "full_dispatch_request",
    "preprocess_request",
    "dispatch_request",
    "finalize_request",
    "process_response",
    "do_teardown_request",
    "do_teardown_appcontext",
    "update_template_context",
    "inject_url_defaults",
    "_find_error_handler",
    "app_context",
)


class _WeakWsgiApp:
    """Calls ``Flask.wsgi_app`` of an app held weakly, so that
    ``app.wsgi_app = TraceMiddleware(...)`` adds no reference cycle.
    """

    __slots__ = ("_app", "_func")

    def __init__(self, app: Flask, func: Callable[..., Iterable[bytes]]) -> None:
        self._app = weakref.ref(app)
        self._func = func

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        app = self._app()
        if app is None:  # pragma: no cover - the app is gone but still called
            msg = "the Flask app traced by wsgitrace no longer exists"
            raise RuntimeError(msg)
        return self._func(app, environ, start_response)

    def __repr__(self) -> str:
        return f"<wsgi_app of {self._app()!r}>"


def _function_name(func: Any) -> str:
    name = getattr(func, "__name__", None)
    if isinstance(name, str):
        return name
    inner = getattr(func, "func", None)  # functools.partial
    if inner is not None:
        return _function_name(inner)
    return type(func).__name__


class _AppTracer:
    """Per-app recording state; holds the app only weakly."""

    def __init__(
        self, ext: FlaskTrace, app: Flask, middleware: TraceMiddleware, clock: Clock
    ) -> None:
        self.ext = ext
        self.app_ref = weakref.ref(app)
        self.middleware = middleware
        self.clock = clock
        self.session_values = middleware.options.session_values
        self.max_string = middleware.limits.max_string
        # Traces made by this app's middleware carry these limits: a trace of
        # another app (one app served inside another's request) is left alone.
        self.limits = middleware.limits
        self._hook_info: dict[tuple[str, str | None, int], tuple[EventKey, Any]] = {}
        self._view_info: dict[str, tuple[EventKey, Any]] = {}
        self._changed_keys: dict[tuple[Any, ...], tuple[EventKey, EventKey]] = {}
        # id(trace) -> (trace, starts of renders not finished yet); the trace
        # is kept to tell a reused id apart, the size is capped because a
        # render that raises never pops its start.
        self._template_starts: dict[int, tuple[Trace, list[int]]] = {}
        self.skipped: list[str] = []
        self.receivers: list[tuple[Any, Callable[..., None]]] = []

    # -- naming -------------------------------------------------------------

    def hook_info(self, kind: str, blueprint: str | None, func: Any) -> EventKey:
        """The shared event key (kind, name, static attributes) of a hook."""
        key = (kind, blueprint, id(func))
        info = self._hook_info.get(key)
        if info is not None and info[1]() is func:
            return info[0]
        try:
            short = _function_name(func)
            attrs = {
                "blueprint": blueprint,
                "qualname": getattr(func, "__qualname__", short),
                "module": getattr(func, "__module__", None),
            }
        except Exception:
            # A callable whose attributes raise: named by its type.
            report_internal_error("flask.hook_info")
            short = type(func).__name__
            attrs = {"blueprint": blueprint, "qualname": short, "module": None}
        name = f"{kind}:{blueprint}.{short}" if blueprint else f"{kind}:{short}"
        try:
            ref: Any = weakref.ref(func)
        except TypeError:
            # Not weak-referenceable (rare); a strong reference cannot hold the
            # app because such objects are not closures.
            ref = _Strong(func)
        event_key: EventKey = (kind, name, attrs)
        if len(self._hook_info) < 4096:
            self._hook_info[key] = (event_key, ref)
        return event_key

    # -- the hook runner ----------------------------------------------------

    def view_info(self, endpoint: str, view: Any) -> EventKey:
        """The shared event key ``view:<endpoint>`` of a view."""
        info = self._view_info.get(endpoint)
        if info is not None and info[1]() is view:
            return info[0]
        blueprint = endpoint.rpartition(".")[0] or None
        try:
            attrs = {
                "blueprint": blueprint,
                "endpoint": endpoint,
                "qualname": getattr(view, "__qualname__", _function_name(view)),
                "module": getattr(view, "__module__", None),
            }
        except Exception:
            # A callable whose attributes raise: named by its type.
            report_internal_error("flask.view_info")
            attrs = {"blueprint": blueprint, "endpoint": endpoint, "qualname": type(view).__name__}
        try:
            ref: Any = weakref.ref(view)
        except TypeError:
            ref = _Strong(view)
        event_key: EventKey = ("view", f"view:{endpoint}", attrs)
        if len(self._view_info) < 4096:
            self._view_info[endpoint] = (event_key, ref)
        return event_key

    def run_hook(
        self,
        trace: Trace,
        kind: str,
        info: EventKey,
        call: Callable[..., Any],
        *args: Any,
    ) -> Any:
        """Call ``call(*args)`` (the hook, as Flask would) and record it as
        ``info`` (name and static attributes).
        """
        app_ctx = _cv_app.get(None)
        g_dict = app_ctx.g.__dict__ if app_ctx is not None else None
        before = dict(g_dict) if g_dict else None
        clock = self.clock
        try:
            start = clock()
        except Exception:
            report_internal_error("flask.clock", trace)
            return call(*args)
        try:
            rv = call(*args)
        except BaseException as exc:
            self.after_hook(trace, kind, info, start, before, g_dict, None, exc)
            raise
        try:
            end = clock()
            unchanged = _g_changes(before, g_dict) is None if (before or g_dict) else True
            if unchanged and (rv is None or kind != "before_request"):
                # The common case: one shared key, no attributes built.
                trace.record_key(info, start, end)
                return rv
        except Exception:
            report_internal_error("flask.hook", trace)
            return rv
        self.after_hook(trace, kind, info, start, before, g_dict, rv, None, end)
        return rv

    def after_hook(
        self,
        trace: Trace,
        kind: str,
        info: EventKey,
        start: int,
        before: dict[str, Any] | None,
        g_dict: dict[str, Any] | None,
        rv: Any,
        exc: BaseException | None,
        end: int | None = None,
    ) -> None:
        try:
            if end is None:
                end = self.clock()
            _, name, attrs = info
            extra = _g_changes(before, g_dict)
            if kind == "before_request" and rv is not None:
                extra = extra or {}
                extra["short_circuit"] = True
                extra["returned"] = type(rv).__name__
            if exc is not None:
                extra = extra or {}
                extra["error"] = type(exc).__name__
            if not extra:
                trace.record_key(info, start, end)
            elif exc is None:
                trace.record_key(self._changed_key(info, extra), start, end)
            else:
                trace.record(kind, name, start, end, {**(attrs or {}), **extra})
        except Exception:
            report_internal_error("flask.hook", trace)

    def _changed_key(self, info: EventKey, extra: dict[str, Any]) -> EventKey:
        """The key of a hook event with state changes. A hook usually makes
        the same change on every request (``load_user`` sets ``g.user``), so
        keys are shared rather than built per request.
        """
        signature = (
            id(info),
            tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in extra.items()),
        )
        cached = self._changed_keys.get(signature)
        if cached is not None and cached[0] is info:
            return cached[1]
        kind, name, attrs = info
        key: EventKey = (kind, name, {**(attrs or {}), **extra})
        if len(self._changed_keys) < 4096:
            self._changed_keys[signature] = (info, key)
        return key

    def send_signal(self, trace: Trace, app: Flask, signal: Any, name: str, **kwargs: Any) -> None:
        """Send a Flask signal exactly as Flask does and record it, with the
        time its receivers took. The send's own errors propagate, as in Flask.
        """
        try:
            start: int | None = self.clock()
        except Exception:
            start = None
        signal.send(app, _async_wrapper=app.ensure_sync, **kwargs)
        self.signal(trace, name, start)

    def signal(
        self, trace: Trace, name: str, start: int | None, attrs: dict[str, Any] | None = None
    ) -> None:
        try:
            end = self.clock()
            key = _SIGNAL_KEYS.get(name) if attrs is None else None
            if key is None:
                key = ("signal", name, attrs)
            trace.record_key(key, end if start is None else start, end)
        except Exception:
            report_internal_error("flask.signal", trace)

    # -- state --------------------------------------------------------------

    def url_match(self, trace: Trace) -> None:
        try:
            ctx = _cv_request.get(None)
            if ctx is None:
                return
            req = ctx.request
            now = self.clock()
            error = req.routing_exception
            if error is not None:
                attrs: dict[str, Any] = {"error": type(error).__name__}
                code = getattr(error, "code", None)
                if code is not None:
                    attrs["code"] = code
                new_url = getattr(error, "new_url", None)
                if new_url:
                    attrs["redirect"] = cut(str(new_url), self.max_string)
                trace.record("url_match", "url_match", now, now, attrs)
                return
            rule = req.url_rule
            if rule is not None:
                trace.endpoint = rule.endpoint
                trace.rule = rule.rule
            if req.view_args:
                limit = self.max_string
                trace.view_args = {k: _view_arg(v, limit) for k, v in req.view_args.items()}
            trace.record_key(_URL_MATCH_KEY, now, now)
        except Exception:
            report_internal_error("flask.url_match", trace)

    def snapshot_session(self, trace: Trace) -> None:
        try:
            ctx = _cv_request.get(None)
            if ctx is None:
                return
            # Flask 3.1 keeps it in ``_session`` behind a property that marks
            # it accessed; Flask 3.0 in a plain ``session`` attribute.
            session = getattr(ctx, "_session", None) or vars(ctx).get("session")
            if not session:
                return
            keys = [str(k) for k in dict.keys(session)]
            trace.session_keys = [cut(k, self.max_string) for k in keys[:64]]
            if self.session_values:
                is_secret = self.middleware.redactor.is_secret
                values = {}
                for key in keys[:64]:
                    value = dict.__getitem__(session, key)
                    values[key] = REDACTED if is_secret(key) else _safe_repr(value, self.max_string)
                trace.record("session", "session", self.clock(), self.clock(), {"values": values})
        except Exception:
            report_internal_error("flask.session", trace)

    def snapshot_g(self, trace: Trace) -> None:
        try:
            app_ctx = _cv_app.get(None)
            if app_ctx is None:
                return
            g_dict = app_ctx.g.__dict__
            if not g_dict:
                return
            is_secret = self.middleware.redactor.is_secret
            snapshot = {}
            for key, value in list(g_dict.items())[:64]:
                snapshot[cut(str(key), self.max_string)] = (
                    REDACTED if is_secret(str(key)) else _safe_repr(value, self.max_string)
                )
            trace.g = snapshot
        except Exception:
            report_internal_error("flask.g", trace)


class _Strong:
    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __call__(self) -> Any:
        return self.obj


def _view_arg(value: Any, limit: int) -> Any:
    """A view argument as kept on the trace: numbers as they are, text cut,
    anything else (a converter's object, which may hold the app or a
    database session) as its cut repr, taken now, inside the request.
    """
    if value is None or type(value) in (int, float, bool):
        return value
    if type(value) is str:
        return cut(value, limit)
    return _safe_repr(value, limit)


def _safe_repr(value: Any, limit: int) -> str:
    try:
        text = repr(value)
    except Exception as exc:
        text = f"<repr failed: {type(exc).__name__}>"
    return cut(text, limit)


def _g_changes(
    before: dict[str, Any] | None, after: dict[str, Any] | None
) -> dict[str, Any] | None:
    """Keys of ``g`` added, changed (by identity) or removed by a hook."""
    if not after:
        return {"g_removed": sorted(before)} if before else None
    if before is None:
        return {"g_added": list(after)}
    if len(before) == len(after):
        for key, value in before.items():
            if after.get(key, _MISSING) is not value:
                break
        else:
            return None
    changes: dict[str, Any] = {}
    added = [k for k in after if k not in before]
    changed = [k for k in after if k in before and after[k] is not before[k]]
    removed = [k for k in before if k not in after]
    if added:
        changes["g_added"] = added
    if changed:
        changes["g_changed"] = changed
    if removed:
        changes["g_removed"] = removed
    return changes or None


class FlaskTrace:
    """Trace every request of a Flask app: hooks, signals, URL matching,
    ``g`` and session state, templates, on top of :class:`TraceMiddleware`.

    Options come from keywords, then ``app.config["WSGITRACE_*"]``, then
    ``WSGITRACE_*`` environment variables. The ``/_trace`` endpoint is on
    when the app is in debug or testing mode (checked per request) unless
    ``endpoint`` says otherwise.

    :param app: The app, or ``None`` to call :meth:`init_app` later.
    :param buffer: Share a buffer; one is made from the options otherwise.
    :param clock: Nanosecond clock for every timestamp.
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
        self._clock = clock
        self._tracers: weakref.WeakKeyDictionary[Flask, _AppTracer] = weakref.WeakKeyDictionary()
        if app is not None:
            self.init_app(app)

    @property
    def buffer(self) -> TraceBuffer:
        """The :class:`TraceBuffer` shared by every app this extension traces."""
        if self._buffer is None:
            msg = "FlaskTrace.buffer is made by init_app(app); call it first"
            raise RuntimeError(msg)
        return self._buffer

    @property
    def middleware(self) -> TraceMiddleware:
        """The middleware of the (single or last) app initialised."""
        tracers = list(self._tracers.values())
        if not tracers:
            msg = "FlaskTrace.middleware is made by init_app(app); call it first"
            raise RuntimeError(msg)
        return tracers[-1].middleware

    @property
    def skipped(self) -> list[str]:
        """Phases left untraced because the app's class overrides them."""
        return [p for t in self._tracers.values() for p in t.skipped]

    def init_app(self, app: Flask) -> None:
        """Install tracing on ``app``. Calling it again for the same app does
        nothing.
        """
        existing = app.extensions.get("wsgitrace")
        if existing is self and app in self._tracers:
            return
        if existing is not None and existing is not self:
            msg = "this app already has a FlaskTrace (app.extensions['wsgitrace'])"
            raise RuntimeError(msg)
        version = ".".join(flask_version().split(".")[:2])
        if version not in _SUPPORTED:
            warnings.warn(
                f"wsgitrace's hook tracing was written for Flask {', '.join(_SUPPORTED)};"
                f" this is Flask {flask_version()}: check the traces",
                WsgitraceWarning,
                stacklevel=2,
            )
        options = dict(self._options)
        if "exclude" not in options and env_name("exclude") not in app.config:
            static = (app.static_url_path or "").rstrip("/")
            default_exclude = ["/favicon.ico"]
            if static and app.has_static_folder:
                default_exclude.insert(0, static + "/")
            options.setdefault("exclude", default_exclude)
        resolved = resolve_options(options, app.config)
        if self._buffer is None:
            self._buffer = TraceBuffer(resolved.max_traces, resolved.max_bytes)
        app_ref = weakref.ref(app)

        def endpoint_auto() -> bool:
            traced = app_ref()
            return traced is not None and bool(traced.debug or traced.testing)

        original = app.wsgi_app
        inner: Any = original
        if getattr(original, "__self__", None) is app:
            inner = _WeakWsgiApp(app, original.__func__)  # type: ignore[attr-defined]
        middleware = TraceMiddleware(
            inner,
            self._buffer,
            clock=self._clock,
            _config=app.config,
            _endpoint_auto=endpoint_auto,
            **options,
        )
        tracer = _AppTracer(self, app, middleware, middleware.clock)
        if resolved.enabled:
            # Disabled tracing leaves Flask's own methods in place, so the
            # only cost is the middleware's one attribute check.
            _install_phases(app, tracer)
            _connect_receivers(app, tracer)
            if resolved.capture_logs:
                _capture_logs(app, tracer, resolved.capture_logs)
        app.wsgi_app = middleware  # type: ignore[method-assign]
        app.extensions["wsgitrace"] = self
        self._tracers[app] = tracer

    def tracer_for(self, app: Flask) -> _AppTracer:
        """The per-app recording state (for diagnostics)."""
        return self._tracers[app]


def flask_version() -> str:
    from importlib.metadata import version

    return version("flask")


def _install_phases(app: Flask, tracer: _AppTracer) -> None:
    cls = type(app)
    for phase in _PHASES:
        if getattr(cls, phase) is not getattr(Flask, phase):
            tracer.skipped.append(phase)
    makers: dict[str, Callable[[Flask, _AppTracer], Callable[..., Any]]] = {
        "full_dispatch_request": _make_full_dispatch_request,
        "preprocess_request": _make_preprocess_request,
        "dispatch_request": _make_dispatch_request,
        "finalize_request": _make_finalize_request,
        "process_response": _make_process_response,
        "do_teardown_request": _make_do_teardown_request,
        "do_teardown_appcontext": _make_do_teardown_appcontext,
        "update_template_context": _make_update_template_context,
        "inject_url_defaults": _make_inject_url_defaults,
        "_find_error_handler": _make_find_error_handler,
        "app_context": _make_app_context,
    }
    for phase, make in makers.items():
        if phase not in tracer.skipped:
            setattr(app, phase, make(app, tracer))


# Each maker returns a function that mirrors Flask 3.0/3.1's method of the same
# name, recording as it goes. ``trace is None`` (a request that is not traced,
# or a call outside a request) runs Flask's own method.


def _make_full_dispatch_request(app: Flask, tracer: _AppTracer) -> Callable[[], flask.Response]:
    app_ref = weakref.ref(app)
    limits = tracer.limits
    original = Flask.full_dispatch_request

    def full_dispatch_request() -> flask.Response:
        app: Flask = app_ref()  # type: ignore[assignment]
        trace = _current_trace.get()
        if trace is None or trace._limits is not limits:
            return original(app)
        tracer.url_match(trace)
        app._got_first_request = True
        try:
            tracer.send_signal(trace, app, signals.request_started, "signal:request-started")
            rv = app.preprocess_request()
            if rv is None:
                rv = app.dispatch_request()
        except Exception as e:
            rv = app.handle_user_exception(e)
        return app.finalize_request(rv)

    return full_dispatch_request


def _make_preprocess_request(app: Flask, tracer: _AppTracer) -> Callable[[], Any]:
    app_ref = weakref.ref(app)
    limits = tracer.limits
    original = Flask.preprocess_request
    run_hook = tracer.run_hook
    hook_info = tracer.hook_info

    def preprocess_request() -> Any:
        app: Flask = app_ref()  # type: ignore[assignment]
        trace = _current_trace.get()
        if trace is None or trace._limits is not limits:
            return original(app)
        request = flask.request
        names = (None, *reversed(request.blueprints))

        for name in names:
            if name in app.url_value_preprocessors:
                for url_func in app.url_value_preprocessors[name]:
                    run_hook(
                        trace,
                        "url_value_preprocessor",
                        hook_info("url_value_preprocessor", name, url_func),
                        url_func,
                        request.endpoint,
                        request.view_args,
                    )

        for name in names:
            if name in app.before_request_funcs:
                for before_func in app.before_request_funcs[name]:
                    rv = run_hook(
                        trace,
                        "before_request",
                        hook_info("before_request", name, before_func),
                        app.ensure_sync(before_func),
                    )
                    if rv is not None:
                        return rv
        return None

    return preprocess_request


def _make_dispatch_request(app: Flask, tracer: _AppTracer) -> Callable[[], Any]:
    app_ref = weakref.ref(app)
    limits = tracer.limits
    original = Flask.dispatch_request
    run_hook = tracer.run_hook

    def dispatch_request() -> Any:
        app: Flask = app_ref()  # type: ignore[assignment]
        trace = _current_trace.get()
        if trace is None or trace._limits is not limits:
            return original(app)
        req = request_ctx.request
        rule = req.url_rule
        if (
            req.routing_exception is not None
            or rule is None
            or (getattr(rule, "provide_automatic_options", False) and req.method == "OPTIONS")
        ):
            return original(app)
        info = tracer.view_info(rule.endpoint, app.view_functions.get(rule.endpoint))
        return run_hook(trace, "view", info, original, app)

    return dispatch_request


def _make_finalize_request(app: Flask, tracer: _AppTracer) -> Callable[..., flask.Response]:
    app_ref = weakref.ref(app)
    limits = tracer.limits
    original = Flask.finalize_request

    def finalize_request(rv: Any, from_error_handler: bool = False) -> flask.Response:
        app: Flask = app_ref()  # type: ignore[assignment]
        trace = _current_trace.get()
        if trace is None or trace._limits is not limits:
            return original(app, rv, from_error_handler)
        response = app.make_response(rv)
        try:
            response = app.process_response(response)
            tracer.send_signal(
                trace, app, signals.request_finished, "signal:request-finished", response=response
            )
        except Exception:
            if not from_error_handler:
                raise
            app.logger.exception("Request finalizing failed with an error while handling an error")
        return response

    return finalize_request


def _make_process_response(app: Flask, tracer: _AppTracer) -> Callable[[Any], Any]:
    app_ref = weakref.ref(app)
    limits = tracer.limits
    original = Flask.process_response
    run_hook = tracer.run_hook
    hook_info = tracer.hook_info

    def process_response(response: Any) -> Any:
        app: Flask = app_ref()  # type: ignore[assignment]
        trace = _current_trace.get()
        if trace is None or trace._limits is not limits:
            return original(app, response)
        ctx = request_ctx._get_current_object()  # type: ignore[attr-defined]

        for func in ctx._after_request_functions:
            info = hook_info("after_request", None, func)
            response = run_hook(trace, "after_request", info, app.ensure_sync(func), response)

        for name in chain(flask.request.blueprints, (None,)):
            if name in app.after_request_funcs:
                for func in reversed(app.after_request_funcs[name]):
                    info = hook_info("after_request", name, func)
                    response = run_hook(
                        trace, "after_request", info, app.ensure_sync(func), response
                    )

        session = ctx._session if hasattr(ctx, "_session") else ctx.session
        if not app.session_interface.is_null_session(session):
            app.session_interface.save_session(app, session, response)

        return response

    return process_response


def _make_do_teardown_request(app: Flask, tracer: _AppTracer) -> Callable[..., None]:
    app_ref = weakref.ref(app)
    limits = tracer.limits
    original = Flask.do_teardown_request
    run_hook = tracer.run_hook
    hook_info = tracer.hook_info

    def do_teardown_request(
        exc: BaseException | None = _app_sentinel,  # type: ignore[assignment]
    ) -> None:
        app: Flask = app_ref()  # type: ignore[assignment]
        trace = _current_trace.get()
        if exc is _app_sentinel:
            exc = sys.exc_info()[1]
        if trace is None or trace._limits is not limits:
            return original(app, exc)

        for name in chain(flask.request.blueprints, (None,)):
            if name in app.teardown_request_funcs:
                for func in reversed(app.teardown_request_funcs[name]):
                    info = hook_info("teardown_request", name, func)
                    run_hook(trace, "teardown_request", info, app.ensure_sync(func), exc)

        tracer.snapshot_session(trace)
        tracer.send_signal(
            trace, app, signals.request_tearing_down, "signal:request-tearing-down", exc=exc
        )
        return None

    return do_teardown_request


def _make_do_teardown_appcontext(app: Flask, tracer: _AppTracer) -> Callable[..., None]:
    app_ref = weakref.ref(app)
    limits = tracer.limits
    original = Flask.do_teardown_appcontext
    run_hook = tracer.run_hook
    hook_info = tracer.hook_info

    def do_teardown_appcontext(
        exc: BaseException | None = _app_sentinel,  # type: ignore[assignment]
    ) -> None:
        app: Flask = app_ref()  # type: ignore[assignment]
        trace = _current_trace.get()
        if exc is _app_sentinel:
            exc = sys.exc_info()[1]
        if trace is None or trace._limits is not limits:
            return original(app, exc)

        for func in reversed(app.teardown_appcontext_funcs):
            info = hook_info("teardown_appcontext", None, func)
            run_hook(trace, "teardown_appcontext", info, app.ensure_sync(func), exc)

        tracer.snapshot_g(trace)
        tracer.send_signal(
            trace, app, signals.appcontext_tearing_down, "signal:appcontext-tearing-down", exc=exc
        )
        return None

    return do_teardown_appcontext


def _make_update_template_context(
    app: Flask, tracer: _AppTracer
) -> Callable[[dict[str, Any]], None]:
    app_ref = weakref.ref(app)
    limits = tracer.limits
    original = Flask.update_template_context
    run_hook = tracer.run_hook
    hook_info = tracer.hook_info

    def update_template_context(context: dict[str, Any]) -> None:
        app: Flask = app_ref()  # type: ignore[assignment]
        trace = _current_trace.get()
        if trace is None or trace._limits is not limits:
            return original(app, context)
        names: Iterable[str | None] = (None,)
        request = flask.request
        if request:
            names = chain(names, reversed(request.blueprints))
        orig_ctx = context.copy()
        for name in names:
            if name in app.template_context_processors:
                for func in app.template_context_processors[name]:
                    info = hook_info("context_processor", name, func)
                    context.update(
                        run_hook(trace, "context_processor", info, app.ensure_sync(func))
                    )
        context.update(orig_ctx)
        return None

    return update_template_context


def _make_inject_url_defaults(
    app: Flask, tracer: _AppTracer
) -> Callable[[str, dict[str, Any]], None]:
    app_ref = weakref.ref(app)
    limits = tracer.limits
    original = Flask.inject_url_defaults
    run_hook = tracer.run_hook
    hook_info = tracer.hook_info

    def inject_url_defaults(endpoint: str, values: dict[str, Any]) -> None:
        app: Flask = app_ref()  # type: ignore[assignment]
        trace = _current_trace.get()
        if trace is None or trace._limits is not limits:
            return original(app, endpoint, values)
        names: Iterable[str | None] = (None,)
        if "." in endpoint:
            names = chain(names, reversed(_split_blueprint_path(endpoint.rpartition(".")[0])))
        for name in names:
            if name in app.url_default_functions:
                for func in app.url_default_functions[name]:
                    info = hook_info("url_defaults", name, func)
                    run_hook(trace, "url_defaults", info, func, endpoint, values)
        return None

    return inject_url_defaults


def _make_find_error_handler(app: Flask, tracer: _AppTracer) -> Callable[..., Any]:
    app_ref = weakref.ref(app)
    limits = tracer.limits
    original = Flask._find_error_handler

    def _find_error_handler(e: Exception, blueprints: list[str]) -> Any:
        app: Flask = app_ref()  # type: ignore[assignment]
        handler = original(app, e, blueprints)
        trace = _current_trace.get()
        if handler is None or trace is None or trace._limits is not limits:
            return handler
        blueprint = _handler_blueprint(app, handler, blueprints)
        return _RecordingErrorHandler(tracer, trace, handler, blueprint, app.ensure_sync)

    return _find_error_handler


def _handler_blueprint(app: Flask, handler: Any, blueprints: list[str]) -> str | None:
    for name in (*blueprints, None):
        for handler_map in app.error_handler_spec.get(name, {}).values():
            if any(h is handler for h in handler_map.values()):
                return name
    return None


class _RecordingErrorHandler:
    """Runs an error handler the way Flask does and records which exception
    it handled.
    """

    __slots__ = ("blueprint", "ensure_sync", "handler", "trace", "tracer")

    def __init__(
        self,
        tracer: _AppTracer,
        trace: Trace,
        handler: Any,
        blueprint: str | None,
        ensure_sync: Callable[[Any], Callable[..., Any]],
    ) -> None:
        self.tracer = tracer
        self.trace = trace
        self.handler = handler
        self.blueprint = blueprint
        self.ensure_sync = ensure_sync

    def __call__(self, e: Exception) -> Any:
        tracer = self.tracer
        try:
            start = tracer.clock()
        except Exception:
            report_internal_error("flask.clock", self.trace)
            return self.ensure_sync(self.handler)(e)
        try:
            rv = self.ensure_sync(self.handler)(e)
        except BaseException as exc:
            self._record(start, e, exc)
            raise
        self._record(start, e, None)
        return rv

    def _record(self, start: int, handled: Exception, exc: BaseException | None) -> None:
        try:
            _, name, attrs = self.tracer.hook_info("errorhandler", self.blueprint, self.handler)
            extra: dict[str, Any] = {"exception": type(handled).__name__}
            code = getattr(handled, "code", None)
            if code is not None:
                extra["code"] = code
            if exc is not None:
                extra["error"] = type(exc).__name__
            self.trace.record(
                "errorhandler", name, start, self.tracer.clock(), {**(attrs or {}), **extra}
            )
        except Exception:
            report_internal_error("flask.errorhandler", self.trace)


def _make_app_context(app: Flask, tracer: _AppTracer) -> Callable[[], AppContext]:
    app_ref = weakref.ref(app)
    limits = tracer.limits
    clock = tracer.clock

    class TracedAppContext(AppContext):
        """Records ``appcontext_pushed`` / ``appcontext_popped`` where Flask
        sends them (at the end of :meth:`push` and :meth:`pop`).
        """

        def push(self) -> None:
            trace = _current_trace.get()
            if trace is None or trace._limits is not limits:
                return super().push()
            try:
                start: int | None = clock()
            except Exception:
                start = None
            super().push()
            tracer.signal(trace, "signal:appcontext-pushed", start)
            return None

        def pop(self, exc: BaseException | None = _ctx_sentinel) -> None:  # type: ignore[assignment]
            trace = _current_trace.get()
            if exc is _ctx_sentinel:
                exc = sys.exc_info()[1]
            super().pop(exc)
            if trace is not None and trace._limits is limits:
                tracer.signal(trace, "signal:appcontext-popped", None)

    def app_context() -> AppContext:
        return TracedAppContext(app_ref())  # type: ignore[arg-type]

    return app_context


def _connect_receivers(app: Flask, tracer: _AppTracer) -> None:
    clock = tracer.clock
    limits = tracer.limits
    starts = tracer._template_starts

    def _on_got_request_exception(sender: Any, exception: BaseException, **_: Any) -> None:
        trace = _current_trace.get()
        if trace is None or trace._limits is not limits:
            return
        try:
            now = clock()
            trace.record(
                "signal",
                "signal:got-request-exception",
                now,
                now,
                {"exception": type(exception).__name__},
            )
            if trace.error is None:
                trace.error = format_error(exception, "view", trace.limits)
        except Exception:
            report_internal_error("flask.got_request_exception", trace)

    def _on_before_render_template(sender: Any, template: Any, **_: Any) -> None:
        trace = _current_trace.get()
        if trace is None or trace._limits is not limits:
            return
        try:
            now = clock()
            trace.record(
                "signal", "signal:before-render-template", now, now, {"template": template.name}
            )
            entry = starts.get(id(trace))
            if entry is None or entry[0] is not trace:
                if len(starts) >= _MAX_PENDING_TEMPLATES:
                    starts.pop(next(iter(starts)), None)
                entry = starts[id(trace)] = (trace, [])
            entry[1].append(now)
        except Exception:
            report_internal_error("flask.before_render_template", trace)

    def _on_template_rendered(sender: Any, template: Any, **_: Any) -> None:
        trace = _current_trace.get()
        if trace is None or trace._limits is not limits:
            return
        try:
            now = clock()
            entry = starts.get(id(trace))
            pending = entry[1] if entry is not None and entry[0] is trace else None
            start = pending.pop() if pending else now
            if pending == []:
                starts.pop(id(trace), None)
            name = template.name or "<string>"
            trace.record("template", f"template:{name}", start, now, {"template": name})
            trace.record("signal", "signal:template-rendered", now, now, {"template": name})
        except Exception:
            report_internal_error("flask.template_rendered", trace)

    def _on_message_flashed(sender: Any, message: Any, category: Any, **_: Any) -> None:
        trace = _current_trace.get()
        if trace is None or trace._limits is not limits:
            return
        try:
            now = clock()
            trace.record("signal", "signal:message-flashed", now, now, {"category": str(category)})
        except Exception:
            report_internal_error("flask.message_flashed", trace)

    pairs: list[tuple[Any, Callable[..., None]]] = [
        (signals.got_request_exception, _on_got_request_exception),
        (signals.before_render_template, _on_before_render_template),
        (signals.template_rendered, _on_template_rendered),
        (signals.message_flashed, _on_message_flashed),
    ]
    for signal, receiver in pairs:
        signal.connect(receiver, sender=app, weak=False)
    tracer.receivers = pairs


class _LogCapture(logging.Handler):
    """Adds the records that reach ``app.logger`` during a traced request of
    this app to its trace, as ``log:<level>`` events (at most ``limit`` per
    trace). It formats nothing but the record's message, and emits nothing.
    """

    def __init__(self, tracer: _AppTracer, limit: int) -> None:
        super().__init__()
        self._limits = tracer.limits
        self._clock = tracer.clock
        self._limit = limit
        self._max_string = tracer.max_string

    def emit(self, record: logging.LogRecord) -> None:
        trace = _current_trace.get()
        if trace is None or trace._limits is not self._limits:
            return
        try:
            if sum(1 for key in trace._keys if key[0] == "log") >= self._limit:
                trace.note_truncated("logs")
                return
            now = self._clock()
            attrs = {
                "level": record.levelname,
                "logger": record.name,
                "message": cut(record.getMessage(), self._max_string),
            }
            if record.exc_info and record.exc_info[0] is not None:
                attrs["exc_type"] = record.exc_info[0].__name__
            trace.record("log", f"log:{record.levelname.lower()}", now, now, attrs)
        except Exception:
            report_internal_error("flask.log", trace)


def _capture_logs(app: Flask, tracer: _AppTracer, limit: int) -> None:
    # Reading app.logger first lets Flask add its default handler exactly as
    # it would without us (it checks for existing handlers when it makes it).
    logger = app.logger
    handler = _LogCapture(tracer, limit)
    logger.addHandler(handler)
    # The logger outlives the app (logging keeps it): detach with the app.
    weakref.finalize(app, logger.removeHandler, handler)
