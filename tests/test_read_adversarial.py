"""The read side under hostile input: odd query strings and headers sent to
``/_trace``, servers that answer ``tail`` and ``show`` with anything but the
endpoint's JSON, store files in a bad state, and traces full of text meant
for a terminal.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

import pytest
from werkzeug.test import Client

from wsgitrace import TraceMiddleware

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

LOCAL = {"REMOTE_ADDR": "127.0.0.1"}


def hello(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]


def traced_client() -> tuple[TraceMiddleware, Client]:
    middleware = TraceMiddleware(hello, endpoint=True)
    client = Client(middleware)
    client.get("/x", environ_base=LOCAL).close()
    return middleware, client


# -- the endpoint ----------------------------------------------------------------


def test_a_last_event_id_too_long_for_int_is_a_400(caplog: pytest.LogCaptureFixture) -> None:
    """A Last-Event-ID of thousands of digits (int() refuses over 4,300) is
    the 400 of any bad one, not an internal error with its traceback logged.
    """
    _, client = traced_client()
    with caplog.at_level(logging.DEBUG, logger="wsgitrace"):
        reply = client.get(
            "/_trace/stream", headers={"Last-Event-ID": "1" * 5000}, environ_base=LOCAL
        )
    assert reply.status_code == 400
    assert json.loads(reply.get_data())["param"] == "Last-Event-ID"
    assert not caplog.records
