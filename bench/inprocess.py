"""In-process benchmark: what tracing costs per request, side by side.

Usage::

    python bench/inprocess.py [--rounds N] [--requests N] [--warmup N]
                              [--routes /hello,/json,...] [--configs bare,...]
                              [--gc-off] [--cpu N] [--memory-traces N]
                              [--retries N] [--quiet-timeout S]
                              [--json out.json] [--markdown] [--write-readme README.md]
    python bench/inprocess.py --profile flasktrace [--profile-route /hello]
                              [--profile-requests N]

Defaults: 15 rounds × 2,000 requests per configuration and route, 1,500
warm-up requests each. ``--cpu 1`` pins the process to one CPU. Each round
is repeated (``--retries``, default 2) when other processes used more than a
quarter of a CPU while it ran, after waiting (``--quiet-timeout``) for a
quiet machine; the report says how many contended rounds were kept.
``--profile CONFIG`` prints cProfile's top functions by tottime for one
configuration, then wsgitrace's own functions, and exits.

Six configurations, each a separately built Flask app from the same code
(``bench/apps.py``): ``bare`` Flask, wsgitrace's ``middleware`` only,
``flasktrace`` (full Flask tracing), ``sampled`` (full Flask tracing of one
request in ten, ``sample=0.1``, as recommended for production), ``naive``
(the naive recorder of issue #6, ``bench/naive.py``: 20 tuples appended to a
deque per ``/hello``) and ``otel``
(OpenTelemetry's Flask instrumentation, SDK provider, ``SimpleSpanProcessor``
and in-memory exporter, cleared before every timed block). Every app is
called like a server calls it: a prepared environ (copied per request), the
body consumed, ``close()`` called.

Each round runs every configuration once per route, the order rotated from
round to round; the report gives µs/request, the ratio to ``bare`` of the same
round and the time added over ``bare``, as median (min–max) over the rounds.
The garbage collector stays enabled during timed loops unless ``--gc-off``
(the report says which).

Also measured: the requests each tracer recorded per ``/hello`` request
(about 1, and about 0.1 for ``sampled``; the bench must not pass by tracing
nothing), and, for ``middleware`` and ``flasktrace``:

* events per ``/hello`` trace;
* memory retained per trace (``tracemalloc``, minus the same loop on ``bare``);
* that the buffer's byte accounting never exceeds a small ``max_bytes`` cap;
* the cost of reading the newest 1,000 traces as the ``/_trace`` JSON list,
  built directly and through the real endpoint.

Budgets (``flasktrace``, issue #6): ≤ 1.25× bare on ``/hello``; added time ≤
1/5 of OpenTelemetry's added time on ``/hello``; less time than the naive
recorder (``naive``) on ``/hello``; ≥ 17 events per ``/hello``
trace; ≤ 1.5 KB retained per trace; byte accounting ≤ ``max_bytes``; reading
1,000 traces as JSON ≤ 50 ms. Exit status 1 when a measured budget fails; a
budget whose configuration was left out of ``--configs`` is "pending".
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import pstats
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import apps
from _report import (
    CONTENTION_THRESHOLD,
    README_END,
    README_START,
    CpuMonitor,
    emit,
    fmt_spread,
    machine_info,
    machine_markdown,
    spread,
    table,
    verdict,
    wait_quiet,
)

if TYPE_CHECKING:
    from flask import Flask

    from wsgitrace import TraceBuffer

Environ = dict[str, Any]

#: Budgets of issue #6.
BUDGET_HELLO_RATIO = 1.25
BUDGET_OTEL_FRACTION = 0.2
BUDGET_MIN_EVENTS = 17
BUDGET_BYTES_PER_TRACE = 1536
BUDGET_READ_MS = 50.0

TRACED_CONFIGS = ("middleware", "flasktrace")


# -- driving an app like a server -------------------------------------------


def make_environ(path: str) -> Environ:
    """A GET environ for ``path`` with the headers a load generator sends."""
    from werkzeug.test import EnvironBuilder

    builder = EnvironBuilder(
        path=path,
        base_url="http://127.0.0.1:8000/",
        headers=[("User-Agent", "wsgitrace-bench"), ("Accept", "*/*")],
        environ_base={"REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": "50000"},
    )
    try:
        return builder.get_environ()
    finally:
        builder.close()


def _write(data: bytes) -> None:
    return None


_last_status: list[str] = [""]


def _start_response(
    status: str, headers: list[tuple[str, str]], exc_info: Any = None
) -> Callable[[bytes], None]:
    _last_status[0] = status
    return _write


def serve_once(app: Flask, template: Environ) -> tuple[str, int]:
    """Serve one request; return the status line and body size."""
    body = app(template.copy(), _start_response)
    size = 0
    try:
        for chunk in body:
            size += len(chunk)
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()
    return _last_status[0], size


def timed_block(app: Flask, template: Environ, n: int, *, gc_off: bool) -> int:
    """Serve ``n`` requests; return the elapsed nanoseconds."""
    start_response = _start_response
    perf = time.perf_counter_ns
    if gc_off:
        gc.disable()
    try:
        t0 = perf()
        for _ in range(n):
            body = app(template.copy(), start_response)
            try:
                for _chunk in body:
                    pass
            finally:
                close = getattr(body, "close", None)
                if close is not None:
                    close()
        return perf() - t0
    finally:
        if gc_off:
            gc.enable()


# -- latency -----------------------------------------------------------------


def build_apps(configs: Iterable[str]) -> dict[str, Flask]:
    """One separately built app per configuration."""
    return {config: apps.create_app(config) for config in configs}


def check_responses(built: dict[str, Flask], routes: Iterable[str]) -> None:
    """Every configuration answers every route identically (status and size)."""
    for route in routes:
        template = make_environ(route)
        seen = {config: serve_once(app, template) for config, app in built.items()}
        if len(set(seen.values())) != 1 or not seen["bare"][0].startswith("200"):
            msg = f"configurations disagree on {route}: {seen}"
            raise SystemExit(msg)


def measure_latency(
    built: dict[str, Flask],
    routes: list[str],
    *,
    rounds: int,
    requests: int,
    warmup: int,
    gc_off: bool,
    retries: int = 2,
    quiet_timeout: float = 60.0,
    other_cpus: list[float | None] | None = None,
) -> dict[str, dict[str, list[float]]]:
    """µs/request per route and configuration, one value per round. A round
    during which other processes used more than a quarter of a CPU is run
    again (up to ``retries`` times) after waiting for a quiet machine; the CPU
    they used in each kept round is appended to ``other_cpus``.
    """
    if other_cpus is None:
        other_cpus = []
    # The naive recorder's signal receivers slow every app of the process
    # down while they are connected: only while its own app is timed.
    with apps.naive_detached(built.values()):
        return _measure_latency(
            built,
            routes,
            rounds=rounds,
            requests=requests,
            warmup=warmup,
            gc_off=gc_off,
            retries=retries,
            quiet_timeout=quiet_timeout,
            other_cpus=other_cpus,
        )


def _measure_latency(
    built: dict[str, Flask],
    routes: list[str],
    *,
    rounds: int,
    requests: int,
    warmup: int,
    gc_off: bool,
    retries: int,
    quiet_timeout: float,
    other_cpus: list[float | None],
) -> dict[str, dict[str, list[float]]]:
    configs = list(built)
    templates = {route: make_environ(route) for route in routes}
    for app in built.values():
        with apps.naive_attached(app):
            for route in routes:
                timed_block(app, templates[route], warmup, gc_off=gc_off)
        _clear_otel(app)
    results: dict[str, dict[str, list[float]]] = {
        route: {config: [] for config in configs} for route in routes
    }
    for rnd in range(rounds):
        shift = rnd % len(configs)
        order = configs[shift:] + configs[:shift]
        for attempt in range(retries + 1):
            wait_quiet(quiet_timeout)
            values: dict[str, dict[str, float]] = {route: {} for route in routes}
            with CpuMonitor() as monitor:
                for route in routes:
                    for config in order:
                        app = built[config]
                        _clear_otel(app)
                        with apps.naive_attached(app):
                            elapsed = timed_block(app, templates[route], requests, gc_off=gc_off)
                        values[route][config] = elapsed / requests / 1000
            line = "  ".join(f"{config} {values[routes[0]][config]:.1f}" for config in configs)
            other = "n/a" if monitor.other_cpus is None else f"{monitor.other_cpus:.2f}"
            print(
                f"round {rnd + 1}/{rounds}: {routes[0]} µs/req: {line}; other CPU {other}"
                + (" (contended)" if monitor.contended else ""),
                file=sys.stderr,
            )
            if not monitor.contended or attempt == retries:
                break
        for route in routes:
            for config in configs:
                results[route][config].append(values[route][config])
        other_cpus.append(monitor.other_cpus)
    return results


def _clear_otel(app: Flask) -> None:
    exporter = apps.otel_exporter(app)
    if exporter is not None:
        exporter.clear()


def summarize_latency(results: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """Medians, per-round ratios to bare and added µs, and FlaskTrace vs OTel."""
    out: dict[str, Any] = {}
    for route, per_config in results.items():
        bare = per_config["bare"]
        route_out: dict[str, Any] = {}
        for config, values in per_config.items():
            ratios = [v / b for v, b in zip(values, bare, strict=True)]
            added = [v - b for v, b in zip(values, bare, strict=True)]
            route_out[config] = {
                "us_per_request": spread(values),
                "ratio_to_bare": spread(ratios),
                "added_us": spread(added),
                "rounds": values,
            }
        if "flasktrace" in per_config and "otel" in per_config:
            fractions = [
                (f - b) / (o - b)
                for f, o, b in zip(per_config["flasktrace"], per_config["otel"], bare, strict=True)
                if o - b > 0
            ]
            route_out["flasktrace_vs_otel_added"] = spread(fractions)
        if "flasktrace" in per_config and "naive" in per_config:
            route_out["flasktrace_vs_naive"] = spread(
                [f / n for f, n in zip(per_config["flasktrace"], per_config["naive"], strict=True)]
            )
        out[route] = route_out
    return out


# -- what a trace holds ------------------------------------------------------


def check_events(config: str, route: str = "/hello") -> dict[str, Any]:
    """Serve ``route`` once on a fresh app and describe the trace it left."""
    app = apps.create_app(config)
    template = make_environ(route)
    serve_once(app, template)  # first request of an app does one-time work
    serve_once(app, template)
    buffer = apps.trace_buffer(app)
    assert buffer is not None
    trace = buffer.latest(1)[0]
    events = trace.events
    return {
        "config": config,
        "route": route,
        "events": len(events),
        "names": [e.name for e in events],
        "hooks": trace.hooks(),
        "state": trace.state,
        "dropped_events": trace.dropped_events,
        "approx_size": trace.approx_size,
    }


def check_recording(config: str, n: int = 1000) -> float | None:
    """Requests recorded by the tracer (traces, or OTel spans) per request
    (``n`` large enough to show a sample rate to two decimals).
    """
    app = apps.create_app(config)
    template = make_environ("/hello")
    for _ in range(n):
        serve_once(app, template)
    recorded = apps.recorded_count(app)
    return None if recorded is None else recorded / n


# -- memory ------------------------------------------------------------------


def _retained(config: str, n: int, warmup: int, route: str) -> tuple[int, Flask]:
    """Bytes still allocated after ``n`` requests (after a warm-up)."""
    options: dict[str, Any] = {}
    if config in TRACED_CONFIGS:
        options = {"max_traces": n + warmup, "max_bytes": 1 << 40}
    app = apps.create_app(config, **options)
    template = make_environ(route)
    for _ in range(warmup):
        serve_once(app, template)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(n):
            serve_once(app, template)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return after - before, app


def measure_memory(config: str, n: int, route: str = "/hello") -> dict[str, Any]:
    """Retained bytes per trace, net of the same loop on ``bare``."""
    warmup = 200
    control, _ = _retained("bare", n, warmup, route)
    traced, app = _retained(config, n, warmup, route)
    buffer = apps.trace_buffer(app)
    assert buffer is not None
    held = len(buffer)
    per_trace = (traced - control) / n
    # Reading a summary materialises the trace's id; measure that too.
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for trace in buffer.latest():
            trace.summary()
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    accounted = buffer.bytes / held if held else 0.0
    return {
        "config": config,
        "route": route,
        "traces": n,
        "held": held,
        "bytes_per_trace": per_trace,
        "bytes_per_trace_after_summary": per_trace + (after - before) / held,
        "control_bytes": control,
        "accounted_bytes_per_trace": accounted,
    }


def check_byte_cap(config: str, cap: int = 16 * 1024, n: int = 400) -> dict[str, Any]:
    """Serve ``n`` requests over every route under a small ``max_bytes`` cap;
    the buffer's byte count must never exceed it.
    """
    app = apps.create_app(config, max_traces=1000, max_bytes=cap)
    buffer = apps.trace_buffer(app)
    assert buffer is not None
    templates = [make_environ(route) for route in apps.ROUTES]
    worst = 0
    worst_sum = 0
    for i in range(n):
        serve_once(app, templates[i % len(templates)])
        worst = max(worst, buffer.bytes)
        worst_sum = max(worst_sum, sum(t.approx_size for t in buffer.latest() if t.finished))
    return {
        "config": config,
        "max_bytes": cap,
        "requests": n,
        "max_accounted": worst,
        "max_sum_of_sizes": worst_sum,
        "held": len(buffer),
        "dropped_bytes": buffer.dropped_bytes,
        "ok": worst <= cap and worst_sum <= cap and buffer.dropped_bytes > 0,
    }


# -- reading -----------------------------------------------------------------


def _timed_ms(func: Callable[[], object], repeats: int) -> dict[str, float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        func()
        times.append((time.perf_counter_ns() - t0) / 1e6)
    return {"first_ms": times[0], **{f"{k}_ms": v for k, v in spread(times).items() if k != "n"}}


def list_payload(buffer: TraceBuffer, n: int) -> str:
    """The ``/_trace`` list payload of the newest ``n`` traces, as JSON."""
    return json.dumps(
        {
            "schema": 1,
            "cursor": buffer.cursor,
            "dropped": buffer.dropped,
            "traces": [t.summary() for t in buffer.latest(n)],
        }
    )


def measure_read(config: str, n: int = 1000, repeats: int = 30) -> dict[str, Any]:
    """Cost of the ``/_trace`` list payload of the newest ``n`` traces. The
    first read also makes the traces' ids (they are made lazily).
    """
    app = apps.create_app(config, max_traces=max(n, 1000))
    found = apps.trace_buffer(app)
    assert found is not None
    buffer: TraceBuffer = found
    template = make_environ("/hello")
    for _ in range(n):
        serve_once(app, template)
    timing = _timed_ms(lambda: list_payload(buffer, n), repeats)
    out: dict[str, Any] = {
        "config": config,
        "traces": n,
        "payload_bytes": len(list_payload(buffer, n).encode()),
        "summary_json": timing,
    }
    out["endpoint"] = _measure_endpoint(config, n, repeats)
    return out


def _measure_endpoint(config: str, n: int, repeats: int) -> dict[str, Any]:
    """GET ``/_trace?limit=n`` through the real endpoint."""
    from werkzeug.test import Client

    try:
        app = apps.create_app(config, max_traces=max(n, 1000), endpoint=True)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    template = make_environ("/hello")
    for _ in range(n):
        serve_once(app, template)
    client = Client(app, use_cookies=False)
    url = f"/_trace?limit={n}"
    env = {"REMOTE_ADDR": "127.0.0.1"}

    def get() -> tuple[int, bytes]:
        response = client.get(url, environ_base=env)
        try:
            return response.status_code, response.get_data()
        finally:
            response.close()

    status, data = get()
    result: dict[str, Any] = {"status": status, "payload_bytes": len(data)}
    if status == 200:
        try:
            result["traces"] = len(json.loads(data)["traces"])
        except (ValueError, KeyError, TypeError) as exc:
            result["error"] = f"bad JSON: {exc}"
        result.update(_timed_ms(get, repeats))
    return result


# -- profiling ---------------------------------------------------------------


def profile(config: str, route: str, requests: int, top: int = 35) -> str:
    """cProfile ``requests`` requests of ``route``; top functions by tottime,
    then wsgitrace's own functions.
    """
    app = apps.create_app(config)
    template = make_environ(route)
    timed_block(app, template, 2000, gc_off=False)
    profiler = cProfile.Profile()
    profiler.enable()
    timed_block(app, template, requests, gc_off=False)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    out.write("\n--- wsgitrace functions (by tottime) ---\n")
    stats.sort_stats("tottime").print_stats(r"wsgitrace[/\\]", top)
    out.write("\n--- wsgitrace functions (by cumtime) ---\n")
    stats.sort_stats("cumulative").print_stats(r"wsgitrace[/\\]", top)
    return out.getvalue()


# -- budgets and report -------------------------------------------------------


def evaluate_budgets(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Each budget point of issue #6: what was measured, the limit, pass/fail."""
    latency = data["latency"]
    hello = latency.get("/hello", {})
    ft_there = "flasktrace" in hello
    budgets: list[dict[str, Any]] = []

    contended = data.get("contended_rounds", 0)
    noisy = contended * 3 > data["params"]["rounds"]

    def add(name: str, measured: str, limit: str, ok: bool | None, *, timed: bool = False) -> None:
        status = f"inconclusive ({contended} contended rounds)" if timed and noisy else None
        budgets.append(
            {"budget": name, "measured": measured, "limit": limit, "ok": ok, "status": status}
        )

    if ft_there:
        ratio = hello["flasktrace"]["ratio_to_bare"]
        add(
            "FlaskTrace /hello time vs bare",
            fmt_spread(ratio, 3, "×"),
            f"≤ {BUDGET_HELLO_RATIO}×",
            ratio["median"] <= BUDGET_HELLO_RATIO,
            timed=True,
        )
    else:
        add("FlaskTrace /hello time vs bare", "–", f"≤ {BUDGET_HELLO_RATIO}×", None)
    if ft_there and "flasktrace_vs_otel_added" in hello:
        frac = hello["flasktrace_vs_otel_added"]
        add(
            "FlaskTrace added time / OTel added time (/hello)",
            fmt_spread(frac, 3),
            f"≤ {BUDGET_OTEL_FRACTION}",
            frac["median"] <= BUDGET_OTEL_FRACTION,
            timed=True,
        )
    else:
        add("FlaskTrace added time / OTel added time (/hello)", "–", "≤ 0.2", None)
    if ft_there and "flasktrace_vs_naive" in hello:
        versus = hello["flasktrace_vs_naive"]
        add(
            "FlaskTrace /hello time vs the naive recorder",
            fmt_spread(versus, 3, "×"),
            "< 1×",
            versus["median"] < 1,
            timed=True,
        )
    else:
        add("FlaskTrace /hello time vs the naive recorder", "–", "< 1×", None)
    events = data["events"].get("flasktrace")
    add(
        "Events in a FlaskTrace /hello trace",
        str(events["events"]) if events else "–",
        f"≥ {BUDGET_MIN_EVENTS}",
        None if not events else events["events"] >= BUDGET_MIN_EVENTS,
    )
    memory = data["memory"].get("flasktrace")
    add(
        "Retained memory per FlaskTrace /hello trace",
        f"{memory['bytes_per_trace_after_summary']:.0f} B" if memory else "–",
        f"≤ {BUDGET_BYTES_PER_TRACE} B",
        None if not memory else memory["bytes_per_trace_after_summary"] <= BUDGET_BYTES_PER_TRACE,
    )
    caps = [c for c in data["byte_cap"].values()]
    add(
        "Buffer byte accounting ≤ max_bytes (small cap)",
        ", ".join(f"{c['config']}: max {c['max_accounted']} B" for c in caps) or "–",
        "≤ " + (f"{caps[0]['max_bytes']} B" if caps else "cap"),
        None if "flasktrace" not in data["byte_cap"] else all(c["ok"] for c in caps),
    )
    read = data["read"].get("flasktrace")
    if read:
        worst = read["summary_json"]["median_ms"]
        measured = f"summaries+json.dumps {worst:.1f} ms"
        endpoint = read.get("endpoint")
        if endpoint and "median_ms" in endpoint:
            worst = max(worst, endpoint["median_ms"])
            measured += f"; GET /_trace?limit=1000 {endpoint['median_ms']:.1f} ms"
        add(
            "Read newest 1,000 traces as JSON",
            measured,
            f"≤ {BUDGET_READ_MS:.0f} ms",
            worst <= BUDGET_READ_MS,
        )
    else:
        add("Read newest 1,000 traces as JSON", "–", f"≤ {BUDGET_READ_MS:.0f} ms", None)
    return budgets


