"""What the ``/_trace`` endpoint reads: the protocols a trace and a source of
traces meet (a :class:`~wsgitrace.TraceBuffer` or a
:class:`~wsgitrace.store.TraceStore`), and a store source that falls back to
the process's buffer when the store fails.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from ._internal import logger
from .exceptions import StoreError

if TYPE_CHECKING:
    from .buffer import TraceBuffer
    from .store import TraceStore


class TraceView(Protocol):
    """What the endpoint reads of a trace: a :class:`~wsgitrace.Trace`, or a
    :class:`~wsgitrace.store.StoredTrace` read from a store.
    """

    @property
    def id(self) -> str: ...
    @property
    def cursor(self) -> int: ...
    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def status_code(self) -> int | None: ...
    @property
    def duration_ms(self) -> float | None: ...
    @property
    def finished(self) -> bool: ...
    def summary(self) -> dict[str, Any]: ...
    def to_dict(self) -> dict[str, Any]: ...


_T = TypeVar("_T")


class TraceSource(Protocol):
    """Where the endpoint reads traces: a :class:`~wsgitrace.TraceBuffer`, or
    a :class:`~wsgitrace.store.TraceStore` shared by several processes.
    """

    @property
    def max_traces(self) -> int: ...
    @property
    def cursor(self) -> int: ...
    @property
    def dropped(self) -> int: ...
    def latest(self, n: int | None = None) -> Sequence[TraceView]: ...
    def since(self, cursor: int, limit: int | None = None) -> Sequence[TraceView]: ...
    def get(self, trace_id: str) -> TraceView | None: ...
    def wait(self, cursor: int, timeout: float | None = None) -> bool: ...
    def notify(self) -> None: ...


class _StoreSource:
    """Reads a store; whenever it fails, logs why (once) and reads the
    process's own buffer instead, so the endpoint keeps answering.
    """

    def __init__(self, store: TraceStore, fallback: TraceBuffer, instance: str) -> None:
        self.store = store
        self.fallback = fallback
        self._instance = instance
        self._logged = False

    def _failed(self, exc: StoreError) -> None:
        if not self._logged:
            self._logged = True
            logger.error("%s; /_trace answers from this process's buffer meanwhile", exc)

    @property
    def max_traces(self) -> int:
        return max(self.store.max_traces, self.fallback.max_traces)

    def _read(self, read: Callable[[TraceSource], _T]) -> _T:
        """``read`` of the store, or of the buffer when the store fails."""
        try:
            return read(self.store)
        except StoreError as exc:
            self._failed(exc)
            return read(self.fallback)

    @property
    def instance(self) -> str:
        try:
            return self.store.instance
        except StoreError as exc:
            self._failed(exc)
            return self._instance

    @property
    def cursor(self) -> int:
        return self._read(lambda source: source.cursor)

    @property
    def dropped(self) -> int:
        return self._read(lambda source: source.dropped)

    def latest(self, n: int | None = None) -> Sequence[TraceView]:
        return self._read(lambda source: source.latest(n))

    def since(self, cursor: int, limit: int | None = None) -> Sequence[TraceView]:
        return self._read(lambda source: source.since(cursor, limit))

    def get(self, trace_id: str) -> TraceView | None:
        return self._read(lambda source: source.get(trace_id))

    def wait(self, cursor: int, timeout: float | None = None) -> bool:
        return self._read(lambda source: source.wait(cursor, timeout))

    def notify(self) -> None:
        self.store.notify()
        self.fallback.notify()


def _to_dict(trace: TraceView) -> dict[str, Any]:
    return trace.to_dict()


def _summary(trace: TraceView) -> dict[str, Any]:
    return trace.summary()
