"""A secret planted in a request never leaves through a trace: each test
plants one where a request or an app can carry it and reads the trace's
JSON form, which every output (``/_trace``, ``tail``, ``show``, the store,
OTLP, the pytest report) is made from.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import threading
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any

import pytest
from click.testing import CliRunner
from flask import Flask, request
from werkzeug.test import Client

import wsgitrace
from wsgitrace import TraceMiddleware
from wsgitrace._serve import _EndpointFront, _serve, traced
from wsgitrace.cli import main
from wsgitrace.endpoint import TraceEndpoint
from wsgitrace.flask import FlaskTrace
from wsgitrace.redact import REDACTED
from wsgitrace.trace import Trace

if TYPE_CHECKING:
    from collections.abc import Iterator

    from _typeshed.wsgi import StartResponse, WSGIEnvironment

SECRET = "s3cr3t-planted-0123"


def get(app: Flask, path: str) -> Trace:
    """The trace of one GET, its response closed."""
    ext = app.extensions["wsgitrace"]
    assert isinstance(ext, FlaskTrace)
    response = app.test_client().get(path)
    response.close()
    trace = ext.buffer.last
    assert trace is not None
    return trace


def test_path_converter_view_arg_is_redacted_in_the_path() -> None:
    """``<path:secret_path>`` holds slashes: the whole value leaves the
    path, not only a segment that happens to equal it.
    """
    app = Flask(__name__)

    @app.route("/files/<path:secret_path>")
    def files(secret_path: str) -> str:
        return "ok"

    FlaskTrace(app)
    trace = get(app, f"/files/a/{SECRET}/b.txt")
    assert trace.view_args == {"secret_path": REDACTED}
    assert trace.path == f"/files/{REDACTED}"
    assert SECRET not in trace.to_json()
    assert SECRET not in repr(trace)
    # Not ASCII: the path holds the value's UTF-8 bytes read as latin-1.
    trace = get(app, f"/files/caf%C3%A9/{SECRET}")
    assert trace.path == f"/files/{REDACTED}"
    assert SECRET not in trace.to_json()


def test_span_attributes_under_secret_names_are_redacted() -> None:
    """``span("login", password=...)`` keeps the attribute's name, not its
    value; the middleware's own ``redact`` names count too.
    """
    app = Flask(__name__)

    @app.route("/")
    def index() -> str:
        with wsgitrace.span("login", password=SECRET, user="bob"):
            pass
        with wsgitrace.span("sign", tenant_id=SECRET):
            pass
        return "ok"

    FlaskTrace(app, redact=["tenant"])
    trace = get(app, "/")
    assert trace.find(name="login")[0].attrs == {"password": REDACTED, "user": "bob"}
    assert trace.find(name="sign")[0].attrs == {"tenant_id": REDACTED}
    assert SECRET not in trace.to_json()


def test_credentials_in_url_valued_headers_are_redacted() -> None:
    """``https://user:password@host/`` in a ``Location`` or ``Referer``:
    the password is a secret whatever the query holds; a user name alone
    is often a token (``https://<token>@host/``), so it goes whole.
    """
    app = Flask(__name__)

    @app.route("/")
    def index() -> tuple[str, int, dict[str, str]]:
        return (
            "",
            302,
            {
                "Location": f"https://deploy:{SECRET}@git.example/repo?a=1",
                "Content-Location": f"//{SECRET}@cdn.example/x",
            },
        )

    FlaskTrace(app)
    response = app.test_client().get(
        "/", headers={"Referer": f"http://bob:{SECRET}@localhost/from"}
    )
    response.close()
    trace = app.extensions["wsgitrace"].buffer.last
    headers = dict(zip(trace.response_headers[::2], trace.response_headers[1::2], strict=True))
    assert headers["Location"] == f"https://deploy:{REDACTED}@git.example/repo?a=1"
    assert headers["Content-Location"] == f"//{REDACTED}@cdn.example/x"
    request_headers = dict(
        zip(trace.request_headers[::2], trace.request_headers[1::2], strict=True)
    )
    assert request_headers["Referer"] == f"http://bob:{REDACTED}@localhost/from"
    assert SECRET not in trace.to_json()


def test_run_request_log_redacts_query_and_secret_view_args(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``wsgitrace run`` logs each request line, as ``flask run`` does: the
    secrets its traces redact are redacted there too.
    """
    app = Flask(__name__)

    @app.route("/reset/<token>")
    def reset(token: str) -> str:
        return "ok"

    served, middleware = traced(app)
    endpoint = TraceEndpoint(middleware.buffer, middleware.options)
    front = _EndpointFront(served, endpoint)
    server = _serve(
        front, "127.0.0.1", 0, quiet=False, prefix="/_trace", redactor=middleware.redactor
    )
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    caplog.set_level(logging.INFO, logger="werkzeug")
    try:
        base = f"http://127.0.0.1:{server.port}"
        for path in (f"/reset/{SECRET}?page=2&api_key={SECRET}", f"/nowhere?token={SECRET}"):
            with contextlib.suppress(urllib.error.HTTPError):
                urllib.request.urlopen(base + path, timeout=10).close()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    lines = [r.getMessage() for r in caplog.records if r.name == "werkzeug"]
    assert any(f"/reset/{REDACTED}?page=2&api_key={REDACTED}" in line for line in lines), lines
    assert any(f"/nowhere?token={REDACTED}" in line for line in lines), lines
    assert not [line for line in lines if SECRET in line]


def test_request_secrets_are_cut_out_of_error_and_log_messages() -> None:
    """An error's message and traceback and a logged message are free text,
    kept as written, except for the values the trace redacts elsewhere: a
    view raising ``ValueError(f"bad token {token}")`` does not put the
    token in the trace; neither does logging a password the app parsed.
    """
    app = Flask(__name__)

    @app.route("/reset/<token>", methods=["POST"])
    def reset(token: str) -> str:
        app.logger.warning("reset with %s", request.form["new_password"])
        app.logger.warning("key %s, auth %s", request.args["api_key"], request.headers["X-Auth"])
        raise ValueError(f"bad token {token}")

    FlaskTrace(app)
    credentials = base64.b64encode(f"bob:{SECRET}-basic".encode()).decode()
    response = app.test_client().post(
        f"/reset/{SECRET}-view?api_key={SECRET}-query",
        data={"new_password": f"{SECRET}-form"},
        headers={"X-Auth": f"Bearer {SECRET}-bearer", "Authorization": f"Basic {credentials}"},
    )
    response.close()
    assert response.status_code == 500
    trace = app.extensions["wsgitrace"].buffer.last
    assert trace.error["message"] == f"bad token {REDACTED}"
    assert f"ValueError: bad token {REDACTED}" in trace.error["traceback"]
    messages = [e.attrs["message"] for e in trace.find(kind="log")]
    assert messages[:2] == [f"reset with {REDACTED}", f"key {REDACTED}, auth {REDACTED}"]
    assert SECRET not in trace.to_json()


def test_short_secret_values_are_not_cut_out_of_free_text() -> None:
    """A value of a few characters would garble line numbers and counts:
    the message keeps it (the trace's query still redacts it).
    """
    app = Flask(__name__)

    @app.route("/")
    def index() -> str:
        raise ValueError(f"pin {request.args['pin_token']} is wrong")

    FlaskTrace(app)
    response = app.test_client().get("/?pin_token=12345")
    response.close()
    trace = app.extensions["wsgitrace"].buffer.last
    assert trace.query == f"pin_token={REDACTED}"
    assert trace.error["message"] == "pin 12345 is wrong"


def test_secret_path_parameters_are_redacted() -> None:
    """``;jsessionid=...`` (a cookieless session, as Java servers add it)
    in the request's path or a ``Location``: checked as a query's pairs are.
    """
    app = Flask(__name__)

    @app.route("/")
    def index() -> tuple[str, int, dict[str, str]]:
        return "", 302, {"Location": f"/cart;jsessionid={SECRET};v=2?page=1"}

    FlaskTrace(app)
    trace = get(app, f"/shop;jsessionid={SECRET}/items")
    assert trace.status_code == 404
    assert trace.path == f"/shop;jsessionid={REDACTED}/items"
    assert SECRET not in trace.to_json()
    trace = get(app, "/")
    headers = dict(zip(trace.response_headers[::2], trace.response_headers[1::2], strict=True))
    assert headers["Location"] == f"/cart;jsessionid={REDACTED};v=2?page=1"
    assert SECRET not in trace.to_json()


@pytest.mark.parametrize(
    "url",
    [
        f"http://bob:{SECRET}@127.0.0.1:5000",
        f"http://{SECRET}@127.0.0.1:5000/_trace",
        f"http://127.0.0.1:5000/_trace/stream?token={SECRET}",
        f"http://bob:{SECRET}@[::1",
    ],
)
def test_cli_does_not_echo_credentials_of_a_refused_url(url: str) -> None:
    """``tail``/``show`` refuse a URL with a user name or password (the
    token has its own flag): the usage error names the URL, not the secret,
    which would go on to a CI log.
    """
    runner = CliRunner()
    for args in (["tail", url], ["show", "some-id", url]):
        result = runner.invoke(main, args)
        assert result.exit_code == 2, result.output
        assert "Invalid value for URL" in result.output
        assert SECRET not in result.output


def test_plain_wsgi_app_error_keeps_no_request_secret() -> None:
    """Not only Flask: a plain WSGI app's error that repeats a secret
    query value or header loses it in the trace.
    """

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        token = environ["QUERY_STRING"].partition("=")[2]
        raise RuntimeError(f"token {token} refused for {environ['HTTP_AUTHORIZATION']}")

    middleware = TraceMiddleware(app)
    with pytest.raises(RuntimeError):
        Client(middleware).get(
            f"/?access_token={SECRET}-q", headers={"Authorization": f"Bearer {SECRET}-h"}
        )
    trace = middleware.buffer.last
    assert trace is not None
    assert trace.error is not None
    assert trace.error["message"] == f"token {REDACTED} refused for {REDACTED}"
    assert SECRET not in trace.to_json()


@pytest.mark.parametrize("where", ["iteration", "close"])
def test_an_error_while_the_body_is_sent_keeps_no_request_secret(where: str) -> None:
    """A body that fails while it is iterated or closed, with a secret query
    value in its message: the trace's error has it cut out too.
    """

    class Body:
        def __init__(self, token: str) -> None:
            self.token = token

        def __iter__(self) -> Iterator[bytes]:
            yield b"x"
            if where == "iteration":
                raise RuntimeError(f"stream failed for token {self.token}")

        def close(self) -> None:
            if where == "close":
                raise RuntimeError(f"close failed for token {self.token}")

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Body:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Body(environ["QUERY_STRING"].partition("=")[2])

    def read_and_close(response: Any) -> None:
        try:
            response.get_data()
        finally:
            response.close()

    middleware = TraceMiddleware(app)
    response = Client(middleware).get(f"/?token={SECRET}-b")
    with pytest.raises(RuntimeError):
        read_and_close(response)
    trace = middleware.buffer.last
    assert trace is not None
    assert trace.error is not None
    assert (trace.error["where"], trace.error["message"]) == (
        where,
        f"{'stream' if where == 'iteration' else 'close'} failed for token {REDACTED}",
    )
    assert SECRET not in trace.to_json()


def test_each_request_logs_without_its_own_secrets() -> None:
    """The environ's secrets are read once per request for its log records:
    each request's records lose that request's token, not the previous
    one's, and a form parsed after the first record still counts.
    """
    app = Flask(__name__)

    @app.route("/", methods=["POST"])
    def index() -> str:
        app.logger.warning("first: token %s", request.args["token"])
        app.logger.warning("then: password %s", request.form["password"])
        app.logger.warning("again: token %s", request.args["token"])
        return "ok"

    ext = FlaskTrace(app)
    client = app.test_client()
    for n in range(3):
        client.post(f"/?token={SECRET}-t{n}", data={"password": f"{SECRET}-p{n}"}).close()
        trace = ext.buffer.last
        assert trace is not None
        assert [e.attrs["message"] for e in trace.find(kind="log")] == [
            f"first: token {REDACTED}",
            f"then: password {REDACTED}",
            f"again: token {REDACTED}",
        ]
        assert SECRET not in trace.to_json()
