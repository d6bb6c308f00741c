"""FlaskTrace: every hook, view, error handler, template and signal of a
request, in the order Flask ran it — and the same response as the untraced app.

Each scenario builds two apps from one factory, one traced and one not, and
asserts the exact ``Trace.hooks()`` list plus byte-identical responses.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator
from importlib.metadata import version
from typing import Any

import pytest
from flask import (
    Blueprint,
    Flask,
    Response,
    abort,
    after_this_request,
    flash,
    g,
    redirect,
    render_template,
    render_template_string,
    request,
    signals,
    url_for,
)
from flask.sessions import SecureCookieSessionInterface
from itsdangerous import TimestampSigner, URLSafeTimedSerializer
from jinja2 import DictLoader

from wsgitrace.flask import FlaskTrace
from wsgitrace.trace import Trace

Outcome = tuple[str, list[tuple[str, str]], bytes]
#: Flask 3.1's stream_with_context pushes the contexts again for the body,
#: so teardown runs when the view returns and again after the body.
TEARDOWN_TWICE = tuple(map(int, version("flask").split(".")[:2])) >= (3, 1)
Factory = Callable[[list[str]], Flask]


class StepClock:
    """A nanosecond clock that moves by ``step`` per reading and by
    :meth:`advance` when the app says so, so durations are exact.
    """

    def __init__(self, step: int = 1) -> None:
        self.value = 1_000_000
        self.step = step
        self._lock = threading.Lock()

    def __call__(self) -> int:
        with self._lock:
            self.value += self.step
            return self.value

    def advance(self, ns: int) -> None:
        with self._lock:
            self.value += ns


class _FixedTimeSigner(TimestampSigner):
    def get_timestamp(self) -> int:
        return 1_700_000_000


class _FixedTimeSessions(SecureCookieSessionInterface):
    """Session cookies signed with a fixed time, so the plain and the traced
    app set the same cookie even when a second passes between their requests.
    """

    def get_signing_serializer(self, app: Flask) -> URLSafeTimedSerializer | None:
        serializer = super().get_signing_serializer(app)
        if serializer is not None:
            serializer.signer = _FixedTimeSigner
        return serializer


class Pair:
    """One factory built twice: ``plain`` (untraced) and ``traced``."""

    def __init__(self, factory: Factory, clock: StepClock, **options: Any) -> None:
        self.plain_log: list[str] = []
        self.traced_log: list[str] = []
        self.plain = factory(self.plain_log)
        self.traced = factory(self.traced_log)
        for app in (self.plain, self.traced):
            if type(app.session_interface) is SecureCookieSessionInterface:
                app.session_interface = _FixedTimeSessions()
        self.ext = FlaskTrace(self.traced, clock=clock, **options)

    def both(self, path: str, method: str = "GET", **kwargs: Any) -> tuple[Outcome, Trace]:
        """Serve the request on both apps; assert the same response and log."""
        plain = fetch(self.plain, path, method, **kwargs)
        traced = fetch(self.traced, path, method, **kwargs)
        assert traced == plain
        assert self.traced_log == self.plain_log
        trace = self.ext.buffer.latest(1)[0]
        assert trace.finished
        return traced, trace


def fetch(app: Flask, path: str, method: str = "GET", **kwargs: Any) -> Outcome:
    """Status, headers and body as a client sees them; the response is closed."""
    response = app.test_client().open(path, method=method, **kwargs)
    try:
        return response.status, list(response.headers.items()), response.get_data()
    finally:
        response.close()


@pytest.fixture(name="step_clock")
def fixture_step_clock() -> StepClock:
    return StepClock()


def hooks_without_defaults(trace: Trace) -> list[str]:
    """``trace.hooks()`` without Flask's own default context processor."""
    return [h for h in trace.hooks() if not h.endswith("_default_template_ctx_processor")]


# -- every kind of hook, app and nested blueprints -----------------------------


def every_hook_app(log: list[str]) -> Flask:
    """An app, a parent blueprint and a nested child, each with every hook."""
    app = Flask(__name__)
    parent = Blueprint("parent", __name__, url_prefix="/p")
    child = Blueprint("child", __name__, url_prefix="/c")

    def add_hooks(scope: Flask | Blueprint, tag: str) -> None:
        def url_value(endpoint: str | None, values: dict[str, Any] | None) -> None:
            log.append(f"url_value_preprocessor:{tag}")

        def url_default(endpoint: str, values: dict[str, Any]) -> None:
            log.append(f"url_defaults:{tag}")

        def before() -> None:
            log.append(f"before_request:{tag}")

        def after(response: Response) -> Response:
            log.append(f"after_request:{tag}")
            response.headers.add("X-After", tag)
            return response

        def teardown(exc: BaseException | None) -> None:
            log.append(f"teardown_request:{tag}")

        def context() -> dict[str, Any]:
            log.append(f"context_processor:{tag}")
            return {f"from_{tag}": tag}

        for func, name in (
            (url_value, "url_value"),
            (url_default, "url_default"),
            (before, "before"),
            (after, "after"),
            (teardown, "teardown"),
            (context, "context"),
        ):
            func.__name__ = f"{tag}_{name}"
        scope.url_value_preprocessor(url_value)
        scope.url_defaults(url_default)
        scope.before_request(before)
        scope.after_request(after)
        scope.teardown_request(teardown)
        scope.context_processor(context)

    add_hooks(app, "app")
    add_hooks(parent, "parent")
    add_hooks(child, "child")

    @app.teardown_appcontext
    def close_resources(exc: BaseException | None) -> None:
        log.append("teardown_appcontext:app")

    @child.route("/<int:number>")
    def show(number: int) -> str:
        log.append("view")

        @after_this_request
        def once(response: Response) -> Response:
            log.append("after_request:once")
            response.headers["X-Once"] = "1"
            return response

        link = url_for(".show", number=number + 1)
        return render_template_string(
            "{{ from_app }}/{{ from_parent }}/{{ from_child }} {{ link }}", link=link
        )

    parent.register_blueprint(child)
    app.register_blueprint(parent)
    return app


