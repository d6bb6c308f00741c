"""Sinks: where finished traces go besides the in-memory buffer.

A sink is any object with ``write(traces)`` and ``close()`` (see
:class:`Sink`). A :class:`SinkDispatcher` hands each finished trace to every
sink on a background thread per sink, behind a bounded queue, so a request
never waits for a sink::

    dispatcher = SinkDispatcher([TraceStore("/tmp/traces.db")])
    dispatcher.start()
    dispatcher.submit(trace)    # lock-free; safe from a finalizer
    dispatcher.close()          # deliver what is queued, then close the sinks

:meth:`SinkDispatcher.submit` only appends to a :class:`collections.deque`
(atomic, takes no lock), because a trace can finish inside a garbage
collection finalizer, which may run while the same thread holds any lock.
The worker threads poll their queue every :data:`POLL_SECONDS`, so traces
reach a sink within about a tenth of a second.

A full queue (a slow or hung sink) drops the trace and counts it in
:attr:`SinkDispatcher.dropped`; an exception from a sink is counted in
:attr:`SinkDispatcher.failed` and logged once per sink. A sink whose thread
cannot start (``RuntimeError: can't start new thread``) is tried once per
process: its traces are counted in :attr:`SinkDispatcher.failed`, and that is
logged once. A trace submitted once the dispatcher is closed is never
delivered either: it is counted in :attr:`SinkDispatcher.failed` at once,
not queued. None of these ever reaches the request.

Queues are flushed at interpreter exit (for up to :data:`EXIT_SECONDS`), and
are made new in a forked child (``os.register_at_fork``): a pre-forked
gunicorn worker starts its own threads the first time it serves a request,
and each sink drops its connections (:meth:`Sink.after_fork`) on its own
thread before it writes again, never in the fork handler itself, where a
lock another thread held at the fork (a thread pool's, a logging handler's)
would hang the child.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .config import Options
    from .trace import Trace

__all__ = ["Sink", "SinkDispatcher", "build_sinks"]

logger = logging.getLogger("wsgitrace")

#: Seconds a worker thread sleeps when its queue is empty.
POLL_SECONDS = 0.05
#: Most traces handed to a sink in one ``write`` call.
BATCH_SIZE = 256
#: Seconds the exit handler waits, in all, for queued traces to be delivered.
EXIT_SECONDS = 2.0


@runtime_checkable
class Sink(Protocol):
    """Where finished traces are written, off the request path.

    ``write`` is called on the sink's own thread with a batch of finished
    traces, oldest first; it may block (the queue fills and drops meanwhile)
    and may raise (the batch is counted as failed, or only
    ``exc.undelivered`` traces of it when the exception has that count: a
    sink that wrote the others, or left out a trace it could not convert).
    ``close`` is called once, after the last ``write``. A sink may also
    define ``after_fork()``, called in a forked child before its next
    ``write`` or ``close`` (not in the fork handler), to drop connections
    inherited from the parent without closing them.
    """

    def write(self, traces: Sequence[Trace]) -> None: ...

    def close(self) -> None: ...


class _CollectErrors:
    """Run several steps, keep their exceptions, and raise them together at
    the end (as Flask's ``ctx._CollectErrors`` does for teardown).
    """

    def __init__(self) -> None:
        self.errors: list[Exception] = []

    def __enter__(self) -> _CollectErrors:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if isinstance(exc, Exception):
            self.errors.append(exc)
            return True
        return False

    def raise_any(self, message: str) -> None:
        """Raise the collected exception(s), if any: one as is, several as an
        ``ExceptionGroup`` (the first one on Python 3.10).
        """
        if not self.errors:
            return
        if len(self.errors) == 1 or sys.version_info < (3, 11):
            raise self.errors[0]
        raise ExceptionGroup(message, self.errors)  # noqa: F821 - builtin on 3.11+


class _SinkWorker:
    """One sink, its queue and its thread."""

    def __init__(self, sink: Sink, max_queue: int, poll: float) -> None:
        self.sink = sink
        self.name = getattr(sink, "name", type(sink).__name__)
        self.max_queue = max_queue
        # What submit() lets wait: 0 once the queue is shut (see shut()).
        self.capacity = max_queue
        # The thread could not start (in this process): never tried again.
        self.start_failed = False
        # The queue is shut (the thread could not start, or the sinks were
        # closed): traces dropped since (``dropped`` above
        # ``dropped_at_failure``) count as failed, not as a full queue's.
        self.shut_down = False
        self.dropped_at_failure = 0
        # Taken by whoever counts what such a queue holds (see discard()).
        self.discard_lock = threading.Lock()
        self.poll = poll
        self.queue: deque[Trace] = deque()
        self.thread: threading.Thread | None = None
        self.stop = threading.Event()
        # The stop event of the thread that ended last, and whether that
        # thread is to close the sink (close() timed out waiting for it).
        self.ended: threading.Event | None = None
        self.close_at_end = False
        self.end_lock = threading.Lock()
        # Held by the one thread writing to the sink: its own, or a flush's
        # before it starts. Only ever tried, never waited on (under gevent a
        # greenlet blocked on a real lock blocks the one holding it too).
        self.write_lock = threading.Lock()
        self.busy = False
        self.closed = False
        # The sink's close() has run (under the write lock, so never during a
        # write, and no write follows it); asked for by close(), done by
        # whoever holds the write lock last (see request_close()).
        self.sink_closed = False
        self.close_pending = False
        self.delivered = 0
        self.failed = 0
        self.logged = False
        self._dropped = itertools.count(1)
        self.dropped = 0
        self.reported = 0
        # Set in a forked child; the sink's after_fork() runs before its next write.
        self.forked = False

    def submit(self, trace: Trace) -> None:
        # No lock and no allocation beyond the deque's own: finalizer-safe.
        if len(self.queue) >= self.capacity:
            self.dropped = next(self._dropped)
            return
        self.queue.append(trace)

    def start(self) -> None:
        if self.closed or self.start_failed or (self.thread is not None and self.thread.is_alive()):
            return
        self.stop = stop = threading.Event()
        try:
            thread = threading.Thread(
                target=_run_worker,
                args=(weakref.ref(self), stop, self.poll),
                name=f"wsgitrace-sink-{self.name}",
                daemon=True,
            )
            thread.start()
        except Exception as exc:  # RuntimeError: can't start new thread
            self.start_failed = True
            self.thread = None
            self.fail_to_start(exc)
            return
        self.thread = thread
        if self.closed:
            # close() ran since the check above and set the stop event it
            # found, the one before this: either it saw this one, or this
            # sees its 'closed' (each is written before the other is read).
            stop.set()

    def fail_to_start(self, exc: Exception) -> None:
        """The thread cannot start: nothing will take from the queue, so what
        it holds and every trace submitted from now on is lost, counted as
        failed; logged once, like a sink's failure.
        """
        self.shut()
        self.discard()
        if not self.logged:
            self.logged = True
            logger.error(
                "wsgitrace: sink %s cannot start its thread (%s); its traces are not"
                " delivered, and counted as failed; requests are not affected (logged once)",
                self.name,
                exc,
            )

    def shut(self) -> None:
        """Take no more traces: each one submitted from now on is refused
        with no more work than a full queue's, and counted as failed (it
        will never be delivered). Done when the thread cannot start and when
        the sinks are closed.
        """
        if not self.shut_down:
            self.dropped_at_failure = self.dropped
            self.shut_down = True
        self.capacity = 0

    @property
    def dead(self) -> bool:
        """Whether nothing will ever take from the queue: the thread could
        not start, or the sink is closed (no write follows its close).
        """
        return self.start_failed or self.sink_closed

    def discard(self) -> None:
        """Empty a dead queue (see :attr:`dead`), counting what it held as
        failed: nothing else takes from it. Done when the start fails and
        again when the counts or the queue are read, for a submit that read
        the capacity before it became 0 and appended after.
        """
        with self.discard_lock:
            lost = 0
            queue = self.queue
            while queue:
                try:
                    queue.popleft()
                except IndexError:  # pragma: no cover - emptied meanwhile
                    break
                lost += 1
            self.failed += lost

    @property
    def lost(self) -> tuple[int, int]:
        """Traces dropped at a full queue, and traces failed (a sink that
        raised, or a thread that could not start).
        """
        if not self.shut_down:
            return self.dropped, self.failed
        if self.queue and self.dead:
            self.discard()
        dropped = self.dropped
        return self.dropped_at_failure, self.failed + dropped - self.dropped_at_failure

    @property
    def queued(self) -> int:
        """Traces waiting for the sink (none once nothing will take them:
        its thread could not start, or it is closed).
        """
        if self.queue and self.dead:
            self.discard()
        return len(self.queue)

    def deliver(self, limit: int = BATCH_SIZE) -> bool:
        """Write one batch; whether there was anything to write (``False``
        too while another thread is writing one: one writer at a time).
        """
        queue = self.queue
        if not queue or not self.write_lock.acquire(blocking=False):
            return False
        if self.sink_closed:
            self.write_lock.release()
            return False
        # Busy before the queue empties, so drain() never sees neither.
        self.busy = True
        batch: list[Trace] = []
        try:
            while queue and len(batch) < limit:
                batch.append(queue.popleft())
            # Never written with the parent's connections: if dropping them
            # fails, the batch fails, and the next one tries again. Before the
            # losses are told: it starts the sink's counts of this process.
            self.drop_inherited()
            dropped = self.dropped
            if dropped > self.reported:
                # Tell a sink that keeps counts (the store) what never reached it.
                note_lost = getattr(self.sink, "note_lost", None)
                if note_lost is not None:
                    note_lost(dropped - self.reported)
                self.reported = dropped
            self.sink.write(batch)
            self.delivered += len(batch)
        except Exception as exc:
            lost = _undelivered(exc, len(batch))
            self.delivered += len(batch) - lost
            self.failed += lost
            if not self.logged:
                self.logged = True
                logger.error(
                    "wsgitrace: sink %s failed, %d trace(s) not delivered (%s);"
                    " requests are not affected (logged once)",
                    self.name,
                    lost,
                    exc,
                    exc_info=not _is_clear_error(exc),
                )
        finally:
            self.busy = False
            self.write_lock.release()
            if self.close_pending:
                # close() found this write running: the sink closes after it.
                try:
                    self.close_now()
                except Exception:
                    logger.exception("wsgitrace: closing sink %s failed", self.name)
        return True

    def drop_inherited(self) -> None:
        """In a forked child, have the sink drop the connections it inherited
        (its ``after_fork()``), once, before it writes or is closed.
        """
        if self.forked:
            after_fork = getattr(self.sink, "after_fork", None)
            if after_fork is not None:
                after_fork()
            self.forked = False

    def drain(self, deadline: float) -> bool:
        """Deliver what is queued before ``deadline``; whether all was. The
        sink's thread delivers it; this thread only while none runs, and
        never while another (one started meanwhile) writes a batch.
        """
        if self.thread is threading.current_thread():
            # From the sink's own write: its thread delivers the rest after it.
            return not self.queue
        if self.dead:
            # Counted as failed, not written here: a sink whose thread could
            # not start is not started, and nothing is written to a closed
            # one (a trace submitted just as close shut the queue).
            self.discard()
            return True
        while (self.queue or self.busy) and time.monotonic() < deadline:
            thread = self.thread
            if (thread is None or not thread.is_alive()) and self.deliver():
                continue
            time.sleep(0.005)
        return not (self.queue or self.busy)

    def close_sink(self, deadline: float) -> None:
        """Close the sink once its thread has ended, waiting for it until
        ``deadline``; past that (a write still running), the thread closes it
        when its write returns, so ``close`` never runs during a ``write``.
        """
        thread = self.thread
        if thread is threading.current_thread():
            # From the sink's own write: closed when that write returns.
            self.request_close()
            return
        if thread is not None:
            thread.join(max(deadline - time.monotonic(), 0.0))
            with self.end_lock:
                if thread.is_alive() and self.ended is not self.stop:
                    self.close_at_end = True
                    return
        # A flush may still be writing from its own thread: then it closes
        # the sink when its write returns.
        while not self.request_close() and time.monotonic() < deadline:
            time.sleep(0.005)

    def request_close(self) -> bool:
        """Have the sink closed once no write runs: now, if none does
        (whether it was done). Asked first, then tried: a writer that held
        the lock at the try releases it after, sees the request, and closes.
        """
        self.close_pending = True
        return self.close_now()

    def close_now(self) -> bool:
        """Close the sink, once, unless a write runs; whether it is closed."""
        if not self.write_lock.acquire(blocking=False):
            return False
        try:
            if not self.sink_closed:
                self.sink_closed = True
                # A child that never wrote must not close the parent's connections.
                self.drop_inherited()
                self.sink.close()
        finally:
            self.write_lock.release()
        return True

    def after_fork(self) -> None:
        self.queue = deque()
        self.thread = None
        self.stop = threading.Event()
        self.end_lock = threading.Lock()
        self.write_lock = threading.Lock()  # a parent thread may have held it
        self.ended = None
        self.close_at_end = False
        self.busy = False
        # A new process: its thread may well start.
        self.start_failed = False
        self.discard_lock = threading.Lock()
        # Shut still when the sinks were closed (before the fork).
        self.shut_down = self.closed
        self.capacity = 0 if self.closed else self.max_queue
        self.dropped_at_failure = 0
        # This process's counts start at zero (the parent keeps its own).
        self.dropped = self.reported = self.delivered = self.failed = 0
        self.logged = False
        self._dropped = itertools.count(1)
        # Not the sink's after_fork() here: see the module's docstring.
        self.forked = True


def partial_failure(exc: Exception, undelivered: int) -> Exception:
    """``exc`` to raise from a ``write`` that delivered all but
    ``undelivered`` traces of its batch (one that could not be converted,
    say): it carries that count, so only those are counted failed.
    """
    try:
        exc.undelivered = undelivered  # type: ignore[attr-defined]
    except Exception:  # an exception that refuses attributes: wrapped instead
        wrapper = _PartialFailureError(f"{type(exc).__name__}: {exc}")
        wrapper.undelivered = undelivered
        wrapper.__cause__ = exc
        return wrapper
    return exc


class _PartialFailureError(Exception):
    """A sink's error that cannot carry ``undelivered`` itself."""

    undelivered: int


