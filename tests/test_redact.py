"""Redaction: secrets never leave the process in a trace."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest

from wsgitrace import ConfigurationError, Redactor, TraceMiddleware
from wsgitrace.redact import REDACTED

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

    from .conftest import Exchanger

SECRET = "s3cr3t-value-do-not-leak"


def dummy_app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
    start_response(
        "200 OK",
        [
            ("Content-Type", "text/plain"),
            ("Set-Cookie", f"session={SECRET}; HttpOnly"),
            ("X-Request-Id", "abc123"),
            ("X-Upstream-Token", SECRET),
        ],
    )
    return [b"ok"]


SECRET_HEADERS = {
    "Authorization": f"Bearer {SECRET}",
    "Proxy-Authorization": f"Basic {SECRET}",
    "Cookie": f"session={SECRET}",
    "X-Api-Key": SECRET,
    "Api-Key": SECRET,
    "X-Auth-Token": SECRET,
    "X-CSRF-Token": SECRET,
    "X-Client-Secret": SECRET,
}


def _trace_json(exchange: Exchanger, middleware: TraceMiddleware, **kwargs: Any) -> str:
    exchange(middleware, "/", **kwargs)
    trace = middleware.buffer.last
    assert trace is not None
    data = trace.to_dict()
    assert json.loads(trace.to_json()) == json.loads(json.dumps(data))
    return trace.to_json()


def test_secret_headers_and_query_keys_never_appear(exchange: Exchanger) -> None:
    middleware = TraceMiddleware(dummy_app)
    query = f"page=2&password={SECRET}&access_token={SECRET}&API_KEY={SECRET}&csrf={SECRET}"
    text = _trace_json(
        exchange, middleware, query=query, headers={**SECRET_HEADERS, "Accept": "text/html"}
    )
    assert SECRET not in text
    trace = middleware.buffer.last
    assert trace is not None
    request = dict(zip(trace.request_headers[::2], trace.request_headers[1::2], strict=True))
    for name in SECRET_HEADERS:
        assert request[name.title()] == REDACTED
    assert request["Accept"] == "text/html"
    response = dict(zip(trace.response_headers[::2], trace.response_headers[1::2], strict=True))
    assert response["Set-Cookie"] == REDACTED
    assert response["X-Upstream-Token"] == REDACTED
    assert response["X-Request-Id"] == "abc123"
    assert trace.query == (
        f"page=2&password={REDACTED}&access_token={REDACTED}&API_KEY={REDACTED}&csrf={REDACTED}"
    )


def redirecting_app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
    start_response(
        "302 Found",
        [
            ("Location", f"https://cdn.example/f.pdf?X-Amz-Signature={SECRET}&v=1"),
            ("content-location", f"/cb#access_token={SECRET}&state=ok"),
        ],
    )
    return [b""]


def test_urls_in_headers_keep_no_secret_query_values(exchange: Exchanger) -> None:
    """A redirect's Location and a Referer keep their URL, with the values
    of secret-looking query (and fragment) keys redacted.
    """
    middleware = TraceMiddleware(redirecting_app)
    referer = f"https://shop.example/reset?token={SECRET}&step=2"
    text = _trace_json(exchange, middleware, headers={"Referer": referer})
    assert SECRET not in text
    trace = middleware.buffer.last
    assert trace is not None
    request = dict(zip(trace.request_headers[::2], trace.request_headers[1::2], strict=True))
    assert request["Referer"] == f"https://shop.example/reset?token={REDACTED}&step=2"
    response = dict(zip(trace.response_headers[::2], trace.response_headers[1::2], strict=True))
    assert response == {
        "Location": f"https://cdn.example/f.pdf?X-Amz-Signature={REDACTED}&v=1",
        "content-location": f"/cb#access_token={REDACTED}&state=ok",
    }


def test_percent_encoded_secret_query_keys_are_redacted(exchange: Exchanger) -> None:
    middleware = TraceMiddleware(dummy_app)
    text = _trace_json(exchange, middleware, query=f"a=1&tok%65n={SECRET}&p%61ssword={SECRET}")
    assert SECRET not in text


def test_extra_names_extend_the_defaults(exchange: Exchanger) -> None:
    middleware = TraceMiddleware(dummy_app, redact=["X-Request-Id", "tenant_ref"])
    text = _trace_json(
        exchange,
        middleware,
        query=f"tenant_ref={SECRET}&token={SECRET}",
        headers={"Authorization": SECRET, "X-Tenant-Ref": SECRET},
    )
    assert SECRET not in text
    assert "abc123" not in text


def test_redact_defaults_false_replaces_the_list(exchange: Exchanger) -> None:
    middleware = TraceMiddleware(dummy_app, redact=["session_id"], redact_defaults=False)
    _trace_json(
        exchange,
        middleware,
        query=f"session_id={SECRET}&token=visible",
        headers={"Authorization": "visible-auth", "Session-Id": SECRET},
    )
    trace = middleware.buffer.last
    assert trace is not None
    assert trace.query == f"session_id={REDACTED}&token=visible"
    request = dict(zip(trace.request_headers[::2], trace.request_headers[1::2], strict=True))
    assert (request["Session-Id"], request["Authorization"]) == (REDACTED, "visible-auth")
    response = dict(zip(trace.response_headers[::2], trace.response_headers[1::2], strict=True))
    assert response["Set-Cookie"] == f"session={SECRET}; HttpOnly"


def test_redaction_off_entirely_keeps_values(exchange: Exchanger) -> None:
    middleware = TraceMiddleware(dummy_app, redact_defaults=False)
    text = _trace_json(exchange, middleware, query="token=t1", headers={"Cookie": "c1"})
    assert "token=t1" in text
    assert "c1" in text


class TestRedactor:
    def test_repr_shows_the_lists(self) -> None:
        """repr() shows the header names and key fragments in use."""
        redactor = Redactor(headers=["X-Secret"], patterns=["pin"])
        assert repr(redactor) == "<Redactor headers=['x-secret'] patterns=['pin']>"

    @pytest.mark.parametrize(
        "name",
        [
            "Authorization",
            "authorization",
            "Proxy-Authorization",
            "Cookie",
            "Set-Cookie",
            "X-Api-Key",
            "api_key",
            "X-CSRFToken",
            "password",
            "user_passwd",
            "client_secret",
            "refresh_token",
            "X-Amz-Signature",
            "session",
            "credentials",
        ],
    )
    def test_secret_looking_names(self, name: str) -> None:
        """Default headers and key fragments are secret, in any case."""
        assert Redactor().is_secret(name)

    @pytest.mark.parametrize("name", ["Accept", "Content-Type", "page", "user", "Host"])
    def test_ordinary_names(self, name: str) -> None:
        """Ordinary names are kept."""
        assert not Redactor().is_secret(name)

    def test_query_redacts_only_secret_values(self) -> None:
        """query() replaces the values of secret keys and keeps the rest."""
        redactor = Redactor()
        assert redactor.query("") == ""
        assert redactor.query("a=1&b=2") == "a=1&b=2"
        assert redactor.query("a=1&token=x&flag&key") == f"a=1&token={REDACTED}&flag&key"

    def test_query_with_semicolon_separators(self) -> None:
        """A secret after a ";" separator is redacted; the separators stay."""
        assert Redactor().query("a=1;token=t&b=2;c") == f"a=1;token={REDACTED}&b=2;c"

    def test_url_redacts_query_and_fragment(self) -> None:
        """Only the query and fragment of a URL are redacted."""
        r = Redactor()
        assert r.url("/token/x?a=1&token=t#k") == f"/token/x?a=1&token={REDACTED}#k"
        assert r.url("/cb#id_token=t") == f"/cb#id_token={REDACTED}"
        assert r.url("/auth/login") == "/auth/login"

    def test_percent_encoded_keys_are_decoded(self) -> None:
        """A percent-encoded secret key is still recognised."""
        redactor = Redactor()
        assert redactor.query("tok%65n=x") == f"tok%65n={REDACTED}"
        assert redactor.query("p%61ssword=x&ok=1") == f"p%61ssword={REDACTED}&ok=1"

    def test_underscores_and_dashes_are_the_same(self) -> None:
        """Configured names match whether written with '_' or '-'."""
        redactor = Redactor(headers=["X_Internal_Sig"], patterns=["tenant_ref"])
        assert redactor.is_secret("X-Internal-Sig")
        assert redactor.is_secret("x_internal_sig")
        assert redactor.is_secret("tenant_ref")
        assert redactor.is_secret("X-Tenant-Ref")
        assert redactor.query("tenant_ref=x") == f"tenant_ref={REDACTED}"

    def test_replacing_the_lists(self) -> None:
        """headers= and patterns= replace the defaults; extra_* add to them."""
        bare = Redactor(headers=[], patterns=[])
        assert not bare.is_secret("Authorization")
        assert bare.query("token=x") == "token=x"
        extended = Redactor(extra_headers=["X-Mine"], extra_patterns=["ssn"])
        assert extended.is_secret("X-Mine")
        assert extended.is_secret("user_ssn")
        assert extended.is_secret("Authorization")

    def test_decisions_are_memoized_but_bounded(self) -> None:
        """The per-name memo stops growing at its cap."""
        redactor = Redactor()
        for i in range(10_000):
            redactor.is_secret(f"X-Header-{i}")
        assert len(redactor._memo) <= 4096

    def test_long_names_are_decided_but_not_memoized(self) -> None:
        """A client's invented 4,000-character header names are not kept."""
        redactor = Redactor()
        assert redactor.is_secret("X-" + "a" * 4000 + "-Token")
        assert not redactor.is_secret("X-" + "b" * 4000)
        assert all(len(name) <= 256 for name in redactor._memo)

    @pytest.mark.parametrize("option", ["headers", "extra_headers", "patterns", "extra_patterns"])
    def test_a_string_instead_of_a_list_is_refused(self, option: str) -> None:
        """A bare string (a common slip) raises ConfigurationError with its repr."""
        with pytest.raises(ConfigurationError, match="'Authorization'"):
            Redactor(**{option: "Authorization"})
