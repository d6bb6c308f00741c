"""Shared fixtures: an injected clock, WSGI environs and a small in-process
server loop that behaves like wsgiref's handler (headers sent on the first
non-empty chunk, ``exc_info`` re-raised once they are, ``close()`` always).
"""

from __future__ import annotations

import gc
import io
import itertools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    """Run finalizers inside the test that made the garbage, so a body that
    was never closed (or a validator's unclosed-iterator assertion) fails the
    test that caused it.
    """
    yield
    gc.collect()
