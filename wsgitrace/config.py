"""Options: one table, three sources.

Every option can be given as a keyword argument, as a ``WSGITRACE_*`` key of a
Flask app's config, or as a ``WSGITRACE_*`` environment variable. Keywords
beat config, config beats environment::

    options = resolve_options({"sample": 0.1}, app.config)
    options.sample  # 0.1

Bad values raise :class:`~wsgitrace.exceptions.ConfigurationError` naming the
option, its source and the value's ``repr``.
"""

from __future__ import annotations

import difflib
import ipaddress
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .exceptions import ConfigurationError


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
    raise ValueError("expected a boolean (1/0, true/false, yes/no, on/off)")


def _optional_bool(value: Any) -> bool | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("auto", "")):
        return None
    return _bool(value)


def _count(value: Any) -> int:
    if isinstance(value, str) and value.strip() == "0":
        return 0  # as environment variables and config files give it
    if value == 0 and not isinstance(value, bool):
        return 0
    try:
        return _positive_int(value)
    except ValueError:
        raise ValueError("expected a non-negative integer") from None


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        # int() would silently turn True into 1 and 1.5 into 1.
        raise ValueError("expected a positive integer")
    try:
        number = int(value)
    except (TypeError, ValueError):  # not int()'s "invalid literal for int() with base 10"
        raise ValueError("expected a positive integer") from None
    if number < 1:
        raise ValueError("expected a positive integer")
    return number


def _sample(value: Any) -> Any:
    if callable(value):
        return value
    if isinstance(value, bool):
        raise ValueError("expected a rate between 0 and 1 or a callable")
    try:
        rate = float(value)
    except (TypeError, ValueError):
        raise ValueError("expected a rate between 0 and 1 or a callable") from None
    if not 0.0 <= rate <= 1.0:
        raise ValueError("expected a rate between 0 and 1 or a callable")
    return rate


def _str_list(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if isinstance(value, list | tuple | set | frozenset):
        if not all(isinstance(v, str) for v in value):
            raise ValueError("expected a list of strings")
        # As in the comma-separated form: " X-Tenant" would never match.
        return tuple(v.strip() for v in value if v.strip())
    raise ValueError("expected a list of strings or a comma-separated string")


def _paths(value: Any) -> tuple[str, ...]:
    paths = _str_list(value)
    for path in paths:
        if not path.startswith("/"):
            # It could never match: every request's path starts with "/".
            msg = f"expected path prefixes starting with '/', got {path!r}"
            raise ValueError(msg)
    return paths


def _networks(value: Any) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(v, strict=False) for v in _str_list(value))


# Characters a URL path can hold as they are (RFC 3986 pchar, no escapes):
# PATH_INFO holds the bytes of the request as latin-1, so a prefix with any
# other character could never match a request.
_PATH_RE = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@/-]*\Z")


def _prefix(value: Any) -> str:
    if not isinstance(value, str) or not _PATH_RE.match(value) or value.rstrip("/") == "":
        raise ValueError("expected a path such as '/_trace' (ASCII letters, digits, - . _ ~ /)")
    return value.rstrip("/")


def _token(value: Any) -> str | None:
    # A secret read from a file or a mounted variable often ends in a
    # newline, which no request header can carry.
    token = _optional_str(value)
    return None if token is None or not token.strip() else token.strip()


