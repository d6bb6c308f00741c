"""The ``wsgitrace`` command: watch, inspect and serve traced apps.

::

    wsgitrace demo                        # the example app, traced, with traffic
    wsgitrace run myapp:app               # serve an unmodified app, traced
    wsgitrace tail                        # follow http://127.0.0.1:5000/_trace
    wsgitrace tail -v --status 5xx        # with each trace's timeline
    wsgitrace tail --json | jq .path      # one summary per line
    wsgitrace show 3f9a1c2b7d4e-2a        # one trace's full timeline

``tail --store PATH`` and ``show --store PATH`` read a SQLite trace store
(:mod:`wsgitrace.store`) directly, with the endpoint's semantics, so they see
the traces of every worker process of a server on this host.

``tail`` and ``show`` read the ``/_trace`` endpoint over HTTP (a URL whose
path is empty or ``/`` gets ``/_trace`` appended). ``tail`` long-polls it
with ``since=<cursor>``, so it neither skips nor repeats a trace, and when the
server restarts it waits for it and resumes. A token comes from
``--token-file``, ``WSGITRACE_TOKEN_FILE`` or ``WSGITRACE_TOKEN`` (``--token``
works too, but argv is visible to other users). The HTTP client never uses a
proxy for loopback addresses and never follows redirects, so the token goes
nowhere else.

Rendering is in :mod:`wsgitrace.render`. Output is coloured, with a status
line, only when a person is watching (a terminal); ``--json`` writes only
JSON to stdout and every message to stderr.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import ipaddress
import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from http.client import HTTPException
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import click
from rich.console import Console
from rich.live import Live
from rich.text import Text

from . import __version__
from .endpoint import MAX_WAIT, SETTLE_SECONDS, TraceEndpoint, _BadQueryError, _parse_query
from .exceptions import StoreError
from .render import build_timeline, build_trace_table, safe
from .trace import Trace

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

    from .buffer import TraceBuffer
    from .config import Options

__all__ = ["main"]

DEFAULT_URL = "http://127.0.0.1:5000"
DEFAULT_PREFIX = "/_trace"
_RETRY_SECONDS = 1.0


# -- talking to /_trace ---------------------------------------------------------


class _UnreachableError(Exception):
    """The server did not answer (refused, reset, timed out)."""


class _NotFoundError(Exception):
    """The server answered 404: endpoint off, refused, or no such trace."""


class _BadAnswerError(Exception):
    """The server answered something else than the endpoint's JSON."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Never follow a redirect (it could carry the token elsewhere)."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def endpoint_url(url: str) -> str:
    """The endpoint's URL for a base or endpoint URL: ``http://host:5000``
    and ``http://host:5000/`` become ``http://host:5000/_trace``.
    """
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        msg = f"not an http(s) URL: {url!r}"
        raise click.BadParameter(msg, param_hint="URL")
    path = parts.path if parts.path not in ("", "/") else DEFAULT_PREFIX
    return urlunsplit((parts.scheme, parts.netloc, path.rstrip("/"), "", ""))


