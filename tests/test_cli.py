"""The ``wsgitrace`` command, run for real in subprocesses (and on a
pseudo-terminal) against real servers on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import http.server
import json
import os
import pty
import queue
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import textwrap
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import quote

import pytest
from werkzeug.serving import WSGIRequestHandler, make_server

from wsgitrace import TraceMiddleware
from wsgitrace._client import endpoint_url
from wsgitrace._run_options import given_options
from wsgitrace._serve import DEMO_ROUND
from wsgitrace.cli import run
from wsgitrace.config import resolve_options
from wsgitrace.demo_app import create_app
from wsgitrace.flask import FlaskTrace

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

TIMEOUT = 15.0
ROOT = Path(__file__).resolve().parent.parent
HOSTILE = "/x\x1b[2J[bold red]\x1b]8;;http://evil\x07click\x1b]8;;\x07\rend"
HOSTILE_QUOTED = quote(HOSTILE, safe="/")
HOSTILE_SHOWN = "/x\\x1b[2J[bold red]\\x1b]8;;http://evil\\x07click\\x1b]8;;\\x07\\x0dend"
SECRETS = ("hunter2-auth", "cookie-secret-9", "api-key-77", "query-pw-5")
RAW_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")


class QuietHandler(WSGIRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


class Front:
    """Counts long-polls (so a test knows tail is following) and can make
    every client look remote (so tokens are needed).
    """

    def __init__(self, app: WSGIApplication, remote: str | None = None) -> None:
        self.app = app
        self.remote = remote
        self.polls = 0

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if self.remote is not None:
            environ["REMOTE_ADDR"] = self.remote
        if "wait=" in environ.get("QUERY_STRING", ""):
            self.polls += 1
        return self.app(environ, start_response)


@dataclass
class Served:
    front: Front
    server: Any
    middleware: TraceMiddleware

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def get(self, target: str, headers: dict[str, str] | None = None) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", self.server.server_port, timeout=TIMEOUT)
        try:
            conn.request("GET", target, headers=headers or {})
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()

    def last_id(self, path: str | None = None) -> str:
        deadline = time.monotonic() + TIMEOUT
        while True:
            for trace in self.middleware.buffer.latest():
                if trace.finished and (path is None or trace.path == path):
                    return trace.id
            assert time.monotonic() < deadline, "no trace"
            time.sleep(0.01)

    def wait_for_poll(self, after: int = 0) -> None:
        deadline = time.monotonic() + TIMEOUT
        while self.front.polls <= after:
            assert time.monotonic() < deadline, "tail never long-polled"
            time.sleep(0.01)

    def stop(self) -> None:
        endpoint = getattr(self.middleware, "_endpoint_app", None)
        if endpoint is not None:
            endpoint.shutdown()  # end long-polls now
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(name="serve")
def fixture_serve() -> Iterator[Callable[..., Served]]:
    """Serve the bundled example Flask app, traced, on 127.0.0.1."""
    started: list[Served] = []

    def start(port: int = 0, *, remote: str | None = None, **options: Any) -> Served:
        options.setdefault("endpoint", True)
        app = create_app()
        app.logger.disabled = True
        ext = FlaskTrace(app, **options)
        front = Front(app, remote)
        server = make_server("127.0.0.1", port, front, threaded=True, request_handler=QuietHandler)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        served = Served(front, server, ext.middleware)
        started.append(served)
        return served

    yield start
    for served in started:
        with contextlib.suppress(OSError):
            served.stop()


def command_env(**extra: str) -> dict[str, str]:
    """The environment for the command: no colour forcing, no wsgitrace settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("WSGITRACE_", "FORCE_COLOR", "NO_COLOR", "TTY_", "COLUMNS", "LINES"))
    }
    env.update(extra)
    return env


class Command:
    """The real command in a subprocess, its output read line by line."""

    def __init__(self, args: list[str], *, script: bool = False, **kwargs: Any) -> None:
        executable = [console_script()] if script else [sys.executable, "-m", "wsgitrace"]
        kwargs.setdefault("env", command_env())
        self.proc = subprocess.Popen(
            [*executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs
        )
        self.out: queue.Queue[str] = queue.Queue()
        self.err: queue.Queue[str] = queue.Queue()
        self.stdout = ""
        self.stderr = ""
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(pipe: IO[bytes], lines: queue.Queue[str]) -> None:
        for line in iter(pipe.readline, b""):
            lines.put(line.decode("utf-8", "replace"))

    def _drain(self) -> None:
        while not self.out.empty():
            self.stdout += self.out.get_nowait()
        while not self.err.empty():
            self.stderr += self.err.get_nowait()

    def wait_for(self, needle: str, *, stream: str = "out", timeout: float = TIMEOUT) -> str:
        """Wait until ``needle`` is in stdout (or stderr); return that output."""
        deadline = time.monotonic() + timeout
        while True:
            self._drain()
            text = self.stdout if stream == "out" else self.stderr
            if needle in text:
                return text
            if self.proc.poll() is not None and self.out.empty() and self.err.empty():
                for reader in self._readers:
                    reader.join(1)
                self._drain()
                text = self.stdout if stream == "out" else self.stderr
                if needle in text:
                    return text
                pytest.fail(f"exited {self.proc.returncode} before {needle!r}:\n{self.stderr}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {needle!r} in {stream}:\n{text}\nstderr:\n{self.stderr}")
            time.sleep(0.02)

    def finish(self, *, interrupt: bool = True, timeout: float = TIMEOUT) -> int:
        """Send SIGINT (like Ctrl-C) and return the exit status."""
        if interrupt and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(timeout)
        finally:
            self.close()
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(TIMEOUT)
        for reader in self._readers:
            reader.join(TIMEOUT)
        self._drain()
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture(name="cli")
def fixture_cli() -> Iterator[Callable[..., Command]]:
    commands: list[Command] = []

    def start(*args: str, **kwargs: Any) -> Command:
        command = Command(list(args), **kwargs)
        commands.append(command)
        return command

    yield start
    for command in commands:
        command.close()


def run_command(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    kwargs.setdefault("env", command_env())
    return subprocess.run(
        [sys.executable, "-m", "wsgitrace", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        **kwargs,
    )


def console_script() -> str:
    """The installed ``wsgitrace`` script next to this interpreter."""
    found = shutil.which("wsgitrace", path=os.path.dirname(sys.executable))
    assert found is not None, "the wsgitrace console script is not installed"
    return found


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- tail -----------------------------------------------------------------------


def test_endpoint_url() -> None:
    """A base URL gets the default prefix; an endpoint URL is kept."""
    assert endpoint_url("http://127.0.0.1:5000") == "http://127.0.0.1:5000/_trace"
    assert endpoint_url("http://127.0.0.1:5000/") == "http://127.0.0.1:5000/_trace"
    assert endpoint_url("localhost:8000") == "http://localhost:8000/_trace"
    assert endpoint_url("http://h:1/_trace/") == "http://h:1/_trace"
    assert endpoint_url("https://h/tools/_trace") == "https://h/tools/_trace"


def test_tail_json_receives_traces_made_after_it_started(
    serve: Callable[..., Served], cli: Callable[..., Command]
) -> None:
    """tail --json prints one summary per line, as requests are served."""
    served = serve()
    served.get("/")  # before tail: not shown with -n 0
    tail = cli("tail", "--json", "-n", "0", served.url)
    served.wait_for_poll()
    for path in ("/api/v1/items/tea", "/missing", "/boom"):
        served.get(path)
    output = tail.wait_for('"/boom"')
    assert tail.finish() == 0
    lines = json_lines(output)
    assert [line["path"] for line in lines] == ["/api/v1/items/tea", "/missing", "/boom"]
    assert [line["status"] for line in lines] == [200, 404, 500]
    assert all(line["state"] == "finished" for line in lines)
    assert lines[0]["endpoint"] == "api.v1.item"
    assert lines[0]["hooks"] >= 4
    assert "{" not in tail.stderr


def test_tail_shows_the_last_n_then_follows(
    serve: Callable[..., Served], cli: Callable[..., Command]
) -> None:
    """tail -n 2 prints the two newest traces, oldest first, then new ones;
    no colour codes when stdout is not a terminal.
    """
    served = serve()
    for path in ("/first", "/second", "/third"):
        served.get(path)
    tail = cli("tail", "-n", "2", served.url)
    tail.wait_for("/third")
    served.wait_for_poll()
    served.get("/fourth")
    output = tail.wait_for("/fourth")
    assert tail.finish() == 0
    assert "/first" not in output
    lines = output.splitlines()
    assert lines[0].split() == ["TIME", "METHOD", "PATH", "ST", "DUR", "TTFB", "BYTES", "HOOKS"]
    paths = [line.split()[2] for line in lines[1:]]
    assert paths == ["/second", "/third", "/fourth"]
    assert "\x1b" not in output
    assert all(len(line) <= 80 for line in lines)


def test_tail_verbose_shows_each_timeline(
    serve: Callable[..., Served], cli: Callable[..., Command]
) -> None:
    """tail -v prints the waterfall: hooks, blueprint, short-circuit, g changes."""
    served = serve()
    served.get("/admin/")
    tail = cli("tail", "-v", "-n", "1", served.url)
    output = tail.wait_for("signal:appcontext-popped")
    assert tail.finish() == 0
    assert "GET /admin/ → 403 FORBIDDEN" in output
    assert "before_request:load_user  g+ user" in output
    assert "before_request:admin.require_admin  bp=admin" in output
    assert "short-circuit" in output
    assert output.index("load_user") < output.index("require_admin")


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--status", "5xx"], ["/boom"]),
        (["--status", "404"], ["/missing"]),
        (["--method", "POST"], ["/"]),
        (["--path", "/api"], ["/api/v1/items/tea"]),
        (["--slow", "100"], ["/slow"]),
    ],
)
def test_tail_filters(
    serve: Callable[..., Served],
    cli: Callable[..., Command],
    options: list[str],
    expected: list[str],
) -> None:
    """--status, --method, --path and --slow filter what tail shows."""
    served = serve()
    for path in ("/", "/missing", "/boom", "/api/v1/items/tea", "/slow?ms=150"):
        served.get(path)
    conn = http.client.HTTPConnection("127.0.0.1", served.server.server_port, timeout=TIMEOUT)
    conn.request("POST", "/")
    conn.getresponse().read()
    conn.close()
    tail = cli("tail", "--json", "-n", "50", *options, served.url)
    served.wait_for_poll()
    assert tail.finish() == 0
    assert [line["path"] for line in json_lines(tail.stdout)] == expected


@pytest.mark.parametrize("request_before_tail_polls", [False, True])
def test_tail_reconnects_and_resumes_after_a_restart(
    serve: Callable[..., Served], cli: Callable[..., Command], request_before_tail_polls: bool
) -> None:
    """When the server goes away tail says so, waits, and follows the new
    process (whose cursors start again) when it is back; also when the new
    process already has as many traces as tail had seen (tail checks for a
    restart at once, not after a long-poll for cursors past the old ones).
    """
    port = free_port()
    first = serve(port)
    tail = cli("tail", "--json", "-n", "0", first.url)
    first.wait_for_poll()
    first.get("/before-restart")
    tail.wait_for("/before-restart")
    first.stop()
    tail.wait_for("cannot reach", stream="err")
    second = serve(port)
    if not request_before_tail_polls:
        second.wait_for_poll()
    second.get("/after-restart")  # cursor 1: the cursor tail had reached
    output = tail.wait_for("/after-restart", timeout=8)
    assert tail.finish() == 0
    assert [line["path"] for line in json_lines(output)] == ["/before-restart", "/after-restart"]
    assert "reconnected" in tail.stderr
    assert "restarted" in tail.stderr
    # In the order they happened: back in touch, then a new process found.
    assert tail.stderr.index("reconnected") < tail.stderr.index("restarted"), tail.stderr


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://[::1", "not a valid URL"),
        ("http://127.0.0.1:abc", "not a valid URL"),
        ("http://127.0.0.1:99999", "Port out of range"),
        ("http://user:pw@127.0.0.1:5000", "user name or password"),
        ("http://127.0.0.1:5000/has space", "spaces or control characters"),
        ("http://127.0.0.1:5000/_trace/stream", "not its stream"),
    ],
)
def test_bad_urls_are_usage_errors(url: str, message: str) -> None:
    """A URL that cannot work is a usage error (exit 2), not a retry loop."""
    for command in ("tail", "show"):
        args = [command, url] if command == "tail" else [command, "some-id", url]
        result = run_command(*args)
        assert result.returncode == 2, (command, result.stderr)
        assert message in result.stderr
        assert "Traceback" not in result.stderr


