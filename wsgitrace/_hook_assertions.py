"""Hook order assertions: the checks behind :mod:`wsgitrace.testing`'s
``assert_*`` functions, and the failure messages they raise.

Import them from :mod:`wsgitrace.testing` (or use the ``wsgitrace``
fixture's methods); this module holds them so that the capture stays a
module of its own::

    from wsgitrace.testing import assert_hook_order

    assert_hook_order(trace, ["before_request:*", "view:index"], exact=False)

Each raises :class:`~wsgitrace.HookOrderError` (an :exc:`AssertionError`)
with what ran, what was expected, where they diverge, and a hint. Neither
pytest, Flask nor rich is imported by this module.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence

from .exceptions import HookOrderError
from .trace import HOOK_KINDS, Event, Trace

__all__ = [
    "assert_hook_not_run",
    "assert_hook_order",
    "assert_short_circuited",
    "assert_teardown_after_body",
]

_TEARDOWN_KINDS = ("teardown_request", "teardown_appcontext")


def assert_hook_order(trace: Trace, expected: Sequence[str], *, exact: bool = True) -> None:
    """Assert the hooks of ``trace`` (:meth:`Trace.hooks`) ran in this order.

    :param trace: The trace of the request.
    :param expected: Event names such as ``"before_request:load_user"`` or
        ``"view:admin.dashboard"``; ``*`` matches any text
        (``"teardown_request:*"``).
    :param exact: ``True``: these hooks and no others ran, in this order.
        ``False``: they ran in this order, other hooks may have run between.
    :raise HookOrderError: With what ran, what was expected, where they
        diverge, and a hint.
    """
    __tracebackhide__ = True
    _check_trace(trace, "assert_hook_order")
    if isinstance(expected, str | bytes):
        msg = f"expected must be a sequence of hook names, not a string: {expected!r}"
        raise TypeError(msg)
    if not isinstance(expected, Sequence):
        msg = (
            "expected must be an ordered sequence (a list or tuple) of hook names,"
            f" got {type(expected).__name__}"
        )
        raise TypeError(msg)
    expected = list(expected)
    for name in expected:
        _check_hook_name(name)
    ran = trace.hooks()
    if exact:
        ok = len(ran) == len(expected) and all(map(_match, ran, expected))
    else:
        ok = _is_subsequence(expected, ran)
    if not ok:
        raise HookOrderError(_order_message(trace, ran, expected, exact), trace=trace)


def assert_hook_not_run(trace: Trace, hook: str) -> None:
    """Assert no hook named ``hook`` (``*`` matches any text) ran.

    :raise HookOrderError: Naming where it ran.
    """
    __tracebackhide__ = True
    _check_trace(trace, "assert_hook_not_run")
    _check_hook_name(hook)
    ran = trace.hooks()
    where = [i for i, name in enumerate(ran) if _match(name, hook)]
    if where:
        lines = [f"{hook!r} ran, but should not have (position {', '.join(map(str, where))})"]
        lines += _trace_line(trace)
        lines += _numbered(ran, set(where))
        raise HookOrderError("\n".join(lines), trace=trace)
    if trace.dropped_events:
        # What was dropped may be the hook: not having seen it proves nothing.
        lines = [f"cannot tell whether {hook!r} ran", *_trace_line(trace), *_dropped_hint(trace)]
        raise HookOrderError("\n".join(lines), trace=trace)


def assert_short_circuited(trace: Trace, hook: str | None = None) -> None:
    """Assert a ``before_request`` hook (``hook``, when given) returned a
    response, so the view did not run.

    :raise HookOrderError: Naming the hooks that ran.
    """
    __tracebackhide__ = True
    _check_trace(trace, "assert_short_circuited")
    if hook is not None:
        _check_hook_name(hook)
    stopped = [e.name for e in trace.events if e.attrs.get("short_circuit")]
    views = [name for name in trace.hooks() if name.startswith("view:")]
    problem = None
    if not stopped:
        problem = "no before_request hook short-circuited (returned a response)"
        raised = next(
            (e for e in trace.events if e.kind == "before_request" and "error" in e.attrs), None
        )
        if raised is not None and (hook is None or _match(raised.name, hook)):
            # abort(401) in a hook stops the request by raising, not returning.
            problem += (
                f"; {raised.name!r} raised {raised.attrs['error']} instead"
                " (abort() raises: assert on the status, or use assert_hook_order)"
            )
    elif hook is not None and not any(_match(name, hook) for name in stopped):
        problem = f"{stopped[0]!r} short-circuited, not {hook!r}"
    elif views:
        problem = f"{stopped[0]!r} short-circuited, but the view ran: {views[0]!r}"
    if problem is not None:
        lines = [problem, *_trace_line(trace), *_numbered(trace.hooks(), set())]
        lines += _dropped_hint(trace)
        if not trace.hooks() and not _records_flask(trace):
            lines.append(_HINT_NO_HOOKS)
        raise HookOrderError("\n".join(lines), trace=trace)


def assert_teardown_after_body(trace: Trace) -> None:
    """Assert each teardown hook (``teardown_request:*``,
    ``teardown_appcontext:*``) ran after the response body started, as it
    does for a response streamed with ``stream_with_context``.

    Flask runs teardown hooks when the view returns and, for such a
    response, again when the body is exhausted; the check is on each hook's
    last run. Read the whole body first (``response.data``).

    :raise HookOrderError: With the order the events ran in.
    """
    __tracebackhide__ = True
    _check_trace(trace, "assert_teardown_after_body")
    events = trace.events
    body = next((e for e in events if e.kind == "body"), None)
    last: dict[str, Event] = {}
    for event in events:
        if event.kind in _TEARDOWN_KINDS:
            last[event.name] = event
    problem = hint = None
    if body is None:
        problem = "the response body has not been iterated"
        hint = (
            "read the body (response.data, or iterate the response) before asserting;"
            " a body is recorded once the server or test client iterates it"
        )
    elif not last:
        problem = "no teardown_request or teardown_appcontext hook ran"
        hint = (
            "register one, or read the whole body first: a streamed response's"
            " teardown runs when its body is exhausted"
        )
    else:
        early = [name for name, event in last.items() if event.start_ns < body.start_ns]
        if early:
            problem = f"{early[0]!r} last ran before the body started"
            hint = (
                "Flask tears the request down when the view returns; only a response"
                " streamed with stream_with_context tears down again after its body"
            )
    if problem is not None:
        lines = [f"teardown did not run after the body: {problem}", *_trace_line(trace)]
        for event in events:
            if event.kind in {"body", "view", *_TEARDOWN_KINDS}:
                mark = ">" if event is body else " "
                lines.append(f" {mark} {event.start_ms:9.3f}ms  {_printable(event.name)}")
        lines.append(f"hint: {hint}")
        raise HookOrderError("\n".join(lines), trace=trace)


_HINT_NO_HOOKS = (
    "hint: no hooks were recorded; TraceMiddleware alone records WSGI events only,"
    " use FlaskTrace(app) (or wsgitrace.watch(app)) for hooks; an app that passes"
    " a request on to another (werkzeug's DispatcherMiddleware) records none either:"
    " the other app's trace is a separate one"
)


def _check_trace(trace: object, function: str) -> None:
    __tracebackhide__ = True  # the error is at the test's call, not in here
    if not isinstance(trace, Trace):
        # wsgitrace.testing imports this module: import it here, not at the top.
        from .testing import TraceCapture

        hint = ""
        if isinstance(trace, TraceCapture):
            hint = " (the capture's .last, or one of its .all)"
        elif isinstance(trace, list | tuple):
            # .all and .filter() return lists; one trace is asserted on at a time.
            count = f"{len(trace)} trace{'' if len(trace) == 1 else 's'}"
            hint = (
                f" (one of this list of {count}, as .all and .filter() give: [-1] is the newest)"
                if trace
                else " (an empty list, as .filter() gives when no trace matched)"
            )
        msg = f"{function}() takes a Trace{hint}, got {type(trace).__name__}"
        raise TypeError(msg)


def _check_hook_name(name: object) -> None:
    """Refuse what can never name a hook event, so an assertion cannot pass
    (or fail) for the wrong reason.
    """
    __tracebackhide__ = True
    if not isinstance(name, str):
        msg = f"a hook name is a string such as 'before_request:load_user', got {name!r}"
        raise TypeError(msg)
    kind, _, function = name.partition(":")
    if kind in HOOK_KINDS and not function:
        # Every hook event has a name after the colon: "view" alone matches
        # nothing, so assert_hook_not_run(trace, "view") would always pass.
        msg = (
            f"{name!r} names no hook: hook names are <kind>:<name>;"
            f" for any {kind} hook write '{kind}:*'"
        )
        raise ValueError(msg)
    if kind in HOOK_KINDS or "*" in kind or "?" in kind:
        return
    if kind == "signal":
        msg = (
            f"{name!r} is a signal, not a hook: trace.hooks() lists hooks and views;"
            f" find signals with trace.find(kind='signal', name={name!r})"
        )
    else:
        msg = (
            f"{name!r} names no hook: hook names are <kind>:<name>, kind one of"
            f" {', '.join(sorted(HOOK_KINDS))}"
        )
    raise ValueError(msg)


def _records_flask(trace: Trace) -> bool:
    """Whether the trace has Flask-level events (made by FlaskTrace)."""
    return any(key[0] in ("url_match", "signal") for key in trace.event_keys())


def _dropped_hint(trace: Trace) -> list[str]:
    if not trace.dropped_events:
        return []
    return [
        f"hint: {trace.dropped_events} events were dropped at the trace's max_events cap"
        f" ({trace.limits.max_events}), hooks among them: raise max_events"
    ]


def _match(name: str, pattern: str) -> bool:
    """Whether ``name`` matches ``pattern``: ``*`` any text, ``?`` one
    character, everything else itself (``[`` too: escaped as ``[[]``, not
    the start of fnmatch's character class).
    """
    if "*" in pattern or "?" in pattern:
        return fnmatch.fnmatchcase(name, pattern.replace("[", "[[]"))
    return name == pattern


def _is_subsequence(expected: list[str], ran: list[str]) -> bool:
    position = 0
    for pattern in expected:
        while position < len(ran) and not _match(ran[position], pattern):
            position += 1
        if position == len(ran):
            return False
        position += 1
    return True


def _align(
    expected: list[str], ran: list[str], match: Callable[[str, str], bool] = _match
) -> list[tuple[int | None, int | None]]:
    """A longest common subsequence alignment of the two lists (an item of
    ``ran`` matches one of ``expected`` by ``match``), as (expected index,
    ran index) pairs; ``None`` on the side an item is missing from.
    """
    n, m = len(expected), len(ran)
    lengths = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            if match(ran[j], expected[i]):
                lengths[i][j] = lengths[i + 1][j + 1] + 1
            else:
                lengths[i][j] = max(lengths[i + 1][j], lengths[i][j + 1])
    pairs: list[tuple[int | None, int | None]] = []
    i = j = 0
    while i < n and j < m:
        if match(ran[j], expected[i]):
            pairs.append((i, j))
            i += 1
            j += 1
        elif lengths[i + 1][j] >= lengths[i][j + 1]:
            pairs.append((i, None))
            i += 1
        else:
            pairs.append((None, j))
            j += 1
    pairs.extend((k, None) for k in range(i, n))
    pairs.extend((None, k) for k in range(j, m))
    return pairs


def _order_message(trace: Trace, ran: list[str], expected: list[str], exact: bool) -> str:
    pairs = _align(expected, ran)
    if exact:
        first = next(
            (
                k
                for k in range(max(len(ran), len(expected)))
                if k >= len(ran) or k >= len(expected) or not _match(ran[k], expected[k])
            ),
            0,
        )
        want = repr(expected[first]) if first < len(expected) else "nothing more"
        got = repr(ran[first]) if first < len(ran) else "nothing more"
        head = [
            f"hook order differs from the expected one at position {first}",
            f"  expected: {_printable(want)}",
            f"  ran:      {_printable(got)}",
        ]
    else:
        # Walk as _is_subsequence does, to the first entry not found.
        missing, after = 0, -1
        for missing, pattern in enumerate(expected):  # noqa: B007 - used after the loop
            found = next((k for k in range(after + 1, len(ran)) if _match(ran[k], pattern)), None)
            if found is None:
                break
            after = found
        anywhere = [k for k, name in enumerate(ran) if _match(name, expected[missing])]
        what = f"expected[{missing}] {expected[missing]!r} did not run"
        if after >= 0:
            what += f" after {ran[after]!r} (position {after}): "
            earlier = f"it ran earlier, at position {anywhere[0]}" if anywhere else ""
            what += earlier or "it did not run at all"
        else:
            what += " at all"
        head = [
            "hooks did not run in the expected order (other hooks may run between them)",
            f"  {_printable(what)}",
        ]
    lines = [*head, *_trace_line(trace), "", "   exp  ran"]
    short = _short_circuits(trace)
    for e, r in pairs:
        e_col = f"{e:>6}" if e is not None else "     ."
        r_col = f"{r:>5}" if r is not None else "    ."
        if e is not None and r is not None:
            name, sign = ran[r], " "
        elif e is not None:
            name, sign = expected[e], "-"
        else:
            assert r is not None
            name, sign = ran[r], "+" if exact else " "
        note = "  (short-circuit)" if r is not None and ran[r] in short else ""
        lines.append(f"{e_col}{r_col}  {sign} {_printable(name)}{note}")
    legend = "- expected, did not run there"
    if exact:
        legend += "; + ran, not expected"
    lines += [f"   ({legend})", *_hints(trace, ran, expected, pairs)]
    return "\n".join(lines)


def _short_circuits(trace: Trace) -> set[str]:
    return {e.name for e in trace.events if e.attrs.get("short_circuit")}


def _hints(
    trace: Trace,
    ran: list[str],
    expected: list[str],
    pairs: list[tuple[int | None, int | None]],
) -> list[str]:
    hints = []
    missing = [expected[e] for e, r in pairs if e is not None and r is None]
    for name in missing:
        kind, _, short = name.partition(":")
        similar = [
            other
            for other in ran
            if other.partition(":")[0] == kind
            and (other.endswith("." + short) or short.endswith("." + other.partition(":")[2]))
        ]
        if similar and similar[0] != name:
            hints.append(
                f"hint: did you mean {similar[0]!r}? Hooks of a blueprint are named"
                " <kind>:<blueprint>.<function>"
            )
    for name in sorted(_short_circuits(trace)):
        hints.append(
            f"hint: {name} returned a response (short-circuit), so the view and the"
            " before_request hooks after it did not run"
        )
    if trace.error:
        hints.append(
            f"hint: the request raised {trace.error.get('type')}"
            f" ({trace.error.get('where')}): {trace.error.get('message')}"
        )
    if not trace.finished and any(n.startswith("teardown") for n in missing):
        hints.append(
            "hint: the response is still open; a streamed response tears down when its"
            " body is exhausted: read response.data first"
        )
    hints += _dropped_hint(trace)
    if not ran and not _records_flask(trace):
        hints.append(_HINT_NO_HOOKS)
    return [_printable(h) for h in hints]


def _describe(trace: Trace) -> str:
    query = f"?{trace.query}" if trace.query else ""
    return _printable(f"{trace.method} {trace.path}{query} -> {trace.status or 'no response'}")


def _trace_line(trace: Trace) -> list[str]:
    ran = len(trace.hooks())
    hooks = f"{ran} hook{'s' if ran != 1 else ''} ran"
    dropped = trace.dropped_events
    if dropped:
        hooks += f", {dropped} event{'s' if dropped != 1 else ''} dropped"
    return [f"  trace:    {_describe(trace)} ({hooks}, id {trace.id}, {trace.state})"]


def _numbered(names: list[str], marked: set[int]) -> list[str]:
    return [
        f" {'>' if i in marked else ' '} {i:>3}  {_printable(name)}" for i, name in enumerate(names)
    ]


def _printable(text: str) -> str:
    """``text`` with control and invisible formatting characters escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
