"""Served benchmark: requests/second under gunicorn, loaded with ``wrk``.

Usage::

    python bench/serve.py [--duration S] [--connections C] [--rounds N]
                          [--warmup S] [--path /hello] [--configs bare,...]
                          [--retries N] [--quiet-timeout S]
                          [--json out.json] [--markdown] [--write-readme README.md]

Defaults: 10 s per run after 2 s of warm-up, 16 connections (a sync worker
serves one at a time; the others wait in the backlog, so it never idles),
3 rounds. A run during which other processes used more than a quarter of a
CPU is repeated (``--retries``, default 2) after waiting for a quiet machine
(``--quiet-timeout``); a budget measured on contended runs is "inconclusive".
After each run the app's ``/_bench`` route reports how many requests the
tracer recorded, so a configuration cannot pass by tracing nothing: the
"traced/req" column is about 1 for full tracing and about the sample rate
(0.1) for ``sampled``.

Each configuration of ``bench/apps.py`` (``bare``, ``middleware``,
``flasktrace``, ``sampled``, ``naive``, ``otel``) is served in turn by gunicorn (one
sync worker) on a free port of 127.0.0.1 and loaded by ``wrk`` for
``--duration`` seconds after a short unrecorded warm-up; rounds repeat with
the order rotated. With two or more CPUs the server is pinned to CPU 0 and
wrk to CPU 1 (``taskset``).

The report gives req/s and the ratio to ``bare`` of the same round, as
median (min–max) over rounds. Budget (issue #6): ``flasktrace`` ≥ 0.92× bare.
Exit status 1 when the budget fails, 2 when wrk or gunicorn is missing.

wrk is a system package: ``apt-get install wrk`` (Debian/Ubuntu) or
``brew install wrk`` (macOS).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import apps
from _report import (
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

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)

#: Budget of issue #6: full FlaskTrace throughput relative to bare Flask.
BUDGET_RPS_RATIO = 0.92


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _pin(cpu: int | None) -> list[str]:
    if cpu is None or shutil.which("taskset") is None:
        return []
    return ["taskset", "-c", str(cpu)]


def _cpus() -> tuple[int | None, int | None]:
    """(server CPU, load generator CPU), or ``None`` where not pinned."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if count is None or count < 2:
        return None, None
    allowed = sorted(os.sched_getaffinity(0))
    return allowed[0], allowed[1]


class Server:
    """One gunicorn master with a single sync worker serving ``config``."""

    def __init__(self, config: str, port: int, cpu: int | None) -> None:
        self.config = config
        self.port = port
        env = {k: v for k, v in os.environ.items() if not k.startswith("WSGITRACE_")}
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (ROOT, BENCH_DIR, env.get("PYTHONPATH", "")) if p
        )
        command = [
            *_pin(cpu),
            sys.executable,
            "-m",
            "gunicorn",
            "--workers",
            "1",
            "--worker-class",
            "sync",
            "--bind",
            f"127.0.0.1:{port}",
            "--log-level",
            "warning",
            "--chdir",
            BENCH_DIR,
            f'apps:create_app("{config}")',
        ]
        self.process = subprocess.Popen(command, env=env, cwd=BENCH_DIR)

    def wait_ready(self, path: str, timeout: float = 20.0) -> None:
        """Block until ``path`` answers 200."""
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.port}{path}"
        while True:
            if self.process.poll() is not None:
                msg = f"gunicorn for {self.config} exited with {self.process.returncode}"
                raise RuntimeError(msg)
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                msg = f"gunicorn for {self.config} did not answer {url} in {timeout} s"
                raise RuntimeError(msg)
            time.sleep(0.1)

    def pids(self) -> list[int]:
        """The gunicorn master and its workers."""
        pids = [self.process.pid]
        try:
            with open(
                f"/proc/{self.process.pid}/task/{self.process.pid}/children", encoding="ascii"
            ) as f:
                pids.extend(int(p) for p in f.read().split())
        except OSError:
            pass
        return pids

    def recorded(self) -> tuple[int | None, bool]:
        """Requests the server's tracer had recorded before this ``/_bench``
        request, and whether it records this one too.
        """
        url = f"http://127.0.0.1:{self.port}/_bench"
        with urllib.request.urlopen(url, timeout=5) as response:
            answer = json.load(response)
        value = answer["recorded"]
        return (None if value is None else int(value)), bool(answer.get("recording_this"))

    def stop(self) -> None:
        """Stop gunicorn (graceful, then forced) and reap it."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not match:
        return float("nan")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str) -> dict[str, Any]:
    """Requests/s, latency percentiles and errors from wrk's ``--latency`` output."""
    result: dict[str, Any] = {}
    match = re.search(r"Requests/sec:\s+([\d.]+)", output)
    result["rps"] = float(match.group(1)) if match else float("nan")
    match = re.search(r"(\d+) requests in", output)
    result["requests"] = int(match.group(1)) if match else 0
    for pct in ("50", "90", "99"):
        match = re.search(rf"^\s+{pct}%\s+(\S+)", output, re.MULTILINE)
        result[f"p{pct}_ms"] = _ms(match.group(1)) if match else float("nan")
    match = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    result["non_2xx"] = int(match.group(1)) if match else 0
    match = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    result["socket_errors"] = sum(int(g) for g in match.groups()) if match else 0
    return result