def test_endpoint_url_of_a_root_with_slashes() -> None:
    assert endpoint_url("http://127.0.0.1:5000//") == "http://127.0.0.1:5000/_trace"


class JsonServer(http.server.BaseHTTPRequestHandler):
    """Answers every GET with the JSON body the test sets."""

    body = b"{}"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def run_against(
    handler: type[http.server.BaseHTTPRequestHandler], *commands: list[str]
) -> list[subprocess.CompletedProcess[str]]:
    """Run each command, the URL of a server of ``handler`` on 127.0.0.1
    appended, and stop the server.
    """
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        return [run_command(*args, url) for args in commands]
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    "body",
    [
        b"{}",
        b"[]",
        b'"hello"',
        b'{"traces": null, "cursor": 1}',
        b'{"traces": []}',
        b'{"traces": [], "cursor": "x"}',
    ],
)
def test_json_that_is_not_the_endpoints_is_refused(body: bytes) -> None:
    """tail and show say the answer is not a wsgitrace endpoint's, and fail."""
    handler = type("Handler", (JsonServer,), {"body": body})
    tail, show = run_against(handler, ["tail"], ["show", "some-id"])
    assert tail.returncode == 2
    assert "not a wsgitrace listing" in tail.stderr
    assert show.returncode == 1
    assert "not a wsgitrace trace" in show.stderr
    assert "Traceback" not in tail.stderr + show.stderr


@pytest.mark.parametrize(
    "fields",
    [
        {"cursor": 1, "dropped": 0, "traces": [], "id": "x", "events": []},
        # A newer schema may change the fields' shapes: still "upgrade".
        {"cursor": "c1", "traces": {"x": {}}, "id": 7, "events": {}},
    ],
)
def test_a_newer_schema_is_refused(fields: dict[str, Any]) -> None:
    """A server speaking a newer JSON schema: tail and show say to upgrade
    (tail used to follow it, polling it without pause).
    """
    listing = {"schema": 2, **fields}
    handler = type("Handler", (JsonServer,), {"body": json.dumps(listing).encode()})
    tail, show = run_against(handler, ["tail"], ["show", "x"])
    assert tail.returncode == 2
    assert show.returncode == 1
    for result in (tail, show):
        assert "schema version 2; this wsgitrace reads version 1" in result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "item",
    [
        {"duration_ms": "5 ms"},
        {"bytes": [1]},
        {"duration_ms": float("nan")},
        {"time": "now"},
        {"g": ["user"]},
        {"warnings": [1]},
        {"error": {"type": None}},
        {"events": [{"kind": "view", "name": "view:x", "start_ms": "x"}]},
        {"events": [{"kind": "view", "name": "view:x", "attrs": ["x"]}]},
        {"events": "abc"},
    ],
)
def test_traces_of_the_wrong_shape_are_refused(item: dict[str, Any]) -> None:
    """Fields the viewers compute with but of the wrong type: tail -v and
    show say the answer is not a wsgitrace endpoint's, without a traceback.
    """
    trace = {"id": "x", "cursor": 1, "method": "GET", "path": "/", "events": [], **item}
    page = {"schema": 1, "cursor": 1, "dropped": 0, "traces": [trace], **trace}
    handler = type("Handler", (JsonServer,), {"body": json.dumps(page).encode()})
    commands = [["tail", "-v"], ["show", "x"]]
    if "duration_ms" in item or "bytes" in item:  # in the summary table too
        commands.append(["tail"])
    for result in run_against(handler, *commands):
        assert result.returncode in (1, 2), result.stderr
        assert "is not a wsgitrace" in result.stderr
        assert "Traceback" not in result.stderr


