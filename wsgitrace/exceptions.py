"""Exceptions and warnings raised by wsgitrace.

Hierarchy::

    WsgitraceError
     +-- ConfigurationError      (also a ValueError) bad options, raised when an object is set up
     +-- HookOrderError          (also an AssertionError) a hook order assertion failed
     +-- StoreError              the trace store cannot be opened, read or written

    WsgitraceWarning              set-up time only, never on the request path

Problems wsgitrace notices while a request is served (a body that is never
closed, a ``Content-Length`` that does not match the bytes sent, ...) are never
raised: they are recorded in :attr:`Trace.warnings <wsgitrace.Trace.warnings>`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .trace import Trace


class WsgitraceError(Exception):
    """Base class of wsgitrace's own errors: configuration, the trace store
    and hook order assertions. Misuse of an API (calling before set-up, a
    wrong argument type) raises Python's usual ``RuntimeError``,
    ``TypeError`` or ``ValueError``.
    """


class ConfigurationError(WsgitraceError, ValueError):
    """An option has a value wsgitrace cannot use. The message names the option
    and the bad value's ``repr``.
    """


class HookOrderError(WsgitraceError, AssertionError):
    """A hook order assertion failed.

    :param message: The readable diff.
    :param trace: The trace the assertion was made on.
    """

    def __init__(self, message: str, trace: Trace | None = None) -> None:
        super().__init__(message)
        self.trace = trace


class StoreError(WsgitraceError):
    """The SQLite trace store cannot be used: corrupt, locked, unreadable, or
    written by a newer wsgitrace. The message names the file and what to do.

    :param message: What went wrong and what to do about it.
    :param path: The store's file.

    .. versionadded:: 0.1
    """

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class WsgitraceWarning(UserWarning):
    """A set-up time warning, for example a deprecated option."""