def render(data: dict[str, Any], *, markdown: bool) -> str:
    """The report: latency tables, budgets, memory and read details."""
    parts: list[str] = []
    params = data["params"]
    gc_state = "off during timed loops" if params["gc_off"] else "on"
    if markdown:
        parts.append(machine_markdown(data["machine"]))
    else:
        info = data["machine"]
        parts.append(
            f"{info['cpu']} x{info['cpus']} | {info['platform']} | {info['python']} |"
            f" Flask {info['flask']} | {info['date']}"
        )
    parts.append(
        f"In-process, {params['rounds']} rounds × {params['requests']} requests per"
        f" configuration and route, order rotated per round; gc {gc_state}."
        " Values: median (min–max) over rounds; ratios and added µs are per round"
        " against bare Flask of the same round. Rounds during which other processes used"
        f" more than {CONTENTION_THRESHOLD} CPU are repeated (up to {params.get('retries', 0)}"
        f" times); contended rounds kept: {data.get('contended_rounds', 0)}."
    )
    rows = []
    for route, per_config in data["latency"].items():
        for config in data["configs"]:
            if config not in per_config:
                continue
            entry = per_config[config]
            rows.append(
                [
                    route,
                    config,
                    fmt_spread(entry["us_per_request"], 1),
                    fmt_spread(entry["ratio_to_bare"], 3, "×"),
                    "–" if config == "bare" else fmt_spread(entry["added_us"], 1),
                ]
            )
        if "flasktrace_vs_naive" in per_config:
            rows.append(
                [
                    route,
                    "flasktrace ÷ naive",
                    "",
                    fmt_spread(per_config["flasktrace_vs_naive"], 3, "×"),
                    "",
                ]
            )
        if "flasktrace_vs_otel_added" in per_config:
            rows.append(
                [
                    route,
                    "flasktrace added ÷ otel added",
                    "",
                    fmt_spread(per_config["flasktrace_vs_otel_added"], 3),
                    "",
                ]
            )
    parts.append(
        table(["route", "config", "µs/request", "× bare", "added µs"], rows, markdown=markdown)
    )
    parts.append(
        table(
            ["budget", "measured", "limit", "result"],
            [
                [b["budget"], b["measured"], b["limit"], b.get("status") or verdict(b["ok"])]
                for b in data["budgets"]
            ],
            markdown=markdown,
        )
    )
    detail = []
    for config in TRACED_CONFIGS:
        events = data["events"].get(config)
        memory = data["memory"].get(config)
        read = data["read"].get(config)
        if not events:
            continue
        endpoint = read.get("endpoint") if read else None
        detail.append(
            [
                config,
                str(events["events"]),
                f"{memory['bytes_per_trace']:.0f} / {memory['bytes_per_trace_after_summary']:.0f}"
                if memory
                else "–",
                f"{memory['accounted_bytes_per_trace']:.0f}" if memory else "–",
                (
                    f"{read['summary_json']['median_ms']:.1f} "
                    f"({read['summary_json']['min_ms']:.1f}–{read['summary_json']['max_ms']:.1f})"
                    f", first {read['summary_json']['first_ms']:.1f}"
                )
                if read
                else "–",
                (
                    f"{endpoint['median_ms']:.1f} ({endpoint['min_ms']:.1f}–"
                    f"{endpoint['max_ms']:.1f})"
                    if endpoint and "median_ms" in endpoint
                    else (
                        str(endpoint.get("error") or endpoint.get("status")) if endpoint else "n/a"
                    )
                ),
            ]
        )
    if detail:
        parts.append(
            table(
                [
                    "config",
                    "events (/hello)",
                    "retained B/trace (write / after summary)",
                    "accounted B/trace",
                    "1,000 summaries + json.dumps ms",
                    "GET /_trace?limit=1000 ms",
                ],
                detail,
                markdown=markdown,
            )
        )
    recorded = data.get("recorded_per_request", {})
    if recorded:
        sampled = (
            f"; sampled: sample={params['sample']}"
            if "sampled" in recorded and "sample" in params
            else ""
        )
        parts.append(
            "Recorded per /hello request (wsgitrace traces / naive requests / OTel"
            f" spans{sampled}): "
            + ", ".join(f"{c} {v:.2f}" for c, v in recorded.items() if v is not None)
        )
    flask_events = data["events"].get("flasktrace")
    if flask_events:
        parts.append("FlaskTrace /hello events: " + ", ".join(flask_events["names"]))
    return "\n\n".join(parts)