class NestedJsonServer(http.server.BaseHTTPRequestHandler):
    """Answers with JSON nested too deep for the decoder (RecursionError)."""

    code = 503

    def do_GET(self) -> None:
        body = b"[" * 4000
        self.send_response(self.code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.mark.parametrize("code", [200, 500, 503])
def test_json_nested_too_deep_is_not_a_traceback(code: int) -> None:
    """An answer (a 503 checked for the endpoint's "busy" too) whose JSON
    is nested too deep to decode is an answer that is not the endpoint's:
    show says so and fails, without a traceback.
    """
    handler = type("Handler", (NestedJsonServer,), {"code": code})
    [show] = run_against(handler, ["show", "x-1"])
    assert show.returncode == 1, show.stderr
    assert "Traceback" not in show.stderr
    assert f"HTTP {code}" in show.stderr or "not JSON" in show.stderr


def test_show_refuses_an_empty_id_and_the_stream(serve: Callable[..., Served]) -> None:
    served = serve()
    result = run_command("show", "", served.url)
    assert result.returncode == 2
    assert "the trace id is empty" in result.stderr
    result = run_command("show", "stream", served.url)
    assert result.returncode == 1
    assert "no trace 'stream'" in result.stderr


def test_show_says_when_the_url_was_given_as_the_id(serve: Callable[..., Served]) -> None:
    """``show URL`` (the ID forgotten) is a usage error naming the mistake,
    not "cannot reach http://127.0.0.1:5000".
    """
    served = serve()
    result = run_command("show", served.url)
    assert result.returncode == 2
    assert f"{served.url!r} is not a trace id (the URL goes after the ID)" in result.stderr
    assert "cannot reach" not in result.stderr
    result = run_command("show", "a b", served.url)
    assert result.returncode == 2
    assert "'a b' is not a trace id; ids are letters, digits" in result.stderr


def test_token_is_sent_as_utf8_and_never_echoed(
    serve: Callable[..., Served], cli: Callable[..., Command], tmp_path: Path
) -> None:
    """A non-ASCII token works as the endpoint compares it (UTF-8); one with
    a line break is refused without printing it.
    """
    served = serve(remote="10.1.2.3", token="pässwörd")
    served.get("/")
    result = run_command(
        "show", served.last_id(), served.url, env=command_env(WSGITRACE_TOKEN="pässwörd")
    )
    assert result.returncode == 0, result.stderr
    tail = cli("tail", "-n", "1", "--json", served.url, env=command_env(WSGITRACE_TOKEN="pässwörd"))
    assert '"path": "/"' in tail.wait_for('"path": "/"')
    assert tail.finish() == 0
    token_file = tmp_path / "token"
    token_file.write_text("first-line-secret\nsecond-line-secret\n")
    result = run_command("tail", "--token-file", str(token_file), served.url)
    assert result.returncode == 2
    assert "line break or control character" in result.stderr
    assert "line-secret" not in result.stderr
    missing = tmp_path / "no-such-token"
    result = run_command("tail", "--token-file", str(missing), served.url)
    assert result.returncode == 2
    assert f"cannot read the token file {str(missing)!r}" in result.stderr


@pytest.mark.parametrize("flag", ["-v", "--json"])
def test_tail_stops_quietly_when_its_reader_leaves(serve: Callable[..., Served], flag: str) -> None:
    """``tail | head -1``: once the reader is gone, tail exits at its next
    write, with no traceback and no closing count (which would miss what
    went into the pipe).
    """
    served = serve()
    assert served.get("/") == 200
    served.last_id()
    proc = subprocess.Popen(
        [sys.executable, "-m", "wsgitrace", "tail", flag, served.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=command_env(),
    )
    # A tail that printed nothing would hold readline() for good: killed then.
    killer = threading.Timer(TIMEOUT, proc.kill)
    killer.start()
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline()
        killer.cancel()
        proc.stdout.close()  # as head -1 does
        deadline = time.monotonic() + TIMEOUT
        while proc.poll() is None:
            assert time.monotonic() < deadline, "tail kept running with no reader"
            served.get("/api/v1/items/tea")
            time.sleep(0.1)
        _, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        killer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 1
    assert b"Traceback" not in stderr
    assert b"shown" not in stderr


@pytest.mark.parametrize("command", ["tail", "show"])
@pytest.mark.parametrize("port", ["5000", ":5000"])
def test_a_port_alone_is_not_taken_for_a_host(command: str, port: str) -> None:
    """``tail 5000`` is a usage error naming the URL meant, not a request to
    a host named 5000 (which is an IP address, 0.0.19.136).
    """
    args = [command, port] if command == "tail" else [command, "abc-1", port]
    result = run_command(*args)
    assert result.returncode == 2
    assert f"{port!r} is a port, not a URL: give http://127.0.0.1:5000" in result.stderr


def test_tail_waits_for_an_unreachable_server(cli: Callable[..., Command]) -> None:
    """Nothing listening: a clear message, then it keeps trying until Ctrl-C."""
    tail = cli("tail", f"http://127.0.0.1:{free_port()}")
    tail.wait_for("cannot reach", stream="err")
    assert tail.proc.poll() is None
    assert tail.finish() == 0
    assert "is the app running?" in tail.stderr


class GatewayServer(http.server.BaseHTTPRequestHandler):
    """A proxy whose app is restarting: 503 twice, then the endpoint's
    listing with one trace, then (long-polls) nothing new.
    """

    answered = 0

    def do_GET(self) -> None:
        type(self).answered += 1
        if self.answered <= 2:
            code, body = 503, b"<html>Service Unavailable</html>"
        else:
            if self.answered > 3:
                time.sleep(0.2)
            trace = {"id": "x-1", "cursor": 1, "method": "GET", "path": "/after-restart"}
            traces = [trace] if self.answered == 3 else []
            page = {"schema": 1, "cursor": 1, "dropped": 0, "traces": traces}
            code, body = 200, json.dumps(page).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_tail_waits_through_a_proxys_503(cli: Callable[..., Command]) -> None:
    """A 502/503/504 (a proxy whose app is down) is waited out like a
    refused connection, not the end of tail.
    """
    handler = type("Handler", (GatewayServer,), {"answered": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        tail = cli("tail", f"http://127.0.0.1:{server.server_port}")
        tail.wait_for("/after-restart")
        assert tail.finish() == 0
    finally:
        server.shutdown()
        server.server_close()
    assert "cannot reach" in tail.stderr
    assert "HTTP 503" in tail.stderr
    assert "reconnected" in tail.stderr


def test_tail_waits_for_a_reader_slot_on_a_busy_endpoint(
    serve: Callable[..., Served], cli: Callable[..., Command]
) -> None:
    """An endpoint already serving max_readers long-polls answers 503 busy:
    tail says so (not "cannot reach") and follows once a slot is free.
    """
    served = serve(max_readers=1)
    holder = threading.Thread(target=served.get, args=("/_trace?since=0&wait=20",), daemon=True)
    holder.start()
    served.wait_for_poll()
    tail = cli("tail", "-n", "0", served.url)
    tail.wait_for("is busy", stream="err")
    assert tail.proc.poll() is None
    served.get("/api/v1/items/tea")  # answers the held long-poll: its slot is free
    holder.join(TIMEOUT)
    served.get("/missing")
    tail.wait_for("/missing")
    assert tail.finish() == 0
    assert "HTTP 503: busy" in tail.stderr
    assert "cannot reach" not in tail.stderr


def test_tail_says_busy_once_while_the_endpoint_stays_busy(
    serve: Callable[..., Served], cli: Callable[..., Command]
) -> None:
    """While every reader slot stays taken, tail says "busy" once and waits:
    its retries must not alternate "busy" and "reconnected" every second.
    """
    served = serve(max_readers=1)
    holder = threading.Thread(target=served.get, args=("/_trace?since=0&wait=20",), daemon=True)
    holder.start()
    served.wait_for_poll()
    tail = cli("tail", "-n", "0", served.url)
    tail.wait_for("is busy", stream="err")
    time.sleep(3.5)  # three retries
    assert tail.finish() == 0
    assert tail.stderr.count("is busy") == 1, tail.stderr
    assert "reconnected" not in tail.stderr, tail.stderr
    served.get("/free")  # answers the held long-poll
    holder.join(TIMEOUT)


class CutErrorServer(http.server.BaseHTTPRequestHandler):
    """Answers 500 promising a 1,000-byte page, then resets the connection
    instead (while the client waits for the page).
    """

    def do_GET(self) -> None:
        self.send_response(500)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.flush()
        time.sleep(0.2)
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_an_error_page_cut_off_is_a_message_not_a_traceback() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CutErrorServer)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        result = run_command("show", "abc-1", f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 1, result.stderr
    assert "HTTP 500" in result.stderr
    assert "Traceback" not in result.stderr


class AuthGatewayServer(http.server.BaseHTTPRequestHandler):
    """An auth gateway in front of the app: 401 for everyone."""

    def do_GET(self) -> None:
        body = b"<html>Log in first</html>"
        self.send_response(401)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_a_proxys_401_is_not_blamed_on_wsgitrace() -> None:
    """The endpoint refuses with a 404; a 401 comes from something in front
    of the app, and the message says so.
    """
    for result in run_against(AuthGatewayServer, ["tail"], ["show", "x-1"]):
        assert result.returncode != 0
        assert "HTTP 401: refused by something in front of the app" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--status", "abc"], "Invalid value for --status"),
        (["--method", "G@T"], "Invalid value for --method"),
        (["--path", "api"], "Invalid value for --path"),
        (["--slow", "nan"], "Invalid value for --slow"),
    ],
)
def test_bad_filters_are_usage_errors(args: list[str], message: str) -> None:
    """A filter the endpoint would refuse is a usage error naming the option,
    even while the server is down (tail used to wait for it, then exit with
    its 400, which named 'min_ms' for --slow).
    """
    result = run_command("tail", *args, f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "min_ms" not in result.stderr


def test_tail_explains_a_404(serve: Callable[..., Served]) -> None:
    """Endpoint off (or refused): tail exits 1 with an explanation."""
    served = serve(endpoint=None)  # the example app is not in debug mode
    result = run_command("tail", served.url)
    assert result.returncode == 1
    assert "answered 404" in result.stderr
    assert "endpoint is off" in result.stderr
    assert result.stdout == ""


def test_tail_404_mentions_another_prefix(serve: Callable[..., Served]) -> None:
    """An endpoint served under another prefix (WSGITRACE_PREFIX) 404s at
    the default one the base URL finds: the explanation names that cause
    too, and how to give the endpoint's URL.
    """
    served = serve(prefix="/_dbg")
    result = run_command("tail", served.url)
    assert result.returncode == 1
    assert "answered 404" in result.stderr
    assert "served under another prefix" in result.stderr
    assert "WSGITRACE_PREFIX" in result.stderr


def test_token_from_environment_or_file(
    serve: Callable[..., Served], cli: Callable[..., Command], tmp_path: Path
) -> None:
    """A remote client needs the token, from WSGITRACE_TOKEN or --token-file;
    it is never printed.
    """
    token = "tok-" + "9" * 20
    served = serve(remote="203.0.113.50", token=token)
    served.get("/")
    refused = run_command("tail", "-n", "1", served.url)
    assert refused.returncode == 1
    assert "answered 404" in refused.stderr

    from_env = cli("tail", "--json", "-n", "1", served.url, env=command_env(WSGITRACE_TOKEN=token))
    from_env.wait_for('"path": "/"')
    assert from_env.finish() == 0

    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    trace_id = served.last_id()
    shown = run_command("show", trace_id, served.url, "--token-file", str(token_file))
    assert shown.returncode == 0, shown.stderr
    assert "GET / → 200 OK" in shown.stdout
    for output in (refused.stdout, refused.stderr, from_env.stdout, from_env.stderr, shown.stdout):
        assert token not in output

    # An option typed on the command line beats one set in the environment.
    stale = tmp_path / "stale-token"
    stale.write_text("an-old-token\n")
    typed = run_command(
        "show",
        trace_id,
        served.url,
        "--token",
        token,
        env=command_env(WSGITRACE_TOKEN_FILE=str(stale)),
    )
    assert typed.returncode == 0, typed.stderr
    assert "GET / → 200 OK" in typed.stdout


# -- show -----------------------------------------------------------------------


def test_show_prints_the_full_timeline(serve: Callable[..., Served]) -> None:
    """show ID prints the ordered timeline and the trace's state."""
    served = serve()
    served.get("/admin/", headers={"X-Request-Id": "req-42"})
    result = run_command("show", served.last_id("/admin/"), served.url)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("GET /admin/ → 403 FORBIDDEN\n")
    order = [
        "signal:appcontext-pushed",
        "url_match",
        "signal:request-started",
        "before_request:load_user",
        "before_request:admin.require_admin",
        "after_request:add_server_timing",
        "teardown_appcontext:close_db",
        "signal:appcontext-popped",
    ]
    positions = [out.index(name) for name in order]
    assert positions == sorted(positions)
    assert "view:admin.dashboard" not in out
    assert "short-circuit" in out
    assert "req-42" in out
    assert "response headers" in out
    assert "\x1b" not in out


def test_show_on_a_narrow_terminal_keeps_room_for_event_names(
    serve: Callable[..., Served],
) -> None:
    """On 40 columns show narrows the waterfall bars, as tail -v does, so
    event names are not wrapped a few characters a line.
    """
    served = serve()
    served.get("/")
    result = run_command("show", served.last_id(), served.url, env=command_env(COLUMNS="40"))
    assert result.returncode == 0
    assert any(line.endswith(" request") for line in result.stdout.splitlines())


def test_show_an_error_with_its_traceback(serve: Callable[..., Served]) -> None:
    """An error's type, message and traceback are shown."""
    served = serve()
    served.get("/boom")
    result = run_command("show", served.last_id("/boom"), served.url + "/_trace")
    assert result.returncode == 0, result.stderr
    assert "error RuntimeError (in view): the demo's error route failed on purpose" in result.stdout
    assert "Traceback (most recent call last):" in result.stdout


def test_show_json_and_missing_ids(serve: Callable[..., Served]) -> None:
    """--json prints the trace's JSON; an unknown id exits 1 with a message."""
    served = serve()
    served.get("/")
    trace_id = served.last_id()
    data = json.loads(run_command("show", trace_id, served.url, "--json").stdout)
    assert data["id"] == trace_id
    assert data["events"]
    missing = run_command("show", "abc-1", served.url)
    assert missing.returncode == 1
    assert "no trace 'abc-1'" in missing.stderr
    unreachable = run_command("show", "abc-1", f"http://127.0.0.1:{free_port()}")
    assert unreachable.returncode == 1
    assert "cannot reach" in unreachable.stderr


def test_secrets_never_appear_in_any_output(
    serve: Callable[..., Served], cli: Callable[..., Command]
) -> None:
    """Redacted headers and query values are in no output of show or tail."""
    served = serve()
    served.get(
        "/?password=query-pw-5",
        headers={
            "Authorization": "Bearer hunter2-auth",
            "Cookie": "session=cookie-secret-9",
            "X-Api-Key": "api-key-77",
        },
    )
    trace_id = served.last_id()
    outputs = [
        run_command("show", trace_id, served.url).stdout,
        run_command("show", trace_id, served.url, "--json").stdout,
    ]
    for args in (["--json", "-v"], ["-v"], []):
        tail = cli("tail", "-n", "1", *args, served.url)
        served.wait_for_poll(served.front.polls)
        tail.finish()
        outputs += [tail.stdout, tail.stderr]
    assert "[redacted]" in outputs[0]
    assert "Authorization" in outputs[1]
    for output in outputs:
        for secret in SECRETS:
            assert secret not in output


def test_hostile_path_is_shown_literally(serve: Callable[..., Served]) -> None:
    """Markup and terminal escapes in a path are shown as text by show and tail."""
    served = serve()
    served.get(HOSTILE_QUOTED)
    trace_id = served.last_id()
    show = run_command("show", trace_id, served.url, env=command_env(COLUMNS="200"))
    assert show.returncode == 0, show.stderr
    assert f"GET {HOSTILE_SHOWN} → 404 NOT FOUND" in show.stdout
    tail = run_command_until_polled(served, "tail", "-n", "1", served.url)
    assert HOSTILE_SHOWN in tail
    for output in (show.stdout, tail):
        assert not RAW_CONTROL.search(output)


def run_command_until_polled(served: Served, *args: str) -> str:
    command = Command(list(args), env=command_env(COLUMNS="200"))
    try:
        served.wait_for_poll(served.front.polls)
        assert command.finish() == 0
    finally:
        command.close()
    return command.stdout


def test_force_color_colours_a_pipe_without_the_status_line(serve: Callable[..., Served]) -> None:
    """FORCE_COLOR colours tail's piped output, but the status line and the
    closing message (for a person at a terminal) stay out of it.
    """
    served = serve()
    served.get("/boom")
    command = Command(["tail", "-n", "1", served.url], env=command_env(FORCE_COLOR="1"))
    try:
        served.wait_for_poll(served.front.polls)
        assert command.finish() == 0
    finally:
        command.close()
    assert re.search(r"\x1b\[[0-9;]*m", command.stdout)  # coloured, as asked
    assert "/boom" in command.stdout
    assert "following" not in command.stdout
    assert "shown" not in command.stdout
    assert "\x1b[?25l" not in command.stdout  # no cursor hiding either
    assert "1 trace shown" in command.stderr


# -- on a terminal --------------------------------------------------------------


def run_on_pty(
    args: list[str], *, until: str | None = None, columns: int = 120, timeout: float = TIMEOUT
) -> tuple[str, int]:
    """Run the command on a pseudo-terminal; with ``until``, press Ctrl-C once
    that text was printed. Returns the output and exit status.
    """
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = command_env(TERM="xterm-256color")
    proc = subprocess.Popen(
        [sys.executable, "-m", "wsgitrace", *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        close_fds=True,
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    interrupted = False
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the other side closed
                    break
                if not data:
                    break
                chunks.append(data)
            if until and not interrupted and until.encode() in b"".join(chunks):
                proc.send_signal(signal.SIGINT)
                interrupted = True
            if not ready and proc.poll() is not None:
                break
        code = proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
        os.close(master)
    return b"".join(chunks).decode("utf-8", "replace"), code


def assert_no_injected_sequences(output: str) -> None:
    assert HOSTILE_SHOWN.replace("\\x0dend", "") in output
    assert "[bold red]" in output
    for raw in ("\x1b[2J", "\x1b]8;;", "\x07", "\x9b"):
        assert raw not in output


def test_show_on_a_terminal(serve: Callable[..., Served]) -> None:
    """On a terminal show is coloured, but request text never becomes a
    control sequence and no bare carriage return reaches it.
    """
    served = serve()
    served.get(HOSTILE_QUOTED)
    output, code = run_on_pty(["show", served.last_id(), served.url])
    assert code == 0
    assert re.search(r"\x1b\[[0-9;]*m", output)  # coloured: it saw a terminal
    assert_no_injected_sequences(output)
    assert not re.search("\r(?!\n)", output)
    without_colours = re.sub(r"\x1b\[[0-9;]*m", "", output)
    assert "\x1b" not in without_colours


def test_tail_on_a_terminal(serve: Callable[..., Served]) -> None:
    """On a terminal tail is coloured with a status line; request text stays
    text; Ctrl-C exits 0.
    """
    served = serve()
    served.get(HOSTILE_QUOTED)
    served.get("/boom")
    output, code = run_on_pty(["tail", "-n", "2", served.url], until="Ctrl-C to stop", columns=200)
    assert code == 0
    assert "following" in output
    assert re.search(r"\x1b\[[0-9;]*m", output)
    assert_no_injected_sequences(output)


def test_tail_on_a_narrow_terminal_keeps_the_status(serve: Callable[..., Served]) -> None:
    """On a 40-column terminal tail leaves columns out rather than squeeze
    the status code and the duration to nothing.
    """
    served = serve()
    served.get("/boom")
    output, code = run_on_pty(["tail", "-n", "1", served.url], until="Ctrl-C to stop", columns=40)
    assert code == 0
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output)
    header = next(line for line in plain.splitlines() if "METHOD" in line)
    row = next(line for line in plain.splitlines() if "/boom" in line)
    assert header.split() == ["METHOD", "PATH", "ST", "DUR"]
    assert "500" in row.split()
    assert re.search(r"\d(ms|µs|s)$", row.rstrip())


# -- run ------------------------------------------------------------------------


def start_run(
    cli: Callable[..., Command], *args: str, cwd: Path, **kwargs: Any
) -> tuple[Command, str]:
    command = cli("run", *args, "--port", "0", cwd=str(cwd), **kwargs)
    banner = command.wait_for("watch it with", stream="err")
    found = re.search(r"traced on (http://127\.0\.0\.1:\d+)", banner)
    assert found is not None, banner
    return command, found.group(1)


def fetch(url: str, *, timeout: float = TIMEOUT) -> tuple[int, bytes]:
    host, _, rest = url.removeprefix("http://").partition("/")
    conn = http.client.HTTPConnection(host, timeout=timeout)
    try:
        conn.request("GET", "/" + rest)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def write_echo_app(directory: Path, module: str, word: str) -> str:
    """Write ``module.py``, a plain WSGI app answering ``<word> <path>``;
    return its ``run`` spec.
    """
    (directory / f"{module}.py").write_text(
        textwrap.dedent(
            f"""
            def app(environ, start_response):
                start_response("200 OK", [("Content-Type", "text/plain")])
                return [b"{word} " + environ["PATH_INFO"].encode("latin-1")]
            """
        )
    )
    return f"{module}:app"


def test_run_serves_a_plain_wsgi_app_traced(cli: Callable[..., Command], tmp_path: Path) -> None:
    """run MODULE:APP serves the unmodified app threaded, with the endpoint on."""
    command, base = start_run(cli, write_echo_app(tmp_path, "plainapp", "plain"), cwd=tmp_path)
    assert fetch(base + "/hello") == (200, b"plain /hello")
    # A long-poll holds a thread, never the app: a poll for a trace that
    # never comes stays open while requests are served around it (a
    # single-threaded server would serve them only after the poll ends).
    poller = threading.Thread(target=fetch, args=(base + "/_trace?since=1&wait=2&path=/never",))
    poller.start()
    for _ in range(10):
        assert fetch(base + "/again")[0] == 200
    assert poller.is_alive()
    poller.join(TIMEOUT)
    status, body = fetch(base + "/_trace")
    assert status == 200
    assert [t["path"] for t in json.loads(body)["traces"]] == ["/again"] * 10 + ["/hello"]
    assert command.finish() == 0
    assert "stopped" in command.stderr


def test_run_flags_set_tracing_options_over_the_environment(
    cli: Callable[..., Command], tmp_path: Path
) -> None:
    """Each option has a run flag; a flag beats the WSGITRACE_* variable."""
    env = command_env(WSGITRACE_MAX_TRACES="50", WSGITRACE_PREFIX="/_env")
    command, base = start_run(
        cli,
        write_echo_app(tmp_path, "flagsapp", "flags"),
        "--max-traces",
        "2",
        "--exclude",
        "/health",
        "--no-capture-headers",
        "--prefix",
        "/_t",
        cwd=tmp_path,
        env=env,
    )
    for path in ("/a", "/b", "/health", "/c"):
        assert fetch(base + path)[0] == 200
    status, body = fetch(base + "/_t")
    assert status == 200
    listing = json.loads(body)
    assert [t["path"] for t in listing["traces"]] == ["/c", "/b"]  # /health never traced
    assert listing["dropped"] == 1  # --max-traces 2 beat WSGITRACE_MAX_TRACES=50
    status, body = fetch(base + "/_t/" + listing["traces"][0]["id"])
    assert json.loads(body)["request_headers"] == []
    assert command.finish() == 0
    assert f"trace endpoint: {base}/_t " in command.stderr


def test_run_says_where_else_traces_go(cli: Callable[..., Command], tmp_path: Path) -> None:
    """A store (or OTLP) set in the environment or by a flag takes the served
    traffic too: the banner says so."""
    store = tmp_path / "traces.db"
    command, base = start_run(
        cli, write_echo_app(tmp_path, "sinkapp", "sink"), "--store", str(store), cwd=tmp_path
    )
    assert fetch(base + "/x")[0] == 200
    assert command.finish() == 0
    assert f"traces also go to the store {store}" in command.stderr
    command, base = start_run(cli, write_echo_app(tmp_path, "nosinkapp", "none"), cwd=tmp_path)
    assert command.finish() == 0
    assert "traces also go to" not in command.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-traces", "0"], "Invalid value for '--max-traces': expected a positive integer"),
        (["--sample", "2"], "Invalid value for '--sample': expected a rate between 0 and 1"),
        (["--exclude", "health"], "expected path prefixes starting with '/', got 'health'"),
        (["--token", "s3cret"], "No such option '--token'"),
    ],
)
def test_run_refuses_bad_flags_before_loading_the_app(
    tmp_path: Path, args: list[str], message: str
) -> None:
    """A bad value is a usage error naming the flag; the token has no flag
    (argv is visible to other users)."""
    result = run_command("run", "no_such_module:app", *args, cwd=str(tmp_path))
    assert result.returncode == 2
    assert message in result.stderr
    assert "s3cret" not in result.stderr


def test_run_flags_resolve_as_their_environment_variables_do() -> None:
    """Each flag's value resolves to what the same text in its WSGITRACE_*
    variable gives: a network for --allow, and "no store" for --store ''
    (which must still beat WSGITRACE_STORE, as a keyword does).
    """
    args = ["app:app", "--allow", "10.0.0.0/8,::1", "--store", "", "--exclude", ""]
    with run.make_context("run", args) as ctx:
        options = given_options(ctx.params)
    environ = {"WSGITRACE_STORE": "traces.db", "WSGITRACE_EXCLUDE": "/health"}
    resolved = resolve_options(options, None, environ)
    assert resolved == resolve_options(
        {},
        None,
        {"WSGITRACE_ALLOW": "10.0.0.0/8,::1", "WSGITRACE_STORE": "", "WSGITRACE_EXCLUDE": ""},
    )
    assert [str(net) for net in resolved.allow] == ["10.0.0.0/8", "::1/128"]
    assert resolved.store is None


def test_run_flags_cannot_apply_to_an_app_that_traces_itself(tmp_path: Path) -> None:
    """An app whose own code installs wsgitrace keeps its set-up: flags for
    it are an error that says so, not silently ignored."""
    (tmp_path / "selftraced.py").write_text(
        textwrap.dedent(
            """
            from flask import Flask
            from wsgitrace.flask import FlaskTrace

            app = Flask(__name__)
            FlaskTrace(app)
            """
        )
    )
    result = run_command("run", "selftraced:app", "--max-traces", "3", "--otlp", cwd=str(tmp_path))
    assert result.returncode == 1
    assert "selftraced:app already installs wsgitrace (FlaskTrace is in app.extensions)" in (
        result.stderr
    )
    assert "--max-traces, --otlp cannot apply" in result.stderr


def test_run_logs_the_apps_requests_but_not_the_endpoints(
    cli: Callable[..., Command], tmp_path: Path
) -> None:
    """The request log leaves out the endpoint's own requests (tail's
    polls), and only those: a path of the app's that merely starts with the
    prefix is the app's, and is logged like any other.
    """
    command, base = start_run(cli, write_echo_app(tmp_path, "prefixapp", "app"), cwd=tmp_path)
    assert fetch(base + "/_traces") == (200, b"app /_traces")
    assert fetch(base + "/_trace")[0] == 200
    assert command.finish() == 0
    assert '"GET /_traces HTTP/1.1" 200' in command.stderr
    assert '"GET /_trace HTTP/1.1"' not in command.stderr


def test_run_logs_requests_without_colours_to_a_pipe(
    cli: Callable[..., Command], tmp_path: Path
) -> None:
    """werkzeug colours a logged request line by its status; run's stderr
    going to a pipe or a file gets the line without escape sequences.
    """
    command, base = start_run(cli, "wsgitrace.demo_app:create_app", cwd=tmp_path)
    assert fetch(base + "/missing")[0] == 404
    assert fetch(base + "/boom")[0] == 500
    assert command.finish() == 0
    assert '"GET /missing HTTP/1.1" 404' in command.stderr
    assert '"GET /boom HTTP/1.1" 500' in command.stderr
    assert "\x1b" not in command.stderr


def test_run_calls_an_app_factory(cli: Callable[..., Command], tmp_path: Path) -> None:
    """Without an attribute, run finds create_app, calls it, and traces the Flask app."""
    (tmp_path / "factoryapp.py").write_text(
        textwrap.dedent(
            """
            from flask import Flask, g

            def create_app():
                app = Flask(__name__)

                @app.before_request
                def who():
                    g.who = "me"

                @app.route("/")
                def index():
                    return "factory"

                return app
            """
        )
    )
    command, base = start_run(cli, "factoryapp", cwd=tmp_path)
    assert fetch(base + "/") == (200, b"factory")
    _, body = fetch(base + "/_trace")
    (summary,) = json.loads(body)["traces"]
    _, full = fetch(base + f"/_trace/{summary['id']}")
    names = [e["name"] for e in json.loads(full)["events"]]
    assert "before_request:who" in names
    assert "view:index" in names
    assert command.finish() == 0
    assert "factoryapp:create_app()" in command.stderr


def test_run_calls_what_an_explicit_call_names(cli: Callable[..., Command], tmp_path: Path) -> None:
    """``module:factory()`` calls the factory even when it is not a plain
    function (a class, a partial), and names one that cannot be called
    without arguments instead of serving it as the app (a 500 per request).
    """
    (tmp_path / "partialapp.py").write_text(
        textwrap.dedent(
            """
            import functools

            def _make(greeting):
                def app(environ, start_response):
                    start_response("200 OK", [("Content-Type", "text/plain")])
                    return [greeting.encode()]
                return app

            create_app = functools.partial(_make, "from the partial")

            def needs_config(config):
                return _make(config)
            """
        )
    )
    command, base = start_run(cli, "partialapp:create_app()", cwd=tmp_path)
    assert fetch(base + "/") == (200, b"from the partial")
    assert command.finish() == 0
    assert "partialapp:create_app()" in command.stderr
    result = run_command("run", "partialapp:needs_config()", cwd=str(tmp_path))
    assert result.returncode == 2
    assert "partialapp:needs_config is not an app factory callable without" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_calls_a_factory_with_literal_arguments(
    cli: Callable[..., Command], tmp_path: Path
) -> None:
    """``module:factory("prod", debug=False)`` calls the factory with those
    arguments, as ``flask --app`` does; arguments that are not Python
    literals are a usage error naming them, not a traceback.
    """
    (tmp_path / "argsapp.py").write_text(
        textwrap.dedent(
            """
            def create_app(config, suffix="!"):
                def app(environ, start_response):
                    start_response("200 OK", [("Content-Type", "text/plain")])
                    return [(config + suffix).encode()]
                return app
            """
        )
    )
    command, base = start_run(cli, "argsapp:create_app('prod', suffix='?')", cwd=tmp_path)
    assert fetch(base + "/") == (200, b"prod?")
    assert command.finish() == 0
    assert "argsapp:create_app('prod', suffix='?')" in command.stderr
    result = run_command("run", "argsapp:create_app(config)", "--port", "0", cwd=str(tmp_path))
    assert result.returncode == 2
    assert "literal" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_refuses_a_function_that_is_neither_app_nor_factory(tmp_path: Path) -> None:
    """A factory that needs an argument is no app factory run can call, and
    no WSGI app either: a usage error naming it, not a server answering 500.
    """
    (tmp_path / "configapp.py").write_text(
        textwrap.dedent(
            """
            def create_app(config):
                def app(environ, start_response):
                    start_response("200 OK", [("Content-Type", "text/plain")])
                    return [config.encode()]
                return app
            """
        )
    )
    result = run_command("run", "configapp:create_app", "--port", "0", cwd=str(tmp_path))
    assert result.returncode == 2
    assert "configapp:create_app is not a WSGI app, a Flask app or an app factory" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("spec", "target", "expected"),
    [
        ("examples/plain_wsgi.py:app", "/", {"path": "/", "status": 200, "hooks": 0}),
        ("examples/plain_wsgi.py:application", "/", {"path": "/", "status": 200, "hooks": 0}),
        ("examples/flask_app.py", "/api/v1/items/tea", {"endpoint": "api.v1.item", "status": 200}),
    ],
)
def test_run_the_examples_by_path(
    cli: Callable[..., Command], spec: str, target: str, expected: dict[str, Any]
) -> None:
    """run accepts a file path; plain apps get traced, apps that already are
    (TraceMiddleware, FlaskTrace outside debug mode) keep their tracing and
    get the endpoint.
    """
    command, base = start_run(cli, spec, cwd=ROOT)
    assert fetch(base + target)[0] == 200
    _, body = fetch(base + "/_trace")
    (summary,) = json.loads(body)["traces"]
    assert {key: summary[key] for key in expected} == expected
    assert command.finish() == 0


def test_run_a_file_inside_a_package(cli: Callable[..., Command], tmp_path: Path) -> None:
    """A path to a module of a package imports it as part of the package
    (as ``flask --app`` does), so its relative imports work.
    """
    package = tmp_path / "myproj"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "views.py").write_text(
        textwrap.dedent(
            """
            def app(environ, start_response):
                start_response("200 OK", [("Content-Type", "text/plain")])
                return [b"from the package"]
            """
        )
    )
    (package / "wsgi.py").write_text("from .views import app\n")
    command, base = start_run(cli, "myproj/wsgi.py:app", cwd=tmp_path)
    assert fetch(base + "/") == (200, b"from the package")
    assert command.finish() == 0
    assert "serving myproj.wsgi:app" in command.stderr


