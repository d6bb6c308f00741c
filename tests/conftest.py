"""Shared fixtures: an injected clock, WSGI environs and a small in-process
server loop that behaves like wsgiref's handler (headers sent on the first
non-empty chunk, ``exc_info`` re-raised once they are, ``close()`` always).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import itertools
import os
import socket
import subprocess
import sys
import threading
import time
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from wsgiref.util import FileWrapper, setup_testing_defaults

import pytest

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication, WSGIEnvironment


class FakeClock:
    """A nanosecond clock that advances by ``step`` on every call, and by
    :meth:`advance` when a test says so. Thread-safe.
    """

    def __init__(self, start: int = 1_000_000_000, step: int = 0) -> None:
        self.value = start
        self.step = step
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self) -> int:
        with self._lock:
            self.calls += 1
            self.value += self.step
            return self.value

    def advance(self, ns: int) -> None:
        with self._lock:
            self.value += ns


class FailingInput:
    """A ``wsgi.input`` that fails the test on any read."""

    def read(self, *args: Any) -> bytes:
        raise AssertionError("wsgi.input was read")

    def readline(self, *args: Any) -> bytes:
        raise AssertionError("wsgi.input was read")

    def readlines(self, *args: Any) -> list[bytes]:
        raise AssertionError("wsgi.input was read")

    def __iter__(self) -> Iterator[bytes]:
        raise AssertionError("wsgi.input was iterated")

    def close(self) -> None:
        raise AssertionError("wsgi.input was closed")


@dataclass
class Response:
    """What a server sent for one request."""

    status: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    chunks: list[bytes] = field(default_factory=list)
    error: BaseException | None = None

    def outcome(self) -> tuple[Any, ...]:
        """Everything a client could observe, comparable across runs."""
        error = None if self.error is None else (type(self.error), str(self.error))
        return (self.status, self.headers, self.body, error)


class MakeEnviron(Protocol):
    def __call__(
        self,
        path: str = "/",
        method: str = "GET",
        query: str = "",
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> WSGIEnvironment: ...


class Serve(Protocol):
    def __call__(
        self, app: WSGIApplication, environ: WSGIEnvironment, *, max_chunks: int | None = None
    ) -> Response: ...


def make_environ(
    path: str = "/",
    method: str = "GET",
    query: str = "",
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> WSGIEnvironment:
    """A complete, validator-clean environ whose ``wsgi.input`` fails on read."""
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "wsgi.input": FailingInput(),
        "wsgi.errors": io.StringIO(),
        "wsgi.file_wrapper": FileWrapper,
    }
    for name, value in (headers or {}).items():
        key = name.upper().replace("-", "_")
        if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            key = "HTTP_" + key
        environ[key] = value
    environ.update(extra)
    setup_testing_defaults(environ)
    return environ


def serve(
    app: WSGIApplication, environ: WSGIEnvironment, *, max_chunks: int | None = None
) -> Response:
    """Run one request the way a server does; ``max_chunks`` stops iterating
    early, as a server does when the client disconnects. Exceptions are kept
    on the response, not raised.
    """
    response = Response()
    sent = False

    def write(data: bytes) -> None:
        nonlocal sent
        assert isinstance(data, bytes)
        assert response.status is not None, "write() before start_response()"
        if data:
            sent = True
        response.chunks.append(data)

    def start_response(
        status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], None]:
        if exc_info is not None:
            try:
                if sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        response.status = status
        response.headers = list(headers)
        return write

    try:
        body = app(environ, start_response)
    except BaseException as exc:
        response.error = exc
        return response
    try:
        for chunk in itertools.islice(body, max_chunks):
            write(chunk)
    except BaseException as exc:
        response.error = exc
    finally:
        close = getattr(body, "close", None)
        del body
        if close is not None:
            try:
                close()
            except BaseException as exc:
                if response.error is None:
                    response.error = exc
    response.body = b"".join(response.chunks)
    return response


@dataclass
class Exchange:
    """One request served, with the environ the app saw. ``log`` and
    ``raised`` are lists the test apps append to (steps taken, exceptions
    raised).
    """

    response: Response
    environ: WSGIEnvironment

    @property
    def log(self) -> list[Any]:
        return self.environ["test.log"]  # type: ignore[no-any-return]

    @property
    def raised(self) -> list[BaseException]:
        return self.environ["test.raised"]  # type: ignore[no-any-return]


class Exchanger(Protocol):
    def __call__(
        self,
        app: WSGIApplication,
        path: str = "/",
        method: str = "GET",
        *,
        query: str = "",
        headers: dict[str, str] | None = None,
        max_chunks: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Exchange: ...


def exchange(
    app: WSGIApplication,
    path: str = "/",
    method: str = "GET",
    *,
    query: str = "",
    headers: dict[str, str] | None = None,
    max_chunks: int | None = None,
    extra: dict[str, Any] | None = None,
) -> Exchange:
    """Serve one request made with :func:`make_environ`."""
    environ = make_environ(
        path, method, query, headers, **{"test.log": [], "test.raised": [], **(extra or {})}
    )
    return Exchange(serve(app, environ, max_chunks=max_chunks), environ)


@pytest.fixture(name="clock")
def fixture_clock() -> FakeClock:
    """A clock that only moves when the test (or the app) advances it."""
    return FakeClock()


@pytest.fixture(name="make_environ")
def fixture_make_environ() -> MakeEnviron:
    return make_environ


@pytest.fixture(name="serve")
def fixture_serve() -> Serve:
    return serve


@pytest.fixture(name="exchange")
def fixture_exchange() -> Exchanger:
    return exchange


# -- real servers -----------------------------------------------------------------

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(name="plain_wsgi", scope="session")
def fixture_plain_wsgi() -> types.ModuleType:
    """The ``examples/plain_wsgi.py`` module."""
    spec = importlib.util.spec_from_file_location("plain_wsgi", EXAMPLES / "plain_wsgi.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _gunicorn(
    app_spec: str, log: Path, *, chdir: Path = EXAMPLES, worker_class: str = "sync"
) -> Iterator[int]:
    """Serve ``app_spec`` (``module:app``, run from ``chdir``) with one
    gunicorn worker on a socket bound here (``fd://``), so the port is known
    with no race; yield the port. ``gthread`` gets 4 threads (a sync worker
    given threads would silently become one).
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSGITRACE_")}
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        "--workers=1",
        f"--worker-class={worker_class}",
        *(["--threads=4"] if worker_class == "gthread" else []),
        f"--bind=fd://{listener.fileno()}",
        f"--chdir={chdir}",
        "--timeout=20",
        "--graceful-timeout=2",
        app_spec,
    ]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, pass_fds=(listener.fileno(),), stdout=out, stderr=subprocess.STDOUT, env=env
        )
    listener.close()
    try:
        # Connections queue on the listening socket until the worker is up.
        with socket.create_connection(("127.0.0.1", port), timeout=20) as probe:
            probe.sendall(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            with probe.makefile("rb") as answer:
                assert answer.read(12) == b"HTTP/1.0 200", log.read_text()
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    # wsgitrace logs its own errors once per place; there must be none.
    assert "wsgitrace: internal error" not in log.read_text(errors="replace")


@pytest.fixture(name="gunicorn")
def fixture_gunicorn() -> Callable[..., contextlib.AbstractContextManager[int]]:
    """``with gunicorn(app_spec, log, chdir=..., worker_class=...) as port:``"""
    return _gunicorn


@pytest.fixture(name="gunicorn_traced", scope="module")
def fixture_gunicorn_traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """Port of gunicorn serving ``plain_wsgi:application`` (traced, /_trace on)."""
    with _gunicorn(
        "plain_wsgi:application", tmp_path_factory.mktemp("gunicorn") / "traced.log"
    ) as port:
        yield port


@pytest.fixture(name="gunicorn_plain", scope="module")
def fixture_gunicorn_plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """Port of gunicorn serving ``plain_wsgi:app`` (untraced)."""
    with _gunicorn("plain_wsgi:app", tmp_path_factory.mktemp("gunicorn") / "plain.log") as port:
        yield port


class ServeInThread(Protocol):
    def __call__(self, app: WSGIApplication) -> int: ...


@pytest.fixture(name="werkzeug_server")
def fixture_werkzeug_server() -> Iterator[ServeInThread]:
    """Serve apps with werkzeug's threaded server in this process; returns
    a function taking the app and giving its port. Servers stop at teardown.
    """
    from werkzeug.serving import make_server

    running: list[tuple[Any, threading.Thread]] = []

    def start(app: WSGIApplication) -> int:
        server = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        thread.start()
        running.append((server, thread))
        return int(server.server_port)

    yield start
    for server, thread in running:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
        assert not thread.is_alive()


def wait_for(predicate: Callable[[], Any], timeout: float = 15.0) -> Any:
    """Poll ``predicate`` until it returns something truthy, or fail."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(0.02)


@pytest.fixture(name="wait_for")
def fixture_wait_for() -> Callable[..., Any]:
    return wait_for


def _fork() -> int:
    """``os.fork()`` without the DeprecationWarning Python gives when other
    threads run: these tests fork with threads on purpose.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return os.fork()


@pytest.fixture(name="fork")
def fixture_fork() -> Callable[[], int]:
    return _fork
