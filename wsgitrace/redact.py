"""Redaction of secrets before a trace can be read.

Header names are matched exactly (case-insensitive) against a list, and any
header, query, form or session key that *looks* secret (contains password,
secret, token, key, auth, csrf, ...) is redacted too::

    redactor = Redactor(extra_headers=["X-Internal-Signature"])
    redactor.is_secret("X-Api-Key")        # True
    redactor.query("user=1&token=abc")    # "user=1&token=[redacted]"
    redactor.url("/next?token=abc")       # "/next?token=[redacted]"

Decisions per header name are memoized, so the request path pays a dict
lookup per header.
"""

from __future__ import annotations

import binascii
import re
from base64 import b64decode
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .exceptions import ConfigurationError

#: Replacement for a redacted value.
REDACTED = "[redacted]"

#: Headers always redacted by default.
DEFAULT_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "x-api-key",
        "api-key",
        "x-auth-token",
        "x-csrf-token",
        "x-xsrf-token",
    }
)

#: Headers whose value is a URL: secret-looking keys of its query (and
#: fragment, where OAuth puts an ``access_token``) are redacted.
URL_HEADERS = frozenset({"location", "content-location", "referer"})

#: Key fragments that mark a header, query, form or session key as secret.
DEFAULT_PATTERNS = (
    "password",
    "passwd",
    "pwd",
    "secret",
    "token",
    "key",
    "auth",
    "csrf",
    "xsrf",
    "session",
    "signature",
    "credential",
)

# Werkzeug splits a query on "&" only, but ";" is the older separator that
# other servers and proxies still honour: a secret after one is redacted too.
_SEPARATORS = re.compile("([&;])")

# Where a URL's authority starts: after "scheme://" or a leading "//".
_AUTHORITY = re.compile(r"(?:[A-Za-z][A-Za-z0-9+.-]*:)?//")

_MEMO_LIMIT = 4096
# Longer names (a client's invention) are decided each time, not kept.
_MEMO_NAME_CHARS = 256


class Redactor:
    """Decides which names are secret and replaces their values.

    :param headers: Replace the default header list.
    :param extra_headers: Add to the header list.
    :param patterns: Replace the default key fragments.
    :param extra_patterns: Add to the key fragments.
    """

    __slots__ = ("_memo", "_pattern", "headers", "patterns")

    def __init__(
        self,
        headers: Iterable[str] | None = None,
        extra_headers: Iterable[str] = (),
        patterns: Iterable[str] | None = None,
        extra_patterns: Iterable[str] = (),
    ) -> None:
        for label, value in (
            ("headers", headers),
            ("extra_headers", extra_headers),
            ("patterns", patterns),
            ("extra_patterns", extra_patterns),
        ):
            if isinstance(value, str | bytes):
                msg = f"{label} must be a list of names, not a string: {value!r}"
                raise ConfigurationError(msg)
        base = DEFAULT_HEADERS if headers is None else frozenset()
        # Names are compared lowercased with "_" as "-" (see is_secret).
        self.headers = (
            base | {_normal(h) for h in headers or ()} | {_normal(h) for h in extra_headers}
        )
        fragments = list(DEFAULT_PATTERNS if patterns is None else patterns)
        fragments += list(extra_patterns)
        self.patterns = tuple(_normal(f) for f in fragments if f)
        # "-" in a fragment also matches "_", so raw query strings match too.
        self._pattern = (
            re.compile(
                "|".join(re.escape(f).replace(r"\-", "[-_]") for f in self.patterns),
                re.IGNORECASE,
            )
            if self.patterns
            else None
        )
        self._memo: dict[str, bool] = {}

    def __repr__(self) -> str:
        return f"<Redactor headers={sorted(self.headers)!r} patterns={list(self.patterns)!r}>"

    def is_secret(self, name: str) -> bool:
        """Whether a header, query, form or session key's value is redacted."""
        decision = self._memo.get(name)
        if decision is None:
            lowered = _normal(name)
            decision = lowered in self.headers or (
                self._pattern is not None and self._pattern.search(lowered) is not None
            )
            if len(self._memo) < _MEMO_LIMIT and len(name) <= _MEMO_NAME_CHARS:
                self._memo[name] = decision
        return decision

    def query(self, query: str) -> str:
        """Redact the values of secret-looking keys in a query string."""
        if not query or self._pattern is None:
            return query
        if self._pattern.search(query) is None and "%" not in query:
            # No key can be secret (a percent-encoded one is decoded below).
            return query
        # Pairs at even indexes, their separators between them.
        parts = _SEPARATORS.split(query)
        for i in range(0, len(parts), 2):
            key, sep, _value = parts[i].partition("=")
            if sep and self.is_secret(_unquote_key(key)):
                parts[i] = f"{key}={REDACTED}"
        return "".join(parts)

    def path(self, path: str) -> str:
        """Redact the values of secret-looking path parameters
        (``/cart;jsessionid=abc`` gives ``/cart;jsessionid=[redacted]``).
        """
        if ";" not in path or self._pattern is None:
            return path
        segments = path.split("/")
        for index, segment in enumerate(segments):
            head, sep, params = segment.partition(";")
            if sep:
                segments[index] = f"{head};{self.query(params)}"
        return "/".join(segments)

    def url(self, url: str) -> str:
        """Redact the values of secret-looking keys in a URL's path
        parameters, query and fragment, and the credentials of its
        authority (``https://user:[redacted]@host/``; a user name alone,
        which may be a token, is redacted whole).
        """
        url = _redact_userinfo(url)
        base, sep, rest = url.partition("?")
        if sep:
            query, hash_, fragment = rest.partition("#")
            return f"{self.path(base)}?{self.query(query)}{hash_}{self.query(fragment)}"
        base, hash_, fragment = url.partition("#")
        return f"{self.path(base)}{hash_}{self.query(fragment)}"

    def request_secrets(self, environ: Mapping[str, Any]) -> set[str]:
        """The values of a request that a trace redacts, to cut out of
        free text: secret query values and headers (with the token of
        ``Bearer <token>``, the password of a ``Basic`` one and cookie
        values).
        """
        found: set[str] = set()
        query = environ.get("QUERY_STRING")
        if query and type(query) is str:
            for pair in _SEPARATORS.split(query)[::2]:
                key, sep, value = pair.partition("=")
                if sep and self.is_secret(_unquote_key(key)):
                    found.update((value, _unquote_key(value)))
        for key, value in environ.items():
            if key.startswith("HTTP_") and type(value) is str and self.is_secret(key[5:]):
                found.update(_header_secrets(value))
        return found


