"""The bundled example Flask app, traced.

Run it with Flask's own server and watch it in another terminal::

    flask --app examples/flask_app.py run --debug
    wsgitrace tail -v

or serve it without changing it: ``wsgitrace run examples.flask_app:app``.
The app itself lives in :mod:`wsgitrace.demo_app` so that ``wsgitrace demo``
works from an installed package.
"""

from __future__ import annotations

from wsgitrace.demo_app import create_app
from wsgitrace.flask import FlaskTrace

app = create_app()
tracing = FlaskTrace(app)

if __name__ == "__main__":
    app.run(debug=True)
