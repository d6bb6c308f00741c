"""Per-app recording state of :class:`~wsgitrace.flask.FlaskTrace`.

::

    tracer = FlaskTrace(app).tracer_for(app)
    cache = tracer.hook_cache("before_request")
    tracer.run_hook(trace, cache, "before_request", None, func, g_dict, func)

:class:`_AppTracer` names hooks and views with shared event keys, runs a hook
with one clock reading either side and records the keys of ``g`` it changed,
sends and records signals, and records which error handler ran. The URL
match, the session and ``g`` are read by :mod:`wsgitrace._flask_state`;
the phases (:mod:`wsgitrace._flask_phases`) call both where Flask runs them.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from types import FunctionType
from typing import TYPE_CHECKING, Any

from blinker import Signal

from ._flask_state import _MISSING, _bounded_changes, _g_changes
from ._internal import report_internal_error
from .trace import EventKey, Trace


def _blinkers_send() -> object:
    """``Signal.send`` if it is blinker's own, else an object no method is
    (one replaced before this module was imported is then always called).
    """
    send = Signal.send
    if (
        type(send) is FunctionType
        and not hasattr(send, "__wrapped__")
        and send.__module__ == Signal.__module__
        and send.__qualname__ == "Signal.send"
    ):
        return send
    return object()


# Looked up once: send_signal skips a send that blinker's own would make a no-op.
_SEND = _blinkers_send()

if TYPE_CHECKING:
    from flask import Flask

    from ._types import Clock
    from .flask import FlaskTrace
    from .middleware import TraceMiddleware

_get_ident = threading.get_ident

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


def _function_name(func: Any) -> str:
    name = getattr(func, "__name__", None)
    if isinstance(name, str):
        return name
    inner = getattr(func, "func", None)  # functools.partial
    if inner is not None:
        return _function_name(inner)
    return type(func).__name__


class _AppTracer:
    """Per-app recording state; holds the app, and its middleware (which may
    hold the app, through a wrapper made before ``init_app``), only weakly.
    """

    def __init__(
        self, ext: FlaskTrace, app: Flask, middleware: TraceMiddleware, clock: Clock
    ) -> None:
        self.ext = ext
        self.app_ref = weakref.ref(app)
        self._middleware_ref = weakref.ref(middleware)
        self.redactor = middleware.redactor
        self.clock = clock
        self.session_values = middleware.options.session_values
        self.max_string = middleware.limits.max_string
        # Traces made by this app's middleware carry these limits: a trace of
        # another app (one app served inside another's request) is left alone.
        self.limits = middleware.limits
        self._hook_info: dict[tuple[str, str | None, int], tuple[EventKey, Any]] = {}
        # kind -> id(func) -> (weak reference, blueprint, key): looked up per hook.
        self._hook_caches: dict[str, dict[int, tuple[Any, str | None, EventKey]]] = {}
        self._view_info: dict[str, tuple[EventKey, Any]] = {}
        self._changed_keys: dict[tuple[Any, ...], tuple[EventKey, EventKey]] = {}
        # (id(hook key), *keys added to an empty g) -> (hook key, its event key)
        self._added_keys: dict[tuple[Any, ...], tuple[EventKey, EventKey]] = {}
        # id(trace) -> (trace, starts of renders not finished yet); the trace
        # is kept to tell a reused id apart, the size is capped because a
        # render that raises never pops its start.
        self._template_starts: dict[int, tuple[Trace, list[int]]] = {}
        self.skipped: list[str] = []
        self.receivers: list[tuple[Any, Callable[..., None]]] = []

    @property
    def middleware(self) -> TraceMiddleware:
        """The app's :class:`TraceMiddleware` (alive as long as the app is)."""
        middleware = self._middleware_ref()
        if middleware is None:
            msg = "the traced app and its middleware no longer exist"
            raise RuntimeError(msg)
        return middleware

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

    def hook_cache(self, kind: str) -> dict[int, tuple[Any, str | None, EventKey]]:
        """The cache :meth:`hook_key` uses for hooks of one kind."""
        return self._hook_caches.setdefault(kind, {})

    def hook_key(
        self,
        cache: dict[int, tuple[Any, str | None, EventKey]],
        kind: str,
        blueprint: str | None,
        func: Any,
    ) -> EventKey:
        """:meth:`hook_info` through a per-kind cache keyed by ``id(func)``
        (one lookup per hook on the request path).
        """
        entry = cache.get(id(func))
        if entry is not None and entry[0]() is func and entry[1] == blueprint:
            return entry[2]
        if kind == "view":
            # Views are named by endpoint, passed in place of the blueprint.
            key = self.view_info(blueprint or "", func)
        else:
            key = self.hook_info(kind, blueprint, func)
        try:
            ref: Any = weakref.ref(func)
        except TypeError:
            ref = _Strong(func)
        if len(cache) < 4096:
            cache[id(func)] = (ref, blueprint, key)
        return key

    # -- the hook runner ----------------------------------------------------

    def view_info(self, endpoint: str, view: Any) -> EventKey:
        """The shared event key ``view:<endpoint>`` of a view."""
        info = self._view_info.get(endpoint)
        if info is not None and info[1]() is view:
            return info[0]
        # Endpoints are strings, but Flask does not insist (an app may use a
        # tuple); such a view is named by the endpoint's str().
        if not isinstance(endpoint, str):
            endpoint = str(endpoint)
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
        cache: dict[int, tuple[Any, str | None, EventKey]],
        kind: str,
        blueprint: str | None,
        func: Any,
        g_dict: dict[str, Any],
        call: Callable[..., Any],
        *args: Any,
    ) -> Any:
        """Call ``call(*args)`` (the hook ``func``, as Flask would) and record
        it under its key from ``cache`` (see :meth:`hook_key`), with the keys
        of ``g`` (its ``__dict__``) it changed.
        """
        key: EventKey | None
        try:
            entry = cache.get(id(func))
            # For a view, ``blueprint`` is its endpoint: any hashable object.
            if entry is not None and entry[0]() is func and entry[1] == blueprint:
                key = entry[2]
            else:
                key = self.hook_key(cache, kind, blueprint, func)
        except Exception:
            report_internal_error("flask.hook_key", trace)
            key = None
        if key is None:
            # Never breaks the app: the hook runs, unrecorded, and outside
            # the except block, so that it sees no error of wsgitrace's as
            # the one being handled (sys.exc_info(), __context__).
            return call(*args)
        before = g_dict.copy() if g_dict else None
        clock = self.clock
        start = clock()
        try:
            rv = call(*args)
        except BaseException as exc:
            self.after_hook(trace, kind, key, start, before, g_dict, None, exc)
            raise
        end = clock()
        try:
            if before is None:
                unchanged = not g_dict
            elif len(before) != len(g_dict):
                unchanged = False
            else:
                unchanged = True
                for name, value in before.items():
                    if g_dict.get(name, _MISSING) is not value:
                        unchanged = False
                        break
            if rv is None or kind != "before_request":
                if not unchanged and before is None:
                    # Keys added to an empty g (``g.user = ...``): the same
                    # change on most requests, so its key is shared too.
                    added = self._added_keys.get((id(key), *g_dict))
                    if added is not None and added[0] is key:
                        key = added[1]
                        unchanged = True
                if unchanged:
                    # The common case: a shared key, recorded inline (what
                    # Trace.record_key does on the request's own thread).
                    keys = trace._keys
                    if (
                        trace._foreign is None
                        and len(keys) < trace._limits.event_room
                        and _get_ident() == trace.thread
                    ):
                        times = trace._times
                        times.append(start)
                        times.append(end)
                        keys.append(key)
                    else:
                        trace.record_key(key, start, end)
                    return rv
        except Exception:
            report_internal_error("flask.hook", trace)
            return rv
        self.after_hook(trace, kind, key, start, before, g_dict, rv, None, end)
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
                extra = _bounded_changes(extra, self.max_string) or extra
                trace.record(kind, name, start, end, {**(attrs or {}), **extra})
        except Exception:
            report_internal_error("flask.hook", trace)

    def _changed_key(self, info: EventKey, extra: dict[str, Any]) -> EventKey:
        """The key of a hook event with state changes. A hook usually makes
        the same change on every request (``load_user`` sets ``g.user``), so
        keys are shared rather than built per request.
        """
        signature = _signature(info, extra)
        cached = self._changed_keys.get(signature)
        if cached is not None and cached[0] is info:
            return cached[1]
        return self._new_changed_key(info, extra, signature)

    def _new_changed_key(
        self, info: EventKey, extra: dict[str, Any], signature: tuple[Any, ...]
    ) -> EventKey:
        """:meth:`_changed_key` for changes not cached yet. Names of ``g``
        keys over the caps (:func:`_bounded_changes`) are kept and cached
        bounded, under the bounded changes' signature; only changes within
        them are cached as they are, and keys added to an empty ``g`` are
        then looked up by :meth:`run_hook` as well.
        """
        bounded = _bounded_changes(extra, self.max_string)
        if bounded is not None:
            extra = bounded
            signature = _signature(info, extra)
            cached = self._changed_keys.get(signature)
            if cached is not None and cached[0] is info:
                return cached[1]
        kind, name, attrs = info
        key: EventKey = (kind, name, {**(attrs or {}), **extra})
        if len(self._changed_keys) < 4096:
            self._changed_keys[signature] = (info, key)
        if bounded is None and list(extra) == ["g_added"] and len(self._added_keys) < 4096:
            self._added_keys[(id(info), *extra["g_added"])] = (info, key)
        return key

    def send_signal(
        self,
        trace: Trace,
        app: Flask,
        signal: Any,
        key: EventKey,
        *,
        response: Any = _MISSING,
        exc: Any = _MISSING,
    ) -> None:
        """Send a Flask signal exactly as Flask does (its errors propagate, as
        in Flask), with Flask's ``response`` or ``exc`` argument when given,
        and record it under ``key``: with the time its receivers took, or as
        an instant (one clock reading) when it has none at all. A send that
        could call nothing (no receivers, blinker's own ``send``) is not
        made, as its result would be the same.
        """
        clock = self.clock
        if signal.receivers or "send" in signal.__dict__ or type(signal).send is not _SEND:
            start = clock() if signal.receivers else 0
            # Keywords spelt out: a call with **kwargs costs more than the send.
            if response is not _MISSING:
                signal.send(app, _async_wrapper=app.ensure_sync, response=response)
            elif exc is not _MISSING:
                signal.send(app, _async_wrapper=app.ensure_sync, exc=exc)
            else:
                signal.send(app, _async_wrapper=app.ensure_sync)
        else:
            # No receiver at all, and blinker's own send: Flask's call would
            # find nothing to run, so it is not made (a patched send is).
            start = 0
        try:
            end = clock()
            keys = trace._keys
            if (
                trace._foreign is None
                and len(keys) < trace._limits.event_room
                and _get_ident() == trace.thread
            ):
                # Trace.record_key's common case, inline (as in run_hook).
                times = trace._times
                times.append(start or end)
                times.append(end)
                keys.append(key)
            else:
                trace.record_key(key, start or end, end)
        except Exception:
            report_internal_error("flask.signal", trace)

    def run_error_handler(
        self, trace: Trace, app: Flask, handler: Any, error: Exception, blueprints: list[str]
    ) -> Any:
        """Call an error handler as Flask does (``app.ensure_sync(handler)(error)``)
        and record which one handled which exception.
        """
        call = app.ensure_sync(handler)
        start = self.clock()
        try:
            rv = call(error)
        except BaseException as exc:
            self._record_error_handler(trace, app, handler, error, blueprints, start, exc)
            raise
        self._record_error_handler(trace, app, handler, error, blueprints, start, None)
        return rv

    def _record_error_handler(
        self,
        trace: Trace,
        app: Flask,
        handler: Any,
        handled: Exception,
        blueprints: list[str],
        start: int,
        exc: BaseException | None,
    ) -> None:
        try:
            end = self.clock()
            blueprint = _handler_blueprint(app, handler, handled, blueprints)
            _, name, attrs = self.hook_info("errorhandler", blueprint, handler)
            extra: dict[str, Any] = {"exception": type(handled).__name__}
            code = getattr(handled, "code", None)
            if code is not None:
                extra["code"] = code
            if exc is not None:
                extra["error"] = type(exc).__name__
            trace.record("errorhandler", name, start, end, {**(attrs or {}), **extra})
        except Exception:
            report_internal_error("flask.errorhandler", trace)


def _handler_blueprint(
    app: Flask, handler: Any, error: Exception, blueprints: list[str]
) -> str | None:
    """Where ``handler`` was registered: the first registration in the
    order Flask's ``_find_error_handler`` searches (code, then class; the
    blueprints, then the app; the exception's MRO) that holds it.
    """
    exc_class, code = app._get_exc_class_and_code(type(error))
    names = (*blueprints, None)
    for c in (code, None) if code is not None else (None,):
        for name in names:
            handler_map = app.error_handler_spec.get(name, {}).get(c, {})
            for cls in exc_class.__mro__:
                if handler_map.get(cls) is handler:
                    return name
    return None


def _signature(info: EventKey, extra: dict[str, Any]) -> tuple[Any, ...]:
    """What the key of a hook with these changes is cached under."""
    return (id(info), tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in extra.items()))


class _Strong:
    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __call__(self) -> Any:
        return self.obj
