"""Who may read ``/_trace``: the ``Host`` check against DNS rebinding, the
client's address (loopback or an allowed network) and the bearer token, as
described under "Access control" in :mod:`wsgitrace.endpoint`::

    policy = _AccessPolicy(options)
    if not policy.allows(environ):
        ...  # the plain 404
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment

    from .config import Options

#: HTTP's optional whitespace around a header value's parts.
_OWS = " \t"

_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})

_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _host_name(host: str) -> str | None:
    """The name part of a ``Host`` header (lowercase, port removed), or
    ``None`` when it is malformed.
    """
    host = host.strip(_OWS).lower()
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            return None
        name, rest = host[: end + 1], host[end + 1 :]
    else:
        name, sep, port = host.partition(":")
        rest = sep + port
    if rest and not (rest.startswith(":") and rest[1:].isdigit() and rest.isascii()):
        return None
    return name or None


def _parse_ip(text: str | None) -> _IPAddress | None:
    """An address as the client's address: IPv4-mapped IPv6 as IPv4, ``None``
    when missing or not an address.
    """
    if not text:
        return None
    try:
        ip = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class _AccessPolicy:
    """The access decision of one endpoint, from its resolved options
    (``token``/``token_file``, ``allow``, ``hosts``, ``trust_forwarded``).
    A bad ``hosts`` entry raises :class:`~wsgitrace.ConfigurationError`.
    """

    def __init__(self, options: Options) -> None:
        token = options.resolved_token()
        self._token_bytes = None if token is None else token.encode("utf-8")
        self._allow = tuple(options.allow)
        hosts = set(_LOOPBACK_HOSTS)
        for host in options.hosts:
            if host.count(":") > 1 and not host.startswith("["):
                host = f"[{host}]"  # a bare IPv6 address
            name = _host_name(host)
            if name is not None and not name.isascii():
                # Clients send a name's IDNA form ("xn--..."), never Unicode.
                try:
                    name = name.encode("idna").decode("ascii")
                except UnicodeError:
                    name = None
            if name is None:
                from .exceptions import ConfigurationError

                msg = f"hosts: {host!r} is not a host name, address or host:port"
                raise ConfigurationError(msg)
            hosts.add(name)
        self._hosts = frozenset(hosts)
        self._trust_forwarded = options.trust_forwarded

    @property
    def has_token(self) -> bool:
        """Whether a token opens the endpoint to other clients."""
        return self._token_bytes is not None

    def allows(self, environ: WSGIEnvironment) -> bool:
        """Whether this request may read traces."""
        name = _host_name(environ.get("HTTP_HOST") or "")
        if name is None or name not in self._hosts:
            return False
        client = _parse_ip(self._client_addr(environ))
        if client is not None and (
            client.is_loopback or any(client in network for network in self._allow)
        ):
            return True
        return self._bearer_matches(environ)

    def _client_addr(self, environ: WSGIEnvironment) -> str | None:
        """``REMOTE_ADDR``, or the last ``X-Forwarded-For`` entry when trusted."""
        if self._trust_forwarded:
            forwarded = environ.get("HTTP_X_FORWARDED_FOR") or ""
            last = forwarded.split(",")[-1].strip()
            if last:
                return last
        addr = environ.get("REMOTE_ADDR")
        return addr if isinstance(addr, str) else None

    def _bearer_matches(self, environ: WSGIEnvironment) -> bool:
        """Whether a token is configured and ``Authorization: Bearer`` holds it
        (compared in constant time).
        """
        header = environ.get("HTTP_AUTHORIZATION") or ""
        # Only HTTP's spaces and tabs are stripped: the header holds bytes as
        # latin-1, and str.strip() would also take a trailing 0x85 or 0xA0,
        # the last byte of a UTF-8 character such as "à", off the token.
        scheme, _, value = header.strip(_OWS).partition(" ")
        if scheme.lower() != "bearer" or self._token_bytes is None:
            return False
        try:
            given = value.strip(_OWS).encode("latin-1")
        except UnicodeEncodeError:
            return False
        return hmac.compare_digest(given, self._token_bytes)
