"""A SQLite trace store shared by the worker processes of one host.

Under a pre-fork server (gunicorn) every worker has its own ring buffer, so
``/_trace`` would see a random part of the traffic. With a store, every
worker also writes each finished trace to one SQLite file (WAL mode), and the
endpoint of any worker, and ``wsgitrace tail --store PATH``, read from it::

    WSGITRACE_STORE=/tmp/myapp-traces.db gunicorn -w 4 myapp:app
    wsgitrace tail --store /tmp/myapp-traces.db

    store = TraceStore("/tmp/myapp-traces.db")
    store.latest(10)          # newest first, as StoredTrace
    store.get(trace_id).to_dict()

Each row holds a trace's full :meth:`~wsgitrace.Trace.to_dict` JSON, its
summary JSON, and indexed columns (id, time, method, path, status,
duration). The row's ``cursor`` (``INTEGER PRIMARY KEY AUTOINCREMENT``) is
the store-wide cursor: writers are serialized by SQLite, so rows become
visible in cursor order and ``since=<cursor>`` never skips one. Trace ids are
kept as they were made (unique across processes).

The store is bounded by trace count and by bytes of JSON; the oldest traces
are pruned in the transaction that goes over, and counted. Its schema version
is kept in the ``meta`` table; a file written by a newer wsgitrace, a corrupt
file or one locked for longer than the timeout raises :class:`~wsgitrace.
exceptions.StoreError` with the file name and what to do, and the traced app
goes on with its in-memory buffer.

Connections are made per process (and per direction), lazily, so one opened
before ``fork`` is never used by a child: the child's fork handler sets it
aside, open and unused, as SQLite requires. A fork waits for the process's threads to stop using the
store (``os.register_at_fork``), so the child inherits no lock or mutex of
SQLite's held by a thread it does not have.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from ._store_file import (
    STORE_SCHEMA_VERSION,
    _connect,
    _store_error,
    _transaction,
    _using_store,
)
from ._trace_json import SUMMARY_KEYS
from .exceptions import ConfigurationError, StoreError

if TYPE_CHECKING:
    from .trace import Trace

__all__ = ["STORE_SCHEMA_VERSION", "StoredTrace", "TraceStore"]

#: Seconds a reader polls between two looks at the store in :meth:`TraceStore.wait`.
WAIT_POLL_SECONDS = 0.05
#: Seconds a writer waits before it tries a store that failed again.
RETRY_SECONDS = 1.0

_COLUMNS = "cursor, id, time, method, path, status, duration_ms, summary"
_INSERT = (
    "INSERT OR IGNORE INTO traces"
    " (id, time, method, path, status, duration_ms, size, summary, data)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

#: Connections made before a fork, kept in the child so they are never
#: closed (or finalized) there: SQLite must not close a parent's connection.
_inherited: list[sqlite3.Connection] = []

#: This process's stores, which a forked child resets at once (see after_fork()).
_stores: weakref.WeakSet[TraceStore] = weakref.WeakSet()


class StoredTrace:
    """A trace read from a :class:`TraceStore`: the summary columns at once,
    the full JSON when :meth:`to_dict` is called. Always finished.
    """

    __slots__ = (
        "_store",
        "_summary",
        "cursor",
        "duration_ms",
        "id",
        "method",
        "path",
        "status_code",
        "wall_time",
    )

    finished = True
    cursor: int
    id: str
    wall_time: float
    method: str
    path: str
    status_code: int | None
    duration_ms: float | None
    _summary: str

    def __init__(self, store: TraceStore, row: Sequence[Any]) -> None:
        self._store = store
        (
            self.cursor,
            self.id,
            self.wall_time,
            self.method,
            self.path,
            self.status_code,
            self.duration_ms,
            self._summary,
        ) = row

    def summary(self) -> dict[str, Any]:
        """The short JSON form, with the store's cursor (made of the row's
        columns when its JSON cannot be read).
        """
        data = _json_object(self._summary)
        if data is None:
            # One damaged row must not fail every listing that includes it.
            # Every key of a summary, those the columns do not keep unknown.
            data = dict.fromkeys(SUMMARY_KEYS)
            data.update(
                id=self.id,
                time=self.wall_time,
                method=self.method,
                path=self.path,
                status=self.status_code,
                duration_ms=self.duration_ms,
                warnings=["the store's JSON of this trace cannot be read"],
            )
        data["cursor"] = self.cursor
        return data

    def to_dict(self) -> dict[str, Any]:
        """The full JSON form (as :meth:`wsgitrace.Trace.to_dict`), with the
        store's cursor; just the summary when the row was pruned meanwhile
        or its JSON cannot be read.
        """
        data = self._store._load(self.cursor)
        if data is None:
            return self.summary()
        data["cursor"] = self.cursor
        return data

    def __repr__(self) -> str:
        return f"<StoredTrace {self.id} #{self.cursor} {self.method} {self.path!r}>"


class TraceStore:
    """One SQLite file of traces: a sink (``write``) and a trace source for
    the endpoint (``latest``, ``since``, ``get``, ``wait``).

    :param path: The file; made (with its directory's permissions) when missing,
        unless ``create`` is false.
    :param max_traces: Most traces kept; the oldest are pruned.
    :param max_bytes: Most bytes of trace JSON kept; the oldest are pruned.
    :param create: Make the file and its tables when missing (readers such
        as ``wsgitrace tail --store`` pass false).
    :param timeout: Seconds to wait for a lock held by another process.
    :raise ConfigurationError: A limit that is not a positive integer, or a
        timeout that is not a positive number.

    .. versionadded:: 0.1
    """

    name = "store"

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_traces: int = 10_000,
        max_bytes: int = 64 * 1024 * 1024,
        *,
        create: bool = True,
        timeout: float = 5.0,
    ) -> None:
        for name, value in (("max_traces", max_traces), ("max_bytes", max_bytes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                msg = f"{name} must be a positive integer, got {value!r}"
                raise ConfigurationError(msg)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            msg = f"timeout must be a positive number of seconds, got {timeout!r}"
            raise ConfigurationError(msg)
        self.path = os.fspath(path)
        self.max_traces = max_traces
        self.max_bytes = max_bytes
        self.create = create
        self.timeout = timeout
        self._pid = os.getpid()
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        # (device, inode) of the file each connection opened.
        self._writer_file: tuple[int, int] | None = None
        self._reader_file: tuple[int, int] | None = None
        self._read_lock = threading.Lock()
        self._wake = threading.Event()
        self._retry_at = 0.0
        self._lost = 0
        self._instance: str | None = None
        #: Traces this object wrote in this process.
        self.written = 0
        #: Traces this object pruned in this process (every process's prunes
        #: are in :attr:`dropped`).
        self.pruned = 0
        _stores.add(self)

    # -- connections --------------------------------------------------------

    def _check_pid(self) -> None:
        """In a forked child, forget (without closing) the parent's connections."""
        self.after_fork()  # a no-op in the process that already did it

    def after_fork(self) -> None:
        """Start this process's own state: drop the connections inherited from
        the parent, unclosed, and start the per-process counts at zero. Once
        per process: done in the child's fork handler, before any of its
        threads can use the store (it only sets attributes: no lock taken, no
        connection used or closed), so a sink's call, or one on a first use,
        finds it done and keeps the child's own connections and counts. Done
        lazily by two threads at once, the later one wiped what the other had
        counted, and left its connection unclosed among the inherited ones.
        """
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        for conn in (self._writer, self._reader):
            if conn is not None:
                _inherited.append(conn)
        self._writer = self._reader = None
        # A parent thread may have held these at the fork; none frees them here.
        self._read_lock = threading.Lock()
        self._wake = threading.Event()
        self._retry_at = 0.0
        # The parent's counts stay the parent's; the store-wide totals are in
        # the file. _instance is kept: it is the file's id, in every process.
        self._lost = 0
        self.written = 0
        self.pruned = 0

    # -- writing (the sink) -------------------------------------------------

    def note_lost(self, count: int) -> None:
        """Count traces this process dropped before they reached the store
        (a full queue, a failed write); added to the store-wide count.
        """
        self._lost += count

    def write(self, traces: Sequence[Trace]) -> None:
        """Insert finished traces (one transaction), then prune to the caps.

        A trace whose JSON cannot be made is left out, and the others are
        written: then the first such error is raised, with ``undelivered``
        the number left out (counted as lost by the store too).

        :raise StoreError: the file cannot be used now; the batch is lost.
        """
        rows: list[tuple[Any, ...]] = []
        error: Exception | None = None
        bad = 0
        for trace in traces:
            try:
                rows.append(_row(trace))
            except Exception as exc:  # one bad trace costs only itself
                error = error or exc
                bad += 1
        # Lost before they reached the store: counted in this commit. Written
        # with no rows too (a batch of only bad traces, or none: that makes
        # the file).
        self._lost += bad
        with _using_store():
            self._write(rows)
        if error is not None:
            from .sinks import partial_failure

            raise partial_failure(error, bad)

    def _write(self, rows: list[tuple[Any, ...]]) -> None:
        self._check_pid()
        if self._writer is not None and _file_id(self.path) != self._writer_file:
            # Deleted (to clear it) or replaced: what is written to the old
            # file is lost to every reader, so write to the new one.
            with contextlib.suppress(sqlite3.Error):
                self._writer.close()
            self._writer = None
        now = time.monotonic()
        if self._writer is None:
            if now < self._retry_at:
                self._lost += len(rows)
                msg = f"wsgitrace trace store {self.path!r} failed recently; retrying shortly"
                raise StoreError(msg, self.path)
            try:
                self._writer = self._connect_writer()
                self._writer_file = _file_id(self.path)
            except StoreError:
                self._lost += len(rows)
                # From when it failed: waiting out a lock may take longer
                # than the delay itself.
                self._retry_at = time.monotonic() + RETRY_SECONDS
                raise
        conn = self._writer
        try:
            with _transaction(conn):
                # Row by row: an id already stored (a retried batch) is
                # ignored, and its bytes must not be counted again.
                added = size = 0
                cur = conn.cursor()
                for row in rows:
                    cur.execute(_INSERT, row)
                    if cur.rowcount > 0:
                        added += 1
                        size += row[6]
                # Taken off the count only once committed: a failed write
                # must still count every trace it did not store.
                lost = self._lost
                conn.execute(
                    "UPDATE meta SET value = value + CASE key"
                    " WHEN 'count' THEN ? WHEN 'bytes' THEN ? WHEN 'lost' THEN ? END"
                    " WHERE key IN ('count', 'bytes', 'lost')",
                    (added, size, lost),
                )
                pruned = self._prune(conn)
        except sqlite3.Error as exc:
            self._lost += len(rows)
            self._writer = None
            with contextlib.suppress(sqlite3.Error):
                conn.close()
            self._retry_at = time.monotonic() + RETRY_SECONDS
            raise _store_error(self.path, self.timeout, exc, "write traces") from None
        self._lost -= lost
        self.written += added
        if pruned:
            self.pruned += pruned
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA incremental_vacuum").fetchall()

    def _connect_writer(self) -> sqlite3.Connection:
        """A new writing connection, the totals recounted; a failure in either
        is a :class:`StoreError` and leaves no connection behind.
        """
        conn = _connect(self.path, self.timeout, create=self.create)
        try:
            self._recount(conn)
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
            raise _store_error(
                self.path, self.timeout, exc, "count the stored traces", tracing=self.create
            ) from None
        return conn

    def _recount(self, conn: sqlite3.Connection) -> None:
        """Set the count and byte totals from the rows (on each new connection)."""
        with _transaction(conn):
            count, size = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM traces"
            ).fetchone()
            conn.execute(
                "UPDATE meta SET value = CASE key WHEN 'count' THEN ? ELSE ? END"
                " WHERE key IN ('count', 'bytes')",
                (count, size),
            )

    def _prune(self, conn: sqlite3.Connection) -> int:
        """Delete the oldest traces over either cap; how many."""
        meta = dict(conn.execute("SELECT key, value FROM meta WHERE key IN ('count', 'bytes')"))
        count, size = int(meta["count"]), int(meta["bytes"])
        last: int | None = None
        removed = freed = 0
        if count > self.max_traces:
            removed, freed, last = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0), MAX(cursor) FROM"
                " (SELECT cursor, size FROM traces ORDER BY cursor LIMIT ?)",
                (count - self.max_traces,),
            ).fetchone()
        if size - freed > self.max_bytes:
            # Down to 90% of the cap, so the next write does not prune again.
            goal = size - self.max_bytes * 9 // 10
            for cursor, row_size in conn.execute(
                "SELECT cursor, size FROM traces WHERE cursor > ? ORDER BY cursor",
                (last or 0,),
            ):
                if freed >= goal:
                    break
                removed += 1
                freed += row_size
                last = cursor
        if not removed:
            return 0
        conn.execute("DELETE FROM traces WHERE cursor <= ?", (last,))
        conn.execute(
            "UPDATE meta SET value = value - CASE key WHEN 'count' THEN ? ELSE ? END"
            " WHERE key IN ('count', 'bytes')",
            (removed, freed),
        )
        conn.execute("UPDATE meta SET value = value + ? WHERE key = 'pruned'", (removed,))
        return int(removed)

    def close(self) -> None:
        """Close this process's connections."""
        self._check_pid()
        with _using_store():
            for conn in (self._writer, self._reader):
                if conn is not None:
                    with contextlib.suppress(sqlite3.Error):
                        conn.close()
        self._writer = self._reader = None

    # -- reading (a trace source for the endpoint) --------------------------

    @contextlib.contextmanager
    def _read(self, doing: str = "read traces") -> Iterator[sqlite3.Connection]:
        self._check_pid()
        with _using_store(), self._read_lock:
            if self._reader is not None and _file_id(self.path) != self._reader_file:
                # Deleted or replaced: read the file the writers now use, and
                # its id, so that readers see its cursors restarted.
                with contextlib.suppress(sqlite3.Error):
                    self._reader.close()
                self._reader = None
                self._instance = None
            if self._reader is None:
                self._reader = _connect(self.path, self.timeout, create=self.create)
                self._reader_file = _file_id(self.path)
            try:
                yield self._reader
            except sqlite3.Error as exc:
                conn, self._reader = self._reader, None
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
                raise _store_error(
                    self.path, self.timeout, exc, doing, tracing=self.create
                ) from None

    @property
    def cursor(self) -> int:
        """Cursor of the newest trace ever written (0 when none)."""
        with self._read() as conn:
            row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'traces'").fetchone()
        return int(row[0]) if row else 0

    @property
    def instance(self) -> str:
        """A random id of the store, the same in every process that reads it."""
        # Through _read() even when known: it forgets the id of a replaced file.
        with self._read() as conn:
            if self._instance is None:
                row = conn.execute("SELECT value FROM meta WHERE key = 'instance'").fetchone()
                self._instance = str(row[0]) if row else ""
            return self._instance

    @property
    def dropped(self) -> int:
        """Traces pruned by the caps plus traces the writing processes lost
        before they reached the store.
        """
        with self._read() as conn:
            row = conn.execute(
                "SELECT COALESCE(SUM(value), 0) FROM meta WHERE key IN ('pruned', 'lost')"
            ).fetchone()
        return int(row[0])

    def __len__(self) -> int:
        with self._read() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM traces").fetchone()[0])

    def latest(self, n: int | None = None) -> list[StoredTrace]:
        """Up to ``n`` traces (all when ``None``), newest first."""
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM traces ORDER BY cursor DESC LIMIT ?",  # noqa: S608
                (-1 if n is None else max(n, 0),),
            ).fetchall()
        return [StoredTrace(self, row) for row in rows]

    def since(self, cursor: int, limit: int | None = None) -> list[StoredTrace]:
        """Traces written after ``cursor``, oldest first, at most ``limit``."""
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM traces WHERE cursor > ?"  # noqa: S608
                " ORDER BY cursor LIMIT ?",
                (cursor, -1 if limit is None else max(limit, 0)),
            ).fetchall()
        return [StoredTrace(self, row) for row in rows]

    def get(self, trace_id: str) -> StoredTrace | None:
        """The trace with this id, or ``None``."""
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM traces WHERE id = ?",  # noqa: S608
                (trace_id,),
            ).fetchone()
        return None if row is None else StoredTrace(self, row)

    def _load(self, cursor: int) -> dict[str, Any] | None:
        with self._read() as conn:
            row = conn.execute("SELECT data FROM traces WHERE cursor = ?", (cursor,)).fetchone()
        return None if row is None else _json_object(row[0])

    def wait(self, cursor: int, timeout: float | None = None) -> bool:
        """Poll until a trace newer than ``cursor`` is there (other processes
        write too, so there is nothing to be woken by).

        :return: ``True`` if one is there, ``False`` on timeout or :meth:`notify`.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        self._check_pid()  # before taking the event: a child makes its own
        wake = self._wake
        while True:
            if self.cursor > cursor:
                return True
            pause = WAIT_POLL_SECONDS
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                pause = min(pause, remaining)
            if wake.wait(pause):
                return self.cursor > cursor

    def notify(self) -> None:
        """Wake every :meth:`wait` now (used when a server shuts down)."""
        self._check_pid()
        wake, self._wake = self._wake, threading.Event()
        wake.set()

    def __repr__(self) -> str:
        return f"<TraceStore {self.path!r} max_traces={self.max_traces}>"


def _after_fork_in_child() -> None:
    for store in list(_stores):
        with contextlib.suppress(Exception):
            store.after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _json_object(text: object) -> dict[str, Any] | None:
    """A row's JSON object, or ``None`` when it is not one (a damaged row,
    or one some other program wrote).
    """
    if not isinstance(text, str | bytes):
        return None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _file_id(path: str) -> tuple[int, int] | None:
    """The device and inode of the file at ``path``, ``None`` when there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _row(trace: Trace) -> tuple[Any, ...]:
    """The row of a finished trace: its JSON, made here (off the request path)."""
    data = trace.to_dict()
    # The summary is a part of the full form, except the error's shape.
    summary = {key: data.get(key) for key in SUMMARY_KEYS}
    error = summary.get("error")
    if isinstance(error, dict):
        summary["error"] = error.get("type")
    # ASCII JSON: a lone surrogate (from an exception message) cannot fail it.
    summary_text = json.dumps(summary, separators=(",", ":"))
    data_text = json.dumps(data, separators=(",", ":"))
    return (
        summary["id"],
        float(summary.get("time") or 0.0),
        str(summary.get("method") or ""),
        str(summary.get("path") or ""),
        summary.get("status"),
        summary.get("duration_ms"),
        len(summary_text) + len(data_text),
        summary_text,
        data_text,
    )