def _undelivered(exc: Exception, size: int) -> int:
    """How many traces of a batch of ``size`` a failed ``write`` lost: its
    exception's ``undelivered`` count (a sink that wrote a part), else all.
    """
    count = getattr(exc, "undelivered", None)
    if isinstance(count, int) and not isinstance(count, bool) and 0 <= count <= size:
        return count
    return size


def _is_clear_error(exc: Exception) -> bool:
    from .exceptions import WsgitraceError

    return isinstance(exc, WsgitraceError)


def _run_worker(ref: weakref.ref[_SinkWorker], stop: threading.Event, poll: float) -> None:
    """The body of a sink's thread. It holds its worker only weakly between
    passes, so a dispatcher nobody uses any more is freed and its thread ends.
    """
    while True:
        worker = ref()
        if worker is None or worker.stop is not stop:
            return
        try:
            busy = worker.deliver()
        except Exception:  # pragma: no cover - deliver() catches the sink's errors
            busy = False
        del worker
        if not busy and stop.wait(poll):
            worker = ref()
            if worker is not None:
                while worker.deliver():
                    pass
                with worker.end_lock:
                    worker.ended = stop
                    if worker.close_at_end:
                        try:
                            worker.request_close()
                        except Exception:
                            logger.exception("wsgitrace: closing sink %s failed", worker.name)
            return


