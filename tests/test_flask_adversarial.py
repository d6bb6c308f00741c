"""FlaskTrace against unusual but legitimate uses of Flask: each scenario runs
on two apps built by one factory, one plain and one traced, and asserts the
same responses (or exceptions) and the same hook runs, then what the trace
says about them.
"""

from __future__ import annotations

import contextvars
import gc
import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any

import pytest
from flask import (
    Blueprint,
    Flask,
    Response,
    abort,
    after_this_request,
    g,
    request,
    session,
    signals,
    url_for,
)
from flask.sessions import SecureCookieSessionInterface, SessionInterface, SessionMixin
from flask.views import MethodView

from wsgitrace._internal import internal_error_count
from wsgitrace.flask import FlaskTrace
from wsgitrace.trace import Trace

#: A response as the client saw it, or the type and text of what was raised.
Outcome = tuple[Any, ...]
Factory = Callable[[list[Any]], Flask]


def serve(app: Flask, path: str, method: str = "GET") -> Outcome:
    """One request through the test client: status, headers and body, or
    the type and message of the exception that came out of the app.
    """
    try:
        response = app.test_client().open(path, method=method)
    except Exception as exc:
        return ("raised", type(exc).__name__, str(exc))
    try:
        return response.status, sorted(response.headers.items()), response.get_data()
    finally:
        response.close()


def plain_and_traced(
    factory: Factory, path: str, method: str = "GET", **config: Any
) -> tuple[Outcome, list[Any], Trace]:
    """Serve ``path`` on a plain and a traced app made by ``factory``
    (which logs what the app's code saw into the list it is given); assert
    the same outcome and log, and return them with the trace.
    """
    results = []
    for traced in (False, True):
        log: list[Any] = []
        app = factory(log)
        app.config.update(config)
        ext = FlaskTrace(app) if traced else None
        results.append((serve(app, path, method), log, ext))
    (plain, plain_log, _), (outcome, log, ext) = results
    assert outcome == plain
    assert log == plain_log
    assert ext is not None
    trace = ext.buffer.last
    assert trace is not None
    return outcome, log, trace


# -- a request dispatched inside another ----------------------------------------


def nested_dispatch_app(log: list[Any], how: str) -> Flask:
    """``/outer/<n>`` dispatches ``/reset/<token>`` itself, as batch
    endpoints do (a test request context) and internal redirects do (a copy
    of the request's environ with another path).
    """
    app = Flask(__name__)

    @app.before_request
    def note_path() -> None:
        log.append(request.path)

    @app.route("/outer/<int:n>")
    def outer(n: int) -> str:
        if how == "test_request_context":
            context = app.test_request_context("/reset/s3cr3t-value")
        else:
            context = app.request_context({**request.environ, "PATH_INFO": "/reset/s3cr3t-value"})
        with context:
            inner = app.full_dispatch_request()
        return f"outer {n}: {inner.get_data(as_text=True)}"

    @app.route("/reset/<token>")
    def reset(token: str) -> str:
        return "reset"

    return app


@pytest.mark.parametrize("how", ["test_request_context", "copied environ"])
def test_a_request_dispatched_inside_another_leaves_the_outer_ones_url(how: str) -> None:
    """The trace is the outer request's: its endpoint, rule, view arguments
    and path stay the outer ones (not the inner URL's, whose secret view
    argument must not redact a segment of the outer path); both dispatches'
    hooks are listed.
    """
    outcome, log, trace = plain_and_traced(lambda log: nested_dispatch_app(log, how), "/outer/5")
    assert outcome[2] == b"outer 5: reset"
    assert log == ["/outer/5", "/reset/s3cr3t-value"]
    assert (trace.endpoint, trace.rule, trace.view_args) == ("outer", "/outer/<int:n>", {"n": 5})
    assert trace.path == "/outer/5"
    assert trace.hooks() == [
        "before_request:note_path",
        "view:outer",
        "before_request:note_path",
        "view:reset",
    ]
    inner = trace.find(kind="url_match")[1]
    assert inner.attrs == {"endpoint": "reset", "rule": "/reset/<token>"}