def _is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Client:
    """A small JSON client for one ``/_trace`` URL."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 10.0) -> None:
        self.url = endpoint_url(url)
        self.timeout = timeout
        self._headers = {"Accept": "application/json", "User-Agent": f"wsgitrace/{__version__}"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        handlers: list[urllib.request.BaseHandler] = [_NoRedirect()]
        if _is_loopback_host(urlsplit(self.url).hostname):
            handlers.append(urllib.request.ProxyHandler({}))
        self._opener = urllib.request.build_opener(*handlers)

    def get(self, sub: str = "", params: Mapping[str, Any] | None = None, **kw: Any) -> Any:
        """GET ``<url>/<sub>?<params>`` and decode its JSON."""
        url = self.url + (f"/{quote(sub, safe='')}" if sub else "")
        if params:
            url += "?" + urlencode({k: v for k, v in params.items() if v is not None})
        request = urllib.request.Request(url, headers=self._headers)  # noqa: S310 - http(s) only
        timeout = kw.get("timeout", self.timeout)
        try:
            with self._opener.open(request, timeout=timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                detail = exc.read(4096)
            if exc.code == 404:
                raise _NotFoundError from None
            raise _BadAnswerError(_error_detail(exc.code, detail)) from None
        except (urllib.error.URLError, OSError, HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            raise _UnreachableError(str(reason) or type(reason).__name__) from None
        try:
            return json.loads(body)
        except ValueError:
            msg = "the server's answer is not JSON (is this a wsgitrace endpoint?)"
            raise _BadAnswerError(msg) from None


class _StoreClient:
    """Answers like :class:`_Client`, from a trace store file: the endpoint's
    listing, run here on the store.
    """

    def __init__(self, path: str) -> None:
        from .buffer import TraceBuffer
        from .config import Options
        from .store import TraceStore

        self.url = path
        self.store = TraceStore(path, create=False)
        self.endpoint = TraceEndpoint(TraceBuffer(1), Options(), source=self.store)

    def get(self, sub: str = "", params: Mapping[str, Any] | None = None, **kw: Any) -> Any:
        """What ``GET /_trace[/<sub>]?<params>`` would answer."""
        query = urlencode({k: v for k, v in (params or {}).items() if v is not None})
        try:
            if sub:
                trace = self.store.get(sub)
                if trace is None:
                    raise _NotFoundError
                return trace.to_dict()
            return self.endpoint.listing(_parse_query(query, self.endpoint.limit_cap))
        except _BadQueryError as exc:
            raise _BadAnswerError(exc.message) from None
        except StoreError as exc:
            text = str(exc)
            if "locked" in text or "no wsgitrace trace store" in text:
                raise _UnreachableError(text) from None
            raise _BadAnswerError(text) from None


def _make_client(url: str, store: str | None, token: str | None) -> _Client | _StoreClient:
    if store is not None:
        return _StoreClient(store)
    return _Client(url, token)


def _error_detail(code: int, body: bytes) -> str:
    try:
        message = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        message = ""
    return f"HTTP {code}" + (f": {message}" if message else "")


def _read_token(token: str | None, token_file: str | None) -> str | None:
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as f:
                value = f.read().strip()
        except OSError as exc:
            msg = f"cannot read the token file: {exc.strerror}"
            raise click.BadParameter(msg, param_hint="--token-file") from None
        if not value:
            raise click.BadParameter("the token file is empty", param_hint="--token-file")
        return value
    return token or None


# -- output ---------------------------------------------------------------------


def _console(*, stderr: bool = False) -> Console:
    return Console(stderr=stderr, highlight=False, markup=False, emoji=False)


def _message(console: Console, text: str, style: str = "") -> None:
    """Print one of our own messages (never markup; request text escaped)."""
    console.print(Text(safe(text, newlines=True), style=style), soft_wrap=True)


class _View:
    """Where followed traces go."""

    shown = 0

    def start(self) -> None:
        """Called once before the first batch."""

    def stop(self) -> None:
        """Called once at the end."""

    def traces(self, items: list[dict[str, Any]]) -> None:
        raise NotImplementedError

    def message(self, text: str, style: str = "") -> None:
        raise NotImplementedError

    def status(self, text: str) -> None:
        """A one-line state (shown only to a person watching)."""


class _JsonView(_View):
    """One JSON object per line on stdout, flushed; messages on stderr."""

    def __init__(self) -> None:
        self._err = _console(stderr=True)

    def traces(self, items: list[dict[str, Any]]) -> None:
        out = sys.stdout
        for item in items:
            out.write(json.dumps(item, ensure_ascii=True) + "\n")
            out.flush()
        self.shown += len(items)

    def message(self, text: str, style: str = "") -> None:
        _message(self._err, text, style)


class _HumanView(_View):
    """Rows (and timelines with ``verbose``) on stdout; a status line when
    stdout is a terminal, messages there too, else on stderr.
    """

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.console = _console()
        self._tty = self.console.is_terminal
        self._err = self.console if self._tty else _console(stderr=True)
        self._live: Live | None = None
        self._header_done = False

    def start(self) -> None:
        if self._tty:
            self._live = Live(
                Text(""),
                console=self.console,
                auto_refresh=False,
                transient=True,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._live.start()

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def traces(self, items: list[dict[str, Any]]) -> None:
        with _interrupts.deferred():
            self._print(items)

    def _print(self, items: list[dict[str, Any]]) -> None:
        console = self.console
        show_id = console.width >= 110
        if not self.verbose:
            if not self._header_done:
                console.print(build_trace_table([], show_id=show_id))
                self._header_done = True
            console.print(build_trace_table(items, show_header=False, show_id=show_id))
        else:
            bar_width = max(8, min(24, (console.width - 60) // 2))
            for item in items:
                console.print(build_timeline(Trace.from_dict(item), bar_width=bar_width))
                console.print()
        self.shown += len(items)
        if self._live is not None:
            self._live.refresh()

    def message(self, text: str, style: str = "") -> None:
        with _interrupts.deferred():
            _message(self._err, text, style)

    def status(self, text: str) -> None:
        if self._live is not None:
            with _interrupts.deferred():
                self._live.update(Text(safe(text), style="dim"), refresh=True)


# -- following ------------------------------------------------------------------


@dataclasses.dataclass
class _Follow:
    """Follows ``/_trace`` with long-polls, resuming across restarts."""

    client: _Client | _StoreClient
    view: _View
    filters: dict[str, Any]
    lines: int
    full: bool
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    wait: float = MAX_WAIT
    cursor: int | None = None
    instance: str | None = None
    dropped: int | None = None
    missed: int = 0

    def run(self) -> int:
        """Follow until :attr:`stop` is set; the exit status."""
        view = self.view
        down = False
        view.start()
        try:
            while not self.stop.is_set():
                try:
                    page = self._poll()
                except _UnreachableError as exc:
                    if not down:
                        view.message(
                            f"cannot reach {self.client.url} ({exc}); is the app running?"
                            " Retrying until it is (Ctrl-C to stop).",
                            "yellow",
                        )
                        down = True
                    view.status(f"waiting for {self.client.url} …")
                    self.stop.wait(_RETRY_SECONDS)
                    continue
                except _NotFoundError:
                    view.message(_not_found_message(self.client.url), "bold red")
                    return 1
                except _BadAnswerError as exc:
                    view.message(f"{self.client.url}: {exc}", "bold red")
                    return 2
                if down:
                    view.message(f"reconnected to {self.client.url}", "green")
                    down = False
                if page is not None:
                    self._show(page)
        finally:
            view.stop()
            if self.instance is not None:
                view.message(
                    f"{view.shown} traces shown, {self.missed} missed (evicted before tail read"
                    f" them); the server's buffer has dropped {self.dropped or 0} traces in all",
                    "dim",
                )
        return 0

    def _poll(self) -> dict[str, Any] | None:
        params: dict[str, Any] = dict(self.filters)
        if self.full:
            params["full"] = 1
        if self.cursor is None:
            params["limit"] = self.lines
            page: dict[str, Any] = self.client.get(params=params)
            page["traces"].reverse()  # oldest first
        else:
            # Full traces are ~15 times the size of summaries: smaller pages.
            params.update(since=self.cursor, wait=self.wait, limit=200 if self.full else 1000)
            timeout = self.wait + SETTLE_SECONDS + 15
            page = self.client.get(params=params, timeout=timeout)
            page["traces"].reverse()
        instance = page.get("instance")
        if self.instance is not None and instance != self.instance:
            self.view.message(
                "the server restarted; following the new process from its first trace", "yellow"
            )
            self.instance = instance
            self.cursor = 0
            self.dropped = None
            return None
        self.instance = instance
        return page

    def _show(self, page: dict[str, Any]) -> None:
        view = self.view
        traces = page["traces"]
        dropped = int(page.get("dropped") or 0)
        if self.dropped is None and dropped:
            view.message(f"the server's buffer has dropped {dropped} traces so far", "dim")
        self.dropped = dropped
        missed = int(page.get("missed") or 0)
        if missed and self.cursor is not None:
            self.missed += missed
            view.message(f"{missed} traces were evicted before tail could read them", "bold yellow")
        if traces:
            view.traces(traces)
        self.cursor = int(page["cursor"])
        view.status(
            f"following {self.client.url} · {view.shown} shown · {dropped} dropped"
            f" · {self.missed} missed · Ctrl-C to stop"
        )


def _not_found_message(url: str) -> str:
    return (
        f"{url} answered 404: the trace endpoint is off (plain TraceMiddleware needs"
        " endpoint=True; FlaskTrace serves it in debug or testing mode) or it refused this"
        " client (loopback only unless a token or allow-list is configured; Host must be"
        " localhost, 127.0.0.1, [::1] or a configured host)."
    )


def _filters(
    status: str | None, method: str | None, path: str | None, slow: float | None
) -> dict[str, Any]:
    return {"status": status, "method": method, "path": path, "min_ms": slow}


class _Interrupts:
    """SIGINT and SIGTERM raise :exc:`KeyboardInterrupt`, except while output
    is being written (rich would write a half-printed render again when the
    live display stops): then they take effect when the write is done.
    """

    def __init__(self) -> None:
        self.depth = 0
        self.pending = False

    def install(self) -> None:
        with contextlib.suppress(ValueError):  # not the main thread
            signal.signal(signal.SIGINT, self._handler)
            signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.depth:
            self.pending = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Hold interrupts back inside the block."""
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if not self.depth and self.pending:
                self.pending = False
                raise KeyboardInterrupt


