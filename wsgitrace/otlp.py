"""Export traces to OpenTelemetry with OTLP/HTTP.

Needs the ``otlp`` extra (``pip install 'wsgitrace[otlp]'``: the
OpenTelemetry SDK and its OTLP/HTTP exporter), and is turned on with
``otlp=True`` or ``WSGITRACE_OTLP=1``. Where spans go is configured the
OpenTelemetry way, by the exporter itself::

    OTEL_EXPORTER_OTLP_ENDPOINT=http://collector:4318   # .../v1/traces is added
    OTEL_EXPORTER_OTLP_HEADERS=api-key=...
    OTEL_SERVICE_NAME=shop  OTEL_RESOURCE_ATTRIBUTES=deployment.environment=prod
    WSGITRACE_OTLP=1 gunicorn -w 4 shop:app

Each finished trace becomes one ``SERVER`` span for the request (named
``GET /users/<id>`` after its route, with the HTTP semantic-convention
attributes), with a child span for each hook, the view, each template
rendered and each :func:`wsgitrace.span`, nested by time, and span events for
``start_response``, ``first_byte``, ``close`` and an ``exception``. A
``traceparent`` header on the request makes the span a child of the caller's.

Only a trace's JSON form (:meth:`~wsgitrace.Trace.to_dict`) is exported, so
only redacted data leaves the process: secret headers and query values are
``[redacted]`` already when the trace is recorded. OpenTelemetry is imported
only when this sink is made.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import threading
import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .exceptions import ConfigurationError, WsgitraceError
from .sinks import partial_failure
from .trace import HOOK_KINDS

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan, Span
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Tracer

    from .trace import Trace

__all__ = ["OtlpSink", "trace_spans"]

#: Event kinds that become child spans.
SPAN_KINDS = HOOK_KINDS | {"template", "span"}
#: Event kinds that become span events on the request's span.
EVENT_KINDS = ("start_response", "first_byte", "close")

_METHODS = frozenset(
    {"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "QUERY", "TRACE"}
)
# W3C Trace Context: a later version may append "-..." fields, which are
# ignored; version 00 has none, and ff is invalid.
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?\Z")
# One list member of a W3C tracestate header, as OpenTelemetry checks it.
_TRACESTATE_MEMBER = re.compile(
    r"(?:[a-z][_0-9a-z\-*/]{0,255}|[a-z0-9][_0-9a-z\-*/]{0,240}@[a-z][_0-9a-z\-*/]{0,13})"
    r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
)
_TRACESTATE_MAX_MEMBERS = 32
#: Most spans in one export request (the SDK's BatchSpanProcessor default):
#: a queue's worth of big traces in one request would be refused as too
#: large (the exporter's own 64 MiB cap, a collector's smaller one) and
#: every trace in it lost.
MAX_EXPORT_SPANS = 512


class _ExportError(WsgitraceError):
    """A failed export; ``undelivered`` traces of the batch were not exported."""

    def __init__(self, message: str, undelivered: int) -> None:
        super().__init__(message)
        self.undelivered = undelivered


#: The logger the OTLP/HTTP span exporter reports each failed export on.
_EXPORTER_LOGGER = "opentelemetry.exporter.otlp.proto.http.trace_exporter"


class _QuietThreads(logging.Filter):
    """Drops the exporter's records logged by the threads in :attr:`threads`:
    those of sinks exporting after a failure of theirs was logged. The first
    failure's reason gets through and the sink logs its failure once, where
    the exporter would log every batch (a warning with a traceback and an
    error, for as long as a collector is down).
    """

    def __init__(self) -> None:
        super().__init__()
        self.threads: set[int] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread not in self.threads


_quiet = _QuietThreads()


def _require_sdk() -> None:
    try:
        for name in ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http"):
            importlib.import_module(name)
    except ImportError as exc:
        msg = (
            "otlp=True (WSGITRACE_OTLP) needs the OpenTelemetry SDK and OTLP/HTTP exporter:"
            f" pip install 'wsgitrace[otlp]' ({exc})"
        )
        raise ConfigurationError(msg) from None


def _make_collector() -> Any:
    """A span processor that keeps the spans ended on the sink's thread."""
    from opentelemetry.sdk.trace import SpanProcessor

    class SpanCollector(SpanProcessor):
        def __init__(self) -> None:
            self.spans: list[ReadableSpan] = []

        def on_end(self, span: ReadableSpan) -> None:
            self.spans.append(span)

    return SpanCollector()


