"""Serving for ``wsgitrace run`` and ``wsgitrace demo``.

::

    obj, label = load_app("myapp:create_app")     # imported; a factory is called
    app, middleware = traced(obj)                 # tracing installed if missing
    endpoint = TraceEndpoint(middleware.buffer, middleware.options)
    server = _serve(_EndpointFront(app, endpoint), "127.0.0.1", 5000, quiet=False,
                    prefix=endpoint.prefix)       # werkzeug's threaded server

The demo's traffic generator (:data:`DEMO_ROUND`, :func:`_traffic`) is here
too. Flask is imported only when the app being served is a Flask app.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import socket
import sys
import threading
import traceback
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from http.client import HTTPException
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import click

from ._client import _NoRedirect
from ._limits import BIDI_CONTROLS
from .endpoint import TraceEndpoint
from .exceptions import ConfigurationError

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

    from .middleware import TraceMiddleware
    from .redact import Redactor


class _EndpointFront:
    """Answers the endpoint's prefix with a :class:`TraceEndpoint` before the
    (traced) app, so ``run`` and ``demo`` can end its streams on shutdown.
    """

    def __init__(self, app: WSGIApplication, endpoint: TraceEndpoint) -> None:
        self.app = app
        self.endpoint = endpoint
        self.prefix = endpoint.prefix

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if _under(environ.get("PATH_INFO") or "/", self.prefix):
            return self.endpoint(environ, start_response)
        return self.app(environ, start_response)


def _under(path: str, prefix: str) -> bool:
    """Whether ``path`` is the endpoint's: ``prefix`` itself or below it."""
    return path.startswith(prefix) and path[len(prefix) : len(prefix) + 1] in ("", "/")


def _is_flask_app(obj: object) -> bool:
    """Whether ``obj`` is a Flask app (without importing Flask when the app's
    module did not).
    """
    flask = sys.modules.get("flask")
    flask_class = getattr(flask, "Flask", None)
    return isinstance(flask_class, type) and isinstance(obj, flask_class)


def _binds(obj: Any, *args: object, **kwargs: object) -> bool:
    """Whether ``obj``'s signature accepts ``args`` and ``kwargs`` (or it has
    none to check).
    """
    try:
        inspect.signature(obj).bind(*args, **kwargs)
    except TypeError:
        return False
    except ValueError:
        return True
    return True


def _is_factory(obj: Any) -> bool:
    return (inspect.isfunction(obj) or inspect.ismethod(obj)) and _binds(obj)


def _import_path(path: str) -> str:
    """Put the directory a ``.py`` file is imported from on ``sys.path`` and
    return the file's module name. A file inside a package (directories with
    an ``__init__.py``) is imported as part of it, as ``flask --app`` does,
    so its relative and package imports work.
    """
    path = os.path.abspath(path).removesuffix(".py")
    if os.path.basename(path) == "__init__":
        path = os.path.dirname(path)
    names: list[str] = []
    while True:
        path, name = os.path.split(path)
        names.append(name)
        if not os.path.exists(os.path.join(path, "__init__.py")):
            break
    sys.path.insert(0, path)
    return ".".join(reversed(names))


def _factory_call(attribute: str) -> tuple[str, tuple[Any, ...], dict[str, Any]] | None:
    """``name(args)`` as ``flask --app`` takes it: the name and its arguments,
    which must be Python literals; ``None`` for a plain name.

    :raise click.BadParameter: Not a call of a name, or an argument that is
        not a literal.
    """
    if "(" not in attribute:
        return None
    try:
        call = ast.parse(attribute.strip(), mode="eval").body
    except SyntaxError:
        call = None
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)):
        msg = f"{attribute!r} is neither a name nor a call of one, such as create_app('dev')"
        raise click.BadParameter(msg, param_hint="MODULE:APP")
    try:
        args = tuple(ast.literal_eval(arg) for arg in call.args)
        kwargs: dict[str, Any] = {}
        for keyword in call.keywords:
            if keyword.arg is None:  # **mapping
                raise ValueError(keyword)
            kwargs[keyword.arg] = ast.literal_eval(keyword.value)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        msg = f"the arguments of {attribute!r} must be Python literals (strings, numbers, ...)"
        raise click.BadParameter(msg, param_hint="MODULE:APP") from None
    return call.func.id, args, kwargs


class _AppCodeError(click.ClickException):
    """The app's own code raised while ``run`` imported it or called its
    factory: the error with the app's frames only, not the importer's.
    """

    def __init__(self, doing: str, exc: BaseException) -> None:
        tb = exc.__traceback__
        while tb is not None and _not_app_code(tb.tb_frame.f_code.co_filename):
            tb = tb.tb_next
        text = "".join(traceback.format_exception(type(exc), exc, tb)).rstrip("\n")
        super().__init__(f"{doing} raised an error in the app's own code:\n{text}")


