"""Traces for people: pure functions from traces to rich renderables.

Shared by the ``wsgitrace`` command and the pytest plugin::

    from wsgitrace.render import build_timeline, build_trace_table, render_text

    console.print(build_trace_table(buffer.latest(20)))
    print(render_text(build_timeline(trace), width=80))  # plain, no colour

Every piece of text that came from a request (method, path, query, header
values, ``g`` reprs, error messages, event attributes, ...) goes into a
:class:`rich.text.Text`, never into console markup, and passes through
:func:`safe` first, which shows control characters escaped (``\\x1b``,
``\\r``, ``\\x9b``, bidi overrides ...) instead of sending them to the
terminal. Paths and queries are shown decoded as UTF-8 (WSGI hands them over
as latin-1).

Only this module and :mod:`wsgitrace.cli` import rich.
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from ._limits import BIDI_CONTROLS
from .trace import HOOK_KINDS, Event, Trace

__all__ = [
    "build_timeline",
    "build_trace_table",
    "format_bytes",
    "format_ms",
    "render_text",
    "safe",
    "status_style",
    "summary_of",
]

# C0 (tab and newline included), DEL, C1, the invisible bidi controls that
# can reorder what a terminal shows, and lone surrogates (not encodable).
_UNSAFE = re.compile(f"[\x00-\x1f\x7f-\x9f{BIDI_CONTROLS}\ud800-\udfff]")
_UNSAFE_KEEP_NEWLINES = re.compile(f"[\x00-\x09\x0b-\x1f\x7f-\x9f{BIDI_CONTROLS}\ud800-\udfff]")

#: Attributes shown by the timeline in their own way (or not at all).
_QUIET_ATTRS = frozenset(
    {
        "blueprint",
        "qualname",
        "module",
        "endpoint",
        "short_circuit",
        "returned",
        "g_added",
        "g_changed",
        "g_removed",
        "g_added_more",
        "g_changed_more",
        "g_removed_more",
        "error",
        "exception",
        "code",
    }
)

_KIND_STYLES = {
    "view": "bold green",
    "errorhandler": "magenta",
    "error": "bold red",
    "tracer_error": "bold red",
    "signal": "dim",
    "url_match": "blue",
    "span": "yellow",
    "template": "green",
}


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe(value: object, *, newlines: bool = False) -> str:
    """``str(value)`` with every control character shown escaped.

    :param newlines: Keep ``\\n`` (for tracebacks); everything else, ``\\r``
        and ``\\t`` included, is still escaped.
    """
    text = value if isinstance(value, str) else str(value)
    pattern = _UNSAFE_KEEP_NEWLINES if newlines else _UNSAFE
    return pattern.sub(_escape, text)


def _wsgi_text(value: str) -> str:
    """A WSGI (latin-1) string as the UTF-8 text the client sent, when it is."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return value


def _text(value: object, style: str = "", *, newlines: bool = False) -> Text:
    return Text(safe(value, newlines=newlines), style=style)


def status_style(code: int | None) -> str:
    """The style of a status code, by class."""
    if code is None:
        return "dim"
    if code >= 500:
        return "bold red"
    if code >= 400:
        return "yellow"
    if code >= 300:
        return "cyan"
    if code >= 200:
        return "green"
    return "dim"


def format_ms(value: float | None) -> str:
    """A duration in milliseconds, short: ``42µs``, ``1.25ms``, ``123.4ms``,
    ``2.50s``.
    """
    if value is None:
        return "…"
    # Each unit is chosen by the value as it will be shown, rounded: 500ns
    # is not "0µs", nor 999.96ms "1000.0ms".
    if value < 0.001:
        return "<1µs"
    if round(value * 1000) < 1000:
        return f"{value * 1000:.0f}µs"
    if round(value, 2) < 10:
        return f"{value:.2f}ms"
    if round(value, 1) < 1000:
        return f"{value:.1f}ms"
    if round(value / 1000, 2) < 100:
        return f"{value / 1000:.2f}s"
    return f"{value / 1000:.0f}s"


def format_bytes(value: int | None) -> str:
    """A byte count, short: ``512B``, ``12.3K``, ``4.5M``."""
    if value is None:
        return "-"
    if value < 1024:
        return f"{value}B"
    if value < 1024 * 1024:
        return f"{value / 1024:.1f}K"
    if value < 1024**3:
        return f"{value / 1024 / 1024:.1f}M"
    return f"{value / 1024**3:.1f}G"


