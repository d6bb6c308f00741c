"""The read side under hostile input: odd query strings and headers sent to
``/_trace``, servers that answer ``tail`` and ``show`` with anything but the
endpoint's JSON, store files in a bad state, and traces full of text meant
for a terminal.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import itertools
import json
import logging
import os
import re
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.test import Client, EnvironBuilder, run_wsgi_app

from wsgitrace import TraceMiddleware, _client
from wsgitrace._answers import _BadAnswerError
from wsgitrace.store import TraceStore

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

LOCAL = {"REMOTE_ADDR": "127.0.0.1"}


def hello(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]


def traced_client() -> tuple[TraceMiddleware, Client]:
    middleware = TraceMiddleware(hello, endpoint=True)
    client = Client(middleware)
    client.get("/x", environ_base=LOCAL).close()
    return middleware, client


def tail_lines(count: int, *args: str) -> tuple[list[str], str]:
    """Run ``wsgitrace tail ARGS`` until it printed ``count`` lines (or 10 s
    passed, or it ended), then stop it: its lines and its stderr.
    """
    with (
        tempfile.TemporaryFile() as err,
        subprocess.Popen(
            [sys.executable, "-m", "wsgitrace", "tail", *args],
            stdout=subprocess.PIPE,
            stderr=err,  # a file: a full pipe would hold it in a write
            text=True,
            env={**os.environ, "COLUMNS": "100", "WSGITRACE_TOKEN": ""},
        ) as proc,
    ):
        assert proc.stdout is not None
        timer = threading.Timer(10, proc.kill)
        timer.start()
        lines: list[str] = []
        try:
            while len(lines) < count and (line := proc.stdout.readline()):
                lines.append(line)
        finally:
            timer.cancel()
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        err.seek(0)
        stderr = err.read().decode("utf-8", "replace")
    return lines, stderr


# -- the endpoint ----------------------------------------------------------------


def test_a_last_event_id_too_long_for_int_is_a_400(caplog: pytest.LogCaptureFixture) -> None:
    """A Last-Event-ID of thousands of digits (int() refuses over 4,300) is
    the 400 of any bad one, not an internal error with its traceback logged.
    """
    _, client = traced_client()
    with caplog.at_level(logging.DEBUG, logger="wsgitrace"):
        reply = client.get(
            "/_trace/stream", headers={"Last-Event-ID": "1" * 5000}, environ_base=LOCAL
        )
    assert reply.status_code == 400
    assert json.loads(reply.get_data())["param"] == "Last-Event-ID"
    assert not caplog.records


# -- servers that are not the endpoint -------------------------------------------


@pytest.fixture(name="hostile")
def fixture_hostile() -> Iterator[Callable[[Callable[[socket.socket], None]], str]]:
    """Serve raw answers on 127.0.0.1: ``hostile(answer)`` starts a server
    that reads each request and calls ``answer(connection)``; its base URL.
    """
    stop = threading.Event()
    listeners: list[socket.socket] = []

    def start(answer: Callable[[socket.socket], None]) -> str:
        listener = socket.create_server(("127.0.0.1", 0))
        listener.settimeout(0.1)
        listeners.append(listener)

        def handle(conn: socket.socket) -> None:
            with conn:
                try:
                    conn.recv(65536)
                    answer(conn)
                except OSError:
                    pass  # the client went away

        def serve() -> None:
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except OSError:
                    continue
                threading.Thread(target=handle, args=(conn,), daemon=True).start()

        threading.Thread(target=serve, daemon=True).start()
        return f"http://127.0.0.1:{listener.getsockname()[1]}"

    yield start
    stop.set()
    for listener in listeners:
        listener.close()


JSON_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"


def answer_json(data: Any) -> Callable[[socket.socket], None]:
    """An answer with ``data`` as its JSON body."""
    body = json.dumps(data).encode()

    def answer(conn: socket.socket) -> None:
        conn.sendall(JSON_HEAD + b"Content-Length: %d\r\n\r\n" % len(body) + body)

    return answer


def full_trace() -> dict[str, Any]:
    """A real trace's full JSON, as ``/_trace/<id>`` serves it."""
    _, client = traced_client()
    listing = json.loads(client.get("/_trace?full=1", environ_base=LOCAL).get_data())
    trace: dict[str, Any] = listing["traces"][0]
    return trace