def test_run_a_flask_app_already_wrapped_in_the_middleware(
    cli: Callable[..., Command], tmp_path: Path
) -> None:
    """run serves a Flask app whose wsgi_app is a TraceMiddleware, with its
    hooks recorded into that middleware's traces.
    """
    (tmp_path / "wrappedapp.py").write_text(
        textwrap.dedent(
            """
            from flask import Flask
            from wsgitrace import TraceMiddleware

            app = Flask(__name__)

            @app.before_request
            def check():
                pass

            @app.route("/")
            def index():
                return "wrapped"

            app.wsgi_app = TraceMiddleware(app.wsgi_app)
            """
        )
    )
    command, base = start_run(cli, "wrappedapp:app", cwd=tmp_path)
    assert fetch(base + "/") == (200, b"wrapped")
    status, body = fetch(base + "/_trace")
    assert status == 200
    [trace] = json.loads(body)["traces"]
    assert trace["hooks"] == 2
    assert command.finish() == 0


def test_run_can_still_be_stopped_while_the_app_keeps_it_alive(
    cli: Callable[..., Command], tmp_path: Path
) -> None:
    """After the first Ctrl-C has stopped the server, a process the app
    keeps alive (a non-daemon thread) still ends on SIGTERM.
    """
    (tmp_path / "slowexit.py").write_text(
        textwrap.dedent(
            """
            import threading, time

            threading.Thread(target=time.sleep, args=(60,), daemon=False).start()

            def app(environ, start_response):
                start_response("200 OK", [("Content-Type", "text/plain")])
                return [b"ok"]
            """
        )
    )
    command, base = start_run(cli, "slowexit:app", cwd=tmp_path)
    assert fetch(base + "/")[0] == 200
    command.proc.send_signal(signal.SIGINT)
    command.wait_for("stopped", stream="err")
    command.proc.send_signal(signal.SIGTERM)
    assert command.proc.wait(TIMEOUT) == -signal.SIGTERM