_interrupts = _Interrupts()


def _sigterm_as_interrupt() -> None:
    _interrupts.install()


# -- serving --------------------------------------------------------------------


class _EndpointFront:
    """Answers the endpoint's prefix with a :class:`TraceEndpoint` before the
    (traced) app, so ``run`` and ``demo`` can end its streams on shutdown.
    """

    def __init__(self, app: WSGIApplication, endpoint: TraceEndpoint) -> None:
        self.app = app
        self.endpoint = endpoint
        self.prefix = endpoint.prefix

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path: str = environ.get("PATH_INFO") or "/"
        if path.startswith(self.prefix) and path[len(self.prefix) : len(self.prefix) + 1] in (
            "",
            "/",
        ):
            return self.endpoint(environ, start_response)
        return self.app(environ, start_response)


def _is_flask_app(obj: object) -> bool:
    """Whether ``obj`` is a Flask app (without importing Flask when the app's
    module did not).
    """
    flask = sys.modules.get("flask")
    flask_class = getattr(flask, "Flask", None)
    return isinstance(flask_class, type) and isinstance(obj, flask_class)


def _is_factory(obj: Any) -> bool:
    if not (inspect.isfunction(obj) or inspect.ismethod(obj)):
        return False
    try:
        inspect.signature(obj).bind()
    except (TypeError, ValueError):
        return False
    return True