class SinkDispatcher:
    """Hands finished traces to sinks on background threads.

    :param sinks: The sinks; each gets its own thread and queue.
    :param max_queue: Traces waiting per sink; more are dropped and counted.
    :param poll: Seconds a thread sleeps when its queue is empty.

    .. versionadded:: 0.1
    """

    def __init__(self, sinks: Iterable[Sink], *, max_queue: int = 2000, poll: float = POLL_SECONDS):
        self._workers = [_SinkWorker(sink, max_queue, poll) for sink in sinks]
        #: Traces each sink's queue holds; more are dropped (:attr:`dropped`).
        self.max_queue = max_queue
        self._pid = os.getpid()
        #: Whether the threads run in this process (checked on the request path).
        self.running = False
        # Concurrent first requests all see running False: one of them starts
        # the threads, or two would write to one sink at once. The others do
        # not wait for it: under gevent, a greenlet blocked on this (real)
        # lock would block the one starting the threads too, for good.
        self._start_lock = threading.Lock()
        _dispatchers.add(self)

    @property
    def sinks(self) -> list[Sink]:
        return [w.sink for w in self._workers]

    def submit(self, trace: Trace) -> None:
        """Queue a finished trace for every sink. Lock-free and never blocks,
        so it is safe from a garbage-collection finalizer.
        """
        for worker in self._workers:
            worker.submit(trace)

    def start(self) -> None:
        """Start the threads in this process (again after a fork). Call it
        from ordinary code, never from a finalizer; cheap when running, and
        returns at once while another thread is starting them.
        """
        if self.running or not self._start_lock.acquire(blocking=False):
            return  # running, or being started by another thread
        try:
            if not self.running:
                for worker in self._workers:
                    worker.start()
                self.running = True
        finally:
            self._start_lock.release()

    @property
    def dropped(self) -> int:
        """Traces dropped because a sink's queue was full."""
        return sum(w.lost[0] for w in self._workers)

    @property
    def failed(self) -> int:
        """Traces a sink raised on, or never got because its thread could
        not start or they were submitted after :meth:`close`.
        """
        return sum(w.lost[1] for w in self._workers)

    @property
    def delivered(self) -> int:
        """Traces written, summed over the sinks."""
        return sum(w.delivered for w in self._workers)

    @property
    def pending(self) -> int:
        """Traces queued and not yet handed to their sink."""
        return sum(w.queued for w in self._workers)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued trace has been handed to its sink (by its
        thread, or here when no thread runs). Whether all were, in time.
        """
        deadline = time.monotonic() + timeout
        done = True
        for worker in self._workers:
            done = worker.drain(deadline) and done
        return done

    def close(self, timeout: float = 5.0) -> None:
        """Flush, stop the threads, and close every sink, even when one of
        them fails; then raise what failed. Returns within ``timeout``: a
        sink still writing then is closed by its thread once the write returns.
        """
        deadline = time.monotonic() + timeout
        self.flush(timeout)
        errors = _CollectErrors()
        for worker in self._workers:
            worker.closed = True
            # A trace that finishes from now on is never delivered: counted
            # as failed at submit, not left queued, pending for good.
            worker.shut()
            worker.stop.set()
        for worker in self._workers:
            with errors:
                worker.close_sink(deadline)
        self.running = False
        _dispatchers.discard(self)
        errors.raise_any("closing wsgitrace sinks failed")

    def _after_fork(self) -> None:
        self._pid = os.getpid()
        self.running = False
        # A parent thread may have held it at the fork.
        self._start_lock = threading.Lock()
        for worker in self._workers:
            with _CollectErrors():
                worker.after_fork()

    def __repr__(self) -> str:
        names = ", ".join(w.name for w in self._workers)
        return f"<SinkDispatcher [{names}] pending={self.pending} dropped={self.dropped}>"


_dispatchers: weakref.WeakSet[SinkDispatcher] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for dispatcher in list(_dispatchers):
        dispatcher._after_fork()


def _at_exit() -> None:
    deadline = time.monotonic() + EXIT_SECONDS
    for dispatcher in list(_dispatchers):
        if dispatcher._pid != os.getpid():
            continue
        try:
            dispatcher.close(max(deadline - time.monotonic(), 0.0))
        except Exception:
            logger.exception("wsgitrace: closing sinks at exit failed")


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_at_exit)


def build_sinks(options: Options) -> SinkDispatcher | None:
    """The dispatcher for the sinks ``options`` ask for (``store``,
    ``otlp``), or ``None`` when there are none.

    :raise ConfigurationError: a sink cannot be set up (e.g. the ``otlp``
        extra is not installed).
    """
    sinks: list[Sink] = []
    if options.store:
        from .store import TraceStore

        sinks.append(TraceStore(options.store, options.store_max_traces, options.store_max_bytes))
    if options.otlp:
        from .otlp import OtlpSink

        sinks.append(OtlpSink())
    if not sinks:
        return None
    return SinkDispatcher(sinks, max_queue=options.sink_queue)