def test_run_says_when_it_cannot_listen(tmp_path: Path) -> None:
    """A port in use: wsgitrace's one-line message naming the address, exit 1."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_command("run", "wsgitrace.demo_app:create_app", "--port", str(port))
    assert result.returncode == 1
    assert f"wsgitrace: cannot listen on 127.0.0.1:{port}: Address already in use" in (
        result.stderr
    )
    assert "another server has that port: stop it, or choose another with --port" in (result.stderr)
    assert len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize(
    ("host", "base"),
    [
        ("0.0.0.0", "http://127.0.0.1:5000"),
        ("", "http://127.0.0.1:5000"),
        ("::", "http://[::1]:5000"),
        ("::1", "http://[::1]:5000"),
        ("localhost", "http://localhost:5000"),
    ],
)
def test_run_shows_a_url_the_endpoint_answers(host: str, base: str) -> None:
    """The banner's URLs (and the tail command it suggests) name an address
    to connect to, not a wildcard one: the endpoint refuses a Host of
    ``[::]`` (DNS rebinding), so ``--host ::`` shows ``[::1]``.
    """
    from werkzeug.test import Client

    from wsgitrace._serve import _base_url

    assert _base_url(host, 5000) == base
    app = TraceMiddleware(lambda environ, start_response: [], endpoint=True)
    response = Client(app).get(
        "/_trace", base_url=base, environ_overrides={"REMOTE_ADDR": "127.0.0.1"}
    )
    assert response.status_code == 200


def test_run_answers_a_malformed_request_line(cli: Callable[..., Command], tmp_path: Path) -> None:
    """A request line the server cannot parse gets werkzeug's 400 and one
    log line, not a traceback from the request logger.
    """
    command, base = start_run(cli, "wsgitrace.demo_app:create_app", cwd=tmp_path)
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
        sock.sendall(b"GARBAGE\r\n\r\n")
        reply = sock.recv(1024)
    assert b"Error code: 400" in reply  # an HTTP/0.9-style answer: no status line
    assert fetch(base + "/")[0] == 200
    assert command.finish() == 0
    assert "Traceback" not in command.stderr


@pytest.mark.parametrize(
    ("command", "variable", "value", "message"),
    [
        ("run", "WSGITRACE_MAX_TRACES", "lots", "WSGITRACE_MAX_TRACES"),
        ("demo", "WSGITRACE_MAX_BYTES", "1k", "WSGITRACE_MAX_BYTES"),
    ],
)
def test_a_bad_setting_is_a_message_not_a_traceback(
    command: str, variable: str, value: str, message: str
) -> None:
    """A WSGITRACE_* value wsgitrace cannot use stops the command with one
    line naming it and its value, exit 1, and no traceback.
    """
    args = ["run", "wsgitrace.demo_app:create_app"] if command == "run" else ["demo", "--once"]
    result = run_command(*args, "--port", "0", env=command_env(**{variable: value}))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith("wsgitrace: ")
    assert message in line
    assert repr(value) in line


@pytest.mark.parametrize(
    ("source", "spec"),
    [
        (
            "from wsgitrace.demo_app import create_app\nfrom wsgitrace.flask import FlaskTrace\n"
            "app = create_app()\nFlaskTrace(app)\n",
            "selftraced:app",
        ),
        (
            "from wsgitrace.demo_app import create_app as make\n"
            "from wsgitrace.flask import FlaskTrace\n\n"
            "def create_app():\n    app = make()\n    FlaskTrace(app)\n    return app\n",
            "selftraced:create_app",
        ),
    ],
)
def test_a_bad_setting_for_an_app_that_traces_itself_is_a_message_too(
    tmp_path: Path, source: str, spec: str
) -> None:
    """A WSGITRACE_* value the app's own FlaskTrace(app) cannot use (at import
    or in its factory) is wsgitrace's one-line message, not the app's error.
    """
    (tmp_path / "selftraced.py").write_text(source)
    env = command_env(WSGITRACE_SAMPLE="often")
    result = run_command("run", spec, "--port", "0", cwd=str(tmp_path), env=env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith("wsgitrace: bad value for environment variable WSGITRACE_SAMPLE")


def test_tail_json_counts_a_line_printed_as_it_is_interrupted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A SIGTERM or Ctrl-C while ``tail --json`` writes its lines takes
    effect after they are counted: the closing "N traces shown" agrees with
    the lines a reader of stdout got.
    """
    import io

    from wsgitrace._interrupts import _interrupts, _sigterm_as_interrupt
    from wsgitrace._output import _JsonView

    class InterruptedOut(io.StringIO):
        def flush(self) -> None:
            super().flush()
            if self.getvalue().count("\n") == 2:
                _interrupts._handler(signal.SIGTERM, None)  # as the signal would

    out = InterruptedOut()
    monkeypatch.setattr(sys, "stdout", out)
    view = _JsonView()
    _sigterm_as_interrupt()
    try:
        with pytest.raises(KeyboardInterrupt):
            view.traces([{"path": "/a"}, {"path": "/b"}, {"path": "/c"}])
    finally:
        _interrupts.restore()
    assert view.shown == out.getvalue().count("\n")