def load_app(spec: str) -> tuple[Any, str]:
    """Import ``module:attribute`` (or ``path/to/file.py:attribute``) and return
    the object it names (an app factory is called) and a label.

    Without an attribute, ``app``, ``application``, ``create_app`` and
    ``make_app`` are tried in that order.
    """
    module_name, _, attribute = spec.partition(":")
    if module_name.endswith(".py") or os.sep in module_name:
        path = os.path.abspath(module_name)
        directory, filename = os.path.split(path)
        sys.path.insert(0, directory)
        module_name = filename.removesuffix(".py")
    elif os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if exc.name and module_name.startswith(exc.name):
            msg = f"cannot import {module_name!r}: {exc}"
            raise click.BadParameter(msg, param_hint="MODULE:APP") from None
        raise
    names = (
        [attribute.removesuffix("()")]
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
    if _is_factory(obj):
        obj = obj()
        label += "()"
    if not (callable(obj) or _is_flask_app(obj)):
        msg = f"{label} is not a WSGI app, a Flask app or an app factory: {obj!r}"
        raise click.BadParameter(msg, param_hint="MODULE:APP")
    return obj, label


def traced(obj: Any) -> tuple[WSGIApplication, TraceBuffer, Options]:
    """Install tracing on a Flask app or WSGI app (unless it already has it)
    and return the app to serve with its buffer and options.
    """
    from .middleware import TraceMiddleware

    if _is_flask_app(obj):
        ext = obj.extensions.get("wsgitrace")
        if ext is None:
            from .flask import FlaskTrace

            ext = FlaskTrace(obj, endpoint=False)
        return obj, ext.buffer, ext.middleware.options
    wsgi_app = getattr(obj, "wsgi_app", None)
    if isinstance(wsgi_app, TraceMiddleware):
        return obj, wsgi_app.buffer, wsgi_app.options
    if isinstance(obj, TraceMiddleware):
        return obj, obj.buffer, obj.options
    middleware = TraceMiddleware(obj, endpoint=False)
    return middleware, middleware.buffer, middleware.options


def _serve(app: WSGIApplication, host: str, port: int, *, quiet: bool, prefix: str) -> Any:
    from werkzeug.serving import WSGIRequestHandler, make_server

    class RequestHandler(WSGIRequestHandler):
        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            if quiet or urlsplit(self.path).path.startswith(prefix):
                return
            super().log_request(code, size)

    return make_server(host, port, app, threaded=True, request_handler=RequestHandler)


def _fail(message: str) -> NoReturn:
    _message(_console(stderr=True), f"wsgitrace: {message}", "bold red")
    sys.exit(1)


# -- commands -------------------------------------------------------------------


_token_options = [
    click.option(
        "--token",
        envvar="WSGITRACE_TOKEN",
        metavar="TOKEN",
        help="Bearer token (prefer WSGITRACE_TOKEN or --token-file: argv is visible to others).",
    ),
    click.option(
        "--token-file",
        envvar="WSGITRACE_TOKEN_FILE",
        type=click.Path(dir_okay=False),
        help="File holding the bearer token.",
    ),
]


def _with_token(func: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_token_options):
        func = option(func)
    return func


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wsgitrace")
def main() -> None:
    """See what every request to a WSGI or Flask app did, in order."""


#: ``--store PATH``, shared by ``tail`` and ``show``.
_store_option = click.option(
    "--store",
    type=click.Path(dir_okay=False),
    metavar="PATH",
    help="Read this SQLite trace store (WSGITRACE_STORE) instead of a URL.",
)


@main.command()
@click.argument("url", default=DEFAULT_URL, required=False)
@click.option(
    "-n",
    "--lines",
    default=10,
    show_default=True,
    type=click.IntRange(0, 1000),
    help="Show this many recent traces first.",
)
@click.option("-v", "--verbose", is_flag=True, help="Show each trace's timeline.")
@click.option("--status", help="Only these statuses, e.g. 5xx, 404 or 4xx,5xx.")
@click.option("--method", help="Only these methods, e.g. POST or GET,POST.")
@click.option("--path", help="Only paths starting with this prefix.")
@click.option(
    "--slow", type=click.FloatRange(0), metavar="MS", help="Only requests slower than MS."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON summary per line on stdout.")
@_store_option
@_with_token
def tail(
    url: str,
    lines: int,
    verbose: bool,
    status: str | None,
    method: str | None,
    path: str | None,
    slow: float | None,
    as_json: bool,
    store: str | None,
    token: str | None,
    token_file: str | None,
) -> None:
    """Follow the requests an app serves, as they arrive.

    URL is the app's base URL or its /_trace URL (default
    http://127.0.0.1:5000). Prints the last -n traces, then follows;
    reconnects and resumes when the server restarts. With --store, reads
    the trace store every worker process writes to instead.
    """
    client = _make_client(url, store, _read_token(token, token_file))
    view: _View = _JsonView() if as_json else _HumanView(verbose)
    follow = _Follow(client, view, _filters(status, method, path, slow), lines, full=verbose)
    _sigterm_as_interrupt()
    try:
        code = follow.run()
    except KeyboardInterrupt:
        code = 0
    sys.exit(code)


@main.command()
@click.argument("trace_id", metavar="ID")
@click.argument("url", default=DEFAULT_URL, required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the trace's JSON.")
@_store_option
@_with_token
def show(
    trace_id: str,
    url: str,
    as_json: bool,
    store: str | None,
    token: str | None,
    token_file: str | None,
) -> None:
    """Show one trace's full timeline and state."""
    client = _make_client(url, store, _read_token(token, token_file))
    try:
        data = client.get(trace_id)
    except _UnreachableError as exc:
        _fail(f"cannot reach {client.url} ({exc}); is the app running?")
    except _NotFoundError:
        _fail(
            f"no trace {trace_id!r} at {client.url}: it was evicted from the buffer,"
            " or the endpoint is off or refused this client."
        )
    except _BadAnswerError as exc:
        _fail(f"{client.url}: {exc}")
    if as_json:
        sys.stdout.write(json.dumps(data, ensure_ascii=True, indent=2) + "\n")
        return
    _console().print(build_timeline(Trace.from_dict(data), full=True))


@main.command()
@click.argument("app_spec", metavar="MODULE:APP")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind.")
@click.option(
    "--port",
    default=5000,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port (0 picks a free one).",
)
def run(app_spec: str, host: str, port: int) -> None:
    """Serve an unmodified WSGI or Flask app (or app factory), traced.

    Uses werkzeug's threaded server, with the trace endpoint on for loopback
    clients. MODULE may also be a path to a .py file.
    """
    obj, label = load_app(app_spec)
    app, buffer, options = traced(obj)
    endpoint = TraceEndpoint(buffer, dataclasses.replace(options, endpoint=True))
    try:
        server = _serve(
            _EndpointFront(app, endpoint), host, port, quiet=False, prefix=endpoint.prefix
        )
    except OSError as exc:
        _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    base = _base_url(host, server.server_port)
    err = _console(stderr=True)
    _message(err, f"wsgitrace: serving {label} traced on {base}", "bold")
    _message(err, f"trace endpoint: {base}{endpoint.prefix} (loopback clients)")
    _message(err, f"watch it with:  wsgitrace tail {base}", "dim")
    sys.stderr.flush()
    _sigterm_as_interrupt()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        endpoint.shutdown()
        server.server_close()
    _message(err, "wsgitrace: stopped", "dim")


def _base_url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("", "0.0.0.0") else host  # noqa: S104 - display only
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


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


@main.command()
@click.option(
    "--port", default=0, type=click.IntRange(0, 65535), help="Port (default: a free one)."
)
@click.option("--requests", "count", type=click.IntRange(1), help="Stop sending after N requests.")
@click.option("--once", is_flag=True, help="Send one round of requests, show them, and exit.")
@click.option(
    "--interval",
    default=0.5,
    show_default=True,
    type=click.FloatRange(0),
    help="Seconds between requests.",
)
@click.option("-v", "--verbose", is_flag=True, help="Show each trace's timeline.")
@click.option("--json", "as_json", is_flag=True, help="One JSON summary per line on stdout.")
def demo(
    port: int, count: int | None, once: bool, interval: float, verbose: bool, as_json: bool
) -> None:
    """Serve the bundled example Flask app traced, send it requests, and show
    them as `wsgitrace tail` would. Ctrl-C stops.
    """
    import logging

    from .demo_app import create_app

    if once:
        count = min(count or len(DEMO_ROUND), len(DEMO_ROUND))
    app = create_app()
    app.logger.setLevel(logging.CRITICAL)  # /boom's traceback is in its trace
    served, buffer, options = traced(app)
    endpoint = TraceEndpoint(buffer, dataclasses.replace(options, endpoint=True))
    try:
        server = _serve(
            _EndpointFront(served, endpoint), "127.0.0.1", port, quiet=True, prefix=endpoint.prefix
        )
    except OSError as exc:
        _fail(f"cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}")
    base = _base_url("127.0.0.1", server.server_port)
    server_thread = threading.Thread(
        target=server.serve_forever, name="wsgitrace-demo-server", daemon=True
    )
    server_thread.start()

    view: _View = _JsonView() if as_json else _HumanView(verbose)
    # The server is new: follow it from its first trace (cursor 0), so the
    # traffic thread cannot get ahead of the first poll.
    follow = _Follow(_Client(base), view, {}, lines=0, full=verbose, wait=2.0, cursor=0)
    view.message(f"wsgitrace demo: the example app is served traced on {base}", "bold")
    view.message(
        f"sending it requests; in another terminal try  wsgitrace tail -v {base}"
        f"  or  wsgitrace show ID {base}   (Ctrl-C to stop)",
        "dim",
    )
    stop = follow.stop

    def send_traffic() -> None:
        sent = _traffic(base, stop, count, interval)
        if once or count is not None:
            deadline = time.monotonic() + 10
            while view.shown < sent and time.monotonic() < deadline and not stop.is_set():
                stop.wait(0.05)
            if once:
                stop.set()
                endpoint.shutdown()

    traffic_thread = threading.Thread(
        target=send_traffic, name="wsgitrace-demo-traffic", daemon=True
    )
    _sigterm_as_interrupt()
    code = 0
    try:
        traffic_thread.start()
        code = follow.run()
    except KeyboardInterrupt:
        code = 0
    finally:
        stop.set()
        endpoint.shutdown()
        server.shutdown()
        server.server_close()
    sys.exit(code)
