"""A plain WSGI app (no framework), traced.

Serve it, then watch its requests from another terminal::

    python examples/plain_wsgi.py                         # werkzeug, 127.0.0.1:5000
    gunicorn --chdir examples plain_wsgi:application      # or any WSGI server
    wsgitrace tail

Routes: ``/`` says hello; ``/stream?chunks=N&size=B&delay=S`` streams ``N``
chunks of ``B`` bytes from a generator (``start_response`` is only called
when the server starts iterating); ``/write`` uses the legacy ``write()``
callable; ``/error`` raises. The traces are on ``/_trace`` (JSON, loopback
clients only), which is how ``wsgitrace tail`` reads them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from wsgitrace import TraceMiddleware, span

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

HELLO = b"Hello, World!\n"
TEXT = ("Content-Type", "text/plain; charset=utf-8")


def _number(query: dict[str, list[str]], name: str, default: float, most: float) -> float:
    try:
        value = float(query[name][0])
    except (KeyError, ValueError):
        return default
    return min(max(value, 0), most)


def stream(environ: WSGIEnvironment, start_response: StartResponse) -> Iterator[bytes]:
    """A generator body: nothing runs until the server asks for the first chunk."""
    query = parse_qs(environ.get("QUERY_STRING", ""))
    chunks = int(_number(query, "chunks", 10, 100_000))
    size = int(_number(query, "size", 16, 1 << 20)) or 1
    delay = _number(query, "delay", 0, 1)
    with span("prepare", chunks=chunks, size=size):
        chunk = b"x" * (size - 1) + b"\n"
    start_response("200 OK", [TEXT])
    for _ in range(chunks):
        yield chunk
        if delay:
            time.sleep(delay)


def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """The untraced app."""
    path = environ.get("PATH_INFO") or "/"
    if path == "/":
        start_response("200 OK", [TEXT, ("Content-Length", str(len(HELLO)))])
        return [HELLO]
    if path == "/stream":
        return stream(environ, start_response)
    if path == "/write":
        write = start_response("200 OK", [TEXT])
        write(b"written, ")
        return [b"then returned\n"]
    if path == "/error":
        msg = "this route always fails"
        raise RuntimeError(msg)
    start_response("404 Not Found", [TEXT, ("Content-Length", "10")])
    return [b"Not Found\n"]


#: What a server runs: the app, traced, with ``/_trace`` on for loopback.
application = TraceMiddleware(app, endpoint=True)


if __name__ == "__main__":
    from werkzeug.serving import run_simple

    run_simple("127.0.0.1", 5000, application, threaded=True)
