"""Smoke test of the benchmark's documented commands, run for real in a
subprocess with tiny parameters: ``python bench/inprocess.py --json OUT``
measures every configuration and writes the report's data, and
``python bench/update_readme.py --inprocess OUT README`` writes its tables
into the README block. Nothing here asserts a timing; ``bench/serve.py``
needs wrk and is left out.

``otel`` is left out too: OpenTelemetry's Flask instrumentation is in the
``bench`` extra, not in ``test``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 120
CONFIGS = ["bare", "middleware", "flasktrace", "sampled", "naive"]
BUDGETS = [
    "FlaskTrace /hello time vs bare",
    "FlaskTrace added time / OTel added time (/hello)",
    "FlaskTrace /hello time vs the naive recorder",
    "Events in a FlaskTrace /hello trace",
    "Retained memory per FlaskTrace /hello trace",
    "Buffer byte accounting ≤ max_bytes (small cap)",
    "Read newest 1,000 traces as JSON",
]


def run_script(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python bench/<script> ARGS`` from the project root, as documented."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSGITRACE_")}
    return subprocess.run(
        [sys.executable, f"bench/{script}", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def budget_exit_status(data: dict[str, Any]) -> int:
    """The exit status inprocess.py documents: 1 when a budget conclusively fails."""
    return int(any(b["ok"] is False and not b.get("status") for b in data["budgets"]))


@dataclass
class Run:
    """One finished ``inprocess.py`` run: its JSON file, that JSON, the process."""

    out: Path
    data: dict[str, Any]
    done: subprocess.CompletedProcess[str]


@pytest.fixture(name="inprocess", scope="module")
def fixture_inprocess(tmp_path_factory: pytest.TempPathFactory) -> Run:
    out = tmp_path_factory.mktemp("bench") / "inprocess.json"
    done = run_script(
        "inprocess.py",
        "--rounds",
        "1",
        "--requests",
        "30",
        "--warmup",
        "10",
        "--routes",
        "/hello",
        "--configs",
        ",".join(CONFIGS),
        "--memory-traces",
        "50",
        "--retries",
        "0",
        "--quiet-timeout",
        "0",
        "--json",
        str(out),
    )
    assert out.exists(), f"no JSON written (exit {done.returncode}):\n{done.stderr}"
    return Run(out, json.loads(out.read_text(encoding="utf-8")), done)


def test_inprocess_exit_status_follows_the_budgets(inprocess: Run) -> None:
    """The run ends normally, with 1 only when a budget conclusively fails."""
    data, done = inprocess.data, inprocess.done
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == budget_exit_status(data), done.stderr
    assert "In-process, 1 rounds × 30 requests" in done.stdout


def test_inprocess_times_every_configuration(inprocess: Run) -> None:
    """Every configuration asked for, sampled included, has its /hello timings."""
    data = inprocess.data
    assert data["configs"] == CONFIGS
    hello = data["latency"]["/hello"]
    for config in CONFIGS:
        entry = hello[config]
        assert len(entry["rounds"]) == 1, config
        assert entry["us_per_request"]["median"] > 0, config
        assert entry["ratio_to_bare"]["n"] == 1, config
        assert entry["added_us"]["n"] == 1, config
    assert "flasktrace_vs_otel_added" not in hello
    versus = hello["flasktrace_vs_naive"]
    assert versus["n"] == 1
    flasktrace, naive = hello["flasktrace"]["rounds"][0], hello["naive"]["rounds"][0]
    assert versus["median"] == pytest.approx(flasktrace / naive)


def test_inprocess_records_every_request_or_the_sampled_share(inprocess: Run) -> None:
    """Full tracing records each request; sampled (rate 0.1) a share of them."""
    data = inprocess.data
    recorded = data["recorded_per_request"]
    assert list(recorded) == ["middleware", "flasktrace", "sampled", "naive"]
    assert recorded["middleware"] == recorded["flasktrace"] == recorded["naive"] == 1.0
    # 1,000 requests at 0.1: outside (0, 0.5) has a chance below 1e-40.
    assert 0 < recorded["sampled"] < 0.5
    assert data["params"]["sample"] == 0.1


def test_inprocess_describes_full_traces(inprocess: Run) -> None:
    """A flasktrace /hello trace has its 17 events; memory, byte cap and read
    cost are measured for middleware and flasktrace only.
    """
    data = inprocess.data
    events = data["events"]["flasktrace"]
    assert events["events"] == 17
    assert events["names"][:2] == ["request", "app"]
    assert data["events"]["middleware"]["events"] < events["events"]
    for measurement in ("events", "memory", "byte_cap", "read"):
        assert set(data[measurement]) == {"middleware", "flasktrace"}, measurement
    assert all(cap["ok"] for cap in data["byte_cap"].values())
    assert data["read"]["flasktrace"]["endpoint"]["status"] == 200
    assert data["read"]["flasktrace"]["endpoint"]["traces"] == 1000


def test_inprocess_evaluates_every_budget(inprocess: Run) -> None:
    """Each budget of issue #6 is evaluated; only the one needing otel is pending."""
    data = inprocess.data
    budgets = {b["budget"]: b for b in data["budgets"]}
    assert list(budgets) == BUDGETS
    otel = budgets.pop("FlaskTrace added time / OTel added time (/hello)")
    assert otel["ok"] is None
    for name, budget in budgets.items():
        assert isinstance(budget["ok"], bool), name
        assert budget["measured"] != "–", name
    assert budgets["Events in a FlaskTrace /hello trace"] == {
        "budget": "Events in a FlaskTrace /hello trace",
        "measured": "17",
        "limit": "≥ 17",
        "ok": True,
        "status": None,
    }


