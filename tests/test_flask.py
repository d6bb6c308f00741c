"""FlaskTrace: set-up (direct and factory pattern, configuration, installed
once), transparency (routes, ``g``, hook arguments, exceptions, subclasses),
independence of two apps, fault isolation and not keeping an app alive.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import re
import subprocess
import sys
import threading
import traceback
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from flask import Blueprint, Flask, Response, abort, g, render_template_string, request
from werkzeug.exceptions import NotFound

import wsgitrace.flask as wsgitrace_flask
from wsgitrace import TraceBuffer, TraceMiddleware
from wsgitrace.exceptions import ConfigurationError
from wsgitrace.flask import FlaskTrace
from wsgitrace.trace import Trace

Outcome = tuple[str, list[tuple[str, str]], bytes]


class _AnyHeaders(list[tuple[str, str]]):
    def __eq__(self, other: object) -> bool:
        return isinstance(other, list)

    __hash__ = None  # type: ignore[assignment]


ANY_HEADERS = _AnyHeaders()


class CountingClock:
    """A nanosecond clock that moves by one per reading and can be told to
    fail from its ``fail_at``-th reading on (or only at that one).
    """

    def __init__(self, fail_at: int | None = None, *, once: bool = False) -> None:
        self.calls = 0
        self.fail_at = fail_at
        self.once = once
        self.failed = 0
        self._lock = threading.Lock()

    def __call__(self) -> int:
        with self._lock:
            self.calls += 1
            if self.fail_at is not None and (
                self.calls == self.fail_at or (not self.once and self.calls > self.fail_at)
            ):
                self.failed += 1
                msg = f"clock failure at reading {self.calls}"
                raise RuntimeError(msg)
            return 1_000_000 + self.calls


def fetch(app: Flask, path: str = "/", method: str = "GET", **kwargs: Any) -> Outcome:
    """Status, headers and body as a client sees them; the response is closed."""
    response = app.test_client().open(path, method=method, **kwargs)
    try:
        return response.status, list(response.headers.items()), response.get_data()
    finally:
        response.close()


def last(ext: FlaskTrace) -> Trace:
    trace = ext.buffer.last
    assert trace is not None
    return trace


def simple_app(log: list[str] | None = None) -> Flask:
    """An app with one hook of each common kind and a template."""
    log = [] if log is None else log
    app = Flask(__name__)
    admin = Blueprint("admin", __name__, url_prefix="/admin")

    @app.before_request
    def load_user() -> None:
        log.append("load_user")
        g.user = request.args.get("user", "guest")

    @admin.before_request
    def require_admin() -> tuple[str, int] | None:
        log.append("require_admin")
        return None if g.user == "admin" else ("no", 403)

    @app.route("/")
    def index() -> str:
        log.append("index")
        return render_template_string("hi {{ g.user }}")

    @admin.route("/")
    def dashboard() -> str:
        return "dashboard"

    @app.route("/fail")
    def fail() -> str:
        raise RuntimeError("simple_app failed on purpose")

    @app.after_request
    def add_header(response: Response) -> Response:
        log.append("add_header")
        response.headers["X-Hook"] = "1"
        return response

    @app.teardown_request
    def close_db(exc: BaseException | None) -> None:
        log.append("close_db")

    @app.teardown_appcontext
    def release(exc: BaseException | None) -> None:
        log.append("release")

    app.register_blueprint(admin)
    return app


SIMPLE_HOOKS = [
    "before_request:load_user",
    "view:index",
    "context_processor:_default_template_ctx_processor",
    "after_request:add_header",
    "teardown_request:close_db",
    "teardown_appcontext:release",
]


# -- set-up -------------------------------------------------------------------


class TestSetUp:
    def test_direct(self) -> None:
        """FlaskTrace(app) installs the middleware and registers itself."""
        app = simple_app()
        ext = FlaskTrace(app)
        assert app.extensions["wsgitrace"] is ext
        assert isinstance(app.wsgi_app, TraceMiddleware)
        assert ext.middleware is app.wsgi_app
        assert isinstance(ext.buffer, TraceBuffer)
        assert fetch(app)[2] == b"hi guest"
        assert last(ext).hooks() == SIMPLE_HOOKS

    def test_repr_names_the_apps(self) -> None:
        """repr() lists the names of the apps the extension traces."""
        ext = FlaskTrace()
        assert repr(ext) == "<FlaskTrace no app>"
        app = simple_app()
        ext.init_app(app)
        assert repr(ext) == f"<FlaskTrace {app.name!r}>"

    def test_middleware_of_an_app_gone_says_so(self) -> None:
        """Once the app is garbage-collected, ``ext.middleware`` says the
        app is gone (not to call init_app), and its traces stay readable.
        """
        app = simple_app()
        ext = FlaskTrace(app)
        assert fetch(app)[0] == "200 OK"
        del app
        gc.collect()
        with pytest.raises(RuntimeError, match="no longer exists"):
            _ = ext.middleware
        assert len(ext.buffer) == 1

    def test_factory_pattern(self) -> None:
        """ext = FlaskTrace(); ext.init_app(app) inside a factory works the same."""
        ext = FlaskTrace(max_events=100)
        with pytest.raises(RuntimeError, match="init_app"):
            _ = ext.buffer
        with pytest.raises(RuntimeError, match="init_app"):
            _ = ext.middleware

        def create_app() -> Flask:
            app = simple_app()
            ext.init_app(app)
            return app

        app = create_app()
        assert app.extensions["wsgitrace"] is ext
        assert fetch(app)[0] == "200 OK"
        assert last(ext).hooks() == SIMPLE_HOOKS
        assert last(ext).limits.max_events == 100

    def test_init_app_twice_installs_once(self) -> None:
        """A second init_app of the same app changes nothing: one middleware,
        each hook recorded once.
        """
        app = simple_app()
        ext = FlaskTrace()
        ext.init_app(app)
        middleware = app.wsgi_app
        preprocess = vars(app)["preprocess_request"]
        ext.init_app(app)
        assert app.wsgi_app is middleware
        assert vars(app)["preprocess_request"] is preprocess
        assert not isinstance(middleware.app, TraceMiddleware)  # type: ignore[attr-defined]
        fetch(app)
        assert len(ext.buffer) == 1
        assert last(ext).hooks() == SIMPLE_HOOKS

    def test_second_extension_for_one_app_is_refused(self) -> None:
        """Only one FlaskTrace per app; the error names the app."""
        app = simple_app()
        FlaskTrace(app)
        with pytest.raises(RuntimeError, match="already has a FlaskTrace") as caught:
            FlaskTrace(app)
        assert str(caught.value).startswith(repr(app))

    def test_config_keys_and_keywords_win(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Options come from WSGITRACE_* config keys, keywords beat config,
        config beats the environment.
        """
        monkeypatch.setenv("WSGITRACE_MAX_STRING", "11")
        monkeypatch.setenv("WSGITRACE_MAX_HEADERS", "7")
        app = simple_app()
        app.config.update(
            WSGITRACE_MAX_TRACES=3,
            WSGITRACE_MAX_EVENTS=50,
            WSGITRACE_MAX_STRING=12,
            WSGITRACE_EXCLUDE=["/skip"],
        )
        ext = FlaskTrace()
        ext.init_app(app)  # config read at init_app, after the app is configured
        ext2 = FlaskTrace(simple_app(), max_traces=2)
        options = ext.middleware.options
        assert options.max_traces == 3
        assert options.max_events == 50
        assert options.max_string == 12
        assert options.max_headers == 7
        assert options.exclude == ("/skip",)
        assert ext.buffer.max_traces == 3
        assert ext2.buffer.max_traces == 2
        app3 = simple_app()
        app3.config.update(WSGITRACE_MAX_TRACES=9, WSGITRACE_MAX_EVENTS=40)
        ext3 = FlaskTrace(app3, max_traces=4)
        assert ext3.buffer.max_traces == 4
        assert ext3.middleware.options.max_events == 40
        for _ in range(5):
            fetch(app)
        fetch(app, "/skip")
        assert len(ext.buffer) == 3
        assert all(t.path == "/" for t in ext.buffer.latest())

    def test_static_files_not_traced_by_default(self, tmp_path: Any) -> None:
        """The static folder and /favicon.ico are excluded unless configured."""
        (tmp_path / "site.css").write_text("body {}")
        app = Flask(__name__, static_folder=str(tmp_path), static_url_path="/static")

        @app.route("/favicon.ico")
        def favicon() -> str:
            return "icon"

        @app.route("/page")
        def page() -> str:
            return "page"

        ext = FlaskTrace(app)
        assert fetch(app, "/static/site.css")[2] == b"body {}"
        assert fetch(app, "/favicon.ico")[2] == b"icon"
        assert fetch(app, "/page")[2] == b"page"
        assert [t.path for t in ext.buffer.latest()] == ["/page"]
        app2 = Flask(__name__, static_folder=str(tmp_path), static_url_path="/static")
        ext2 = FlaskTrace(app2, exclude=[])
        assert fetch(app2, "/static/site.css")[2] == b"body {}"
        assert [t.path for t in ext2.buffer.latest()] == ["/static/site.css"]
        assert ext2.buffer.latest()[0].hooks() == ["view:static"]

    def test_bad_options_fail_at_set_up(self) -> None:
        """A bad keyword or config value raises ConfigurationError naming it."""
        with pytest.raises(ConfigurationError, match="unknown"):
            FlaskTrace(nonsense=1)
        app = simple_app()
        app.config["WSGITRACE_MAX_EVENTS"] = "many"
        with pytest.raises(ConfigurationError, match="WSGITRACE_MAX_EVENTS"):
            FlaskTrace(app)

    def test_disabled_leaves_flask_alone(self) -> None:
        """WSGITRACE_ENABLED = False: no shadowed methods, nothing recorded."""
        app = simple_app()
        app.config["WSGITRACE_ENABLED"] = False
        ext = FlaskTrace(app)
        assert not set(vars(app)) & set(wsgitrace_flask._PHASES)
        assert fetch(app)[2] == b"hi guest"
        assert len(ext.buffer) == 0

    def test_config_set_after_init_app_is_not_read(self) -> None:
        """WSGITRACE_* keys are read at init_app (the README says to set them
        first); only debug and testing mode are read per request.
        """
        app = simple_app()
        ext = FlaskTrace(app)
        app.config.update(WSGITRACE_MAX_STRING=5, WSGITRACE_ENDPOINT=True)
        assert ext.middleware.options.max_string == 1024
        assert fetch(app, "/_trace")[0] == "404 NOT FOUND"
        app.debug = True
        assert fetch(app, "/_trace")[0] == "200 OK"

    def test_endpoint_follows_testing_mode(self) -> None:
        """/_trace is served in testing mode only, and never added to url_map."""
        app = simple_app()
        ext = FlaskTrace(app)
        rules = sorted(str(r) for r in app.url_map.iter_rules())
        assert fetch(app, "/_trace")[0] == "404 NOT FOUND"
        app.config["TESTING"] = True
        status, _, body = fetch(app, "/_trace")
        assert status == "200 OK"
        assert b'"schema": 1' in body or b'"schema":1' in body
        assert sorted(str(r) for r in app.url_map.iter_rules()) == rules
        assert ext.buffer.last is not None