EVERY_HOOK_ORDER = [
    "url_value_preprocessor:app_url_value",
    "url_value_preprocessor:parent.parent_url_value",
    "url_value_preprocessor:parent.child.child_url_value",
    "before_request:app_before",
    "before_request:parent.parent_before",
    "before_request:parent.child.child_before",
    "view:parent.child.show",
    "url_defaults:app_url_default",
    "url_defaults:parent.parent_url_default",
    "url_defaults:parent.child.child_url_default",
    "context_processor:app_context",
    "context_processor:parent.parent_context",
    "context_processor:parent.child.child_context",
    "after_request:once",
    "after_request:parent.child.child_after",
    "after_request:parent.parent_after",
    "after_request:app_after",
    "teardown_request:parent.child.child_teardown",
    "teardown_request:parent.parent_teardown",
    "teardown_request:app_teardown",
    "teardown_appcontext:close_resources",
]


def test_every_hook_kind_in_flask_order_with_nested_blueprints(step_clock: StepClock) -> None:
    """Each hook is its own event, named with its blueprint, in Flask's order
    (parent before child on the way in, child before parent on the way out:
    the ordering of flask issue #4229).
    """
    pair = Pair(every_hook_app, step_clock)
    (status, headers, body), trace = pair.both("/p/c/7")
    assert status == "200 OK"
    assert body == b"app/parent/child /p/c/8"
    assert [v for k, v in headers if k == "X-After"] == ["child", "parent", "app"]
    assert hooks_without_defaults(trace) == EVERY_HOOK_ORDER
    # The hooks really ran in that order (the app's own log agrees).
    assert pair.traced_log == [
        "url_value_preprocessor:app",
        "url_value_preprocessor:parent",
        "url_value_preprocessor:child",
        "before_request:app",
        "before_request:parent",
        "before_request:child",
        "view",
        "url_defaults:app",
        "url_defaults:parent",
        "url_defaults:child",
        "context_processor:app",
        "context_processor:parent",
        "context_processor:child",
        "after_request:once",
        "after_request:child",
        "after_request:parent",
        "after_request:app",
        "teardown_request:child",
        "teardown_request:parent",
        "teardown_request:app",
        "teardown_appcontext:app",
    ]


def test_hook_events_carry_blueprint_qualname_module_and_duration(
    step_clock: StepClock,
) -> None:
    """Hook attributes: blueprint (dotted for nested ones), qualname, module;
    the view and url_defaults nest inside the view's time span.
    """
    pair = Pair(every_hook_app, step_clock)
    _, trace = pair.both("/p/c/1")
    [child_before] = trace.find(name="before_request:parent.child.child_before")
    assert child_before.kind == "before_request"
    assert child_before.attrs["blueprint"] == "parent.child"
    assert child_before.attrs["qualname"] == "every_hook_app.<locals>.add_hooks.<locals>.before"
    assert child_before.attrs["module"] == __name__
    [app_before] = trace.find(name="before_request:app_before")
    assert app_before.attrs["blueprint"] is None
    [view] = trace.find(kind="view")
    assert view.attrs["endpoint"] == "parent.child.show"
    assert view.attrs["blueprint"] == "parent.child"
    assert view.attrs["qualname"] == "every_hook_app.<locals>.show"
    for event in trace.find(kind="url_defaults") + trace.find(kind="context_processor"):
        assert view.start_ns < event.start_ns
        assert event.end_ns < view.end_ns
    for event in trace.events:
        if event.kind in ("before_request", "after_request", "view"):
            assert event.duration_ns > 0


def test_hook_duration_is_the_time_the_hook_took(step_clock: StepClock) -> None:
    """A hook that takes 5 ms is recorded with that duration (plus the one
    tick of the injected clock's own reading).
    """

    def factory(log: list[str]) -> Flask:
        app = Flask(__name__)

        @app.before_request
        def slow_hook() -> None:
            step_clock.advance(5_000_000)

        @app.route("/")
        def index() -> str:
            step_clock.advance(2_000_000)
            return "ok"

        return app

    pair = Pair(factory, step_clock)
    _, trace = pair.both("/")
    [hook] = trace.find(name="before_request:slow_hook")
    assert hook.duration_ns == 5_000_001
    [view] = trace.find(name="view:index")
    assert view.duration_ns == 2_000_001


def test_hooks_registered_after_init_app_are_traced(step_clock: StepClock) -> None:
    """Hooks and blueprints added after FlaskTrace(app) are traced too."""

    def factory(log: list[str]) -> Flask:
        return Flask(__name__)

    pair = Pair(factory, step_clock)
    for app, log in ((pair.plain, pair.plain_log), (pair.traced, pair.traced_log)):
        late = Blueprint("late", __name__)

        def late_before(log: list[str] = log) -> None:
            log.append("late_before")

        def app_after(response: Response, log: list[str] = log) -> Response:
            log.append("app_after")
            return response

        def late_view() -> str:
            return "late"

        late.before_request(late_before)
        late.add_url_rule("/late", view_func=late_view)
        app.after_request(app_after)
        app.register_blueprint(late)
    (_, _, body), trace = pair.both("/late")
    assert body == b"late"
    assert trace.hooks() == [
        "before_request:late.late_before",
        "view:late.late_view",
        "after_request:app_after",
    ]