class OtlpSink:
    """A sink that exports each trace as OpenTelemetry spans.

    :param exporter: A span exporter; by default an ``OTLPSpanExporter``
        (OTLP/HTTP) configured by the ``OTEL_EXPORTER_OTLP_*`` variables.
        Only the default one is made anew in a forked child; one given here
        is used there as it is (make it, and the sink, after the fork).
    :param resource_attributes: Added to the resource, which the SDK builds
        from ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES``.

    :raise ConfigurationError: the ``otlp`` extra is not installed.

    .. versionadded:: 0.1
    """

    name = "otlp"

    def __init__(
        self,
        exporter: SpanExporter | None = None,
        *,
        resource_attributes: Mapping[str, str] | None = None,
    ) -> None:
        _require_sdk()

        self._own_exporter = exporter is None
        self._exporter: SpanExporter | None = exporter or self._make_exporter()
        self._resource_attributes = dict(resource_attributes or {})
        # Set in a forked child: the SDK's default id is made once per
        # process at import, so every worker of a --preload server shares it.
        self._instance_id: str | None = None
        self._collector = _make_collector()
        self._tracer: Tracer = self._make_tracer()
        # Set once an export failed (and the exporter logged why).
        self._failed = False
        logging.getLogger(_EXPORTER_LOGGER).addFilter(_quiet)  # added once, however often called
        #: Spans exported.
        self.exported = 0

    def _make_tracer(self) -> Tracer:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider

        from . import __version__

        attributes = dict(self._resource_attributes)
        if self._instance_id is not None:
            attributes.setdefault("service.instance.id", self._instance_id)
        provider = TracerProvider(resource=Resource.create(attributes), shutdown_on_exit=False)
        provider.add_span_processor(self._collector)
        return provider.get_tracer("wsgitrace", __version__)

    @staticmethod
    def _make_exporter() -> SpanExporter:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()

    def write(self, traces: Sequence[Trace]) -> None:
        """Turn the traces into spans and export them, in requests of at most
        :data:`MAX_EXPORT_SPANS` spans (a trace's spans are never split).

        A trace that cannot be turned into spans is left out, and the others
        are exported: then the first such error is raised, its
        ``undelivered`` the number of traces not exported.

        :raise WsgitraceError: the exporter reported a failure; its
            ``undelivered`` is how many of the traces (those not in a
            request it took) were not exported, the others were. Another
            error, once a part was exported, is given that ``undelivered`` too.
        """
        chunk: list[ReadableSpan] = []
        chunked = done = 0
        error: Exception | None = None
        try:
            for trace in traces:
                try:
                    spans = self._spans(trace)
                except Exception as exc:  # one bad trace costs only itself
                    error = error or exc
                    continue
                if chunk and len(chunk) + len(spans) > MAX_EXPORT_SPANS:
                    self._export(chunk, len(traces) - done)
                    done += chunked
                    chunk, chunked = [], 0
                chunk.extend(spans)
                chunked += 1
            if chunk:
                self._export(chunk, len(traces) - done)
                done += chunked
        except Exception as exc:
            if not done or hasattr(exc, "undelivered"):
                raise
            # An error of the exporter's own, after parts were exported:
            # those parts are delivered, not counted failed.
            error = exc
        if error is not None:
            raise partial_failure(error, len(traces) - done)

    def _spans(self, trace: Trace) -> list[ReadableSpan]:
        """The spans of one trace, with the caller's trace context."""
        data = trace.to_dict()
        if trace.traceparent is not None:
            data["traceparent"] = trace.traceparent
            if trace.tracestate is not None:
                data["tracestate"] = trace.tracestate
        return trace_spans(self._tracer, self._collector, data)

    def _export(self, spans: list[ReadableSpan], undelivered: int) -> None:
        """Export one request's spans; on failure, say how many traces are lost."""
        from opentelemetry.sdk.trace.export import SpanExportResult

        if self._exporter is None:
            self._exporter = self._make_exporter()
        thread = threading.get_ident() if self._failed else None
        if thread is not None:
            _quiet.threads.add(thread)
        try:
            result = self._exporter.export(spans)
        finally:
            if thread is not None:
                _quiet.threads.discard(thread)
        if result is not SpanExportResult.SUCCESS:
            self._failed = True
            msg = f"OTLP export of {len(spans)} span(s) failed (see the opentelemetry log)"
            raise _ExportError(msg, undelivered)
        self.exported += len(spans)

    def after_fork(self) -> None:
        """Make a new exporter (its HTTP connections are the parent's) and a
        new resource (its instance id is the parent's) in a forked child.
        """
        if self._own_exporter:
            self._exporter = None
        # The child's first failure is its own to log.
        self._failed = False
        if "service.instance.id" not in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", ""):
            self._instance_id = str(uuid.uuid4())
        self._tracer = self._make_tracer()

    def close(self) -> None:
        """Shut the exporter down."""
        if self._exporter is not None:
            self._exporter.shutdown()

    def __repr__(self) -> str:
        return f"<OtlpSink {self._exporter!r}>"