# -- transparency ---------------------------------------------------------------


class TestTransparency:
    def test_same_responses_and_hook_runs(self) -> None:
        """Every route answers byte for byte as without the extension, and
        the hooks run the same number of times in the same order.
        """
        plain_log: list[str] = []
        traced_log: list[str] = []
        plain = simple_app(plain_log)
        traced = simple_app(traced_log)
        FlaskTrace(traced)
        for path in ("/", "/?user=admin", "/admin/", "/admin/?user=admin", "/missing"):
            assert fetch(traced, path) == fetch(plain, path)
        assert traced_log == plain_log

    def test_flasks_own_test_suite_passes_the_same_traced(self) -> None:
        """Flask's own tests (of the installed version, from its source
        distribution) give the same outcome, test by test, with every app
        they make traced: ``tests/flask_suite/run.py``.
        """
        root = Path(__file__).resolve().parent.parent
        done = subprocess.run(
            [sys.executable, "tests/flask_suite/run.py"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
        assert "no test differs" in done.stdout
        traced = re.search(r"wsgitrace: (\d+) apps traced, (\d+) traces", done.stdout)
        assert traced is not None, done.stdout[-2000:]
        # The plugin really traced the suite's apps and requests.
        assert int(traced[1]) > 300
        assert int(traced[2]) > 300
        assert re.search(r"plain: +\{'passed': [1-9]\d\d", done.stdout)

    def test_another_flask_version_leaves_flasks_methods_alone(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """On a Flask version whose request methods the shadows do not mirror,
        init_app warns and shadows nothing, so the app runs Flask's own code:
        requests are still traced, hooks are not.
        """
        from wsgitrace.exceptions import WsgitraceWarning

        monkeypatch.setattr(wsgitrace_flask, "flask_version", lambda: "3.2.0")
        plain_log: list[str] = []
        traced_log: list[str] = []
        plain, traced = simple_app(plain_log), simple_app(traced_log)
        with pytest.warns(WsgitraceWarning, match=r"Flask 3\.2\.0, so hooks are not traced"):
            ext = FlaskTrace(traced)
        assert not set(wsgitrace_flask._PHASES) & set(vars(traced))
        assert sorted(ext.skipped) == sorted(wsgitrace_flask._PHASES)
        for path in ("/", "/admin/?user=admin", "/missing"):
            assert fetch(traced, path) == fetch(plain, path)
        assert traced_log == plain_log
        trace = last(ext)
        assert trace.path == "/missing"
        assert trace.hooks() == []
        assert trace.status_code == 404

    @pytest.mark.parametrize("where", ["instance", "class"])
    def test_a_patched_signal_send_is_still_called(self, where: str) -> None:
        """A send to no receivers is skipped only while it is blinker's own:
        one patched on the signal (``mock.patch.object``) or on ``Signal``
        after ``init_app`` is called with Flask's arguments, as without the
        extension.
        """
        import blinker
        from flask import signals

        def run(traced: bool) -> list[tuple[str, object, tuple[str, ...]]]:
            app = simple_app([])
            if traced:
                FlaskTrace(app)
            calls: list[tuple[str, object, tuple[str, ...]]] = []
            own = blinker.Signal.send

            def send(signal: blinker.Signal, *args: object, **kwargs: object) -> object:
                calls.append((getattr(signal, "name", "?"), args[0], tuple(sorted(kwargs))))
                return own(signal, *args, **kwargs)

            # mock.patch, not monkeypatch: pytest 8's undo leaves the bound
            # original in each signal's __dict__, which hides a later patch
            # of the class from those signals.
            with contextlib.ExitStack() as patched:
                if where == "instance":
                    for signal in (
                        signals.request_started,
                        signals.request_finished,
                        signals.appcontext_pushed,
                        signals.appcontext_popped,
                    ):
                        patched.enter_context(
                            mock.patch.object(signal, "send", send.__get__(signal))
                        )
                else:
                    patched.enter_context(mock.patch.object(blinker.Signal, "send", send))
                assert fetch(app, "/?user=admin")[0] == "200 OK"
            assert not any(
                "send" in vars(s) for s in vars(signals).values() if isinstance(s, blinker.Signal)
            )
            return [(name, sender is app, kwargs) for name, sender, kwargs in calls]

        plain, traced = run(False), run(True)
        assert traced == plain
        assert ("appcontext-pushed", True, ("_async_wrapper",)) in traced
        assert ("appcontext-popped", True, ("_async_wrapper",)) in traced
        assert ("request-started", True, ("_async_wrapper",)) in traced
        assert ("request-finished", True, ("_async_wrapper", "response")) in traced

    def test_signal_send_patched_before_wsgitrace_is_imported_is_still_called(self) -> None:
        """A ``Signal.send`` replaced before wsgitrace was imported is called
        for signals with no receivers too, as Flask calls it.
        """
        code = """
import blinker
own = blinker.Signal.send
sent = []
def send(signal, *args, **kwargs):
    sent.append(signal.name)
    return own(signal, *args, **kwargs)
blinker.Signal.send = send
from flask import Flask
from wsgitrace.flask import FlaskTrace
app = Flask("patched_send")
app.route("/")(lambda: "ok")
FlaskTrace(app)
app.test_client().get("/").close()
print(sorted(set(sent)))
"""
        done = subprocess.run(
            [sys.executable, "-c", code],
            cwd=Path(__file__).resolve().parent.parent,  # imports this checkout
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split("\n")[0] == str(
            sorted(
                {
                    "appcontext-popped",
                    "appcontext-pushed",
                    "appcontext-tearing-down",
                    "request-finished",
                    "request-started",
                    "request-tearing-down",
                }
            )
        )

    @pytest.mark.parametrize("before_init_app", [True, False])
    def test_app_context_push_and_pop_replaced_by_an_agent_still_run(
        self, monkeypatch: pytest.MonkeyPatch, before_init_app: bool
    ) -> None:
        """``AppContext.push``/``pop`` replaced by an agent, before or after
        ``init_app``, are what a traced request's app context calls, as
        without tracing (only Flask's own are mirrored), and the appcontext
        signals are still recorded.
        """
        from flask.ctx import AppContext

        calls: list[str] = []
        own_push, own_pop = AppContext.push, AppContext.pop

        def push(self: AppContext) -> None:
            calls.append("push")
            own_push(self)

        def pop(self: AppContext, *args: Any) -> None:
            calls.append("pop")
            own_pop(self, *args)

        def replace() -> None:
            monkeypatch.setattr(AppContext, "push", push)
            monkeypatch.setattr(AppContext, "pop", pop)

        plain, traced = simple_app([]), simple_app([])
        if before_init_app:
            replace()
        ext = FlaskTrace(traced)
        if not before_init_app:
            replace()
        assert fetch(plain, "/")[0] == "200 OK"
        assert calls == ["push", "pop"]
        assert fetch(traced, "/")[0] == "200 OK"
        assert calls == ["push", "pop"] * 2
        names = [e.name for e in last(ext).events]
        assert "signal:appcontext-pushed" in names
        assert "signal:appcontext-popped" in names

    def test_popping_the_wrong_app_context_fails_as_in_flask(self) -> None:
        """Popping an app context that is not the current one raises
        Flask's AssertionError, with or without tracing.
        """

        def run(traced: bool) -> str:
            app = Flask(__name__)
            app.testing = True  # the error propagates to the client call
            if traced:
                FlaskTrace(app)

            @app.route("/")
            def index() -> str:
                outer, inner = app.app_context(), app.app_context()
                outer.push()
                inner.push()
                outer.pop()
                return "no error"

            try:
                return str(fetch(app, "/")[0])
            except AssertionError as exc:
                return "AssertionError: " + str(exc).split(" (")[0]

        assert run(True) == run(False) == "AssertionError: Popped wrong app context."

    def test_a_receiver_connected_by_a_teardown_appcontext_gets_appcontext_popped(
        self,
    ) -> None:
        """Flask sends ``appcontext_popped`` after the teardown_appcontext
        functions ran, so a receiver one of them connects (an extension set
        up lazily) is called for that very pop, traced or not.
        """
        from flask import signals

        def run(traced: bool) -> list[str]:
            app = Flask(__name__)
            log: list[str] = []

            def popped(sender: Flask, **kwargs: Any) -> None:
                log.append("popped")

            @app.teardown_appcontext
            def connect_late(exc: BaseException | None) -> None:
                log.append("teardown")
                signals.appcontext_popped.connect(popped, app)

            @app.route("/")
            def index() -> str:
                with app.app_context():
                    log.append("inner")
                return "ok"

            if traced:
                FlaskTrace(app)
            try:
                assert fetch(app, "/")[0] == "200 OK"
            finally:
                signals.appcontext_popped.disconnect(popped)
            return log

        plain = run(False)
        assert plain == ["inner", "teardown", "popped", "teardown", "popped"]
        assert run(True) == plain

    def test_nested_app_contexts_tear_down_as_in_flask(self) -> None:
        """App contexts a view pushes (nested, pushed twice, in a thread)
        tear down as Flask does: the ``exc`` it passes, an exception of a
        teardown_appcontext function propagating from the ``with``, ``g``
        per context.
        """

        def run(traced: bool) -> list[object]:
            app = Flask(__name__)
            log: list[object] = []

            @app.teardown_appcontext
            def teardown(exc: BaseException | None) -> None:
                log.append(("teardown", repr(exc)))
                if isinstance(exc, KeyError):
                    raise LookupError("from teardown")

            @app.route("/")
            def index() -> str:
                g.outer = 1
                with app.app_context():
                    log.append(("inner g", sorted(g)))
                try:
                    with app.app_context():
                        raise KeyError("in the with")
                except LookupError as exc:
                    log.append(("raised", repr(exc), repr(exc.__context__)))
                twice = app.app_context()
                twice.push()
                twice.push()
                twice.pop()  # not the last: no teardown
                log.append("popped once")
                try:
                    raise ValueError("being handled")
                except ValueError:
                    twice.pop()  # the exception being handled is exc

                def in_thread() -> None:
                    with app.app_context():
                        log.append("thread")

                thread = threading.Thread(target=in_thread)
                thread.start()
                thread.join()
                return "ok"

            if traced:
                FlaskTrace(app)
            assert fetch(app, "/")[0] == "200 OK"
            return log

        plain = run(False)
        assert ("teardown", "ValueError('being handled')") in plain
        assert ("raised", "LookupError('from teardown')", "KeyError('in the with')") in plain
        assert run(True) == plain

    @pytest.mark.parametrize("sample", [0.0, 1.0])
    def test_an_untraced_request_gets_flasks_own_app_context(self, sample: float) -> None:
        """A request that is not sampled runs in Flask's own ``AppContext``;
        a traced one in a subclass that records the appcontext signals.
        """
        from flask.ctx import AppContext
        from flask.globals import app_ctx

        app = Flask(__name__)
        seen: list[type] = []

        @app.route("/")
        def index() -> str:
            seen.append(type(app_ctx._get_current_object()))
            return "ok"

        ext = FlaskTrace(app, sample=sample)
        assert fetch(app, "/")[2] == b"ok"
        if sample:
            assert seen[0] is not AppContext
            assert issubclass(seen[0], AppContext)
            assert "signal:appcontext-pushed" in [e.name for e in last(ext).events]
        else:
            assert seen == [AppContext]
            assert ext.buffer.latest() == []

    def test_url_map_and_g_untouched(self) -> None:
        """No rules added; ``g`` holds only what the app put there, in every
        hook and at teardown.
        """
        seen: list[list[str]] = []

        def factory() -> Flask:
            app = simple_app()

            @app.route("/g")
            def show_g() -> str:
                return ",".join(sorted(vars(g)))

            @app.teardown_appcontext
            def see(exc: BaseException | None) -> None:
                seen.append(sorted(vars(g)))

            return app

        plain, traced = factory(), factory()
        rules = sorted(str(r) for r in traced.url_map.iter_rules())
        FlaskTrace(traced)
        assert sorted(str(r) for r in traced.url_map.iter_rules()) == rules
        assert fetch(traced, "/g") == fetch(plain, "/g")
        assert fetch(traced, "/g")[2] == b"user"
        assert seen[0] == seen[1] == ["user"]
        assert sorted(str(r) for r in traced.url_map.iter_rules()) == rules

    def test_app_logger_is_made_on_first_use_as_without_tracing(self) -> None:
        """Flask makes ``app.logger`` on first use, from the state then: the
        DEBUG level if ``app.debug`` was set after the app was made, and no
        default handler if logging was configured meanwhile. Tracing leaves
        the logger alone until then, and adds no handler to it.
        """

        def logger_state(name: str, trace: bool) -> tuple[int, list[Any], list[str]]:
            app = Flask(name)
            if trace:
                FlaskTrace(app)
            app.debug = True
            messages: list[str] = []

            class Collect(logging.Handler):
                def emit(self, record: logging.LogRecord) -> None:
                    messages.append(record.getMessage())

            handler = Collect()
            logger = logging.getLogger(name)
            logger.addHandler(handler)

            @app.route("/")
            def index() -> str:
                app.logger.debug("debug from the view")
                return "ok"

            try:
                app.test_client().get("/").close()
                handlers = [h is handler or h for h in app.logger.handlers]
                return app.logger.level, handlers, messages
            finally:
                logger.handlers.clear()
                logger.setLevel(logging.NOTSET)

        plain = logger_state("wsgitrace_first_use_plain", trace=False)
        assert plain == (logging.DEBUG, [True], ["debug from the view"])
        assert logger_state("wsgitrace_first_use_traced", trace=True) == plain

    def test_hooks_get_the_same_arguments_and_their_return_values_are_used(self) -> None:
        """url_value_preprocessor, url_defaults, after_request, teardown and
        error handlers get the same arguments; what they return is what
        Flask uses.
        """

        def factory(log: list[Any]) -> Flask:
            app = Flask(__name__)
            replaced = Response("replaced by after_request")

            @app.url_value_preprocessor
            def pull(endpoint: str | None, values: dict[str, Any] | None) -> None:
                log.append(("pull", endpoint, dict(values or {})))

            @app.url_defaults
            def defaults(endpoint: str, values: dict[str, Any]) -> None:
                log.append(("defaults", endpoint, dict(values)))
                values.setdefault("lang", "en")

            @app.route("/<lang>/item/<int:n>")
            def item(lang: str, n: int) -> str:
                from flask import url_for

                return url_for("item", n=n + 1)

            @app.after_request
            def swap(response: Response) -> Response:
                log.append(("swap", response.get_data()))
                return replaced

            @app.after_request
            def first(response: Response) -> Response:
                log.append(("first", response.status_code))
                return response

            @app.teardown_request
            def teardown(exc: BaseException | None) -> None:
                log.append(("teardown", repr(exc)))

            @app.errorhandler(NotFound)
            def nf(error: NotFound) -> tuple[str, int]:
                log.append(("nf", type(error).__name__, error.code))
                return "nf", 404

            return app

        plain_log: list[Any] = []
        traced_log: list[Any] = []
        plain, traced = factory(plain_log), factory(traced_log)
        FlaskTrace(traced)
        for path in ("/de/item/3", "/nowhere"):
            assert fetch(traced, path) == fetch(plain, path)
        assert traced_log == plain_log
        assert traced_log[:5] == [
            ("pull", "item", {"lang": "de", "n": 3}),
            ("defaults", "item", {"n": 4}),
            ("first", 200),
            ("swap", b"/en/item/4"),
            ("teardown", "None"),
        ]
        assert fetch(traced, "/de/item/3")[2] == b"replaced by after_request"


class AppError(Exception):
    """Raised by test apps on purpose."""


def raising_app(raised: list[BaseException], where: str) -> Flask:
    """An app that raises a fresh AppError at ``where``."""
    app = Flask(__name__)

    def fail(label: str) -> None:
        if label == where:
            exc = AppError(f"failed in {label}")
            raised.append(exc)
            raise exc

    @app.before_request
    def before() -> None:
        fail("before_request")

    @app.route("/")
    def view() -> str:
        fail("view")
        if where == "abort":
            abort(418)
        return "ok"

    @app.after_request
    def after(response: Response) -> Response:
        fail("after_request")
        return response

    @app.teardown_request
    def teardown(exc: BaseException | None) -> None:
        fail("teardown_request")

    @app.teardown_appcontext
    def teardown_app(exc: BaseException | None) -> None:
        fail("teardown_appcontext")

    @app.errorhandler(LookupError)
    def handler(error: LookupError) -> str:
        fail("errorhandler")
        return "handled"

    @app.route("/lookup")
    def lookup() -> str:
        raise LookupError("missing")

    return app


HOOK_FUNCTIONS = {
    "before_request": "before",
    "view": "view",
    "after_request": "after",
    "teardown_request": "teardown",
    "teardown_appcontext": "teardown_app",
    "errorhandler": "handler",
}


class TestExceptions:
    @pytest.mark.parametrize(
        "where",
        [
            "before_request",
            "view",
            "after_request",
            "teardown_request",
            "teardown_appcontext",
            "errorhandler",
        ],
    )
    @pytest.mark.parametrize("config", ["TESTING", "PROPAGATE_EXCEPTIONS"])
    def test_same_exception_object_propagates(self, where: str, config: str) -> None:
        """With exceptions propagated, the very object the app raised reaches
        the caller, with the app's own frames in its traceback, as without
        the extension.
        """
        results = []
        for traced in (False, True):
            raised: list[BaseException] = []
            app = raising_app(raised, where)
            app.config[config] = True
            ext = FlaskTrace(app) if traced else None
            path = "/lookup" if where == "errorhandler" else "/"
            with pytest.raises(AppError) as info:
                fetch(app, path)
            assert info.value is raised[-1]
            frames = traceback.extract_tb(info.value.__traceback__)
            assert [f.name for f in frames[-2:]] == [HOOK_FUNCTIONS[where], "fail"]
            # The app's own frames (this file's) are all there either way.
            results.append((str(info.value), [f.name for f in frames if f.filename == __file__]))
            if ext is not None:
                trace = last(ext)
                assert trace.error is not None
                assert trace.error["type"].endswith("AppError")
                assert trace.finished
        assert results[0] == results[1]

    @pytest.mark.parametrize(
        "where",
        ["before_request", "view", "after_request", "errorhandler", "abort"],
    )
    def test_same_error_response_without_propagation(self, where: str) -> None:
        """Without propagation: the same 500 (or 418) response either way."""
        outcomes = []
        for traced in (False, True):
            app = raising_app([], where)
            if traced:
                FlaskTrace(app)
            path = "/lookup" if where == "errorhandler" else "/"
            outcomes.append(fetch(app, path))
        assert outcomes[0] == outcomes[1]
        assert outcomes[0][0] == (
            "418 I'M A TEAPOT" if where == "abort" else "500 INTERNAL SERVER ERROR"
        )

    def test_abort_in_testing_mode_is_a_response(self) -> None:
        """abort() is an HTTP response even with TESTING: not raised to the test."""
        app = raising_app([], "abort")
        app.config["TESTING"] = True
        ext = FlaskTrace(app)
        assert fetch(app)[0] == "418 I'M A TEAPOT"
        assert last(ext).find(kind="view")[0].attrs["error"] == "ImATeapot"
        assert last(ext).status_code == 418


class TestSubclass:
    def test_overridden_method_is_kept_and_listed_as_skipped(self) -> None:
        """A subclass's process_response still runs (its phase is skipped),
        the other phases are traced.
        """

        class CustomFlask(Flask):
            def process_response(self, response: Response) -> Response:
                response = super().process_response(response)
                response.headers["X-Custom"] = "yes"
                return response

        app = CustomFlask(__name__)

        @app.before_request
        def before() -> None:
            pass

        @app.after_request
        def after(response: Response) -> Response:
            response.headers["X-After"] = "1"
            return response

        @app.route("/")
        def index() -> str:
            return "ok"

        ext = FlaskTrace(app)
        assert ext.skipped == ["process_response"]
        assert "process_response" not in vars(app)
        _, headers, _ = fetch(app)
        assert ("X-Custom", "yes") in headers
        assert ("X-After", "1") in headers
        assert last(ext).hooks() == ["before_request:before", "view:index"]

    def test_ensure_sync_gets_each_real_handler_once(self) -> None:
        """An ensure_sync override (Flask's documented way to change how
        handlers run) sees the same calls as without the extension: the real
        error handler, once.
        """

        def build(calls: list[str]) -> Flask:
            class LoggingFlask(Flask):
                def ensure_sync(self, func: Callable[..., Any]) -> Callable[..., Any]:
                    calls.append(func.__name__)
                    return super().ensure_sync(func)

            app = LoggingFlask(__name__)

            @app.errorhandler(ValueError)
            def on_value_error(e: ValueError) -> tuple[str, int]:
                return "handled", 400

            @app.errorhandler(500)
            def on_server_error(e: Exception) -> tuple[str, int]:
                return "server error", 500

            @app.route("/value")
            def value() -> str:
                raise ValueError("value")

            @app.route("/key")
            def key() -> str:
                raise KeyError("key")

            return app

        plain_calls: list[str] = []
        plain = build(plain_calls)
        expected = [fetch(plain, "/value"), fetch(plain, "/key")]
        calls: list[str] = []
        app = build(calls)
        ext = FlaskTrace(app)
        assert [fetch(app, "/value"), fetch(app, "/key")] == expected
        assert calls == plain_calls == ["value", "on_value_error", "key", "on_server_error"]
        assert last(ext).hooks() == ["view:key", "errorhandler:on_server_error"]

    def test_method_set_on_the_app_is_kept(self) -> None:
        """A phase another extension replaced on the app instance keeps
        running, and is listed as skipped.
        """
        app = simple_app()
        original = app.process_response

        def process_response(response: Response) -> Response:
            response = original(response)
            response.headers["X-Other-Extension"] = "1"
            return response

        app.process_response = process_response  # type: ignore[method-assign]
        ext = FlaskTrace(app)
        assert ext.skipped == ["process_response"]
        _, headers, _ = fetch(app)
        assert ("X-Other-Extension", "1") in headers
        assert ("X-Hook", "1") in headers
        assert last(ext).hooks()[:2] == ["before_request:load_user", "view:index"]

    def test_flask_methods_patched_on_the_class_still_run(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Methods an APM agent patched on Flask itself (before init_app)
        run on traced requests; a wrapper on Flask.wsgi_app runs even when
        put there after init_app.
        """
        calls: list[str] = []
        process_response = Flask.process_response
        wsgi_app = Flask.wsgi_app

        def patched_process_response(self: Flask, response: Response) -> Response:
            calls.append("process_response")
            return process_response(self, response)

        def patched_wsgi_app(self: Flask, environ: Any, start_response: Any) -> Any:
            calls.append("wsgi_app")
            return wsgi_app(self, environ, start_response)

        monkeypatch.setattr(Flask, "process_response", patched_process_response)
        app = simple_app()
        ext = FlaskTrace(app)
        monkeypatch.setattr(Flask, "wsgi_app", patched_wsgi_app)
        status, headers, _ = fetch(app)
        assert status == "200 OK"
        assert ("X-Hook", "1") in headers
        assert calls == ["wsgi_app", "process_response"]
        assert ext.skipped == ["process_response"]
        assert last(ext).hooks()[:2] == ["before_request:load_user", "view:index"]


def test_exclude_from_the_environment_replaces_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """WSGITRACE_EXCLUDE is read, as for the middleware; the static/favicon
    default applies only when no keyword, config key or variable says.
    """
    monkeypatch.setenv("WSGITRACE_EXCLUDE", "/skip")
    app = simple_app()
    app.add_url_rule("/skip/me", "skip", lambda: "skipped")
    ext = FlaskTrace(app)
    assert ext.middleware.options.exclude == ("/skip",)
    fetch(app, "/skip/me")
    assert ext.buffer.last is None
    fetch(app)
    assert last(ext).path == "/"


class TestWrappedMethods:
    def test_functools_wraps_wrapper_in_a_subclass_runs(self) -> None:
        """A subclass's wrapper of Flask's own method (functools.wraps copies
        Flask's names onto it) is kept and listed as skipped.
        """
        import functools

        calls: list[str] = []

        def counted(func: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(func)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                calls.append(func.__name__)
                return func(*args, **kwargs)

            return wrapper

        class CountingFlask(Flask):
            process_response = counted(Flask.process_response)

        app = CountingFlask(__name__)
        app.add_url_rule("/", "index", lambda: "ok")
        ext = FlaskTrace(app)
        assert fetch(app)[2] == b"ok"
        assert calls == ["process_response"]
        assert ext.skipped == ["process_response"]

    def test_patch_made_after_init_app_runs(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """An agent patching Flask's methods after init_app is not bypassed:
        the phase runs the patched method (untraced from then on).
        """
        seen: list[str] = []
        handle_user_exception = Flask.handle_user_exception
        process_response = Flask.process_response
        app = simple_app()
        ext = FlaskTrace(app)

        def patched_handle(self: Flask, e: Exception) -> Any:
            seen.append(type(e).__name__)
            return handle_user_exception(self, e)

        def patched_process(self: Flask, response: Response) -> Response:
            seen.append("process_response")
            return process_response(self, response)

        app_context = Flask.app_context

        def patched_app_context(self: Flask) -> Any:
            seen.append("app_context")
            return app_context(self)

        monkeypatch.setattr(Flask, "handle_user_exception", patched_handle)
        monkeypatch.setattr(Flask, "process_response", patched_process)
        monkeypatch.setattr(Flask, "app_context", patched_app_context)
        assert fetch(app, "/fail")[0] == "500 INTERNAL SERVER ERROR"
        assert seen == ["app_context", "RuntimeError", "process_response"]
        assert "view:fail" in last(ext).hooks()

    def test_wsgi_app_method_set_on_the_app_runs(self) -> None:
        """A method bound to the app and set as its wsgi_app is kept."""
        import types

        app = simple_app()

        def wsgi_app(self: Flask, environ: Any, start_response: Any) -> Any:
            def patched(status: str, headers: list[Any], exc_info: Any = None) -> Any:
                return start_response(status, [*headers, ("X-Patched", "1")], exc_info)

            return Flask.wsgi_app(self, environ, patched)

        app.wsgi_app = types.MethodType(wsgi_app, app)  # type: ignore[method-assign]
        ext = FlaskTrace(app)
        assert ("X-Patched", "1") in fetch(app)[1]
        assert last(ext).hooks()[:2] == ["before_request:load_user", "view:index"]


class TestAdoptsMiddleware:
    def test_hooks_go_into_the_traces_of_an_existing_middleware(self) -> None:
        """An app whose wsgi_app already is a TraceMiddleware gets one trace
        per request, with its hooks, in that middleware's buffer.
        """
        app = simple_app()
        middleware = TraceMiddleware(app.wsgi_app)
        app.wsgi_app = middleware  # type: ignore[method-assign]
        ext = FlaskTrace(app)
        assert app.wsgi_app is middleware
        assert ext.buffer is middleware.buffer
        assert fetch(app)[0] == "200 OK"
        assert len(middleware.buffer) == 1
        assert last(ext).hooks() == SIMPLE_HOOKS

    def test_options_for_an_existing_middleware_are_refused(self) -> None:
        app = simple_app()
        app.wsgi_app = TraceMiddleware(app.wsgi_app)  # type: ignore[method-assign]
        with pytest.raises(ConfigurationError, match=r"give the options \(max_events\) to it"):
            FlaskTrace(app, max_events=10)
        with pytest.raises(ConfigurationError, match="buffer of its own"):
            FlaskTrace(app, buffer=TraceBuffer())


class TestUnusualApps:
    def test_endpoint_that_is_not_a_string(self) -> None:
        """Flask accepts any hashable endpoint; the view runs and is named
        by the endpoint's str().
        """
        app = Flask(__name__)
        app.add_url_rule("/", endpoint=("api", 1), view_func=lambda: "ok")  # type: ignore[arg-type]
        ext = FlaskTrace(app)
        assert fetch(app)[0::2] == ("200 OK", b"ok")
        trace = last(ext)
        assert trace.hooks() == ["view:('api', 1)"]
        assert trace.endpoint == "('api', 1)"

    def test_template_context_outside_an_app_context(self) -> None:
        """update_template_context() works without a context, as in Flask,
        while a body iterated after the request is being traced.
        """

        def build() -> Flask:
            app = Flask(__name__)

            @app.context_processor
            def site() -> dict[str, str]:
                return {"site": "demo"}

            @app.route("/")
            def index() -> Response:
                def body() -> Any:
                    context: dict[str, Any] = {}
                    app.update_template_context(context)
                    yield context["site"].encode()

                return Response(body())

            return app

        expected = fetch(build())
        app = build()
        FlaskTrace(app)
        assert fetch(app) == expected
        assert expected[2] == b"demo"

    def test_error_handler_named_by_the_registration_that_handled(self) -> None:
        """One function registered on a blueprint (for KeyError) and on the
        app (for Exception): a ValueError is handled by the app's.
        """
        app = Flask(__name__)
        admin = Blueprint("admin", __name__, url_prefix="/admin")

        def handle(e: Exception) -> tuple[str, int]:
            return f"handled {type(e).__name__}", 500

        admin.register_error_handler(KeyError, handle)
        app.register_error_handler(Exception, handle)

        @admin.route("/")
        def dashboard() -> str:
            raise ValueError("v")

        app.register_blueprint(admin)
        ext = FlaskTrace(app)
        assert fetch(app, "/admin/")[2] == b"handled ValueError"
        assert last(ext).hooks() == ["view:admin.dashboard", "errorhandler:handle"]

    def test_failing_error_handler_recording_keeps_the_response(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A failure while naming the error handler that ran leaves its
        response as it was, and is counted.
        """
        from wsgitrace.middleware import internal_error_count

        def build() -> Flask:
            app = Flask(__name__)

            @app.errorhandler(404)
            def not_found(e: Exception) -> tuple[str, int]:
                return "custom 404", 404

            return app

        expected = fetch(build(), "/missing")

        def broken(*args: Any) -> None:
            raise RuntimeError("broken")

        monkeypatch.setattr("wsgitrace._flask_recorder._handler_blueprint", broken)
        app = build()
        ext = FlaskTrace(app)
        before = internal_error_count()
        assert fetch(app, "/missing") == expected
        assert internal_error_count() == before + 1
        assert last(ext).hooks() == []


# -- two apps -----------------------------------------------------------------


def named_app(name: str) -> Flask:
    app = Flask(name)

    @app.before_request
    def before() -> None:
        g.app = name

    @app.route("/<path:anything>")
    def view(anything: str) -> str:
        return f"{name}:{anything}"

    @app.context_processor
    def ctx() -> dict[str, str]:
        return {"name": name}

    return app


class TestTwoApps:
    def test_separate_buffers_under_concurrency(self) -> None:
        """Two traced apps served from several threads: each buffer holds
        only its app's traces.
        """
        one, two = named_app("one"), named_app("two")
        ext_one, ext_two = FlaskTrace(one), FlaskTrace(two)
        assert ext_one.buffer is not ext_two.buffer
        errors: list[BaseException] = []

        def hammer(app: Flask, n: int) -> None:
            try:
                for i in range(20):
                    assert fetch(app, f"/{n}/{i}")[0] == "200 OK"
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [
            threading.Thread(target=hammer, args=(app, n)) for n in range(3) for app in (one, two)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert not errors
        for ext, name in ((ext_one, "one"), (ext_two, "two")):
            traces = ext.buffer.latest()
            assert len(traces) == 60
            assert {t.g["app"] if t.g else None for t in traces} == {repr(name)}
            assert all(t.hooks() == ["before_request:before", "view:view"] for t in traces)

    def test_one_app_called_inside_the_other(self) -> None:
        """App two served (or its context used) inside a request of app one:
        each trace has only its own app's events, endpoint and g.
        """
        one, two = named_app("one"), named_app("two")
        ext_one = FlaskTrace(one)
        ext_two = FlaskTrace(two, exclude=["/excluded"])

        @one.route("/call")
        def call() -> str:
            parts = [fetch(two, "/inner")[2].decode(), fetch(two, "/excluded/x")[2].decode()]
            with two.app_context():
                parts.append(render_template_string("{{ name }}"))
            return " ".join(parts)

        assert fetch(one, "/call")[2] == b"two:inner two:excluded/x two"
        outer = last(ext_one)
        assert outer.hooks() == ["before_request:before", "view:call"]
        assert outer.endpoint == "call"
        assert outer.g == {"app": "'one'"}
        assert [t.path for t in ext_two.buffer.latest()] == ["/inner"]
        inner = last(ext_two)
        assert inner.hooks() == ["before_request:before", "view:view"]
        assert inner.endpoint == "view"
        assert inner.g == {"app": "'two'"}

    def test_one_extension_two_apps(self) -> None:
        """One FlaskTrace (the factory pattern) gives each app its own
        middleware and its own buffer, sized by the app's own config; its
        ``buffer`` is the last app's.
        """
        ext = FlaskTrace()
        one, two = named_app("one"), named_app("two")
        one.config["WSGITRACE_MAX_TRACES"] = 5
        two.config["WSGITRACE_MAX_TRACES"] = 50
        ext.init_app(one)
        ext.init_app(two)
        assert one.wsgi_app is not two.wsgi_app
        fetch(one, "/a")
        fetch(two, "/b")
        buffers = [app.wsgi_app.buffer for app in (one, two)]  # type: ignore[attr-defined]
        assert [b.max_traces for b in buffers] == [5, 50]
        assert [[t.g for t in b.latest()] for b in buffers] == [
            [{"app": "'one'"}],
            [{"app": "'two'"}],
        ]
        assert ext.buffer is buffers[1]

    def test_one_extension_two_apps_with_a_shared_buffer(self) -> None:
        """Given ``buffer=``, one FlaskTrace traces its apps into that buffer."""
        shared = TraceBuffer()
        ext = FlaskTrace(buffer=shared)
        one, two = named_app("one"), named_app("two")
        ext.init_app(one)
        ext.init_app(two)
        fetch(one, "/a")
        fetch(two, "/b")
        assert ext.buffer is shared
        assert [t.g for t in shared.latest()] == [{"app": "'two'"}, {"app": "'one'"}]


# -- fault isolation ---------------------------------------------------------------


def count_clock_reads() -> int:
    clock = CountingClock()
    app = simple_app()
    FlaskTrace(app, clock=clock)
    fetch(app, "/admin/")
    return clock.calls


@pytest.mark.parametrize("once", [True, False], ids=["once", "from-then-on"])
def test_failing_clock_never_changes_a_response(once: bool) -> None:
    """Whichever clock reading fails (just that one, or every one from then
    on), the response and the hooks that ran are those of the untraced app;
    each failure is counted, and the traces still record every hook.
    """
    from wsgitrace.middleware import internal_error_count

    paths = ("/", "/admin/")
    plain_log: list[str] = []
    plain = simple_app(plain_log)
    expected = [fetch(plain, p) for p in paths]
    working = simple_app()
    working_ext = FlaskTrace(working, clock=CountingClock())
    for path in paths:
        fetch(working, path)
    # Sorted: equal timestamps from a broken clock may reorder ties.
    expected_hooks = [sorted(t.hooks()) for t in working_ext.buffer.latest()]
    reads = count_clock_reads()
    assert reads > 20
    for fail_at in range(1, reads + 2):
        log: list[str] = []
        app = simple_app(log)
        clock = CountingClock(fail_at, once=once)
        ext = FlaskTrace(app, clock=clock)
        before = internal_error_count()
        got = [fetch(app, p) for p in paths]
        assert got == expected, f"clock failing at reading {fail_at}"
        assert log == plain_log
        assert clock.failed
        assert internal_error_count() - before == clock.failed, fail_at
        traces = ext.buffer.latest()
        assert [t.state for t in traces] == ["finished", "finished"]
        assert [sorted(t.hooks()) for t in traces] == expected_hooks, fail_at


@pytest.mark.parametrize(
    "target",
    [
        "wsgitrace.trace.Trace.record",
        "wsgitrace._flask_recorder._g_changes",
        "wsgitrace._flask_state.safe_repr",
        "wsgitrace._limits.cut",
        "wsgitrace._flask_recorder._function_name",
        "wsgitrace._flask_recorder._AppTracer.hook_key",
        "wsgitrace._flask_receivers.format_error",
    ],
)
def test_failing_internals_never_change_a_response(
    target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure inside the extension's own recording (trace records, g
    diffs, reprs) leaves the response byte-identical to the untraced app's,
    and is counted as an internal error.
    """
    from wsgitrace.middleware import internal_error_count

    paths = ("/", "/admin/", "/admin/?user=admin", "/missing", "/fail")
    plain_log: list[str] = []
    plain = simple_app(plain_log)
    expected = [fetch(plain, p) for p in paths]

    def broken(*args: Any, **kwargs: Any) -> Any:
        msg = f"{target} is broken"
        raise RuntimeError(msg)

    log: list[str] = []
    app = simple_app(log)
    FlaskTrace(app)
    before = internal_error_count()
    monkeypatch.setattr(target, broken)
    assert [fetch(app, p) for p in paths] == expected
    assert log == plain_log
    assert internal_error_count() > before


def test_failing_receiver_of_the_extension_never_changes_a_response(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A template receiver that fails inside does not break rendering."""
    plain = simple_app()
    app = simple_app()
    ext = FlaskTrace(app)
    monkeypatch.setattr("wsgitrace._flask_receivers._MAX_PENDING_TEMPLATES", None)
    assert fetch(app) == fetch(plain)
    [error] = last(ext).find(kind="tracer_error")
    assert error.attrs == {"where": "flask.before_render_template"}


# -- references ------------------------------------------------------------------


def refcount_app() -> Flask:
    """Hooks of every kind, a blueprint, g and a session, but no template or
    exception: Flask itself makes reference cycles for those (the Jinja
    environment, a traceback's frames), without any extension.
    """
    app = Flask(__name__)
    app.secret_key = "test"
    bp = Blueprint("bp", __name__)

    @app.url_value_preprocessor
    def pull(endpoint: str | None, values: dict[str, Any] | None) -> None:
        g.values = values

    @bp.before_request
    def before() -> None:
        g.user = "ann"

    @bp.route("/<name>")
    def view(name: str) -> str:
        from flask import session

        session["seen"] = name
        return name

    @bp.after_request
    def after(response: Response) -> Response:
        return response

    @app.teardown_request
    def teardown(exc: BaseException | None) -> None:
        pass

    @app.teardown_appcontext
    def teardown_app(exc: BaseException | None) -> None:
        pass

    app.register_blueprint(bp)
    return app


def test_app_wrapped_before_init_app_is_collected() -> None:
    """``app.wsgi_app = ProxyFix(app.wsgi_app)`` before ``init_app`` makes a
    cycle through the app; the extension (kept at module level in factory
    apps) must not keep it alive.
    """
    from werkzeug.middleware.proxy_fix import ProxyFix

    ext = FlaskTrace()
    app = refcount_app()
    app.wsgi_app = ProxyFix(app.wsgi_app)  # type: ignore[method-assign]
    ext.init_app(app)
    assert fetch(app, "/ann")[2] == b"ann"
    weak = weakref.ref(app)
    del app
    gc.collect()
    assert weak() is None


def test_wrapt_wrapper_set_on_the_app_runs() -> None:
    """A wrapt wrapper put on the app's own wsgi_app (it has __self__, like
    a bound method) keeps running.
    """
    import wrapt  # what APM agents wrap with (in the test extra)

    calls: list[str] = []
    app = simple_app()

    def wrapper(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        calls.append("wrapper")
        return wrapped(*args, **kwargs)

    wrapt.wrap_function_wrapper(app, "wsgi_app", wrapper)
    ext = FlaskTrace(app)
    assert fetch(app)[0] == "200 OK"
    assert calls == ["wrapper"]
    assert last(ext).hooks()[:2] == ["before_request:load_user", "view:index"]


@pytest.mark.parametrize("pattern", ["untraced", "direct", "factory"])
def test_app_freed_on_zero_refcount(pattern: str) -> None:
    """With the collector off, an app traced and served is freed as soon as
    its last reference goes (as Flask's own test_app_freed_on_zero_refcount).
    """
    ext = FlaskTrace() if pattern == "factory" else None
    gc.collect()
    gc.disable()
    try:
        app = refcount_app()
        if pattern == "direct":
            FlaskTrace(app)
        elif ext is not None:
            ext.init_app(app)
        assert fetch(app, "/ann") == ("200 OK", ANY_HEADERS, b"ann")
        weak = weakref.ref(app)
        assert weak() is not None
        del app
        assert weak() is None
    finally:
        gc.enable()
    if ext is not None:
        assert len(ext.buffer) == 1
        assert ext.buffer.latest(1)[0].hooks() == [
            "url_value_preprocessor:pull",
            "before_request:bp.before",
            "view:bp.view",
            "after_request:bp.after",
            "teardown_request:teardown",
            "teardown_appcontext:teardown_app",
        ]


@pytest.mark.parametrize("hooks", [0, 10, 50])
def test_byte_accounting_covers_what_a_trace_keeps(hooks: int) -> None:
    """The size a finished trace is counted at (its share of ``max_bytes``)
    is at least what it keeps allocated, for a bare app with no request
    headers and any number of hooks: the byte cap is never exceeded.
    """
    import tracemalloc

    app = Flask(__name__)
    for i in range(hooks):

        def hook() -> None:
            return None

        hook.__name__ = f"hook{i}"
        app.before_request(hook)
    app.add_url_rule("/x", "x", lambda: "ok")
    ext = FlaskTrace(app, max_traces=5000, max_bytes=1 << 40)
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/x",
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "wsgi.url_scheme": "http",
        "HTTP_HOST": "localhost",
    }

    def serve() -> None:
        body = app(dict(environ), lambda status, headers, exc_info=None: None)
        for _ in body:
            pass
        body.close()  # type: ignore[attr-defined]

    for _ in range(50):  # warm-up: shared keys and caches made
        serve()
    ext.buffer.clear()
    count = 300
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(count):
            serve()
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
        ext.buffer.append(Trace())  # accounts the last finished trace
        counted = ext.buffer.bytes
    finally:
        tracemalloc.stop()
    assert len(ext.buffer) == count + 1
    assert counted >= held, (counted, held)


def test_hook_functions_are_not_kept_alive() -> None:
    """The name cache holds hook functions weakly."""
    app = Flask(__name__)
    FlaskTrace(app)

    def make_hook() -> Callable[[], None]:
        def transient() -> None:
            pass

        return transient

    hook = make_hook()
    app.before_request(hook)

    @app.route("/")
    def index() -> str:
        return "ok"

    fetch(app)
    weak = weakref.ref(hook)
    app.before_request_funcs[None].remove(hook)
    del hook
    gc.collect()
    assert weak() is None


def test_hook_whose_attributes_raise() -> None:
    """A hook object whose attribute lookup raises (a proxy, say) still runs
    and is named by its type.
    """

    class Hook:
        def __call__(self) -> None:
            g.hooked = True

        def __getattr__(self, name: str) -> Any:
            if name == "__qualname__":
                msg = f"no {name} here"
                raise RuntimeError(msg)
            raise AttributeError(name)

    def factory() -> Flask:
        app = Flask(__name__)
        app.before_request(Hook())

        @app.route("/")
        def index() -> str:
            return str(g.hooked)

        return app

    plain, traced = factory(), factory()
    ext = FlaskTrace(traced)
    assert fetch(traced) == fetch(plain) == ("200 OK", ANY_HEADERS, b"True")
    assert last(ext).hooks() == ["before_request:Hook", "view:index"]