def test_short_circuit_before_request(step_clock: StepClock) -> None:
    """A before_request that returns a value is marked ``short_circuit``; the
    hooks after it and the view do not run; after_request and teardown do.
    """

    def factory(log: list[str]) -> Flask:
        app = Flask(__name__)
        admin = Blueprint("admin", __name__, url_prefix="/admin")

        @app.before_request
        def first() -> None:
            log.append("first")

        @admin.before_request
        def require_admin() -> tuple[str, int]:
            return "admins only", 403

        @admin.before_request
        def never() -> None:
            log.append("never")

        @admin.route("/")
        def dashboard() -> str:
            log.append("view")
            return "secret"

        @app.after_request
        def after(response: Response) -> Response:
            return response

        @app.teardown_request
        def teardown(exc: BaseException | None) -> None:
            log.append(f"teardown {exc!r}")

        app.register_blueprint(admin)
        return app

    pair = Pair(factory, step_clock)
    (status, _, body), trace = pair.both("/admin/")
    assert (status, body) == ("403 FORBIDDEN", b"admins only")
    assert pair.traced_log == ["first", "teardown None"]
    assert trace.hooks() == [
        "before_request:first",
        "before_request:admin.require_admin",
        "after_request:after",
        "teardown_request:teardown",
    ]
    [hook] = trace.find(name="before_request:admin.require_admin")
    assert hook.attrs["short_circuit"] is True
    assert hook.attrs["returned"] == "tuple"
    [first] = trace.find(name="before_request:first")
    assert "short_circuit" not in first.attrs
    assert trace.status_code == 403


# -- errors -----------------------------------------------------------------


class BoomError(Exception):
    """Raised by test apps on purpose."""


def error_app(log: list[str]) -> Flask:
    app = Flask(__name__)
    api = Blueprint("api", __name__, url_prefix="/api")

    @app.before_request
    def load() -> None:
        log.append("load")
        if request.args.get("fail") == "before":
            raise BoomError("before_request failed")

    @api.route("/value")
    def value() -> str:
        raise ValueError("bad value")

    @api.route("/key")
    def key() -> str:
        raise KeyError("missing")

    @api.route("/teapot")
    def teapot() -> str:
        abort(418)

    @app.route("/boom")
    def boom() -> str:
        raise BoomError("view failed")

    @api.errorhandler(ValueError)
    def api_value_error(error: ValueError) -> tuple[str, int]:
        log.append(f"api handled {error}")
        return f"api: {error}", 400

    @app.errorhandler(KeyError)
    def reraise(error: KeyError) -> str:
        log.append("reraise")
        raise RuntimeError("the error handler failed too")

    @app.errorhandler(BoomError)
    def boom_handler(error: BoomError) -> tuple[str, int]:
        return f"handled {error}", 409

    @app.errorhandler(500)
    def server_error(error: Exception) -> tuple[str, int]:
        original = getattr(error, "original_exception", None)
        return f"500 from {type(original).__name__}", 500

    @app.errorhandler(404)
    def not_found(error: Exception) -> tuple[str, int]:
        return "nothing here", 404

    @app.after_request
    def after(response: Response) -> Response:
        log.append("after")
        return response

    @app.teardown_request
    def teardown(exc: BaseException | None) -> None:
        log.append(f"teardown {type(exc).__name__}")

    app.register_blueprint(api)
    return app


def test_blueprint_error_handler_is_recorded_with_the_exception(step_clock: StepClock) -> None:
    """The error handler that handled the view's exception is an event naming
    its blueprint and the exception type.
    """
    pair = Pair(error_app, step_clock)
    (status, _, body), trace = pair.both("/api/value")
    assert (status, body) == ("400 BAD REQUEST", b"api: bad value")
    assert trace.hooks() == [
        "before_request:load",
        "view:api.value",
        "errorhandler:api.api_value_error",
        "after_request:after",
        "teardown_request:teardown",
    ]
    [handler] = trace.find(kind="errorhandler")
    assert handler.attrs["exception"] == "ValueError"
    assert handler.attrs["blueprint"] == "api"
    [view] = trace.find(kind="view")
    assert view.attrs["error"] == "ValueError"


def test_http_error_handler_records_the_code(step_clock: StepClock) -> None:
    """abort(418) without a handler for it: the default response, no handler
    event; abort inside the view is an ``error`` on the view event.
    """
    pair = Pair(error_app, step_clock)
    (status, _, _), trace = pair.both("/api/teapot")
    assert status == "418 I'M A TEAPOT"
    assert trace.hooks() == [
        "before_request:load",
        "view:api.teapot",
        "after_request:after",
        "teardown_request:teardown",
    ]
    assert trace.find(kind="view")[0].attrs["error"] == "ImATeapot"