def trace_spans(tracer: Tracer, collector: Any, data: Mapping[str, Any]) -> list[Any]:
    """The spans of one trace (its :meth:`~wsgitrace.Trace.to_dict` form),
    made with ``tracer`` and gathered by ``collector``; root span last.
    """
    from opentelemetry import trace as trace_api
    from opentelemetry.trace import SpanKind, Status, StatusCode

    collector.spans = []
    start = round(float(data.get("time") or 0.0) * 1e9)
    duration = data.get("duration_ms")
    end = start + (round(float(duration) * 1e6) if duration is not None else 0)
    status = data.get("status")
    error = data.get("error") if isinstance(data.get("error"), dict) else None

    root: Span = tracer.start_span(  # type: ignore[assignment]
        _text(_span_name(data)),
        context=_parent_context(data),
        kind=SpanKind.SERVER,
        attributes=_clean(_request_attributes(data)),
        start_time=start,
    )
    events = sorted(
        (e for e in data.get("events") or () if isinstance(e, dict)),
        key=lambda e: (float(e.get("start_ms", 0)), -float(e.get("duration_ms", 0))),
    )
    # Open child spans, innermost last: (end, span, start).
    stack: list[tuple[int, Any, int]] = []
    children: list[tuple[int, Any]] = []
    for event in events:
        kind = str(event.get("kind", ""))
        at = start + round(float(event.get("start_ms", 0)) * 1e6)
        until = at + round(float(event.get("duration_ms", 0)) * 1e6)
        if kind in EVENT_KINDS:
            attrs = {"wsgitrace.duration_ms": float(event.get("duration_ms", 0))}
            root.add_event(kind, attrs if kind == "close" else None, timestamp=at)
            continue
        if kind not in SPAN_KINDS:
            continue
        while stack and not (at >= stack[-1][2] and until <= stack[-1][0]):
            stack.pop()
        parent = stack[-1][1] if stack else root
        span = tracer.start_span(
            _text(str(event.get("name", kind))),
            context=trace_api.set_span_in_context(parent),
            kind=SpanKind.INTERNAL,
            attributes=_clean(_event_attributes(kind, event)),
            start_time=at,
        )
        if kind == "span" and isinstance(event.get("attrs"), dict) and event["attrs"].get("error"):
            # An exception left the user's ``with span(...)``: the operation failed.
            span.set_status(Status(StatusCode.ERROR, str(event["attrs"]["error"])))
        stack.append((until, span, at))
        children.append((until, span))
    if error is not None:
        root.add_event(
            "exception",
            _clean(
                {
                    "exception.type": str(error.get("type", "")),
                    "exception.message": str(error.get("message", "")),
                    "exception.stacktrace": str(error.get("traceback", "")),
                }
            ),
            timestamp=end,
        )
    if error is not None or (isinstance(status, int) and status >= 500):
        description = str(error.get("type", "")) if error else None
        root.set_status(Status(StatusCode.ERROR, description))
    for until, span in children:
        span.end(end_time=until)
    root.end(end_time=end)
    spans: list[Any] = collector.spans
    collector.spans = []
    return spans


def _span_name(data: Mapping[str, Any]) -> str:
    method = str(data.get("method") or "")
    method = method if method in _METHODS else "HTTP"
    rule = data.get("rule")
    return f"{method} {rule}" if rule else method


def _parent_context(data: Mapping[str, Any]) -> Any:
    """The caller's span context from the request's ``traceparent`` and
    ``tracestate`` headers (kept by the middleware when exporting, or among
    the captured headers).
    """
    from opentelemetry import trace as trace_api

    headers = list(data.get("request_headers") or ())
    if isinstance(data.get("traceparent"), str):
        headers = [("traceparent", data["traceparent"])]
        if isinstance(data.get("tracestate"), str):
            headers.append(("tracestate", data["tracestate"]))
    # Several tracestate headers are one list (RFC 9110), in order.
    states = [str(value) for name, value in headers if str(name).lower() == "tracestate"]
    for name, value in headers:
        if str(name).lower() != "traceparent":
            continue
        found = _TRACEPARENT.match(str(value).strip().lower())
        if (
            found is None
            or found.group(1) == "ff"
            or (found.group(1) == "00" and found.group(5) is not None)
            or found.group(2) == "0" * 32
            or found.group(3) == "0" * 16
        ):
            return None
        context = trace_api.SpanContext(
            int(found.group(2), 16),
            int(found.group(3), 16),
            is_remote=True,
            trace_flags=trace_api.TraceFlags(int(found.group(4), 16) & 1),
            # Invalid or absent: empty, as OpenTelemetry's own propagator does.
            trace_state=_trace_state(trace_api, states),
        )
        return trace_api.set_span_in_context(trace_api.NonRecordingSpan(context))
    return None


