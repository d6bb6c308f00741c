"""The ring buffer: reads, caps, cursors and waiting."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

import pytest

from wsgitrace import ConfigurationError, Trace, TraceBuffer

if TYPE_CHECKING:
    from .conftest import FakeClock


def _trace(clock: FakeClock, path: str = "/", *, finished: bool = False) -> Trace:
    trace = Trace("GET", path, clock=clock)
    trace.finished = finished
    return trace


def _finish(buffer: TraceBuffer, trace: Trace) -> None:
    trace.end_ns = trace.now()
    trace.finished = True
    buffer.finished(trace)


class TestTraceBuffer:
    def test_append_assigns_increasing_cursors(self, clock: FakeClock) -> None:
        """Each appended trace gets the next cursor."""
        buffer = TraceBuffer()
        traces = [_trace(clock, f"/{i}") for i in range(3)]
        assert [buffer.append(t) for t in traces] == [1, 2, 3]
        assert [t.cursor for t in traces] == [1, 2, 3]
        assert (len(buffer), buffer.cursor) == (3, 3)
        assert list(buffer) == traces

    def test_get_finds_by_id(self, clock: FakeClock) -> None:
        """get() returns the trace with that id, or None."""
        buffer = TraceBuffer()
        first, second = _trace(clock), _trace(clock)
        buffer.append(first)
        buffer.append(second)
        assert buffer.get(first.id) is first
        assert buffer.get(second.id) is second
        assert buffer.get("nope") is None

    def test_latest_is_newest_first(self, clock: FakeClock) -> None:
        """latest(n) lists up to n traces, newest first."""
        buffer = TraceBuffer()
        traces = [_trace(clock, f"/{i}") for i in range(5)]
        for trace in traces:
            buffer.append(trace)
        assert buffer.latest(2) == [traces[4], traces[3]]
        assert buffer.latest() == traces[::-1]
        assert buffer.latest(0) == []
        assert buffer.latest(-1) == []
        assert buffer.last is traces[4]
        assert TraceBuffer().last is None

    def test_in_progress_traces_are_visible(self, clock: FakeClock) -> None:
        """A trace is readable as soon as it is appended, before it finishes."""
        buffer = TraceBuffer()
        trace = _trace(clock)
        buffer.append(trace)
        assert buffer.latest(1) == [trace]
        assert trace.state == "in_progress"
        assert buffer.bytes == 0
        _finish(buffer, trace)
        assert buffer.bytes == trace.approx_size > 0

    def test_since_lists_newer_traces_oldest_first(self, clock: FakeClock) -> None:
        """since(c) lists traces after cursor c, oldest first, at most limit."""
        buffer = TraceBuffer()
        traces = [_trace(clock, f"/{i}") for i in range(5)]
        for trace in traces:
            buffer.append(trace)
        assert buffer.since(0) == traces
        assert buffer.since(3) == traces[3:]
        assert buffer.since(1, limit=2) == traces[1:3]
        assert buffer.since(5) == []

    def test_count_cap_evicts_oldest_and_counts(self, clock: FakeClock) -> None:
        """Past max_traces the oldest trace is evicted and counted."""
        buffer = TraceBuffer(max_traces=3)
        traces = [_trace(clock, f"/{i}") for i in range(5)]
        for trace in traces:
            buffer.append(trace)
        assert buffer.latest() == traces[:1:-1]
        assert (buffer.dropped_count, buffer.dropped_bytes, buffer.dropped) == (2, 0, 2)
        assert [t.evicted for t in traces] == [True, True, False, False, False]
        assert buffer.get(traces[0].id) is None
        assert buffer.since(0) == traces[2:]
        assert buffer.cursor == 5

    def test_byte_cap_evicts_oldest_finished_traces(self, clock: FakeClock) -> None:
        """Finished traces are counted in bytes; past max_bytes the oldest go."""
        size = _trace(clock).approx_size
        buffer = TraceBuffer(max_bytes=size * 3 + size // 2)
        traces = [_trace(clock, f"/{i}") for i in range(5)]
        for trace in traces:
            buffer.append(trace)
            _finish(buffer, trace)
        assert buffer.bytes <= buffer.max_bytes
        assert buffer.latest() == traces[:1:-1]
        assert (buffer.dropped_bytes, buffer.dropped_count) == (2, 0)
        assert buffer.bytes == sum(t.approx_size for t in traces[2:])

    def test_a_trace_larger_than_the_byte_cap_is_not_kept(self, clock: FakeClock) -> None:
        """A single trace over max_bytes is evicted when it finishes."""
        buffer = TraceBuffer(max_bytes=100)
        trace = _trace(clock)
        buffer.append(trace)
        assert len(buffer) == 1
        _finish(buffer, trace)
        assert (buffer.bytes, len(buffer), buffer.dropped_bytes) == (0, 0, 1)
        assert trace.evicted

    def test_a_trace_evicted_before_it_finishes_is_never_counted(self, clock: FakeClock) -> None:
        """Finishing an already evicted trace adds no bytes."""
        buffer = TraceBuffer(max_traces=1)
        old, new = _trace(clock), _trace(clock)
        buffer.append(old)
        buffer.append(new)
        _finish(buffer, old)
        assert buffer.bytes == 0
        _finish(buffer, new)
        assert buffer.bytes == new.approx_size

    def test_finished_never_takes_the_lock(self, clock: FakeClock) -> None:
        """finished() works while the lock is held (finalizers run anywhere)."""
        buffer = TraceBuffer()
        trace = _trace(clock)
        buffer.append(trace)
        with buffer._lock:
            worker = threading.Thread(target=_finish, args=(buffer, trace))
            worker.start()
            worker.join(timeout=5)
            assert not worker.is_alive()
        assert buffer.bytes == trace.approx_size

    def test_clear_forgets_traces_but_keeps_the_cursor(self, clock: FakeClock) -> None:
        """clear() empties the buffer; cursors keep counting."""
        buffer = TraceBuffer()
        trace = _trace(clock)
        buffer.append(trace)
        _finish(buffer, trace)
        buffer.clear()
        assert (len(buffer), buffer.bytes, buffer.last) == (0, 0, None)
        assert trace.evicted
        assert buffer.append(_trace(clock)) == 2

    def test_wait_returns_when_another_thread_appends(self, clock: FakeClock) -> None:
        """wait() wakes promptly when a trace arrives from another thread."""
        buffer = TraceBuffer()
        timer = threading.Timer(0.05, buffer.append, args=(_trace(clock),))
        started = time.monotonic()
        timer.start()
        try:
            assert buffer.wait(0, timeout=10) is True
        finally:
            timer.cancel()
        assert time.monotonic() - started < 5
        assert buffer.cursor == 1

    def test_wait_returns_false_on_timeout(self) -> None:
        """wait() returns False when nothing arrives in time."""
        buffer = TraceBuffer()
        started = time.monotonic()
        assert buffer.wait(0, timeout=0.05) is False
        assert 0.04 <= time.monotonic() - started < 5

    def test_wait_returns_at_once_when_already_newer(self, clock: FakeClock) -> None:
        """wait() does not block when a newer trace is already there."""
        buffer = TraceBuffer()
        buffer.append(_trace(clock))
        assert buffer.wait(0, timeout=0) is True
        assert buffer.wait(1, timeout=0) is False

    def test_wait_uses_the_injected_time(self) -> None:
        """wait()'s deadline comes from get_time."""
        times = iter([0.0, 100.0])
        buffer = TraceBuffer(get_time=lambda: next(times))
        started = time.monotonic()
        assert buffer.wait(0, timeout=50) is False
        assert time.monotonic() - started < 5

    def test_since_never_skips_or_repeats_under_concurrent_appends(self, clock: FakeClock) -> None:
        """A reader walking since(last) sees every cursor once, in order."""
        writers, per_writer = 4, 2000
        total = writers * per_writer
        buffer = TraceBuffer(max_traces=total)
        seen: list[int] = []
        errors: list[BaseException] = []

        def write() -> None:
            try:
                for _ in range(per_writer):
                    buffer.append(Trace(clock=clock))
            except BaseException as exc:
                errors.append(exc)

        def read() -> None:
            deadline = time.monotonic() + 30
            last = 0
            while last < total and time.monotonic() < deadline:
                buffer.wait(last, timeout=0.5)
                for trace in buffer.since(last, limit=97):
                    seen.append(trace.cursor)
                    last = trace.cursor

        reader = threading.Thread(target=read)
        threads = [threading.Thread(target=write) for _ in range(writers)]
        reader.start()
        for thread in threads:
            thread.start()
        for thread in [*threads, reader]:
            thread.join(timeout=30)
        assert errors == []
        assert seen == list(range(1, total + 1))

    @pytest.mark.parametrize(
        ("option", "bad"), [("max_traces", 0), ("max_traces", "10"), ("max_bytes", -1)]
    )
    def test_bad_caps_raise_configuration_error(self, option: str, bad: object) -> None:
        """Bad caps raise ConfigurationError naming the option and value."""
        with pytest.raises(ConfigurationError, match=f"{option}.*{bad!r}"):
            TraceBuffer(**{option: bad})  # type: ignore[arg-type]

    def test_repr_shows_counts(self, clock: FakeClock) -> None:
        """repr() shows size, cursor and drops."""
        buffer = TraceBuffer(max_traces=1)
        buffer.append(_trace(clock))
        buffer.append(_trace(clock))
        assert repr(buffer) == "<TraceBuffer 1/1 traces, cursor=2, dropped=1>"


def test_notify_makes_a_waiting_reader_return() -> None:
    """notify() wakes a wait() at once even though no trace arrived."""
    buffer = TraceBuffer()
    results: list[bool] = []
    waiter = threading.Thread(target=lambda: results.append(buffer.wait(0, timeout=10)))
    started = time.monotonic()
    waiter.start()
    while not buffer._waiters:
        time.sleep(0.001)
    buffer.notify()
    waiter.join(5)
    assert results == [False]
    assert time.monotonic() - started < 5