def run_wrk(
    port: int, path: str, duration: float, connections: int, cpu: int | None
) -> dict[str, Any]:
    """Load ``path`` for ``duration`` seconds with one wrk thread."""
    command = [
        *_pin(cpu),
        "wrk",
        "--threads",
        "1",
        "--connections",
        str(connections),
        "--duration",
        f"{max(1, round(duration))}s",
        "--timeout",
        "5s",
        "--latency",
        f"http://127.0.0.1:{port}{path}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        msg = f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}"
        raise RuntimeError(msg)
    result = parse_wrk(done.stdout)
    result["raw"] = done.stdout
    return result


def measure(
    configs: list[str],
    paths: list[str],
    *,
    rounds: int,
    duration: float,
    warmup: float,
    connections: int,
    retries: int = 2,
    quiet_timeout: float = 120.0,
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """One wrk run per round, path and configuration (order rotated). A run
    during which other processes used more than a quarter of a CPU is
    repeated (up to ``retries`` times) after waiting for a quiet machine.
    """
    server_cpu, load_cpu = _cpus()
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        path: {config: [] for config in configs} for path in paths
    }
    for rnd in range(rounds):
        shift = rnd % len(configs)
        order = configs[shift:] + configs[:shift]
        for config in order:
            port = free_port()
            server = Server(config, port, server_cpu)
            try:
                server.wait_ready(paths[0])
                for path in paths:
                    for attempt in range(retries + 1):
                        wait_quiet(quiet_timeout)
                        if warmup > 0:
                            run_wrk(port, path, warmup, connections, load_cpu)
                        before, bench_recorded = server.recorded()
                        with CpuMonitor(server.pids()) as monitor:
                            result = run_wrk(port, path, duration, connections, load_cpu)
                        after, _ = server.recorded()
                        # The second /_bench request counts the first one
                        # (if its tracer recorded it: a sampler may not).
                        result["recorded"] = (
                            None
                            if after is None or before is None
                            else after - before - int(bench_recorded)
                        )
                        result["other_cpus"] = monitor.other_cpus
                        result["contended"] = monitor.contended
                        print(
                            f"round {rnd + 1}/{rounds} {config:10s} {path}: "
                            f"{result['rps']:.0f} req/s, p50 {result['p50_ms']:.2f} ms,"
                            f" errors {result['socket_errors']}, non-2xx {result['non_2xx']},"
                            f" other CPU {_fmt_cpu(monitor.other_cpus)}"
                            + (" (contended)" if monitor.contended else ""),
                            file=sys.stderr,
                        )
                        if not monitor.contended or attempt == retries:
                            break
                    runs[path][config].append(result)
            finally:
                server.stop()
    return runs


def _fmt_cpu(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def summarize(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Medians and per-round ratios to bare."""
    out: dict[str, Any] = {}
    for path, per_config in runs.items():
        bare = [r["rps"] for r in per_config["bare"]]
        out[path] = {}
        for config, results in per_config.items():
            rps = [r["rps"] for r in results]
            out[path][config] = {
                "rps": spread(rps),
                "ratio_to_bare": spread([v / b for v, b in zip(rps, bare, strict=True)]),
                "p50_ms": spread([r["p50_ms"] for r in results]),
                "p99_ms": spread([r["p99_ms"] for r in results]),
                "errors": sum(r["socket_errors"] + r["non_2xx"] for r in results),
                "recorded": _recorded_share(results),
                "contended_runs": sum(1 for r in results if r.get("contended")),
                "other_cpus_max": max(
                    (r["other_cpus"] for r in results if r.get("other_cpus") is not None),
                    default=None,
                ),
                "rounds": rps,
            }
    return out


def _recorded_share(results: list[dict[str, Any]]) -> float | None:
    """Requests the tracer recorded per request wrk counted: about 1 (a
    little more: wrk does not count the requests still in flight when it
    stops), or about the sample rate for ``sampled``.
    """
    if not results or results[0].get("recorded") is None:
        return None
    requests = sum(r["requests"] for r in results)
    return sum(r["recorded"] for r in results) / requests if requests else None


def render(data: dict[str, Any], *, markdown: bool) -> str:
    """Throughput table and budget."""
    params = data["params"]
    info = data["machine"]
    parts = [
        machine_markdown(info)
        if markdown
        else f"{info['cpu']} x{info['cpus']} | {info['python']} | Flask {info['flask']}"
        f" | gunicorn {info['gunicorn']} | {info['date']}",
        f"gunicorn, 1 sync worker{params['pinning']}; wrk, 1 thread, {params['connections']}"
        f" connections, {params['duration']:.0f} s per run after {params['warmup']:.0f} s"
        f" warm-up, {params['rounds']} rounds, order rotated. Values: median (min–max) over"
        ' rounds; ratio per round against bare of the same round. "other CPU": CPUs used'
        " by other processes during a run; a run above 0.25 is repeated (up to"
        f" {params.get('retries', 0)} times) after waiting for a quiet machine.",
    ]
    rows = []
    for path, per_config in data["summary"].items():
        for config in data["configs"]:
            entry = per_config[config]
            rows.append(
                [
                    path,
                    config,
                    fmt_spread(entry["rps"], 0),
                    fmt_spread(entry["ratio_to_bare"], 3, "×"),
                    fmt_spread(entry["p50_ms"], 2),
                    fmt_spread(entry["p99_ms"], 2),
                    str(entry["errors"]),
                    "–" if entry["recorded"] is None else f"{entry['recorded']:.3f}",
                    _fmt_cpu(entry["other_cpus_max"])
                    + (
                        f" ({entry['contended_runs']} contended)" if entry["contended_runs"] else ""
                    ),
                ]
            )
    parts.append(
        table(
            [
                "path",
                "config",
                "req/s",
                "× bare",
                "p50 ms",
                "p99 ms",
                "errors",
                "traced/req",
                "other CPU (max)",
            ],
            rows,
            markdown=markdown,
        )
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
    return "\n\n".join(parts)


def evaluate_budgets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """FlaskTrace throughput ≥ 0.92× bare, per path."""
    budgets = []
    for path, per_config in summary.items():
        entry = per_config.get("flasktrace")
        name = f"FlaskTrace req/s vs bare ({path})"
        if entry is None:
            budgets.append(
                {"budget": name, "measured": "–", "limit": f"≥ {BUDGET_RPS_RATIO}×", "ok": None}
            )
            continue
        ratio = entry["ratio_to_bare"]
        contended = entry["contended_runs"] + per_config["bare"]["contended_runs"]
        budgets.append(
            {
                "budget": name,
                "measured": fmt_spread(ratio, 3, "×"),
                "limit": f"≥ {BUDGET_RPS_RATIO}×",
                "ok": ratio["median"] >= BUDGET_RPS_RATIO,
                "status": f"inconclusive ({contended} contended runs)" if contended else None,
            }
        )
    return budgets


def _config_list(text: str) -> list[str]:
    """``--configs``: the named configurations in report order, ``bare`` included."""
    try:
        return apps.select_configs(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/serve.py",
        description="Requests/second of wsgitrace under gunicorn, loaded with wrk.",
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run (10)")
    parser.add_argument(
        "--connections", type=int, default=16, help="wrk connections (16: the worker never idles)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds (3)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unrecorded warm-up s (2)")
    parser.add_argument(
        "--path", action="append", dest="paths", help="path to load (repeatable; /hello)"
    )
    parser.add_argument(
        "--configs",
        type=_config_list,
        default=",".join(apps.CONFIGS),
        help=f"comma-separated, from {','.join(apps.CONFIGS)} (default: all; bare always runs)",
    )
    parser.add_argument(
        "--retries", type=int, default=2, help="re-runs of a contended measurement (2)"
    )
    parser.add_argument(
        "--quiet-timeout",
        type=float,
        default=120.0,
        help="seconds to wait for other processes to go quiet before each run (120)",
    )
    parser.add_argument("--json", metavar="PATH", help="write every measurement as JSON")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument(
        "--write-readme",
        metavar="README",
        help=f"replace the {README_START} … {README_END} block of README with the Markdown",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print(
            "serve.py needs the wrk load generator, which is not on PATH.\n"
            "Install it with:  apt-get install wrk   (Debian/Ubuntu; sudo if needed)\n"
            "             or:  brew install wrk      (macOS)",
            file=sys.stderr,
        )
        return 2
    if importlib.util.find_spec("gunicorn") is None:
        print("serve.py needs gunicorn: pip install gunicorn", file=sys.stderr)
        return 2
    configs = args.configs
    paths = args.paths or ["/hello"]
    server_cpu, load_cpu = _cpus()
    runs = measure(
        configs,
        paths,
        rounds=args.rounds,
        duration=args.duration,
        warmup=args.warmup,
        connections=args.connections,
        retries=args.retries,
        quiet_timeout=args.quiet_timeout,
    )
    summary = summarize(runs)
    pinning = (
        f", pinned to CPU {server_cpu} (wrk on CPU {load_cpu})"
        if server_cpu is not None and shutil.which("taskset")
        else ", not pinned"
    )
    data: dict[str, Any] = {
        "machine": machine_info(),
        "params": {
            "duration": args.duration,
            "connections": args.connections,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "pinning": pinning,
            "retries": args.retries,
        },
        "configs": configs,
        "summary": summary,
        "runs": {
            path: {
                c: [{k: v for k, v in r.items() if k != "raw"} for r in rs] for c, rs in pc.items()
            }
            for path, pc in runs.items()
        },
    }
    data["budgets"] = evaluate_budgets(summary)
    return emit(
        data,
        render,
        markdown=args.markdown,
        json_path=args.json,
        readme_path=args.write_readme,
        section="serve",
        title="Served (gunicorn + wrk)",
    )


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
