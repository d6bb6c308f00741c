"""Helpers shared by the bench scripts: statistics, machine facts, Markdown.

::

    from _report import machine_info, spread, markdown_table

    stats = spread([1.0, 1.2, 1.1])   # {"median": 1.1, "min": 1.0, "max": 1.2, "n": 3}
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

#: Markers delimiting the generated block in README.md.
README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"

#: Order of the sub-blocks inside the README block.
SECTION_ORDER = {"inprocess": 0, "serve": 1}


#: Other processes using more CPU than this (in CPUs) during a measurement
#: make it "contended".
CONTENTION_THRESHOLD = 0.25


def _busy_seconds() -> float | None:
    """CPU-seconds all CPUs spent busy since boot (``/proc/stat``)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _pid_seconds(pid: int) -> float:
    """CPU-seconds used by process ``pid`` (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMonitor:
    """Measures how much CPU *other* processes used while a block ran: all
    CPUs' busy time minus this process, its reaped children and ``pids``.

    ::

        with CpuMonitor() as monitor:
            run()
        monitor.other_cpus  # e.g. 0.02; ``None`` without /proc
    """

    def __init__(self, pids: Sequence[int] = ()) -> None:
        self.pids = list(pids)
        self.other_cpus: float | None = None

    def _own(self) -> float:
        t = os.times()
        return (
            t.user
            + t.system
            + t.children_user
            + t.children_system
            + sum(_pid_seconds(pid) for pid in self.pids)
        )

    def __enter__(self) -> CpuMonitor:
        self._wall = time.monotonic()
        self._busy = _busy_seconds()
        self._own0 = self._own()
        return self

    def __exit__(self, *exc: object) -> None:
        busy = _busy_seconds()
        wall = time.monotonic() - self._wall
        if busy is None or self._busy is None or wall <= 0:
            return
        other = (busy - self._busy) - (self._own() - self._own0)
        self.other_cpus = max(0.0, other / wall)

    @property
    def contended(self) -> bool:
        return self.other_cpus is not None and self.other_cpus > CONTENTION_THRESHOLD


def wait_quiet(timeout: float, probe: float = 1.0) -> float | None:
    """Wait (up to ``timeout`` seconds) until other processes use at most
    :data:`CONTENTION_THRESHOLD` CPUs over a ``probe``-second window; return
    the last reading (``None`` without /proc).
    """
    deadline = time.monotonic() + timeout
    announced = False
    while True:
        with CpuMonitor() as monitor:
            time.sleep(probe)
        if not monitor.contended or time.monotonic() >= deadline:
            return monitor.other_cpus
        if not announced:
            print(
                f"other processes use {monitor.other_cpus:.1f} CPUs; waiting up to"
                f" {timeout:.0f} s for a quiet machine ...",
                file=sys.stderr,
            )
            announced = True


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
    """``pass``, ``FAIL`` or ``pending`` (not measured: e.g. its configuration was left out)."""
    if ok is None:
        return "pending"
    return "pass" if ok else "FAIL"


#: A phrase each script's report contains, to recognise a pasted report.
SECTION_SIGNATURES = {"inprocess": "In-process, ", "serve": "gunicorn, 1 sync worker"}


def replace_readme_block(readme: str, section: str, body: str) -> str:
    """Put ``body`` into README's bench block as ``section``.

    The block between :data:`README_START` and :data:`README_END` holds one
    sub-block per script (``inprocess``, then ``serve``), each between its own
    markers, so running one script keeps the other's results. Text in the
    block outside any sub-block (e.g. a report pasted by hand) is kept: as the
    sub-block of the script whose report it is (see
    :data:`SECTION_SIGNATURES`; replaced when that is ``section``), else
    verbatim before the sub-blocks.

    :raises ValueError: the outer markers are missing.
    """
    outer = re.compile(re.escape(README_START) + r"(.*?)" + re.escape(README_END), re.DOTALL)
    match = outer.search(readme)
    if match is None:
        msg = f"README has no {README_START} ... {README_END} block"
        raise ValueError(msg)
    inner = re.compile(r"<!-- bench:(\w+):start -->\n?(.*?)\n?<!-- bench:\1:end -->", re.DOTALL)
    sections = {m.group(1): m.group(2) for m in inner.finditer(match.group(1))}
    loose = inner.sub("", match.group(1)).strip()
    if loose:
        owner = next((name for name, sign in SECTION_SIGNATURES.items() if sign in loose), None)
        if owner is not None:
            sections.setdefault(owner, loose)
            loose = ""
    sections[section] = body.strip()
    order = sorted(sections, key=lambda name: (SECTION_ORDER.get(name, 99), name))
    parts = [loose] if loose else []
    parts.extend(
        f"<!-- bench:{name}:start -->\n{sections[name]}\n<!-- bench:{name}:end -->"
        for name in order
    )
    return readme[: match.start(1)] + "\n" + "\n\n".join(parts) + "\n" + readme[match.end(1) :]


def emit(
    data: dict[str, Any],
    render: Any,
    *,
    markdown: bool,
    json_path: str | None,
    readme_path: str | None,
    section: str,
    title: str,
) -> int:
    """Print the report, save it as JSON, rewrite its README block; the exit
    status is 1 when a budget conclusively fails.
    """
    import json

    print(render(data, markdown=markdown))
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
    if readme_path:
        with open(readme_path, encoding="utf-8") as f:
            readme = f.read()
        block = f"#### {title}\n\n" + render(data, markdown=True)
        with open(readme_path, "w", encoding="utf-8") as f:
            f.write(replace_readme_block(readme, section, block))
    return 1 if any(b["ok"] is False and not b.get("status") for b in data["budgets"]) else 0


def add_timing_options(
    parser: argparse.ArgumentParser, *, rounds: int, requests: int, warmup: int
) -> None:
    """``--rounds``, ``--requests``, ``--warmup`` and ``--json``, with these
    defaults, for the small experiments (``isolation.py``, ``diversity.py``).
    """
    parser.add_argument(
        "--rounds", type=int, default=rounds, help=f"interleaved rounds (default {rounds})"
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=requests,
        help=f"requests per app per round (default {requests})",
    )
    parser.add_argument(
        "--warmup", type=int, default=warmup, help=f"warm-up requests per app (default {warmup})"
    )
    parser.add_argument("--json", help="also write the results as JSON to this file")


def parse_timing_options(
    parser: argparse.ArgumentParser, argv: list[str] | None, *, positive: Sequence[str]
) -> argparse.Namespace:
    """Parse ``argv``; the ``positive`` options (dest names) and ``--rounds``
    and ``--requests`` must be at least 1, ``--warmup`` not negative.
    """
    args = parser.parse_args(argv)
    for option in ("rounds", "requests", *positive):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    return args


def print_and_save(text: str, data: dict[str, Any], json_path: str | None) -> None:
    """Print a report and write its data as JSON to ``json_path``, if given."""
    import json

    print(text)
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
