"""Why a tracer's straight-line code costs more than its bytecode count says:
the same number of bytecodes, varied or repeated, alone and next to Flask.

Usage::

    python bench/diversity.py [--rounds N] [--requests N] [--warmup N]
                              [--statements N] [--seed N] [--json out.json]

Two functions run the same kind of work before each request, about the same
number of bytecodes, built from the statements a tracer's write path is made
of (clock reads and list appends, dict reads and writes, attribute reads and
writes, comparisons, tuples):

``varied``
    ``--statements`` (default 400) statements drawn at random, each run once
    per request, like a tracer's hooks into the phases of a request.
``repeated``
    A tenth of as many statements drawn the same way, run ten times in a
    loop, like one recording function called per event.

Each is timed as a WSGI wrapper around two apps, and each app unwrapped:
``trivial`` (answers at once) and ``flask`` (the benchmark's bare Flask
``/hello``). Every round runs all six, the order rotated from round to round;
the report gives the time each wrapper adds, median (min–max) over rounds.

Alone (``trivial``) both cost about the same. Next to a Flask request,
``varied`` costs markedly more than ``repeated``: code run once per request
shares the CPU's branch predictors and caches with Flask's own, code run in
a loop mostly predicts itself. A tracer's overhead on a real app therefore
depends on how much distinct code it runs per request, not only on how much
code; the README's performance section gives a measured run.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
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
from inprocess import make_environ, timed_block

WsgiApp = Callable[[dict[str, Any], Any], Iterable[bytes]]
Work = Callable[[list[int], dict[str, int], Any, dict[str, Any]], int]

BASES = ("trivial", "flask")
WORKS = ("varied", "repeated")
REPEATS = 10

#: Statement templates; ``{k}`` is a short string key, ``{i}`` the statement's index.
_STATEMENTS = (
    "events.append(clock())",
    "state[{k!r}] = n + {i}",
    "n = state.get({k!r}, 0) + {i}",
    "if n > {i}:\n    m = n - {i}\nelse:\n    m = n",
    "t = (n, {i}, holder.a)",
    "holder.b = holder.a + {i}",
    "full = len(events) < {i}",
    "value = environ.get({k!r})",
)


class _Holder:
    a = 1
    b = 2


def make_work(name: str, statements: int, rng: random.Random) -> Work:
    """A function of ``statements`` random statements (see the module docstring)."""
    lines = [
        f"def {name}(events, state, holder, environ):",
        "    clock = _clock",
        "    n = m = 0",
    ]
    for i in range(statements):
        text = rng.choice(_STATEMENTS).format(k=f"k{rng.randrange(30)}", i=i)
        lines.extend("    " + line for line in text.splitlines())
    lines.append("    return n + m")
    namespace: dict[str, Any] = {"_clock": time.perf_counter_ns}
    exec(compile("\n".join(lines), f"<diversity {name}>", "exec"), namespace)
    work: Work = namespace[name]
    return work


def build_works(statements: int, seed: int) -> dict[str, Work]:
    """``varied`` and ``repeated`` (see the module docstring)."""
    rng = random.Random(seed)
    varied = make_work("varied", statements, rng)
    once = make_work("repeated_body", max(1, statements // REPEATS), rng)

    def repeated(
        events: list[int], state: dict[str, int], holder: Any, environ: dict[str, Any]
    ) -> int:
        total = 0
        for _ in range(REPEATS):
            total += once(events, state, holder, environ)
        return total

    return {"varied": varied, "repeated": repeated}


def count_bytecodes(work: Work) -> int:
    """Bytecodes one call of ``work`` runs (counted with ``sys.settrace``)."""
    count = 0

    def local(frame: Any, event: str, arg: Any) -> Any:
        nonlocal count
        if event == "opcode":
            count += 1
        return local

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        return local

    sys.settrace(tracer)
    try:
        work([], {}, _Holder(), {})
    finally:
        sys.settrace(None)
    return count


def wrap(app: WsgiApp, work: Work) -> WsgiApp:
    """``app`` with ``work`` run on fresh state before each request."""

    def wrapped(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        work([], {}, _Holder(), environ)
        return app(environ, start_response)

    return wrapped


def build_bases() -> dict[str, WsgiApp]:
    """The two apps of the module docstring, by name."""

    def trivial(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
        return [b"hello"]

    flask_app: WsgiApp = apps.create_app("bare")
    return {"trivial": trivial, "flask": flask_app}


def measure(
    *, rounds: int, requests: int, warmup: int, statements: int, seed: int
) -> dict[str, dict[str, list[float]]]:
    """µs per request of each app, plain and with each wrapper, per round."""
    environ = make_environ("/hello")
    works = build_works(statements, seed)
    runs: dict[tuple[str, str], WsgiApp] = {}
    for base, app in build_bases().items():
        runs[base, "plain"] = app
        for name, work in works.items():
            runs[base, name] = wrap(app, work)
    for app in runs.values():
        timed_block(app, environ, warmup, gc_off=False)  # type: ignore[arg-type]
    order = list(runs)
    times: dict[str, dict[str, list[float]]] = {
        base: {name: [] for name in ("plain", *WORKS)} for base in BASES
    }
    for r in range(rounds):
        shift = r % len(order)
        for base, name in order[shift:] + order[:shift]:
            ns = timed_block(runs[base, name], environ, requests, gc_off=False)  # type: ignore[arg-type]
            times[base][name].append(ns / requests / 1000)
        print(f"round {r + 1}/{rounds}", file=sys.stderr)
    return times


def summarize(times: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, Any]]:
    """Per app: each wrapper's added µs, median (min–max) over rounds."""
    out: dict[str, dict[str, Any]] = {}
    for base, runs in times.items():
        plain = runs["plain"]
        out[base] = {"plain_us": spread(plain)}
        for name in WORKS:
            out[base][f"{name}_added_us"] = spread(
                [t - p for t, p in zip(runs[name], plain, strict=True)]
            )
    return out


def render(data: dict[str, Any], *, markdown: bool = False) -> str:
    """The report as text (or Markdown)."""
    params = data["params"]
    head = (
        f"Added µs per request of {params['statements']} varied statements run once, and of"
        f" {max(1, params['statements'] // REPEATS)} run {REPEATS} times; {params['rounds']}"
        f" rounds × {params['requests']} requests, order rotated. Bytecodes per request: "
        + ", ".join(f"{name} {count:,}" for name, count in data["bytecodes"].items())
        + "."
    )
    rows = [
        [
            base,
            fmt_spread(stats["plain_us"]),
            fmt_spread(stats["varied_added_us"]),
            fmt_spread(stats["repeated_added_us"]),
        ]
        for base, stats in data["results"].items()
    ]
    body = table(
        ["app", "plain µs", "varied: added µs", "repeated: added µs"], rows, markdown=markdown
    )
    return f"{machine_markdown(data['machine'])}\n\n{head}\n\n{body}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_timing_options(parser, rounds=15, requests=1000, warmup=1000)
    parser.add_argument(
        "--statements", type=int, default=400, help="statements of varied (default 400)"
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    return parse_timing_options(parser, argv, positive=["statements"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = {name: value for name, value in vars(args).items() if name != "json"}
    times = measure(**params)
    data = {
        "machine": machine_info(),
        "params": params,
        "bytecodes": {
            name: count_bytecodes(work)
            for name, work in build_works(args.statements, args.seed).items()
        },
        "results": summarize(times),
    }
    print_and_save(render(data), data, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
