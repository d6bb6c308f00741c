"""The bundled example: a small but realistic Flask app to trace.

It has what real apps have, so its traces show every kind of hook:

- an ``api`` blueprint with a nested ``v1`` blueprint and a URL value
  preprocessor;
- an ``admin`` blueprint whose ``before_request`` refuses unauthenticated
  requests (a short-circuit);
- an app-wide ``before_request`` that loads the user into ``g``, and a
  database handle the views open on first use and a ``teardown_appcontext``
  closes;
- an ``after_request`` that adds a header, a template with a context
  processor, a streamed response, a slow route and an error route.

::

    from wsgitrace.demo_app import create_app
    from wsgitrace.flask import FlaskTrace

    app = create_app()
    FlaskTrace(app)

``wsgitrace demo`` serves it and sends it traffic; ``examples/flask_app.py``
runs it with ``flask run``.
"""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Iterator, Mapping
from typing import Any

from flask import (
    Blueprint,
    Flask,
    Response,
    abort,
    g,
    jsonify,
    render_template,
    request,
    stream_with_context,
)
from jinja2 import DictLoader

TEMPLATES = {
    "index.html": (
        "<!doctype html><title>{{ site }}</title>"
        "<h1>Hello, {{ g.user or 'guest' }}</h1>"
        "<ul>{% for item in items %}<li>{{ item }}</li>{% endfor %}</ul>"
    ),
}


def _db() -> sqlite3.Connection:
    if "db" not in g:
        g.db = sqlite3.connect(":memory:")
        g.db.execute("create table items (name text)")
        g.db.executemany("insert into items values (?)", [("tea",), ("cake",), ("jam",)])
    return g.db  # type: ignore[no-any-return]


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the example app (an app factory, as Flask recommends)."""
    app = Flask(__name__)
    app.config.update(SECRET_KEY="demo-only-not-secret", SITE_NAME="wsgitrace demo")  # noqa: S106
    if config:
        app.config.update(config)
    app.jinja_loader = DictLoader(TEMPLATES)

    @app.before_request
    def load_user() -> None:
        g.user = request.headers.get("X-User")

    @app.after_request
    def add_server_timing(response: Response) -> Response:
        response.headers["X-Demo"] = "wsgitrace"
        return response

    @app.teardown_appcontext
    def close_db(exc: BaseException | None) -> None:
        db = g.pop("db", None)
        if db is not None:
            db.close()

    @app.context_processor
    def inject_site() -> dict[str, Any]:
        return {"site": app.config["SITE_NAME"]}

    @app.route("/")
    def index() -> str:
        items = [row[0] for row in _db().execute("select name from items")]
        return render_template("index.html", items=items)

    @app.route("/slow")
    def slow() -> Response:
        # Not a number sleeps the default; the rest, 0 to 2000ms.
        ms = request.args.get("ms", 120.0, type=float)
        delay = 120.0 if math.isnan(ms) else min(max(ms, 0.0), 2000.0)
        time.sleep(delay / 1000)
        return jsonify(slept_ms=round(delay))

    @app.route("/stream")
    def stream() -> Response:
        count = max(0, min(request.args.get("n", 5, type=int), 1000))

        def generate() -> Iterator[str]:
            for i in range(count):
                yield f"chunk {i} for {g.user or 'guest'}\n"

        return Response(stream_with_context(generate()), mimetype="text/plain")

    @app.route("/boom")
    def boom() -> str:
        raise RuntimeError("the demo's error route failed on purpose")

    @app.errorhandler(404)
    def not_found(error: Exception) -> tuple[Response, int]:
        return jsonify(error="not found", path=request.path), 404

    admin = Blueprint("admin", __name__, url_prefix="/admin")

    @admin.before_request
    def require_admin() -> tuple[Response, int] | None:
        if g.user != "admin":
            return jsonify(error="admins only"), 403
        return None

    @admin.route("/")
    def dashboard() -> Response:
        return jsonify(users=1, user=g.user)

    api = Blueprint("api", __name__, url_prefix="/api")
    v1 = Blueprint("v1", __name__, url_prefix="/v1")

    @v1.url_value_preprocessor
    def pull_item(endpoint: str | None, values: dict[str, Any] | None) -> None:
        if values is not None and "item" in values:
            g.item = values["item"]

    @v1.after_request
    def api_version(response: Response) -> Response:
        response.headers["X-API-Version"] = "1"
        return response

    @v1.route("/items/<item>")
    def item(item: str) -> Response:
        found = _db().execute("select name from items where name = ?", (item,)).fetchone()
        if found is None:
            abort(404)
        return jsonify(item=found[0])

    api.register_blueprint(v1)
    app.register_blueprint(api)
    app.register_blueprint(admin)
    return app