def test_a_redirect_of_a_request_dispatched_inside_another_leaves_the_outer_path() -> None:
    """An inner dispatch that Flask answers with a redirect (its rule wants a
    trailing slash) is only noted: its rule's secret view argument does not
    redact a segment of the outer request's path.
    """

    def factory(log: list[Any]) -> Flask:
        app = Flask(__name__)

        @app.route("/outer/<int:n>")
        def outer(n: int) -> str:
            with app.test_request_context("/reset/s3cr3t-value"):
                inner = app.full_dispatch_request()
            log.append(inner.status_code)
            return f"outer {n}"

        @app.route("/reset/<token>/")
        def reset(token: str) -> str:
            return "reset"

        return app

    outcome, log, trace = plain_and_traced(factory, "/outer/5")
    assert (outcome[2], log) == (b"outer 5", [308])
    assert trace.path == "/outer/5"
    assert (trace.endpoint, trace.view_args) == ("outer", {"n": 5})
    inner = trace.find(kind="url_match")[1]
    assert inner.attrs["redirect"] == "http://localhost/reset/[redacted]/"


# -- work left running in a copy of the request's context ----------------------


def background_job_app(log: list[Any], release: threading.Event) -> Flask:
    """A view that starts a job in a copy of its context (as
    ``asyncio.to_thread`` and executors that copy contextvars do); the job
    waits for ``release``, then uses an app context and a request context
    of its own.
    """
    app = Flask(__name__)
    app.secret_key = "not a secret"

    @app.teardown_appcontext
    def release_db(exc: BaseException | None) -> None:
        log.append("release_db")

    @app.route("/")
    def start() -> str:
        g.user = "ann"
        session["cart"] = 1

        def job() -> None:
            release.wait(5)
            with app.app_context():
                g.job = "background"
            with app.test_request_context("/"):
                session["job"] = 2
                app.do_teardown_request(None)

        thread = threading.Thread(target=contextvars.copy_context().run, args=(job,))
        log.append(thread)
        thread.start()
        return "started"

    return app


def test_a_job_left_running_in_the_request_context_does_not_rewrite_its_trace() -> None:
    """The trace keeps the request's own ``g`` and session keys: the app and
    request contexts a job opens later on another thread (in a copy of the
    request's contextvars, so the trace is current there) are not the
    request's, and a finished trace is no longer written to.
    """
    release = threading.Event()
    log: list[Any] = []
    app = background_job_app(log, release)
    ext = FlaskTrace(app)
    assert serve(app, "/")[2] == b"started"
    trace = ext.buffer.last
    assert trace is not None
    assert trace.finished
    before = trace.to_dict()
    assert (trace.g, trace.session_keys) == ({"user": "'ann'"}, ["cart"])
    release.set()
    log[0].join(5)
    assert log[1:] == ["release_db", "release_db"]
    assert (trace.g, trace.session_keys) == ({"user": "'ann'"}, ["cart"])
    # What the job's hooks would have added is dropped, and only counted.
    after = trace.to_dict()
    assert after.pop("dropped_events") > before.pop("dropped_events") == 0
    assert after == before


# -- what the app logs ----------------------------------------------------------


class _Records(logging.Handler):
    """Keeps what Flask's default log format shows of each record, and where
    the record says it was made.
    """

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[Any, ...]] = []

    def emit(self, record: logging.LogRecord) -> None:
        where = (record.pathname, record.module, record.funcName, record.lineno)
        self.seen.append((record.levelname, record.getMessage(), *where))


def failing_after_request_app(log: list[Any]) -> Flask:
    """An after_request hook that fails, also for the 500 response Flask
    makes of its error: Flask logs the error, then that finalizing failed.
    """
    app = Flask(__name__)

    @app.after_request
    def stamp(response: Any) -> Any:
        log.append(response.status_code)
        raise RuntimeError("stamp failed")

    @app.route("/")
    def index() -> str:
        return "index"

    return app


def test_flasks_error_log_records_say_they_come_from_flask() -> None:
    """Flask's "Request finalizing failed" record names Flask's module,
    method and line, as without tracing: Flask's default log format
    (``ERROR in app: ...``) and log processors show where a record was made.
    """
    seen = []
    for traced in (False, True):
        log: list[Any] = []
        app = failing_after_request_app(log)
        records = _Records()
        app.logger.addHandler(records)
        app.logger.propagate = False
        if traced:
            FlaskTrace(app)
        try:
            assert serve(app, "/")[0] == "500 INTERNAL SERVER ERROR"
        finally:
            app.logger.removeHandler(records)
            app.logger.propagate = True
        assert log == [200, 500]
        seen.append(records.seen)
    plain, traced_records = seen
    assert [r[1] for r in plain] == [
        "Exception on / [GET]",
        "Request finalizing failed with an error while handling an error",
    ]
    assert [r[3:5] for r in plain] == [("app", "log_exception"), ("app", "finalize_request")]
    assert traced_records == plain


