"""FlaskTrace: the state a request leaves behind — ``g`` changes per hook,
the final ``g`` snapshot, session keys (and values only when asked), the URL
match — captured without changing what the app or the client sees.
"""

from __future__ import annotations

import builtins
import collections
import json
from collections import deque
from typing import Any

import pytest
from flask import Blueprint, Flask, Response, g, request, session
from flask.globals import request_ctx

from wsgitrace._flask_state import MAX_G_NAMES
from wsgitrace.flask import FlaskTrace
from wsgitrace.redact import REDACTED
from wsgitrace.trace import TRUNCATION_MARKER, Trace

Outcome = tuple[str, list[tuple[str, str]], bytes]


def fetch(app: Flask, path: str = "/", session_cookie: str | None = None) -> Outcome:
    """Status, headers and body as a client sees them; the response is closed."""
    client = app.test_client()
    if session_cookie is not None:
        client.set_cookie("session", session_cookie)
    response = client.get(path)
    try:
        return response.status, list(response.headers.items()), response.get_data()
    finally:
        response.close()


def last(ext: FlaskTrace) -> Trace:
    trace = ext.buffer.last
    assert trace is not None
    return trace


class Unprintable:
    """An object whose repr raises."""

    def __repr__(self) -> str:
        raise ValueError("no repr for you")


class BadRepr:
    """An object whose repr is not a string."""

    def __repr__(self) -> Any:
        return 42


def g_app() -> Flask:
    app = Flask(__name__)

    @app.before_request
    def load_user() -> None:
        g.user = "ann"
        g.db = object()
        g.scratch = 1

    @app.before_request
    def untouched() -> None:
        pass

    @app.before_request
    def replace_user() -> None:
        g.user = "bob"
        del g.scratch
        g.api_token = "s3cr3t-value"

    @app.route("/")
    def index() -> str:
        g.big = "x" * 5000
        g.broken = Unprintable()
        g.odd = BadRepr()
        return "ok"

    @app.route("/clear")
    def clear() -> str:
        for key in list(vars(g)):
            delattr(g, key)
        return "cleared"

    @app.teardown_appcontext
    def close_db(exc: BaseException | None) -> None:
        g.pop("db", None)

    return app


def g_snapshot_counting_reprs(
    monkeypatch: pytest.MonkeyPatch, **values: Any
) -> tuple[dict[str, str], list[int]]:
    """Serve one request whose view sets ``g``'s ``values``, with
    ``max_string=200``; return the trace's ``g`` snapshot and the length of
    every ``repr()`` built while it ran.
    """
    app = Flask(__name__)

    @app.route("/")
    def index() -> str:
        for name, value in values.items():
            setattr(g, name, value)
        return "ok"

    ext = FlaskTrace(app, max_string=200)
    lengths: list[int] = []
    real_repr = builtins.repr

    def counting_repr(value: object) -> str:
        text = real_repr(value)
        lengths.append(len(text))
        return text

    monkeypatch.setattr(builtins, "repr", counting_repr)
    try:
        assert fetch(app)[0] == "200 OK"
    finally:
        monkeypatch.undo()
    snapshot = last(ext).g
    assert snapshot is not None
    return snapshot, lengths


