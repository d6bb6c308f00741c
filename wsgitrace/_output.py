"""Output of the ``wsgitrace`` command: its consoles, its messages and the
views that ``tail`` and ``demo`` follow traces into.

::

    view = _JsonView() if as_json else _HumanView(verbose)
    _Follow(client, view, filters, lines, full=verbose).run()
    _message(_console(stderr=True), "wsgitrace: stopped", "dim")

Output is coloured, with a status line, only when a person is watching (a
terminal); the JSON view writes only JSON to stdout and every message to
stderr. Messages never read markup, and their text is escaped with
:func:`wsgitrace.render.safe`.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from typing import Any, TextIO

from rich.console import Console
from rich.live import Live
from rich.text import Text

from ._client import _View
from ._interrupts import _interrupts
from .render import build_timeline, build_trace_table, safe
from .trace import Trace


class _Console(Console):
    """rich's console, except that the output's reader leaving (``| head -1``)
    raises :exc:`BrokenPipeError`, which the commands stop on quietly, rather
    than rich's ``SystemExit`` from inside whatever was printing.
    """

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))


def _console(*, stderr: bool = False) -> Console:
    """A console on stdout or stderr that never highlights or reads markup."""
    return _Console(stderr=stderr, highlight=False, markup=False, emoji=False)


def _stdout() -> TextIO:
    """``sys.stdout``; an :exc:`OSError` when the process has none (started
    with it closed), as writing to a closed one would be.
    """
    out = sys.stdout
    if out is None:
        raise OSError(errno.EBADF, "standard output is closed")
    return out


def _watched(console: Console) -> bool:
    """Whether a person watches ``console``: it writes to an interactive
    terminal. ``FORCE_COLOR`` makes rich colour a pipe or a file too, but
    a status line (cursor movements) and messages must not end up there.
    """
    isatty = getattr(console.file, "isatty", None)
    try:
        return console.is_interactive and isatty is not None and bool(isatty())
    except ValueError:  # closed
        return False


def _bar_width(width: int) -> int:
    """The waterfall bars' width in a timeline ``width`` columns wide: what
    is left for the event names is never less than on an 80-column line.
    """
    return max(8, min(24, (width - 60) // 2))


def _message(console: Console, text: str, style: str = "") -> None:
    """Print one of our own messages (never markup; request text escaped)."""
    console.print(Text(safe(text, newlines=True), style=style), soft_wrap=True)


class _JsonView(_View):
    """One JSON object per line on stdout, flushed; messages on stderr."""

    def __init__(self) -> None:
        self._err = _console(stderr=True)

    def traces(self, items: list[dict[str, Any]]) -> None:
        # As the human view: a Ctrl-C or SIGTERM takes effect after the
        # lines are counted, so the closing "N shown" counts every one printed.
        with _interrupts.deferred():
            out = _stdout()
            for item in items:
                out.write(json.dumps(item, ensure_ascii=True) + "\n")
                out.flush()
                # Line by line: a reader that goes away (| head -1) fails a
                # later line, and the closing count is of the lines it got.
                self.shown += 1

    def message(self, text: str, style: str = "") -> None:
        _message(self._err, text, style)


class _HumanView(_View):
    """Rows (and timelines with ``verbose``) on stdout; a status line when
    stdout is a terminal, messages there too, else on stderr.
    """

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.console = _console()
        self._tty = _watched(self.console)
        self._err = self.console if self._tty else _console(stderr=True)
        self._live: Live | None = None
        self._header_done = False

    def start(self) -> None:
        if self._tty:
            self._live = Live(
                Text(""),
                console=self.console,
                auto_refresh=False,
                transient=True,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._live.start()

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def traces(self, items: list[dict[str, Any]]) -> None:
        with _interrupts.deferred():
            self._print(items)

    def _print(self, items: list[dict[str, Any]]) -> None:
        console = self.console
        show_id = console.width >= 110
        if not self.verbose:
            if not self._header_done:
                console.print(build_trace_table([], show_id=show_id, width=console.width))
                self._header_done = True
            console.print(
                build_trace_table(items, show_header=False, show_id=show_id, width=console.width)
            )
        else:
            bar_width = _bar_width(console.width)
            for item in items:
                console.print(build_timeline(Trace.from_dict(item), bar_width=bar_width))
                console.print()
        self.shown += len(items)
        if self._live is not None:
            self._live.refresh()

    def message(self, text: str, style: str = "") -> None:
        with _interrupts.deferred():
            _message(self._err, text, style)

    def status(self, text: str) -> None:
        if self._live is not None:
            with _interrupts.deferred():
                self._live.update(Text(safe(text), style="dim"), refresh=True)
