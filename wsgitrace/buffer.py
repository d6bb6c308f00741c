"""A bounded, thread-safe ring buffer of traces.

::

    buffer = TraceBuffer(max_traces=500, max_bytes=8 * 1024 * 1024)
    app = TraceMiddleware(app, buffer=buffer)
    ...
    buffer.latest(10)             # newest first
    buffer.since(cursor)          # oldest first, everything after ``cursor``
    buffer.wait(cursor, timeout=5)

Every trace gets a monotonic :attr:`~wsgitrace.Trace.cursor` when it enters.
The buffer is bounded by trace count and by approximate bytes; whatever is
evicted is counted in :attr:`TraceBuffer.dropped`.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator

from ._internal import report_internal_error
from .exceptions import ConfigurationError
from .trace import Trace


class TraceBuffer:
    """Keeps the most recent traces.

    Appending is O(1) and takes one short lock. Traces finished later (when
    their response is closed, or from a garbage-collection finalizer) are
    queued without the lock and accounted on the next append or read, so a
    finalizer never waits for the lock.

    :param max_traces: Most traces kept.
    :param max_bytes: Most approximate bytes kept, counted when traces finish.
    :param get_time: Clock used by :meth:`wait` (seconds, monotonic).
    """

    def __init__(
        self,
        max_traces: int = 1000,
        max_bytes: int = 32 * 1024 * 1024,
        *,
        get_time: Callable[[], float] | None = None,
    ) -> None:
        if not isinstance(max_traces, int) or isinstance(max_traces, bool) or max_traces < 1:
            msg = f"max_traces must be a positive integer, got {max_traces!r}"
            raise ConfigurationError(msg)
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 1:
            msg = f"max_bytes must be a positive integer, got {max_bytes!r}"
            raise ConfigurationError(msg)
        self.max_traces = max_traces
        self.max_bytes = max_bytes
        self._get_time = get_time or time.monotonic
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._traces: deque[Trace] = deque()
        self._finished: deque[Trace] = deque()
        self._cursor = 0
        self._bytes = 0
        self._waiters = 0
        self._notified = 0
        #: Traces evicted because the buffer held :attr:`max_traces`.
        self.dropped_count = 0
        #: Traces evicted to stay under :attr:`max_bytes`.
        self.dropped_bytes = 0
        # A test capture reads what was evicted while it ran from here.
        _buffers.add(self)

    # -- write side ---------------------------------------------------------

    def append(self, trace: Trace) -> int:
        """Add a trace (finished or in progress) and return its cursor."""
        with self._lock:
            self._cursor = cursor = self._cursor + 1
            trace.cursor = cursor
            traces = self._traces
            traces.append(trace)
            if len(traces) > self.max_traces:
                old = traces.popleft()
                old.evicted = True
                self._bytes -= old._size
                self.dropped_count += 1
            if self._finished:
                self._account_finished()
            if self._waiters:
                self._changed.notify_all()
        return cursor

    def finished(self, trace: Trace) -> None:
        """Queue a trace that just finished for byte accounting. Lock-free, so
        it is safe from finalizers.
        """
        self._finished.append(trace)

    def _account_finished(self) -> None:
        pending = self._finished
        while pending:
            trace = pending.popleft()
            if trace.evicted or trace.cursor == 0 or trace._size:
                continue
            try:
                trace._size = trace._estimate_size()
            except Exception:  # e.g. an app's header value that is not a str
                report_internal_error("estimate_size", trace)
                trace._size = 4096
            self._bytes += trace._size
        while self._bytes > self.max_bytes and len(self._traces) > 1:
            self._evict_oldest()
            self.dropped_bytes += 1
        if self._bytes > self.max_bytes and self._traces:
            # A single trace larger than the whole cap is not kept either.
            self._evict_oldest()
            self.dropped_bytes += 1

    def _evict_oldest(self) -> None:
        old = self._traces.popleft()
        old.evicted = True
        self._bytes -= old._size

    def clear(self) -> None:
        """Forget every trace (the cursor keeps counting)."""
        with self._lock:
            for trace in self._traces:
                trace.evicted = True
            self._traces.clear()
            self._finished.clear()
            self._bytes = 0

    # -- read side ----------------------------------------------------------

    def _snapshot(self) -> list[Trace]:
        with self._lock:
            if self._finished:
                self._account_finished()
            return list(self._traces)

    def __len__(self) -> int:
        return len(self._traces)

    def __iter__(self) -> Iterator[Trace]:
        """Iterate over a snapshot, oldest first."""
        return iter(self._snapshot())

    @property
    def cursor(self) -> int:
        """Cursor of the newest trace ever appended (0 when none)."""
        return self._cursor

    @property
    def dropped(self) -> int:
        """Traces evicted by either cap."""
        return self.dropped_count + self.dropped_bytes

    @property
    def bytes(self) -> int:
        """Approximate bytes held by finished traces."""
        with self._lock:
            if self._finished:
                self._account_finished()
            return self._bytes

    def get(self, trace_id: str) -> Trace | None:
        """The trace with this id, or ``None``."""
        for trace in reversed(self._snapshot()):
            if trace.id == trace_id:
                return trace
        return None

    def latest(self, n: int | None = None) -> list[Trace]:
        """Up to ``n`` traces (all when ``None``), newest first."""
        traces = self._snapshot()
        traces.reverse()
        return traces if n is None else traces[: max(n, 0)]

    @property
    def last(self) -> Trace | None:
        """The newest trace, or ``None``."""
        with self._lock:
            return self._traces[-1] if self._traces else None

    def since(self, cursor: int, limit: int | None = None) -> list[Trace]:
        """Traces appended after ``cursor``, oldest first, at most ``limit``.

        Cursors are assigned under the lock in append order, so walking with
        ``since(last_seen_cursor)`` never skips or repeats a trace that is
        still held.
        """
        with self._lock:
            if self._finished:
                self._account_finished()
            found: list[Trace] = []
            for trace in reversed(self._traces):
                if trace.cursor <= cursor:
                    break
                found.append(trace)
        found.reverse()
        return found if limit is None else found[:limit]

    def wait(self, cursor: int, timeout: float | None = None) -> bool:
        """Block until a trace newer than ``cursor`` is appended, the timeout
        passes or :meth:`notify` is called.

        :return: ``True`` if one is there, ``False`` on timeout or notify.
        """
        deadline = None if timeout is None else self._get_time() + timeout
        with self._lock:
            self._waiters += 1
            woken = self._notified
            try:
                while self._cursor <= cursor:
                    if self._notified != woken:
                        # notify(): give up early, as on a timeout.
                        return False
                    if deadline is None:
                        self._changed.wait()
                        continue
                    remaining = deadline - self._get_time()
                    if remaining <= 0:
                        return False
                    self._changed.wait(remaining)
                return True
            finally:
                self._waiters -= 1

    def notify(self) -> None:
        """Make every :meth:`wait` return now (used when a server shuts down)."""
        with self._lock:
            self._notified += 1
            self._changed.notify_all()

    def __repr__(self) -> str:
        return (
            f"<TraceBuffer {len(self._traces)}/{self.max_traces} traces,"
            f" cursor={self._cursor}, dropped={self.dropped}>"
        )


#: The buffers of this process, held weakly: a test capture notes their
#: eviction counts when it starts (see :mod:`wsgitrace.testing`).
_buffers: weakref.WeakSet[TraceBuffer] = weakref.WeakSet()
