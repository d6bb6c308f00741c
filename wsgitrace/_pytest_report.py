"""What the pytest plugin reports: the text of a test's ``wsgitrace`` report
section and the records of the ``--wsgitrace-json`` file.

::

    text = _report_text(item.config, capture, focus)    # table and timelines
    text = _trace_text(item.config, trace)              # one trace, no capture
    line = _json_record(item, capture, "failed")        # one JSON Lines record
    writer = _JsonWriter(path)                          # a plugin: writes them
    config.pluginmanager.register(writer, "wsgitrace-json")

When and on which test report these go is decided by
:mod:`wsgitrace.pytest_plugin`. rich is imported only to render a section.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO

import pytest

from ._hook_assertions import _describe
from .testing import TraceCapture
from .trace import SCHEMA_VERSION, Trace

#: Timelines shown in one report, below a table of the test's traces.
_REPORT_TIMELINES = 5
#: Rows of that table (the newest traces).
_REPORT_TABLE_ROWS = 50
#: Events shown per timeline: all hooks and WSGI steps, then signals, spans
#: and logs while there is room (a trace may hold hundreds).
_REPORT_TIMELINE_EVENTS = 40


# -- the report section --------------------------------------------------------


def _report_text(config: pytest.Config, capture: TraceCapture, focus: Trace | None) -> str:
    """The report section: a table of the test's requests and the timelines
    of the last few (the one an assertion failed on first). Plain text.
    """
    traces = capture.all
    lines = [f"{len(traces)} request{'s' if len(traces) != 1 else ''} traced during this test"]
    if capture.dropped:
        lines.append(
            f"{capture.dropped} earlier trace{'s' if capture.dropped != 1 else ''} dropped"
            f" (wsgitrace_max_traces={capture.max_traces})"
        )
    lines += _app_drops_notes(capture)
    if capture.internal_errors:
        errors = capture.internal_errors
        lines.append(
            f"wsgitrace caught {errors} internal error{'s' if errors != 1 else ''} during"
            " this test (the 'wsgitrace' logger logs each kind once per process, at its"
            " first: maybe in an earlier test)"
        )
    chosen = traces[-_REPORT_TIMELINES:]
    shown = f"the last {len(chosen)}"
    if focus is not None:
        # The failed assertion's trace first, then the newest of the others.
        older = all(t is not focus for t in chosen)
        others = [t for t in traces if t is not focus][-(_REPORT_TIMELINES - 1) :]
        chosen = [focus, *others]
        if older:
            shown = f"the one the assertion failed on and the last {len(others)}"
    if len(traces) > len(chosen):
        lines.append(f"timelines of {shown} shown")
    lines += _cut_note(chosen)
    lines += _unclosed_note(traces)
    try:
        from . import render

        width = _width(config)
        if len(traces) > 1:
            rows = traces[-_REPORT_TABLE_ROWS:]
            if len(traces) > len(rows):
                lines.append(f"(table: last {len(rows)} of {len(traces)})")
            table = render.build_trace_table(rows)
            lines += ["", render.render_text(table, width=width).rstrip("\n")]
        for trace in chosen:
            title = "assertion failed on this trace" if trace is focus else ""
            timeline = render.build_timeline(trace, max_rows=_REPORT_TIMELINE_EVENTS)
            text = render.render_text(timeline, width=width).rstrip("\n")
            lines += ["", *([f"--- {title}"] if title else []), text]
    except Exception as exc:
        lines.append(f"wsgitrace: rendering failed ({_error(exc)}); hook lists:")
        for trace in chosen:
            try:
                lines.append(f"  {_describe(trace)}: {trace.hooks()}")
            except Exception as inner:
                lines.append(f"  <trace {trace.id}: {_error(inner)}>")
    return "\n".join(lines) + "\n"


def _trace_text(config: pytest.Config, trace: Trace) -> str:
    """The report section of a test that failed a hook order assertion
    without capturing its requests: the timeline of that one trace. Plain
    text.
    """
    lines = [
        "the wsgitrace fixture was not used: only the trace the assertion failed on is shown",
        *_cut_note([trace]),
        *_unclosed_note([trace]),
        "",
        "--- assertion failed on this trace",
    ]
    try:
        from . import render

        timeline = render.build_timeline(trace, max_rows=_REPORT_TIMELINE_EVENTS)
        lines.append(render.render_text(timeline, width=_width(config)).rstrip("\n"))
    except Exception as exc:
        lines.append(f"wsgitrace: rendering failed ({_error(exc)}); hooks:")
        lines.append(f"  {_describe(trace)}: {trace.hooks()}")
    return "\n".join(lines) + "\n"


def _app_drops_notes(capture: TraceCapture) -> list[str]:
    """The lines saying what the buffers and sinks of the apps the test
    made requests to dropped during it, if any did.
    """
    try:
        drops = capture._app_drops()
    except Exception as exc:
        return [f"wsgitrace: cannot count what the apps' buffers and sinks dropped ({_error(exc)})"]
    lines = []
    for name, cap, count, limit in drops:
        app = repr(name)
        traces = f"{count} trace{'s' if count != 1 else ''}"
        if cap == "sink_failed":
            lines.append(
                f"app {app}: {traces} not delivered by its sinks, which failed (the 'wsgitrace'"
                " logger logs each sink's first failure)"
            )
        elif cap == "sink_queue":
            lines.append(f"app {app}: {traces} dropped by its sinks' full queues ({cap}={limit})")
        else:
            lines.append(
                f"app {app}: {traces} evicted from its buffer ({cap}={limit}): gone from its"
                " /_trace and tail, not from this report"
            )
    return lines


def _cut_note(traces: list[Trace]) -> list[str]:
    """The line saying some of these timelines are cut, if any is."""
    try:
        if all(len(trace.events) <= _REPORT_TIMELINE_EVENTS for trace in traces):
            return []
    except Exception as exc:
        return [f"wsgitrace: cannot count events ({_error(exc)})"]
    return [
        f"long timelines are cut to about {_REPORT_TIMELINE_EVENTS} events, keeping every"
        " hook and WSGI step (--wsgitrace-json writes them all)"
    ]


def _unclosed_note(traces: list[Trace]) -> list[str]:
    """The lines explaining the ``unclosed`` warning and the ``in progress``
    state, if a trace has them: in a test they almost always mean the test
    client's response, not the app or a hung request.
    """
    try:
        states = {trace.state for trace in traces}
    except Exception as exc:
        return [f"wsgitrace: cannot read the traces' state ({_error(exc)})"]
    lines = []
    if "unclosed" in states:
        lines.append(
            "⚠ unclosed, in a test, usually means the test did not close a response"
            " (test clients never do: response.close()), not a fault of the app"
        )
    if "in_progress" in states:
        # A failed test's frame still holds its response: not a hung request.
        lines.append(
            "in progress, in a test, usually means a response the test still holds and did"
            " not close (test clients never do: response.close()), not a hung request;"
            " its duration is known at close()"
        )
    return lines


def _width(config: pytest.Config) -> int:
    """The terminal's width (``COLUMNS`` without a terminal writer), kept
    between 80 and 160 columns.
    """
    try:
        width = config.get_terminal_writer().fullwidth
    except Exception:
        columns = os.environ.get("COLUMNS", "").strip()
        width = int(columns) if columns.isdigit() else 100
    return max(80, min(width, 160))


def _error(exc: BaseException) -> str:
    """The exception's type and message, or its type when ``str()`` fails."""
    try:
        return f"{type(exc).__name__}: {exc}"
    except Exception:
        return type(exc).__name__


