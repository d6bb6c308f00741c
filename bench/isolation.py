"""Where tracing's per-request time goes: wsgitrace's own work alone, and
the same work when it shares the CPU with a Flask request.

Usage::

    python bench/isolation.py [--rounds N] [--requests N] [--warmup N]
                              [--sweep-bytes N] [--json out.json]

``TraceMiddleware`` (WSGI-level events only, as in ``inprocess.py``'s
``middleware`` configuration) is timed around three WSGI apps, each also
timed unwrapped; every round runs all six, the order rotated from round to
round, and the report gives the time tracing adds, median (min–max) over
the rounds:

``trivial``
    Answers at once with a 5-byte body. wsgitrace's code and data stay in
    the CPU's caches and its branches are predicted: its own work at its
    cheapest.
``after-sweep``
    First copies ``--sweep-bytes`` (default 2 MiB) of memory, which pushes
    wsgitrace's data out of the data caches, then answers as ``trivial``.
``after-flask``
    First serves a bare Flask ``/hello`` request (the benchmark's app), then
    answers as ``trivial``, as if the work a request does ran inside it.

The tracer records the same events around all three apps; they differ only
in what ran on the CPU in between. When ``after-flask`` adds much more than
``trivial``, and ``after-sweep`` explains little of the gap, the same Python
code costs more once it shares the CPU with Flask's (its caches and branch
predictors): an overhead budget is then a budget of bytecodes run per
request, which ``trivial`` alone understates. The README's performance
section gives a measured run.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import apps
from _report import (
    add_timing_options,
    fmt_spread,
    machine_info,
    machine_markdown,
    parse_timing_options,
    print_and_save,
    spread,
    table,
)
from inprocess import Environ, make_environ, serve_once, timed_block

from wsgitrace import TraceMiddleware

WsgiApp = Callable[[dict[str, Any], Any], Iterable[bytes]]

APPS = ("trivial", "after-sweep", "after-flask")
_HEADERS = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", "5")]


def build_apps(sweep_bytes: int, flask_environ: Environ) -> dict[str, WsgiApp]:
    """The three apps of the module docstring, by name; ``after-flask``
    serves Flask a copy of ``flask_environ``.
    """
    flask_app = apps.create_app("bare")
    target = bytearray(sweep_bytes)
    source = bytes(sweep_bytes)

    def trivial(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", _HEADERS)
        return [b"hello"]

    def after_sweep(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        target[:] = source
        return trivial(environ, start_response)

    def after_flask(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        serve_once(flask_app, flask_environ)
        return trivial(environ, start_response)

    return {"trivial": trivial, "after-sweep": after_sweep, "after-flask": after_flask}


def measure(
    *, rounds: int, requests: int, warmup: int, sweep_bytes: int
) -> dict[str, dict[str, list[float]]]:
    """µs per request of each app, plain and traced, for every round."""
    environ = make_environ("/hello")
    plain = build_apps(sweep_bytes, environ)
    runs: dict[tuple[str, bool], WsgiApp] = {}
    for name, app in plain.items():
        runs[name, False] = app
        runs[name, True] = tracer = TraceMiddleware(app)
        serve_once(tracer, environ)  # type: ignore[arg-type]
        # The bench must not pass by tracing nothing.
        recorded = tracer.buffer.latest(1)
        if not recorded or not recorded[0].finished:
            raise SystemExit(f"isolation.py: {name}: the traced request left no finished trace")
    for app in runs.values():
        timed_block(app, environ, warmup, gc_off=False)  # type: ignore[arg-type]
    order = list(runs)
    times: dict[str, dict[str, list[float]]] = {name: {"plain": [], "traced": []} for name in plain}
    for r in range(rounds):
        shift = r % len(order)
        for name, traced in order[shift:] + order[:shift]:
            ns = timed_block(runs[name, traced], environ, requests, gc_off=False)  # type: ignore[arg-type]
            times[name]["traced" if traced else "plain"].append(ns / requests / 1000)
        print(f"round {r + 1}/{rounds}", file=sys.stderr)
    return times


def summarize(times: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, Any]]:
    """Median (min–max) of each app's plain and traced time and of the time
    tracing added, per round.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, runs in times.items():
        added = [t - p for t, p in zip(runs["traced"], runs["plain"], strict=True)]
        out[name] = {
            "plain_us": spread(runs["plain"]),
            "traced_us": spread(runs["traced"]),
            "added_us": spread(added),
        }
    return out


def render(data: dict[str, Any], *, markdown: bool = False) -> str:
    """The report as text (or Markdown)."""
    params = data["params"]
    head = (
        f"TraceMiddleware's added time per request, {params['rounds']} rounds ×"
        f" {params['requests']} requests, order rotated; sweep {params['sweep_bytes']:,} bytes."
    )
    rows = [
        [
            name,
            fmt_spread(stats["plain_us"]),
            fmt_spread(stats["traced_us"]),
            fmt_spread(stats["added_us"]),
        ]
        for name, stats in data["results"].items()
    ]
    body = table(["app", "plain µs", "traced µs", "added µs"], rows, markdown=markdown)
    return f"{machine_markdown(data['machine'])}\n\n{head}\n\n{body}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_timing_options(parser, rounds=9, requests=3000, warmup=1500)
    parser.add_argument(
        "--sweep-bytes",
        type=int,
        default=2 * 1024 * 1024,
        help="bytes copied by after-sweep (default 2 MiB)",
    )
    return parse_timing_options(parser, argv, positive=["sweep_bytes"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = {name: value for name, value in vars(args).items() if name != "json"}
    times = measure(**params)
    data = {
        "machine": machine_info(),
        "params": params,
        "results": summarize(times),
    }
    print_and_save(render(data), data, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
