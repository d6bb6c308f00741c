"""Render traces yourself, with the functions behind ``wsgitrace tail``.

No server, no endpoint: trace the bundled example app in-process, make a few
requests with Flask's test client, and print the table ``tail`` shows and the
timeline ``tail -v`` / ``show`` print::

    python examples/tail_demo.py

The same functions render a trace read from ``/_trace/<id>``:
``build_timeline(Trace.from_dict(data))``.
"""

from __future__ import annotations

from rich.console import Console

from wsgitrace.demo_app import create_app
from wsgitrace.flask import FlaskTrace
from wsgitrace.render import build_timeline, build_trace_table


def main() -> None:
    app = create_app()
    app.logger.disabled = True  # /boom's traceback is in its trace
    tracing = FlaskTrace(app)
    with app.test_client() as client:
        for path in ("/", "/api/v1/items/tea", "/admin/", "/missing", "/boom"):
            client.get(path).close()  # closing the response finishes its trace

    console = Console()
    oldest_first = list(reversed(tracing.buffer.latest()))
    console.print(build_trace_table(oldest_first))
    console.print()
    admin = next(trace for trace in oldest_first if trace.path == "/admin/")
    console.print(build_timeline(admin, full=True))


if __name__ == "__main__":
    main()