def _not_app_code(filename: str) -> bool:
    """Whether a traceback's frame is this module's or the import machinery's."""
    return (
        filename == __file__
        or filename.startswith("<frozen importlib")
        or os.path.dirname(filename) == os.path.dirname(importlib.__file__ or "")
    )


def load_app(spec: str) -> tuple[Any, str]:
    """Import ``module:attribute`` (or ``path/to/file.py:attribute``) and return
    the object it names (an app factory is called) and a label.

    Without an attribute, ``app``, ``application``, ``create_app`` and
    ``make_app`` are tried in that order. As with ``flask --app``, the
    attribute may be a call with literal arguments: ``create_app("dev")``.
    """
    module_name, _, attribute = spec.partition(":")
    if not module_name.strip():
        msg = f"{spec!r} names no module: give one before the ':', such as myapp:app"
        raise click.BadParameter(msg, param_hint="MODULE:APP")
    if module_name.endswith(".py") or os.sep in module_name:
        module_name = _import_path(module_name)
    elif os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        # The module named (or a package above it) is missing, not one it imports.
        if exc.name and (module_name + ".").startswith(exc.name + "."):
            msg = f"cannot import {module_name!r}: {exc}"
            raise click.BadParameter(msg, param_hint="MODULE:APP") from None
        raise _AppCodeError(f"importing {module_name!r}", exc) from None
    except ConfigurationError:
        raise  # a WSGITRACE_* setting the app's own FlaskTrace(app) cannot use: one line
    except Exception as exc:
        raise _AppCodeError(f"importing {module_name!r}", exc) from None
    call = _factory_call(attribute)
    names = (
        [call[0] if call else attribute]
        if attribute
        else ["app", "application", "create_app", "make_app"]
    )
    for name in names:
        obj = getattr(module, name, None)
        if obj is not None:
            break
    else:
        msg = f"module {module_name!r} has no {' or '.join(repr(n) for n in names)}"
        raise click.BadParameter(msg, param_hint="MODULE:APP")
    label = f"{module_name}:{name}"
    # ``module:factory(...)`` calls whatever it names (a class, a partial)
    # with those arguments, as ``flask --app`` does: without the
    # parentheses, only a function that takes no arguments.
    if call is not None or _is_factory(obj):
        _, args, kwargs = call or (name, (), {})
        if not (callable(obj) and _binds(obj, *args, **kwargs)):
            what = "without arguments" if not (args or kwargs) else "with these arguments"
            msg = f"{label} is not an app factory callable {what}: {obj!r}"
            raise click.BadParameter(msg, param_hint="MODULE:APP")
        try:
            obj = obj(*args, **kwargs)
        except ConfigurationError:
            raise
        except Exception as exc:
            raise _AppCodeError(f"calling the app factory {label}", exc) from None
        label = f"{module_name}:{attribute.strip()}" if call is not None else label + "()"
    # A function that takes neither no arguments nor (environ,
    # start_response), such as ``create_app(config)``, would fail every request.
    function = inspect.isfunction(obj) or inspect.ismethod(obj)
    if not (callable(obj) or _is_flask_app(obj)) or (function and not _binds(obj, {}, None)):
        msg = f"{label} is not a WSGI app, a Flask app or an app factory: {obj!r}"
        raise click.BadParameter(msg, param_hint="MODULE:APP")
    return obj, label


class _AlreadyTracedError(Exception):
    """Options were given for an app whose own code installs tracing."""


def traced(
    obj: Any, options: Mapping[str, Any] | None = None
) -> tuple[WSGIApplication, TraceMiddleware]:
    """Install tracing on a Flask app or WSGI app (unless it already has it)
    and return the app to serve and the middleware that traces it.

    :param options: Keyword options for the tracing installed here.
    :raise _AlreadyTracedError: ``options`` were given, but the app already
        has tracing, set up by its own code.
    """
    from .middleware import TraceMiddleware

    options = dict(options or {})

    def already(where: str) -> None:
        if options:
            raise _AlreadyTracedError(where)

    if _is_flask_app(obj):
        ext = obj.extensions.get("wsgitrace")
        if ext is not None:
            already("FlaskTrace is in app.extensions")
        else:
            from .flask import FlaskTrace

            if isinstance(obj.wsgi_app, TraceMiddleware):
                already("app.wsgi_app is a TraceMiddleware")
                ext = FlaskTrace(obj)  # records hooks into that middleware's traces
            else:
                ext = FlaskTrace(obj, endpoint=False, **options)
        return obj, ext.middleware
    wsgi_app = getattr(obj, "wsgi_app", None)
    if isinstance(wsgi_app, TraceMiddleware):
        already("its wsgi_app is a TraceMiddleware")
        return obj, wsgi_app
    if isinstance(obj, TraceMiddleware):
        already("it is a TraceMiddleware")
        return obj, obj
    middleware = TraceMiddleware(obj, endpoint=False, **options)
    return middleware, middleware


