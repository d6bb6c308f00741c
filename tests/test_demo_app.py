"""The bundled example app (``wsgitrace.demo_app``), traced: each route's
hook order and state, the same responses as untraced, and a streamed
response through a real server.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import threading
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from werkzeug.serving import BaseWSGIServer, make_server

from wsgitrace.demo_app import create_app
from wsgitrace.flask import FlaskTrace
from wsgitrace.trace import Trace

ROOT = Path(__file__).resolve().parent.parent
Outcome = tuple[str, list[tuple[str, str]], bytes]
#: Flask 3.1's stream_with_context tears the contexts down twice (see /stream).
TEARDOWN_TWICE = tuple(map(int, version("flask").split(".")[:2])) >= (3, 1)


def fetch(app: Flask, path: str, headers: dict[str, str] | None = None) -> Outcome:
    """Status, headers and body as a client sees them; the response is closed."""
    response = app.test_client().get(path, headers=headers)
    try:
        return response.status, list(response.headers.items()), response.get_data()
    finally:
        response.close()


@pytest.fixture(name="demo")
def fixture_demo() -> tuple[Flask, Flask, FlaskTrace]:
    """A fresh untraced demo app and a fresh traced one."""
    plain = create_app()
    traced = create_app()
    return plain, traced, FlaskTrace(traced)


ROUTES: list[tuple[str, dict[str, str], str, list[str]]] = [
    (
        "/",
        {},
        "200 OK",
        [
            "before_request:load_user",
            "view:index",
            "context_processor:_default_template_ctx_processor",
            "context_processor:inject_site",
            "after_request:add_server_timing",
            "teardown_appcontext:close_db",
        ],
    ),
    (
        "/admin/",
        {},
        "403 FORBIDDEN",
        [
            "before_request:load_user",
            "before_request:admin.require_admin",
            "after_request:add_server_timing",
            "teardown_appcontext:close_db",
        ],
    ),
    (
        "/admin/",
        {"X-User": "admin"},
        "200 OK",
        [
            "before_request:load_user",
            "before_request:admin.require_admin",
            "view:admin.dashboard",
            "after_request:add_server_timing",
            "teardown_appcontext:close_db",
        ],
    ),
    (
        "/api/v1/items/tea",
        {},
        "200 OK",
        [
            "url_value_preprocessor:api.v1.pull_item",
            "before_request:load_user",
            "view:api.v1.item",
            "after_request:api.v1.api_version",
            "after_request:add_server_timing",
            "teardown_appcontext:close_db",
        ],
    ),
    (
        "/api/v1/items/zzz",
        {},
        "404 NOT FOUND",
        [
            "url_value_preprocessor:api.v1.pull_item",
            "before_request:load_user",
            "view:api.v1.item",
            "errorhandler:not_found",
            "after_request:api.v1.api_version",
            "after_request:add_server_timing",
            "teardown_appcontext:close_db",
        ],
    ),
    (
        "/stream?n=3",
        {},
        "200 OK",
        [
            "before_request:load_user",
            "view:stream",
            "after_request:add_server_timing",
            # stream_with_context pushes the contexts again for the body, so
            # Flask 3.1 tears the app context down when the view returns and
            # again after the body (Flask 3.0 only after the body).
            *["teardown_appcontext:close_db"] * (2 if TEARDOWN_TWICE else 1),
        ],
    ),
    (
        "/boom",
        {},
        "500 INTERNAL SERVER ERROR",
        [
            "before_request:load_user",
            "view:boom",
            "after_request:add_server_timing",
            "teardown_appcontext:close_db",
        ],
    ),
    (
        "/missing",
        {},
        "404 NOT FOUND",
        [
            "before_request:load_user",
            "errorhandler:not_found",
            "after_request:add_server_timing",
            "teardown_appcontext:close_db",
        ],
    ),
]


@pytest.mark.parametrize(
    ("path", "headers", "status", "hooks"),
    ROUTES,
    ids=[f"{p}{' as admin' if h else ''}" for p, h, _, _ in ROUTES],
)
def test_route_hook_order(
    demo: tuple[Flask, Flask, FlaskTrace],
    path: str,
    headers: dict[str, str],
    status: str,
    hooks: list[str],
) -> None:
    """Each route: the exact hook order, the same response as untraced."""
    plain, traced, ext = demo
    got = fetch(traced, path, headers)
    assert got == fetch(plain, path, headers)
    assert got[0] == status
    trace = ext.buffer.latest(1)[0]
    assert trace.finished
    assert trace.hooks() == hooks
    assert trace.status == status
    assert trace.bytes_sent == len(got[2])
    assert json.loads(trace.to_json())["hooks"] == len(hooks)


def test_route_state(demo: tuple[Flask, Flask, FlaskTrace]) -> None:
    """What the demo's hooks leave behind: g keys, short-circuit, view args,
    the error of /boom, the template.
    """
    _, app, ext = demo

    def trace_of(path: str, headers: dict[str, str] | None = None) -> Trace:
        fetch(app, path, headers)
        return ext.buffer.latest(1)[0]

    index = trace_of("/", {"X-User": "ann"})
    assert index.g == {"user": "'ann'"}
    [template] = index.find(kind="template")
    assert template.name == "template:index.html"
    [view] = index.find(kind="view")
    assert view.attrs["g_added"] == ["db"]
    [close_db] = index.find(kind="teardown_appcontext")
    assert close_db.attrs["g_removed"] == ["db"]

    admin = trace_of("/admin/")
    [require] = admin.find(name="before_request:admin.require_admin")
    assert require.attrs["short_circuit"] is True
    assert admin.endpoint == "admin.dashboard"

    item = trace_of("/api/v1/items/tea")
    assert (item.endpoint, item.rule) == ("api.v1.item", "/api/v1/items/<item>")
    assert item.view_args == {"item": "tea"}
    assert item.find(kind="url_value_preprocessor")[0].attrs["g_added"] == ["item"]
    assert item.g == {"item": "'tea'", "user": "None"}

    boom = trace_of("/boom")
    assert boom.error is not None
    assert boom.error["type"] == "builtins.RuntimeError"
    assert [e.attrs["exception"] for e in boom.find(name="signal:got-request-exception")] == [
        "RuntimeError"
    ]

    missing = trace_of("/missing")
    assert missing.find(kind="url_match")[0].attrs == {"error": "NotFound", "code": 404}
    assert missing.find(kind="errorhandler")[0].attrs["exception"] == "NotFound"


def test_example_script_traces_the_demo() -> None:
    """examples/flask_app.py builds the demo app with FlaskTrace installed."""
    spec = importlib.util.spec_from_file_location(
        "wsgitrace_example_flask_app", ROOT / "examples" / "flask_app.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    app: Flask = module.app
    assert app.extensions["wsgitrace"] is module.tracing
    assert fetch(app, "/api/v1/items/jam")[0] == "200 OK"
    assert module.tracing.buffer.latest(1)[0].hooks()[2] == "view:api.v1.item"


# -- through a real server -----------------------------------------------------


@pytest.fixture(name="served")
def fixture_served() -> Iterator[tuple[BaseWSGIServer, FlaskTrace]]:
    """The traced demo app on werkzeug's server, 127.0.0.1, in a thread."""
    app = create_app()
    ext = FlaskTrace(app)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    server.timeout = 1
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    try:
        yield server, ext
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()
        assert not thread.is_alive()


