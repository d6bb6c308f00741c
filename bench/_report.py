"""Helpers shared by the bench scripts: statistics, machine facts, Markdown.

::

    from _report import machine_info, spread, markdown_table

    stats = spread([1.0, 1.2, 1.1])   # {"median": 1.1, "min": 1.0, "max": 1.2, "n": 3}
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import sys
from collections.abc import Iterable, Sequence
from typing import Any

#: Markers delimiting the generated block in README.md.
README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of ``values`` (and how many)."""
    if not values:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def fmt_spread(stats: dict[str, float], digits: int = 1, suffix: str = "") -> str:
    """``median (min–max)`` with ``digits`` decimals."""
    if not stats.get("n"):
        return "–"
    return (
        f"{stats['median']:.{digits}f}{suffix}"
        f" ({stats['min']:.{digits}f}–{stats['max']:.{digits}f})"
    )


def cpu_model() -> str:
    """The CPU model from ``/proc/cpuinfo`` (or :func:`platform.processor`)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def machine_info() -> dict[str, Any]:
    """Facts a reader needs to compare results: machine, versions, date."""
    return {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "flask": _version("flask"),
        "werkzeug": _version("werkzeug"),
        "opentelemetry_sdk": _version("opentelemetry-sdk"),
        "opentelemetry_instrumentation_flask": _version("opentelemetry-instrumentation-flask"),
        "gunicorn": _version("gunicorn"),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "argv": " ".join(sys.argv),
    }


def machine_markdown(info: dict[str, Any]) -> str:
    """One paragraph describing the machine and versions."""
    return (
        f"Machine: {info['cpu']} ({info['cpus']} CPUs), {info['platform']}; "
        f"{info['python']}, Flask {info['flask']}, Werkzeug {info['werkzeug']}, "
        f"OpenTelemetry SDK {info['opentelemetry_sdk']} / instrumentation-flask "
        f"{info['opentelemetry_instrumentation_flask']}, gunicorn {info['gunicorn']}; "
        f"{info['date']}."
    )


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return "\n".join(lines)


def text_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A plain table with aligned columns, for a terminal."""
    rows = [list(row) for row in rows]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * width for width in widths))
    lines.extend(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    )
    return "\n".join(line.rstrip() for line in lines)


def table(header: Sequence[str], rows: Iterable[Sequence[str]], *, markdown: bool) -> str:
    """:func:`markdown_table` or :func:`text_table`."""
    return markdown_table(header, rows) if markdown else text_table(header, rows)


def verdict(ok: bool | None) -> str:
    """``pass``, ``FAIL`` or ``pending`` (not measured yet)."""
    if ok is None:
        return "pending"
    return "pass" if ok else "FAIL"


def replace_readme_block(readme: str, section: str, body: str) -> str:
    """Put ``body`` into README's bench block as ``section``.

    The block between :data:`README_START` and :data:`README_END` holds one
    sub-block per script (``inprocess``, ``serve``), each between its own
    markers, so running one script keeps the other's results.

    :raises ValueError: the outer markers are missing.
    """
    outer = re.compile(re.escape(README_START) + r"(.*?)" + re.escape(README_END), re.DOTALL)
    match = outer.search(readme)
    if match is None:
        msg = f"README has no {README_START} ... {README_END} block"
        raise ValueError(msg)
    start, end = f"<!-- bench:{section}:start -->", f"<!-- bench:{section}:end -->"
    inner_text = f"{start}\n{body.strip()}\n{end}"
    inner = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    content = match.group(1)
    if inner.search(content):
        content = inner.sub(lambda _: inner_text, content, count=1)
    else:
        content = content.rstrip("\n") + "\n" + inner_text + "\n"
        if not content.startswith("\n"):
            content = "\n" + content
    return readme[: match.start(1)] + content + readme[match.end(1) :]
