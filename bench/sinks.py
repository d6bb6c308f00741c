"""What each sink costs per request, next to the in-memory default.

Usage::

    python bench/sinks.py [--rounds N] [--requests N] [--route /hello] [--json out.json]

Three Flask apps from ``bench/apps.py``, all with full tracing
(``FlaskTrace``): ``memory`` (the default: the ring buffer only), ``store``
(plus ``store=`` a SQLite file in a temporary directory) and ``otlp`` (plus
``otlp=True``, exporting over OTLP/HTTP to a receiver in another process on
127.0.0.1 that accepts and discards). Every round serves ``--requests``
requests to each app like a server does (the order rotated per round), then
waits for the sinks to deliver everything. Reported, as the median over the
rounds:

``request path``
    µs per request while serving (the sink threads run meanwhile and take
    their share of the GIL, so this includes that contention);
``with delivery``
    µs per request until every trace is in the store or at the receiver:
    serving time plus the time the sinks then still needed, over the same
    requests -- the whole CPU cost of the sink in this process.

The sink queue is made large enough that nothing is dropped (checked).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import apps
from inprocess import make_environ, timed_block

CONFIGS = ("memory", "store", "otlp")

_RECEIVER = """
import http.server, sys

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def build(config: str, directory: str) -> Any:
    options: dict[str, Any] = {"endpoint": False, "sink_queue": 1_000_000}
    if config == "store":
        options["store"] = os.path.join(directory, "traces.db")
    elif config == "otlp":
        options["otlp"] = True
    app = apps.create_app("flasktrace", **options)
    return app


def sinks_of(app: Any) -> Any:
    return app.extensions["wsgitrace"].middleware.sinks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--route", default="/hello")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)

    receiver = subprocess.Popen(
        [sys.executable, "-c", _RECEIVER], stdout=subprocess.PIPE, text=True
    )
    try:
        assert receiver.stdout is not None
        port = int(receiver.stdout.readline())
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{port}"
        with tempfile.TemporaryDirectory() as directory:
            results = run(args, directory)
    finally:
        receiver.terminate()
        receiver.wait(timeout=10)
    report(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def run(args: argparse.Namespace, directory: str) -> dict[str, Any]:
    built = {config: build(config, directory) for config in CONFIGS}
    template = make_environ(args.route)
    for app in built.values():  # warm up, and start the sink threads
        timed_block(app, template, 500, gc_off=False)
        sinks = sinks_of(app)
        if sinks is not None:
            assert sinks.flush(60)
    serving: dict[str, list[float]] = {c: [] for c in CONFIGS}
    total: dict[str, list[float]] = {c: [] for c in CONFIGS}
    for round_ in range(args.rounds):
        order = CONFIGS[round_ % 3 :] + CONFIGS[: round_ % 3]
        for config in order:
            app = built[config]
            sinks = sinks_of(app)
            elapsed = timed_block(app, template, args.requests, gc_off=False)
            start = time.perf_counter_ns()
            if sinks is not None:
                assert sinks.flush(120), f"{config}: not delivered in time"
            delivered = elapsed + time.perf_counter_ns() - start
            serving[config].append(elapsed / args.requests / 1000)
            total[config].append(delivered / args.requests / 1000)
    dropped = {
        c: (sinks_of(a).dropped + sinks_of(a).failed if sinks_of(a) else 0)
        for c, a in built.items()
    }
    for app in built.values():
        if sinks_of(app) is not None:
            sinks_of(app).close()
    assert not any(dropped.values()), dropped
    return {
        "route": args.route,
        "rounds": args.rounds,
        "requests": args.requests,
        "python": sys.version.split()[0],
        "results": {
            c: {
                "request_path_us": statistics.median(serving[c]),
                "with_delivery_us": statistics.median(total[c]),
            }
            for c in CONFIGS
        },
    }


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    base = results["results"]["memory"]
    print(
        f"{results['route']}, {results['rounds']} rounds x {results['requests']} requests,"
        f" Python {results['python']}; median µs/request (ratio to memory)"
    )
    print(f"{'sink':<8} {'request path':>22} {'with delivery':>22}")
    for config, row in results["results"].items():
        path = row["request_path_us"]
        total = row["with_delivery_us"]
        print(
            f"{config:<8} {path:>12.1f} ({path / base['request_path_us']:4.2f}x)"
            f" {total:>13.1f} ({total / base['with_delivery_us']:4.2f}x)"
        )


if __name__ == "__main__":
    sys.exit(main())