def test_error_handler_that_raises(step_clock: StepClock) -> None:
    """A handler that raises: the 500 handler then handles the new error,
    got_request_exception is sent, and the trace keeps the error.
    """
    pair = Pair(error_app, step_clock)
    (status, _, body), trace = pair.both("/api/key")
    assert (status, body) == ("500 INTERNAL SERVER ERROR", b"500 from RuntimeError")
    assert trace.hooks() == [
        "before_request:load",
        "view:api.key",
        "errorhandler:reraise",
        "errorhandler:server_error",
        "after_request:after",
        "teardown_request:teardown",
    ]
    reraise, server_error = trace.find(kind="errorhandler")
    assert reraise.attrs["exception"] == "KeyError"
    assert reraise.attrs["error"] == "RuntimeError"
    assert server_error.attrs["exception"] == "InternalServerError"
    assert server_error.attrs["code"] == 500
    assert [e.attrs["exception"] for e in trace.find(name="signal:got-request-exception")] == [
        "RuntimeError"
    ]
    assert trace.error is not None
    assert trace.error["type"] == "builtins.RuntimeError"
    assert trace.error["where"] == "errorhandler"
    assert pair.traced_log == ["load", "reraise", "after", "teardown RuntimeError"]


@pytest.mark.parametrize("fail", ["before_request", "view", "after_request"])
def test_an_unhandled_error_says_which_kind_of_hook_raised_it(
    step_clock: StepClock, fail: str
) -> None:
    """``trace.error["where"]`` names the kind of hook that raised the
    unhandled exception (got_request_exception alone does not say).
    """

    def factory(log: list[str]) -> Flask:
        app = Flask(__name__)

        @app.before_request
        def check() -> None:
            if fail == "before_request":
                raise LookupError(fail)

        @app.route("/")
        def index() -> str:
            if fail == "view":
                raise LookupError(fail)
            return "ok"

        @app.after_request
        def finish(response: Response) -> Response:
            if fail == "after_request" and response.status_code == 200:
                raise LookupError(fail)
            return response

        return app

    pair = Pair(factory, step_clock)
    (status, _, _), trace = pair.both("/")
    assert status == "500 INTERNAL SERVER ERROR"
    assert trace.error is not None
    assert (trace.error["type"], trace.error["where"]) == ("builtins.LookupError", fail)


def test_an_unhandled_error_past_max_events_is_not_blamed_on_the_view(
    step_clock: StepClock,
) -> None:
    """When ``max_events`` left out the event of the hook that raised,
    ``where`` says ``app`` (somewhere in the app), not ``view``.
    """

    def factory(log: list[str]) -> Flask:
        app = Flask(__name__)

        @app.before_request
        def check() -> None:
            raise LookupError("refused")

        @app.route("/")
        def index() -> str:
            return "ok"

        return app

    pair = Pair(factory, step_clock, max_events=2)
    (status, _, _), trace = pair.both("/")
    assert status == "500 INTERNAL SERVER ERROR"
    assert "before_request" not in [event.kind for event in trace.events]
    assert trace.dropped_events > 0
    assert trace.error is not None
    assert trace.error["where"] == "app"


def both_then_disconnect(pair: Pair, receivers: list[Callable[..., None]]) -> tuple[Outcome, Trace]:
    """``pair.both("/")``, then disconnect ``receivers`` from
    ``request_finished`` (they were connected for the traced app only, but
    Flask's signals are global).
    """
    try:
        return pair.both("/")
    finally:
        for receiver in receivers:
            signals.request_finished.disconnect(receiver)


def test_an_error_no_hook_raised_is_not_blamed_on_a_hook_that_raised_another(
    step_clock: StepClock,
) -> None:
    """A before_request that aborts (401, answered by Flask) records an
    error; a later unhandled exception from outside any hook (here a
    request_finished receiver) is not reported as raised by that hook.
    """
    receivers: list[Callable[..., None]] = []

    def factory(log: list[str]) -> Flask:
        app = Flask(__name__)

        @app.before_request
        def require_login() -> None:
            abort(401)

        @app.route("/")
        def index() -> str:
            return "ok"

        def broken_receiver(sender: Flask, **_: Any) -> None:
            raise RuntimeError("receiver")

        receivers.append(broken_receiver)
        signals.request_finished.connect(broken_receiver, app)
        return app

    (status, _, _), trace = both_then_disconnect(Pair(factory, step_clock), receivers)
    assert status == "500 INTERNAL SERVER ERROR"
    assert trace.hooks() == ["before_request:require_login"]
    assert trace.error is not None
    assert trace.error["type"] == "builtins.RuntimeError"
    assert trace.error["where"] != "before_request"


def test_an_error_is_not_blamed_on_a_hook_whose_error_was_handled(
    step_clock: StepClock,
) -> None:
    """A before_request's LookupError answered by an error handler is over:
    a later LookupError from outside any hook (a request_finished
    receiver) is not reported as the before_request's.
    """
    receivers: list[Callable[..., None]] = []

    def factory(log: list[str]) -> Flask:
        app = Flask(__name__)

        @app.before_request
        def load() -> None:
            raise LookupError("not found")

        @app.errorhandler(LookupError)
        def missing(error: LookupError) -> tuple[str, int]:
            return "missing", 404

        @app.route("/")
        def index() -> str:
            return "ok"

        def broken_receiver(sender: Flask, response: Response, **_: Any) -> None:
            if response.status_code == 404:
                raise LookupError("receiver")

        receivers.append(broken_receiver)
        signals.request_finished.connect(broken_receiver, app)
        return app

    (status, _, _), trace = both_then_disconnect(Pair(factory, step_clock), receivers)
    assert status == "500 INTERNAL SERVER ERROR"
    assert trace.hooks() == ["before_request:load", "errorhandler:missing"]
    assert trace.error is not None
    assert trace.error["type"] == "builtins.LookupError"
    assert trace.error["where"] != "before_request"