def wait_finished(ext: FlaskTrace, path: str, timeout: float = 10.0) -> Trace:
    """The trace of ``path`` once the server has closed its response."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for trace in ext.buffer.latest():
            if trace.path == path and trace.finished:
                return trace
        time.sleep(0.01)
    raise AssertionError(f"no finished trace for {path} within {timeout} s")


def get(server: BaseWSGIServer, path: str, headers: dict[str, str] | None = None) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def test_streamed_response_through_a_real_server(
    served: tuple[BaseWSGIServer, FlaskTrace],
) -> None:
    """A streamed body read over a socket: the trace has the status, every
    byte, the close, and the second teardown after the body started.
    """
    server, ext = served
    status, headers, body = get(server, "/stream?n=50", {"X-User": "ann"})
    assert status == 200
    assert headers["X-Demo"] == "wsgitrace"
    lines = body.decode().splitlines()
    assert lines[0] == "chunk 0 for ann"
    assert len(lines) == 50
    trace = wait_finished(ext, "/stream")
    assert trace.status == "200 OK"
    assert trace.bytes_sent == len(body)
    assert trace.chunks >= 50
    assert trace.ttfb_ms is not None
    assert trace.query == "n=50"
    [body_event] = trace.find(kind="body")
    [close] = trace.find(kind="close")
    assert body_event.attrs["bytes"] == len(body)
    *first, second = trace.find(kind="teardown_appcontext")
    assert len(first) == (1 if TEARDOWN_TWICE else 0)
    assert all(event.end_ns <= body_event.start_ns for event in first)
    assert body_event.start_ns < second.start_ns
    assert second.end_ns <= close.end_ns
    assert trace.hooks()[-1] == "teardown_appcontext:close_db"
    assert trace.g == {"user": "'ann'"}
    assert trace.state == "finished"


def test_plain_responses_through_a_real_server(
    served: tuple[BaseWSGIServer, FlaskTrace],
) -> None:
    """Ordinary routes over a socket are traced with status and bytes."""
    server, ext = served
    status, _, body = get(server, "/admin/", {"X-User": "admin"})
    assert status == 200
    assert json.loads(body) == {"user": "admin", "users": 1}
    trace = wait_finished(ext, "/admin/")
    assert trace.status == "200 OK"
    assert trace.bytes_sent == len(body)
    assert trace.remote_addr == "127.0.0.1"
    assert trace.hooks() == [
        "before_request:load_user",
        "before_request:admin.require_admin",
        "view:admin.dashboard",
        "after_request:add_server_timing",
        "teardown_appcontext:close_db",
    ]
    status, _, _ = get(server, "/boom")
    assert status == 500
    assert wait_finished(ext, "/boom").status == "500 INTERNAL SERVER ERROR"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/slow?ms=abc", {"slept_ms": 120}),
        ("/slow?ms=nan", {"slept_ms": 120}),
        ("/slow?ms=-5", {"slept_ms": 0}),
        ("/slow?ms=3", {"slept_ms": 3}),
        ("/stream?n=x", "".join(f"chunk {i} for guest\n" for i in range(5))),
        ("/stream?n=-2", ""),
    ],
)
def test_query_values_that_are_not_usable_are_not_errors(path: str, body: object) -> None:
    """A query value the demo cannot use (not a number, negative) falls back
    to the default or the bound: /boom is the demo's one error route.
    """
    status, _, data = fetch(create_app(), path)
    assert status == "200 OK"
    assert (json.loads(data) if isinstance(body, dict) else data.decode()) == body
