"""Rendering: pure functions from traces to rich renderables and plain text."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import threading

import pytest
from flask import Blueprint, Flask, g
from rich.console import Console

from wsgitrace import Trace, TraceBuffer
from wsgitrace.flask import FlaskTrace
from wsgitrace.render import (
    build_timeline,
    build_trace_table,
    format_bytes,
    format_ms,
    render_text,
    safe,
    status_style,
    summary_of,
)

MS = 1_000_000
HOSTILE_PATH = "/x\x1b[2J[bold red]\x1b]8;;http://evil\x07link\x1b]8;;\x07\r\x9bEnd\u202e"
# Anything a terminal would act on: C0 (newline aside), DEL, C1, bidi controls.
RAW_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
SGR = re.compile(r"\x1b\[[0-9;]*m")


class StepClock:
    """A nanosecond clock that only moves when told."""

    def __init__(self) -> None:
        self.now = 1_000 * MS

    def __call__(self) -> int:
        return self.now


def make_trace(
    path: str = "/orders/7",
    status: str = "200 OK",
    duration_ms: int = 12,
    **headers: str,
) -> Trace:
    """A finished trace with hook events at exact offsets."""
    clock = StepClock()
    trace = Trace("GET", path, query="page=2", remote_addr="127.0.0.1", clock=clock)
    start = trace.start_ns
    trace.record("url_match", "url_match", start + 1 * MS, start + 1 * MS)
    trace.record(
        "before_request",
        "before_request:load_user",
        start + 2 * MS,
        start + 3 * MS,
        {"blueprint": None, "qualname": "load_user", "module": "shop", "g_added": ["user"]},
    )
    trace.record(
        "before_request",
        "before_request:admin.require_admin",
        start + 3 * MS,
        start + 4 * MS + MS // 2,
        {
            "blueprint": "admin",
            "qualname": "require_admin",
            "module": "shop.admin",
            "short_circuit": True,
            "returned": "Response",
        },
    )
    trace.record(
        "teardown_request",
        "teardown_request:close_db",
        start + 5 * MS,
        start + 6 * MS,
        {"blueprint": None, "g_removed": ["db"], "error": "OSError"},
    )
    trace.status = status
    trace.endpoint = "admin.dashboard"
    trace.rule = "/admin/"
    trace.app_end_ns = start + 8 * MS
    trace.start_response_ns = start + 7 * MS
    trace.first_byte_ns = start + 9 * MS
    trace.body_start_ns = start + 9 * MS
    trace.body_end_ns = start + 10 * MS
    trace.bytes_sent = 2048
    trace.chunks = 2
    trace.end_ns = start + duration_ms * MS
    trace.g = {"user": "<User 'ann'>"}
    trace.request_headers = tuple(part for pair in headers.items() for part in pair)
    trace.finished = True
    return trace


class TestSafe:
    def test_control_characters_are_escaped(self) -> None:
        """ESC, CSI, OSC, BEL, CR, TAB, NL, DEL, C1 and bidi controls are shown escaped."""
        text = safe("a\x1b[2Jb\x9bc\x07d\re\tf\ng\x7fh\x85i\u202ej\x00")
        assert text == ("a\\x1b[2Jb\\x9bc\\x07d\\x0de\\x09f\\x0ag\\x7fh\\x85i\\u202ej\\x00")
        assert not RAW_CONTROL.search(text)

    def test_lone_surrogates_are_escaped(self) -> None:
        """A lone surrogate (undecodable bytes) is shown escaped, so output can be encoded."""
        assert safe("file\udcff") == "file\\udcff"
        assert render_text(build_trace_table([make_trace(path="/\udcff")])).encode("utf-8")

    def test_printable_text_is_unchanged(self) -> None:
        """Printable text, markup-like brackets and non-ASCII letters are kept."""
        assert safe("[bold red]héllo ✓ ☃[/]") == "[bold red]héllo ✓ ☃[/]"

    def test_newlines_kept_on_request(self) -> None:
        """newlines=True keeps line feeds but still escapes CR and ESC."""
        assert safe("a\nb\r\x1b", newlines=True) == "a\nb\\x0d\\x1b"


class TestFormatting:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            (None, "…"),
            (0.0001, "<1µs"),
            (0.042, "42µs"),
            (1.25, "1.25ms"),
            (123.44, "123.4ms"),
            (2500, "2.50s"),
            (250_000, "250s"),
            (0.0005, "<1µs"),
            (0.001, "1µs"),
            (0.9996, "1.00ms"),
            (9.996, "10.0ms"),
            (999.96, "1.00s"),
            (99_999.9, "100s"),
        ],
    )
    def test_format_ms(self, value: float | None, expected: str) -> None:
        """Durations are short and unit-suffixed."""
        assert format_ms(value) == expected

    @pytest.mark.parametrize(
        ("value", "expected"),
        [(None, "-"), (0, "0B"), (512, "512B"), (2048, "2.0K"), (5 * 1024 * 1024, "5.0M")],
    )
    def test_format_bytes(self, value: int | None, expected: str) -> None:
        """Byte counts are short."""
        assert format_bytes(value) == expected

    @pytest.mark.parametrize(
        ("code", "style"),
        [(None, "dim"), (101, "dim"), (204, "green"), (302, "cyan"), (404, "yellow")],
    )
    def test_status_style_by_class(self, code: int | None, style: str) -> None:
        """Statuses are coloured by class."""
        assert status_style(code) == style

    def test_server_errors_are_bold_red(self) -> None:
        """5xx stands out."""
        assert status_style(503) == "bold red"


class TestTraceTable:
    def test_row_has_every_column(self) -> None:
        """A row shows time, method, path with query, status, duration, TTFB, bytes, hooks."""
        text = render_text(build_trace_table([make_trace()]), width=100)
        header, row = text.splitlines()[:2]
        assert header.split() == ["TIME", "METHOD", "PATH", "ST", "DUR", "TTFB", "BYTES", "HOOKS"]
        assert re.match(r"\d\d:\d\d:\d\d ", row)
        expected = ["GET", "/orders/7?page=2", "200", "12.0ms", "9.00ms", "2.0K", "3"]
        assert row.split()[1:] == expected

    def test_summaries_render_like_traces(self) -> None:
        """Summaries read from /_trace (JSON) render exactly as the traces
        they came from.
        """
        trace = make_trace()
        from_json = json.loads(json.dumps(trace.summary()))
        assert summary_of(from_json) == trace.summary()
        assert render_text(build_trace_table([from_json])) == render_text(
            build_trace_table([trace])
        )

    def test_fits_eighty_columns(self) -> None:
        """Long paths are cut so every line fits a narrow terminal."""
        trace = make_trace(path="/" + "very-long-segment/" * 20)
        text = render_text(build_trace_table([trace, make_trace()], show_id=False), width=80)
        assert all(len(line) <= 80 for line in text.splitlines())
        assert "…" in text

    @pytest.mark.parametrize(
        ("width", "columns"),
        [
            (71, ["TIME", "METHOD", "PATH", "ST", "DUR", "TTFB", "BYTES", "HOOKS"]),
            (64, ["TIME", "METHOD", "PATH", "ST", "DUR", "TTFB", "BYTES"]),
            (60, ["TIME", "METHOD", "PATH", "ST", "DUR", "TTFB"]),
            (40, ["METHOD", "PATH", "ST", "DUR"]),
        ],
    )
    def test_narrow_width_leaves_columns_out(self, width: int, columns: list[str]) -> None:
        """On a narrow terminal the least useful columns go, so the status
        and the duration stay whole (rich would squeeze them to nothing).
        """
        trace = make_trace(status="503 SERVICE UNAVAILABLE")
        table = build_trace_table([trace], width=width)
        header, row = render_text(table, width=width).splitlines()[:2]
        assert header.split() == columns
        assert "503" in row.split()
        assert "12.0ms" in row.split()

    def test_cropped_path_keeps_its_marks_at_eighty_columns(self) -> None:
        """A path too long for its column is cut before its marks (⚠ for a
        warning, the error's type, in progress), never the marks with it.
        """
        long_path = "/" + "very-long-segment/" * 5
        warned = make_trace(path=long_path)
        warned.warn("Content-Length mismatch")
        failed = make_trace(path=long_path, status="500 INTERNAL SERVER ERROR")
        failed.error = {"type": "builtins.KeyError", "message": "x", "where": "app"}
        failed.warn("Content-Length mismatch")
        running = make_trace(path=long_path)
        running.finished = False
        running.end_ns = None
        traces = [warned, failed, running]
        text = render_text(build_trace_table(traces, width=80), width=80)
        rows = text.splitlines()[1:]
        assert all(len(line) <= 80 for line in rows)
        assert re.search(r" /very-long-seg\S*… ⚠  200 ", rows[0])
        assert re.search(r" /very\S*… ! KeyError ⚠  500 ", rows[1])
        assert re.search(r" /\S*… \(in progress\)  200 ", rows[2])
        # Marks wider than the column are shortened, not cut off.
        narrow = render_text(build_trace_table(traces, width=36), width=36).splitlines()[1:]
        assert [row[9:21] for row in narrow] == [
            "/very-lon… ⚠",
            "/very-l… ! ⚠",
            "/very-lon… …",
        ]

    def test_id_column_on_request(self) -> None:
        """show_id adds the trace id, for `wsgitrace show`."""
        trace = make_trace()
        assert trace.id in render_text(build_trace_table([trace], show_id=True), width=130)

    def test_errors_and_in_progress_are_marked(self) -> None:
        """An error type and an in-progress state are visible in the row."""
        trace = make_trace(status="500 INTERNAL SERVER ERROR")
        trace.error = {"type": "builtins.KeyError", "message": "x", "traceback": "", "where": "app"}
        running = make_trace()
        running.finished = False
        running.end_ns = None
        text = render_text(build_trace_table([trace, running]), width=120)
        assert "! KeyError" in text
        assert "(in progress)" in text

    def test_hostile_path_is_shown_literally(self) -> None:
        """Markup and terminal escapes in a path are shown as text, never interpreted."""
        text = render_text(build_trace_table([make_trace(path=HOSTILE_PATH)]), width=200)
        assert "/x\\x1b[2J[bold red]\\x1b]8;;http://evil\\x07link" in text
        assert not RAW_CONTROL.search(text)

    def test_hostile_path_in_colour_emits_only_colours(self) -> None:
        """On a colour terminal the only escape sequences are our own SGR colours."""
        out = io.StringIO()
        console = Console(file=out, force_terminal=True, color_system="truecolor", width=200)
        console.print(build_trace_table([make_trace(path=HOSTILE_PATH, status="500 X")]))
        console.print(build_timeline(make_trace(path=HOSTILE_PATH), full=True))
        text = out.getvalue()
        assert SGR.search(text)  # it did colour
        without_colours = SGR.sub("", text)
        assert not RAW_CONTROL.search(without_colours)
        assert "[bold red]" in without_colours


class TestTimeline:
    def test_waterfall_lists_events_in_order(self) -> None:
        """Hook events appear in the order they ran, with offsets and durations."""
        text = render_text(build_timeline(make_trace()), width=100)
        names = [
            "request",
            "app",
            "url_match",
            "before_request:load_user",
            "before_request:admin.require_admin",
            "teardown_request:close_db",
            "start_response",
            "body",
            "first_byte",
        ]
        positions = [text.index(name) for name in names]
        assert positions == sorted(positions)
        line = next(ln for ln in text.splitlines() if "require_admin" in ln)
        assert line.split()[:2] == ["3.000", "1.50ms"]
        assert "█" in line

    def test_header_summarises_the_request(self) -> None:
        """The header shows method, path, status line, duration, TTFB, bytes, state, id."""
        trace = make_trace()
        head = render_text(build_timeline(trace), width=120).splitlines()[:2]
        assert head[0] == "GET /orders/7?page=2 → 200 OK"
        for part in ("12.0ms", "ttfb 9.00ms", "2.0K", "finished", f"id {trace.id}"):
            assert part in head[1]
        assert "endpoint admin.dashboard" in head[1]

    def test_header_wraps_between_facts_never_inside_one(self) -> None:
        """At 80 columns (and any width around it) `show`'s header wraps
        between its facts: a label such as "endpoint" stays with its value.
        """
        trace = make_trace()
        for width in range(50, 121):
            text = render_text(build_timeline(trace, full=True), width=width)
            head = text.split("   START")[0].splitlines()
            assert all(len(line) <= width for line in head)
            assert not any(line.endswith(("endpoint", "ttfb", "id", "rule", "·")) for line in head)
            for fact in ("endpoint admin.dashboard", "rule /admin/", f"id {trace.id}"):
                assert any(fact in line for line in head), (width, head)
        text = render_text(build_timeline(trace, full=True), width=80)
        assert text.splitlines()[1:3] == [
            f"12.0ms · ttfb 9.00ms · 2.0K · finished · id {trace.id}",
            "endpoint admin.dashboard · rule /admin/ · " + text.splitlines()[2].split(" · ")[-1],
        ]

    def test_g_names_beyond_the_cap_are_counted(self) -> None:
        """A hook's g names cut to the cap end with the count of the rest,
        not shown as an attribute of their own.
        """
        trace = make_trace()
        start = trace.start_ns
        attrs = {"g_changed": ["a", "b"], "g_changed_more": 3, "g_removed": ["c"]}
        trace.record("before_request", "before_request:renew", start, start + MS, attrs)
        text = render_text(build_timeline(trace), width=140)
        assert "before_request:renew  g~ a, b and 3 more  g- c\n" in text
        assert "_more" not in text

    @pytest.mark.parametrize("when", [1e20, float("nan"), float("inf"), -5.0])
    def test_a_time_that_is_not_a_time(self, when: float) -> None:
        """A wall time out of range (or NaN) from a hostile server is shown
        as unknown, not a crash.
        """
        trace = make_trace()
        trace.wall_time = when
        assert "GET /orders/7" in render_text(build_timeline(trace, full=True), width=120)
        row = render_text(build_trace_table([trace]), width=120)
        assert "--:--:--" in row

    def test_hook_details(self) -> None:
        """Blueprints, short-circuits, g changes and errors are spelled out."""
        text = render_text(build_timeline(make_trace()), width=140)
        assert "bp=admin" in text
        assert "short-circuit → Response" in text
        assert "g+ user" in text
        assert "g- db" in text
        assert "raised OSError" in text
        assert "→ admin.dashboard (/admin/)" in text

    def test_nested_events_are_indented(self) -> None:
        """Events inside the app call are indented under it."""
        lines = render_text(build_timeline(make_trace()), width=120).splitlines()
        app_line = next(ln for ln in lines if ln.rstrip().endswith(" app"))
        hook_line = next(ln for ln in lines if "load_user" in ln)
        assert hook_line.index("before_request") > app_line.index("app")

    def test_full_shows_state(self) -> None:
        """full=True adds the g snapshot, headers, rule and hook functions."""
        trace = make_trace(**{"Authorization": "[redacted]", "X-Request-Id": "abc"})
        text = render_text(build_timeline(trace, full=True), width=120)
        for part in ("<User 'ann'>", "X-Request-Id", "abc", "rule", "shop.admin.require_admin"):
            assert part in text
        assert "Authorization  [redacted]" in text

    @pytest.mark.parametrize(
        ("chunks", "sent", "shown"),
        [(1, 1, "1 chunk, 1 byte"), (2, 2048, "2 chunks, 2048 bytes"), (0, 0, "0 chunks, 0 bytes")],
    )
    def test_body_counts_read_as_words(self, chunks: int, sent: int, shown: str) -> None:
        """The body line says "1 chunk", not "1 chunks"."""
        trace = make_trace()
        trace.chunks, trace.bytes_sent = chunks, sent
        assert shown in render_text(build_timeline(trace, full=True), width=120)

    def test_error_with_traceback(self) -> None:
        """An error shows its type and message; full adds the traceback, newlines kept."""
        trace = make_trace(status="500 INTERNAL SERVER ERROR")
        trace.error = {
            "type": "builtins.ZeroDivisionError",
            "message": "division by zero",
            "traceback": "Traceback (most recent call last):\n  line 1\x1b[2J\n",
            "where": "app",
        }
        short = render_text(build_timeline(trace), width=100)
        assert "error ZeroDivisionError (in app): division by zero" in short
        assert "Traceback" not in short
        full = render_text(build_timeline(trace, full=True), width=100)
        assert "Traceback (most recent call last):\n  line 1\\x1b[2J" in full

    def test_warnings_and_dropped_events(self) -> None:
        """Protocol warnings and dropped events are visible."""
        trace = make_trace()
        trace.warn("Content-Length mismatch")
        trace.dropped_events = 3
        text = render_text(build_timeline(trace), width=100)
        assert "⚠ Content-Length mismatch" in text
        assert "3 events dropped" in text

    def test_round_trip_through_json(self) -> None:
        """A trace read back from its JSON renders like the original."""
        trace = make_trace()
        again = Trace.from_dict(trace.to_dict())
        assert render_text(build_timeline(again, full=True), width=100) == render_text(
            build_timeline(trace, full=True), width=100
        )

    def test_narrow_width_wraps_event_names_without_losing_text(self) -> None:
        """On a terminal narrower than the fixed columns plus 16, a long
        event name wraps in the room there is; none of it is cut off.
        """
        trace = make_trace()
        text = render_text(build_timeline(trace, bar_width=8), width=40)
        assert all(len(line) <= 40 for line in text.splitlines())
        rows = text.split("EVENT\n", 1)[1]
        joined = "".join(line[27:] for line in rows.splitlines())
        assert "before_request:admin.require_admin" in joined

    def test_late_start_offsets_keep_the_columns_aligned(self) -> None:
        """An event 10 seconds or more into a long request (a stream) keeps
        its start in the 8 columns, with fewer decimals, so the duration
        and bar columns stay aligned.
        """
        trace = make_trace(duration_ms=200_000)
        start = trace.start_ns
        trace.record("span", "span:late", start + 12_345_678_901, start + 12_345_679_901)
        trace.record("span", "span:later", start + 150_000 * MS, start + 151_000 * MS)
        lines = render_text(build_timeline(trace), width=100).splitlines()
        late = next(line for line in lines if line.endswith("span:late"))
        later = next(line for line in lines if line.endswith("span:later"))
        first = next(line for line in lines if line.endswith("request"))
        assert late[:18] == "12345.68      1µs "
        assert later[:18] == "150000.0    1.00s "
        assert late.index("span:late") == later.index("span:later") == first.index("request") + 2

    def test_other_threads_events_are_marked_not_nested(self) -> None:
        """An event another thread recorded during the view is labelled
        with its thread and not indented under the view, as if the view
        had called it; read back from JSON it renders the same.
        """
        trace = Trace("GET", "/x", clock=StepClock())
        start = trace.start_ns
        trace.record("view", "view:index", start + 1 * MS, start + 4 * MS)
        worker = threading.Thread(
            target=trace.record, args=("span", "span:job", start + 2 * MS, start + 3 * MS)
        )
        worker.start()
        worker.join()
        trace.status, trace.end_ns, trace.finished = "200 OK", start + 5 * MS, True
        for shown in (trace, Trace.from_dict(trace.to_dict())):
            lines = render_text(build_timeline(shown), width=100).splitlines()
            view = next(line for line in lines if "view:index" in line)
            job = next(line for line in lines if "span:job" in line)
            assert job.index("span:job") == view.index("view:index")
            assert job.endswith("span:job  [thread 2]")
            assert "[thread" not in view

    def test_render_text_has_no_escape_codes(self) -> None:
        """Plain rendering has no colour codes and no trailing spaces."""
        text = render_text(build_timeline(make_trace(), full=True), width=80)
        assert "\x1b" not in text
        assert all(line == line.rstrip() for line in text.splitlines())
        assert all(len(line) <= 80 for line in text.splitlines())


def test_timeline_of_a_real_flask_request() -> None:
    """A Flask request's timeline names blueprint hooks, the short-circuit and g keys."""
    app = Flask(__name__)
    admin = Blueprint("admin", __name__, url_prefix="/admin")

    @app.before_request
    def load_user() -> None:
        g.user = "ann"

    @admin.before_request
    def require_admin() -> tuple[str, int]:
        return "admins only", 403

    @admin.route("/")
    def dashboard() -> str:
        return "never"

    app.register_blueprint(admin)
    buffer = TraceBuffer()
    FlaskTrace(app, buffer=buffer)
    with app.test_client() as client:
        response = client.get("/admin/")
        assert response.status_code == 403
        response.close()
    text = render_text(build_timeline(buffer.latest(1)[0]), width=120)
    assert "before_request:load_user  g+ user" in text
    assert "before_request:admin.require_admin  bp=admin  short-circuit → tuple" in text
    assert "view:admin.dashboard" not in text


def test_import_wsgitrace_does_not_import_rich_or_flask() -> None:
    """Only render/cli import rich; flask is imported lazily."""
    code = (
        "import sys, wsgitrace, wsgitrace.endpoint; "
        "print(sorted(m for m in ('rich', 'flask', 'click') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert result.stdout.strip() == "[]"
