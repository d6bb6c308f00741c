"""OTLP export: traces sent to an OTLP/HTTP receiver on 127.0.0.1, decoded
with ``opentelemetry-proto``: span names, parent/child structure, timings,
semantic-convention attributes, and no secret ever leaving the process.
"""

from __future__ import annotations

import http.server
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest
from flask import Blueprint, Flask, g, render_template
from jinja2 import DictLoader

# In the test extra: a missing one is a failure, not a skip.
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from werkzeug.test import Client

from wsgitrace import Trace, TraceMiddleware
from wsgitrace.flask import FlaskTrace

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

SECRET_HEADER = "Bearer hdr-s3cr3t-0123456789"
SECRET_QUERY = "qry-s3cr3t-9876543210"


@dataclass
class Receiver:
    """A tiny OTLP/HTTP collector: keeps each POST /v1/traces body."""

    port: int = 0
    bodies: list[bytes] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    status: int = 200
    #: When set, every export waits for it before being answered.
    release: threading.Event | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spans(self) -> list[Any]:
        """Every span received, decoded, with its resource's attributes."""
        found = []
        for body in self.bodies:
            request = trace_service_pb2.ExportTraceServiceRequest()
            request.ParseFromString(body)
            for resource_spans in request.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    assert scope_spans.scope.name == "wsgitrace"
                    found.extend(scope_spans.spans)
        return found


@pytest.fixture(name="receiver")
def fixture_receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    """A receiver on 127.0.0.1, with OTEL_EXPORTER_OTLP_ENDPOINT pointing at it."""
    receiver = Receiver()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            receiver.paths.append(self.path)
            if receiver.release is not None:
                receiver.release.wait(15)
            if receiver.status == 200:
                receiver.bodies.append(body)
            self.send_response(receiver.status)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    for name in ("ENDPOINT", "TRACES_ENDPOINT", "HEADERS", "TRACES_HEADERS", "COMPRESSION"):
        monkeypatch.delenv(f"OTEL_EXPORTER_OTLP_{name}", raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "2")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "shop")
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def make_flask_app() -> Flask:
    app = Flask(__name__)
    app.jinja_loader = DictLoader({"hello.html": "Hello {{ name }}!"})

    @app.before_request
    def load_user() -> None:
        g.user = "ann"

    @app.route("/hello/<name>")
    def hello(name: str) -> str:
        time.sleep(0.002)
        return render_template("hello.html", name=name)

    @app.after_request
    def add_header(response: Any) -> Any:
        response.headers["X-Done"] = "1"
        return response

    @app.teardown_request
    def close_db(exc: BaseException | None) -> None:
        pass

    return app


def by_name(spans: list[Any]) -> dict[str, Any]:
    named = {span.name: span for span in spans}
    assert len(named) == len(spans), [span.name for span in spans]
    return named