def test_update_readme_writes_the_tables_between_the_markers(
    inprocess: Run,
    tmp_path: Path,
) -> None:
    """update_readme.py puts the in-process report inside the bench block only."""
    out, data = inprocess.out, inprocess.data
    readme = tmp_path / "README.md"
    before = "# Project\n\nIntro.\n\n"
    after = "\n\n## Development\n\nOutro.\n"
    readme.write_text(before + "<!-- bench:start -->\n<!-- bench:end -->" + after, encoding="utf-8")
    done = run_script("update_readme.py", "--inprocess", str(out), str(readme))
    assert done.returncode == 0, done.stderr
    text = readme.read_text(encoding="utf-8")
    assert text.startswith(before + "<!-- bench:start -->\n")
    assert text.endswith("<!-- bench:end -->" + after)
    block = text[len(before) : -len(after)]
    lines = block.splitlines()
    assert lines[1:3] == ["<!-- bench:inprocess:start -->", "#### In-process"]
    assert lines[-2:] == ["<!-- bench:inprocess:end -->", "<!-- bench:end -->"]
    assert "| route | config | µs/request | × bare | added µs |" in lines
    assert "| budget | measured | limit | result |" in lines
    rows = [line.split(" | ")[1] for line in lines if line.startswith("| /hello | ")]
    assert rows == [*CONFIGS, "flasktrace ÷ naive"]
    sampled = next(line for line in lines if line.startswith("| /hello | sampled | "))
    assert sampled.count("×") == 1
    assert not sampled.endswith("| – |")
    recorded = next(line for line in lines if line.startswith("Recorded per /hello request"))
    assert "; sampled: sample=0.1)" in recorded
    share = data["recorded_per_request"]["sampled"]
    assert recorded.endswith(f", flasktrace 1.00, sampled {share:.2f}, naive 1.00")


_NAIVE_CHECK = """
import json, sys
sys.path.insert(0, "bench")
import apps, inprocess
environ = inprocess.make_environ("/hello")
bare, naive = apps.create_app("bare"), apps.create_app("naive")
same = inprocess.serve_once(naive, environ) == inprocess.serve_once(bare, environ)
recorder = apps.naive_recorder(naive)
recorder.events.clear()
inprocess.serve_once(naive, environ)
print(json.dumps({
    "same": same,
    "events": list(recorder.events),
    "recorded": apps.recorded_count(naive),
    "recording": apps.recording(naive, environ),
}))
"""