class TestG:
    def test_keys_added_changed_removed_per_hook(self) -> None:
        """Each hook event lists the g keys it added, changed (a new object)
        or removed; a hook that leaves g alone has none.
        """
        ext = FlaskTrace(app := g_app())
        assert fetch(app)[2] == b"ok"
        trace = last(ext)
        by_name = {e.name: e.attrs for e in trace.events if e.kind in ("before_request", "view")}
        assert by_name["before_request:load_user"]["g_added"] == ["user", "db", "scratch"]
        assert not {"g_added", "g_changed", "g_removed"} & set(by_name["before_request:untouched"])
        replace = by_name["before_request:replace_user"]
        assert replace["g_changed"] == ["user"]
        assert replace["g_added"] == ["api_token"]
        assert replace["g_removed"] == ["scratch"]
        assert by_name["view:index"]["g_added"] == ["big", "broken", "odd"]
        [close] = trace.find(kind="teardown_appcontext")
        assert close.attrs["g_removed"] == ["db"]

    def test_a_g_without_a_dict_is_traced_without_changes(self) -> None:
        """An app whose ``app_ctx_globals_class`` has slots (no ``__dict__``)
        answers as without tracing; its hooks are traced, with no g changes.
        """

        class SlottedGlobals:
            __slots__ = ("user",)

        def make() -> Flask:
            app = Flask(__name__)
            app.app_ctx_globals_class = SlottedGlobals  # type: ignore[assignment]

            @app.before_request
            def load_user() -> None:
                g.user = "ann"

            @app.route("/")
            def index() -> str:
                return f"hello {g.user}"

            @app.teardown_appcontext
            def close(exc: BaseException | None) -> None:
                return None

            return app

        expected = fetch(make())
        ext = FlaskTrace(app := make())
        assert fetch(app) == expected
        assert expected[2] == b"hello ann"
        trace = last(ext)
        assert trace.hooks() == [
            "before_request:load_user",
            "view:index",
            "teardown_appcontext:close",
        ]
        assert not [e for e in trace.events if "g_added" in e.attrs]
        assert trace.g is None

    def test_removing_every_key(self) -> None:
        """A hook that empties g lists every key it removed."""
        ext = FlaskTrace(app := g_app())
        assert fetch(app, "/clear")[2] == b"cleared"
        [view] = last(ext).find(kind="view")
        assert sorted(view.attrs["g_removed"]) == ["api_token", "db", "user"]
        assert last(ext).g is None

    def test_final_snapshot_safe_truncated_and_redacted(self) -> None:
        """The teardown snapshot has cut reprs, survives a repr that raises or
        returns a non-string, and redacts secret-looking keys.
        """
        ext = FlaskTrace(app := g_app(), max_string=64)
        assert fetch(app)[0] == "200 OK"
        snapshot = last(ext).g
        assert snapshot is not None
        assert list(snapshot) == ["user", "api_token", "big", "broken", "odd"]
        assert snapshot["user"] == "'bob'"
        assert snapshot["api_token"] == REDACTED
        assert snapshot["big"] == ("'" + "x" * 63) + TRUNCATION_MARKER
        assert snapshot["broken"] == "<repr failed: ValueError>"
        assert snapshot["odd"] == "<repr failed: TypeError>"
        assert "s3cr3t" not in last(ext).to_json()

    def test_large_builtin_values_are_shown_without_building_their_whole_repr(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A big list, dict, set or bytes in ``g`` costs a bounded repr at
        teardown: the first elements, cut, never the whole value's repr.
        """
        rows = list(range(100_000))
        snapshot, lengths = g_snapshot_counting_reprs(
            monkeypatch,
            rows=rows,
            nested={"rows": rows, "small": (1, 2)},
            blob=b"x" * 100_000,
            small={"a": [1, 2, 3], "b": "text"},
        )
        assert snapshot["rows"].startswith("[0, 1, 2, 3, ")
        assert snapshot["nested"].startswith("{'rows': [0, 1, 2, ")
        assert snapshot["blob"].startswith("b'xxx")
        assert snapshot["small"] == "{'a': [1, 2, 3], 'b': 'text'}"
        assert all(len(value) <= 200 + len(TRUNCATION_MARKER) for value in snapshot.values())
        # No repr of anything near the values' full size was built.
        assert max(lengths, default=0) < 10_000

    def test_a_big_subclass_of_a_container_is_summed_up_not_repr_d(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A Counter or OrderedDict has a repr of its own that cannot be
        bounded: a big one is shown by its size; a small one as itself.
        """
        snapshot, lengths = g_snapshot_counting_reprs(
            monkeypatch,
            counts=collections.Counter(range(100_000)),
            ordered=collections.OrderedDict(a=1),
        )
        assert snapshot["counts"] == "<Counter of 100,000 items>"
        assert snapshot["ordered"] == repr(collections.OrderedDict(a=1))
        assert max(lengths) < 1_000

    def test_a_long_string_is_sliced_before_its_repr(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A request body read into ``g`` as text costs a repr of
        max_string characters at teardown, as bytes do, not a copy of it.
        """
        snapshot, lengths = g_snapshot_counting_reprs(monkeypatch, text="y" * 100_000, short="it's")
        assert snapshot == {"text": "'" + "y" * 199 + TRUNCATION_MARKER, "short": repr("it's")}
        assert max(lengths) < 1_000

    def test_a_wide_nested_value_costs_about_max_string(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """32 elements on each of three levels are 32,768 strings: the
        bounded repr stops once it has shown max_string characters, rather
        than build each of them and cut the whole.
        """
        snapshot, lengths = g_snapshot_counting_reprs(
            monkeypatch, wide=[[["s3cr3t" * 40] * 32] * 32] * 32
        )
        assert snapshot["wide"].startswith("[[['s3cr3ts3cr3t")
        assert len(snapshot["wide"]) <= 200 + len(TRUNCATION_MARKER)
        assert sum(lengths) < 20 * 200

    def test_small_builtin_values_keep_their_own_repr(self) -> None:
        """Only a big container is shown in reprlib's bounded form: a small
        one is shown as ``repr`` shows it, in insertion order, every level
        deep, with a deque's maxlen and a self-reference as ``[...]``.
        """
        app = Flask(__name__)
        loop: list[Any] = [1]
        loop.append(loop)
        values: dict[str, Any] = {
            "order": {"zeta": 1, "alpha": 2},
            "deep": {"a": {"b": {"c": {"d": [1]}}}},
            "window": deque([1, 2], maxlen=5),
            "loop": loop,
        }

        @app.route("/")
        def index() -> str:
            for name, value in values.items():
                setattr(g, name, value)
            return "ok"

        ext = FlaskTrace(app)
        assert fetch(app)[0] == "200 OK"
        assert last(ext).g == {name: repr(value) for name, value in values.items()}

    def test_keys_added_to_an_empty_g_on_every_request(self) -> None:
        """A hook that adds the same key to an empty g on each request shows
        it on each request, under one event key shared by those traces; when
        it adds another key, that request shows its own key.
        """

        def factory() -> Flask:
            app = Flask(__name__)

            @app.before_request
            def load_user() -> None:
                setattr(g, request.args.get("key", "user"), "ann")

            @app.route("/")
            def index() -> str:
                return "ok"

            return app

        plain, app = factory(), factory()
        ext = FlaskTrace(app)
        paths = ["/", "/", "/?key=visitor", "/", "/?key=visitor"]
        traces = []
        for path in paths:
            assert fetch(app, path) == fetch(plain, path)
            traces.append(last(ext))

        def hook_key(trace: Trace) -> Any:
            [key] = [key for key in trace._keys if key[1] == "before_request:load_user"]
            return key

        added = [trace.find(name="before_request:load_user")[0].attrs for trace in traces]
        assert [attrs["g_added"] for attrs in added] == [
            ["user"],
            ["user"],
            ["visitor"],
            ["user"],
            ["visitor"],
        ]
        assert all(attrs["qualname"].endswith("load_user") for attrs in added)
        keys = [hook_key(trace) for trace in traces]
        assert keys[0] is keys[1] is keys[3]
        assert keys[2] is keys[4]
        assert keys[2] is not keys[0]

    def test_names_of_changed_keys_are_bounded(self) -> None:
        """A hook adding, changing or removing many keys of g, or one with a
        long name, records at most MAX_G_NAMES names per list, each cut to
        max_string, and the count of the rest; the event keys shared between
        requests (and the caches that hold them) are bounded as well.
        """

        def factory() -> Flask:
            app = Flask(__name__)

            @app.before_request
            def many() -> None:
                for i in range(MAX_G_NAMES + 8):
                    setattr(g, f"k{i}", i)

            @app.before_request
            def long_name() -> None:
                setattr(g, "n" * 50, 1)

            @app.before_request
            def renew() -> None:
                for name in list(vars(g)):
                    setattr(g, name, object())

            @app.route("/")
            def index() -> str:
                return "ok"

            @app.after_request
            def forget(response: Response) -> Response:
                vars(g).clear()
                return response

            return app

        plain, app = factory(), factory()
        ext = FlaskTrace(app, max_string=10)
        traces = []
        for _ in range(2):
            assert fetch(app) == fetch(plain)
            traces.append(last(ext))
        first, second = traces
        names = [f"k{i}" for i in range(MAX_G_NAMES)]
        many = first.find(name="before_request:many")[0].attrs
        assert (many["g_added"], many["g_added_more"]) == (names, 8)
        long_name = first.find(name="before_request:long_name")[0].attrs
        assert long_name["g_added"] == ["n" * 10 + TRUNCATION_MARKER]
        assert "g_added_more" not in long_name
        renew = first.find(name="before_request:renew")[0].attrs
        assert (renew["g_changed"], renew["g_changed_more"]) == (names, 9)
        forget = first.find(name="after_request:forget")[0].attrs
        assert len(forget["g_removed"]) == MAX_G_NAMES
        assert forget["g_removed_more"] == 9
        # Shared by both requests, bounded in the caches too.
        for name in ("many", "long_name", "renew"):
            [one] = [k for k in first._keys if k[1] == f"before_request:{name}"]
            [two] = [k for k in second._keys if k[1] == f"before_request:{name}"]
            assert one is two
        tracer = ext.tracer_for(app)

        def bounded(names: Any) -> bool:
            cap = 10 + len(TRUNCATION_MARKER)
            return len(names) <= MAX_G_NAMES and all(len(name) <= cap for name in names)

        assert tracer._changed_keys
        for signature, (_, (_, _, attrs)) in tracer._changed_keys.items():
            assert all(bounded(v) for _, v in signature[1] if isinstance(v, tuple)), signature
            assert all(bounded(v) for v in attrs.values() if isinstance(v, list)), attrs
        assert all(bounded(key[1:]) for key in tracer._added_keys)

    def test_no_keys_added_to_g(self) -> None:
        """The app's g holds exactly its own keys at every step."""
        seen: list[list[str]] = []

        def factory() -> Flask:
            app = g_app()

            @app.after_request
            def see(response: Response) -> Response:
                seen.append(sorted(vars(g)))
                return response

            return app

        plain, traced = factory(), factory()
        FlaskTrace(traced)
        assert fetch(traced) == fetch(plain)
        assert seen[0] == seen[1]
        assert "wsgitrace" not in " ".join(seen[1])


def session_app() -> Flask:
    app = Flask(__name__)
    app.secret_key = "test-secret"

    @app.route("/login")
    def login() -> str:
        session["user_id"] = 7
        session["cart"] = ["tea", "jam"]
        session["csrf_token"] = "tok-abc123"
        return "in"

    @app.route("/read")
    def read() -> str:
        return str(session.get("user_id"))

    @app.route("/ignore")
    def ignore() -> str:
        app.config.setdefault("SEEN_CONTEXTS", []).append(request_ctx._get_current_object())
        return "no session use"

    return app


def login_cookie(app: Flask) -> str:
    """The value of the session cookie /login sets."""
    response = app.test_client().get("/login")
    try:
        cookie = response.headers["Set-Cookie"]
    finally:
        response.close()
    name, _, value = cookie.split(";")[0].partition("=")
    assert name == "session"
    return value


class TestSession:
    def test_keys_recorded_values_not(self) -> None:
        """Session keys are on the trace; values nowhere in it by default."""
        ext = FlaskTrace(app := session_app())
        cookie = login_cookie(app)
        trace = last(ext)
        assert trace.session_keys == ["user_id", "cart", "csrf_token"]
        assert not trace.find(kind="session")
        fetch(app, "/ignore", session_cookie=cookie)
        # Flask's cookie serializer sorts the keys.
        assert last(ext).session_keys == ["cart", "csrf_token", "user_id"]
        assert "tok-abc123" not in last(ext).to_json()
        assert "jam" not in last(ext).to_json()

    def test_values_when_asked_secrets_still_redacted(self) -> None:
        """session_values=True records values; secret-looking keys stay redacted."""
        ext = FlaskTrace(app := session_app(), session_values=True)
        login_cookie(app)
        [event] = last(ext).find(kind="session")
        assert event.attrs["values"] == {
            "user_id": "7",
            "cart": "['tea', 'jam']",
            "csrf_token": REDACTED,
        }
        assert "tok-abc123" not in last(ext).to_json()

    def test_values_under_keys_that_are_not_strings(self) -> None:
        """A key that is not a string (the cookie stores it as one) keeps its value."""
        app = session_app()

        @app.route("/numbered")
        def numbered() -> str:
            session[7] = "seven"
            return "ok"

        ext = FlaskTrace(app, session_values=True)
        fetch(app, "/numbered")
        assert last(ext).session_keys == ["7"]
        [event] = last(ext).find(kind="session")
        assert event.attrs["values"] == {"7": "'seven'"}

    @pytest.mark.parametrize("session_values", [False, True])
    def test_reading_session_does_not_mark_it_accessed(self, session_values: bool) -> None:
        """A request that does not touch the session gets no ``Vary: Cookie``,
        exactly like the untraced app; one that reads it gets the same Vary.
        """
        plain = session_app()
        traced = session_app()
        ext = FlaskTrace(traced, session_values=session_values)
        cookie = login_cookie(plain)
        for path in ("/ignore", "/read"):
            got = fetch(traced, path, session_cookie=cookie)
            assert got == fetch(plain, path, session_cookie=cookie)
            vary = [v for k, v in got[1] if k == "Vary"]
            assert vary == ([] if path == "/ignore" else ["Cookie"])
            assert last(ext).session_keys == ["cart", "csrf_token", "user_id"]
        # The session object itself was never marked accessed, teardown included.
        # The session object's accessed flag ends as without tracing, teardown
        # included (False on Flask 3.1; 3.0 sets it itself).
        accessed = []
        for app in (plain, traced):
            [ctx] = app.config["SEEN_CONTEXTS"]
            # Flask 3.1 keeps it in ctx._session, Flask 3.0 in ctx.session.
            stored = getattr(ctx, "_session", None) or vars(ctx)["session"]
            assert sorted(stored) == ["cart", "csrf_token", "user_id"]
            accessed.append(stored.accessed)
        assert accessed[1] is accessed[0]
        if hasattr(ctx, "_session"):
            assert accessed == [False, False]

    def test_no_session_no_keys(self) -> None:
        """Without a session cookie, session_keys stays None."""
        ext = FlaskTrace(app := session_app())
        fetch(app, "/ignore")
        assert last(ext).session_keys is None


def routing_app() -> Flask:
    app = Flask(__name__)
    shop = Blueprint("shop", __name__, url_prefix="/shop")

    @shop.route("/<category>/<int:item_id>")
    def item(category: str, item_id: int) -> str:
        return f"{category} {item_id} {request.view_args}"

    @app.route("/")
    def index() -> str:
        return "index"

    app.register_blueprint(shop)
    return app


class TestUrlMatch:
    def test_endpoint_rule_and_view_args(self) -> None:
        """The URL match gives endpoint, rule and converted view args."""
        ext = FlaskTrace(app := routing_app())
        plain = routing_app()
        assert fetch(app, "/shop/tea/42") == fetch(plain, "/shop/tea/42")
        trace = last(ext)
        assert trace.endpoint == "shop.item"
        assert trace.rule == "/shop/<category>/<int:item_id>"
        assert trace.view_args == {"category": "tea", "item_id": 42}
        [match] = trace.find(kind="url_match")
        assert match.attrs == {}
        data = json.loads(trace.to_json())
        assert data["endpoint"] == "shop.item"
        assert data["rule"] == "/shop/<category>/<int:item_id>"
        assert data["view_args"] == {"category": "tea", "item_id": 42}

    def test_no_view_args(self) -> None:
        """A rule without variables leaves view_args None."""
        ext = FlaskTrace(app := routing_app())
        fetch(app, "/")
        trace = last(ext)
        assert (trace.endpoint, trace.rule, trace.view_args) == ("index", "/", None)

    def test_routing_errors(self) -> None:
        """404 and 405 are recorded as the routing error with its code."""
        ext = FlaskTrace(app := routing_app())
        fetch(app, "/shop/tea/not-a-number")
        assert last(ext).find(kind="url_match")[0].attrs == {"error": "NotFound", "code": 404}
        assert last(ext).endpoint is None
        response = app.test_client().post("/")
        response.close()
        assert last(ext).find(kind="url_match")[0].attrs == {
            "error": "MethodNotAllowed",
            "code": 405,
        }

    def test_redirect_keeps_no_secret_of_the_query(self) -> None:
        """A slash redirect's URL, which carries the query on, is redacted
        like the trace's own query.
        """
        app = routing_app()
        app.add_url_rule("/folder/", "folder", lambda: "folder")
        ext = FlaskTrace(app)
        fetch(app, "/folder?access_token=s3cr3t&page=2")
        trace = last(ext)
        [match] = trace.find(kind="url_match")
        assert match.attrs == {
            "error": "RequestRedirect",
            "code": 308,
            "redirect": f"http://localhost/folder/?access_token={REDACTED}&page=2",
        }
        assert "s3cr3t" not in trace.to_json()  # nor in the Location header


class Product:
    """A model object a URL converter loads; counts calls of its repr."""

    reprs = 0

    def __init__(self, slug: str) -> None:
        self.slug = slug

    def __repr__(self) -> str:
        Product.reprs += 1
        return f"<Product {self.slug}>"


def converter_app() -> Flask:
    from werkzeug.routing import BaseConverter

    class ProductConverter(BaseConverter):
        def to_python(self, value: str) -> Product:
            return Product(value)

        def to_url(self, value: Any) -> str:
            return str(value.slug)

    app = Flask(__name__)
    app.url_map.converters["product"] = ProductConverter

    @app.route("/p/<product:product>/<path:rest>")
    def show(product: Product, rest: str) -> str:
        return product.slug

    return app


def test_secret_looking_view_args_are_redacted_in_view_args_and_path() -> None:
    """/reset/<token>: the token is neither in view_args nor in the path,
    nor in anything read from the trace; other view args are kept.
    """
    app = Flask(__name__)

    @app.route("/reset/<token>")
    def reset(token: str) -> str:
        return f"reset {token}"

    @app.route("/users/<int:user_id>/keys/<api_key>.json")
    def user_key(user_id: int, api_key: str) -> str:
        return f"{user_id} {api_key}"

    ext = FlaskTrace(app)
    assert fetch(app, "/reset/s3cr3t-reset-token")[2] == b"reset s3cr3t-reset-token"
    trace = last(ext)
    assert trace.view_args == {"token": REDACTED}
    assert trace.path == f"/reset/{REDACTED}"
    assert "s3cr3t" not in trace.to_json()
    assert fetch(app, "/users/7/keys/p%C3%A4ssw0rd-99.json")[2] == "7 pässw0rd-99".encode()
    trace = last(ext)
    assert trace.view_args == {"user_id": 7, "api_key": REDACTED}
    assert trace.path == f"/users/7/keys/{REDACTED}.json"
    assert "w0rd" not in trace.to_json()


def test_secret_view_args_spanning_segments_or_a_cut_path_are_redacted() -> None:
    """A ``path`` converter's secret spans segments, and a path cut at
    ``max_string`` may end in the first part of a secret: neither is kept.
    """
    app = Flask(__name__)

    @app.route("/files/<path:secret_path>")
    def files(secret_path: str) -> str:
        return secret_path

    @app.route("/reset/<token>")
    def reset(token: str) -> str:
        return token

    ext = FlaskTrace(app, max_string=40)
    assert fetch(app, "/files/hidden/s3cr3t/plans.txt")[2] == b"hidden/s3cr3t/plans.txt"
    trace = last(ext)
    assert trace.view_args == {"secret_path": REDACTED}
    assert trace.path == f"/files/{REDACTED}"
    token = "s3cr3t" + "x" * 60
    assert fetch(app, "/reset/" + token)[2] == token.encode()
    trace = last(ext)
    assert trace.path == f"/reset/{REDACTED}{TRUNCATION_MARKER}"
    assert "s3cr3t" not in trace.to_json()


@pytest.mark.parametrize("script_root", ["", "/mounted"])
def test_a_secret_view_arg_is_redacted_from_a_trailing_slash_redirect(script_root: str) -> None:
    """``/reset/<token>/`` asked without its slash matches no rule: Flask
    redirects to the URL with the slash. The token is in the trace's path,
    the ``url_match`` redirect and the ``Location`` header: redacted in all
    three, while the client still gets the real ``Location``.
    """
    app = Flask(__name__)

    @app.route("/reset/<token>/")
    def reset(token: str) -> str:
        return token

    @app.route("/docs/<page>/")
    def docs(page: str) -> str:
        return page

    @app.route("/pin/<int:pin_key>/")
    def pin(pin_key: int) -> str:
        return str(pin_key)

    ext = FlaskTrace(app)
    root = f"http://localhost{script_root}"

    def redirect(path: str) -> tuple[str, Trace, str]:
        """The Location the client got, the trace, and the trace's Location."""
        response = app.test_client().get(path, base_url=root + "/")
        assert response.status_code == 308
        sent = response.headers["Location"]
        response.close()
        trace = last(ext)
        flat = trace.response_headers
        return sent, trace, dict(zip(flat[::2], flat[1::2], strict=True))["Location"]

    sent, trace, kept = redirect("/reset/s3cr3t-token?next=%2F")
    assert sent == f"{root}/reset/s3cr3t-token/?next=%2F"
    assert trace.path == f"/reset/{REDACTED}"
    [url_match] = [event for event in trace.events if event.kind == "url_match"]
    assert url_match.attrs["redirect"] == kept == f"{root}/reset/{REDACTED}/?next=%2F"
    assert "s3cr3t" not in trace.to_json()
    # Found where the rule puts it, whatever its text: 0042 for 42.
    sent, trace, kept = redirect("/pin/0042")
    assert (sent, trace.path, kept) == (
        f"{root}/pin/0042/",
        f"/pin/{REDACTED}",
        f"{root}/pin/{REDACTED}/",
    )
    # Other redirects keep their path.
    sent, trace, kept = redirect("/docs/intro")
    assert (sent, trace.path, kept) == (f"{root}/docs/intro/", "/docs/intro", sent)


@pytest.mark.parametrize(
    ("path", "kept"),
    [
        ("/u/9B2E4C1A-0000-4000-8000-00000000ABCD/edit", f"/u/{REDACTED}/edit"),
        ("/pin/0042", f"/pin/{REDACTED}"),
        ("/keys/abc.json", f"/keys/{REDACTED}.json"),
        ("/keys/%FFs3%FF.json", f"/keys/{REDACTED}.json"),
    ],
)
def test_a_secret_view_arg_is_redacted_whatever_its_text_in_the_path(path: str, kept: str) -> None:
    """The path segment where the rule puts a secret-looking argument is
    redacted even when its text is not the value's: an upper-case UUID,
    ``0042`` for 42, a short token beside static text, bytes that are not
    UTF-8.
    """
    app = Flask(__name__)

    @app.route("/u/<uuid:token>/edit")
    def edit(token: object) -> str:
        return "ok"

    @app.route("/pin/<int:pin_key>")
    def pin(pin_key: int) -> str:
        return "ok"

    @app.route("/keys/<api_key>.json")
    def key(api_key: str) -> str:
        return "ok"

    ext = FlaskTrace(app)
    assert fetch(app, path)[0] == "200 OK"
    trace = last(ext)
    assert trace.view_args is not None
    assert list(trace.view_args.values()) == [REDACTED]
    assert trace.path == kept


def test_view_args_keep_no_app_objects_and_are_capped() -> None:
    """An object a converter made is kept as its repr (taken once, during
    the request), not referenced; text is cut to max_string.
    """
    import gc
    import weakref

    ext = FlaskTrace(app := converter_app(), max_string=32)
    made: list[weakref.ref[Product]] = []
    original = Product.__init__

    def tracking_init(self: Product, slug: str) -> None:
        original(self, slug)
        made.append(weakref.ref(self))

    Product.__init__ = tracking_init  # type: ignore[method-assign]
    try:
        assert fetch(app, "/p/tea/" + "a/" * 40)[2] == b"tea"
    finally:
        Product.__init__ = original  # type: ignore[method-assign]
    gc.collect()
    assert [ref() for ref in made] == [None]
    trace = last(ext)
    assert trace.view_args == {
        "product": "<Product tea>",
        "rest": "a/" * 16 + TRUNCATION_MARKER,
    }
    reprs = Product.reprs
    trace.to_json()
    assert Product.reprs == reprs


# -- log records ------------------------------------------------------------------


def logging_app() -> Flask:
    app = Flask(__name__)

    @app.route("/")
    def index() -> str:
        app.logger.warning("looked up %s items", 3)
        return "ok"

    @app.route("/chatty")
    def chatty() -> str:
        for i in range(10):
            app.logger.warning("line %d", i)
        return "ok"

    return app


class TestLogCapture:
    def test_flasks_error_log_does_not_repeat_a_secret_in_the_path(self) -> None:
        """Flask logs ``Exception on <path> [GET]`` for an unhandled error: a
        secret view argument redacted from the trace's path is redacted
        from that record's message too.
        """
        app = Flask(__name__)

        @app.route("/reset/<token>")
        def reset(token: str) -> str:
            raise RuntimeError("boom")

        ext = FlaskTrace(app)
        assert fetch(app, "/reset/s3cr3t-reset-token")[0] == "500 INTERNAL SERVER ERROR"
        trace = last(ext)
        [event] = trace.find(kind="log")
        assert event.attrs["message"] == f"Exception on /reset/{REDACTED} [GET]"
        assert "s3cr3t" not in trace.to_json()

    def test_app_logger_records_become_log_events(self) -> None:
        """A warning logged by a view is on its trace, message formatted."""
        app = logging_app()
        ext = FlaskTrace(app)
        assert fetch(app)[2] == b"ok"
        [event] = last(ext).find(kind="log")
        assert event.name == "log:warning"
        assert dict(event.attrs) == {
            "level": "WARNING",
            "logger": app.logger.name,
            "message": "looked up 3 items",
        }

    def test_log_records_are_capped_per_trace(self) -> None:
        """Past capture_logs records, the rest are counted, not kept."""
        app = logging_app()
        ext = FlaskTrace(app, capture_logs=4)
        fetch(app, "/chatty")
        trace = last(ext)
        assert [e.attrs["message"] for e in trace.find(kind="log")] == [
            "line 0",
            "line 1",
            "line 2",
            "line 3",
        ]
        assert trace.truncated == {"logs": 6}

    def test_the_cap_holds_per_request_when_requests_interleave(self) -> None:
        """A request that logs, serves a nested request that logs, then logs
        again: each trace keeps its own first records up to the cap.
        """
        app = Flask(__name__)

        @app.route("/outer")
        def outer() -> str:
            app.logger.warning("outer 0")
            app.test_client().get("/inner").close()
            for n in range(1, 4):
                app.logger.warning("outer %d", n)
            return "ok"

        @app.route("/inner")
        def inner() -> str:
            for n in range(3):
                app.logger.warning("inner %d", n)
            return "ok"

        ext = FlaskTrace(app, capture_logs=2)
        fetch(app, "/outer")
        outer_trace, inner_trace = ext.buffer.latest(2)
        assert (outer_trace.path, inner_trace.path) == ("/outer", "/inner")
        assert [e.attrs["message"] for e in outer_trace.find(kind="log")] == ["outer 0", "outer 1"]
        assert [e.attrs["message"] for e in inner_trace.find(kind="log")] == ["inner 0", "inner 1"]
        assert (outer_trace.truncated, inner_trace.truncated) == ({"logs": 2}, {"logs": 1})

    def test_zero_turns_log_capture_off(self) -> None:
        """capture_logs=0 adds no filter and records nothing."""
        app = logging_app()
        filters = list(app.logger.filters)
        ext = FlaskTrace(app, capture_logs=0)
        fetch(app)
        # Apps made by earlier tests share the logger (by name) and detach
        # their filters when collected: compare what this one added.
        assert [f for f in app.logger.filters if f not in filters] == []
        assert last(ext).find(kind="log") == []

    def test_logging_output_is_unchanged(self, caplog: pytest.LogCaptureFixture) -> None:
        """The app's records still reach every other handler, once."""
        app = logging_app()
        FlaskTrace(app)
        with caplog.at_level("WARNING"):
            fetch(app)
        assert [r.getMessage() for r in caplog.records] == ["looked up 3 items"]

    def test_records_outside_a_traced_request_are_ignored(self) -> None:
        """Logging at start-up or in another app's request records nothing:
        two apps share one logger (same name), each records only its own
        request's records.
        """
        app = logging_app()
        ext = FlaskTrace(app)
        app.logger.warning("not in a request")
        fetch(app)
        assert len(last(ext).find(kind="log")) == 1
        other = logging_app()
        other_ext = FlaskTrace(other)
        assert other.logger is app.logger
        fetch(other)
        assert [e.attrs["message"] for e in last(other_ext).find(kind="log")] == [
            "looked up 3 items"
        ]
        assert len(ext.buffer) == 1  # the first app's filter recorded nothing

    def test_the_filter_leaves_with_the_app(self) -> None:
        """When the app is freed, its capture filter leaves the (shared) logger."""
        import gc
        import logging

        app = Flask("wsgitrace_log_capture_lifetime")
        FlaskTrace(app)
        logger = logging.getLogger("wsgitrace_log_capture_lifetime")
        assert any(type(f).__name__ == "_LogCapture" for f in logger.filters)
        del app
        gc.collect()
        assert not any(type(f).__name__ == "_LogCapture" for f in logger.filters)