def _trace_state(trace_api: Any, headers: list[str]) -> Any:
    """The ``TraceState`` of the caller's ``tracestate`` headers, or an
    empty one when a member is invalid: checked here first, because
    OpenTelemetry's parser logs a warning with the member's text, which
    would let any client write to the app's log once per request.
    """
    keys: set[str] = set()
    for header in headers:
        for member in header.split(","):
            member = member.strip(" \t")
            if not member:
                continue
            if _TRACESTATE_MEMBER.fullmatch(member) is None:
                return trace_api.TraceState()
            keys.add(member.partition("=")[0])
    # More than the 32 members W3C allows: OpenTelemetry warns and keeps none.
    if len(keys) > _TRACESTATE_MAX_MEMBERS:
        return trace_api.TraceState()
    return trace_api.TraceState.from_header(headers)


def _request_attributes(data: Mapping[str, Any]) -> dict[str, Any]:
    """HTTP semantic-convention attributes of the request's span."""
    method = str(data.get("method") or "")
    attrs: dict[str, Any] = {}
    if method in _METHODS:
        attrs["http.request.method"] = method
    else:
        attrs["http.request.method"] = "_OTHER"
        attrs["http.request.method_original"] = method
    attrs["url.path"] = _wsgi_text(str(data.get("path") or "/"))
    if data.get("query"):
        attrs["url.query"] = _wsgi_text(str(data["query"]))
    if data.get("rule"):
        attrs["http.route"] = str(data["rule"])
    status = data.get("status")
    if isinstance(status, int):
        attrs["http.response.status_code"] = status
    if data.get("remote_addr"):
        attrs["client.address"] = str(data["remote_addr"])
    attrs["http.response.body.size"] = int(data.get("bytes") or 0)
    # Header attributes are opt-in in the conventions (and cost export size):
    # only the user agent. Headers stay in the trace, redacted, on /_trace.
    for name, value in data.get("request_headers") or ():
        if str(name).lower() == "user-agent":
            attrs["user_agent.original"] = str(value)
    error = data.get("error")
    if isinstance(error, dict) and error.get("type"):
        attrs["error.type"] = str(error["type"])
    elif isinstance(status, int) and status >= 500:
        attrs["error.type"] = str(status)
    attrs["wsgitrace.id"] = str(data.get("id") or "")
    if data.get("endpoint"):
        attrs["wsgitrace.endpoint"] = str(data["endpoint"])
    if data.get("ttfb_ms") is not None:
        attrs["wsgitrace.ttfb_ms"] = float(data["ttfb_ms"])
    if data.get("warnings"):
        attrs["wsgitrace.warnings"] = [str(w) for w in data["warnings"]]
    return attrs


def _event_attributes(kind: str, event: Mapping[str, Any]) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    raw = event.get("attrs")
    if isinstance(raw, dict):
        for key, value in raw.items():
            if value is None:
                # An attribute has a value or is left out (no blueprint:
                # none, not the string "null").
                continue
            # A user's attribute named like one of ours keeps its value too.
            own = key in _OWN_EVENT_ATTRIBUTES
            name = _text(f"wsgitrace.attr.{key}" if own else f"wsgitrace.{key}")
            while name in attrs:  # a renamed one met a user's own: keep both
                name += "_"
            attrs[name] = _attribute(value)
    attrs["wsgitrace.kind"] = kind
    return attrs


_OWN_EVENT_ATTRIBUTES = frozenset({"kind"})


def _wsgi_text(value: str) -> str:
    """A WSGI (latin-1) string as the UTF-8 text the client sent, when it
    is: a trace keeps the path as PEP 3333 gives it, ``/cafÃ©`` for ``/café``.
    """
    try:
        return value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return value


def _text(value: str) -> str:
    """``value``, with any lone surrogate (a file name decoded by
    ``os.fsdecode``, say) escaped: protobuf refuses them, and one would lose
    the whole export batch.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def _clean(attrs: dict[str, Any]) -> dict[str, Any]:
    """Attributes with every string made encodable (see :func:`_text`)."""
    for name, value in attrs.items():
        if isinstance(value, str):
            attrs[name] = _text(value)
        elif isinstance(value, list):
            attrs[name] = [_text(v) if isinstance(v, str) else v for v in value]
    return attrs


def _attribute(value: Any) -> Any:
    """An OpenTelemetry attribute value: a primitive, a list of strings, or JSON."""
    if isinstance(value, bool | str | float):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**63 else str(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return json.dumps(value, ensure_ascii=False, default=str, sort_keys=True)
