"""Options: keywords beat Flask-style config, config beats the environment."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from wsgitrace import ConfigurationError, TraceMiddleware
from wsgitrace._run_options import run_flags
from wsgitrace.config import OPTION_SPECS, Options, env_name, resolve_options

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

    from .conftest import MakeEnviron


def dummy_app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


class TestResolveOptions:
    def test_defaults(self) -> None:
        """With no source set, every option has its documented default."""
        assert resolve_options({}, None, {}) == Options()

    def test_specs_match_the_options(self) -> None:
        """Every option has a spec whose default is the dataclass default."""
        fields = {f.name: f.default for f in dataclasses.fields(Options)}
        assert set(fields) == set(OPTION_SPECS)
        for name, spec in OPTION_SPECS.items():
            assert spec.default == fields[name], name
            assert spec.help

    def test_the_token_is_not_in_the_repr(self) -> None:
        """``repr(options)`` never shows the endpoint's token."""
        options = resolve_options({"token": "s3cr3t-token"}, None, {})
        assert options.token == "s3cr3t-token"
        assert "s3cr3t" not in repr(options)

    def test_the_readme_table_lists_every_option(self) -> None:
        """The README's Configuration table has one row per option, with its
        WSGITRACE_* name, its ``wsgitrace run`` flag and its default."""
        readme = Path(__file__).parent.parent / "README.md"
        rows = {
            m[1]: (m[2], m[3], m[4])
            for m in re.finditer(
                r"^\| `(\w+)` \| `(WSGITRACE_\w+)` \| (.*?) \| (.*?) \|", readme.read_text(), re.M
            )
        }
        assert set(rows) == set(OPTION_SPECS)
        flags = run_flags()
        for name, spec in OPTION_SPECS.items():
            setting, flag, default = rows[name]
            assert setting == env_name(name)
            assert flag == (f"`{flags[name]}`" if name in flags else "–"), name
            if spec.default in (None, ()):
                assert default in ("(none)", "auto"), name
            else:
                shown = spec.default[0] if isinstance(spec.default, tuple) else spec.default
                assert default.startswith(f"`{shown}`"), name

    def test_env_names(self) -> None:
        """Each option maps to a WSGITRACE_* name."""
        assert env_name("max_traces") == "WSGITRACE_MAX_TRACES"

    def test_a_misspelt_config_key_is_refused_with_a_suggestion(self) -> None:
        """A WSGITRACE_* key in the app's config that is no setting fails
        ``init_app`` naming it and the setting it probably meant."""
        with pytest.raises(ConfigurationError) as caught:
            resolve_options({}, {"WSGITRACE_MAXTRACES": 5, "SECRET_KEY": "x"}, {})
        assert "WSGITRACE_MAXTRACES (did you mean WSGITRACE_MAX_TRACES?)" in str(caught.value)

    def test_a_misspelt_environment_variable_is_logged_once(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """An unknown WSGITRACE_* variable is logged (once), not fatal: it may
        belong to another version."""
        environ = {"WSGITRACE_MAX_STRNG": "5", "WSGITRACE_MAX_STRING": "7"}
        with caplog.at_level("WARNING", logger="wsgitrace"):
            options = resolve_options({}, None, environ)
            resolve_options({}, None, environ)
        assert options.max_string == 7
        messages = [r.getMessage() for r in caplog.records if "MAX_STRNG" in r.getMessage()]
        assert messages == [
            "wsgitrace: environment variable WSGITRACE_MAX_STRNG"
            " (did you mean WSGITRACE_MAX_STRING?) is not a setting"
        ]

    def test_keyword_beats_config_beats_environment(self) -> None:
        """The first source that sets an option wins: keyword, config, environ."""
        environ = {
            "WSGITRACE_MAX_TRACES": "10",
            "WSGITRACE_MAX_EVENTS": "20",
            "WSGITRACE_MAX_STRING": "30",
        }
        config = {"WSGITRACE_MAX_TRACES": 11, "WSGITRACE_MAX_EVENTS": 21}
        options = resolve_options({"max_traces": 12}, config, environ)
        assert (options.max_traces, options.max_events, options.max_string) == (12, 21, 30)

    def test_environment_strings_are_parsed(self) -> None:
        """Environment values are parsed to the option's type."""
        options = resolve_options(
            {},
            None,
            {
                "WSGITRACE_ENABLED": "off",
                "WSGITRACE_SAMPLE": "0.25",
                "WSGITRACE_EXCLUDE": "/static, /favicon.ico,",
                "WSGITRACE_ALLOW": "10.0.0.0/8,::1",
                "WSGITRACE_ENDPOINT": "auto",
                "WSGITRACE_CAPTURE_HEADERS": "no",
                "WSGITRACE_PREFIX": "/debug/trace/",
                "WSGITRACE_TOKEN": "",
                "WSGITRACE_CAPTURE_LOGS": "0",
            },
        )
        assert options.capture_logs == 0
        assert options.enabled is False
        assert options.sample == 0.25
        assert options.exclude == ("/static", "/favicon.ico")
        assert options.allow == (
            ipaddress.ip_network("10.0.0.0/8"),
            ipaddress.ip_network("::1/128"),
        )
        assert options.endpoint is None
        assert options.capture_headers is False
        assert options.prefix == "/debug/trace"
        assert options.token is None

    def test_config_values_keep_their_types(self) -> None:
        """Config values may be native Python values."""
        sample = lambda environ: True  # noqa: E731
        options = resolve_options(
            {},
            {"WSGITRACE_SAMPLE": sample, "WSGITRACE_ENDPOINT": True, "WSGITRACE_REDACT": ["X-A"]},
            {},
        )
        assert options.sample is sample
        assert options.endpoint is True
        assert options.redact == ("X-A",)

    def test_unknown_keyword_is_refused(self) -> None:
        """A misspelt keyword raises ConfigurationError naming it."""
        with pytest.raises(ConfigurationError, match=r"max_trace\b"):
            resolve_options({"max_trace": 5}, None, {})

    @pytest.mark.parametrize(
        ("option", "bad"),
        [
            ("max_traces", "abc"),
            ("max_traces", 0),
            ("max_traces", 1.5),
            ("max_traces", True),
            ("max_events", -3),
            ("max_bytes", None),
            ("enabled", "maybe"),
            ("enabled", 2),
            ("sample", 1.5),
            ("sample", "often"),
            ("sample", True),
            ("exclude", 5),
            ("exclude", ["/a", 1]),
            ("exclude", "health"),  # a prefix of no path: nothing would be excluded
            ("exclude", ["/static/", "favicon.ico"]),
            ("prefix", "_trace"),
            ("prefix", "/"),
            ("prefix", "/é"),  # PATH_INFO is latin-1: could never match
            ("prefix", "/_trace?x"),
            ("prefix", "/a b"),
            ("allow", "not-a-network"),
            ("token", 123),
            ("endpoint", "sometimes"),
        ],
    )
    def test_bad_keyword_values_name_option_and_repr(self, option: str, bad: Any) -> None:
        """A bad value raises ConfigurationError with the option and the value's repr."""
        with pytest.raises(ConfigurationError) as excinfo:
            resolve_options({option: bad}, None, {})
        message = str(excinfo.value)
        assert option in message
        assert repr(bad) in message

    @pytest.mark.parametrize(
        ("option", "bad", "expected"),
        [
            ("max_traces", "abc", "expected a positive integer"),
            ("max_bytes", "32MB", "expected a positive integer"),
            ("max_bytes", "1.5", "expected a positive integer"),
            ("max_events", None, "expected a positive integer"),
            ("capture_logs", "lots", "expected a non-negative integer"),
            ("sample", "half", "expected a rate between 0 and 1 or a callable"),
            ("sample", None, "expected a rate between 0 and 1 or a callable"),
        ],
    )
    def test_a_value_that_is_no_number_says_what_is_expected(
        self, option: str, bad: Any, expected: str
    ) -> None:
        """A value that is not a number says what the option takes, not
        Python's "invalid literal for int() with base 10".
        """
        with pytest.raises(ConfigurationError) as excinfo:
            resolve_options({option: bad}, None, {})
        message = str(excinfo.value)
        assert f"({expected})" in message
        assert "int()" not in message
        assert "float" not in message

    def test_bad_config_and_environment_values_name_their_source(self) -> None:
        """The message says which config key or variable held the bad value."""
        with pytest.raises(ConfigurationError, match=re.escape("config WSGITRACE_SAMPLE: 'x'")):
            resolve_options({}, {"WSGITRACE_SAMPLE": "x"}, {})
        with pytest.raises(
            ConfigurationError, match=re.escape("environment variable WSGITRACE_MAX_TRACES: '-1'")
        ):
            resolve_options({}, None, {"WSGITRACE_MAX_TRACES": "-1"})

    def test_token_whitespace_is_stripped(self) -> None:
        """A token set with a trailing newline (a mounted secret) still
        matches what a client sends; a blank one is no token.
        """
        assert resolve_options({}, None, {"WSGITRACE_TOKEN": " s3cret\n"}).token == "s3cret"
        assert resolve_options({"token": " \n"}, None, {}).token is None

    def test_list_entries_are_stripped_like_comma_separated_ones(self) -> None:
        """A list entry with stray spaces still matches, and a blank one is
        dropped (a blank redaction fragment would match every key).
        """
        options = resolve_options({"redact": [" X-Tenant ", "", "  "]}, None, {})
        assert options.redact == ("X-Tenant",)
        assert resolve_options({"exclude": [" /health"]}, None, {}).exclude == ("/health",)
        # Not a prefix of every path (which would trace nothing): no prefix.
        assert resolve_options({"exclude": [""]}, None, {}).exclude == ()
        middleware = TraceMiddleware(dummy_app, redact=[" X-Tenant ", ""])
        assert middleware.redactor.is_secret("X-Tenant")
        assert not middleware.redactor.is_secret("X-Request-Id")

    def test_unparsable_host_fails_at_set_up(self) -> None:
        """A hosts entry that could never match a Host header is an error."""
        with pytest.raises(ConfigurationError, match="hosts: 'myhost:abc'"):
            TraceMiddleware(lambda e, s: [], endpoint=True, hosts="myhost:abc")
        middleware = TraceMiddleware(lambda e, s: [], endpoint=True, hosts="app.test:8000,::1")
        assert middleware.endpoint is not None

    def test_integral_floats_and_strings_are_accepted(self) -> None:
        """2.0 and " 7 " are whole numbers."""
        assert resolve_options({"max_traces": 2.0}, None, {}).max_traces == 2
        assert resolve_options({}, None, {"WSGITRACE_MAX_TRACES": " 7 "}).max_traces == 7


class TestTokenFile:
    def test_token_is_read_from_the_file(self, tmp_path: Path) -> None:
        """resolved_token() reads and strips the token file."""
        path = tmp_path / "token"
        path.write_text("  abc123\n", encoding="utf-8")
        assert Options(token_file=str(path)).resolved_token() == "abc123"
        assert Options(token="direct", token_file=str(path)).resolved_token() == "direct"
        assert Options().resolved_token() is None

    @pytest.mark.parametrize(
        ("keywords", "config", "environ", "expected"),
        [
            # A token file given by keyword or config beats a token left in
            # the environment (a rotated token: the old one must stop working).
            ({"token_file": "FILE"}, None, {"WSGITRACE_TOKEN": "old"}, "from-file"),
            ({}, {"WSGITRACE_TOKEN_FILE": "FILE"}, {"WSGITRACE_TOKEN": "old"}, "from-file"),
            ({"token_file": "FILE"}, {"WSGITRACE_TOKEN": "old"}, {}, "from-file"),
            # And a token beats a token file from a weaker source.
            ({"token": "direct"}, {"WSGITRACE_TOKEN_FILE": "FILE"}, {}, "direct"),
            ({}, {"WSGITRACE_TOKEN": "direct"}, {"WSGITRACE_TOKEN_FILE": "FILE"}, "direct"),
        ],
    )
    def test_token_and_token_file_follow_the_sources_order(
        self,
        tmp_path: Path,
        keywords: dict[str, str],
        config: dict[str, str] | None,
        environ: dict[str, str],
        expected: str,
    ) -> None:
        """``token`` and ``token_file`` are one setting given two ways: the
        stronger source (keyword, then config, then environment) wins.
        """
        path = tmp_path / "token"
        path.write_text("from-file\n", encoding="utf-8")

        def real(values: dict[str, str] | None) -> dict[str, str] | None:
            if values is None:
                return None
            return {k: str(path) if v == "FILE" else v for k, v in values.items()}

        options = resolve_options(real(keywords) or {}, real(config), real(environ) or {})
        assert options.resolved_token() == expected

    def test_missing_or_empty_token_file_is_an_error(self, tmp_path: Path) -> None:
        """A token file that cannot be read or is empty is a ConfigurationError."""
        missing = str(tmp_path / "missing")
        with pytest.raises(ConfigurationError, match=re.escape(repr(missing))):
            Options(token_file=missing).resolved_token()
        empty = tmp_path / "empty"
        empty.write_text("\n", encoding="utf-8")
        with pytest.raises(ConfigurationError, match="empty"):
            Options(token_file=str(empty)).resolved_token()


class TestMiddlewareOptions:
    def test_environment_configures_the_middleware(
        self, monkeypatch: pytest.MonkeyPatch, make_environ: MakeEnviron
    ) -> None:
        """WSGITRACE_* variables reach TraceMiddleware; keywords win."""
        monkeypatch.setenv("WSGITRACE_MAX_TRACES", "2")
        monkeypatch.setenv("WSGITRACE_MAX_STRING", "3")
        middleware = TraceMiddleware(dummy_app, max_string=8)
        assert (middleware.buffer.max_traces, middleware.limits.max_string) == (2, 8)
        for _ in range(3):
            middleware(make_environ("/"), lambda *args: len)
        assert (len(middleware.buffer), middleware.buffer.dropped) == (2, 1)

    def test_enabled_0_in_the_environment_turns_tracing_off(
        self, monkeypatch: pytest.MonkeyPatch, make_environ: MakeEnviron
    ) -> None:
        """WSGITRACE_ENABLED=0 passes requests straight through."""
        monkeypatch.setenv("WSGITRACE_ENABLED", "0")
        middleware = TraceMiddleware(dummy_app)
        assert middleware(make_environ("/"), lambda *args: len) == [b"ok"]
        assert middleware.buffer.cursor == 0

    def test_bad_environment_value_fails_at_set_up(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A bad variable raises when the middleware is made, not per request."""
        monkeypatch.setenv("WSGITRACE_SAMPLE", "2")
        with pytest.raises(ConfigurationError, match="WSGITRACE_SAMPLE: '2'"):
            TraceMiddleware(dummy_app)

    def test_unknown_keyword_fails_at_set_up(self) -> None:
        """TraceMiddleware refuses unknown options."""
        with pytest.raises(ConfigurationError, match="colour"):
            TraceMiddleware(dummy_app, colour="red")