# -- the JSON Lines file -------------------------------------------------------


def _json_record(item: pytest.Item, capture: TraceCapture, outcome: str) -> str:
    """One line of the JSON Lines file: the test and its full traces."""
    traces = []
    for trace in capture.all:
        try:
            traces.append(trace.to_dict())
        except Exception as exc:
            traces.append({"id": trace.id, "error": f"to_dict() failed: {_error(exc)}"})
    workerinput = getattr(item.config, "workerinput", None)
    record = {
        "schema": SCHEMA_VERSION,
        "nodeid": item.nodeid,
        "outcome": outcome,
        "worker": workerinput.get("workerid") if isinstance(workerinput, dict) else None,
        "dropped": capture.dropped,
        "internal_errors": capture.internal_errors,
        "app_drops": _app_drops_records(capture),
        "traces": traces,
    }
    line = json.dumps(record, ensure_ascii=False, default=repr)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (an error message with a file name decoded with
        # surrogateescape, say) can be neither written as UTF-8 nor sent by
        # xdist: escaped as \udcxx, it still reads back as the same string.
        line = json.dumps(record, default=repr)
    return line


def _app_drops_records(capture: TraceCapture) -> list[dict[str, object]] | None:
    """What the apps' buffers and sinks dropped during the test, as the
    report's lines say it: one object per count that is not zero; ``None``
    when they cannot be counted.
    """
    try:
        drops = capture._app_drops()
    except Exception:
        return None
    return [
        {"app": name, "cap": cap, "count": count, "limit": None if cap == "sink_failed" else limit}
        for name, cap, count, limit in drops
    ]


class _JsonWriter:
    """Writes the records attached to test reports, one line per test. Runs
    in the controller, so xdist workers' records end up in the one file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.written = 0
        self.error: str | None = None
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file: IO[str] | None = path.open("w", encoding="utf-8")

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # Popped once written: the terminal reporter keeps every report.
        data = report.__dict__.pop("wsgitrace_json", None)
        if not isinstance(data, str) or self.file is None:
            return
        try:
            self.file.write(data + "\n")
            self.file.flush()
            self.written += 1
        except OSError as exc:
            self.error = _error(exc)

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        tests = "test" if self.written == 1 else "tests"
        line = f"wsgitrace: traces of {self.written} {tests} written to {self.path}"
        if self.error:
            line += f" (writing failed: {self.error})"
        terminalreporter.write_line(line)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