def test_the_readme_names_the_reading_flags_of_the_configuration() -> None:
    """The flags the README's Configuration section names for ``tail`` and
    ``show`` exist on both and read the environment variable it pairs them with.
    """
    import click

    from wsgitrace.cli import main

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    pairs = re.findall(r"`(--[\w-]+) [A-Z]+` \(or `(WSGITRACE_\w+)`", section)
    assert sorted(pairs) == [
        ("--store", "WSGITRACE_STORE"),
        ("--token", "WSGITRACE_TOKEN"),
        ("--token-file", "WSGITRACE_TOKEN_FILE"),
    ]
    assert isinstance(main, click.Group)
    for name in ("tail", "show"):
        params = {opt: param for param in main.commands[name].params for opt in param.opts}
        for flag, variable in pairs:
            assert params[flag].envvar == variable, (name, flag)


@pytest.mark.parametrize(
    ("env", "who", "prefix"),
    [
        (
            {"WSGITRACE_PREFIX": "/_dbg", "WSGITRACE_TOKEN": "s3cret"},
            "(loopback clients, or with the token)",
            "/_dbg",
        ),
        (
            {"WSGITRACE_ALLOW": "192.0.2.0/24,10.0.0.0/8"},
            "(loopback clients, clients in 192.0.2.0/24, 10.0.0.0/8)",
            "",
        ),
    ],
)
def test_run_banner_says_who_may_read_and_how(
    cli: Callable[..., Command], tmp_path: Path, env: dict[str, str], who: str, prefix: str
) -> None:
    """The banner names who the endpoint answers (a token, allowed
    networks), and the tail command it suggests finds the endpoint, under
    another prefix too.
    """
    command = cli(
        "run",
        "wsgitrace.demo_app:create_app",
        "--port",
        "0",
        cwd=str(tmp_path),
        env=command_env(**env),
    )
    banner = command.wait_for("watch it with", stream="err")
    found = re.search(r"watch it with:\s+wsgitrace tail (\S+)", banner)
    assert found is not None, banner
    assert who in banner
    url = found.group(1)
    if prefix:
        assert url.endswith(prefix)
    status, body = fetch(url if prefix else url + "/_trace")
    assert status == 200
    assert "traces" in json.loads(body)
    assert command.finish() == 0