#: Shorter secret values are not cut out of free text: replacing every
#: "1234" would garble line numbers and counts more than it hides.
MIN_SCRUBBED = 6


def scrubber(secrets: Iterable[str]) -> Callable[[str], str] | None:
    """A function that replaces each of ``secrets`` (of :data:`MIN_SCRUBBED`
    characters or more) in a text by the marker, or ``None`` when there are
    none to replace.
    """
    ordered = sorted({s for s in secrets if len(s) >= MIN_SCRUBBED}, key=len, reverse=True)
    if not ordered:
        return None

    def scrub(text: str) -> str:
        for secret in ordered:
            text = text.replace(secret, REDACTED)
        return text

    return scrub


def _header_secrets(value: str) -> Iterable[str]:
    """A secret header's value, and the credentials it may hold: the
    token of ``Bearer <token>``, the password of a ``Basic`` one, cookie
    values.
    """
    yield value
    scheme, _, credentials = value.strip().partition(" ")
    credentials = credentials.strip()
    yield credentials
    if scheme.lower() == "basic":
        try:
            password = b64decode(credentials, validate=True).decode().partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            pass
        else:
            yield password
    for part in value.split(";"):
        yield part.partition("=")[2].strip()


def _normal(name: str) -> str:
    """A name as compared: lowercase, with "_" as "-"."""
    return name.lower().replace("_", "-")


def _redact_userinfo(url: str) -> str:
    """``url`` with the password of its ``user:password@`` part (or the
    whole part, when it has no password) replaced by the marker.
    """
    if "@" not in url:
        return url
    found_authority = _AUTHORITY.match(url)
    if found_authority is None:
        return url
    start = found_authority.end()
    end = len(url)
    for stop in "/?#":
        found = url.find(stop, start)
        if 0 <= found < end:
            end = found
    at = url.rfind("@", start, end)
    if at < 0:
        return url
    user, colon, _password = url[start:at].partition(":")
    userinfo = f"{user}:{REDACTED}" if colon else REDACTED
    return f"{url[:start]}{userinfo}{url[at:]}"


def _unquote_key(key: str) -> str:
    from urllib.parse import unquote_plus

    return unquote_plus(key)


#: The default list, for traces made without a middleware's own.
DEFAULT_REDACTOR = Redactor()