def summary_of(item: Trace | Mapping[str, Any]) -> Mapping[str, Any]:
    """The summary of a trace, or the summary itself (as read from
    ``/_trace``).
    """
    return item.summary() if isinstance(item, Trace) else item


def _clock(timestamp: Any) -> str:
    return _local_time("%H:%M:%S", timestamp) or "--:--:--"


def _local_time(layout: str, timestamp: Any) -> str | None:
    """A wall-clock time as local time, or ``None`` for one that is not a
    time (missing, not positive, NaN, or out of the platform's range).
    """
    if not isinstance(timestamp, int | float) or not timestamp > 0:
        return None
    try:
        return time.strftime(layout, time.localtime(timestamp))
    except (OverflowError, ValueError, OSError):
        return None


def _status_text(summary: Mapping[str, Any]) -> Text:
    code = summary.get("status")
    if not isinstance(code, int):
        if summary.get("error"):
            return Text("ERR", style="bold red")
        return Text("…", style="dim")
    return Text(str(code), style=status_style(code))


def _path_text(summary: Mapping[str, Any]) -> _PathCell:
    path = _text(_wsgi_text(str(summary.get("path") or "")))
    query = summary.get("query")
    if query:
        path.append_text(_text("?" + _wsgi_text(str(query)), "dim"))
    marks, short = Text(), Text()
    error = summary.get("error")
    if error:
        marks.append_text(_text(f" ! {str(error).rpartition('.')[2]}", "red"))
        short.append(" !", style="red")
    if summary.get("warnings"):
        marks.append(" ⚠", style="yellow")
        short.append(" ⚠", style="yellow")
    if summary.get("state") == "in_progress":
        marks.append(" (in progress)", style="dim")
        short.append(" …", style="dim")
    return _PathCell(path, marks, short)


class _PathCell:
    """A trace table's path cell: the path, cut with an ellipsis to fit its
    column, then its marks (error type, ⚠, in progress), which are never cut
    off: in short (``!``, ``⚠``, ``…``) when even they do not fit.
    """

    def __init__(self, path: Text, marks: Text, short: Text) -> None:
        self.path = path
        self.marks = marks
        self.short = short

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        width = self.path.cell_len + self.marks.cell_len
        return Measurement(min(width, 12), width).clamp(max_width=options.max_width)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        line = self.path.copy()
        marks = self.marks
        if line.cell_len + marks.cell_len > width:
            if width - marks.cell_len < 2:  # no room left for the path
                marks = self.short
            line.truncate(max(width - marks.cell_len, 1), overflow="ellipsis")
        line.append_text(marks)
        line.no_wrap = True
        line.overflow = "ellipsis"
        yield line


def build_trace_table(
    traces: Iterable[Trace | Mapping[str, Any]],
    *,
    show_header: bool = True,
    show_id: bool = False,
    width: int | None = None,
) -> Table:
    """One row per trace: time, method, path, status, duration, time to
    first byte, bytes, hook count (and id).

    Columns have fixed widths except the path, which takes the rest of the
    line, so tables printed one after another line up.

    :param traces: Traces, or summaries as listed by ``/_trace``.
    :param show_header: Print the column names.
    :param show_id: Add the trace id (wants about 110 columns).
    :param width: The width the table will be printed at. Columns that do
        not fit are left out, HOOKS first, then BYTES, TTFB and TIME, so
        that on a narrow terminal the status and duration stay readable
        (rich would squeeze every column, the status to nothing).
    """
    table = Table(
        box=None,
        show_header=show_header,
        header_style="bold",
        pad_edge=False,
        expand=True,
        padding=(0, 1),
    )
    shown = set(_TABLE_COLUMNS)
    if not show_id:
        shown.discard("ID")
    if width is not None:
        for name in _TABLE_OPTIONAL:
            if _table_width(shown) <= width:
                break
            shown.discard(name)
    for name, (column_width, justify) in _TABLE_COLUMNS.items():
        if name not in shown:
            continue
        if name == "PATH":
            table.add_column(name, ratio=1, min_width=12, no_wrap=True, overflow="ellipsis")
        else:
            table.add_column(
                name,
                width=column_width,
                justify=justify,
                no_wrap=True,
                overflow="ellipsis",
                style="dim" if name in ("TIME", "ID") else "",
            )
    for item in traces:
        summary = summary_of(item)
        cells: dict[str, RenderableType] = {
            "TIME": Text(_clock(summary.get("time"))),
            "METHOD": _text(summary.get("method") or "-", "bold"),
            "PATH": _path_text(summary),
            "ST": _status_text(summary),
            "DUR": Text(format_ms(summary.get("duration_ms"))),
            "TTFB": Text(format_ms(summary.get("ttfb_ms")), style="dim"),
            "BYTES": Text(format_bytes(summary.get("bytes"))),
            "HOOKS": Text(str(summary.get("hooks") or 0)),
            "ID": _text(summary.get("id") or ""),
        }
        table.add_row(*(cell for name, cell in cells.items() if name in shown))
    return table