def test_hook_that_raises(step_clock: StepClock) -> None:
    """A before_request that raises: marked ``error``, the view is skipped,
    the app's error handler answers.
    """
    pair = Pair(error_app, step_clock)
    (status, _, body), trace = pair.both("/boom?fail=before")
    assert (status, body) == ("409 CONFLICT", b"handled before_request failed")
    assert trace.hooks() == [
        "before_request:load",
        "errorhandler:boom_handler",
        "after_request:after",
        "teardown_request:teardown",
    ]
    assert trace.find(kind="before_request")[0].attrs["error"] == "BoomError"
    assert trace.find(kind="errorhandler")[0].attrs["exception"] == "BoomError"


def test_not_found(step_clock: StepClock) -> None:
    """A 404: app before_request hooks run, url_match names the error."""
    pair = Pair(error_app, step_clock)
    (status, _, body), trace = pair.both("/nowhere")
    assert (status, body) == ("404 NOT FOUND", b"nothing here")
    assert trace.hooks() == [
        "before_request:load",
        "errorhandler:not_found",
        "after_request:after",
        "teardown_request:teardown",
    ]
    [match] = trace.find(kind="url_match")
    assert match.attrs == {"error": "NotFound", "code": 404}
    assert trace.endpoint is None
    assert trace.find(kind="errorhandler")[0].attrs["code"] == 404


def test_method_not_allowed(step_clock: StepClock) -> None:
    """A 405 keeps its Allow header and is recorded as the routing error."""
    pair = Pair(error_app, step_clock)
    (status, headers, _), trace = pair.both("/boom", method="POST")
    assert status == "405 METHOD NOT ALLOWED"
    assert sorted(dict(headers)["Allow"].split(", ")) == ["GET", "HEAD", "OPTIONS"]
    assert trace.hooks() == [
        "before_request:load",
        "after_request:after",
        "teardown_request:teardown",
    ]
    [match] = trace.find(kind="url_match")
    assert match.attrs == {"error": "MethodNotAllowed", "code": 405}


def test_strict_slashes_redirect(step_clock: StepClock) -> None:
    """A missing trailing slash: Flask's 308 redirect, recorded with its target."""

    def factory(log: list[str]) -> Flask:
        app = Flask(__name__)

        @app.before_request
        def before() -> None:
            log.append("before")

        @app.route("/docs/")
        def docs() -> str:
            return "docs"

        return app

    pair = Pair(factory, step_clock)
    (status, headers, _), trace = pair.both("/docs")
    assert status == "308 PERMANENT REDIRECT"
    assert ("Location", "http://localhost/docs/") in headers
    assert trace.hooks() == ["before_request:before"]
    [match] = trace.find(kind="url_match")
    assert match.attrs == {
        "error": "RequestRedirect",
        "code": 308,
        "redirect": "http://localhost/docs/",
    }


def test_view_redirect_and_automatic_options(step_clock: StepClock) -> None:
    """A view returning redirect() is a normal view; OPTIONS is answered by
    Flask without a view event.
    """

    def factory(log: list[str]) -> Flask:
        app = Flask(__name__)

        @app.route("/old")
        def old() -> Response:
            return redirect(url_for("new"))

        @app.route("/new")
        def new() -> str:
            return "new"

        return app

    pair = Pair(factory, step_clock)
    (status, _, _), trace = pair.both("/old")
    assert status == "302 FOUND"
    assert trace.hooks() == ["view:old"]
    (status, _, _), trace = pair.both("/old", method="OPTIONS")
    assert status == "200 OK"
    assert trace.hooks() == []
    assert trace.endpoint == "old"


# -- signals ------------------------------------------------------------------

ALL_SIGNALS = (
    signals.request_started,
    signals.request_finished,
    signals.got_request_exception,
    signals.request_tearing_down,
    signals.appcontext_pushed,
    signals.appcontext_tearing_down,
    signals.appcontext_popped,
    signals.before_render_template,
    signals.template_rendered,
    signals.message_flashed,
)


def signal_app(log: list[str]) -> Flask:
    app = Flask(__name__)
    app.secret_key = "test"
    app.jinja_loader = DictLoader({"page.html": "<p>{{ value }}</p>"})

    @app.route("/")
    def index() -> str:
        flash("hello", "info")
        if request.args.get("fail"):
            raise BoomError("signal test, not handled")
        return render_template("page.html", value=1)

    return app


@pytest.mark.parametrize("query", ["", "fail=1"])
def test_signals_recorded_in_emission_order(step_clock: StepClock, query: str) -> None:
    """Every signal Flask sends for the request is a ``signal:<name>`` event,
    in the order the app's own receivers see them.
    """
    pair = Pair(signal_app, step_clock)
    seen: list[str] = []
    connected = []
    for signal in ALL_SIGNALS:

        def on_signal(sender: Any, _name: str = signal.name, **kwargs: Any) -> None:
            seen.append(f"signal:{_name}")

        signal.connect(on_signal, sender=pair.traced, weak=False)
        connected.append((signal, on_signal))
    try:
        _, trace = pair.both("/?" + query)
    finally:
        for signal, on_signal in connected:
            # Without a sender: blinker keeps a receiver disconnected from one
            # sender in ``signal.receivers``, which other tests read.
            signal.disconnect(on_signal)
    recorded = [e.name for e in trace.find(kind="signal")]
    assert recorded == seen
    expected = [
        "signal:appcontext-pushed",
        "signal:request-started",
        "signal:message-flashed",
    ]
    if query:
        expected.append("signal:got-request-exception")
    else:
        expected += ["signal:before-render-template", "signal:template-rendered"]
    expected += [
        "signal:request-finished",
        "signal:request-tearing-down",
        "signal:appcontext-tearing-down",
        "signal:appcontext-popped",
    ]
    assert recorded == expected