def _config_list(text: str) -> list[str]:
    """``--configs``: the named configurations in report order, ``bare`` included."""
    try:
        return apps.select_configs(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/inprocess.py",
        description="In-process benchmark of wsgitrace against bare Flask and OpenTelemetry.",
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=15, help="rounds (default 15)")
    parser.add_argument(
        "--requests", type=int, default=2000, help="requests per timed block (default 2000)"
    )
    parser.add_argument(
        "--warmup", type=int, default=1500, help="warm-up requests per config and route"
    )
    parser.add_argument("--routes", default=",".join(apps.ROUTES), help="comma-separated")
    parser.add_argument(
        "--configs",
        type=_config_list,
        default=",".join(apps.CONFIGS),
        help=f"comma-separated, from {','.join(apps.CONFIGS)} (default: all; bare always runs)",
    )
    parser.add_argument("--gc-off", action="store_true", help="disable gc in timed loops")
    parser.add_argument("--cpu", type=int, default=None, help="pin this process to one CPU")
    parser.add_argument("--memory-traces", type=int, default=2000, help="traces for tracemalloc")
    parser.add_argument("--retries", type=int, default=2, help="re-runs of a contended round (2)")
    parser.add_argument(
        "--quiet-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for other processes to go quiet before each round (60)",
    )
    parser.add_argument("--json", metavar="PATH", help="write every measurement as JSON")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument(
        "--write-readme",
        metavar="README",
        help=f"replace the {README_START} … {README_END} block of README with the Markdown",
    )
    parser.add_argument("--profile", metavar="CONFIG", help="cProfile one config and exit")
    parser.add_argument("--profile-route", default="/hello")
    parser.add_argument("--profile-requests", type=int, default=20000)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    if args.profile:
        print(profile(args.profile, args.profile_route, args.profile_requests))
        return 0
    configs = args.configs
    routes = [r for r in args.routes.split(",") if r]
    built = build_apps(configs)
    check_responses(built, routes)
    other_cpus: list[float | None] = []
    raw = measure_latency(
        built,
        routes,
        rounds=args.rounds,
        requests=args.requests,
        warmup=args.warmup,
        gc_off=args.gc_off,
        retries=args.retries,
        quiet_timeout=args.quiet_timeout,
        other_cpus=other_cpus,
    )
    traced = [c for c in TRACED_CONFIGS if c in configs]
    print("events, memory, byte cap, read cost ...", file=sys.stderr)
    data: dict[str, Any] = {
        "machine": machine_info(),
        "params": {
            "rounds": args.rounds,
            "requests": args.requests,
            "warmup": args.warmup,
            "gc_off": args.gc_off,
            "cpu": args.cpu,
            "retries": args.retries,
            "sample": apps.SAMPLE_RATE,
        },
        "other_cpus": other_cpus,
        "contended_rounds": sum(
            1 for v in other_cpus if v is not None and v > CONTENTION_THRESHOLD
        ),
        "configs": configs,
        "latency": summarize_latency(raw),
        "recorded_per_request": {c: check_recording(c) for c in configs if c != "bare"},
        "events": {c: check_events(c) for c in traced},
        "memory": {c: measure_memory(c, args.memory_traces) for c in traced},
        "byte_cap": {c: check_byte_cap(c) for c in traced},
        "read": {c: measure_read(c) for c in traced},
    }
    data["budgets"] = evaluate_budgets(data)
    return emit(
        data,
        render,
        markdown=args.markdown,
        json_path=args.json,
        readme_path=args.write_readme,
        section="inprocess",
        title="In-process",
    )


if __name__ == "__main__":
    sys.exit(main())
