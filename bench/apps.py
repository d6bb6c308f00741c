"""The benchmark's Flask app, built once per configuration.

Every configuration is a separately built Flask app from the same code, so
the in-process bench (``bench/inprocess.py``) and the served bench
(``bench/serve.py``, gunicorn) measure exactly the same routes and hooks::

    from apps import create_app

    app = create_app("flasktrace")

or, for gunicorn (the factory-call syntax)::

    gunicorn --pythonpath bench 'apps:create_app("middleware")'

Configurations:

``bare``
    Flask only.
``middleware``
    ``app.wsgi_app = TraceMiddleware(app.wsgi_app)`` (WSGI-level events only).
``flasktrace``
    ``FlaskTrace(app)``: full Flask tracing (hooks, signals, URL match, ``g``).
``sampled``
    ``FlaskTrace(app, sample=0.1)``: full Flask tracing of one request in
    ten (chosen at random), the setting the README recommends for production.
``naive``
    The naive recorder issue #6 calibrates its budget with (``bench/naive.py``):
    one ``(name, time)`` tuple appended to a deque per request step, 20 on
    ``/hello``; full Flask tracing is meant to cost less.
``otel``
    OpenTelemetry's Flask instrumentation with an SDK ``TracerProvider``, a
    ``SimpleSpanProcessor`` and an in-memory exporter, so the peer does all of
    its work in-process. The exporter is bounded (cleared past 10,000 spans)
    so a long served run does not grow.

Routes (besides ``/_bench``, which reports how many requests the tracer
recorded and whether it records this one), all with the same three hooks (a
``before_request`` that sets ``g.user``, an ``after_request`` that adds a
header and a ``teardown_request``):

``/hello``     plain text
``/json``      a small JSON document
``/stream``    a generator body with ``stream_with_context`` (5 chunks)
``/template``  a small template (``page.html``, compiled once) via ``render_template``
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import TYPE_CHECKING, Any

from flask import Flask, Response, g, jsonify, render_template, request, stream_with_context
from jinja2 import DictLoader

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from wsgitrace import TraceBuffer

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    # Measure the working tree's wsgitrace, wherever the bench is run from.
    sys.path.insert(0, _ROOT)

#: Configurations, in report order; ``bare`` is the baseline.
CONFIGS: tuple[str, ...] = ("bare", "middleware", "flasktrace", "sampled", "naive", "otel")

#: The ``sample`` rate of the ``sampled`` configuration.
SAMPLE_RATE = 0.1

#: Routes, in report order.
ROUTES: tuple[str, ...] = ("/hello", "/json", "/stream", "/template")

_TEMPLATE = """<!doctype html>
<title>{{ title }}</title>
<h1>Hello {{ user }}</h1>
<ul>{% for item in items %}<li>{{ loop.index }}: {{ item }}</li>{% endfor %}</ul>
"""

_OTEL_EXPORTER_KEY = "bench.otel_exporter"
_NAIVE_KEY = "bench.naive_recorder"
_CONFIG_KEY = "bench.config"


def select_configs(names: str) -> list[str]:
    """The configurations named in a comma-separated list, in report order
    (:data:`CONFIGS`), with ``bare`` (the baseline) always among them.

    :raises ValueError: a name is not in :data:`CONFIGS`.
    """
    wanted = {name.strip() for name in names.split(",") if name.strip()}
    unknown = sorted(wanted.difference(CONFIGS))
    if unknown:
        msg = f"unknown bench configuration(s) {', '.join(unknown)}; known: {', '.join(CONFIGS)}"
        raise ValueError(msg)
    return [config for config in CONFIGS if config in wanted or config == "bare"]


def _build_routes(app: Flask) -> None:
    """Register the hooks and routes shared by every configuration."""

    @app.before_request
    def load_user() -> None:
        g.user = "ada"

    @app.after_request
    def add_header(response: Response) -> Response:
        response.headers["X-Bench"] = "1"
        return response

    @app.teardown_request
    def close_db(exc: BaseException | None) -> None:
        return None

    @app.route("/_bench")
    def bench_stats() -> Response:
        # How many requests the tracer under test recorded before this one,
        # and whether it records this one too (read by serve.py).
        return jsonify(
            config=app.extensions.get(_CONFIG_KEY),
            recorded=recorded_count(app),
            recording_this=recording(app, request.environ),
        )

    @app.route("/hello")
    def hello() -> str:
        return "Hello, World!"

    @app.route("/json")
    def json_route() -> Response:
        return jsonify(user=g.user, items=[1, 2, 3], ok=True)

    @app.route("/stream")
    def stream() -> Response:
        def generate() -> Iterator[str]:
            for i in range(5):
                yield f"chunk {i} for {g.user}\n"

        return Response(stream_with_context(generate()), mimetype="text/plain")

    @app.route("/template")
    def template() -> str:
        return render_template("page.html", title="bench", user=g.user, items=["a", "b", "c"])


def _bounded_exporter(bound: int = 10_000) -> Any:
    """An ``InMemorySpanExporter`` that clears itself past ``bound`` spans."""
    from opentelemetry.sdk.trace.export import SpanExportResult
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    class BoundedInMemorySpanExporter(InMemorySpanExporter):
        exported_total = 0

        def export(self, spans: Any) -> SpanExportResult:
            result = super().export(spans)
            self.exported_total += len(spans)
            if len(self._finished_spans) > bound:
                self.clear()
            return result

    return BoundedInMemorySpanExporter()


def _instrument_otel(app: Flask) -> None:
    """Install OpenTelemetry's Flask instrumentation with an SDK provider."""
    from opentelemetry.instrumentation.flask import FlaskInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    exporter = _bounded_exporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    FlaskInstrumentor().instrument_app(app, tracer_provider=provider)  # type: ignore[no-untyped-call]
    app.extensions[_OTEL_EXPORTER_KEY] = exporter