@pytest.mark.parametrize("command", ["run", "demo"])
def test_run_and_demo_say_when_tracing_is_off(
    cli: Callable[..., Command], tmp_path: Path, command: str
) -> None:
    """WSGITRACE_ENABLED=0 left in the shell turns tracing off: run and demo
    still serve, but say so instead of showing an empty tail as if no
    request had come.
    """
    args = ["run", "wsgitrace.demo_app:create_app"] if command == "run" else ["demo"]
    served = cli(*args, "--port", "0", cwd=str(tmp_path), env=command_env(WSGITRACE_ENABLED="0"))
    served.wait_for("tracing is off (WSGITRACE_ENABLED or enabled=False)", stream="err")
    assert served.finish() == 0


def test_run_reports_a_bad_module(tmp_path: Path) -> None:
    """An import that fails names the module."""
    result = run_command("run", "no_such_module_here:app", cwd=str(tmp_path))
    assert result.returncode == 2
    assert "cannot import 'no_such_module_here'" in result.stderr


def test_run_shows_where_a_module_fails_to_import_its_dependency(tmp_path: Path) -> None:
    """A module that exists but imports a missing one (whose name happens
    to begin its own) is not reported as the spec's module missing: the
    traceback shows the import that failed.
    """
    (tmp_path / "myapp_wsgi.py").write_text("import myapp\n\napp = myapp.app\n")
    result = run_command("run", "myapp_wsgi:app", "--port", "0", cwd=str(tmp_path))
    assert result.returncode == 1
    assert "cannot import 'myapp_wsgi'" not in result.stderr
    assert "ModuleNotFoundError: No module named 'myapp'" in result.stderr
    assert "import myapp" in result.stderr


