"""The ``wsgitrace`` command: watch, inspect and serve traced apps.

::

    wsgitrace demo                        # the example app, traced, with traffic
    wsgitrace run myapp:app               # serve an unmodified app, traced
    wsgitrace run myapp:app --sample 0.1  # tracing options as flags
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
works too, but argv is visible to other users); an option typed on the
command line beats one set in the environment. The HTTP client never uses a
proxy for loopback addresses and never follows redirects, so the token goes
nowhere else.

Reading traces (HTTP client, store client, following) is in
:mod:`wsgitrace._client` (what it accepts as the endpoint's JSON in
:mod:`wsgitrace._answers`), serving ``run`` and ``demo`` in :mod:`wsgitrace._serve`,
rendering in :mod:`wsgitrace.render`, the output views in
:mod:`wsgitrace._output` and Ctrl-C and SIGTERM handling in
:mod:`wsgitrace._interrupts`. Output is coloured, with a status line, only
when a person is watching (a terminal); ``--json`` writes only JSON to stdout
and every message to stderr.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn
from urllib.parse import urlencode

import click

from . import __version__
from ._answers import _BadAnswerError, _check_trace
from ._client import (
    DEFAULT_PREFIX,
    DEFAULT_URL,
    _bad_answer_message,
    _cannot_reach_message,
    _Client,
    _Follow,
    _make_client,
    _no_store_message,
    _NoStoreError,
    _NotFoundError,
    _read_token,
    _StoreClient,
    _UnreachableError,
    _View,
)
from ._interrupts import _interrupts, _sigterm_as_interrupt
from ._output import _bar_width, _console, _HumanView, _JsonView, _message, _stdout
from ._run_options import flag_name, given_options, with_run_flags
from ._serve import (
    DEMO_ROUND,
    _AlreadyTracedError,
    _base_url,
    _EndpointFront,
    _serve,
    _traffic,
    load_app,
    traced,
)
from ._trace_query import _TRACE_ID_RE, _BadQueryError, _parse_query
from .config import Options
from .endpoint import TraceEndpoint
from .exceptions import ConfigurationError
from .render import build_timeline
from .trace import Trace

__all__ = ["main"]


def _filters(
    status: str | None, method: str | None, path: str | None, slow: float | None
) -> dict[str, Any]:
    """The listing filters of ``tail``, as the client takes them. A bad one
    is a usage error at once, not the server's 400 once it answers (never,
    while it is down).
    """
    filters = {"status": status, "method": method, "path": path, "min_ms": slow}
    try:
        _parse_query(urlencode({k: v for k, v in filters.items() if v is not None}), 1)
    except _BadQueryError as exc:
        message = exc.message.removeprefix(f"'{exc.param}' ")
        option = "--slow" if exc.param == "min_ms" else f"--{exc.param}"
        raise click.BadParameter(message, param_hint=option) from None
    return filters


def _cannot_listen(host: str, port: int, exc: OSError) -> str:
    """Why ``run`` or ``demo`` cannot serve, with what to do when the port is
    taken (as it often is: 5000 is also ``flask run``'s default).
    """
    message = f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    if exc.errno == errno.EADDRINUSE:
        message += "; another server has that port: stop it, or choose another with --port"
    return message


def _fail(message: str) -> NoReturn:
    """Print ``message`` to stderr in red and exit with status 1."""
    _message(_console(stderr=True), f"wsgitrace: {message}", "bold red")
    sys.exit(1)


@contextlib.contextmanager
def _writing_output() -> Iterator[None]:
    """Turn a failure to write the output (a full disk, a closed stdout)
    into one message; a reader that went away (``| head``) is left to click,
    which exits quietly.
    """
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.EPIPE:
            raise
        _fail(f"cannot write the output: {exc.strerror or exc}")


#: Said by run and demo when the app's tracing is off: otherwise they would
#: serve it as "traced" and tail would show nothing, with no reason given.
TRACING_OFF = (
    "wsgitrace: tracing is off (WSGITRACE_ENABLED or enabled=False): requests are"
    " served but not traced"
)


def _sinks_line(options: Options) -> str | None:
    """Where traces go besides the buffer, said by run's and demo's banner:
    a store or OTLP set in the shell's environment would otherwise take the
    served traffic silently.
    """
    sinks = []
    if options.store:
        sinks.append(f"the store {options.store}")
    if options.otlp:
        sinks.append("OpenTelemetry (OTLP, configured by OTEL_* variables)")
    return f"traces also go to {' and '.join(sinks)}" if sinks else None


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


def _token(token: str | None, token_file: str | None) -> str | None:
    """The token to send: ``--token-file`` before ``--token``, but an option
    given on the command line before one set in the environment.
    """
    ctx = click.get_current_context()
    typed = click.core.ParameterSource.COMMANDLINE
    if (
        token
        and ctx.get_parameter_source("token") is typed
        and ctx.get_parameter_source("token_file") is not typed
    ):
        token_file = None
    return _read_token(token, token_file)


class _Commands(click.Group):
    """The command group: a setting wsgitrace cannot use (an option, a
    ``WSGITRACE_*`` variable) is reported as a message, not a traceback.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigurationError as exc:
            _fail(str(exc))


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wsgitrace")
def main() -> None:
    """See what every request to a WSGI or Flask app did, in order."""


#: ``--store PATH``, shared by ``tail`` and ``show``.
_store_option = click.option(
    "--store",
    type=click.Path(dir_okay=False),
    metavar="PATH",
    envvar="WSGITRACE_STORE",
    help=(
        "Read this SQLite trace store instead of a URL"
        " (default: WSGITRACE_STORE, unless a URL is given)."
    ),
)


def _store_unless_url(store: str | None) -> str | None:
    """``--store``, except when it only came from ``WSGITRACE_STORE`` (set for
    the app's workers, say) and a URL was given on the command line: then
    the URL is what the user asked for.
    """
    ctx = click.get_current_context()
    if (
        store is not None
        and ctx.get_parameter_source("store") is click.core.ParameterSource.ENVIRONMENT
        and ctx.get_parameter_source("url") is click.core.ParameterSource.COMMANDLINE
    ):
        return None
    return store


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
    client = _make_client(url, _store_unless_url(store), _token(token, token_file))
    view: _View = _JsonView() if as_json else _HumanView(verbose)
    follow = _Follow(client, view, _filters(status, method, path, slow), lines, full=verbose)
    _sigterm_as_interrupt()
    try:
        with _writing_output():
            code = follow.run()
    except KeyboardInterrupt:
        code = 0
    finally:
        _interrupts.restore()
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
    if not trace_id.strip():
        raise click.BadParameter("the trace id is empty", param_hint="ID")
    if not _TRACE_ID_RE.match(trace_id):
        hint = " (the URL goes after the ID)" if "/" in trace_id or ":" in trace_id else ""
        msg = (
            f"{trace_id!r} is not a trace id{hint}; ids are letters, digits, '-' and '_',"
            " as 'wsgitrace tail -v' and /_trace show them"
        )
        raise click.BadParameter(msg, param_hint="ID")
    client = _make_client(url, _store_unless_url(store), _token(token, token_file))
    try:
        data = client.get(trace_id)
        _check_trace(data)
    except _NoStoreError:
        _fail(_no_store_message(client.url))
    except _UnreachableError as exc:
        _fail(_cannot_reach_message(client, exc))
    except _NotFoundError:
        if isinstance(client, _StoreClient):
            _fail(
                f"no trace {trace_id!r} in the store {client.url}: it was pruned (the store"
                " keeps its newest traces, by count and bytes), or never written there."
            )
        _fail(
            f"no trace {trace_id!r} at {client.url}: it was evicted from the buffer,"
            " or the endpoint is off or refused this client."
        )
    except _BadAnswerError as exc:
        _fail(_bad_answer_message(client, exc))
    with _writing_output():
        if as_json:
            out = _stdout()
            out.write(json.dumps(data, ensure_ascii=True, indent=2) + "\n")
            out.flush()
            return
        console = _console()
        bar_width = _bar_width(console.width)
        console.print(build_timeline(Trace.from_dict(data), full=True, bar_width=bar_width))


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
@with_run_flags
def run(app_spec: str, host: str, port: int, **flags: Any) -> None:
    """Serve an unmodified WSGI or Flask app (or app factory), traced.

    Uses werkzeug's threaded server, with the trace endpoint on for loopback
    clients. MODULE may also be a path to a .py file; APP may call a factory
    with literal arguments, as flask --app does: 'shop:create_app("dev")'.
    The other flags set tracing options; they beat the app's config and
    WSGITRACE_* variables.
    """
    obj, label = load_app(app_spec)
    options = given_options(flags)
    try:
        app, middleware = traced(obj, options)
    except _AlreadyTracedError as exc:
        flag_list = ", ".join(flag_name(name) for name in options)
        _fail(
            f"{label} already installs wsgitrace ({exc}), so {flag_list} cannot apply"
            " to it: set options where it installs wsgitrace, or as WSGITRACE_* settings"
        )
    endpoint = TraceEndpoint(
        middleware.buffer, dataclasses.replace(middleware.options, endpoint=True)
    )
    endpoint.sinks = middleware.sinks
    try:
        server = _serve(
            _EndpointFront(app, endpoint),
            host,
            port,
            quiet=False,
            prefix=endpoint.prefix,
            redactor=middleware.redactor,
        )
    except OSError as exc:
        _fail(_cannot_listen(host, port, exc))
    base = _base_url(host, server.port)
    err = _console(stderr=True)
    # Before the banner: a Ctrl-C as soon as it shows stops the server cleanly.
    _sigterm_as_interrupt()
    try:
        _message(err, f"wsgitrace: serving {label} traced on {base}", "bold")
        if not middleware.enabled:
            _message(err, TRACING_OFF, "bold yellow")
        elif sinks := _sinks_line(middleware.options):
            _message(err, sinks)
        who = "loopback clients"
        if middleware.options.allow:
            who += ", clients in " + ", ".join(str(net) for net in middleware.options.allow)
        if endpoint.has_token:
            who += ", or with the token"
        _message(err, f"trace endpoint: {base}{endpoint.prefix} ({who})")
        # The base URL finds the default prefix; another one must be given.
        url = base if endpoint.prefix == DEFAULT_PREFIX else base + endpoint.prefix
        _message(err, f"watch it with:  wsgitrace tail {url}", "dim")
        sys.stderr.flush()
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        _interrupts.stopping()
        endpoint.shutdown()
        server.server_close()
        # Before "stopped": a signal after it ends a process the app keeps alive.
        _interrupts.restore()
    _message(err, "wsgitrace: stopped", "dim")


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
    served, middleware = traced(app)
    endpoint = TraceEndpoint(
        middleware.buffer, dataclasses.replace(middleware.options, endpoint=True)
    )
    try:
        server = _serve(
            _EndpointFront(served, endpoint), "127.0.0.1", port, quiet=True, prefix=endpoint.prefix
        )
    except OSError as exc:
        _fail(_cannot_listen("127.0.0.1", port, exc))
    base = _base_url("127.0.0.1", server.port)
    # As run's banner: the base URL finds the default prefix; another one
    # (WSGITRACE_PREFIX) must be given.
    url = base if endpoint.prefix == DEFAULT_PREFIX else base + endpoint.prefix
    server_thread = threading.Thread(
        target=server.serve_forever, name="wsgitrace-demo-server", daemon=True
    )
    server_thread.start()

    view: _View = _JsonView() if as_json else _HumanView(verbose)
    # The server is new: follow it from its first trace (cursor 0), so the
    # traffic thread cannot get ahead of the first poll.
    follow = _Follow(_Client(url), view, {}, lines=0, full=verbose, wait=2.0, cursor=0)
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
        view.message(f"wsgitrace demo: the example app is served traced on {base}", "bold")
        if not middleware.enabled:
            view.message(TRACING_OFF, "bold yellow")
        elif sinks := _sinks_line(middleware.options):
            view.message(sinks, "yellow")
        if once:
            # The server stops with the demo: nothing to point another terminal at.
            view.message("sending it one round of requests; it stops once they are shown", "dim")
        else:
            view.message(
                f"sending it requests; in another terminal try  wsgitrace tail -v {url}"
                f"  (it shows trace IDs) or  wsgitrace show ID {url}   (Ctrl-C to stop)",
                "dim",
            )
        traffic_thread.start()
        with _writing_output():
            code = follow.run()
    except KeyboardInterrupt:
        code = 0
    finally:
        _interrupts.stopping()
        stop.set()
        endpoint.shutdown()
        server.shutdown()
        server.server_close()
        _interrupts.restore()
    sys.exit(code)
