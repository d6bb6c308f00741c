"""pytest plugin for Flask's own test suite: every Flask app it makes gets
``FlaskTrace(app, endpoint=False)`` as soon as its outermost ``__init__``
returns (a subclass's ``__init__`` included), so the suite checks that
tracing changes nothing an app does. Loaded by ``run.py`` with
``-p trace_all_apps``.

At the end it prints how many apps were traced, how many traces were made
and any error wsgitrace's own code caught, per test.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator
from typing import Any

import flask
import pytest

import wsgitrace
from wsgitrace import _internal
from wsgitrace._internal import add_capture_listener
from wsgitrace.flask import FlaskTrace

_depth = threading.local()
_counts = {"apps": 0, "traces": 0}
_errors_by_test: dict[str, dict[str, int]] = {}


def _traced_init(init: Callable[..., None]) -> Callable[..., None]:
    if getattr(init, "_wsgitrace_traced", False):
        return init

    def init_then_trace(self: flask.Flask, *args: Any, **kwargs: Any) -> None:
        depth = getattr(_depth, "value", 0)
        _depth.value = depth + 1
        try:
            init(self, *args, **kwargs)
        finally:
            _depth.value = depth
        if depth == 0 and "wsgitrace" not in self.extensions:
            FlaskTrace(self, endpoint=False)
            _counts["apps"] += 1

    init_then_trace._wsgitrace_traced = True  # type: ignore[attr-defined]
    return init_then_trace


def _init_subclass(cls: type[flask.Flask], **kwargs: Any) -> None:
    super(flask.Flask, cls).__init_subclass__(**kwargs)
    if "__init__" in cls.__dict__:
        cls.__init__ = _traced_init(cls.__dict__["__init__"])  # type: ignore[method-assign]


flask.Flask.__init__ = _traced_init(flask.Flask.__init__)  # type: ignore[method-assign]
flask.Flask.__init_subclass__ = classmethod(_init_subclass)  # type: ignore[assignment]
add_capture_listener(lambda trace, middleware: _counts.__setitem__("traces", _counts["traces"] + 1))


def pytest_report_header() -> str:
    return f"wsgitrace: every Flask app traced ({wsgitrace.__file__})"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    before = dict(_internal._internal_errors)
    try:
        return (yield)
    finally:
        after = _internal._internal_errors
        caught = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
        if caught:
            _errors_by_test[item.nodeid] = caught


def pytest_terminal_summary(terminalreporter: Any) -> None:
    write = terminalreporter.write_line
    write(f"wsgitrace: {_counts['apps']} apps traced, {_counts['traces']} traces")
    for nodeid, caught in _errors_by_test.items():
        write(f"wsgitrace: internal errors in {nodeid}: {caught}")
