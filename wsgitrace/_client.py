"""Reading traces: the ``/_trace`` endpoint over HTTP, or a trace store.

::

    client = _make_client("http://127.0.0.1:5000", store=None, token=None)
    page = client.get(params={"limit": 10})       # the endpoint's listing
    _Follow(client, view, filters={}, lines=10, full=False).run()

:class:`_Client` GETs ``/_trace`` (a URL whose path is empty or ``/`` gets
``/_trace`` appended); it never uses a proxy for loopback addresses and never
follows redirects, so the token goes nowhere else. :class:`_StoreClient`
answers the same requests from a SQLite trace store (:mod:`wsgitrace.store`)
with the endpoint's semantics. :class:`_Follow` long-polls either with
``since=<cursor>``, so it neither skips nor repeats a trace, and when the
server restarts it waits for it and resumes (answers that alternate between
processes, a pre-fork server's workers, end it with advice); it reports through a
:class:`_View` (the views themselves are in :mod:`wsgitrace._output`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from http.client import HTTPException
from typing import Any
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import click

from . import __version__
from ._answers import _BadAnswerError, _check_listing
from ._trace_query import MAX_WAIT, _BadQueryError, _parse_query
from .endpoint import _SETTLE_SECONDS, TraceEndpoint
from .exceptions import StoreError
from .redact import DEFAULT_REDACTOR

DEFAULT_URL = "http://127.0.0.1:5000"
DEFAULT_PREFIX = "/_trace"
_RETRY_SECONDS = 1.0
#: Most bytes of an answer read: far more than any listing or trace (the
#: buffer and the store are bounded), far less than a machine's memory.
_MAX_BODY = 256 * 2**20
_CHUNK = 2**16
#: Seconds an answer may take to arrive besides the request's timeout: a
#: thousand full traces over a slow link, not a trickle that never ends.
_TRANSFER_SECONDS = 60.0
#: Bad Gateway, Service Unavailable, Gateway Timeout.
_GATEWAY_CODES = frozenset({502, 503, 504})


# -- talking to /_trace ---------------------------------------------------------


class _UnreachableError(Exception):
    """The server did not answer (refused, reset, timed out), or a proxy in
    front of it said it could not (502, 503, 504).
    """


class _BusyError(_UnreachableError):
    """The endpoint is serving as many long-polls and streams as it may
    (``max_readers``) and said so with a 503: retry shortly.
    """


class _NoStoreError(_UnreachableError):
    """The trace store file read by ``--store`` does not exist (yet)."""


class _NotFoundError(Exception):
    """The server answered 404: endpoint off, refused, or no such trace."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Never follow a redirect (it could carry the token elsewhere)."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def endpoint_url(url: str) -> str:
    """The endpoint's URL for a base or endpoint URL: ``http://host:5000``
    and ``http://host:5000/`` become ``http://host:5000/_trace``.
    """
    port = url.strip().removeprefix(":")
    if port.isdigit():
        # Else "5000" would be a host name (an address, even: 0.0.19.136).
        msg = f"{url!r} is a port, not a URL: give http://127.0.0.1:{port} (or localhost:{port})"
        raise click.BadParameter(msg, param_hint="URL")
    if "://" not in url:
        url = "http://" + url
    # Shown in messages: a password or token the URL holds is not echoed.
    shown = DEFAULT_REDACTOR.url(url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises for a port that is not a number in range
    except ValueError as exc:
        msg = f"not a valid URL: {shown!r} ({exc})"
        raise click.BadParameter(msg, param_hint="URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        msg = f"not an http(s) URL: {shown!r}"
        raise click.BadParameter(msg, param_hint="URL")
    if "@" in parts.netloc:
        msg = f"a user name or password in the URL is not supported (use --token): {shown!r}"
        raise click.BadParameter(msg, param_hint="URL")
    if any(c.isspace() or not c.isprintable() for c in url):
        msg = f"the URL contains spaces or control characters: {shown!r}"
        raise click.BadParameter(msg, param_hint="URL")
    try:
        parts.hostname.encode("idna")  # as the connection will
    except UnicodeError as exc:
        msg = f"not a valid host name in {shown!r} ({exc})"
        raise click.BadParameter(msg, param_hint="URL") from None
    # Sent as typed, except what HTTP cannot carry: non-ASCII, percent-encoded.
    path = quote(parts.path.rstrip("/"), safe="/%!$&'()*+,;=:@-._~") or DEFAULT_PREFIX
    if path.endswith("/stream"):
        msg = f"give the endpoint's URL (such as {DEFAULT_PREFIX}), not its stream: {shown!r}"
        raise click.BadParameter(msg, param_hint="URL")
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


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
            if any(not c.isprintable() for c in token):
                # Never echoed: it is a secret.
                msg = "the token contains a line break or control character"
                raise click.BadParameter(msg, param_hint="token")
            # Sent as its UTF-8 bytes, which is what the endpoint compares
            # (http.client writes header strings as latin-1).
            header = f"Bearer {token}".encode().decode("latin-1")
            self._headers["Authorization"] = header
        # Connections opened for the request under way, cut off when it takes too long.
        self._timers: list[threading.Timer] = []
        handlers: list[urllib.request.BaseHandler] = [
            _NoRedirect(),
            _CutOffHTTPHandler(self._timers),
            _CutOffHTTPSHandler(self._timers),
        ]
        if _is_loopback_host(urlsplit(self.url).hostname):
            handlers.append(urllib.request.ProxyHandler({}))
        self._opener = urllib.request.build_opener(*handlers)

    def get(self, sub: str = "", params: Mapping[str, Any] | None = None, **kw: Any) -> Any:
        """GET ``<url>/<sub>?<params>`` and decode its JSON."""
        if sub == "stream":
            raise _NotFoundError  # the SSE stream, not a trace id
        url = self.url + (f"/{quote(sub, safe='')}" if sub else "")
        if params:
            url += "?" + urlencode({k: v for k, v in params.items() if v is not None})
        request = urllib.request.Request(url, headers=self._headers)  # noqa: S310 - http(s) only
        timeout = kw.get("timeout", self.timeout)
        total = timeout + _TRANSFER_SECONDS
        started = time.monotonic()
        try:
            with self._opener.open(request, timeout=timeout) as response:
                body = _read_body(response, total, started)
        except urllib.error.HTTPError as exc:
            with exc:
                try:
                    detail = exc.read(4096)
                except (OSError, HTTPException):
                    detail = b""  # the error page was cut off: its status says enough
            if exc.code == 404:
                raise _NotFoundError from None
            if exc.code == 503 and _is_busy(detail):
                raise _BusyError(_error_detail(exc.code, detail)) from None
            if exc.code in _GATEWAY_CODES:
                # A proxy in front whose app is down or restarting: as if
                # the app could not be reached, so tail waits for it.
                raise _UnreachableError(_error_detail(exc.code, detail)) from None
            raise _BadAnswerError(_error_detail(exc.code, detail)) from None
        except (urllib.error.URLError, OSError, HTTPException) as exc:
            if time.monotonic() - started >= total:
                raise _UnreachableError(_too_slow(total)) from None  # cut off
            reason = getattr(exc, "reason", exc)
            raise _UnreachableError(str(reason) or type(reason).__name__) from None
        finally:
            for timer in self._timers:
                timer.cancel()
            self._timers.clear()
        try:
            return json.loads(body)
        except (ValueError, RecursionError):  # nested too deep: not ours either
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
            if "no wsgitrace trace store" in text:
                raise _NoStoreError(text) from None
            if "locked" in text:
                raise _UnreachableError(text) from None
            raise _BadAnswerError(text) from None


def _read_body(response: Any, timeout: float, started: float) -> bytes:
    """The answer's body, read within ``timeout`` seconds of ``started`` (the
    request's start) and at most :data:`_MAX_BODY` bytes: the socket's
    timeout is per read, so a server that trickles bytes, or never stops
    sending, would hold ``tail`` and ``show`` forever and fill their memory.
    """
    deadline = started + timeout
    parts: list[bytes] = []
    size = 0
    while chunk := response.read1(_CHUNK):
        parts.append(chunk)
        size += len(chunk)
        if size > _MAX_BODY:
            msg = (
                f"the server's answer is larger than {_MAX_BODY // 2**20} MiB"
                " (is this a wsgitrace endpoint?)"
            )
            raise _BadAnswerError(msg)
        if time.monotonic() > deadline:
            raise _UnreachableError(_too_slow(timeout))
    if time.monotonic() > deadline:
        raise _UnreachableError(_too_slow(timeout))  # cut off: see _CutOffHTTPHandler
    return b"".join(parts)


def _bad_answer_message(client: _Client | _StoreClient, exc: _BadAnswerError) -> str:
    """What is wrong with an answer, said once with where it came from: a
    store's errors name the store already.
    """
    return str(exc) if isinstance(client, _StoreClient) else f"{client.url}: {exc}"


def _too_slow(timeout: float) -> str:
    return f"its answer took more than {timeout:g} s"


def _cut_off_class(base: Any, timers: list[threading.Timer]) -> Any:
    """``base`` (an HTTP or HTTPS connection class) whose socket is shut
    down :data:`_TRANSFER_SECONDS` after its timeout: the timeout is per
    read, and a server that sends its status line and headers a byte at a
    time would otherwise hold the request forever.
    """

    class CutOffConnection(base):  # type: ignore[misc]
        def connect(self) -> None:
            super().connect()
            timer = threading.Timer(self.timeout + _TRANSFER_SECONDS, _shut_down, (self.sock,))
            timer.daemon = True
            timers.append(timer)
            timer.start()

    return CutOffConnection


def _shut_down(sock: socket.socket) -> None:
    # A socket closed meanwhile has no descriptor left: this does nothing.
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _CutOffOpening(urllib.request.AbstractHTTPHandler):
    """Makes a handler open its connections with the classes of
    :func:`_cut_off_class`, their timers kept in ``timers``.
    """

    def __init__(self, timers: list[threading.Timer]) -> None:
        super().__init__()
        self._timers = timers

    def do_open(self, http_class: Any, req: Any, **http_conn_args: Any) -> Any:
        cls = _cut_off_class(http_class, self._timers)
        return super().do_open(cls, req, **http_conn_args)


class _CutOffHTTPHandler(_CutOffOpening, urllib.request.HTTPHandler):
    """Opens ``http:`` URLs with connections that are cut off."""


class _CutOffHTTPSHandler(_CutOffOpening, urllib.request.HTTPSHandler):
    """Opens ``https:`` URLs with connections that are cut off."""


def _make_client(url: str, store: str | None, token: str | None) -> _Client | _StoreClient:
    if store is not None:
        return _StoreClient(store)
    return _Client(url, token)


def _is_busy(body: bytes) -> bool:
    """Whether a 503's body is the endpoint's own "too many readers" answer."""
    try:
        return json.loads(body).get("busy") is True
    except (ValueError, AttributeError, RecursionError):
        return False


def _error_detail(code: int, body: bytes) -> str:
    try:
        message = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError, RecursionError):
        message = ""
    if not message and code in (401, 403, 407):
        # The endpoint refuses with a 404, never these: something in front
        # of the app (a proxy, an auth gateway) wants its own credentials.
        message = "refused by something in front of the app (a proxy?), not by wsgitrace"
    return f"HTTP {code}" + (f": {message}" if message else "")


def _read_token(token: str | None, token_file: str | None) -> str | None:
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as f:
                value = f.read().strip()
        except OSError as exc:
            msg = f"cannot read the token file {token_file!r}: {exc.strerror}"
            raise click.BadParameter(msg, param_hint="--token-file") from None
        if not value:
            raise click.BadParameter("the token file is empty", param_hint="--token-file")
        return value
    return token or None


# -- following ------------------------------------------------------------------


def _no_store_message(path: str) -> str:
    """Why a store file is missing: it is made by the traced app, at its
    first stored trace, not when the app starts.
    """
    return (
        f"there is no trace store at {path!r} yet: an app traced with WSGITRACE_STORE"
        " (or store=) set to this path makes it when it stores its first trace"
    )


def _cannot_reach_message(client: _Client | _StoreClient, exc: _UnreachableError) -> str:
    """Why no answer came: a store's error says it all (it names the store,
    and why: another process held its lock), not an app that is not running.
    """
    if isinstance(client, _StoreClient):
        return str(exc)
    return f"cannot reach {client.url} ({exc}); is the app running?"


def _unreachable_message(client: _Client | _StoreClient, exc: _UnreachableError) -> str:
    """What tail says when it cannot read, and that it keeps trying."""
    url = client.url
    if isinstance(exc, _NoStoreError):
        return f"{_no_store_message(url)}. Waiting for it (Ctrl-C to stop)."
    if isinstance(exc, _BusyError):
        return (
            f"{url} is busy ({exc}): other tails or dashboards hold all its reader"
            " slots. Retrying until one is free (Ctrl-C to stop)."
        )
    if isinstance(client, _StoreClient):
        return f"{_cannot_reach_message(client, exc)}. Retrying (Ctrl-C to stop)."
    return f"{_cannot_reach_message(client, exc)} Retrying until it is (Ctrl-C to stop)."


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
    sink_dropped: int = 0
    # After the server was unreachable: the next poll returns at once, so a
    # restarted server (whose cursors may have passed ours) is seen now, not
    # after a long-poll on cursors of the old process.
    _check_first: bool = False
    # The last poll found a new server process: said after "reconnected".
    _restarted: bool = False
    # The instances followed before a restart.
    _left: set[str] = dataclasses.field(default_factory=set)

    def run(self) -> int:
        """Follow until :attr:`stop` is set; the exit status."""
        view = self.view
        down = False
        closed = False
        view.start()
        try:
            while not self.stop.is_set():
                try:
                    page = self._poll()
                except _UnreachableError as exc:
                    if not down:
                        view.message(_unreachable_message(self.client, exc), "yellow")
                        down = True
                    view.status(f"waiting for {self.client.url} …")
                    # A busy endpoint is the same process: retry the long-poll
                    # for a slot. (A quick check would be answered, show
                    # "reconnected", and the next long-poll be busy again.)
                    if not isinstance(exc, _BusyError):
                        self._check_first = True
                    self.stop.wait(_RETRY_SECONDS)
                    continue
                except _NotFoundError:
                    view.message(_not_found_message(self.client.url), "bold red")
                    return 1
                except _BadAnswerError as exc:
                    view.message(_bad_answer_message(self.client, exc), "bold red")
                    return 2
                if down:
                    view.message(f"reconnected to {self.client.url}", "green")
                    down = False
                if self._restarted:
                    self._restarted = False
                    view.message(
                        "the server restarted; following the new process from its first trace",
                        "yellow",
                    )
                if page is not None:
                    self._show(page)
        except BrokenPipeError:
            # The reader of the output left (``| head -1``): stop quietly,
            # as tail(1) does, without a count of traces it may not have had.
            closed = True
            raise
        finally:
            view.stop()
            if self.instance is not None and not closed:
                sinks = (
                    f"; its sinks (store, OTLP) did not get {self.sink_dropped}"
                    if self.sink_dropped
                    else ""
                )
                view.message(
                    f"{view.shown} trace{'' if view.shown == 1 else 's'} shown,"
                    f" {self.missed} missed (evicted before they were read);"
                    f" {self._dropper} {self.dropped or 0} in all" + sinks,
                    "dim",
                )
        return 0

    @property
    def _dropper(self) -> str:
        """Who dropped the ``dropped`` traces: a store prunes its oldest, a
        server's buffer evicts them.
        """
        if isinstance(self.client, _StoreClient):
            return "the store has pruned"
        return "the server's buffer has dropped"

    def _poll(self) -> dict[str, Any] | None:
        params: dict[str, Any] = dict(self.filters)
        if self.full:
            params["full"] = 1
        if self.cursor is None:
            params["limit"] = self.lines
            page: dict[str, Any] = self.client.get(params=params)
            _check_listing(page, full=self.full)
            page["traces"].reverse()  # oldest first
        else:
            # Full traces are ~15 times the size of summaries: smaller pages.
            wait = 0 if self._check_first else self.wait
            params.update(since=self.cursor, wait=wait, limit=200 if self.full else 1000)
            timeout = wait + _SETTLE_SECONDS + 15
            page = self.client.get(params=params, timeout=timeout)
            _check_listing(page, full=self.full)
            page["traces"].reverse()
        self._check_first = False
        instance = page.get("instance")
        if self.instance is not None and instance != self.instance:
            if isinstance(instance, str) and instance in self._left:
                # A restarted process never comes back: these answers come
                # from several, each with traces and cursors of its own, and
                # following them would skip and repeat traces without end.
                raise _BadAnswerError(_SEVERAL_PROCESSES)
            if isinstance(self.instance, str):
                self._left.add(self.instance)
            self._restarted = True
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
            view.message(f"{self._dropper} {dropped} traces so far", "dim")
        self.dropped = dropped
        missed = int(page.get("missed") or 0)
        if missed and self.cursor is not None:
            self.missed += missed
            view.message(f"{missed} traces were evicted before tail could read them", "bold yellow")
        if traces:
            view.traces(traces)
        self.cursor = int(page["cursor"])
        sink_dropped = int(page.get("sink_dropped") or 0)
        if sink_dropped and not self.sink_dropped:
            view.message(
                f"the server's sinks (store, OTLP) did not get {sink_dropped} traces so far"
                " (queue full or failing)",
                "yellow",
            )
        self.sink_dropped = sink_dropped
        sinks = f" · {sink_dropped} not sent to sinks" if sink_dropped else ""
        view.status(
            f"following {self.client.url} · {view.shown} shown · {dropped} dropped{sinks}"
            f" · {self.missed} missed · Ctrl-C to stop"
        )


_SEVERAL_PROCESSES = (
    "the answers come from more than one process, each with its own traces (workers of"
    " a pre-fork server such as gunicorn -w N?): set WSGITRACE_STORE=FILE for the app so"
    " that they share one store, and follow it with 'wsgitrace tail --store FILE'"
    " (with a store set: it failed now and then, see the app's log)"
)


def _not_found_message(url: str) -> str:
    return (
        f"{url} answered 404: the trace endpoint is off (plain TraceMiddleware needs"
        " endpoint=True; FlaskTrace serves it in debug or testing mode) or it refused this"
        " client (loopback only unless a token or allow-list is configured; Host must be"
        " localhost, 127.0.0.1, [::1] or a configured host), or it is served under another"
        " prefix (prefix, WSGITRACE_PREFIX): then give the app's URL with that prefix."
    )