def wsgitrace_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run the ``wsgitrace`` command, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "wsgitrace", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "100", "WSGITRACE_TOKEN": ""},
        check=False,
    )


def test_an_answer_trickled_byte_by_byte_times_out(
    hostile: Callable[[Callable[[socket.socket], None]], str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server that sends a byte now and then (each read within the socket
    timeout) is given up on after the timeout in all, as one that is silent.
    """

    def trickle(conn: socket.socket) -> None:
        conn.sendall(JSON_HEAD + b"Content-Length: 1000\r\n\r\n")
        for _ in range(300):  # 30 s: far longer than the 1.5 s the client allows
            conn.sendall(b" ")
            time.sleep(0.1)

    monkeypatch.setattr(_client, "_TRANSFER_SECONDS", 0.5)
    client = _client._Client(hostile(trickle), timeout=1.0)
    start = time.monotonic()
    with pytest.raises(_client._UnreachableError, match="took more than"):
        client.get()
    assert time.monotonic() - start < 10  # 1.5 s, with room for a loaded machine


def test_headers_trickled_byte_by_byte_time_out(
    hostile: Callable[[Callable[[socket.socket], None]], str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A slow-loris that sends its status line and headers a byte at a time
    is cut off too, and the connection's timer does not outlive the request.
    """

    def trickle(conn: socket.socket) -> None:
        for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 300:  # 30 s
            conn.sendall(bytes([byte]))
            time.sleep(0.1)

    monkeypatch.setattr(_client, "_TRANSFER_SECONDS", 0.5)
    client = _client._Client(hostile(trickle), timeout=1.0)
    start = time.monotonic()
    with pytest.raises(_client._UnreachableError, match="took more than"):
        client.get()
    assert time.monotonic() - start < 10  # 1.5 s, with room for a loaded machine
    assert not client._timers


def test_an_endless_answer_is_refused_not_read_into_memory(
    hostile: Callable[[Callable[[socket.socket], None]], str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An answer that never ends (some other server's stream) is refused
    once it is larger than any listing, instead of filling memory.
    """
    monkeypatch.setattr(_client, "_MAX_BODY", 2**20)

    def endless(conn: socket.socket) -> None:
        conn.sendall(JSON_HEAD + b"\r\n")
        for _ in range(10_000):  # 640 MiB: stops when the client goes
            conn.sendall(b" " * 65536)

    client = _client._Client(hostile(endless), timeout=5.0)
    with pytest.raises(_BadAnswerError, match="larger than"):
        client.get()


# -- tail's output ---------------------------------------------------------------


def test_tail_json_counts_the_lines_a_reader_got_before_it_went_away(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When the reader of ``tail --json`` goes (``| head -2``) in the middle
    of a batch, the closing "N traces shown" counts the lines it got.
    """
    from wsgitrace._output import _JsonView

    class ClosingOut(io.StringIO):
        def flush(self) -> None:
            if self.getvalue().count("\n") > 2:
                raise BrokenPipeError(32, "Broken pipe")

    out = ClosingOut()
    monkeypatch.setattr(sys, "stdout", out)
    view = _JsonView()
    with pytest.raises(BrokenPipeError):
        view.traces([{"path": "/a"}, {"path": "/b"}, {"path": "/c"}])
    assert view.shown == 2


def test_show_a_trace_whose_event_starts_before_the_request(
    hostile: Callable[[Callable[[socket.socket], None]], str],
) -> None:
    """A trace from another server whose event starts (far) before its
    request is shown, its bar at the start, not a traceback.
    """
    trace = full_trace()
    trace["events"][1]["start_ms"] = -1e299
    result = wsgitrace_cli("show", trace["id"], hostile(answer_json(trace)))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "close" in result.stdout


def test_show_an_event_that_starts_far_into_the_request(
    hostile: Callable[[Callable[[socket.socket], None]], str],
) -> None:
    """An event whose start offset does not fit its 8 columns even in whole
    milliseconds still shows its name (the row is cropped to the line).
    """
    trace = full_trace()
    trace["events"][-1]["start_ms"] = 1e120
    trace["events"][-1]["name"] = "late_event"
    result = wsgitrace_cli("show", trace["id"], hostile(answer_json(trace)))
    assert result.returncode == 0, result.stderr
    assert "late_event" in result.stdout


# -- store files -----------------------------------------------------------------


def test_reading_another_programs_database_leaves_it_as_it_was(tmp_path: Path) -> None:
    """``show --store`` pointed at some other SQLite database refuses it
    without turning it to WAL mode (which other programs may not cope with).
    """
    path = tmp_path / "app.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE users (name TEXT)")
        conn.commit()
    result = wsgitrace_cli("show", "abc", "--store", str(path))
    assert result.returncode == 1
    assert "something else" in result.stderr
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db"]


def test_reading_an_empty_file_does_not_make_it_a_store(tmp_path: Path) -> None:
    """A reader given an empty file (the writer has not made the store yet,
    or a wrong path) says there is no store there and writes nothing to it.
    """
    path = tmp_path / "traces.db"
    path.touch()
    result = wsgitrace_cli("show", "abc", "--store", str(path))
    assert result.returncode == 1
    assert "no trace store at" in result.stderr
    assert path.stat().st_size == 0


def test_a_damaged_row_does_not_fail_the_listings_of_the_store(tmp_path: Path) -> None:
    """A row whose JSON cannot be read is listed from its columns, marked,
    and the other traces with it: ``tail --store`` and ``/_trace`` are not
    broken until it is pruned.
    """
    path = tmp_path / "traces.db"
    middleware = TraceMiddleware(hello, store=str(path), endpoint=True)
    client = Client(middleware)
    for name in ("/a", "/b", "/c"):
        client.get(name, environ_base=LOCAL).close()
    middleware.sinks.flush()  # type: ignore[union-attr]
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("UPDATE traces SET summary = '{bad', data = '[]' WHERE path = '/b'")
        conn.commit()
    reply = client.get("/_trace", environ_base=LOCAL)
    assert reply.status_code == 200
    listed = json.loads(reply.get_data())["traces"]
    assert [t["path"] for t in listed] == ["/c", "/b", "/a"]
    assert listed[1]["warnings"]
    # Every key a summary has, as the endpoint's JSON promises (unknown: null).
    assert listed[1].keys() == listed[0].keys()
    lines, stderr = tail_lines(3, "--json", "--store", str(path))
    assert [json.loads(line)["path"] for line in lines] == ["/a", "/b", "/c"], stderr
    assert "Traceback" not in stderr
    result = wsgitrace_cli("show", listed[1]["id"], "--store", str(path))
    assert "Traceback" not in result.stderr


def test_a_locked_store_is_not_blamed_on_an_app_that_is_not_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store another process kept locked past the timeout is said to be
    locked, its path once, by show and by tail: not "cannot reach PATH
    (...PATH...)", which asks whether an app is running.
    """
    from wsgitrace._store_file import _store_error

    path = str(tmp_path / "traces.db")
    TraceStore(path).write([])
    client = _client._StoreClient(path)
    locked = _store_error(
        path, 5.0, sqlite3.OperationalError("database is locked"), "x", tracing=False
    )

    def get(trace_id: str) -> None:
        raise locked

    monkeypatch.setattr(client.store, "get", get)
    with pytest.raises(_client._UnreachableError) as excinfo:
        client.get("abc-1")
    for message in (
        _client._cannot_reach_message(client, excinfo.value),
        _client._unreachable_message(client, excinfo.value),
    ):
        assert "locked by another process" in message
        assert "is the app running" not in message
        assert message.count(path) == 1


# -- run's request log -----------------------------------------------------------


def test_run_logs_a_path_with_bidi_controls_escaped(tmp_path: Path) -> None:
    """``wsgitrace run`` logs each request's path decoded; an invisible bidi
    control in it (which reorders what the terminal shows) is escaped, as
    werkzeug escapes the C0 and C1 controls.
    """
    (tmp_path / "plainapp.py").write_text(
        "def app(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
        "    return [b'ok']\n"
    )
    err_path = tmp_path / "stderr.txt"
    with (
        err_path.open("wb") as err,
        subprocess.Popen(
            [sys.executable, "-m", "wsgitrace", "run", "plainapp:app", "--port", "0"],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={**os.environ, "PYTHONPATH": str(tmp_path)},
        ) as proc,
    ):
        try:
            deadline = time.monotonic() + 10
            while not (found := re.search(r"traced on http://127\.0\.0\.1:(\d+)", read(err_path))):
                assert time.monotonic() < deadline, read(err_path)
                assert proc.poll() is None, read(err_path)
                time.sleep(0.05)
            conn = http.client.HTTPConnection("127.0.0.1", int(found.group(1)), timeout=10)
            conn.request("GET", "/a%E2%80%AEgnp.exe")
            assert conn.getresponse().read() == b"ok"
            conn.close()
            while "gnp.exe" not in read(err_path):
                assert time.monotonic() < deadline, read(err_path)
                time.sleep(0.05)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    logged = read(err_path)
    assert "\u202e" not in logged
    assert "/a\\u202egnp.exe" in logged


def read(path: Path) -> str:
    return path.read_bytes().decode("utf-8", "replace")


# -- access ----------------------------------------------------------------------


@pytest.mark.parametrize("token", ["mot-de-passe-à", "Ångström-Å"])
def test_a_token_ending_in_a_utf8_byte_python_calls_space_opens_the_endpoint(token: str) -> None:
    """A token whose UTF-8 ends in 0x85 or 0xA0 (``à``, ``Å``) is matched:
    the header (bytes as latin-1) is stripped of HTTP's spaces only, not of
    what ``str.strip()`` takes for spaces.
    """
    middleware = TraceMiddleware(hello, endpoint=True, token=token)

    def remote(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        environ["REMOTE_ADDR"] = "10.1.2.3"  # not loopback: the token is needed
        return middleware(environ, start_response)

    server = make_server("127.0.0.1", 0, remote, threaded=True, request_handler=QuietHandler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        assert _client._Client(url, token=token).get()["schema"] == 1
        with pytest.raises(_client._NotFoundError):
            _client._Client(url, token=token[:-1]).get()
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(WSGIRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


def test_tail_says_when_answers_come_from_several_processes() -> None:
    """Workers of a pre-fork server without a store each answer with their
    own traces: tail does not take each switch for a restart (and show
    traces again, or skip some, without end) but says what to do, once.
    """
    workers = [TraceMiddleware(hello, endpoint=True) for _ in range(2)]
    turn = itertools.count()

    def balancer(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        return workers[next(turn) % 2](environ, start_response)

    for count, worker in enumerate(workers, 1):
        for _ in range(count * 2):  # cursors that differ: the long-polls answer at once
            Client(worker).get("/x", environ_base=LOCAL).close()
    server = make_server("127.0.0.1", 0, balancer, threaded=True, request_handler=QuietHandler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        lines, stderr = tail_lines(100, "--json", f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
        server.server_close()
    assert "more than one process" in stderr
    assert "WSGITRACE_STORE" in stderr
    assert stderr.count("restarted") <= 1
    assert len(lines) <= 2 + 4


# -- URLs ------------------------------------------------------------------------


def test_a_url_http_cannot_carry_as_typed_is_not_a_traceback(
    hostile: Callable[[Callable[[socket.socket], None]], str],
) -> None:
    """A host name IDNA refuses (a label over 63 characters) is a usage
    error, and a non-ASCII path (an endpoint under a prefix such as
    ``/é/_trace``) is sent percent-encoded.
    """
    result = wsgitrace_cli("show", "abc", f"http://{'a' * 64}.example:5000")
    assert result.returncode == 2
    assert "not a valid host name" in result.stderr
    assert "Traceback" not in result.stderr

    def not_found(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 404 NOT FOUND\r\nContent-Length: 0\r\n\r\n")

    result = wsgitrace_cli("show", "abc", hostile(not_found) + "/é/_trace")
    assert "Traceback" not in result.stderr
    assert result.returncode == 1
    assert "no trace 'abc' at http://127.0.0.1:" in result.stderr
    assert "/%C3%A9/_trace" in result.stderr


@pytest.mark.parametrize("junk", ["\xa0", "\x85"])
def test_a_host_with_a_latin1_space_after_it_is_not_localhost(junk: str) -> None:
    """``Host: localhost<0xA0>`` names no loopback host: only HTTP's spaces
    and tabs are stripped from the header, not what ``str.strip()`` takes
    for spaces.
    """
    middleware, _ = traced_client()

    def status(host: str) -> str:
        environ = EnvironBuilder("/_trace", environ_base=LOCAL).get_environ()
        environ["HTTP_HOST"] = host  # as a server hands the header over: latin-1
        return run_wsgi_app(middleware, environ)[1]

    assert status("localhost" + junk) == "404 NOT FOUND"
    assert status(" localhost\t") == "200 OK"


def test_show_of_an_id_the_store_does_not_hold_blames_no_buffer_or_endpoint(
    tmp_path: Path,
) -> None:
    """``show --store`` of an id the store does not hold says so of the
    store, not of a buffer or an endpoint that it never asked.
    """
    path = tmp_path / "traces.db"
    TraceStore(path).write([])
    result = wsgitrace_cli("show", "no-such-id", "--store", str(path))
    assert result.returncode == 1
    assert "no trace 'no-such-id' in the store" in result.stderr
    assert "endpoint" not in result.stderr


# -- output that cannot be written -----------------------------------------------


def answered_command(
    hostile: Callable[[Callable[[socket.socket], None]], str], command: tuple[str, ...]
) -> list[str]:
    """The arguments after the interpreter for ``wsgitrace COMMAND`` (``show``
    of a trace's id) against a server that answers with one real trace.
    """
    trace = full_trace()
    page = {"schema": 1, "instance": "i", "cursor": 1, "dropped": 0, "traces": [trace]}
    url = hostile(answer_json(trace if command[0] == "show" else page))
    ids = (trace["id"],) if command[0] == "show" else ()
    return ["-m", "wsgitrace", *command, *ids, url]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize(
    "command", [("show", "--json"), ("show",), ("tail", "--json"), ("tail",)], ids=" ".join
)
def test_output_to_a_full_disk_is_one_message(
    hostile: Callable[[Callable[[socket.socket], None]], str], command: tuple[str, ...]
) -> None:
    """Output that cannot be written (a full disk) ends the command with
    one message, not a traceback.
    """
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, *answered_command(hostile, command)],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=30,
            env={**os.environ, "WSGITRACE_TOKEN": ""},
            check=False,
        )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "cannot write the output: No space left on device" in result.stderr


@pytest.mark.skipif(not os.path.exists("/bin/sh"), reason="needs /bin/sh")
@pytest.mark.parametrize("command", [("show", "--json"), ("tail", "--json")], ids=" ".join)
def test_output_with_stdout_closed_is_one_message(
    hostile: Callable[[Callable[[socket.socket], None]], str], command: tuple[str, ...]
) -> None:
    """Started with its stdout closed, the JSON output says so in one
    message, not a traceback about None.
    """
    result = subprocess.run(
        # /bin/sh runs the command with its stdout closed.
        [
            "/bin/sh",
            "-c",
            'exec "$@" >&-',
            "sh",
            sys.executable,
            *answered_command(hostile, command),
        ],
        stderr=subprocess.PIPE,
        text=True,
        timeout=30,
        env={**os.environ, "WSGITRACE_TOKEN": ""},
        check=False,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "standard output is closed" in result.stderr
