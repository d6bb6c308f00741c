"""The SQLite trace store: round trips, cursors, caps, schema versions, bad
files, several writing processes, and the endpoint and ``tail --store``
reading it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any
from wsgiref.util import setup_testing_defaults

import pytest

from wsgitrace import ConfigurationError, StoreError, Trace, TraceMiddleware
from wsgitrace import store as store_module
from wsgitrace._store_file import _transaction
from wsgitrace._trace_json import SUMMARY_KEYS
from wsgitrace.store import STORE_SCHEMA_VERSION, TraceStore

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment


def dummy_app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
    status = "500 Internal Server Error" if environ["PATH_INFO"] == "/fail" else "200 OK"
    start_response(status, [("Content-Type", "text/plain")])
    return [b"ok"]


def request(
    app: WSGIApplication, path: str = "/", query: str = "", method: str = "GET"
) -> tuple[str, bytes]:
    """Serve one request as a server does (closing the body)."""
    environ: dict[str, Any] = {
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "REQUEST_METHOD": method,
        "REMOTE_ADDR": "127.0.0.1",
    }
    setup_testing_defaults(environ)
    status: list[str] = []

    def start_response(s: str, h: list[tuple[str, str]], exc_info: Any = None) -> Any:
        status.append(s)
        return lambda data: None

    body = app(environ, start_response)
    try:
        data = b"".join(body)
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()
    return status[-1], data


def make_traces(*paths: str) -> list[Trace]:
    app = TraceMiddleware(dummy_app)
    for path in paths:
        request(app, path)
    return app.buffer.latest()[::-1]


def get_json(app: WSGIApplication, path: str, query: str = "") -> Any:
    status, body = request(app, path, query)
    assert status == "200 OK", (status, body)
    return json.loads(body)


def wait_for_child(pid: int, timeout: float = 60) -> int:
    """The exit code of a forked child; it is killed (-9) if still running
    after ``timeout`` seconds, so a hung child cannot hang the suite.
    """
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        time.sleep(0.01)


@pytest.fixture(name="db")
def fixture_db(tmp_path: Path) -> str:
    return str(tmp_path / "traces.db")


@contextlib.contextmanager
def _locked(db: str, how: str = "IMMEDIATE") -> Iterator[None]:
    """Hold the store's write lock (``BEGIN IMMEDIATE``/``EXCLUSIVE``) from
    another connection, as another process writing would.
    """
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute(f"BEGIN {how}")
    try:
        yield
    finally:
        holder.execute("ROLLBACK")
        holder.close()


class TestTraceStore:
    @pytest.mark.parametrize(
        ("options", "message"),
        [
            ({"max_traces": 0}, "max_traces must be a positive integer, got 0"),
            ({"max_bytes": -5}, "max_bytes must be a positive integer, got -5"),
            ({"max_traces": True}, "max_traces must be a positive integer, got True"),
            ({"timeout": 0}, "timeout must be a positive number of seconds, got 0"),
            ({"timeout": float("nan")}, "timeout must be a positive number of seconds, got nan"),
        ],
    )
    def test_bad_limits_are_refused(self, db: str, options: dict[str, Any], message: str) -> None:
        """Limits that could never hold are a configuration error, as they
        are for the buffer and for the options that reach the store.
        """
        with pytest.raises(ConfigurationError, match=re.escape(message)):
            TraceStore(db, **options)
        assert not Path(db).exists()

    def test_round_trip_keeps_ids_and_data(self, db: str) -> None:
        """A stored trace reads back as it was, ids kept, store cursors."""
        traces = make_traces("/a", "/b", "/c")
        store = TraceStore(db)
        store.write(traces)
        assert len(store) == 3
        assert store.cursor == 3
        newest_first = store.latest()
        assert [t.id for t in newest_first] == [t.id for t in reversed(traces)]
        for stored, trace in zip(reversed(newest_first), traces, strict=True):
            expected = trace.to_dict()
            got = stored.to_dict()
            assert got["cursor"] == stored.cursor
            expected.pop("cursor")
            got.pop("cursor")
            assert got == expected
            summary = stored.summary()
            assert summary.pop("cursor") == stored.cursor
            assert summary == {k: v for k, v in trace.summary().items() if k != "cursor"}
            assert stored.finished
        assert [t.cursor for t in newest_first] == [3, 2, 1]
        assert Trace.from_dict(newest_first[0].to_dict()).path == "/c"

    def test_a_damaged_row_has_the_keys_of_every_summary(self, db: str) -> None:
        """A row whose JSON cannot be read lists the keys a trace's summary
        has, in its order, from the one list of them (``SUMMARY_KEYS``).
        """
        trace = make_traces("/a")[0]
        assert tuple(trace.summary()) == SUMMARY_KEYS
        store = TraceStore(db)
        store.write([trace])
        with contextlib.closing(sqlite3.connect(db)) as conn:
            conn.execute("UPDATE traces SET summary = '{bad'")
            conn.commit()
        damaged = store.latest()[0].summary()
        assert tuple(damaged) == SUMMARY_KEYS
        assert (damaged["path"], damaged["cursor"], damaged["ttfb_ms"]) == ("/a", 1, None)

    def test_since_latest_and_get(self, db: str) -> None:
        """since() is oldest first after a cursor; latest() newest first."""
        store = TraceStore(db)
        store.write(make_traces(*(f"/p{i}" for i in range(10))))
        assert [t.path for t in store.since(7)] == ["/p7", "/p8", "/p9"]
        assert [t.path for t in store.since(2, limit=2)] == ["/p2", "/p3"]
        assert [t.path for t in store.latest(2)] == ["/p9", "/p8"]
        found = store.get(store.latest(1)[0].id)
        assert found is not None
        assert found.path == "/p9"
        assert store.get("no-such-id") is None

    def test_bounded_by_count(self, db: str) -> None:
        """The oldest traces are pruned past max_traces, and counted."""
        store = TraceStore(db, max_traces=3)
        for i in range(4):
            store.write(make_traces(f"/a{i}", f"/b{i}"))
        assert [t.path for t in store.latest()] == ["/b3", "/a3", "/b2"]
        assert (len(store), store.cursor, store.dropped) == (3, 8, 5)

    def test_bounded_by_bytes(self, db: str) -> None:
        """The oldest traces are pruned past max_bytes of JSON, and counted."""
        store = TraceStore(db, max_bytes=20_000)
        for i in range(20):
            store.write(make_traces(*(f"/{i}-{j}" for j in range(5))))
        with sqlite3.connect(db) as conn:
            total = conn.execute("SELECT SUM(size) FROM traces").fetchone()[0]
        assert total <= 20_000
        assert store.dropped == 100 - len(store)
        assert store.latest(1)[0].path == "/19-4"

    def test_duplicate_ids_are_stored_once(self, db: str) -> None:
        """Writing a trace again (a retried batch) does not duplicate it."""
        traces = make_traces("/x", "/y")
        store = TraceStore(db)
        store.write(traces)
        store.write(traces)
        assert len(store) == 2

    def test_retried_batch_counts_only_new_bytes(self, db: str, tmp_path: Path) -> None:
        """A batch with ids already stored adds only its new traces' bytes,
        so the bytes cap prunes at the real total, not early.
        """
        a, b, c, d = make_traces("/a", "/b", "/c", "/d")
        scratch = str(tmp_path / "scratch.db")
        TraceStore(scratch).write([a, b, c])
        with sqlite3.connect(scratch) as conn:
            total = conn.execute("SELECT SUM(size) FROM traces").fetchone()[0]
        store = TraceStore(db, max_bytes=total)
        store.write([a, b])
        store.write([a, b, c])  # a and b again: a retry of a batch that had committed
        assert [t.path for t in store.latest()] == ["/c", "/b", "/a"]
        assert store.dropped == 0
        # Over the cap now: pruned down to 90% of it (a and b), no further.
        store.write([d])
        assert [t.path for t in store.latest()] == ["/d", "/c"]
        assert store.dropped == 2

    def test_wait_polls_for_other_writers(self, db: str) -> None:
        """wait() sees a trace another connection writes; times out otherwise."""
        store = TraceStore(db)
        assert store.wait(0, timeout=0.1) is False
        writer = TraceStore(db)
        timer = threading.Timer(0.2, writer.write, [make_traces("/later")])
        timer.start()
        try:
            assert store.wait(0, timeout=5) is True
        finally:
            timer.join()
        assert store.wait(1, timeout=0.1) is False

    def test_notify_wakes_a_waiter(self, db: str) -> None:
        """notify() ends a wait at once."""
        store = TraceStore(db)
        store.write(make_traces("/x"))
        timer = threading.Timer(0.1, store.notify)
        timer.start()
        start = time.monotonic()
        assert store.wait(1, timeout=10) is False
        assert time.monotonic() - start < 5
        timer.join()

    def test_instance_is_the_same_for_every_reader(self, db: str) -> None:
        """The instance id lives in the file, so every worker reports it."""
        first, second = TraceStore(db), TraceStore(db)
        assert first.instance == second.instance
        assert len(first.instance) == 16

    def test_newer_schema_is_refused(self, db: str) -> None:
        """A store written by a newer wsgitrace is refused with what to do."""
        TraceStore(db).write(make_traces("/x"))
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE meta SET value = 99 WHERE key = 'schema'")
        with pytest.raises(StoreError, match="schema version 99, newer") as info:
            TraceStore(db).latest()
        assert "upgrade wsgitrace" in str(info.value)
        assert info.value.path == db
        assert STORE_SCHEMA_VERSION == 1

    def test_foreign_database_is_refused(self, db: str) -> None:
        """An SQLite file of something else is never written to."""
        with sqlite3.connect(db) as conn:
            conn.execute("CREATE TABLE users (name TEXT)")
        with pytest.raises(StoreError, match="something else"):
            TraceStore(db).write(make_traces("/x"))
        with sqlite3.connect(db) as conn:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        assert tables == {"users"}

    def test_corrupt_file_is_a_clear_error(self, db: str) -> None:
        """A file that is not a database gives an error saying so."""
        Path(db).write_bytes(b"this is not a database, just some bytes" * 100)
        with pytest.raises(StoreError, match="corrupt or not a wsgitrace store") as written:
            TraceStore(db).write(make_traces("/x"))
        with pytest.raises(StoreError, match="corrupt"):
            TraceStore(db).latest()
        # What becomes of the traces is said to a tracing process, not to a
        # reader such as tail --store (create=False).
        assert "tracing goes on in memory" in str(written.value)
        with pytest.raises(StoreError, match="corrupt or not a wsgitrace store") as read:
            TraceStore(db, create=False).latest()
        assert "tracing" not in str(read.value)
        assert "WSGITRACE_STORE" not in str(read.value)

    def test_locked_file_is_a_clear_error_then_recovers(
        self, db: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A store locked past the timeout fails the batch (counted) with a
        clear error; once unlocked, writing works again.
        """
        monkeypatch.setattr(store_module, "RETRY_SECONDS", 0.0)
        store = TraceStore(db, timeout=0.1)
        store.write(make_traces("/before"))
        with _locked(db), pytest.raises(StoreError, match="locked by another process"):
            store.write(make_traces("/during"))
        store.write(make_traces("/after"))
        assert [t.path for t in store.latest()] == ["/after", "/before"]
        assert store.dropped == 1  # the batch lost while locked

    def test_locked_on_first_connect_fails_like_any_write(
        self, db: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A store locked when a process first writes to it fails that batch
        as any failed write does (a StoreError, the batch counted, a retry
        delay); the next write connects again and recounts the totals.
        """
        now = [1000.0]
        monkeypatch.setattr(store_module, "time", SimpleNamespace(monotonic=lambda: now[0]))
        TraceStore(db).write(make_traces("/a", "/b"))
        with sqlite3.connect(db, isolation_level=None) as conn:
            # Totals out of step with the rows, which a connecting writer recounts.
            conn.execute("UPDATE meta SET value = 100 WHERE key = 'count'")
        store = TraceStore(db, max_traces=5, timeout=0.05)
        with _locked(db, "EXCLUSIVE"), pytest.raises(StoreError, match="locked by another process"):
            store.write(make_traces("/during"))
        with pytest.raises(StoreError, match="failed recently"):
            store.write(make_traces("/too-soon"))
        now[0] += store_module.RETRY_SECONDS
        store.write(make_traces("/after"))
        # Recounted: 3 traces, under the cap (101 would have pruned them all).
        assert [t.path for t in store.latest()] == ["/after", "/b", "/a"]
        assert store.dropped == 2  # the two batches that failed

    def test_retry_delay_counts_from_when_the_write_failed(
        self, db: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Waiting out a lock can take longer than the retry delay; the delay
        still holds the next write back, counted from the failure.
        """
        now = [1000.0]
        monkeypatch.setattr(store_module, "time", SimpleNamespace(monotonic=lambda: now[0]))
        store = TraceStore(db, timeout=5.0)

        def locked_for_the_whole_timeout() -> Any:
            now[0] += 5.0  # the busy timeout ran out
            msg = "database is locked"
            raise StoreError(msg, db)

        monkeypatch.setattr(store, "_connect_writer", locked_for_the_whole_timeout)
        with pytest.raises(StoreError, match="locked"):
            store.write(make_traces("/during"))
        with pytest.raises(StoreError, match="failed recently"):
            store.write(make_traces("/too-soon"))

    def test_failed_write_keeps_earlier_losses(
        self, db: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A write that fails after it took the losses noted before it counts
        them as lost again, with its own batch.
        """
        monkeypatch.setattr(store_module, "RETRY_SECONDS", 0.0)
        store = TraceStore(db)
        store.write(make_traces("/before"))
        store.note_lost(2)  # the sink's queue dropped two traces
        with sqlite3.connect(db, isolation_level=None) as conn:
            # Fails the write after its inserts, when it adds to the counts.
            conn.execute(
                "CREATE TRIGGER fail_counts BEFORE UPDATE ON meta"
                " BEGIN SELECT RAISE(ABORT, 'disk full'); END"
            )
        with pytest.raises(StoreError, match="disk full"):
            store.write(make_traces("/during1", "/during2"))
        with sqlite3.connect(db, isolation_level=None) as conn:
            conn.execute("DROP TRIGGER fail_counts")
        store.write(make_traces("/after"))
        assert [t.path for t in store.latest()] == ["/after", "/before"]
        assert store.dropped == 4  # the two noted before, and the failed batch

    def test_after_fork_starts_the_counts_of_this_process(self, db: str) -> None:
        """In a forked child (after_fork, as the sink dispatcher calls it)
        written and pruned count only the child's own work; the store-wide
        dropped count is the file's and keeps the parent's.
        """
        store = TraceStore(db, max_traces=2)
        store.write(make_traces("/p1", "/p2", "/p3"))
        assert (store.written, store.pruned) == (3, 1)
        store._pid = -1  # as in a child: the pid differs
        store.after_fork()
        store.write(make_traces("/c1"))
        assert (store.written, store.pruned) == (1, 1)
        assert store.dropped == 2
        assert [t.path for t in store.latest()] == ["/c1", "/p3"]

    def test_after_fork_keeps_what_the_child_already_opened(self, db: str) -> None:
        """A store that already started its own state in the child (on its
        first use there) keeps its new connections when the sink dispatcher
        calls after_fork later.
        """
        TraceStore(db).write(make_traces("/a"))
        store = TraceStore(db)
        store._pid = -1  # as in a child: the pid differs
        assert [t.path for t in store.latest()] == ["/a"]  # resets, opens a reader
        reader = store._reader
        assert reader is not None
        store.after_fork()  # the sink's deferred call
        assert store._reader is reader

    @pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
    @pytest.mark.parametrize("first", ["wait", "notify"])
    def test_forked_child_waits_on_an_event_of_its_own(
        self, db: str, tmp_path: Path, first: str, fork: Callable[[], int]
    ) -> None:
        """A child forked while a parent thread was inside the store's
        wait/notify event (its lock held) can wait and notify, whichever it
        calls first: the event is made again in the child.
        """
        store = TraceStore(db)
        store.write(make_traces("/x"))
        result = tmp_path / "child.txt"
        # Held as by a parent thread inside Event.set() or Event.wait() at the
        # fork: the child's copy of the lock stays held, with no thread to free it.
        lock = store._wake._cond  # type: ignore[attr-defined]
        lock.acquire()
        pid = fork()
        if pid == 0:  # pragma: no cover - the child reports through a file
            code = 1
            try:
                done: list[object] = []

                def use_the_store() -> None:
                    if first == "notify":
                        store.notify()
                        done.append("notified")
                    done.append(store.wait(1, timeout=0.01))  # nothing newer: False
                    store.notify()
                    done.append("notified")

                thread = threading.Thread(target=use_the_store, daemon=True)
                thread.start()
                thread.join(10)  # bounds the child when the old event is still used
                result.write_text(repr(done))
                code = 0
            finally:
                os._exit(code)
        lock.release()
        assert wait_for_child(pid) == 0
        expected = ["notified", False, "notified"] if first == "notify" else [False, "notified"]
        assert result.read_text() == repr(expected)

    def test_readers_do_not_wait_for_a_writer(self, db: str) -> None:
        """A reader opening the store while another process holds the write
        lock reads at once (WAL): opening asks for no write lock.
        """
        TraceStore(db).write(make_traces("/a", "/b"))
        with _locked(db):
            reader = TraceStore(db, create=False, timeout=0.01)
            assert [t.path for t in reader.latest()] == ["/b", "/a"]
            assert reader.cursor == 2

    def test_missing_file_is_not_created_by_readers(self, db: str) -> None:
        """create=False (tail --store) refuses a missing file, making nothing."""
        with pytest.raises(StoreError, match="no wsgitrace trace store"):
            TraceStore(db, create=False).latest()
        assert not Path(db).exists()

    @pytest.mark.parametrize("how", ["deleted", "replaced"])
    def test_a_deleted_or_replaced_file_is_written_and_read_anew(self, db: str, how: str) -> None:
        """``rm`` (to clear it) or a new file at the path while a worker has
        the store open: the next writes go to the file at the path, where
        ``tail --store`` and the other workers find them, not to the old one.
        """
        writer = TraceStore(db)
        reader = TraceStore(db, create=False)
        writer.write(make_traces("/old"))
        assert [t.path for t in reader.latest()] == ["/old"]
        for suffix in ("", "-wal", "-shm"):
            Path(db + suffix).unlink(missing_ok=True)
        if how == "replaced":
            TraceStore(db).write(make_traces("/other"))
        writer.write(make_traces("/new"))
        expected = ["/new"] if how == "deleted" else ["/new", "/other"]
        assert [t.path for t in TraceStore(db, create=False).latest()] == expected
        assert [t.path for t in reader.latest()] == expected

    def test_a_replaced_file_has_a_new_instance_for_readers(self, db: str) -> None:
        """A reader that knew the old file's instance sees the new file's,
        so that ``tail --store`` knows the cursors restarted and skips none.
        """
        TraceStore(db).write(make_traces("/old"))
        reader = TraceStore(db, create=False)
        old = reader.instance
        for suffix in ("", "-wal", "-shm"):
            Path(db + suffix).unlink(missing_ok=True)
        new = TraceStore(db)
        new.write(make_traces("/new"))
        assert reader.instance == new.instance != old
        assert reader.cursor == 1

    def test_several_processes_write_one_file(self, db: str) -> None:
        """Processes writing at once: every trace once, cursors 1..N in order."""
        script = textwrap.dedent(
            f"""
            import sys
            from werkzeug.test import Client
            from wsgitrace import TraceMiddleware
            from wsgitrace.store import TraceStore

            def app(environ, start_response):
                start_response("200 OK", [])
                return [b"ok"]

            middleware = TraceMiddleware(app, max_traces=1000)
            client = Client(middleware)
            store = TraceStore({db!r})
            for i in range(60):
                client.get(f"/{{sys.argv[1]}}/{{i}}").close()
                store.write(middleware.buffer.latest(1))
            """
        )
        workers = [
            subprocess.Popen([sys.executable, "-c", script, name]) for name in ("a", "b", "c")
        ]
        for worker in workers:
            assert worker.wait(timeout=60) == 0
        store = TraceStore(db, create=False)
        traces = store.since(0)
        assert len(traces) == 180
        assert len({t.id for t in traces}) == 180
        assert [t.cursor for t in traces] == list(range(1, 181))
        for name in "abc":
            mine = [t.path for t in traces if t.path.startswith(f"/{name}/")]
            assert mine == [f"/{name}/{i}" for i in range(60)]


class TestMiddlewareWithStore:
    def test_endpoint_reads_the_store(self, db: str, wait_for: Callable[..., Any]) -> None:
        """/_trace lists the store (every process's traces), with filters,
        since, limit and one trace by id.
        """
        other = TraceStore(db)
        other.write(make_traces("/from-another-worker"))
        app = TraceMiddleware(dummy_app, endpoint=True, store=db)
        for path in ("/one", "/fail", "/two"):
            request(app, path)
        assert app.sinks is not None
        wait_for(lambda: get_json(app, "/_trace")["cursor"] == 4, timeout=5)
        page = get_json(app, "/_trace")
        assert [t["path"] for t in page["traces"]] == [
            "/two",
            "/fail",
            "/one",
            "/from-another-worker",
        ]
        assert page["instance"] == other.instance
        assert page["dropped"] == 0
        assert [t["path"] for t in get_json(app, "/_trace", "status=5xx")["traces"]] == ["/fail"]
        page = get_json(app, "/_trace", "since=1&limit=1")
        assert ([t["path"] for t in page["traces"]], page["cursor"]) == (["/one"], 2)
        trace_id = page["traces"][0]["id"]
        full = get_json(app, f"/_trace/{trace_id}")
        assert (full["id"], full["cursor"], full["path"]) == (trace_id, 2, "/one")
        assert any(e["kind"] == "request" for e in full["events"])
        assert get_json(app, "/_trace", "full=1&limit=1")["traces"][0]["events"]
        assert len(app.buffer) == 3  # the in-memory buffer still has its own

    def test_long_poll_on_the_store(self, db: str) -> None:
        """since=<cursor>&wait=N answers as soon as a worker writes a trace."""
        app = TraceMiddleware(dummy_app, endpoint=True, store=db)
        writer = TraceStore(db)
        timer = threading.Timer(0.3, writer.write, [make_traces("/late")])
        timer.start()
        start = time.monotonic()
        page = get_json(app, "/_trace", "since=0&wait=10")
        timer.join()
        assert [t["path"] for t in page["traces"]] == ["/late"]
        assert time.monotonic() - start < 5

    def test_corrupt_store_keeps_tracing_in_memory(
        self, db: str, caplog: pytest.LogCaptureFixture, wait_for: Callable[..., Any]
    ) -> None:
        """With a corrupt store, requests are untouched, the error is logged
        once, and /_trace answers from the buffer and counts what the store
        did not get.
        """
        Path(db).write_bytes(b"garbage" * 1000)
        app = TraceMiddleware(dummy_app, endpoint=True, store=db)
        with caplog.at_level(logging.ERROR, logger="wsgitrace"):
            for i in range(5):
                assert request(app, f"/r{i}") == ("200 OK", b"ok")
            assert app.sinks is not None
            wait_for(lambda: app.sinks is not None and app.sinks.failed == 5, timeout=5)
            for _ in range(3):
                page = get_json(app, "/_trace")
        assert [t["path"] for t in page["traces"]] == [f"/r{i}" for i in reversed(range(5))]
        assert page["sink_dropped"] == 5  # the store sink's losses are visible
        store_messages = [r.getMessage() for r in caplog.records if "corrupt" in r.getMessage()]
        # Once from the sink, once from the endpoint: never per request.
        assert len(store_messages) == 2, store_messages
        assert all(db in message for message in store_messages)


# -- the store file --------------------------------------------------------------------


def test_failed_commit_is_rolled_back(tmp_path: Path) -> None:
    """A transaction whose COMMIT fails is rolled back and the error raised,
    so the connection can begin the next one.
    """
    conn = sqlite3.connect(str(tmp_path / "deferred.db"), isolation_level=None)
    try:
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
        conn.execute(
            "CREATE TABLE child (parent INTEGER REFERENCES parent (id)"
            " DEFERRABLE INITIALLY DEFERRED)"
        )
        # A deferred foreign key is checked only at COMMIT, which then fails.
        with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"), _transaction(conn):
            conn.execute("INSERT INTO child VALUES (1)")
        assert not conn.in_transaction
        with _transaction(conn):
            conn.execute("INSERT INTO parent VALUES (2)")
        rows = [conn.execute(f"SELECT * FROM {t}").fetchall() for t in ("parent", "child")]
        assert rows == [[(2,)], []]
    finally:
        conn.close()


# -- wsgitrace tail --store / show --store -------------------------------------------


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wsgitrace", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_tail_store_json_follows_the_store(db: str) -> None:
    """tail --json --store prints the last -n, then each new trace once."""
    store = TraceStore(db)
    store.write(make_traces("/old1", "/old2", "/old3"))
    tail = subprocess.Popen(
        [sys.executable, "-m", "wsgitrace", "tail", "--json", "-n", "2", "--store", db],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert tail.stdout is not None
        lines = [json.loads(tail.stdout.readline()) for _ in range(2)]
        store.write(make_traces("/new"))
        lines.append(json.loads(tail.stdout.readline()))
    finally:
        tail.terminate()
        _, stderr = tail.communicate(timeout=30)
    assert [line["path"] for line in lines] == ["/old2", "/old3", "/new"]
    assert [line["cursor"] for line in lines] == [2, 3, 4]
    assert "Traceback" not in stderr
    # What it read was a file, not a server: its summary says so.
    assert "3 traces shown, 0 missed" in stderr
    assert "the store has pruned 0 in all" in stderr
    assert "server" not in stderr


def test_tail_store_says_the_store_pruned(db: str) -> None:
    """A store that pruned traces is what tail --store names, not a
    server's buffer, when it says how many are gone.
    """
    TraceStore(db, max_traces=2).write(make_traces("/a", "/b", "/c"))
    tail = subprocess.Popen(
        [sys.executable, "-m", "wsgitrace", "tail", "--json", "-n", "5", "--store", db],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert tail.stdout is not None
        # The message comes before the traces it is about.
        paths = [json.loads(tail.stdout.readline())["path"] for _ in range(2)]
    finally:
        tail.terminate()
        _, stderr = tail.communicate(timeout=30)
    assert paths == ["/b", "/c"]
    assert "the store has pruned 1 traces so far" in stderr
    assert "server" not in stderr


def test_show_store(db: str) -> None:
    """show ID --store prints one stored trace."""
    store = TraceStore(db)
    [trace] = make_traces("/shown")
    store.write([trace])
    result = run_cli("show", trace.id, "--json", "--store", db)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["path"] == "/shown"
    result = run_cli("show", "nope", "--store", db)
    assert result.returncode == 1


def test_tail_store_refuses_a_newer_schema(db: str) -> None:
    """A store of a newer wsgitrace ends tail with the error, not a traceback."""
    TraceStore(db).write(make_traces("/x"))
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE meta SET value = 2 WHERE key = 'schema'")
    result = run_cli("tail", "--json", "--store", db)
    assert result.returncode == 2
    assert "schema version 2" in result.stderr
    assert "Traceback" not in result.stderr
    # The store's error names it: its path is said once, not twice.
    assert result.stderr.count(db) == 1
    result = run_cli("show", "abc-1", "--store", db)
    assert result.returncode == 1
    assert "schema version 2" in result.stderr
    assert result.stderr.count(db) == 1