#: Signals Flask sends on every request that the extension times itself.
TIMED_SIGNALS = {
    "signal:request-started": signals.request_started,
    "signal:request-finished": signals.request_finished,
    "signal:request-tearing-down": signals.request_tearing_down,
    "signal:appcontext-tearing-down": signals.appcontext_tearing_down,
}


@pytest.mark.parametrize("received", [None, *TIMED_SIGNALS])
def test_core_signal_lasts_as_long_as_its_receivers(
    step_clock: StepClock, received: str | None
) -> None:
    """A core signal with a receiver lasts as long as the receiver took (plus
    one tick of the clock); one nobody receives is an instant, still in its
    place among the other signals.
    """

    def factory(log: list[str]) -> Flask:
        app = Flask(__name__)

        @app.route("/")
        def index() -> str:
            return "ok"

        return app

    def slow_receiver(sender: Any, **kwargs: Any) -> None:
        step_clock.advance(3_000_000)

    pair = Pair(factory, step_clock)
    # The instant needs no receiver for any sender (``receivers`` is global).
    assert not [name for name, signal in TIMED_SIGNALS.items() if signal.receivers]
    if received is not None:
        TIMED_SIGNALS[received].connect(slow_receiver, sender=pair.traced)
    try:
        _, trace = pair.both("/")
    finally:
        if received is not None:
            TIMED_SIGNALS[received].disconnect(slow_receiver)
    durations = {}
    for name in TIMED_SIGNALS:
        [event] = trace.find(name=name)
        durations[name] = event.duration_ns
    assert durations == {name: 3_000_001 if name == received else 0 for name in TIMED_SIGNALS}
    assert [e.name for e in trace.find(kind="signal")] == [
        "signal:appcontext-pushed",
        "signal:request-started",
        "signal:request-finished",
        "signal:request-tearing-down",
        "signal:appcontext-tearing-down",
        "signal:appcontext-popped",
    ]
    [started] = trace.find(name="signal:request-started")
    [view] = trace.find(kind="view")
    assert started.end_ns < view.start_ns


def test_signal_receivers_of_the_app_still_get_their_arguments(step_clock: StepClock) -> None:
    """Receivers connected by the app get the same sender and keywords."""
    pair = Pair(signal_app, step_clock)
    got: dict[str, tuple[Any, ...]] = {}

    def on_finished(sender: Any, response: Response, **kwargs: Any) -> None:
        got["finished"] = (sender, response.status_code)

    def on_rendered(sender: Any, template: Any, context: dict[str, Any], **kw: Any) -> None:
        got["rendered"] = (sender, template.name, context["value"])

    def on_flashed(sender: Any, message: str, category: str, **kwargs: Any) -> None:
        got["flashed"] = (sender, message, category)

    signals.request_finished.connect(on_finished, pair.traced)
    signals.template_rendered.connect(on_rendered, pair.traced)
    signals.message_flashed.connect(on_flashed, pair.traced)
    try:
        _, trace = pair.both("/")
    finally:
        signals.request_finished.disconnect(on_finished, pair.traced)
        signals.template_rendered.disconnect(on_rendered, pair.traced)
        signals.message_flashed.disconnect(on_flashed, pair.traced)
    assert got == {
        "finished": (pair.traced, 200),
        "rendered": (pair.traced, "page.html", 1),
        "flashed": (pair.traced, "hello", "info"),
    }
    [flashed] = trace.find(name="signal:message-flashed")
    assert flashed.attrs["category"] == "info"


# -- templates ------------------------------------------------------------------


def template_app(log: list[str]) -> Flask:
    app = Flask(__name__)
    app.jinja_loader = DictLoader(
        {
            "outer.html": "[{{ slow() }}{{ inner() }}]",
            "inner.html": "inner {{ value }}",
            "broken.html": "{{ fail() }}",
        }
    )

    @app.context_processor
    def helpers() -> dict[str, Any]:
        def inner() -> str:
            return render_template("inner.html", value=2)

        def slow() -> str:
            clock = app.config.get("TEST_CLOCK")
            if clock is not None:
                clock.advance(3_000_000)
            return "slow "

        def fail() -> str:
            raise BoomError("template failed")

        return {"inner": inner, "slow": slow, "fail": fail}

    @app.route("/")
    def index() -> str:
        return render_template("outer.html")

    @app.route("/string")
    def string() -> str:
        return render_template_string("{{ 1 + 1 }}")

    @app.route("/broken")
    def broken() -> str:
        try:
            render_template("broken.html")
        except BoomError:
            log.append("caught")
        return render_template("inner.html", value=3)

    return app