def create_app(config: str = "bare", **options: Any) -> Flask:
    """Build the bench app for one configuration.

    :param config: One of :data:`CONFIGS`.
    :param options: wsgitrace options (``middleware``, ``flasktrace`` and
        ``sampled``).
    """
    if config not in CONFIGS:
        msg = f"unknown bench configuration {config!r}; known: {', '.join(CONFIGS)}"
        raise ValueError(msg)
    app = Flask(f"bench_{config}")
    app.jinja_loader = DictLoader({"page.html": _TEMPLATE})
    app.extensions[_CONFIG_KEY] = config
    _build_routes(app)
    if config == "middleware":
        from wsgitrace import TraceMiddleware

        app.wsgi_app = TraceMiddleware(app.wsgi_app, **options)  # type: ignore[method-assign]
    elif config in ("flasktrace", "sampled"):
        from wsgitrace.flask import FlaskTrace

        if config == "sampled":
            options.setdefault("sample", SAMPLE_RATE)
        FlaskTrace(app, **options)
    elif config == "naive":
        from naive import NaiveRecorder

        app.extensions[_NAIVE_KEY] = NaiveRecorder(app)
    elif config == "otel":
        _instrument_otel(app)
    return app


def app_from_env() -> Flask:
    """The app named by ``$BENCH_CONFIG`` (for servers that take a module path)."""
    return create_app(os.environ.get("BENCH_CONFIG", "bare"))


def trace_buffer(app: Flask) -> TraceBuffer | None:
    """The wsgitrace buffer of a bench app, or ``None`` for ``bare``/``otel``."""
    ext = app.extensions.get("wsgitrace")
    if ext is not None:
        return ext.buffer  # type: ignore[no-any-return]
    buffer: TraceBuffer | None = getattr(app.wsgi_app, "buffer", None)
    return buffer


def naive_recorder(app: Flask) -> Any:
    """The :class:`naive.NaiveRecorder` of a ``naive`` app, or ``None``."""
    return app.extensions.get(_NAIVE_KEY)


@contextlib.contextmanager
def naive_detached(built: Iterable[Flask]) -> Iterator[None]:
    """Within the block, the signal receivers of the naive recorders of
    ``built`` are disconnected (see :meth:`naive.NaiveRecorder.disconnect`)
    but where :func:`naive_attached` connects them; after it, they are
    connected again.
    """
    recorders = [r for r in map(naive_recorder, built) if r is not None]
    for recorder in recorders:
        recorder.disconnect()
    try:
        yield
    finally:
        for recorder in recorders:
            recorder.connect()


@contextlib.contextmanager
def naive_attached(app: Flask) -> Iterator[None]:
    """Within the block, the signal receivers of ``app``'s naive recorder
    (if it has one) are connected; after it, they are not.
    """
    naive = naive_recorder(app)
    if naive is None:
        yield
        return
    naive.connect()
    try:
        yield
    finally:
        naive.disconnect()


def otel_exporter(app: Flask) -> Any:
    """The OpenTelemetry in-memory exporter of an ``otel`` app, or ``None``."""
    return app.extensions.get(_OTEL_EXPORTER_KEY)


def recorded_count(app: Flask) -> int | None:
    """Requests the tracer of ``app`` has recorded: traces appended to the
    wsgitrace buffer, requests the naive recorder saw, spans exported by
    OpenTelemetry, ``None`` for ``bare``.
    """
    buffer = trace_buffer(app)
    if buffer is not None:
        return buffer.cursor
    naive = naive_recorder(app)
    if naive is not None:
        return int(naive.requests)
    exporter = otel_exporter(app)
    if exporter is not None:
        return int(exporter.exported_total)
    return None


def recording(app: Flask, environ: dict[str, Any]) -> bool | None:
    """Whether the tracer of ``app`` records the request of ``environ`` (a
    sampled-out one it does not), ``None`` for ``bare``.
    """
    if trace_buffer(app) is not None:
        return "wsgitrace.trace" in environ
    if otel_exporter(app) is not None or _NAIVE_KEY in app.extensions:
        return True
    return None