def _optional_str(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


@dataclass(frozen=True)
class _Spec:
    parse: Callable[[Any], Any]
    default: Any
    help: str


#: Every option: parser, default and one line of help. The README's
#: Configuration table lists each one, with its ``WSGITRACE_*`` name and
#: default (``tests/test_config.py`` checks they agree).
OPTION_SPECS: dict[str, _Spec] = {
    "enabled": _Spec(_bool, True, "Trace at all; off costs one attribute check per request."),
    "max_traces": _Spec(_positive_int, 1000, "Traces kept in the ring buffer."),
    "max_bytes": _Spec(_positive_int, 32 * 1024 * 1024, "Approximate bytes kept in the buffer."),
    "max_events": _Spec(_positive_int, 256, "Events kept per trace."),
    "max_string": _Spec(_positive_int, 1024, "Length of any captured string."),
    "max_headers": _Spec(
        _positive_int, 64, "Request headers kept per trace, and as many response headers."
    ),
    "sample": _Spec(_sample, 1.0, "Rate in [0, 1] or callable(environ) -> bool."),
    "exclude": _Spec(_paths, ("/favicon.ico",), "Path prefixes never traced."),
    "capture_headers": _Spec(_bool, True, "Keep request and response headers (redacted)."),
    "redact": _Spec(_str_list, (), "Extra header names / key fragments to redact."),
    "redact_defaults": _Spec(_bool, True, "Keep the default redaction list (false: replace it)."),
    "session_values": _Spec(
        _bool, False, "Keep session values (secret-looking keys stay redacted)."
    ),
    "capture_logs": _Spec(
        _count, 50, "Flask: records of app.logger kept per trace as log events (0: none)."
    ),
    "endpoint": _Spec(_optional_bool, None, "Serve /_trace (auto: Flask debug or testing)."),
    "prefix": _Spec(_prefix, "/_trace", "Path prefix of the endpoint."),
    "token": _Spec(_token, None, "Bearer token that opens the endpoint to non-loopback clients."),
    "token_file": _Spec(_optional_str, None, "File holding the token."),
    "allow": _Spec(_networks, (), "Networks (CIDR) allowed without a token."),
    "hosts": _Spec(_str_list, (), "Extra Host names the endpoint answers to."),
    "max_readers": _Spec(
        _positive_int, 3, "Long-polls and streams served at once; more get a 503."
    ),
    "trust_forwarded": _Spec(
        _bool, False, "Use X-Forwarded-For for the client address of the endpoint's access check."
    ),
    "store": _Spec(_optional_str, None, "SQLite file shared by the worker processes of one host."),
    "store_max_traces": _Spec(_positive_int, 10_000, "Traces kept in the store."),
    "store_max_bytes": _Spec(
        _positive_int, 64 * 1024 * 1024, "Approximate bytes of trace data kept in the store."
    ),
    "otlp": _Spec(_bool, False, "Export traces with OTLP/HTTP (configured by OTEL_* variables)."),
    "sink_queue": _Spec(
        _positive_int, 2000, "Traces waiting for each sink; more are dropped and counted."
    ),
}


@dataclass(frozen=True)
class Options:
    """Resolved options (see :data:`OPTION_SPECS`)."""

    enabled: bool = True
    max_traces: int = 1000
    max_bytes: int = 32 * 1024 * 1024
    max_events: int = 256
    max_string: int = 1024
    max_headers: int = 64
    sample: Any = 1.0
    exclude: tuple[str, ...] = ("/favicon.ico",)
    capture_headers: bool = True
    redact: tuple[str, ...] = ()
    redact_defaults: bool = True
    session_values: bool = False
    capture_logs: int = 50
    endpoint: bool | None = None
    prefix: str = "/_trace"
    #: Left out of the ``repr``: a secret is never logged or echoed.
    token: str | None = field(default=None, repr=False)
    token_file: str | None = None
    allow: tuple[Any, ...] = field(default=())
    hosts: tuple[str, ...] = ()
    max_readers: int = 3
    trust_forwarded: bool = False
    store: str | None = None
    store_max_traces: int = 10_000
    store_max_bytes: int = 64 * 1024 * 1024
    otlp: bool = False
    sink_queue: int = 2000

    def resolved_token(self) -> str | None:
        """The token, read from :attr:`token_file` when only that is set."""
        if self.token is not None:
            return self.token
        if self.token_file is None:
            return None
        try:
            with open(self.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as exc:
            msg = f"token_file {self.token_file!r} cannot be read: {exc}"
            raise ConfigurationError(msg) from None
        if not token:
            msg = f"token_file {self.token_file!r} is empty"
            raise ConfigurationError(msg)
        return token


logger = logging.getLogger("wsgitrace")
_reported_environ: set[str] = set()


def _unknown_names(source: Mapping[str, Any]) -> list[str]:
    """``WSGITRACE_*`` names in ``source`` that are no option's, each with
    the setting it probably meant.
    """
    out = []
    for key in source:
        if isinstance(key, str) and key.startswith("WSGITRACE_") and key not in _SETTING_NAMES:
            close = difflib.get_close_matches(key, _SETTING_NAMES, n=1)
            out.append(f"{key} (did you mean {close[0]}?)" if close else key)
    return sorted(out)


def env_name(option: str) -> str:
    """Environment variable / Flask config key of an option."""
    return f"WSGITRACE_{option.upper()}"


# Every option's WSGITRACE_* name, to tell a misspelt one.
_SETTING_NAMES = [env_name(name) for name in OPTION_SPECS]


def resolve_options(
    keywords: Mapping[str, Any],
    config: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Options:
    """Merge keywords, Flask config and environment into :class:`Options`.

    :raise ConfigurationError: An unknown keyword or setting, or a bad value.
    """
    unknown = set(keywords) - set(OPTION_SPECS)
    if unknown:
        names = ", ".join(sorted(unknown))
        msg = f"unknown wsgitrace option(s): {names}; known: {', '.join(OPTION_SPECS)}"
        raise ConfigurationError(msg)
    environ = os.environ if environ is None else environ
    if config is not None:
        misspelt = _unknown_names(config)
        if misspelt:
            msg = f"unknown wsgitrace setting(s) in the app's config: {'; '.join(misspelt)}"
            raise ConfigurationError(msg)
    for described in _unknown_names(environ):
        # Not an error: another version's variable should not stop the app.
        if described not in _reported_environ:
            _reported_environ.add(described)
            logger.warning("wsgitrace: environment variable %s is not a setting", described)
    values: dict[str, Any] = {}
    # Which source set each option: 0 keyword, 1 config, 2 environment.
    ranks: dict[str, int] = {}
    for name, spec in OPTION_SPECS.items():
        key = env_name(name)
        if name in keywords:
            raw, source, ranks[name] = keywords[name], f"keyword {name}", 0
        elif config is not None and key in config:
            raw, source, ranks[name] = config[key], f"config {key}", 1
        elif key in environ:
            raw, source, ranks[name] = environ[key], f"environment variable {key}", 2
        else:
            values[name] = spec.default
            continue
        try:
            values[name] = spec.parse(raw)
        except (TypeError, ValueError) as exc:
            msg = f"bad value for {source}: {raw!r} ({exc})"
            raise ConfigurationError(msg) from None
    if (
        values["token"] is not None
        and values["token_file"] is not None
        and ranks["token_file"] < ranks["token"]
    ):
        # One setting given two ways: a token file given by keyword or config
        # beats a WSGITRACE_TOKEN left in the environment (a rotated token's
        # old value must stop opening the endpoint).
        values["token"] = None
    assert {f.name for f in fields(Options)} == set(values)
    return Options(**values)