@pytest.mark.parametrize(
    ("source", "spec", "doing", "last_line"),
    [
        (
            "import os\n\nos.environ['WSGITRACE_NO_SUCH_VARIABLE']\n",
            "appmod:app",
            "importing 'appmod'",
            "KeyError: 'WSGITRACE_NO_SUCH_VARIABLE'",
        ),
        (
            "def create_app():\n    raise RuntimeError('no DATABASE_URL')\n",
            "appmod:create_app",
            "calling the app factory appmod:create_app",
            "RuntimeError: no DATABASE_URL",
        ),
        ("def f(:\n    pass\n", "appmod:app", "importing 'appmod'", "SyntaxError: invalid syntax"),
    ],
)
def test_run_shows_an_error_of_the_apps_own_code_without_its_own_frames(
    tmp_path: Path, source: str, spec: str, doing: str, last_line: str
) -> None:
    """An error the app's module or factory raises is shown with the app's
    frames only: no frames of click, wsgitrace or importlib around them.
    """
    (tmp_path / "appmod.py").write_text(source)
    result = run_command("run", spec, "--port", "0", cwd=str(tmp_path))
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[0] == f"Error: {doing} raised an error in the app's own code:"
    assert lines[-1] == last_line
    assert str(tmp_path / "appmod.py") in result.stderr
    for elsewhere in ("click", "wsgitrace", "importlib"):
        assert f"{os.sep}{elsewhere}{os.sep}" not in result.stderr, elsewhere


@pytest.mark.parametrize("spec", [":app", " :create_app"])
def test_run_refuses_a_spec_without_a_module(tmp_path: Path, spec: str) -> None:
    """A spec with nothing before its ':' is a usage error, not a traceback."""
    result = run_command("run", spec, "--port", "0", cwd=str(tmp_path))
    assert result.returncode == 2
    assert "names no module: give one before the ':'" in result.stderr
    assert "Traceback" not in result.stderr


# -- demo -----------------------------------------------------------------------


def test_demo_shows_traffic_and_exits_0_on_ctrl_c(cli: Callable[..., Command]) -> None:
    """demo serves the example, sends it requests, shows them, and Ctrl-C exits 0."""
    demo = cli("demo", "--interval", "0.02")
    output = demo.wait_for("/boom")
    assert demo.finish() == 0
    for path in ("/api/v1/items/tea", "/slow?ms=150", "/admin/", "/missing"):
        assert path in output
    assert "wsgitrace demo" in demo.stderr
    # The closing count speaks of what was read, not of a tail demo never ran.
    assert re.search(r"\d+ traces shown, \d+ missed \(evicted before they were read\)", demo.stderr)


def test_demo_follows_the_endpoint_under_another_prefix(cli: Callable[..., Command]) -> None:
    """With WSGITRACE_PREFIX set, demo reads its traces under that prefix
    (not a 404 from /_trace), and the tail command it suggests has it too.
    """
    demo = cli(
        "demo",
        *("--requests", str(len(DEMO_ROUND)), "--interval", "0", "--json"),
        env=command_env(WSGITRACE_PREFIX="/_dbg"),
    )
    demo.wait_for('"/boom"')
    found = re.search(r"wsgitrace tail -v (\S+)", demo.wait_for("Ctrl-C", stream="err"))
    assert demo.finish() == 0
    assert found is not None, demo.stderr
    assert found.group(1).endswith("/_dbg")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("flags", [("--json",), ()], ids=["json", "human"])
def test_demo_output_to_a_full_disk_is_one_message(flags: tuple[str, ...]) -> None:
    """Output that cannot be written ends the demo with one message, as it
    ends tail and show, not a traceback.
    """
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, "-m", "wsgitrace", "demo", "--once", "--interval", "0", *flags],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=TIMEOUT,
            env=command_env(),
            check=False,
        )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "cannot write the output: No space left on device" in result.stderr


def test_demo_once_points_nowhere_it_will_not_be() -> None:
    """demo --once stops by itself, server and all: its banner suggests no
    tail or show against it, and no Ctrl-C.
    """
    result = run_command("demo", "--once", "--interval", "0", "--json")
    assert result.returncode == 0, result.stderr
    assert "sending it one round of requests; it stops once they are shown" in result.stderr
    assert "wsgitrace tail" not in result.stderr
    assert "Ctrl-C" not in result.stderr


def test_demo_says_its_traffic_goes_to_a_store_set_in_the_shell(tmp_path: Path) -> None:
    """A WSGITRACE_STORE exported in the shell takes the demo's traffic too:
    its banner says so rather than filling the store silently."""
    store = tmp_path / "shell.db"
    result = run_command(
        "demo", "--once", "--interval", "0", "--json", env=command_env(WSGITRACE_STORE=str(store))
    )
    assert result.returncode == 0, result.stderr
    assert f"traces also go to the store {store}" in result.stderr


def test_demo_stops_cleanly_on_two_quick_interrupts(cli: Callable[..., Command]) -> None:
    """A second Ctrl-C (or timeout's signal to the whole group) while demo
    stops does not cut its clean-up short: exit 0, no "Aborted!".
    """
    demo = cli("demo", "--interval", "0.02")
    demo.wait_for("/boom")
    demo.proc.send_signal(signal.SIGINT)
    demo.proc.send_signal(signal.SIGINT)
    assert demo.finish(interrupt=False) == 0
    assert "Aborted" not in demo.stderr


def test_demo_stops_cleanly_on_ctrl_c_right_after_its_banner(cli: Callable[..., Command]) -> None:
    """Ctrl-C as soon as the banner shows (before any traffic) stops demo
    with exit 0, not click's "Aborted!".
    """
    demo = cli("demo", "--interval", "0.5")
    demo.wait_for("Ctrl-C to stop", stream="err")
    assert demo.finish() == 0
    assert "Aborted" not in demo.stderr


def test_tail_reads_the_store_named_by_the_environment(tmp_path: Path) -> None:
    """WSGITRACE_STORE, which the app's workers write to, is where tail and
    show read when it is set (as --store says).
    """
    from wsgitrace.store import TraceStore
    from wsgitrace.trace import Trace

    path = str(tmp_path / "traces.db")
    trace = Trace("GET", "/from-the-store")
    trace.finished = True
    TraceStore(path).write([trace])
    result = run_command("show", trace.id, env=command_env(WSGITRACE_STORE=path))
    assert result.returncode == 0, result.stderr
    assert "/from-the-store" in result.stdout
    # A URL given on the command line wins over the variable (set for the
    # app's workers in the same shell, say).
    url = f"http://127.0.0.1:{free_port()}"
    result = run_command("show", trace.id, url, env=command_env(WSGITRACE_STORE=path))
    assert result.returncode == 1
    assert f"cannot reach {url}/_trace" in result.stderr


def test_tail_and_show_say_who_makes_a_missing_store(
    cli: Callable[..., Command], tmp_path: Path
) -> None:
    """A store file that does not exist yet is explained (a traced app with
    WSGITRACE_STORE makes it at its first trace), not blamed on an app that
    is not running; tail waits for it and shows its traces once it exists.
    """
    from wsgitrace.store import TraceStore
    from wsgitrace.trace import Trace

    path = str(tmp_path / "traces.db")
    expected = f"there is no trace store at {path!r} yet: an app traced with WSGITRACE_STORE"
    result = run_command("show", "abc-1", "--store", path)
    assert result.returncode == 1
    assert expected in result.stderr
    assert "is the app running" not in result.stderr
    tail = cli("tail", "--json", "--store", path)
    assert expected in tail.wait_for("no trace store", stream="err")
    trace = Trace("GET", "/stored-later")
    trace.finished = True
    TraceStore(path).write([trace])
    tail.wait_for("/stored-later")
    assert tail.finish() == 0
    assert "is the app running" not in tail.stderr


def test_demo_once_with_the_console_script() -> None:
    """The installed wsgitrace script runs one demo round and exits by itself."""
    demo = Command(["demo", "--once", "--interval", "0", "--json"], script=True)
    try:
        assert demo.finish(interrupt=False) == 0
    finally:
        demo.close()
    lines = json_lines(demo.stdout)
    assert [(line["method"], line["path"]) for line in lines] == [
        (method, path.partition("?")[0]) for method, path, _ in DEMO_ROUND
    ]
    statuses = {line["path"]: line["status"] for line in lines}
    assert statuses["/boom"] == 500
    assert statuses["/missing"] == 404


def test_tail_demo_example_renders_in_process() -> None:
    """examples/tail_demo.py prints the table and a timeline without a server."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "tail_demo.py")],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
        env=command_env(),
    )
    assert "/boom ! RuntimeError" in result.stdout
    assert "before_request:admin.require_admin" in result.stdout
    assert "short-circuit" in result.stdout