# -- full_dispatch_request replaced ---------------------------------------------


class TransactionFlask(Flask):
    """Wraps each dispatch, as apps do to open a transaction per request."""

    def full_dispatch_request(self) -> Response:
        g.transaction = "open"
        return super().full_dispatch_request()


def reset_app(log: list[Any], app_class: type[Flask] = Flask) -> Flask:
    app = app_class(__name__)

    @app.before_request
    def note_endpoint() -> None:
        log.append(request.endpoint)

    @app.route("/reset/<token>")
    def reset(token: str) -> str:
        return "reset"

    return app


@pytest.mark.parametrize("how", ["subclass", "patched after init_app"])
def test_the_url_match_is_kept_when_full_dispatch_request_is_not_flasks(
    how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full_dispatch_request of the app's class or of an agent (Dynatrace's
    patches Flask's) still runs the phases it calls, and the trace still
    gets the URL match: the endpoint, rule and view arguments, and the path
    with its secret view argument redacted.
    """
    own = Flask.full_dispatch_request
    patched: list[str] = []

    def agent(self: Flask) -> Response:
        patched.append(request.path)
        return own(self)

    log: list[Any] = []
    app = reset_app(log, TransactionFlask if how == "subclass" else Flask)
    ext = FlaskTrace(app)
    if how == "subclass":
        assert ext.skipped == ["full_dispatch_request"]
    else:
        monkeypatch.setattr(Flask, "full_dispatch_request", agent)
    assert serve(app, "/reset/s3cr3t-t0ken")[2] == b"reset"
    assert log == ["reset"]
    assert patched == ([] if how == "subclass" else ["/reset/s3cr3t-t0ken"])
    trace = ext.buffer.last
    assert trace is not None
    assert (trace.endpoint, trace.rule) == ("reset", "/reset/<token>")
    assert trace.view_args == {"token": "[redacted]"}
    assert trace.path == "/reset/[redacted]"
    assert "s3cr3t" not in trace.to_json()
    assert trace.hooks() == ["before_request:note_endpoint", "view:reset"]
    assert len(trace.find(kind="url_match")) == 1


def test_the_url_match_is_kept_when_an_agent_patched_every_dispatch_method(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An agent that patched Flask's dispatch methods before the app was
    traced (ddtrace patches its whole request lifecycle at import) leaves no
    phase to wsgitrace; the URL match is still recorded, so that the
    trace's path never holds a secret view argument.
    """
    calls: list[str] = []
    for name in ("full_dispatch_request", "preprocess_request", "dispatch_request"):
        own = getattr(Flask, name)

        def agent(self: Flask, *args: Any, own: Any = own, name: str = name) -> Any:
            calls.append(name)
            return own(self, *args)

        monkeypatch.setattr(Flask, name, agent)
    log: list[Any] = []
    app = reset_app(log)
    ext = FlaskTrace(app)
    assert ext.skipped == ["full_dispatch_request", "preprocess_request", "dispatch_request"]
    assert serve(app, "/reset/s3cr3t-t0ken")[2] == b"reset"
    assert calls == ["full_dispatch_request", "preprocess_request", "dispatch_request"]
    trace = ext.buffer.last
    assert trace is not None
    assert (trace.endpoint, trace.view_args) == ("reset", {"token": "[redacted]"})
    assert trace.path == "/reset/[redacted]"
    assert len(trace.find(kind="url_match")) == 1
    # A request that is not traced is left alone.
    with app.test_request_context("/reset/other"):
        assert app.full_dispatch_request().get_data() == b"reset"
    # The receiver goes with the app.
    del app, ext, trace
    gc.collect()
    assert not signals.request_started.receivers


# -- where an unhandled error came from -----------------------------------------


class _FailingSave(SecureCookieSessionInterface):
    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        raise ConnectionError("session store down")


def _failing_receiver(sender: Flask, **_: Any) -> None:
    raise ConnectionError("metrics down")


def failing_outside_hooks_app(log: list[Any], source: str) -> Flask:
    """A request whose error comes from no hook and no view: the session
    store, or a request_finished receiver after a before_request answered.
    """
    app = Flask(__name__)
    app.secret_key = "not a secret"

    @app.before_request
    def check() -> None:
        log.append("check")
        if source == "receiver":
            abort(401)

    @app.route("/")
    def index() -> str:
        session["seen"] = True
        return "index"

    if source == "session":
        app.session_interface = _FailingSave()
    else:
        signals.request_finished.connect(_failing_receiver, app)
    return app


@pytest.mark.parametrize("source", ["session", "receiver"])
def test_an_error_no_hook_or_view_raised_is_not_blamed_on_the_view(source: str) -> None:
    """An unhandled error raised by Flask's own work (saving the session, a
    signal's receiver) says ``where: app``, as an error outside any hook
    does: not ``view``, whose event shows it returned (or never ran).
    """
    try:
        outcome, _, trace = plain_and_traced(
            lambda log: failing_outside_hooks_app(log, source), "/", PROPAGATE_EXCEPTIONS=True
        )
    finally:
        signals.request_finished.disconnect(_failing_receiver)
    assert outcome == ("raised", "ConnectionError", str(trace.error and trace.error["message"]))
    assert trace.error is not None
    assert trace.error["where"] == "app"
    assert all("error" not in event.attrs for event in trace.find(kind="view"))


def failing_teardown_app(log: list[Any], kind: str) -> Flask:
    app = Flask(__name__)

    def close_db(exc: BaseException | None) -> None:
        log.append(exc)
        raise ConnectionError("close failed")

    if kind == "teardown_request":
        app.teardown_request(close_db)
    else:
        app.teardown_appcontext(close_db)

    @app.route("/")
    def index() -> str:
        return "index"

    return app


@pytest.mark.parametrize("kind", ["teardown_request", "teardown_appcontext"])
def test_an_error_a_teardown_function_raised_names_its_kind(kind: str) -> None:
    """A teardown function's error leaves the app (Flask sends no
    got_request_exception for it); the trace's error names the kind of hook
    that raised it, as for the other hooks, and its event has the error.
    """
    outcome, log, trace = plain_and_traced(lambda log: failing_teardown_app(log, kind), "/")
    assert outcome == ("raised", "ConnectionError", "close failed")
    assert log == [None]
    assert trace.error is not None
    assert (trace.error["type"], trace.error["where"]) == ("builtins.ConnectionError", kind)
    [event] = trace.find(kind=kind)
    assert event.attrs["error"] == "ConnectionError"
    assert trace.find(kind="error")[0].attrs["where"] == "app"


# -- what a traced app leaves behind when it goes --------------------------------


@pytest.mark.parametrize("skipped", [False, True])
def test_a_freed_app_leaves_no_receiver_and_its_traces_go(
    skipped: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Apps made per test (an app factory) are freed one after another: each
    takes its signal receivers, its extension and its buffer of traces with
    it, rather than leaving them connected to Flask's signals for the life
    of the process.
    """
    from blinker import NamedSignal
    from flask import signals as flask_signals

    if skipped:  # the URL match's receiver too (see above)
        for name in ("full_dispatch_request", "preprocess_request"):
            own = getattr(Flask, name)
            monkeypatch.setattr(Flask, name, lambda self, own=own: own(self))
    every = [s for s in vars(flask_signals).values() if isinstance(s, NamedSignal)]
    before = {signal: dict(signal.receivers) for signal in every}
    buffers = []
    for _ in range(3):
        app = reset_app([])
        ext = FlaskTrace(app)
        assert serve(app, "/reset/t0ken")[2] == b"reset"
        assert len(ext.buffer) == 1
        buffers.append(weakref.ref(ext.buffer))
        del app, ext
    gc.collect()
    assert [buffer() for buffer in buffers] == [None, None, None]
    assert {signal: dict(signal.receivers) for signal in every} == before


# -- sessions that are not dicts -------------------------------------------------


class StoreSession(SessionMixin):
    """A session kept as a mapping over a store, not a dict subclass
    (SessionMixin is a MutableMapping): what a server-side session may be.
    """

    def __init__(self) -> None:
        self.data = {"csrf_token": "s3ss10n-secret"}

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value

    def __delitem__(self, key: str) -> None:
        del self.data[key]

    def __iter__(self) -> Any:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


class StoreSessions(SessionInterface):
    def open_session(self, app: Flask, request: Any) -> StoreSession:
        return StoreSession()

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        return None


def store_session_app(log: list[Any]) -> Flask:
    app = Flask(__name__)
    app.session_interface = StoreSessions()

    @app.route("/")
    def index() -> str:
        key = request.args["api_key"]
        app.logger.warning("retrying with %s", key)
        raise RuntimeError(f"upstream refused key {key}")

    return app


def test_a_session_that_is_not_a_dict_leaves_the_request_secrets_redacted() -> None:
    """The request's secrets (here a query value under a secret-looking
    name) are cut out of the error and log messages whatever the session
    class, without an error of wsgitrace's own.
    """
    errors = internal_error_count()
    outcome, _, trace = plain_and_traced(store_session_app, "/?api_key=abcdef123456")
    assert outcome[0] == "500 INTERNAL SERVER ERROR"
    assert trace.error is not None
    assert trace.error["message"] == "upstream refused key [redacted]"
    [warning] = trace.find(kind="log", name="log:warning")
    assert warning.attrs["message"] == "retrying with [redacted]"
    assert "abcdef123456" not in trace.to_json()
    assert internal_error_count() == errors


# -- a secret view argument a url_value_preprocessor pulls out ----------------


class ResetToken:
    """What an app may turn a token from the URL into."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return f"<reset token #{len(self.text)}>"


def pulled_token_app(log: list[Any], how: str) -> Flask:
    """Flask's documented pattern for a value in every URL of a blueprint:
    a url_value_preprocessor pops it from the view arguments into ``g``, or
    replaces it with an object of the app's.
    """
    app = Flask(__name__)

    @app.url_value_preprocessor
    def pull_token(endpoint: str | None, values: dict[str, Any] | None) -> None:
        if values and how == "popped":
            g.token = ResetToken(values.pop("token"))
        elif values:
            values["token"] = g.token = ResetToken(values["token"])

    @app.route("/reset/<token>/confirm")
    def confirm(**values: Any) -> str:
        app.logger.warning("checking %s", g.token.text)
        raise RuntimeError(f"token {g.token.text} expired")

    return app


@pytest.mark.parametrize("how", ["popped", "replaced"])
def test_a_secret_view_argument_pulled_into_g_is_still_redacted(how: str) -> None:
    """The token was a secret view argument when the URL matched: popping
    it from the view arguments, or replacing it, does not let it into the
    trace, through the error's message, the app's log record or Flask's
    ``Exception on <path>``.
    """
    outcome, _, trace = plain_and_traced(
        lambda log: pulled_token_app(log, how), "/reset/s3cr3t-t0ken/confirm"
    )
    assert outcome[0] == "500 INTERNAL SERVER ERROR"
    assert trace.path == "/reset/[redacted]/confirm"
    assert trace.error is not None
    assert trace.error["message"] == "token [redacted] expired"
    assert [e.attrs["message"] for e in trace.find(kind="log")] == [
        "checking [redacted]",
        "Exception on /reset/[redacted]/confirm [GET]",
    ]
    assert "s3cr3t" not in trace.to_json()


# -- hook order in unusual flows ---------------------------------------------------


def unusual_flows_app(log: list[Any]) -> Flask:
    """after_this_request chains, short-circuits of every shape, an abort in
    a url_value_preprocessor, an error handler that fails, a MethodView and
    a nested blueprint registered twice under another name.
    """
    app = Flask(__name__)
    parent = Blueprint("parent", __name__)
    child = Blueprint("child", __name__)

    @app.url_value_preprocessor
    def check_id(endpoint: str | None, values: dict[str, Any] | None) -> None:
        if values and values.get("item") == "forbidden":
            abort(403)

    @app.before_request
    def shortcut() -> Any:
        answers: dict[str, Any] = {
            "tuple": ("from a tuple", 201, {"X-Shortcut": "tuple"}),
            "dict": {"from": "a dict"},
            "response": Response("from a response", 202),
            "empty": "",
        }
        return answers.get(request.args.get("shortcut", ""))

    @app.route("/chain")
    def chain() -> str:
        @after_this_request
        def first(response: Response) -> Response:
            log.append("first")

            @after_this_request
            def added_while_running(response: Response) -> Response:
                log.append("added_while_running")
                return response

            return response

        return "chain"

    @app.route("/items/<item>")
    def item(item: str) -> str:
        return item

    @app.errorhandler(LookupError)
    def lookup_failed(error: LookupError) -> str:
        raise ValueError("the handler failed too")

    @app.route("/lookup")
    def lookup() -> str:
        raise LookupError("missing")

    class Things(MethodView):
        def get(self) -> str:
            return "things"

    app.add_url_rule("/things", view_func=Things.as_view("things"))

    @child.before_request
    def child_before() -> None:
        log.append(f"child_before {request.blueprints}")

    @child.route("/leaf")
    def leaf() -> str:
        return url_for(".leaf")

    parent.register_blueprint(child, url_prefix="/c")
    app.register_blueprint(parent, url_prefix="/one")
    app.register_blueprint(parent, url_prefix="/two", name="second")
    return app


@pytest.mark.parametrize(
    ("path", "method", "hooks"),
    [
        (
            "/chain",
            "GET",
            [
                "before_request:shortcut",
                "view:chain",
                "after_request:first",
                "after_request:added_while_running",
            ],
        ),
        ("/chain?shortcut=tuple", "GET", ["before_request:shortcut"]),
        ("/chain?shortcut=dict", "GET", ["before_request:shortcut"]),
        ("/chain?shortcut=response", "GET", ["before_request:shortcut"]),
        ("/chain?shortcut=empty", "GET", ["before_request:shortcut"]),
        ("/items/forbidden", "GET", []),
        (
            "/lookup",
            "GET",
            ["before_request:shortcut", "view:lookup", "errorhandler:lookup_failed"],
        ),
        ("/things", "HEAD", ["before_request:shortcut", "view:things"]),
        ("/things", "OPTIONS", ["before_request:shortcut"]),
        ("/things", "DELETE", ["before_request:shortcut"]),
        (
            "/two/c/leaf",
            "GET",
            [
                "before_request:shortcut",
                "before_request:second.child.child_before",
                "view:second.child.leaf",
            ],
        ),
    ],
)
def test_unusual_flows_run_and_are_listed_as_flask_runs_them(
    path: str, method: str, hooks: list[str]
) -> None:
    """Same responses, same hook runs, and ``hooks()`` lists what ran (the
    url_value_preprocessor, then ``hooks``): hooks added while after_request
    functions run, every shape a before_request may answer with, aborts and
    failing handlers, Flask's automatic OPTIONS, and a blueprint registered
    twice.
    """
    _, _, trace = plain_and_traced(unusual_flows_app, path, method)
    assert trace.hooks() == ["url_value_preprocessor:check_id", *hooks]


# -- requests made while the test holds an app context ------------------------


def test_a_request_made_inside_an_app_context_keeps_its_g() -> None:
    """Tests often make requests inside ``with app.app_context():`` (a
    fixture that sets up the database): the request then uses that context
    and its ``g``, which it does not tear down. The trace still keeps the
    ``g`` the request left, as it does for a request with its own context.
    """
    app = Flask(__name__)

    @app.before_request
    def load_user() -> None:
        g.user = "ann"

    @app.route("/")
    def index() -> str:
        return "index"

    ext = FlaskTrace(app)
    with app.app_context():
        g.db = "test database"
        assert serve(app, "/")[2] == b"index"
        assert g.user == "ann"
        trace = ext.buffer.last
        assert trace is not None
        assert trace.g == {"db": "'test database'", "user": "'ann'"}
    assert serve(app, "/")[2] == b"index"
    assert ext.buffer.latest(1)[0].g == {"user": "'ann'"}


def test_an_app_context_pushed_inside_the_request_does_not_stand_for_its_g() -> None:
    """A view that runs work in an app context of its own (``with
    app.app_context():``): that context's ``g`` is gone with it, and is not
    the request's; the trace keeps the request's ``g`` (here empty), while
    the teardown that ran for the inner context is listed.
    """

    def factory(log: list[Any]) -> Flask:
        app = Flask(__name__)

        @app.teardown_appcontext
        def close_db(exc: BaseException | None) -> None:
            log.append(sorted(vars(g)))

        @app.route("/")
        def index() -> str:
            with app.app_context():
                g.setup = "inner work"
            return "index"

        return app

    _, log, trace = plain_and_traced(factory, "/")
    assert log == [["setup"], []]
    assert trace.g is None
    assert trace.hooks() == [
        "view:index",
        "teardown_appcontext:close_db",
        "teardown_appcontext:close_db",
    ]