#: The trace table's columns: width (the path's least) and justification.
_TABLE_COLUMNS: dict[str, tuple[int, Literal["left", "right"]]] = {
    "TIME": (8, "left"),
    "METHOD": (7, "left"),
    "PATH": (12, "left"),
    "ST": (3, "left"),
    "DUR": (8, "right"),
    "TTFB": (8, "right"),
    "BYTES": (6, "right"),
    "HOOKS": (5, "right"),
    "ID": (20, "left"),
}
#: The columns a narrow table leaves out, first to last.
_TABLE_OPTIONAL = ("ID", "HOOKS", "BYTES", "TTFB", "TIME")


def _table_width(shown: set[str]) -> int:
    """The least width of a table with these columns (two spaces between)."""
    return sum(_TABLE_COLUMNS[name][0] + 2 for name in shown) - 2


# -- the timeline -------------------------------------------------------------


def _header(trace: Trace, full: bool) -> _Header:
    line = Text()
    line.append_text(_text(trace.method, "bold"))
    line.append(" ")
    line.append_text(_text(_wsgi_text(trace.path), "bold"))
    if trace.query:
        line.append_text(_text("?" + _wsgi_text(trace.query), "dim"))
    line.append(" → ")
    code = trace.status_code
    line.append_text(_text(trace.status or "no response", status_style(code)))
    parts = [
        ("", _clock(trace.wall_time) if not full else ""),
        ("", format_ms(trace.duration_ms)),
        ("ttfb ", format_ms(trace.ttfb_ms)),
        ("", format_bytes(trace.bytes_sent)),
        ("", trace.state.replace("_", " ")),
        ("id ", trace.id),
    ]
    if trace.endpoint:
        parts.append(("endpoint ", trace.endpoint))
    if full and trace.rule:
        parts.append(("rule ", trace.rule))
    when = _local_time("%Y-%m-%d %H:%M:%S", trace.wall_time) if full else None
    if when is not None:
        parts.append(("", when))
    facts = []
    for label, value in parts:
        if not value:
            continue
        fact = Text(label, style="dim") if label else Text()
        fact.append_text(_text(value))
        facts.append(fact)
    return _Header(line, facts)


class _Header:
    """A timeline's header: the request line, then its facts (duration,
    id, endpoint ...) joined by `` · `` and wrapped between facts, never
    inside one (a label apart from its value), unless one alone is wider
    than the line.
    """

    def __init__(self, line: Text, facts: list[Text]) -> None:
        self.line = line
        self.facts = facts

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.line
        width = options.max_width
        out = Text()
        for fact in self.facts:
            if out and out.cell_len + 3 + fact.cell_len > width:
                yield out
                out = Text()
            if out:
                out.append(" · ", style="dim")
            out.append_text(fact)
        if out:
            yield out


def _short_type(name: str) -> str:
    return name.removeprefix("builtins.")


def _depths(events: list[Event], thread: int) -> list[int]:
    """Nesting depth of each event (an event inside an earlier, longer one
    of the same thread). Another thread's events did not run inside the
    request thread's: they nest under the request only, at depth 1.
    """
    stacks: dict[int, list[Event]] = {}
    depths = []
    for event in events:
        stack = stacks.setdefault(event.thread, [])
        while stack and not (
            event.start_ns >= stack[-1].start_ns and event.end_ns <= stack[-1].end_ns
        ):
            stack.pop()
        depths.append(min(len(stack) + (event.thread != thread), 8))
        if event.duration_ns > 0:
            stack.append(event)
    return depths