def attributes(span_or_event: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in span_or_event.attributes:
        value = kv.value
        kind = value.WhichOneof("value")
        if kind == "array_value":
            out[kv.key] = [v.string_value for v in value.array_value.values]
        else:
            out[kv.key] = getattr(value, kind)
    return out


def test_flask_request_becomes_a_span_tree(
    receiver: Receiver, wait_for: Callable[..., Any]
) -> None:
    """One SERVER span per request; hooks, view and template as children,
    nested by time; span events; HTTP semantic-convention attributes.
    """
    app = make_flask_app()
    ext = FlaskTrace(app, otlp=True)
    response = Client(app).get("/hello/bob", headers={"User-Agent": "pytest"})
    assert response.text == "Hello bob!"
    response.close()
    [trace] = ext.buffer.latest(1)
    assert ext.middleware.sinks is not None
    wait_for(lambda: ext.middleware.sinks.delivered == 1, timeout=10)
    assert receiver.paths == ["/v1/traces"]

    spans = by_name(receiver.spans())
    assert set(spans) == {
        "GET /hello/<name>",
        "before_request:load_user",
        "view:hello",
        "context_processor:_default_template_ctx_processor",
        "template:hello.html",
        "after_request:add_header",
        "teardown_request:close_db",
    }
    root = spans["GET /hello/<name>"]
    assert root.kind == root.SPAN_KIND_SERVER
    assert root.parent_span_id == b""
    assert {span.trace_id for span in spans.values()} == {root.trace_id}
    for name in ("before_request:load_user", "view:hello", "after_request:add_header"):
        assert spans[name].parent_span_id == root.span_id, name
        assert spans[name].kind == root.SPAN_KIND_INTERNAL
    view_id = spans["view:hello"].span_id
    assert spans["template:hello.html"].parent_span_id == view_id
    assert spans["context_processor:_default_template_ctx_processor"].parent_span_id == view_id

    # Timings: the root spans the request, children lie inside their parent.
    assert trace.duration_ns is not None
    assert root.end_time_unix_nano - root.start_time_unix_nano == pytest.approx(
        trace.duration_ns, abs=1000
    )
    assert abs(root.start_time_unix_nano / 1e9 - trace.wall_time) < 1e-5
    for span in spans.values():
        parent = next((s for s in spans.values() if s.span_id == span.parent_span_id), None)
        if parent is not None:
            assert parent.start_time_unix_nano <= span.start_time_unix_nano
            assert span.end_time_unix_nano <= parent.end_time_unix_nano
    view = spans["view:hello"]
    assert view.end_time_unix_nano - view.start_time_unix_nano >= 2_000_000
    order = sorted(spans.values(), key=lambda s: s.start_time_unix_nano)
    assert [s.name for s in order if s.parent_span_id == root.span_id] == [
        "before_request:load_user",
        "view:hello",
        "after_request:add_header",
        "teardown_request:close_db",
    ]

    events = [event.name for event in root.events]
    assert events == ["start_response", "first_byte", "close"]
    times = [event.time_unix_nano for event in root.events]
    assert times == sorted(times)
    assert root.start_time_unix_nano <= times[0] <= times[-1] <= root.end_time_unix_nano

    attrs = attributes(root)
    assert attrs["http.request.method"] == "GET"
    assert attrs["url.path"] == "/hello/bob"
    assert attrs["http.route"] == "/hello/<name>"
    assert attrs["http.response.status_code"] == 200
    assert attrs["user_agent.original"] == "pytest"
    assert attrs["wsgitrace.id"] == trace.id
    assert attrs["wsgitrace.endpoint"] == "hello"
    assert "error.type" not in attrs
    assert attributes(spans["view:hello"])["wsgitrace.kind"] == "view"

    request = trace_service_pb2.ExportTraceServiceRequest()
    request.ParseFromString(receiver.bodies[0])
    resource = attributes(request.resource_spans[0].resource)
    assert resource["service.name"] == "shop"


def test_an_attribute_without_a_value_is_left_out(
    receiver: Receiver, wait_for: Callable[..., Any]
) -> None:
    """An app-level hook has no blueprint: its span has no
    ``wsgitrace.blueprint`` attribute, not the string ``"null"``; a
    blueprint's hook has its blueprint's name.
    """
    app = make_flask_app()
    shop = Blueprint("shop", __name__)

    @shop.before_request
    def check_basket() -> None:
        pass

    shop.add_url_rule("/shop", "index", lambda: "shop")
    app.register_blueprint(shop)
    ext = FlaskTrace(app, otlp=True)
    app.test_client().get("/shop").close()
    assert ext.middleware.sinks is not None
    wait_for(lambda: ext.middleware.sinks.delivered == 1, timeout=10)
    spans = by_name(receiver.spans())
    assert "wsgitrace.blueprint" not in attributes(spans["before_request:load_user"])
    hook = attributes(spans["before_request:shop.check_basket"])
    assert hook["wsgitrace.blueprint"] == "shop"
    assert "null" not in attributes(spans["view:shop.index"]).values()


def test_a_user_span_that_raised_is_an_error(
    receiver: Receiver, wait_for: Callable[..., Any]
) -> None:
    """A wsgitrace.span() left by an exception is marked ERROR (the view
    handled it: the request's span is not); one that did not raise is not.
    """
    import wsgitrace

    app = Flask(__name__)

    @app.route("/charge")
    def charge() -> str:
        with wsgitrace.span("lookup"):
            pass
        try:
            with wsgitrace.span("card"):
                raise ValueError("declined")
        except ValueError:
            return "retry later"
        return "ok"

    ext = FlaskTrace(app, otlp=True)
    app.test_client().get("/charge").close()
    assert ext.middleware.sinks is not None
    wait_for(lambda: ext.middleware.sinks.delivered == 1, timeout=10)
    spans = by_name(receiver.spans())
    card = spans["card"]
    assert card.status.code == card.status.STATUS_CODE_ERROR
    assert card.status.message == "ValueError"
    assert spans["lookup"].status.code == card.status.STATUS_CODE_UNSET
    assert spans["GET /charge"].status.code == card.status.STATUS_CODE_UNSET


def test_redacted_values_never_leave_the_process(
    receiver: Receiver, wait_for: Callable[..., Any]
) -> None:
    """An Authorization header and a ?token= query are redacted in the
    exported bytes; neither secret appears anywhere in them.
    """
    app = make_flask_app()
    ext = FlaskTrace(app, otlp=True)
    client = Client(app)
    client.set_cookie("session", "c00kie-s3cr3t")
    client.get(
        f"/hello/eve?token={SECRET_QUERY}&page=2", headers={"Authorization": SECRET_HEADER}
    ).close()
    assert ext.middleware.sinks is not None
    wait_for(lambda: ext.middleware.sinks.delivered == 1, timeout=10)
    raw = b"".join(receiver.bodies)
    assert raw
    for secret in (SECRET_HEADER, SECRET_QUERY, "s3cr3t", "c00kie"):
        assert secret.encode() not in raw
    root = by_name(receiver.spans())["GET /hello/<name>"]
    attrs = attributes(root)
    assert attrs["url.query"] == "token=[redacted]&page=2"
    # Header attributes are opt-in in the conventions: none but the user agent.
    assert not [key for key in attrs if key.startswith("http.request.header.")]


def app_with_error(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
    msg = "it broke"
    raise RuntimeError(msg)


def test_error_and_incoming_traceparent(receiver: Receiver, wait_for: Callable[..., Any]) -> None:
    """An app error marks the span ERROR with an exception event; a
    traceparent header makes it a child of the caller's span.
    """
    app = TraceMiddleware(app_with_error, otlp=True)
    parent_trace = "0af7651916cd43dd8448eb211c80319c"
    parent_span = "b7ad6b7169203331"
    with pytest.raises(RuntimeError):
        Client(app).get("/x", headers={"traceparent": f"00-{parent_trace}-{parent_span}-01"})
    assert app.sinks is not None
    wait_for(lambda: app.sinks is not None and app.sinks.delivered == 1, timeout=10)
    [root] = receiver.spans()
    assert root.name == "GET"
    assert root.trace_id.hex() == parent_trace
    assert root.parent_span_id.hex() == parent_span
    assert root.status.code == root.status.STATUS_CODE_ERROR
    assert attributes(root)["error.type"] == "builtins.RuntimeError"
    [exception] = [event for event in root.events if event.name == "exception"]
    assert attributes(exception)["exception.message"] == "it broke"


def test_non_ascii_path_and_query_are_exported_as_sent(
    receiver: Receiver, wait_for: Callable[..., Any]
) -> None:
    """url.path and url.query hold the UTF-8 text the client sent, not the
    latin-1 form of its bytes that WSGI gives the trace.
    """
    app = TraceMiddleware(app_with_error, otlp=True)
    with pytest.raises(RuntimeError):
        # A client that sends the query's UTF-8 bytes unescaped.
        Client(app).get("/caf%C3%A9/%E2%82%AC", environ_overrides={"QUERY_STRING": "q=\xc3\xa9"})
    wait_for(lambda: app.sinks is not None and app.sinks.delivered == 1, timeout=10)
    [root] = receiver.spans()
    attrs = attributes(root)
    assert (attrs["url.path"], attrs["url.query"]) == ("/café/€", "q=é")


def test_traceparent_is_followed_without_captured_headers(
    receiver: Receiver, wait_for: Callable[..., Any]
) -> None:
    """The caller's trace is continued whether or not headers are captured."""
    app = TraceMiddleware(app_with_error, otlp=True, capture_headers=False)
    parent_trace = "0af7651916cd43dd8448eb211c80319c"
    with pytest.raises(RuntimeError):
        Client(app).get("/x", headers={"traceparent": f"00-{parent_trace}-b7ad6b7169203331-01"})
    wait_for(lambda: app.sinks is not None and app.sinks.delivered == 1, timeout=10)
    [root] = receiver.spans()
    assert root.trace_id.hex() == parent_trace
    assert root.parent_span_id.hex() == "b7ad6b7169203331"


@pytest.mark.parametrize("capture_headers", [True, False])
def test_tracestate_is_carried_on(
    receiver: Receiver, wait_for: Callable[..., Any], capture_headers: bool
) -> None:
    """The caller's tracestate (W3C trace context: vendor data that goes
    with the trace) is the exported span's, as OpenTelemetry's instrumentation
    keeps it; an invalid one is dropped.
    """
    app = TraceMiddleware(app_with_error, otlp=True, capture_headers=capture_headers)
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    for tracestate in ("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7", "not a tracestate"):
        with pytest.raises(RuntimeError):
            Client(app).get("/x", headers={"traceparent": traceparent, "tracestate": tracestate})
    wait_for(lambda: app.sinks is not None and app.sinks.delivered == 2, timeout=10)
    assert [span.trace_state for span in receiver.spans()] == [
        "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7",
        "",
    ]


@pytest.mark.parametrize(
    ("traceparent", "continued"),
    [
        ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", True),
        ("01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", True),
        # A later version may append fields; version 00 may not.
        ("cc-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-what-the-future", True),
        ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra", False),
        ("ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", False),
        ("00-00000000000000000000000000000000-b7ad6b7169203331-01", False),
        ("00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01", False),
        ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331", False),
    ],
)
def test_traceparent_versions(traceparent: str, continued: bool) -> None:
    """A traceparent of a later version is continued (its first four fields
    are version 00's); version ff, all-zero ids and a version-00 header with
    extra fields are not.
    """
    from opentelemetry import trace as trace_api

    from wsgitrace.otlp import _parent_context

    context = _parent_context({"traceparent": traceparent})
    if not continued:
        assert context is None
        return
    parent = trace_api.get_current_span(context).get_span_context()
    assert format(parent.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    assert format(parent.span_id, "016x") == "b7ad6b7169203331"
    assert parent.is_remote
    assert parent.trace_flags.sampled


@pytest.mark.parametrize(
    ("tracestate", "kept"),
    [
        ("congo=t61rcWkgMzE, rojo=00f067aa0ba902b7", ["congo", "rojo"]),
        ("not a tracestate\x1b[31m", []),
        ("congo=1,congo=2", []),
        (",".join(f"k{n}=v" for n in range(33)), []),
        (",".join(f"k{n}=v" for n in range(32)), [f"k{n}" for n in range(32)]),
    ],
)
def test_invalid_tracestate_is_dropped_without_a_log_record(
    tracestate: str, kept: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A ``tracestate`` OpenTelemetry would refuse is dropped silently: its
    parser logs the header's text, which would let any client write to the
    app's log once per request.
    """
    from opentelemetry import trace as trace_api

    from wsgitrace.otlp import _parent_context

    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with caplog.at_level(logging.DEBUG):
        context = _parent_context({"traceparent": traceparent, "tracestate": tracestate})
    parent = trace_api.get_current_span(context).get_span_context()
    assert list(parent.trace_state) == kept
    assert caplog.records == []


def test_hostile_span_names_and_attributes_never_lose_a_batch(
    receiver: Receiver, wait_for: Callable[..., Any]
) -> None:
    """A lone surrogate (a file name from os.fsdecode) in a span name is
    escaped instead of failing the batch; a user attribute named ``kind``
    does not replace wsgitrace's.
    """
    import os

    import wsgitrace

    app = Flask(__name__)

    @app.route("/file")
    def file() -> str:
        with wsgitrace.span(os.fsdecode(b"caf\xe9.txt"), kind="refund", **{"attr.kind": "own"}):
            pass
        return "ok"

    ext = FlaskTrace(app, otlp=True)
    client = app.test_client()
    for _ in range(3):
        client.get("/file").close()
    sinks = ext.middleware.sinks
    assert sinks is not None
    wait_for(lambda: sinks.delivered + sinks.failed == 3, timeout=10)
    assert sinks.failed == 0
    spans = [span for span in receiver.spans() if span.name.startswith("caf")]
    assert [span.name for span in spans] == ["caf\\udce9.txt"] * 3
    assert attributes(spans[0])["wsgitrace.kind"] == "span"
    exported = attributes(spans[0])
    # A user's "attr.kind" meets the renamed "kind": both values are kept.
    assert {exported["wsgitrace.attr.kind"], exported["wsgitrace.attr.kind_"]} == {"refund", "own"}


def test_forked_worker_gets_an_instance_id_of_its_own() -> None:
    """After a fork (gunicorn --preload), each worker's spans carry their
    own service.instance.id: the SDK's default is made once per process.
    """
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from wsgitrace.otlp import OtlpSink

    exporter = InMemorySpanExporter()
    sink = OtlpSink(exporter=exporter)
    trace = Trace("GET", "/")
    trace.finished = True
    sink.write([trace])
    sink.after_fork()  # as in the child
    sink.write([trace])
    first, second = (
        span.resource.attributes["service.instance.id"] for span in exporter.get_finished_spans()
    )
    assert first != second


def test_collector_down_never_slows_requests(
    receiver: Receiver, wait_for: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the collector hanging, every request is served while the first
    export still waits for its answer (none waits for the collector); the
    failed export and the traces the full queue dropped are counted. (How
    long requests take is bench/sinks.py's to measure.)
    """
    receiver.status = 400  # a failure the exporter does not retry
    receiver.release = threading.Event()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "15")

    def ok(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        start_response("200 OK", [])
        return [b"ok"]

    app = TraceMiddleware(ok, otlp=True, sink_queue=10)
    client = Client(app)
    client.get("/first").close()
    wait_for(lambda: receiver.paths, timeout=10)  # an export is waiting on the collector
    for i in range(200):
        response = client.get(f"/r{i}")
        assert response.status_code == 200
        response.close()
    assert receiver.paths == ["/v1/traces"]  # still the one export, unanswered
    receiver.release.set()
    assert app.sinks is not None
    wait_for(lambda: app.sinks is not None and app.sinks.failed >= 1, timeout=10)
    assert app.sinks.dropped > 0
    # Every one of the 201 traces is either dropped at the full queue or
    # failed with its batch; none is lost uncounted.
    wait_for(lambda: app.sinks is not None and app.sinks.failed + app.sinks.dropped == 201)
    assert receiver.bodies == []


def test_a_failing_collector_is_logged_once(
    receiver: Receiver, wait_for: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A collector refusing every export is logged once, with the
    exporter's reason, not once per batch for as long as it refuses.
    """
    receiver.status = 400  # a failure the exporter does not retry

    def ok(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        start_response("200 OK", [])
        return [b"ok"]

    app = TraceMiddleware(ok, otlp=True)
    client = Client(app)
    with caplog.at_level(logging.WARNING):
        for i in range(1, 4):
            client.get("/x").close()
            wait_for(lambda i=i: app.sinks is not None and app.sinks.failed == i, timeout=10)
    exporter = [r for r in caplog.records if r.name.startswith("opentelemetry")]
    assert len(exporter) == 1
    assert "400" in exporter[0].getMessage()
    assert len([r for r in caplog.records if r.name == "wsgitrace"]) == 1


def test_a_forked_worker_logs_its_own_first_failure(caplog: pytest.LogCaptureFixture) -> None:
    """After a fork, the exporter's reason for the child's first failure is
    logged, even on a thread whose ident the parent's failing one had.
    """
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    from wsgitrace.exceptions import WsgitraceError
    from wsgitrace.otlp import OtlpSink

    class Refused(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            logging.getLogger("opentelemetry.exporter.otlp.proto.http.trace_exporter").error(
                "Failed to export span batch code: 400"
            )
            return SpanExportResult.FAILURE

    sink = OtlpSink(exporter=Refused())
    trace = Trace("GET", "/")
    trace.finished = True
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            with pytest.raises(WsgitraceError):
                sink.write([trace])
        sink.after_fork()  # as in the child, whose thread may get the same ident
        with pytest.raises(WsgitraceError):
            sink.write([trace])
    sink.close()
    assert [r.getMessage() for r in caplog.records] == ["Failed to export span batch code: 400"] * 2


def test_trace_from_dict_exports_the_same(receiver: Receiver) -> None:
    """A trace read back from JSON (e.g. from the store) exports as well."""
    from wsgitrace.otlp import OtlpSink

    source = TraceMiddleware(app_with_error)
    with pytest.raises(RuntimeError):
        Client(source).get("/y")
    [trace] = source.buffer.latest(1)
    sink = OtlpSink()
    sink.write([Trace.from_dict(trace.to_dict())])
    sink.close()
    assert [span.name for span in receiver.spans()] == ["GET"]
