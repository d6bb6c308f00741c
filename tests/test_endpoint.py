"""The /_trace endpoint, served by a real werkzeug server on 127.0.0.1 and
read with a real HTTP client.
"""

from __future__ import annotations

import hmac
import http.client
import json
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import pytest
from werkzeug.serving import WSGIRequestHandler, make_server

from wsgitrace import Trace, TraceBuffer, TraceMiddleware
from wsgitrace.config import resolve_options
from wsgitrace.endpoint import _NOT_FOUND_BODY, TraceEndpoint, _hangup_check

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

TIMEOUT = 10.0
SECRETS = ("hunter2-auth", "cookie-secret-9", "api-key-77", "query-pw-5")


class QuietHandler(WSGIRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


def demo_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """Routes by path: /missing is 404, /boom 500, /slow sleeps, /drip
    streams slowly, anything else is 200.
    """
    path = environ["PATH_INFO"]
    query = parse_qs(environ.get("QUERY_STRING", ""))
    if path == "/missing":
        start_response("404 NOT FOUND", [("Content-Type", "text/plain")])
        return [b"app: not found"]
    if path == "/boom":
        start_response("500 INTERNAL SERVER ERROR", [("Content-Type", "text/plain")])
        return [b"app: failed"]
    if path == "/slow":
        time.sleep(float(query.get("ms", ["50"])[0]) / 1000)
    if path == "/drip":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return _drip(float(query.get("ms", ["300"])[0]) / 1000)
    start_response(
        "200 OK", [("Content-Type", "text/plain"), ("Set-Cookie", "sid=cookie-secret-9")]
    )
    return [b"app saw " + path.encode("latin-1")]


def _drip(seconds: float) -> Iterator[bytes]:
    yield b"first "
    time.sleep(seconds)
    yield b"last"


class RemoteAs:
    """Stands in for the network: the client address is taken from the
    X-Test-Remote header, so a test can be a non-loopback client.
    """

    def __init__(self, app: WSGIApplication) -> None:
        self.app = app

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        remote = environ.pop("HTTP_X_TEST_REMOTE", None)
        if remote is not None:
            environ["REMOTE_ADDR"] = remote
        return self.app(environ, start_response)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        assert self.headers["content-type"] == "application/json"
        return json.loads(self.body)


@dataclass
class Served:
    """A traced app on a real server."""

    middleware: TraceMiddleware
    port: int
    endpoints: list[TraceEndpoint] = field(default_factory=list)

    @property
    def buffer(self) -> TraceBuffer:
        return self.middleware.buffer

    def request(
        self,
        target: str,
        *,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        host: str | None = "",
        timeout: float = TIMEOUT,
    ) -> Reply:
        """One request; ``host=None`` sends no Host header."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
            if host is not None:
                conn.putheader("Host", host or f"127.0.0.1:{self.port}")
            for name, value in (headers or {}).items():
                conn.putheader(name, value)
            conn.endheaders()
            response = conn.getresponse()
            body = response.read()
            return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, body)
        finally:
            conn.close()

    def get(self, target: str, **kwargs: Any) -> Reply:
        return self.request(target, **kwargs)

    def listing(self, query: str = "", **kwargs: Any) -> dict[str, Any]:
        reply = self.get("/_trace" + (f"?{query}" if query else ""), **kwargs)
        assert reply.status == 200, reply.body
        data: dict[str, Any] = reply.json()
        return data

    def wait_for_traces(self, count: int) -> None:
        deadline = time.monotonic() + TIMEOUT
        while len(self.buffer) < count or not all(t.finished for t in self.buffer):
            assert time.monotonic() < deadline, "traces did not arrive"
            time.sleep(0.005)


@pytest.fixture(name="serve")
def fixture_serve() -> Iterator[Callable[..., Served]]:
    """Serve demo_app traced, with the endpoint on, on a free local port."""
    servers: list[Any] = []
    all_served: list[Served] = []

    def start(
        app: WSGIApplication = demo_app, *, stream: dict[str, float] | None = None, **options: Any
    ) -> Served:
        options.setdefault("endpoint", True)
        middleware = TraceMiddleware(app, **options)
        front: WSGIApplication = middleware
        endpoints = []
        if stream is not None:
            # Short stream timings: mount an endpoint of our own in front.
            endpoint = TraceEndpoint(middleware.buffer, middleware.options, **stream)
            endpoints.append(endpoint)
            front = _Front(middleware, endpoint)
        server = make_server(
            "127.0.0.1", 0, RemoteAs(front), threaded=True, request_handler=QuietHandler
        )
        servers.append(server)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        own = getattr(middleware, "_endpoint_app", None)
        if isinstance(own, TraceEndpoint):
            endpoints.append(own)
        served = Served(middleware, server.server_port, endpoints)
        all_served.append(served)
        return served

    yield start
    for served in all_served:
        for endpoint in served.endpoints:
            endpoint.shutdown()
    for server in servers:
        server.shutdown()
        server.server_close()


class _Front:
    def __init__(self, app: WSGIApplication, endpoint: TraceEndpoint) -> None:
        self.app = app
        self.endpoint = endpoint

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ["PATH_INFO"].startswith("/_trace"):
            return self.endpoint(environ, start_response)
        return self.app(environ, start_response)


def add(
    buffer: TraceBuffer,
    path: str = "/",
    *,
    method: str = "GET",
    status: str = "200 OK",
    ms: float = 1.0,
    finished: bool = True,
) -> Trace:
    """Append a synthetic trace with an exact duration (an unfinished one
    starts now).
    """
    trace = Trace(method, path, start_ns=0 if finished else None)
    trace.status = status
    if finished:
        trace.end_ns = round(ms * 1_000_000)
        trace.finished = True
    buffer.append(trace)
    return trace


def cursors(page: dict[str, Any]) -> list[int]:
    return [t["cursor"] for t in page["traces"]]


# -- listing --------------------------------------------------------------------


class TestListing:
    def test_shape(self, serve: Callable[..., Served]) -> None:
        """schema, cursor, dropped and traces; traces is the only list; summaries carry state."""
        served = serve()
        served.get("/hello?x=1")
        served.get("/missing")
        served.wait_for_traces(2)
        data = served.listing()
        assert data["schema"] == 1
        assert data["cursor"] == 2
        assert data["dropped"] == 0
        assert [k for k, v in data.items() if isinstance(v, list)] == ["traces"]
        newest, oldest = data["traces"]
        assert (newest["path"], newest["status"], oldest["path"]) == ("/missing", 404, "/hello")
        for key in ("id", "cursor", "method", "path", "status", "duration_ms", "ttfb_ms"):
            assert key in oldest
        assert oldest["query"] == "x=1"
        assert oldest["state"] == "finished"
        assert oldest["bytes"] == len(b"app saw /hello")
        assert isinstance(oldest["id"], str)
        assert oldest["hooks"] == 0

    def test_headers(self, serve: Callable[..., Served]) -> None:
        """JSON, no-store, nosniff, and never a CORS header; a 404 has only
        the headers of a plain 404 (a client cannot tell the endpoint is there).
        """
        served = serve()
        for target in ("/_trace", "/_trace?limit=x", "/_trace/stream?status=9"):
            reply = served.get(target, headers={"Origin": "http://evil.example"})
            assert reply.headers["cache-control"] == "no-store"
            assert reply.headers["x-content-type-options"] == "nosniff"
            assert not any(k.startswith("access-control-") for k in reply.headers)
        assert served.get("/_trace").headers["content-type"] == "application/json"
        reply = served.get("/_trace/nope", headers={"Origin": "http://evil.example"})
        assert reply.status == 404
        own = {k for k in reply.headers if k not in ("connection", "date", "server")}
        assert own == {"content-length", "content-type"}  # the server adds the rest

    def test_newest_first_with_limit(self, serve: Callable[..., Served]) -> None:
        """limit keeps the newest traces; cursor is the newest cursor."""
        served = serve()
        for _ in range(7):
            add(served.buffer)
        data = served.listing("limit=3")
        assert cursors(data) == [7, 6, 5]
        assert data["cursor"] == 7
        assert cursors(served.listing("limit=0")) == []

    def test_limit_defaults_to_100_and_since_pages_from_the_oldest(
        self, serve: Callable[..., Served]
    ) -> None:
        """Without ``limit``, 100 traces (as the README says); with ``since``,
        the oldest ``limit`` of the new ones, and ``cursor`` continues after them.
        """
        served = serve()
        for _ in range(150):
            add(served.buffer)
        data = served.listing()
        assert [t["cursor"] for t in data["traces"]] == list(range(150, 50, -1))
        page = served.listing("since=10&limit=5")
        assert [t["cursor"] for t in page["traces"]] == [15, 14, 13, 12, 11]
        assert page["cursor"] == 15

    def test_limit_above_cap_is_clamped(self, serve: Callable[..., Served]) -> None:
        """A limit above the cap (at least 1,000) is clamped, not refused."""
        served = serve(max_traces=1200)
        for _ in range(1200):
            add(served.buffer)
        data = served.listing("limit=99999999")
        assert len(data["traces"]) == 1200
        data = served.listing("limit=" + "9" * 40)
        assert len(data["traces"]) == 1200
        # A cursor from the future (a restarted server) counts from 0.
        assert served.listing("since=" + "9" * 40) == served.listing("since=0")

    @pytest.mark.parametrize(
        ("query", "expected"),
        [
            ("method=POST", ["/b", "/d"]),
            ("method=get,delete", ["/a", "/c", "/e", "/api/x", "/f"]),
            ("status=5xx", ["/c"]),
            ("status=404", ["/b"]),
            ("status=4xx,5xx", ["/b", "/c"]),
            ("status=201", ["/d"]),
            ("path=/api", ["/api/x"]),
            ("min_ms=50", ["/c", "/e"]),
            ("min_ms=50&method=GET&status=2xx", ["/e"]),
        ],
    )
    def test_filters(self, serve: Callable[..., Served], query: str, expected: list[str]) -> None:
        """method, status (codes and classes), path prefix and min_ms filter traces."""
        served = serve()
        add(served.buffer, "/a", ms=5)
        add(served.buffer, "/b", method="POST", status="404 NOT FOUND", ms=10)
        add(served.buffer, "/c", status="500 INTERNAL SERVER ERROR", ms=80)
        add(served.buffer, "/d", method="POST", status="201 CREATED", ms=1)
        add(served.buffer, "/e", ms=120)
        add(served.buffer, "/api/x", ms=3)
        add(served.buffer, "/f", method="GET", finished=False)
        data = served.listing(query)
        assert sorted(t["path"] for t in data["traces"]) == sorted(expected)

    @pytest.mark.parametrize(
        ("query", "param"),
        [
            ("limit=ten", "limit"),
            ("limit=-1", "limit"),
            ("limit=1.5", "limit"),
            ("since=-3", "since"),
            ("since=abc", "since"),
            ("limit=%EF%BC%95", "limit"),  # a fullwidth 5
            ("since=%D9%A1%D9%A1", "since"),  # Arabic-Indic 11
            ("wait=soon", "wait"),
            ("wait=nan", "wait"),
            ("wait=-1", "wait"),
            ("status=6xx", "status"),
            ("status=ok", "status"),
            ("method=G%20T", "method"),
            ("min_ms=-5", "min_ms"),
            ("min_ms=inf", "min_ms"),
            ("path=api", "path"),
            ("full=maybe", "full"),
            ("limit=1&limit=2", "limit"),
        ],
    )
    def test_bad_values_are_400(self, serve: Callable[..., Served], query: str, param: str) -> None:
        """A bad query value gets a 400 whose JSON says which parameter is
        wrong and what it was given.
        """
        from urllib.parse import parse_qs

        served = serve()
        reply = served.get(f"/_trace?{query}")
        assert reply.status == 400
        error = reply.json()
        assert error["param"] == param
        assert param in error["error"]
        [*given] = parse_qs(query)[param]
        if len(given) == 1:
            assert error["error"].endswith(f", got {given[0]!r}")

    def test_token_in_query_string_is_not_accepted(self, serve: Callable[..., Served]) -> None:
        """A token in the query string is refused with a hint, and not echoed."""
        served = serve(token="s3cret-token")
        reply = served.get("/_trace?token=s3cret-token")
        assert reply.status == 400
        assert b"Authorization: Bearer" in reply.body
        assert b"s3cret-token" not in reply.body

    def test_one_trace(self, serve: Callable[..., Served]) -> None:
        """/_trace/<id> is the full trace: events, state, headers."""
        served = serve()
        served.get("/hello", headers={"X-Request-Id": "r-1"})
        served.wait_for_traces(1)
        summary = served.listing()["traces"][0]
        data = served.get(f"/_trace/{summary['id']}").json()
        assert data["id"] == summary["id"]
        assert data["schema"] == 1
        assert data["state"] == "finished"
        assert ["X-Request-Id", "r-1"] in data["request_headers"]
        assert [e["name"] for e in data["events"]][:2] == ["request", "app"]
        assert {"start_response", "body", "close"} <= {e["kind"] for e in data["events"]}

    def test_full_listing(self, serve: Callable[..., Served]) -> None:
        """full=1 lists full traces, still under the one list key."""
        served = serve()
        served.get("/hello")
        served.wait_for_traces(1)
        data = served.listing("full=1")
        assert "events" in data["traces"][0]

    @pytest.mark.parametrize(
        "target",
        ["/_trace/nope-123", "/_trace/a/b", "/_trace/stream/x", "/_trace/%2e%2e", "/_trace/%00"],
    )
    def test_unknown_sub_paths_are_404(self, serve: Callable[..., Served], target: str) -> None:
        """Unknown sub-paths and ids get the one 404, never the app."""
        served = serve()
        reply = served.get(target)
        assert reply.status == 404
        assert reply.body == _NOT_FOUND_BODY
        assert len(served.buffer) == 0

    def test_head_and_other_methods(self, serve: Callable[..., Served]) -> None:
        """HEAD gets headers only; other methods get a 405."""
        served = serve()
        head = served.request("/_trace", method="HEAD")
        assert head.status == 200
        assert head.body == b""
        assert int(head.headers["content-length"]) > 0
        post = served.request("/_trace", method="POST")
        assert post.status == 405
        assert post.headers["allow"] == "GET, HEAD"

    def test_endpoint_requests_are_not_traced(self, serve: Callable[..., Served]) -> None:
        """Only the app's requests are traced, never the endpoint's own."""
        served = serve()
        served.get("/app")
        served.wait_for_traces(1)
        for target in ("/_trace", "/_trace?limit=x", "/_trace/missing", "/_trace/"):
            served.get(target)
        assert [t.path for t in served.buffer] == ["/app"]

    def test_endpoint_off_passes_prefix_to_the_app(self, serve: Callable[..., Served]) -> None:
        """Without endpoint=True, /_trace is the app's."""
        served = serve(endpoint=None)
        reply = served.get("/_trace")
        assert reply.body == b"app saw /_trace"

    def test_in_progress_traces_are_listed_at_once(self, serve: Callable[..., Served]) -> None:
        """A response still streaming is listed with state in_progress."""
        served = serve()
        thread = threading.Thread(target=served.get, args=("/drip?ms=600",))
        thread.start()
        try:
            deadline = time.monotonic() + TIMEOUT
            while not served.buffer.latest():
                assert time.monotonic() < deadline
                time.sleep(0.005)
            (summary,) = served.listing()["traces"]
            assert summary["state"] == "in_progress"
            assert summary["duration_ms"] is None
        finally:
            thread.join(TIMEOUT)


# -- cursors --------------------------------------------------------------------


class TestCursor:
    def test_since_pages_forward(self, serve: Callable[..., Served]) -> None:
        """since returns the oldest new traces first in pages, with the cursor to continue."""
        served = serve()
        for _ in range(8):
            add(served.buffer)
        page = served.listing("since=0&limit=3")
        assert (cursors(page), page["cursor"]) == ([3, 2, 1], 3)
        page = served.listing("since=3&limit=3")
        assert (cursors(page), page["cursor"]) == ([6, 5, 4], 6)
        page = served.listing("since=6&limit=3")
        assert (cursors(page), page["cursor"]) == ([8, 7], 8)
        page = served.listing("since=8")
        assert (cursors(page), page["cursor"]) == ([], 8)

    def test_filtered_pages_move_the_cursor(self, serve: Callable[..., Served]) -> None:
        """Traces skipped by a filter still move the cursor past them."""
        served = serve()
        add(served.buffer, "/a")
        add(served.buffer, "/b", status="500 X")
        add(served.buffer, "/c")
        page = served.listing("since=0&status=5xx")
        assert (cursors(page), page["cursor"]) == ([2], 3)

    def test_never_skips_or_repeats_under_concurrent_appends(
        self, serve: Callable[..., Served]
    ) -> None:
        """Readers polling since=<cursor> see every trace exactly once, in order,
        while several threads append and real requests arrive.
        """
        served = serve(max_traces=20_000)
        writers_done = threading.Event()

        def write(seed: int) -> None:
            rng = random.Random(seed)
            for i in range(600):
                add(served.buffer, f"/w{seed}/{i}")
                if rng.random() < 0.05:
                    time.sleep(0.001)

        def requests() -> None:
            for i in range(25):
                served.get(f"/real/{i}")

        threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
        threads.append(threading.Thread(target=requests))
        for thread in threads:
            thread.start()

        def join() -> None:
            for thread in threads:
                thread.join(TIMEOUT * 3)
            writers_done.set()

        joiner = threading.Thread(target=join)
        joiner.start()
        seen: list[int] = []
        cursor = 0
        while True:
            done = writers_done.is_set()
            page = served.listing(f"since={cursor}&limit=23")
            got = list(reversed(cursors(page)))
            assert got == sorted(got)
            seen.extend(got)
            cursor = page["cursor"]
            if done and not got:
                break
        joiner.join(TIMEOUT)
        total = 4 * 600 + 25
        assert seen == list(range(1, total + 1))

    def test_long_poll_hands_out_in_progress_traces_once_in_order(
        self, serve: Callable[..., Served]
    ) -> None:
        """Long-polling readers see every trace exactly once even while traces
        are appended in progress and finished later by other threads.
        """
        served = serve(max_traces=20_000)
        pending: list[Trace] = []
        lock = threading.Lock()
        done = threading.Event()

        def write(seed: int) -> None:
            rng = random.Random(seed)
            for i in range(300):
                trace = add(served.buffer, f"/p{seed}/{i}", finished=False)
                with lock:
                    pending.append(trace)
                if rng.random() < 0.1:
                    time.sleep(0.001)

        def finish() -> None:
            while not done.is_set() or pending:
                with lock:
                    batch, pending[:] = list(pending), []
                time.sleep(0.002)
                for trace in batch:
                    trace.end_ns = trace.start_ns + 1_000_000
                    trace.finished = True

        writers = [threading.Thread(target=write, args=(n,)) for n in range(3)]
        finisher = threading.Thread(target=finish)
        for thread in [*writers, finisher]:
            thread.start()
        seen: list[int] = []
        states: list[str] = []
        cursor = 0
        total = 3 * 300
        deadline = time.monotonic() + 30
        while len(seen) < total and time.monotonic() < deadline:
            page = served.listing(f"since={cursor}&wait=2&limit=50")
            seen.extend(reversed(cursors(page)))
            states.extend(t["state"] for t in page["traces"])
            cursor = page["cursor"]
        for thread in writers:
            thread.join(TIMEOUT)
        done.set()
        finisher.join(TIMEOUT)
        assert seen == list(range(1, total + 1))
        assert set(states) == {"finished"}

    def test_since_from_a_restarted_server_counts_from_zero(
        self, serve: Callable[..., Served]
    ) -> None:
        """A since above the buffer's cursor (an earlier process's) starts at 0."""
        served = serve()
        add(served.buffer)
        add(served.buffer)
        page = served.listing("since=5000")
        assert cursors(page) == [2, 1]
        assert page["instance"] == served.listing()["instance"]

    def test_missed_counts_evicted_traces(self, serve: Callable[..., Served]) -> None:
        """Traces evicted before the reader got them are counted as missed and dropped."""
        served = serve(max_traces=4)
        for _ in range(10):
            add(served.buffer)
        page = served.listing("since=2")
        assert cursors(page) == [10, 9, 8, 7]
        assert page["missed"] == 4
        assert page["dropped"] == 6


# -- long-poll ------------------------------------------------------------------


def timed(func: Callable[[], Any]) -> tuple[Any, float]:
    start = time.monotonic()
    result = func()
    return result, time.monotonic() - start


def wait_for_a_waiter(served: Served) -> None:
    """Until a long-poll is waiting on the buffer (not a sleep: a slow
    thread would start after what it should wait for).
    """
    deadline = time.monotonic() + TIMEOUT
    while served.buffer._waiters < 1:
        assert time.monotonic() < deadline, "the long-poll never waited"
        time.sleep(0.005)


class TestLongPoll:
    def test_returns_as_soon_as_a_trace_arrives(self, serve: Callable[..., Served]) -> None:
        """A long-poll answers right after a request is served, not at its timeout."""
        served = serve()
        result: dict[str, Any] = {}

        def poll() -> None:
            result["page"], result["elapsed"] = timed(lambda: served.listing("since=0&wait=15"))
            result["at"] = time.monotonic()

        poller = threading.Thread(target=poll)
        poller.start()
        wait_for_a_waiter(served)
        served.get("/arrived")
        served_at = time.monotonic()
        poller.join(TIMEOUT)
        assert [t["path"] for t in result["page"]["traces"]] == ["/arrived"]
        assert result["page"]["traces"][0]["state"] == "finished"
        assert result["at"] - served_at < 0.5  # answered on arrival, not at the end of wait
        assert result["elapsed"] < 2

    def test_times_out_empty(self, serve: Callable[..., Served]) -> None:
        """With nothing new, a long-poll answers empty after wait, cursor unchanged."""
        served = serve()
        add(served.buffer)
        page, elapsed = timed(lambda: served.listing("since=1&wait=0.4"))
        assert (cursors(page), page["cursor"]) == ([], 1)
        assert 0.35 < elapsed < 2

    def test_without_since_waits_only_when_nothing_matches(
        self, serve: Callable[..., Served]
    ) -> None:
        """wait without since answers at once if something matches."""
        served = serve()
        add(served.buffer, "/there")
        page, elapsed = timed(lambda: served.listing("wait=5"))
        assert [t["path"] for t in page["traces"]] == ["/there"]
        assert elapsed < 1

    def test_filters_keep_waiting(self, serve: Callable[..., Served]) -> None:
        """Traces that do not match are passed over while waiting for one that does."""
        served = serve()
        result: dict[str, Any] = {}
        poller = threading.Thread(
            target=lambda: result.update(page=served.listing("since=0&wait=10&status=5xx"))
        )
        poller.start()
        wait_for_a_waiter(served)
        served.get("/fine")
        time.sleep(0.2)
        assert poller.is_alive()
        served.get("/boom")
        poller.join(TIMEOUT)
        assert [t["path"] for t in result["page"]["traces"]] == ["/boom"]
        assert result["page"]["cursor"] == 2

    def test_waits_briefly_for_an_in_progress_trace(self, serve: Callable[..., Served]) -> None:
        """A trace finishing within the settle time is handed out finished."""
        served = serve()
        trace = add(served.buffer, "/later", finished=False)

        def finish() -> None:
            time.sleep(0.3)
            trace.end_ns = trace.start_ns + 5_000_000
            trace.finished = True

        threading.Thread(target=finish).start()
        page, elapsed = timed(lambda: served.listing("since=0&wait=5"))
        assert page["traces"][0]["state"] == "finished"
        assert 0.25 < elapsed < 1

    def test_hands_out_a_long_running_trace_in_progress(self, serve: Callable[..., Served]) -> None:
        """A trace still running after the settle time is handed out as it is."""
        served = serve()
        add(served.buffer, "/forever", finished=False)
        page, elapsed = timed(lambda: served.listing("since=0&wait=5"))
        assert page["traces"][0]["state"] == "in_progress"
        assert 0.9 < elapsed < 2.5

    def test_in_progress_traces_settle_together(self, serve: Callable[..., Served]) -> None:
        """Several traces in progress at once hold a reader back one settle
        time in all, not one each (tail would fall a second behind per slow
        response).
        """
        served = serve()
        for i in range(4):
            add(served.buffer, f"/running/{i}", finished=False)
        add(served.buffer, "/after")
        page, elapsed = timed(lambda: served.listing("since=0&wait=10"))
        assert (cursors(page), page["cursor"]) == ([5, 4, 3, 2, 1], 5)
        assert elapsed < 1.8

    @pytest.mark.parametrize("min_ms", [500, 1300])
    def test_slow_trace_in_progress_matches_min_ms(
        self, serve: Callable[..., Served], min_ms: int
    ) -> None:
        """A response still streaming after min_ms is handed out, not passed
        over for having no duration yet (tail --slow would never show it).
        """
        served = serve()
        thread = threading.Thread(target=served.get, args=("/drip?ms=4000",))
        thread.start()
        try:
            page, elapsed = timed(lambda: served.listing(f"since=0&wait=10&min_ms={min_ms}"))
            # Handed out while the 4-second response still runs (in progress);
            # no tighter upper bound: on a loaded machine the request itself
            # may reach the server a second or two late.
            assert [(t["path"], t["state"]) for t in page["traces"]] == [("/drip", "in_progress")]
            assert min_ms / 1000 <= elapsed
            assert served.listing(f"min_ms={min_ms}")["traces"][0]["path"] == "/drip"
        finally:
            thread.join(TIMEOUT)

    def test_since_without_wait_does_not_skip_a_trace_pending_on_min_ms(
        self, serve: Callable[..., Served]
    ) -> None:
        """A ``since`` listing that answers at once (tail's first poll after
        reconnecting asks ``wait=0``) stops before a trace in progress that
        has not yet run min_ms: the next poll from its cursor gets it once
        it is slow enough, instead of having moved past it for good.
        """
        served = serve()
        thread = threading.Thread(target=served.get, args=("/drip?ms=1500",))
        thread.start()
        try:
            deadline = time.monotonic() + TIMEOUT
            while len(served.buffer) < 1:
                assert time.monotonic() < deadline, "the trace did not arrive"
                time.sleep(0.005)
            page = served.listing("since=0&min_ms=800")
            assert (cursors(page), page["cursor"]) == ([], 0)
        finally:
            thread.join(TIMEOUT)
        served.wait_for_traces(1)
        page = served.listing(f"since={page['cursor']}&min_ms=800")
        assert (cursors(page), page["cursor"]) == ([1], 1)
        assert page["traces"][0]["path"] == "/drip"

    def test_in_progress_trace_ending_under_min_ms_is_passed_over(
        self, serve: Callable[..., Served]
    ) -> None:
        """One held for min_ms that finishes sooner does not match, and the
        cursor moves past it.
        """
        served = serve()
        thread = threading.Thread(target=served.get, args=("/drip?ms=1200",))
        thread.start()
        try:
            page = served.listing("since=0&wait=2.5&min_ms=2000")
            assert (cursors(page), page["cursor"]) == ([], 1)
        finally:
            thread.join(TIMEOUT)

    def test_a_status_filter_waits_for_a_lazy_start_response(
        self, serve: Callable[..., Served]
    ) -> None:
        """A trace in progress whose app has not called ``start_response``
        yet (a lazy body) has no status: a status filter holds it until it
        has one, instead of passing it over for good after the settle time.
        """
        served = serve()
        trace = add(served.buffer, "/lazy", finished=False)
        trace.status = None

        def respond() -> None:
            time.sleep(1.5)  # past the settle time
            trace.status = "500 INTERNAL SERVER ERROR"

        responder = threading.Thread(target=respond)
        responder.start()
        try:
            page = served.listing("since=0&status=5xx")  # answers at once
            assert (cursors(page), page["cursor"]) == ([], 0)
            page, elapsed = timed(lambda: served.listing("since=0&wait=5&status=5xx"))
            assert [(t["path"], t["status"]) for t in page["traces"]] == [("/lazy", 500)]
            assert 1.2 < elapsed < 3
        finally:
            responder.join(TIMEOUT)

    def test_in_progress_trace_holds_back_newer_ones(self, serve: Callable[..., Served]) -> None:
        """Cursor order is kept: traces after an unfinished one wait for it."""
        served = serve()
        add(served.buffer, "/a")
        add(served.buffer, "/running", finished=False)
        add(served.buffer, "/c")
        page = served.listing("since=0&wait=5")
        assert (cursors(page), page["cursor"]) == ([1], 1)
        page = served.listing("since=1&wait=5")
        assert cursors(page) == [3, 2]


# -- stream ---------------------------------------------------------------------


class SSE:
    """A Server-Sent Events reader over a real connection."""

    def __init__(self, port: int, target: str, headers: dict[str, str] | None = None) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        self.conn.request("GET", target, headers={"Host": f"localhost:{port}", **(headers or {})})
        self.response = self.conn.getresponse()
        self.comments: list[str] = []

    def next(self) -> dict[str, str] | None:
        """The next event's fields, or None at the end of the stream."""
        fields: dict[str, str] = {}
        while True:
            line = self.response.readline()
            if not line:
                return None
            text = line.decode().rstrip("\n")
            if not text:
                if fields:
                    return fields
                continue
            if text.startswith(":"):
                self.comments.append(text)
                continue
            name, _, value = text.partition(": ")
            fields[name] = value

    def next_trace(self) -> dict[str, str]:
        while True:
            event = self.next()
            assert event is not None, "the stream ended"
            if event.get("event") == "trace":
                return event

    def close(self) -> None:
        self.response.close()
        self.conn.close()


@pytest.fixture(name="sse")
def fixture_sse() -> Iterator[Callable[..., SSE]]:
    readers: list[SSE] = []

    def open_stream(served: Served, target: str = "/_trace/stream", **headers: str) -> SSE:
        reader = SSE(served.port, target, headers)
        readers.append(reader)
        return reader

    yield open_stream
    for reader in readers:
        reader.close()


class TestStream:
    def test_headers_and_first_event(self, serve: Callable[..., Served], sse: Any) -> None:
        """The stream is text/event-stream, no-store, and starts with retry and info."""
        served = serve()
        reader = sse(served)
        assert reader.response.status == 200
        assert reader.response.getheader("Content-Type") == "text/event-stream; charset=utf-8"
        assert reader.response.getheader("Cache-Control") == "no-store"
        assert reader.response.readline() == b"retry: 1000\n"
        info = reader.next()
        assert info is not None
        assert info["event"] == "info"
        assert json.loads(info["data"])["cursor"] == 0

    def test_live_traces_with_cursor_ids(self, serve: Callable[..., Served], sse: Any) -> None:
        """New traces arrive as events whose id is the trace's cursor."""
        served = serve()
        add(served.buffer, "/before")
        reader = sse(served)
        reader.next()
        served.get("/one")
        served.get("/two")
        first, second = reader.next_trace(), reader.next_trace()
        assert (first["id"], json.loads(first["data"])["path"]) == ("2", "/one")
        assert (second["id"], json.loads(second["data"])["path"]) == ("3", "/two")
        assert json.loads(second["data"])["state"] == "finished"

    def test_resumes_after_last_event_id(self, serve: Callable[..., Served], sse: Any) -> None:
        """Last-Event-ID resumes exactly after that trace."""
        served = serve()
        for name in "abcde":
            add(served.buffer, f"/{name}")
        reader = sse(served, **{"Last-Event-ID": "2"})
        got = [reader.next_trace()["id"] for _ in range(3)]
        assert got == ["3", "4", "5"]
        served.get("/f")
        assert reader.next_trace()["id"] == "6"

    def test_resumes_exactly_after_a_stream_with_no_trace(
        self, serve: Callable[..., Served], sse: Any
    ) -> None:
        """A client that got no trace event before the stream ended still
        resumes where it ended (an EventSource sends the last id it saw),
        so a trace arriving while it reconnects is not lost.
        """
        served = serve(stream={"heartbeat": 0.1, "stream_seconds": 0.6})
        reader = sse(served, "/_trace/stream?status=5xx")
        served.get("/fine")
        last_id = None
        while (event := reader.next()) is not None:
            assert event["event"] != "trace"
            last_id = event.get("id", last_id)
        served.get("/boom")
        assert last_id is not None
        resumed = sse(served, "/_trace/stream?status=5xx", **{"Last-Event-ID": last_id})
        assert json.loads(resumed.next_trace()["data"])["path"] == "/boom"

    def test_since_and_filters(self, serve: Callable[..., Served], sse: Any) -> None:
        """since works like Last-Event-ID, and the listing filters apply."""
        served = serve()
        add(served.buffer, "/a")
        add(served.buffer, "/b", status="503 X")
        add(served.buffer, "/c")
        add(served.buffer, "/d", status="500 X")
        reader = sse(served, "/_trace/stream?since=0&status=5xx")
        assert [reader.next_trace()["id"] for _ in range(2)] == ["2", "4"]

    def test_bad_last_event_id(self, serve: Callable[..., Served]) -> None:
        """A Last-Event-ID that is not a cursor is a 400."""
        served = serve()
        reply = served.get("/_trace/stream", headers={"Last-Event-ID": "abc"})
        assert reply.status == 400
        assert reply.json()["param"] == "Last-Event-ID"

    def test_heartbeats_and_clean_end(self, serve: Callable[..., Served], sse: Any) -> None:
        """Quiet streams send heartbeats and end with an end event in time."""
        served = serve(stream={"heartbeat": 0.1, "stream_seconds": 0.8})
        reader = sse(served)
        start = time.monotonic()
        events = []
        while (event := reader.next()) is not None:
            events.append(event)
        assert time.monotonic() - start < 3
        assert [e["event"] for e in events] == ["info", "end"]
        assert json.loads(events[-1]["data"])["reason"] == "timeout"
        assert len(reader.comments) >= 3

    def test_default_stream_ends_within_25_seconds(self) -> None:
        """Streams end (clients resume) well before a 30 s worker timeout."""
        endpoint = TraceEndpoint(TraceBuffer(), resolve_options({}, environ={}))
        assert endpoint.stream_seconds + endpoint.settle <= 25
        assert endpoint.heartbeat < endpoint.stream_seconds

    def test_shutdown_ends_streams_at_once(self, serve: Callable[..., Served], sse: Any) -> None:
        """shutdown() ends open streams with reason shutdown."""
        served = serve(stream={})
        reader = sse(served)
        reader.next()
        threading.Timer(0.2, served.endpoints[0].shutdown).start()
        start = time.monotonic()
        event = reader.next()
        assert event is not None
        assert json.loads(event["data"])["reason"] == "shutdown"
        assert reader.next() is None
        assert time.monotonic() - start < 2

    def test_server_side_ends_when_the_client_leaves(
        self, serve: Callable[..., Served], sse: Any
    ) -> None:
        """A departed client is noticed at the next heartbeat and its thread ends."""
        served = serve(stream={"heartbeat": 0.1, "stream_seconds": 20})

        def handlers() -> int:
            return sum("process_request_thread" in t.name for t in threading.enumerate())

        before = handlers()
        reader = sse(served)
        reader.next()
        assert handlers() == before + 1
        reader.close()
        deadline = time.monotonic() + 3
        while handlers() > before:
            assert time.monotonic() < deadline, "the stream kept running"
            time.sleep(0.05)

    def test_stream_reports_evictions(self, serve: Callable[..., Served], sse: Any) -> None:
        """Traces evicted before the stream read them are reported in an info event."""
        served = serve(max_traces=3)
        for _ in range(6):
            add(served.buffer)
        reader = sse(served, **{"Last-Event-ID": "1"})
        reader.next()  # the opening info
        event = reader.next()
        assert event is not None
        assert event["event"] == "info"
        assert json.loads(event["data"])["missed"] == 2
        assert reader.next_trace()["id"] == "4"


# -- access control -------------------------------------------------------------


REMOTE = {"X-Test-Remote": "203.0.113.7"}


class TestAccess:
    @pytest.mark.parametrize(
        "target", ["/_trace", "/_trace/stream", "/_trace/{id}", "/_trace?limit=x", "/_trace/nope"]
    )
    def test_non_loopback_client_gets_the_plain_404(
        self, serve: Callable[..., Served], target: str
    ) -> None:
        """A client that is not loopback gets the same 404 as a missing route, no data."""
        served = serve()
        served.get("/secret-path")
        served.wait_for_traces(1)
        trace_id = served.buffer.latest(1)[0].id
        reply = served.get(target.format(id=trace_id), headers=REMOTE)
        assert reply.status == 404
        assert reply.body == _NOT_FOUND_BODY
        assert reply.headers == served.get("/_trace/nope").headers | {"date": reply.headers["date"]}
        for method in ("HEAD", "POST"):
            assert served.request("/_trace", method=method, headers=REMOTE).status == 404

    def test_test_clients_as_the_readme_says(self) -> None:
        """Flask's test client is loopback; werkzeug's Client sends no client
        address, so it gets the 404 unless given one (README, endpoint section).
        """
        from flask import Flask
        from werkzeug.test import Client

        client = Client(TraceMiddleware(demo_app, endpoint=True))
        assert client.get("/_trace").status_code == 404
        loopback = {"REMOTE_ADDR": "127.0.0.1"}
        assert client.get("/_trace", environ_base=loopback).status_code == 200
        app = Flask(__name__)
        app.wsgi_app = TraceMiddleware(app.wsgi_app, endpoint=True)  # type: ignore[method-assign]
        assert app.test_client().get("/_trace").status_code == 200

    def test_real_remote_addr_is_checked(self) -> None:
        """The decision reads REMOTE_ADDR: loopback (v4, v6, v4-mapped) yes, others no."""
        endpoint = TraceEndpoint(TraceBuffer(), resolve_options({}, environ={}))
        for addr, allowed in [
            ("127.0.0.1", True),
            ("127.8.9.10", True),
            ("::1", True),
            ("::ffff:127.0.0.1", True),
            ("10.0.0.5", False),
            ("192.168.1.2", False),
            ("2001:db8::1", False),
            ("", False),
            ("not-an-ip", False),
        ]:
            environ = {"REMOTE_ADDR": addr, "HTTP_HOST": "localhost"}
            assert endpoint.is_allowed(environ) is allowed, addr

    def test_forwarded_for_is_ignored_unless_trusted(self, serve: Callable[..., Served]) -> None:
        """X-Forwarded-For changes nothing by default; trusted, its last entry is the client."""
        plain = serve()
        assert plain.get("/_trace", headers={"X-Forwarded-For": "203.0.113.9"}).status == 200
        assert (
            plain.get("/_trace", headers={**REMOTE, "X-Forwarded-For": "127.0.0.1"}).status == 404
        )
        trusted = serve(trust_forwarded=True)
        assert trusted.get("/_trace", headers={"X-Forwarded-For": "203.0.113.9"}).status == 404
        chain = {"X-Forwarded-For": "203.0.113.9, 127.0.0.1"}
        assert trusted.get("/_trace", headers=chain).status == 200
        assert trusted.get("/_trace").status == 200

    @pytest.mark.parametrize(
        ("authorization", "status"),
        [
            (None, 404),
            ("Bearer wrong-token", 404),
            ("Bearer s3cret-token-but-longer", 404),
            ("Basic czNjcmV0LXRva2Vu", 404),
            ("s3cret-token", 404),
            ("Bearer s3cret-token", 200),
            ("bearer  s3cret-token ", 200),
        ],
    )
    def test_token_opens_the_endpoint_to_remote_clients(
        self, serve: Callable[..., Served], authorization: str | None, status: int
    ) -> None:
        """With a token, non-loopback clients need Authorization: Bearer <token>."""
        served = serve(token="s3cret-token")
        headers = dict(REMOTE)
        if authorization is not None:
            headers["Authorization"] = authorization
        reply = served.get("/_trace", headers=headers)
        assert reply.status == status
        assert b"s3cret-token" not in reply.body

    def test_token_never_accepted_from_the_query(self, serve: Callable[..., Served]) -> None:
        """?token= does not open the endpoint to a remote client."""
        served = serve(token="s3cret-token")
        assert served.get("/_trace?token=s3cret-token", headers=REMOTE).status == 404
        assert served.get("/_trace?access_token=s3cret-token", headers=REMOTE).status == 404

    def test_loopback_needs_no_token(self, serve: Callable[..., Served]) -> None:
        """Loopback clients are answered with or without a (right) token."""
        served = serve(token="s3cret-token")
        assert served.get("/_trace").status == 200

    def test_token_file(self, serve: Callable[..., Served], tmp_path: Any) -> None:
        """The token may come from a file."""
        path = tmp_path / "token"
        path.write_text("file-token\n")
        served = serve(token_file=str(path))
        auth = {**REMOTE, "Authorization": "Bearer file-token"}
        assert served.get("/_trace", headers=auth).status == 200
        assert served.get("/_trace", headers=REMOTE).status == 404

    def test_token_compared_in_constant_time(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The token check goes through hmac.compare_digest."""
        calls: list[tuple[bytes, bytes]] = []
        compare = hmac.compare_digest

        def spy(a: bytes, b: bytes) -> bool:
            calls.append((a, b))
            return compare(a, b)

        monkeypatch.setattr("wsgitrace._access.hmac.compare_digest", spy)
        endpoint = TraceEndpoint(TraceBuffer(), resolve_options({"token": "tok"}, environ={}))
        environ = {"REMOTE_ADDR": "203.0.113.1", "HTTP_HOST": "localhost"}
        assert endpoint.is_allowed({**environ, "HTTP_AUTHORIZATION": "Bearer tok"})
        assert not endpoint.is_allowed({**environ, "HTTP_AUTHORIZATION": "Bearer tok2"})
        assert calls == [(b"tok", b"tok"), (b"tok2", b"tok")]

    def test_allow_list_of_networks(self, serve: Callable[..., Served]) -> None:
        """Clients in an allowed network are answered without a token."""
        served = serve(allow=["203.0.113.0/24", "2001:db8::/32"])
        assert served.get("/_trace", headers=REMOTE).status == 200
        assert served.get("/_trace", headers={"X-Test-Remote": "2001:db8::5"}).status == 200
        assert served.get("/_trace", headers={"X-Test-Remote": "198.51.100.1"}).status == 404

    @pytest.mark.parametrize(
        ("host", "status"),
        [
            ("localhost", 200),
            ("LOCALHOST:5000", 200),
            ("127.0.0.1", 200),
            ("127.0.0.1:8080", 200),
            ("[::1]", 200),
            ("[::1]:5000", 200),
            ("trace.example.com:443", 200),
            ("evil.example", 404),
            ("localhost.evil.example", 404),
            ("127.0.0.1.nip.io", 404),
            ("localhost:80:80", 404),
            ("localhost:abc", 404),
            ("localhost:\u00b2", 404),  # a digit, but not an ASCII one
            ("[::1", 404),
            ("", 404),
            (None, 404),
        ],
    )
    def test_host_must_be_local_or_configured(
        self, serve: Callable[..., Served], host: str | None, status: int
    ) -> None:
        """Against DNS rebinding, only loopback names or configured hosts are answered."""
        served = serve(hosts=["trace.example.com"])
        if host == "":
            reply = served.get("/_trace", headers={"Host": ""}, host=None)
        else:
            reply = served.get("/_trace", host=host)
        assert reply.status == status
        if status == 404:
            assert reply.body == _NOT_FOUND_BODY

    def test_configured_unicode_host_matches_what_clients_send(
        self, serve: Callable[..., Served]
    ) -> None:
        """A host configured in Unicode is answered under its IDNA (ASCII)
        form, the only one a client puts in Host.
        """
        served = serve(hosts=["bücher.example"])
        assert served.get("/_trace", host="xn--bcher-kva.example:8000").status == 200
        assert served.get("/_trace", host="xn--bcher-kva.example.evil").status == 404

    def test_bad_host_refused_even_with_token(self, serve: Callable[..., Served]) -> None:
        """A right token does not make an unknown Host acceptable."""
        served = serve(token="s3cret-token")
        headers = {**REMOTE, "Authorization": "Bearer s3cret-token"}
        assert served.get("/_trace", headers=headers, host="evil.example").status == 404

    def test_secrets_never_leave(self, serve: Callable[..., Served], sse: Any) -> None:
        """Redacted headers and query values appear in no answer of the endpoint."""
        served = serve()
        reader = sse(served)
        reader.next()
        served.get(
            "/login?user=ann&password=query-pw-5",
            headers={
                "Authorization": "Bearer hunter2-auth",
                "Cookie": "sid=cookie-secret-9",
                "X-Api-Key": "api-key-77",
            },
        )
        served.wait_for_traces(1)
        trace_id = served.buffer.latest(1)[0].id
        bodies = [
            served.get("/_trace").body,
            served.get("/_trace?full=1").body,
            served.get(f"/_trace/{trace_id}").body,
            json.dumps(reader.next_trace()).encode(),
        ]
        full = json.loads(bodies[2])
        assert ["Authorization", "[redacted]"] in full["request_headers"]
        assert ["Set-Cookie", "[redacted]"] in full["response_headers"]
        for body in bodies:
            for secret in SECRETS:
                assert secret.encode() not in body


def test_lone_surrogates_do_not_break_answers(serve: Callable[..., Served]) -> None:
    """A captured string that is not valid UTF-8 text is replaced, not a 500."""
    served = serve()
    trace = add(served.buffer, "/bad")
    trace.error = {"type": "OSError", "message": "no file \udcff", "traceback": "", "where": "app"}
    assert served.listing()["traces"][0]["error"] == "OSError"
    data = served.get(f"/_trace/{trace.id}").json()
    assert data["error"]["message"] == "no file ?"


def test_missing_host_header_is_refused(serve: Callable[..., Served]) -> None:
    """An HTTP/1.0 request without Host is refused."""
    served = serve()
    with socket.create_connection(("127.0.0.1", served.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"GET /_trace HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.split(b"\r\n")[0].endswith(b" 404 NOT FOUND")
    assert data.endswith(_NOT_FOUND_BODY)


def test_large_listing_is_complete_and_ordered(serve: Callable[..., Served]) -> None:
    """1,000 summaries come back in one answer (timing is measured separately)."""
    served = serve()
    for i in range(1000):
        add(served.buffer, f"/bulk/{i}")
    data = served.listing("limit=1000")
    assert len(data["traces"]) == 1000
    assert data["traces"][0]["path"] == "/bulk/999"


class TestReaderCap:
    """At most ``max_readers`` long-polls and streams are served at once,
    since each holds a server thread the app may need.
    """

    def assert_busy(self, reply: Reply) -> None:
        assert reply.status == 503
        assert reply.headers["retry-after"] == "1"
        data = reply.json()
        assert data["busy"] is True
        assert "max_readers" in data["error"]

    def test_a_long_poll_past_the_cap_is_turned_away(self, serve: Callable[..., Served]) -> None:
        served = serve(max_readers=1)
        result: dict[str, Any] = {}
        poller = threading.Thread(
            target=lambda: result.update(page=served.listing("since=0&wait=15"))
        )
        poller.start()
        wait_for_a_waiter(served)
        self.assert_busy(served.get("/_trace?since=0&wait=5"))
        self.assert_busy(served.get("/_trace/stream"))
        # Answers that hold no thread are not counted.
        assert served.listing("since=0")["traces"] == []
        assert served.get("/_trace/stream", method="HEAD").status == 200
        served.get("/arrived")
        poller.join(TIMEOUT)
        assert [t["path"] for t in result["page"]["traces"]] == ["/arrived"]
        # The slot is free again once the long-poll answered.
        assert served.listing("since=0&wait=0.1")["cursor"] == 1

    def test_a_stream_holds_its_slot_until_it_is_closed(
        self, serve: Callable[..., Served], sse: Any
    ) -> None:
        served = serve(max_readers=2, stream={"heartbeat": 0.1, "stream_seconds": 20})
        first = sse(served)
        second = sse(served)
        assert first.next() is not None
        assert second.next() is not None
        self.assert_busy(served.get("/_trace?since=0&wait=5"))
        third = sse(served)
        assert third.response.status == 503
        # A departed client's stream ends at its next heartbeat and gives
        # its slot back.
        first.close()
        deadline = time.monotonic() + 5
        while (reply := served.get("/_trace?since=0&wait=0.05")).status == 503:
            assert time.monotonic() < deadline, "the closed stream kept its slot"
            time.sleep(0.05)
        assert reply.status == 200

    @pytest.mark.parametrize("target", ["/_trace?since=0&wait=15", "/_trace/stream"])
    def test_a_reader_that_hung_up_gives_its_slot_back_at_once(
        self, serve: Callable[..., Served], target: str
    ) -> None:
        """A long-poll or stream whose client closed the connection (a tail
        stopped with Ctrl-C) frees its slot within a moment, not at the end
        of its wait: the next tail is not told the endpoint is busy.
        """
        served = serve(max_readers=1)
        with socket.create_connection(("127.0.0.1", served.port)) as client:
            client.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            if "stream" in target:
                assert client.recv(100).startswith(b"HTTP/1.1 200")
            else:
                wait_for_a_waiter(served)
            self.assert_busy(served.get("/_trace?since=0&wait=0.05"))
        deadline = time.monotonic() + 5
        while (reply := served.get("/_trace?since=0&wait=0.05")).status == 503:
            assert time.monotonic() < deadline, "the departed reader kept its slot"
            time.sleep(0.05)
        assert reply.status == 200

    @pytest.mark.parametrize("timeout", [None, 2.0])
    def test_the_hang_up_check_never_waits_on_the_connection(self, timeout: float | None) -> None:
        """A server may give its connections a timeout (a handler's
        ``timeout``): the check still answers at once, still there while the
        client is, gone once it closed (a peek on such a socket would wait
        for data that long, then fail as if the client had left).
        """
        server_side, client_side = socket.socketpair()
        with server_side, client_side:
            server_side.settimeout(timeout)
            gone = _hangup_check({"werkzeug.socket": server_side})
            assert gone is not None
            assert gone() is False
            client_side.close()
            assert gone() is True

    def test_a_stream_body_gives_its_slot_back_once_however_it_ends(self) -> None:
        """Closed, collected unclosed, or closed twice: the slot comes back
        exactly once (a second release would raise from the semaphore).
        """
        endpoint = TraceEndpoint(TraceBuffer(), resolve_options({"max_readers": 1}, None, {}))
        environ = {
            "PATH_INFO": "/_trace/stream",
            "REQUEST_METHOD": "GET",
            "REMOTE_ADDR": "127.0.0.1",
            "HTTP_HOST": "localhost",
        }
        statuses: list[str] = []

        def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
            statuses.append(status)

        body = endpoint(dict(environ), start_response)
        assert statuses == ["200 OK"]
        [busy] = endpoint(dict(environ), start_response)
        assert statuses[-1] == "503 Service Unavailable"
        assert json.loads(busy)["busy"] is True
        body.close()  # type: ignore[attr-defined]
        body.close()  # type: ignore[attr-defined]
        unclosed = endpoint(dict(environ), start_response)
        assert statuses[-1] == "200 OK"
        del unclosed  # never iterated, never closed: collected
        again = endpoint(dict(environ), start_response)
        assert statuses[-1] == "200 OK"
        again.close()  # type: ignore[attr-defined]
        assert endpoint._readers.acquire(blocking=False)

    def test_the_cap_is_an_option(self) -> None:
        assert resolve_options({}, None, {}).max_readers == 3
        assert resolve_options({}, None, {"WSGITRACE_MAX_READERS": "5"}).max_readers == 5