def _request_thread(trace: Trace, events: list[Event]) -> int:
    """The thread that served the request: its ``request`` event's (a trace
    read from JSON keeps only the events' threads).
    """
    return next((e.thread for e in events if e.kind == "request"), trace.thread)


def _bar(event: Event, total: int, width: int) -> Text:
    if total <= 0 or width <= 0:
        return Text("")
    # Clamped both ways: a trace read from JSON may have an event that
    # starts before the request (or long after it).
    start = max(0, min(width - 1, int(event.start_ns * width / total)))
    if event.duration_ns <= 0:
        return Text(" " * start + "▏", style="dim")
    length = max(1, round(event.duration_ns * width / total))
    length = min(length, width - start)
    style = _KIND_STYLES.get(event.kind, "cyan" if event.kind in HOOK_KINDS else "blue")
    return Text(" " * start + "█" * length, style=style.replace("bold ", ""))


def _details(event: Event, trace: Trace, full: bool) -> Text:
    attrs = event.attrs
    out = Text()

    def add(text: str, style: str = "") -> None:
        if out:
            out.append("  ")
        out.append_text(_text(text, style))

    blueprint = attrs.get("blueprint")
    if blueprint and event.kind in HOOK_KINDS:
        add(f"bp={blueprint}", "dim")
    if attrs.get("short_circuit"):
        returned = attrs.get("returned")
        add("short-circuit" + (f" → {returned}" if returned else ""), "bold yellow")
    for key, sign in (("g_added", "+"), ("g_changed", "~"), ("g_removed", "-")):
        keys = attrs.get(key)
        if keys:
            names = keys if isinstance(keys, list | tuple) else [keys]
            more = attrs.get(f"{key}_more")
            tail = f" and {more} more" if isinstance(more, int) and more > 0 else ""
            add(f"g{sign} " + ", ".join(str(k) for k in names) + tail, "magenta")
    if event.kind == "url_match" and not attrs.get("error") and trace.endpoint:
        add(f"→ {trace.endpoint}" + (f" ({trace.rule})" if trace.rule else ""), "dim")
    if attrs.get("exception"):
        code = attrs.get("code")
        add(f"handles {attrs['exception']}" + (f" {code}" if code is not None else ""), "magenta")
    elif event.kind == "url_match" and attrs.get("code") is not None:
        add(f"{attrs.get('code')}", "yellow")
    error = attrs.get("error")
    if error:
        add(f"raised {error}" if event.kind != "url_match" else str(error), "bold red")
    for key, value in attrs.items():
        if key in _QUIET_ATTRS or (key, event.kind) in (
            ("type", "error"),
            ("template", "template"),
        ):
            continue
        if event.kind == "error" and key == "where":
            add(f"in {value}", "red")
            continue
        rendered = value if isinstance(value, str) else repr(value)
        if len(rendered) > 60 and not full:
            rendered = rendered[:59] + "…"
        add(f"{key}={rendered}", "dim")
    if event.kind == "error" and attrs.get("type"):
        add(str(attrs["type"]), "bold red")
    if full and attrs.get("qualname") and event.kind in HOOK_KINDS:
        module = attrs.get("module")
        add(f"{module}.{attrs['qualname']}" if module else str(attrs["qualname"]), "dim italic")
    return out


class _Waterfall:
    """The event rows of a timeline: fixed-width start, duration and bar
    columns, then the event column, wrapped with a hanging indent. Built as
    lines of :class:`Text` (a :class:`Table` costs ten times more here).
    """

    def __init__(self, rows: list[tuple[Text, Text]], bar_width: int) -> None:
        self.rows = rows
        self.bar_width = bar_width
        self.lead = 8 + 1 + 8 + 1 + bar_width + 1

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        # Never more room than the line has: ``out`` crops, it would cut text.
        room = max(1, options.max_width - self.lead)
        indent = " " * self.lead
        out = Text(no_wrap=True, overflow="crop", end="")
        out.append(f"{'START':>8} {'DUR':>8} {'':<{self.bar_width}} EVENT\n", style="bold")
        for prefix, body in self.rows:
            if body.cell_len <= room:
                out.append_text(prefix)
                out.append_text(body)
                out.append("\n")
                continue
            for index, part in enumerate(body.wrap(console, room, overflow="fold")):
                if index:
                    out.append(indent)
                else:
                    out.append_text(prefix)
                out.append_text(part)
                out.append("\n")
        yield out


