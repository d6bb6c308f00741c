"""gunicorn with three sync workers writing one trace store: ``/_trace``
(whichever worker answers) and ``wsgitrace tail --store`` see every request
exactly once, with and without ``--preload`` (app made before the fork), and
a worker killed mid-load loses nothing of the others'.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="gunicorn needs POSIX")

TIMEOUT = 10
WORKERS = 3

APP = textwrap.dedent(
    """
    import os
    import time
    from urllib.parse import parse_qs

    from wsgitrace import TraceMiddleware


    def app(environ, start_response):
        query = parse_qs(environ.get("QUERY_STRING", ""))
        delay = float(query.get("delay", ["0"])[0])
        if delay:
            time.sleep(min(delay, 1.0))
        body = f"{os.getpid()}\\n".encode()
        start_response(
            "200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
        )
        return [body]


    traced = TraceMiddleware(app, endpoint=True)


    def application(environ, start_response):
        # Say which worker answered, /_trace included.
        def pid_start_response(status, headers, exc_info=None):
            headers = [*headers, ("X-Worker-Pid", str(os.getpid()))]
            return start_response(status, headers, exc_info)

        return traced(environ, pid_start_response)
    """
)


@dataclass
class Server:
    port: int
    store: str
    process: subprocess.Popen[bytes]
    log: Path


@contextlib.contextmanager
def gunicorn(tmp_path: Path, *, preload: bool) -> Iterator[Server]:
    """Three sync workers on a socket bound here (fd://), all writing one store."""
    (tmp_path / "storeapp.py").write_text(APP)
    store = str(tmp_path / "traces.db")
    log = tmp_path / "gunicorn.log"
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSGITRACE_")}
    env["WSGITRACE_STORE"] = store
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        f"--workers={WORKERS}",
        "--worker-class=sync",
        f"--bind=fd://{listener.fileno()}",
        f"--chdir={tmp_path}",
        "--timeout=20",
        "--graceful-timeout=3",
        *(["--preload"] if preload else []),
        "storeapp:application",
    ]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, pass_fds=(listener.fileno(),), stdout=out, stderr=subprocess.STDOUT, env=env
        )
    listener.close()
    try:
        status, _ = get(port, "/probe")
        assert status == 200, log.read_text()
        yield Server(port, store, process, log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    text = log.read_text(errors="replace")
    assert "wsgitrace: internal error" not in text, text
    assert "wsgitrace trace store" not in text, text


def get(port: int, path: str, pids: set[int] | None = None) -> tuple[int, bytes]:
    """GET a path; adds the answering worker's pid to ``pids``."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        if pids is not None:
            pids.add(int(response.getheader("X-Worker-Pid") or 0))
        return response.status, response.read()
    finally:
        connection.close()


def listing(port: int, pids: set[int] | None = None) -> dict[str, Any]:
    status, body = get(port, "/_trace?limit=1000", pids)
    assert status == 200
    data: dict[str, Any] = json.loads(body)
    return data


def load(port: int, paths: list[str], threads: int = 6) -> dict[str, int]:
    """GET every path from several threads at once; the pid that served
    each one that succeeded.
    """
    served: dict[str, int] = {}
    lock = threading.Lock()
    todo = list(paths)

    def worker() -> None:
        while True:
            with lock:
                if not todo:
                    return
                path = todo.pop(0)
            try:
                status, body = get(port, path)
            except (OSError, http.client.HTTPException):
                continue  # served by a worker that was killed
            if status == 200:
                with lock:
                    served[path] = int(body)

    running = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in running:
        thread.start()
    for thread in running:
        thread.join(timeout=120)
    return served


def tail_store(store: str, expected: int, timeout: float = 20) -> list[dict[str, Any]]:
    """Run ``wsgitrace tail --json --store``; the lines it prints until it
    has printed ``expected`` and then been quiet for a second.
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "wsgitrace", "tail", "--json", "-n", "1000", "--store", store],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[dict[str, Any]] = []

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(json.loads(line))

    reader = threading.Thread(target=read)
    reader.start()
    deadline = time.monotonic() + timeout
    while len(lines) < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # anything more (a duplicate) would show by now
    process.terminate()
    _, stderr = process.communicate(timeout=30)
    reader.join(timeout=10)
    assert "Traceback" not in stderr, stderr
    return lines


def wait_for(predicate: Callable[[], Any], timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(0.05)


@pytest.mark.parametrize("preload", [False, True], ids=["fork-then-import", "preload"])
def test_every_worker_sees_every_request_once(tmp_path: Path, preload: bool) -> None:
    """N requests spread over 3 workers: /_trace from any worker, and tail
    --store, list exactly N traces (plus the start-up probe), none twice.
    """
    count = 90
    with gunicorn(tmp_path, preload=preload) as server:
        paths = [f"/r/{i}?delay=0.01" for i in range(count)]
        served = load(server.port, paths)
        assert len(served) == count
        assert len(set(served.values())) >= 2, "the load should reach several workers"

        def complete() -> dict[str, Any] | None:
            page = listing(server.port)
            return page if len(page["traces"]) == count + 1 else None

        wait_for(complete)
        pids_answering: set[int] = set()
        # Sequential connections may all be accepted by one worker for a
        # while: read until two have answered, within a bound.
        for attempt in range(300):
            if attempt >= 30 and len(pids_answering) >= 2:
                break
            page = listing(server.port, pids_answering)
            ids = [t["id"] for t in page["traces"]]
            assert len(ids) == len(set(ids)) == count + 1
            requested = sorted(t["path"] for t in page["traces"] if t["path"].startswith("/r/"))
            assert requested == sorted(p.split("?")[0] for p in paths)
            assert page["cursor"] == count + 1
            assert page["dropped"] == 0
        # The listing came from several workers' endpoints, all reading one store.
        assert len(pids_answering) >= 2
        # Trace ids are made per process: several prefixes.
        prefixes = {t["id"].rsplit("-", 1)[0] for t in page["traces"]}
        assert len(prefixes) >= 2

        lines = tail_store(server.store, count + 1)
        ids = [line["id"] for line in lines]
        assert len(ids) == len(set(ids))
        assert len(lines) == count + 1


def test_killing_a_worker_mid_load_keeps_the_others_traces(tmp_path: Path) -> None:
    """SIGKILL one worker while requests flow: every request the other
    workers served is in the store, once, and the store is intact.
    """
    with gunicorn(tmp_path, preload=False) as server:
        _, body = get(server.port, "/victim")
        victim = int(body)
        paths = [f"/k/{i}?delay=0.02" for i in range(150)]
        killer = threading.Timer(0.5, os.kill, [victim, signal.SIGKILL])
        killer.start()
        served = load(server.port, paths)
        killer.join()
        survivors = {path.split("?")[0] for path, pid in served.items() if pid != victim}
        assert len(survivors) > 50

        def stored_paths() -> list[str]:
            page = listing(server.port)
            return [t["path"] for t in page["traces"] if t["path"].startswith("/k/")]

        wait_for(lambda: survivors <= set(stored_paths()))
        paths_in_store = stored_paths()
        assert len(paths_in_store) == len(set(paths_in_store))

        with contextlib.closing(sqlite3.connect(server.store, timeout=10)) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            stored = [row[0] for row in conn.execute("SELECT path FROM traces")]
        # Each request the surviving workers served is stored once.
        stored_k = [path.split("?")[0] for path in stored if path.startswith("/k/")]
        assert len(stored_k) == len(set(stored_k))
        assert survivors <= set(stored_k)