def _serve(
    app: WSGIApplication,
    host: str,
    port: int,
    *,
    quiet: bool,
    prefix: str,
    redactor: Redactor | None = None,
) -> Any:
    """werkzeug's threaded server on ``host:port``. Raises :exc:`OSError`
    when it cannot listen there (werkzeug's own server would print and exit).

    :param redactor: When given, each request logged shows its query and
        path as its trace does, secrets redacted.
    """
    from werkzeug.serving import (
        LISTEN_QUEUE,
        WSGIRequestHandler,
        get_sockaddr,
        make_server,
        select_address_family,
    )

    class RequestHandler(WSGIRequestHandler):
        # werkzeug logs the path decoded, with C0 and C1 controls escaped;
        # the bidi controls that reorder what a terminal shows are escaped
        # too, as the viewers do (see wsgitrace.render.safe).
        _control_char_table = {  # noqa: RUF012 - werkzeug's, declared without ClassVar
            **WSGIRequestHandler._control_char_table,
            **_BIDI_ESCAPES,
        }

        def log(self, type: str, message: str, *args: Any) -> None:
            # werkzeug colours a request's line by its status even in a file
            # or a pipe; only a terminal gets the colours.
            if not _is_terminal(sys.stderr):
                args = tuple(_STYLE_RE.sub("", a) if isinstance(a, str) else a for a in args)
            super().log(type, message, *args)

        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            # No path when the request line could not be parsed (a 400).
            path = getattr(self, "path", "")
            if quiet or _under(urlsplit(path).path, prefix):
                return
            logged = path if redactor is None else _logged_path(self, path, redactor)
            if logged == path:
                super().log_request(code, size)
                return
            # werkzeug logs self.path: the redacted one, for this line only.
            self.path = logged
            try:
                super().log_request(code, size)
            finally:
                self.path = path

    family = select_address_family(host, port)
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(get_sockaddr(host, port, family))
        sock.listen(LISTEN_QUEUE)
        # werkzeug serves a duplicate of the descriptor; this one is closed.
        return make_server(
            host, port, app, threaded=True, request_handler=RequestHandler, fd=sock.fileno()
        )


#: The invisible bidi controls, escaped as ``\\u202e``.
_BIDI_ESCAPES = {ord(char): f"\\u{ord(char):04x}" for char in BIDI_CONTROLS}

#: The SGR sequences werkzeug colours a logged request line with.
_STYLE_RE = re.compile(r"\x1b\[[0-9;]*m")


def _is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is a terminal (a person reads it), safely."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def _logged_path(handler: Any, path: str, redactor: Redactor) -> str:
    """The request target ``path`` as ``run`` logs it: secret query values
    redacted, and the path as its trace has it when a secret view argument
    (``/reset/<token>``) was cut out of it.
    """
    from .redact import REDACTED
    from .trace import Trace

    base, sep, query = path.partition("?")
    environ = getattr(handler, "environ", None)
    trace = environ.get("wsgitrace.trace") if isinstance(environ, dict) else None
    if isinstance(trace, Trace) and REDACTED in trace.path:
        # The trace's path is PATH_INFO (bytes read as latin-1), unescaped.
        raw = trace.path.encode("latin-1", "replace")
        base = quote(raw, safe="/[]@:!$&'()*+,;=-._~")
    return f"{base}{sep}{redactor.query(query)}" if sep else base


def _base_url(host: str, port: int) -> str:
    # A wildcard address is no address to connect to (and the endpoint
    # refuses it as a Host): show the loopback address of its family.
    shown = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # noqa: S104
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


# -- the demo's traffic ---------------------------------------------------------


#: One round of the demo's traffic: method, path, headers.
DEMO_ROUND: tuple[tuple[str, str, dict[str, str]], ...] = (
    ("GET", "/", {}),
    ("GET", "/api/v1/items/tea", {}),
    ("GET", "/slow?ms=150", {}),
    ("GET", "/stream?n=5", {}),
    ("GET", "/admin/", {}),
    ("GET", "/admin/", {"X-User": "admin"}),
    ("GET", "/missing", {}),
    ("GET", "/api/v1/items/scones", {}),
    ("POST", "/", {}),
    ("GET", "/boom", {}),
)


def _send(base: str, method: str, path: str, headers: dict[str, str]) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())
    request = urllib.request.Request(base + path, method=method, headers=headers)  # noqa: S310
    try:
        with opener.open(request, timeout=10) as response:
            response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            exc.read()
    except (urllib.error.URLError, OSError, HTTPException):
        pass


def _traffic(base: str, stop: threading.Event, count: int | None, interval: float) -> int:
    """Send rounds of :data:`DEMO_ROUND` until ``stop`` (or ``count`` sent)."""
    sent = 0
    while not stop.is_set() and (count is None or sent < count):
        for method, path, headers in DEMO_ROUND:
            if stop.is_set() or (count is not None and sent >= count):
                break
            _send(base, method, path, headers)
            sent += 1
            stop.wait(interval)
    return sent