def _start(value: float) -> str:
    """An event's start offset in milliseconds, in the 8 columns it has:
    fewer decimals once it is 10 seconds or later, and an exponent when even
    whole milliseconds do not fit (after 27 hours, or an offset from another
    server's JSON): a longer one would push the event's name off its line.
    """
    for decimals in (3, 2, 1, 0):
        text = f"{value:.{decimals}f}"
        if len(text) <= 8:
            return text
    return f"{value:.0e}"


#: Kinds a timeline cut to ``max_rows`` always shows: the request's steps
#: and its hooks, what a hook order question is about.
_KEPT_KINDS = HOOK_KINDS | {
    "request",
    "app",
    "url_match",
    "start_response",
    "first_byte",
    "body",
    "write",
    "file_wrapper",
    "close",
    "error",
    "tracer_error",
}


def _rows_shown(events: list[Event], max_rows: int | None) -> set[int] | None:
    """Indexes of the events a timeline of at most ``max_rows`` rows shows:
    every event of :data:`_KEPT_KINDS`, then the others (signals, spans,
    logs, ...) in order while there is room. ``None``: all of them.
    """
    if max_rows is None or len(events) <= max_rows:
        return None
    kept = {i for i, event in enumerate(events) if event.kind in _KEPT_KINDS}
    room = max_rows - len(kept)
    for i in range(len(events)):
        if room <= 0:
            break
        if i not in kept:
            kept.add(i)
            room -= 1
    return kept


def _cut_row(cut: list[Event], bar_width: int) -> tuple[Text, Text]:
    """The row standing for consecutive events a cut timeline leaves out."""
    counts: dict[str, int] = {}
    for event in cut:
        counts[event.kind] = counts.get(event.kind, 0) + 1
    kinds = ", ".join(f"{kind} ×{count}" for kind, count in counts.items())
    events = f"{len(cut)} event{'' if len(cut) == 1 else 's'}"
    prefix = Text(" " * (8 + 1 + 8 + 1 + bar_width + 1))
    return prefix, _text(f"… {events} not shown ({kinds})", "dim")


def _event_rows(
    trace: Trace, full: bool, bar_width: int, max_rows: int | None = None
) -> _Waterfall:
    events = trace.events
    total = trace.duration_ns or max((e.end_ns for e in events), default=0)
    rows = []
    thread = _request_thread(trace, events)
    others: dict[int, int] = {}  # another thread's id -> its number, from 2
    shown = _rows_shown(events, max_rows)
    cut: list[Event] = []
    for index, (event, depth) in enumerate(zip(events, _depths(events, thread), strict=True)):
        if shown is not None and index not in shown:
            cut.append(event)
            continue
        if cut:
            rows.append(_cut_row(cut, bar_width))
            cut = []
        style = _KIND_STYLES.get(event.kind, "cyan" if event.kind in HOOK_KINDS else "")
        prefix = Text(f"{_start(event.start_ms):>8} ", style="dim")
        duration = format_ms(event.duration_ms) if event.duration_ns else ""
        prefix.append(f"{duration:>8} ", style="dim")
        bar = _bar(event, total, bar_width)
        bar.pad_right(bar_width - bar.cell_len)
        prefix.append_text(bar)
        prefix.append(" ")
        name = Text("  " * depth)
        name.append_text(_text(event.name, style))
        details = _details(event, trace, full)
        if event.thread != thread:
            number = others.setdefault(event.thread, len(others) + 2)
            label = Text(f"[thread {number}]", style="italic")
            details = label.append("  ").append_text(details) if details else label
        if details:
            name.append("  ")
            name.append_text(details)
        rows.append((prefix, name))
    if cut:
        rows.append(_cut_row(cut, bar_width))
    return _Waterfall(rows, bar_width)


