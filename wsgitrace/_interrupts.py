"""Interrupts of the ``wsgitrace`` command: SIGINT and SIGTERM as
:exc:`KeyboardInterrupt`, held back while output is being written.

::

    _sigterm_as_interrupt()           # SIGINT and SIGTERM raise KeyboardInterrupt
    try:
        with _interrupts.deferred():  # ... after the block, never in the middle of it
            console.print(table)
    except KeyboardInterrupt:
        pass
    finally:
        _interrupts.stopping()        # a second Ctrl-C cannot cut the clean-up short
        server.server_close()
        _interrupts.restore()         # the handlers it replaced, back

Used by :mod:`wsgitrace.cli` and its views in :mod:`wsgitrace._output`.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType
from typing import Any


class _Interrupts:
    """SIGINT and SIGTERM raise :exc:`KeyboardInterrupt`, except while output
    is being written (rich would write a half-printed render again when the
    live display stops): then they take effect when the write is done. Only
    the first one counts: the command is stopping, and a second Ctrl-C must
    not cut its clean-up short.
    """

    def __init__(self) -> None:
        self.depth = 0
        self.pending = False
        self.interrupted = False
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        self.interrupted = self.pending = False  # a new command (tests run several)
        with contextlib.suppress(ValueError):  # not the main thread
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handler)

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.interrupted:
            return
        self.interrupted = True
        if self.depth:
            self.pending = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Hold interrupts back inside the block."""
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if not self.depth and self.pending:
                self.pending = False
                raise KeyboardInterrupt

    def stopping(self) -> None:
        """Until :meth:`restore`, interrupts do nothing: the command is
        cleaning up.
        """
        self.interrupted = True

    def restore(self) -> None:
        """The handlers :meth:`install` replaced, back: once the command has
        cleaned up, Ctrl-C and SIGTERM must still end a process that waits
        for the app's threads (and a host process gets its own back).
        """
        previous, self._previous = self._previous, {}
        with contextlib.suppress(ValueError, TypeError):  # not the main thread
            for signum, handler in previous.items():
                signal.signal(signum, handler)


#: The one instance: the commands and the views share it.
_interrupts = _Interrupts()


def _sigterm_as_interrupt() -> None:
    """Take SIGINT/SIGTERM until the command's clean-up (a ``finally``)
    calls ``_interrupts.restore()``.
    """
    _interrupts.install()