def run_check(code: str) -> Any:
    """Run ``code`` in a fresh interpreter from the project root; the JSON it printed."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_naive_recorder_appends_twenty_tuples_per_hello_and_changes_nothing() -> None:
    """The yardstick of issue #6 records 20 steps of /hello, in the order
    they ran, and serves the same response as bare Flask. (In a subprocess:
    it connects receivers to Flask's signals for good.)
    """
    result = run_check(_NAIVE_CHECK)
    assert result["same"] is True
    names = [name for name, _ in result["events"]]
    assert len(names) == 20
    assert names[:3] == ["request", "signal:appcontext_pushed", "signal:request_started"]
    assert names[3] == "url_match"
    assert names[-3:] == ["app", "body", "close"]
    assert names.index("load_user:start") < names.index("view:hello:start")
    times = [time for _, time in result["events"]]
    assert times == sorted(times)
    assert result["recorded"] == 2
    assert result["recording"] is True


_NAIVE_CLOSE_CHECK = """
import json, sys
sys.path.insert(0, "bench")
import apps, inprocess
app = apps.create_app("naive")
closed = []

@app.after_request
def on_close(response):
    response.call_on_close(lambda: closed.append(1))
    return response

recorder = apps.naive_recorder(app)
results = []
for iterate in (False, True):
    closed.clear()
    recorder.events.clear()
    body = app(inprocess.make_environ("/hello"), lambda *args: None)
    if iterate:
        list(body)
    body.close()
    names = [name for name, _ in recorder.events]
    results.append({"closed": len(closed), "close_events": names.count("close")})
print(json.dumps(results))
"""


def test_naive_recorder_closes_a_body_the_server_never_iterated() -> None:
    """A body closed without being iterated (a server may, after an error)
    still closes the app's: the recorder's body was a generator, whose close
    before the first ``next`` runs none of its code. (In a subprocess, as
    above.)
    """
    assert run_check(_NAIVE_CLOSE_CHECK) == [{"closed": 1, "close_events": 1}] * 2


_RECEIVERS_CHECK = """
import json, sys
import flask
sys.path.insert(0, "bench")
import apps, inprocess
built = inprocess.build_apps(["bare", "flasktrace", "naive"])
names = {id(app): config for config, app in built.items()}
seen = []
timed_block = inprocess.timed_block

def watched(app, template, n, *, gc_off):
    seen.append([names[id(app)], bool(flask.request_started.receivers)])
    return timed_block(app, template, n, gc_off=gc_off)

inprocess.timed_block = watched
inprocess.measure_latency(
    built, ["/hello"], rounds=2, requests=5, warmup=2, gc_off=False, retries=0,
    quiet_timeout=0,
)
recorder = apps.naive_recorder(built["naive"])
recorder.events.clear()
inprocess.serve_once(built["naive"], inprocess.make_environ("/hello"))
print(json.dumps({"seen": seen, "after": len(recorder.events)}))
"""


def test_naive_recorder_receives_signals_only_while_its_app_is_timed() -> None:
    """A receiver on a Flask signal, for any sender, makes every app of the
    process take the slow way when it sends that signal (and FlaskTrace time
    it): the naive recorder must not slow the other configurations down.
    (In a subprocess, as above.)
    """
    result = run_check(_RECEIVERS_CHECK)
    assert len(result["seen"]) == 3 * 3  # warm-up and two rounds
    for config, receivers in result["seen"]:
        assert receivers is (config == "naive"), result["seen"]
    assert result["after"] == 20  # connected again after measuring


def run_experiment(
    tmp_path: Path, script: str, *args: str
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """Run a small experiment (2 rounds × 20 requests) and read its JSON."""
    out = tmp_path / "experiment.json"
    done = run_script(
        script, "--rounds", "2", "--requests", "20", "--warmup", "5", *args, "--json", str(out)
    )
    assert done.returncode == 0, done.stderr
    return done, json.loads(out.read_text(encoding="utf-8"))


def test_isolation_reports_each_app_plain_and_traced(tmp_path: Path) -> None:
    done, data = run_experiment(tmp_path, "isolation.py", "--sweep-bytes", "4096")
    assert list(data["results"]) == ["trivial", "after-sweep", "after-flask"]
    for name, stats in data["results"].items():
        for column in ("plain_us", "traced_us", "added_us"):
            assert stats[column]["n"] == 2, (name, column)
        assert stats["traced_us"]["median"] > 0
    # after-flask serves a whole Flask request first: the apps really differ.
    results = data["results"]
    assert results["after-flask"]["plain_us"]["min"] > results["trivial"]["plain_us"]["max"]
    assert data["params"]["sweep_bytes"] == 4096
    for name in data["results"]:
        assert name in done.stdout


def test_isolation_rejects_a_zero_round_count() -> None:
    done = run_script("isolation.py", "--rounds", "0")
    assert done.returncode == 2
    assert "--rounds must be at least 1" in done.stderr


def test_diversity_compares_varied_and_repeated_code_of_equal_size(tmp_path: Path) -> None:
    done, data = run_experiment(tmp_path, "diversity.py", "--statements", "400")
    assert list(data["results"]) == ["trivial", "flask"]
    for base, stats in data["results"].items():
        for column in ("plain_us", "varied_added_us", "repeated_added_us"):
            assert stats[column]["n"] == 2, (base, column)
    # The comparison is fair only if both run about as many bytecodes.
    varied, repeated = data["bytecodes"]["varied"], data["bytecodes"]["repeated"]
    assert varied > 100
    assert 0.75 < repeated / varied < 1.33
    assert f"varied {varied:,}, repeated {repeated:,}." in done.stdout
    results = data["results"]
    assert results["flask"]["plain_us"]["min"] > results["trivial"]["plain_us"]["max"]


def test_diversity_rejects_zero_statements() -> None:
    done = run_script("diversity.py", "--statements", "0")
    assert done.returncode == 2
    assert "--statements must be at least 1" in done.stderr