def _pairs_table(title: str, pairs: Iterable[tuple[object, object]]) -> Table:
    table = Table(box=None, pad_edge=False, padding=(0, 1), show_header=False, title_justify="left")
    table.add_column(style="bold", no_wrap=True, max_width=32, overflow="fold")
    table.add_column(ratio=1, overflow="fold")
    for key, value in pairs:
        table.add_row(_text(key), _text(value))
    table.title = Text(title, style="bold underline")
    return table


def _flat_pairs(flat: tuple[str, ...]) -> list[tuple[str, str]]:
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat) - 1, 2)]


def _state(trace: Trace, full: bool) -> list[RenderableType]:
    parts: list[RenderableType] = []
    if trace.error:
        error = Text()
        error.append("error ", style="bold red")
        error.append_text(_text(_short_type(trace.error.get("type", "")), "bold red"))
        if trace.error.get("where"):
            error.append_text(_text(f" (in {trace.error['where']})", "red"))
        message = trace.error.get("message")
        if message:
            error.append(": ")
            error.append_text(_text(message))
        if full and trace.error.get("traceback"):
            error.append("\n")
            error.append_text(_text(trace.error["traceback"].rstrip("\n"), "dim", newlines=True))
        parts.append(error)
    for warning in trace.warnings or ():
        parts.append(_text(f"⚠ {warning}", "yellow"))
    if trace.dropped_events:
        parts.append(_text(f"{trace.dropped_events} events dropped (max_events)", "yellow"))
    if trace.truncated:
        cut = ", ".join(f"{k} ×{v}" for k, v in trace.truncated.items())
        parts.append(_text(f"truncated: {cut}", "dim"))
    if trace.g:
        if full:
            parts.append(_pairs_table("g", trace.g.items()))
        else:
            parts.append(_text("g: " + ", ".join(trace.g), "magenta"))
    if full:
        info = [("remote address", trace.remote_addr or "-")]
        if trace.rule:
            info.append(("rule", trace.rule))
        if trace.view_args:
            info.append(("view args", repr(trace.view_args)))
        chunks, sent = trace.chunks, trace.bytes_sent
        body = f"{chunks} chunk{'' if chunks == 1 else 's'}, {sent} byte{'' if sent == 1 else 's'}"
        info.append(("body", body))
        if trace.content_length is not None:
            info.append(("content-length", str(trace.content_length)))
        if trace.session_keys:
            info.append(("session keys", ", ".join(trace.session_keys)))
        parts.append(_pairs_table("request", info))
        if trace.request_headers:
            parts.append(_pairs_table("request headers", _flat_pairs(trace.request_headers)))
        if trace.response_headers:
            parts.append(_pairs_table("response headers", _flat_pairs(trace.response_headers)))
    return parts


def build_timeline(
    trace: Trace, *, full: bool = False, bar_width: int = 16, max_rows: int | None = None
) -> RenderableType:
    """The ordered timeline of one trace: a waterfall of its events (nested
    by containment) with hook names, blueprints, durations, short-circuits,
    ``g`` changes and errors, followed by its state.

    :param trace: The trace (rebuild one read from ``/_trace/<id>`` with
        :meth:`Trace.from_dict`).
    :param full: Also show headers, the ``g`` snapshot, request details,
        the traceback and hook functions' qualified names.
    :param bar_width: Columns used by the waterfall bars.
    :param max_rows: Show at most this many events (more when the trace has
        more hooks and WSGI steps, which are always shown); each run of
        signals, spans, logs and the like left out is one row that counts
        them. ``None``: every event.
    """
    rows = _event_rows(trace, full, bar_width, max_rows)
    return Group(_header(trace, full), rows, *_state(trace, full))


def render_text(renderable: RenderableType, width: int = 80) -> str:
    """Render to plain text (no colour or control codes) ``width`` columns wide."""
    buffer = io.StringIO()
    console = Console(
        file=buffer,
        width=width,
        color_system=None,
        force_terminal=False,
        force_jupyter=False,
        force_interactive=False,
        no_color=True,
        highlight=False,
        markup=False,
        emoji=False,
        legacy_windows=False,
        soft_wrap=False,
    )
    console.print(renderable)
    return "\n".join(line.rstrip() for line in buffer.getvalue().split("\n"))
