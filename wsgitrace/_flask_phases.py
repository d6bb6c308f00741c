"""The methods of a traced app that shadow Flask's own, one maker per phase.

::

    _install_phases(app, tracer)  # sets app.preprocess_request = ..., etc.

Each shadowing function runs the same registries in the same order as the
Flask 3.0/3.1 method of the same name, recording every hook through
:meth:`_AppTracer.run_hook`; a request that is not traced runs Flask's own.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import weakref
from collections.abc import Callable, Iterable
from itertools import chain
from types import FunctionType
from typing import TYPE_CHECKING, Any

import flask
from flask import Flask, signals
from flask.ctx import AppContext
from flask.ctx import _sentinel as _ctx_sentinel
from flask.globals import _cv_app
from flask.helpers import _split_blueprint_path
from flask.sansio.scaffold import _sentinel as _app_sentinel
from werkzeug.exceptions import BadRequestKeyError, HTTPException, InternalServerError
from werkzeug.routing import RoutingException

from ._flask_recorder import _SEND, _SIGNAL_KEYS
from ._flask_state import (
    _NO_G,
    _get_app_ctx,
    _get_request_ctx,
    _record_url_match,
    _snapshot_callers_g,
    _snapshot_g,
    _snapshot_session,
)
from ._internal import report_internal_error
from .context import _get_trace

if TYPE_CHECKING:
    from ._flask_recorder import _AppTracer

# Phases whose Flask methods are shadowed on the app. A phase whose method
# is not Flask's own (a subclass's override, a method set on the app, or
# Flask's patched by an APM agent) is left alone: it keeps running.
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
    "handle_http_exception",
    "handle_user_exception",
    "handle_exception",
    "app_context",
)


# Where Flask's own methods are defined (flask/app.py, flask/sansio/app.py).
_FLASK_DIR = os.path.dirname(os.path.abspath(flask.__file__))
_FLASK_DIRS = (_FLASK_DIR, os.path.join(_FLASK_DIR, "sansio"))


def _install_phases(app: Flask, tracer: _AppTracer) -> None:
    cls = type(app)
    for phase in _PHASES:
        if phase in vars(app) or not _is_flasks_own(getattr(cls, phase, None), phase):
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
        "handle_http_exception": _make_handle_http_exception,
        "handle_user_exception": _make_handle_user_exception,
        "handle_exception": _make_handle_exception,
        "app_context": _make_app_context,
    }
    for phase, make in makers.items():
        if phase not in tracer.skipped:
            setattr(app, phase, make(app, tracer))


def _is_flasks_own(func: object, phase: str) -> bool:
    """Whether ``func`` is the function Flask defines for ``phase``, not a
    replacement or a wrapper: wrapt's proxies are not plain functions, and
    a ``functools.wraps`` wrapper has Flask's names but not its code.
    """
    return _is_flask_function(func, f"Flask.{phase}", f"App.{phase}")


def _is_flask_function(func: object, *qualnames: str) -> bool:
    """Whether ``func`` is a plain function of Flask's own source named one
    of ``qualnames`` (see :func:`_is_flasks_own`).
    """
    return (
        type(func) is FunctionType
        and not hasattr(func, "__wrapped__")
        and os.path.dirname(func.__code__.co_filename) in _FLASK_DIRS
        and func.__qualname__ in qualnames
    )


# Each maker returns a function that mirrors Flask 3.0/3.1's method of the same
# name, recording as it goes. ``trace is None`` (a request that is not traced,
# or a call outside a request) runs Flask's own method.


def _make_full_dispatch_request(app: Flask, tracer: _AppTracer) -> Callable[[], flask.Response]:
    app_ref = weakref.ref(app)
    limits = tracer.limits
    send_signal = tracer.send_signal
    cls = type(app)
    own = cls.full_dispatch_request
    request_started = signals.request_started
    started_key = _SIGNAL_KEYS["signal:request-started"]

    def full_dispatch_request() -> flask.Response:
        app: Flask = app_ref()  # type: ignore[assignment]
        trace = _get_trace()
        if trace is None or trace._limits is not limits:
            return cls.full_dispatch_request(app)
        _record_url_match(tracer, trace)
        if cls.full_dispatch_request is not own:
            # Patched since (an agent's wrapper): it runs, and calls the
            # phases; the URL match, which redacts the path, is made here.
            return cls.full_dispatch_request(app)
        app._got_first_request = True
        try:
            send_signal(trace, app, request_started, started_key)
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
    cls = type(app)
    own = cls.preprocess_request
    run_hook = tracer.run_hook
    url_value_keys = tracer.hook_cache("url_value_preprocessor")
    before_keys = tracer.hook_cache("before_request")
    # The class's own full_dispatch_request (see _install_phases) does not
    # record the URL match, which redacts the path: it is made here.
    match_here = "full_dispatch_request" in tracer.skipped

    def preprocess_request() -> Any:
        app: Flask = app_ref()  # type: ignore[assignment]
        trace = _get_trace()
        ctx = _get_request_ctx(None)
        if (
            trace is None
            or trace._limits is not limits
            or ctx is None
            or cls.preprocess_request is not own
        ):
            return cls.preprocess_request(app)
        if match_here:
            _record_url_match(tracer, trace)
        request = ctx.request
        names = (None, *reversed(request.blueprints))
        g_dict = getattr(_get_app_ctx().g, "__dict__", _NO_G)

        for name in names:
            if name in app.url_value_preprocessors:
                for url_func in app.url_value_preprocessors[name]:
                    run_hook(
                        trace,
                        url_value_keys,
                        "url_value_preprocessor",
                        name,
                        url_func,
                        g_dict,
                        url_func,
                        request.endpoint,
                        request.view_args,
                    )

        for name in names:
            if name in app.before_request_funcs:
                for before_func in app.before_request_funcs[name]:
                    rv = run_hook(
                        trace,
                        before_keys,
                        "before_request",
                        name,
                        before_func,
                        g_dict,
                        app.ensure_sync(before_func),
                    )
                    if rv is not None:
                        return rv
        return None

    return preprocess_request


def _make_dispatch_request(app: Flask, tracer: _AppTracer) -> Callable[[], Any]:
    app_ref = weakref.ref(app)
    limits = tracer.limits
    cls = type(app)
    own = cls.dispatch_request
    run_hook = tracer.run_hook
    view_keys = tracer.hook_cache("view")

    def dispatch_request() -> Any:
        app: Flask = app_ref()  # type: ignore[assignment]
        trace = _get_trace()
        ctx = _get_request_ctx(None)
        if (
            trace is None
            or trace._limits is not limits
            or ctx is None
            or cls.dispatch_request is not own
        ):
            return cls.dispatch_request(app)
        req = ctx.request
        rule = req.url_rule
        if (
            req.routing_exception is not None
            or rule is None
            or (getattr(rule, "provide_automatic_options", False) and req.method == "OPTIONS")
        ):
            return cls.dispatch_request(app)
        view = app.view_functions.get(rule.endpoint)
        g_dict = getattr(_get_app_ctx().g, "__dict__", _NO_G)
        return run_hook(trace, view_keys, "view", rule.endpoint, view, g_dict, own, app)

    return dispatch_request


def _make_finalize_request(app: Flask, tracer: _AppTracer) -> Callable[..., flask.Response]:
    app_ref = weakref.ref(app)
    limits = tracer.limits
    send_signal = tracer.send_signal
    cls = type(app)
    own = cls.finalize_request
    request_finished = signals.request_finished
    finished_key = _SIGNAL_KEYS["signal:request-finished"]

    def finalize_request(rv: Any, from_error_handler: bool = False) -> flask.Response:
        app: Flask = app_ref()  # type: ignore[assignment]
        trace = _get_trace()
        if trace is None or trace._limits is not limits or cls.finalize_request is not own:
            return cls.finalize_request(app, rv, from_error_handler)
        response = app.make_response(rv)
        try:
            response = app.process_response(response)
            send_signal(trace, app, request_finished, finished_key, response=response)
        except Exception:
            if not from_error_handler:
                raise
            _log_finalizing_failed()(app)
        return response

    return finalize_request


_FINALIZING_FAILED = "Request finalizing failed with an error while handling an error"


@functools.cache
def _log_finalizing_failed() -> Callable[[Flask], None]:
    """Logs Flask's record of a failed finalizing (in the except block that
    caught the error) from a frame that reads as the line of
    ``Flask.finalize_request`` that logs it: a record says where it was
    made, and Flask's default log format shows it (``ERROR in app: ...``).
    Made on first use, from Flask's source.
    """

    def finalize_request(self: Flask) -> None:
        self.logger.exception(_FINALIZING_FAILED)

    try:
        own = Flask.finalize_request
        lines, first = inspect.getsourcelines(own)
        line = first + next(i for i, text in enumerate(lines) if ".logger.exception(" in text)
        # The call is on the line after the def: moved onto Flask's line.
        code = finalize_request.__code__.replace(
            co_filename=own.__code__.co_filename, co_firstlineno=line - 1
        )
        return FunctionType(code, finalize_request.__globals__)
    except Exception:  # no source (a frozen app): logged from here
        return finalize_request


def _make_process_response(app: Flask, tracer: _AppTracer) -> Callable[[Any], Any]:
    app_ref = weakref.ref(app)
    limits = tracer.limits
    cls = type(app)
    own = cls.process_response
    run_hook = tracer.run_hook
    after_keys = tracer.hook_cache("after_request")

    def process_response(response: Any) -> Any:
        app: Flask = app_ref()  # type: ignore[assignment]
        trace = _get_trace()
        ctx = _get_request_ctx(None)
        if (
            trace is None
            or trace._limits is not limits
            or ctx is None
            or cls.process_response is not own
        ):
            return cls.process_response(app, response)
        g_dict = getattr(_get_app_ctx().g, "__dict__", _NO_G)

        for func in ctx._after_request_functions:
            call = app.ensure_sync(func)
            kind = "after_request"
            response = run_hook(trace, after_keys, kind, None, func, g_dict, call, response)

        for name in chain(ctx.request.blueprints, (None,)):
            if name in app.after_request_funcs:
                for func in reversed(app.after_request_funcs[name]):
                    response = run_hook(
                        trace,
                        after_keys,
                        "after_request",
                        name,
                        func,
                        g_dict,
                        app.ensure_sync(func),
                        response,
                    )

        session: Any = ctx._session if hasattr(ctx, "_session") else ctx.session
        if not app.session_interface.is_null_session(session):
            app.session_interface.save_session(app, session, response)

        return response

    return process_response


def _make_do_teardown_request(app: Flask, tracer: _AppTracer) -> Callable[..., None]:
    app_ref = weakref.ref(app)
    limits = tracer.limits
    send_signal = tracer.send_signal
    cls = type(app)
    own = cls.do_teardown_request
    run_hook = tracer.run_hook
    teardown_keys = tracer.hook_cache("teardown_request")
    request_tearing_down = signals.request_tearing_down
    tearing_down_key = _SIGNAL_KEYS["signal:request-tearing-down"]

    def do_teardown_request(
        exc: BaseException | None = _app_sentinel,  # type: ignore[assignment]
    ) -> None:
        app: Flask = app_ref()  # type: ignore[assignment]
        trace = _get_trace()
        if exc is _app_sentinel:
            exc = sys.exc_info()[1]
        ctx = _get_request_ctx(None)
        if (
            trace is None
            or trace._limits is not limits
            or ctx is None
            or cls.do_teardown_request is not own
        ):
            return cls.do_teardown_request(app, exc)
        g_dict = getattr(_get_app_ctx().g, "__dict__", _NO_G)

        for name in chain(ctx.request.blueprints, (None,)):
            if name in app.teardown_request_funcs:
                for func in reversed(app.teardown_request_funcs[name]):
                    run_hook(
                        trace,
                        teardown_keys,
                        "teardown_request",
                        name,
                        func,
                        g_dict,
                        app.ensure_sync(func),
                        exc,
                    )

        _snapshot_session(tracer, trace)
        if type(_get_app_ctx(None)) is AppContext:
            _snapshot_callers_g(tracer, trace, ctx)
        send_signal(trace, app, request_tearing_down, tearing_down_key, exc=exc)
        return None

    return do_teardown_request


def _make_do_teardown_appcontext(app: Flask, tracer: _AppTracer) -> Callable[..., None]:
    app_ref = weakref.ref(app)
    limits = tracer.limits
    send_signal = tracer.send_signal
    cls = type(app)
    own = cls.do_teardown_appcontext
    run_hook = tracer.run_hook
    teardown_keys = tracer.hook_cache("teardown_appcontext")
    appcontext_tearing_down = signals.appcontext_tearing_down
    tearing_down_key = _SIGNAL_KEYS["signal:appcontext-tearing-down"]

    def do_teardown_appcontext(
        exc: BaseException | None = _app_sentinel,  # type: ignore[assignment]
    ) -> None:
        app: Flask = app_ref()  # type: ignore[assignment]
        trace = _get_trace()
        if exc is _app_sentinel:
            exc = sys.exc_info()[1]
        if trace is None or trace._limits is not limits or cls.do_teardown_appcontext is not own:
            return cls.do_teardown_appcontext(app, exc)
        g_dict = getattr(_get_app_ctx().g, "__dict__", _NO_G)

        for func in reversed(app.teardown_appcontext_funcs):
            run_hook(
                trace,
                teardown_keys,
                "teardown_appcontext",
                None,
                func,
                g_dict,
                app.ensure_sync(func),
                exc,
            )

        request_ctx = _get_request_ctx(None)
        if request_ctx is None or request_ctx.app is not app:
            # Else a context pushed inside a request of this app (whose own
            # is torn down once its request context is popped): not its g.
            _snapshot_g(tracer, trace)
        send_signal(trace, app, appcontext_tearing_down, tearing_down_key, exc=exc)
        return None

    return do_teardown_appcontext


def _make_update_template_context(
    app: Flask, tracer: _AppTracer
) -> Callable[[dict[str, Any]], None]:
    app_ref = weakref.ref(app)
    limits = tracer.limits
    cls = type(app)
    own = cls.update_template_context
    run_hook = tracer.run_hook
    processor_keys = tracer.hook_cache("context_processor")

    def update_template_context(context: dict[str, Any]) -> None:
        app: Flask = app_ref()  # type: ignore[assignment]
        trace = _get_trace()
        app_ctx = _get_app_ctx(None)
        # No app context (a body iterated after the request, without
        # stream_with_context): Flask's own runs the processors without one.
        if (
            trace is None
            or trace._limits is not limits
            or app_ctx is None
            or cls.update_template_context is not own
        ):
            return cls.update_template_context(app, context)
        names: Iterable[str | None] = (None,)
        ctx = _get_request_ctx(None)
        if ctx is not None:
            names = chain(names, reversed(ctx.request.blueprints))
        g_dict = getattr(app_ctx.g, "__dict__", _NO_G)
        orig_ctx = context.copy()
        for name in names:
            if name in app.template_context_processors:
                for func in app.template_context_processors[name]:
                    context.update(
                        run_hook(
                            trace,
                            processor_keys,
                            "context_processor",
                            name,
                            func,
                            g_dict,
                            app.ensure_sync(func),
                        )
                    )
        context.update(orig_ctx)
        return None

    return update_template_context


def _make_inject_url_defaults(
    app: Flask, tracer: _AppTracer
) -> Callable[[str, dict[str, Any]], None]:
    app_ref = weakref.ref(app)
    limits = tracer.limits
    cls = type(app)
    own = cls.inject_url_defaults
    run_hook = tracer.run_hook
    default_keys = tracer.hook_cache("url_defaults")

    def inject_url_defaults(endpoint: str, values: dict[str, Any]) -> None:
        app: Flask = app_ref()  # type: ignore[assignment]
        trace = _get_trace()
        if trace is None or trace._limits is not limits or cls.inject_url_defaults is not own:
            return cls.inject_url_defaults(app, endpoint, values)
        app_ctx = _get_app_ctx(None)
        if app_ctx is None:
            return cls.inject_url_defaults(app, endpoint, values)
        names: Iterable[str | None] = (None,)
        if "." in endpoint:
            names = chain(names, reversed(_split_blueprint_path(endpoint.rpartition(".")[0])))
        g_dict = getattr(app_ctx.g, "__dict__", _NO_G)
        for name in names:
            if name in app.url_default_functions:
                for func in app.url_default_functions[name]:
                    args = (endpoint, values)
                    run_hook(trace, default_keys, "url_defaults", name, func, g_dict, func, *args)
        return None

    return inject_url_defaults


def _make_handle_http_exception(app: Flask, tracer: _AppTracer) -> Callable[[Any], Any]:
    app_ref = weakref.ref(app)
    limits = tracer.limits
    cls = type(app)
    own = cls.handle_http_exception

    def handle_http_exception(e: HTTPException) -> Any:
        app: Flask = app_ref()  # type: ignore[assignment]
        trace = _get_trace()
        ctx = _get_request_ctx(None)
        if (
            trace is None
            or trace._limits is not limits
            or ctx is None
            or cls.handle_http_exception is not own
        ):
            return cls.handle_http_exception(app, e)
        if e.code is None:
            return e
        if isinstance(e, RoutingException):
            return e
        blueprints = ctx.request.blueprints
        handler = app._find_error_handler(e, blueprints)
        if handler is None:
            return e
        return tracer.run_error_handler(trace, app, handler, e, blueprints)

    return handle_http_exception


def _make_handle_user_exception(app: Flask, tracer: _AppTracer) -> Callable[[Exception], Any]:
    app_ref = weakref.ref(app)
    limits = tracer.limits
    cls = type(app)
    own = cls.handle_user_exception

    def handle_user_exception(e: Exception) -> Any:
        app: Flask = app_ref()  # type: ignore[assignment]
        trace = _get_trace()
        ctx = _get_request_ctx(None)
        if (
            trace is None
            or trace._limits is not limits
            or ctx is None
            or cls.handle_user_exception is not own
        ):
            return cls.handle_user_exception(app, e)
        if isinstance(e, BadRequestKeyError) and (
            app.debug or app.config["TRAP_BAD_REQUEST_ERRORS"]
        ):
            e.show_exception = True
        if isinstance(e, HTTPException) and not app.trap_http_exception(e):
            return app.handle_http_exception(e)
        blueprints = ctx.request.blueprints
        handler = app._find_error_handler(e, blueprints)
        if handler is None:
            raise  # the error being handled, as Flask does
        return tracer.run_error_handler(trace, app, handler, e, blueprints)

    return handle_user_exception


def _make_handle_exception(app: Flask, tracer: _AppTracer) -> Callable[[Exception], Any]:
    app_ref = weakref.ref(app)
    limits = tracer.limits
    cls = type(app)
    own = cls.handle_exception

    def handle_exception(e: Exception) -> Any:
        app: Flask = app_ref()  # type: ignore[assignment]
        trace = _get_trace()
        ctx = _get_request_ctx(None)
        if (
            trace is None
            or trace._limits is not limits
            or ctx is None
            or cls.handle_exception is not own
        ):
            return cls.handle_exception(app, e)
        exc_info = sys.exc_info()
        signals.got_request_exception.send(app, _async_wrapper=app.ensure_sync, exception=e)
        propagate = app.config["PROPAGATE_EXCEPTIONS"]
        if propagate is None:
            propagate = app.testing or app.debug
        if propagate:
            if exc_info[1] is e:
                raise  # the error being handled, as Flask does
            raise e
        app.log_exception(exc_info)
        server_error: Any = InternalServerError(original_exception=e)
        blueprints = ctx.request.blueprints
        handler = app._find_error_handler(server_error, blueprints)
        if handler is not None:
            server_error = tracer.run_error_handler(trace, app, handler, server_error, blueprints)
        return app.finalize_request(server_error, from_error_handler=True)

    return handle_exception


def _make_app_context(app: Flask, tracer: _AppTracer) -> Callable[[], AppContext]:
    app_ref = weakref.ref(app)
    limits = tracer.limits
    clock = tracer.clock
    pushed_key = _SIGNAL_KEYS["signal:appcontext-pushed"]
    popped_key = _SIGNAL_KEYS["signal:appcontext-popped"]
    # Flask's own push and pop, which the traced ones mirror while they are
    # in place. One that an agent put in their place, before this app was
    # traced or since, is always called (None is never AppContext's method).
    push = AppContext.push if _is_flask_function(AppContext.push, "AppContext.push") else None
    pop = AppContext.pop if _is_flask_function(AppContext.pop, "AppContext.pop") else None
    pushed = signals.appcontext_pushed
    popped = signals.appcontext_popped
    cls = type(app)
    own = cls.app_context

    class TracedAppContext(AppContext):
        """Records ``appcontext_pushed`` / ``appcontext_popped`` where Flask
        sends them (at the end of :meth:`push` and :meth:`pop`).

        While Flask's own methods are in place and a signal has no receiver
        at all, they run as Flask 3.0/3.1 writes them, minus that send,
        which would call nothing (as in :meth:`_AppTracer.send_signal`).
        :meth:`pop` asks after the teardown, just before Flask's send.
        """

        def push(self) -> None:
            trace = _get_trace()
            if trace is None or trace._limits is not limits:
                return AppContext.push(self)
            start = clock()
            if (
                pushed.receivers
                or AppContext.push is not push
                or "send" in pushed.__dict__
                or type(pushed).send is not _SEND
            ):
                AppContext.push(self)
            else:
                self._cv_tokens.append(_cv_app.set(self))
            try:
                trace.record_key(pushed_key, start, clock())
            except Exception:
                report_internal_error("flask.signal", trace)
            return None

        def pop(self, exc: BaseException | None = _ctx_sentinel) -> None:  # type: ignore[assignment]
            trace = _get_trace()
            if exc is _ctx_sentinel:
                exc = sys.exc_info()[1]
            if trace is None or trace._limits is not limits:
                return AppContext.pop(self, exc)
            if AppContext.pop is not pop:
                AppContext.pop(self, exc)
            else:
                try:
                    if len(self._cv_tokens) == 1:
                        self.app.do_teardown_appcontext(exc)
                finally:
                    current = _cv_app.get()
                    _cv_app.reset(self._cv_tokens.pop())
                if current is not self:
                    msg = f"Popped wrong app context. ({current!r} instead of {self!r})"
                    raise AssertionError(msg)
                # Asked after the teardown, as Flask's send is made: a
                # teardown_appcontext function may connect a receiver.
                if popped.receivers or "send" in popped.__dict__ or type(popped).send is not _SEND:
                    popped.send(self.app, _async_wrapper=self.app.ensure_sync)
            now = clock()
            try:
                trace.record_key(popped_key, now, now)
            except Exception:
                report_internal_error("flask.signal", trace)
            return None

    def app_context() -> AppContext:
        app: Flask = app_ref()  # type: ignore[assignment]
        trace = _get_trace()
        if trace is None or trace._limits is not limits or cls.app_context is not own:
            # Not traced (not sampled, or no request), or the class's method
            # was replaced since: what the app's class makes.
            return cls.app_context(app)
        return TracedAppContext(app)

    return app_context
