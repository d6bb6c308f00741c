"""The SQLite file behind a :class:`~wsgitrace.store.TraceStore`: opening
it (WAL mode), making its tables or checking their version, and saying in a
:class:`~wsgitrace.exceptions.StoreError` what is wrong with it::

    conn = _connect(path, 5.0, create=True)
    with _using_store(), _transaction(conn):
        conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'lost'")

Every use of a store's connections runs inside :func:`_using_store`, which a
``fork`` waits for (``os.register_at_fork``), so that no child inherits a
lock or mutex of SQLite's held by a thread it does not have.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3
import threading
from collections.abc import Iterator

from .exceptions import StoreError

#: Version of the store's tables. A store with a higher one is refused.
STORE_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE traces (
    cursor INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    time REAL NOT NULL,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    status INTEGER,
    duration_ms REAL,
    size INTEGER NOT NULL,
    summary TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX traces_time ON traces (time);
"""

#: Most seconds a fork waits for this process's use of a store to end.
FORK_WAIT_SECONDS = 10.0


class _ForkGuard:
    """Keeps ``fork`` out of every use of a store by this process: a child
    inherits SQLite's in-process state (its record of the file locks this
    process holds, its mutexes) as another thread left it, and a lock or
    mutex held at the fork is never released there, so the child's own
    connections would find the store locked, or hang, for good. Uses of the
    store do not exclude one another (readers never wait for writers).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._active = 0
        self._forking = False

    @contextlib.contextmanager
    def using(self) -> Iterator[None]:
        with self._cond:
            while self._forking:
                self._cond.wait()
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                if not self._active:
                    self._cond.notify_all()

    def before_fork(self) -> None:
        self._cond.acquire()
        self._forking = True
        # Bounded: a fork from a thread that is itself using a store must
        # not hang (then the child may find the store locked).
        self._cond.wait_for(lambda: not self._active, FORK_WAIT_SECONDS)
        # Held through the fork: no use of a store starts meanwhile.

    def after_fork_in_parent(self) -> None:
        self._forking = False
        self._cond.notify_all()
        self._cond.release()


_guard = _ForkGuard()


def _using_store() -> contextlib.AbstractContextManager[None]:
    """A use of a store's connections, which no fork interrupts."""
    return _guard.using()


def _before_fork() -> None:
    _guard.before_fork()


def _after_fork_in_parent() -> None:
    _guard.after_fork_in_parent()


def _after_fork_in_child() -> None:
    global _guard
    # The parent's threads that were waiting or using a store are not here.
    old, _guard = _guard, _ForkGuard()
    # This thread held the old one's lock through the fork: a use of a store
    # it had begun ends on that guard, and must find the lock free.
    old.after_fork_in_parent()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )


def _store_error(
    path: str, timeout: float, exc: BaseException, doing: str, *, tracing: bool = True
) -> StoreError:
    """A :class:`StoreError` that says what is wrong with the file, and, in
    a ``tracing`` process (not ``tail --store``), what becomes of its traces.
    """
    text = str(exc)
    lowered = text.lower()
    if "locked" in lowered or "busy" in lowered:
        hint = f"it stayed locked by another process for more than {timeout:g} s"
        if tracing:
            hint += "; tracing goes on in memory and the store is tried again"
    elif "not a database" in lowered or "malformed" in lowered or "corrupt" in lowered:
        hint = "the file is corrupt or not a wsgitrace store"
        if tracing:
            hint += (
                "; move it away or point WSGITRACE_STORE at a new file (tracing goes on in memory)"
            )
    elif "unable to open" in lowered or "readonly" in lowered:
        hint = "check that the file's directory exists and is writable by every worker"
    else:
        hint = "tracing goes on in memory" if tracing else ""
    msg = f"wsgitrace trace store {path!r}: cannot {doing} ({text})" + (f"; {hint}" if hint else "")
    return StoreError(msg, path)


def _connect(path: str, timeout: float, *, create: bool) -> sqlite3.Connection:
    """A connection to the store at ``path``, its tables made or checked."""
    if not create and not os.path.exists(path):
        msg = f"no wsgitrace trace store at {path!r}"
        raise StoreError(msg, path)
    try:
        conn = sqlite3.connect(
            path,
            timeout=timeout,
            isolation_level=None,
            check_same_thread=False,
        )
    except sqlite3.Error as exc:
        raise _store_error(path, timeout, exc, "open the file", tracing=create) from None
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        # Looked at before anything is written: a reader never changes the
        # file, and another program's database is not turned to WAL mode.
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        if names - {"sqlite_sequence"} and not {"meta", "traces"} <= names:
            raise _foreign_error(path)
        if not names:
            if not create:
                msg = f"no wsgitrace trace store at {path!r} (the file has no tables yet)"
                raise StoreError(msg, path)
            # Before the first table exists, so pruned pages can be given
            # back. Only then: on an existing store it waits for the write
            # lock, and a reader must never wait for a writer.
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            msg = f"the file cannot use WAL mode (journal_mode is {mode!r})"
            raise sqlite3.OperationalError(msg)
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA journal_size_limit = 8388608")
        _check_schema(conn, path)
    except StoreError:
        conn.close()
        raise
    except sqlite3.Error as exc:
        conn.close()
        raise _store_error(path, timeout, exc, "open the store", tracing=create) from None
    return conn


def _check_schema(conn: sqlite3.Connection, path: str) -> None:
    """Make the tables of a new store; refuse a foreign or newer one."""
    names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    if "meta" in names and "traces" in names:
        version = _version(conn, path)
    elif names - {"sqlite_sequence"}:
        raise _foreign_error(path)
    else:
        with _transaction(conn):
            # Another worker may have made it since we looked.
            if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone():
                version = _version(conn, path)
            else:
                conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value)")
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?)",
                    [
                        ("schema", STORE_SCHEMA_VERSION),
                        ("instance", secrets.token_hex(8)),
                        ("count", 0),
                        ("bytes", 0),
                        ("pruned", 0),
                        ("lost", 0),
                    ],
                )
                version = STORE_SCHEMA_VERSION
    if version > STORE_SCHEMA_VERSION:
        msg = (
            f"wsgitrace trace store {path!r} has schema version {version}, newer"
            f" than this wsgitrace reads ({STORE_SCHEMA_VERSION}); upgrade wsgitrace in"
            " every process that uses it, or point WSGITRACE_STORE at a new file"
        )
        raise StoreError(msg, path)
    # Versions below ours would be migrated here; 1 is the first.


def _foreign_error(path: str) -> StoreError:
    msg = (
        f"wsgitrace trace store {path!r}: the file is an SQLite database"
        " of something else (it has no wsgitrace tables); point WSGITRACE_STORE"
        " at a new file"
    )
    return StoreError(msg, path)


def _version(conn: sqlite3.Connection, path: str) -> int:
    """The schema version kept in ``meta``."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
    if row is None or not isinstance(row[0], int):
        msg = f"wsgitrace trace store {path!r} has no schema version; use a new file"
        raise StoreError(msg, path)
    return int(row[0])


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` (the write lock at once, so two writers never
    deadlock upgrading), then commit, or roll back on any error, a failed
    ``COMMIT`` included (SQLite leaves the transaction open then).
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