def test_template_events_with_render_duration(step_clock: StepClock) -> None:
    """``template:<name>`` spans the render; a nested render is its own event
    inside the outer one.
    """
    pair = Pair(template_app, step_clock)
    pair.traced.config["TEST_CLOCK"] = step_clock
    (_, _, body), trace = pair.both("/")
    assert body == b"[slow inner 2]"
    outer, inner = trace.find(kind="template")
    assert (outer.name, inner.name) == ("template:outer.html", "template:inner.html")
    assert outer.attrs["template"] == "outer.html"
    assert outer.duration_ns > 3_000_000
    assert outer.start_ns < inner.start_ns
    assert inner.end_ns <= outer.end_ns
    assert inner.duration_ns < 3_000_000
    assert hooks_without_defaults(trace) == [
        "view:index",
        "context_processor:helpers",
        "context_processor:helpers",
    ]


def test_template_from_string_and_after_a_failed_render(
    step_clock: StepClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A string template is ``template:<string>``; a render that raised does
    not lend its start to another render, and the starts it leaves behind
    stay within a cap.
    """
    monkeypatch.setattr("wsgitrace._flask_receivers._MAX_PENDING_TEMPLATES", 2)
    pair = Pair(template_app, step_clock)
    _, trace = pair.both("/string")
    assert [e.name for e in trace.find(kind="template")] == ["template:<string>"]
    # Both template signals name a template made from a string the same way.
    names = [e.attrs["template"] for e in trace.find(kind="signal") if "template" in e.name]
    assert names == ["<string>", "<string>"]
    for _ in range(5):
        (_, _, body), trace = pair.both("/broken")
        assert body == b"inner 3"
        [event] = trace.find(kind="template")
        assert event.name == "template:inner.html"
        [before] = [
            e
            for e in trace.find(name="signal:before-render-template")
            if e.attrs["template"] == "inner.html"
        ]
        assert event.start_ns == before.start_ns
        assert pair.traced_log[-1] == "caught"
    assert len(pair.ext.tracer_for(pair.traced)._template_starts) <= 2


# -- async and threads ------------------------------------------------------------


class AsyncioFlask(Flask):
    """Runs coroutines with asyncio.run: Flask's documented way to change how
    async code runs, and no need for asgiref here.
    """

    def async_to_sync(self, func: Callable[..., Coroutine[Any, Any, Any]]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            return asyncio.run(func(*args, **kwargs))

        return run


def async_app(log: list[str], app_class: type[Flask] = AsyncioFlask) -> Flask:
    app = app_class(__name__)

    @app.before_request
    async def async_before() -> None:
        await asyncio.sleep(0)
        g.before = "async"

    @app.route("/async/<name>")
    async def hello(name: str) -> str:
        await asyncio.sleep(0)
        return f"hello {name} from {g.before}"

    @app.route("/sync")
    def sync() -> str:
        return "sync"

    @app.after_request
    async def async_after(response: Response) -> Response:
        response.headers["X-Async"] = "1"
        return response

    @app.teardown_request
    async def async_teardown(exc: BaseException | None) -> None:
        log.append("teardown")

    @app.errorhandler(BoomError)
    async def async_handler(error: BoomError) -> tuple[str, int]:
        return "async handled", 500

    @app.route("/fail")
    async def fail() -> str:
        raise BoomError("async view failed")

    return app


def test_async_views_and_hooks(step_clock: StepClock) -> None:
    """Async views, hooks and error handlers run and are traced by their names."""
    pair = Pair(async_app, step_clock)
    (_, _, body), trace = pair.both("/async/ann")
    assert body == b"hello ann from async"
    assert trace.hooks() == [
        "before_request:async_before",
        "view:hello",
        "after_request:async_after",
        "teardown_request:async_teardown",
    ]
    assert trace.find(kind="before_request")[0].attrs["g_added"] == ["before"]
    (_, _, body), trace = pair.both("/fail")
    assert body == b"async handled"
    assert trace.hooks() == [
        "before_request:async_before",
        "view:fail",
        "errorhandler:async_handler",
        "after_request:async_after",
        "teardown_request:async_teardown",
    ]
    (_, _, body), trace = pair.both("/sync")
    assert trace.hooks()[1] == "view:sync"


def test_async_views_and_hooks_through_flasks_own_asgiref(step_clock: StepClock) -> None:
    """With flask[async] (asgiref), Flask's own async_to_sync path is traced the same."""
    pair = Pair(lambda log: async_app(log, Flask), step_clock)
    (_, _, body), trace = pair.both("/async/bo")
    assert body == b"hello bo from async"
    assert trace.hooks() == [
        "before_request:async_before",
        "view:hello",
        "after_request:async_after",
        "teardown_request:async_teardown",
    ]
    (_, _, body), trace = pair.both("/fail")
    assert body == b"async handled"
    assert "errorhandler:async_handler" in trace.hooks()


def test_threads_spawned_by_a_view_do_not_corrupt_the_trace(step_clock: StepClock) -> None:
    """A thread running copy_current_request_context (which pushes and pops
    the request context, running teardown in that thread) leaves the
    request's trace as Flask's own order says.
    """
    from flask import copy_current_request_context

    def factory(log: list[str]) -> Flask:
        app = Flask(__name__)

        @app.teardown_request
        def teardown(exc: BaseException | None) -> None:
            log.append(f"teardown in {threading.current_thread().name}")

        @app.route("/")
        def index() -> str:
            results: list[str] = []

            @copy_current_request_context
            def work() -> None:
                results.append(request.path)

            threads = [threading.Thread(target=work, name=f"w{i}") for i in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(5)
            return ",".join(results)

        return app

    pair = Pair(factory, step_clock)
    (_, _, body), trace = pair.both("/")
    assert body == b"/,/,/,/"
    assert sorted(pair.traced_log) == [
        "teardown in MainThread",
        "teardown in w0",
        "teardown in w1",
        "teardown in w2",
        "teardown in w3",
    ]
    assert trace.hooks() == ["view:index", "teardown_request:teardown"]
    assert {e.thread for e in trace.events} == {trace.thread}
    # The next request's trace is clean too.
    _, second = pair.both("/")
    assert second.hooks() == ["view:index", "teardown_request:teardown"]
    assert second is not trace


def test_thread_with_the_request_context_vars_records_as_itself(
    step_clock: StepClock,
) -> None:
    """A worker thread run in a copy of the request's contextvars belongs to
    the request: its teardown (from copy_current_request_context) is
    recorded with the worker's thread id, between the view's start and end.
    """
    import contextvars

    from flask import copy_current_request_context

    def factory(log: list[str]) -> Flask:
        app = Flask(__name__)

        @app.teardown_request
        def teardown(exc: BaseException | None) -> None:
            log.append("teardown")

        @app.route("/")
        def index() -> str:
            @copy_current_request_context
            def work() -> None:
                log.append(f"work {request.path}")

            context = contextvars.copy_context()
            thread = threading.Thread(target=context.run, args=(work,))
            thread.start()
            thread.join(5)
            return "ok"

        return app

    pair = Pair(factory, step_clock)
    _, trace = pair.both("/")
    assert pair.traced_log == ["work /", "teardown", "teardown"]
    assert trace.hooks() == ["view:index", "teardown_request:teardown", "teardown_request:teardown"]
    [view] = trace.find(kind="view")
    worker, main = trace.find(kind="teardown_request")
    assert worker.thread != trace.thread
    assert main.thread == trace.thread
    assert view.start_ns < worker.start_ns < worker.end_ns < view.end_ns
    assert main.start_ns > view.end_ns


def test_streamed_template_and_context_kept_for_the_body(step_clock: StepClock) -> None:
    """stream_with_context keeps the request context for the body: the trace
    shows a second teardown after the body started.
    """
    from flask import stream_with_context

    def factory(log: list[str]) -> Flask:
        app = Flask(__name__)

        @app.teardown_request
        def teardown(exc: BaseException | None) -> None:
            log.append("teardown")

        @app.route("/stream")
        def stream() -> Response:
            def generate() -> Iterator[str]:
                for i in range(3):
                    yield f"{request.path}:{i}\n"
                log.append("generated")

            return Response(stream_with_context(generate()))

        return app

    pair = Pair(factory, step_clock)
    (_, _, body), trace = pair.both("/stream")
    assert body == b"/stream:0\n/stream:1\n/stream:2\n"
    # Flask 3.1 tears the request down when the view returns and again when
    # the body ends; Flask 3.0 only when the body ends.
    teardowns = ["teardown_request:teardown"] * (2 if TEARDOWN_TWICE else 1)
    assert pair.traced_log == ["teardown"] * (len(teardowns) - 1) + ["generated", "teardown"]
    assert trace.hooks() == ["view:stream", *teardowns]
    [body_event] = trace.find(kind="body")
    [close] = trace.find(kind="close")
    assert body_event.attrs["chunks"] >= 3
    *first, last_teardown = trace.find(kind="teardown_request")
    assert all(event.end_ns < body_event.start_ns for event in first)
    # The generator's context is popped when it ends: after the last chunk,
    # before the server's close().
    assert body_event.start_ns < last_teardown.start_ns
    assert last_teardown.end_ns <= body_event.end_ns <= close.start_ns


def test_after_request_that_raises_unhandled(step_clock: StepClock) -> None:
    """An after_request that raises: Flask answers with its 500 handler and
    finalizes again, so the after_request hooks run a second time (the
    failing one raising again, logged by Flask); the trace shows exactly that.
    """

    def factory(log: list[str]) -> Flask:
        app = Flask(__name__)

        @app.route("/")
        def index() -> str:
            return "ok"

        @app.after_request
        def fragile(response: Response) -> Response:
            log.append(f"fragile {response.status_code}")
            raise BoomError("after_request failed")

        @app.after_request
        def stamp(response: Response) -> Response:
            log.append(f"stamp {response.status_code}")
            response.headers["X-Stamp"] = "1"
            return response

        @app.errorhandler(500)
        def server_error(error: Exception) -> tuple[str, int]:
            return "sorry", 500

        @app.teardown_request
        def teardown(exc: BaseException | None) -> None:
            log.append(f"teardown {type(exc).__name__}")

        return app

    pair = Pair(factory, step_clock)
    (status, headers, body), trace = pair.both("/")
    assert (status, body) == ("500 INTERNAL SERVER ERROR", b"sorry")
    assert ("X-Stamp", "1") in headers
    assert pair.traced_log == [
        "stamp 200",
        "fragile 200",
        "stamp 500",
        "fragile 500",
        "teardown BoomError",
    ]
    assert trace.hooks() == [
        "view:index",
        "after_request:stamp",
        "after_request:fragile",
        "errorhandler:server_error",
        "after_request:stamp",
        "after_request:fragile",
        "teardown_request:teardown",
    ]
    assert [e.attrs.get("error") for e in trace.find(kind="after_request")] == [
        None,
        "BoomError",
        None,
        "BoomError",
    ]
    assert [e.name for e in trace.find(kind="signal")].count("signal:request-finished") == 0
