"""The state of a Flask request, as kept on its trace.

::

    _record_url_match(tracer, trace)     # endpoint, rule, view args or the routing error
    _snapshot_session(tracer, trace)     # the session's keys, at teardown
    _snapshot_g(tracer, trace)           # g's keys and safe reprs, at teardown
    _snapshot_callers_g(tracer, trace, ctx)  # the same, of a caller's app context
    _g_changes(before, after)            # keys of g a hook added, changed or removed
    _bounded_changes(changes, limit)     # those names capped, when over MAX_G_NAMES or limit
    _scrubber(redactor)                  # cuts the request's secrets out of free text

Flask's contexts are read from its context variables, not through the
``request``/``g`` proxies; ``repr()``, which runs the app's code, is taken
once, cut, and never fails (:func:`wsgitrace._limits.safe_repr`), and only
on the request's own thread.
"""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from flask.globals import _cv_app, _cv_request

from ._internal import report_internal_error
from ._limits import safe_repr
from .middleware import _wsgi_path
from .redact import REDACTED, Redactor, scrubber
from .trace import TRUNCATION_MARKER, EventKey, HeaderFlattener, HeaderLayout, Trace, cut

if TYPE_CHECKING:
    from ._flask_recorder import _AppTracer

_MISSING = object()
# What a g without a __dict__ (a custom app_ctx_globals_class) is read as;
# never written to.
_NO_G: dict[str, Any] = {}
# Bound once (see wsgitrace.context): Flask's request and app context variables.
_get_request_ctx = _cv_request.get
_get_app_ctx = _cv_app.get
_get_ident = threading.get_ident

_URL_MATCH_KEY: EventKey = ("url_match", "url_match", None)

#: The secret view arguments of a request as its URL matched them, by its
#: request context, for as long as that lives: a url_value_preprocessor may
#: pop them (``g.token = values.pop("token")``), and they must still be cut
#: out of its error and log messages. Only requests that have any.
_matched_secrets: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def _secret_view_args(ctx: Any, is_secret: Callable[[str], bool]) -> dict[str, Any]:
    """The secret view arguments of the request of ``ctx``, as its URL
    matched them (what its path holds; see :data:`_matched_secrets`), and
    any it has now that it did not have then.
    """
    found = {n: v for n, v in (ctx.request.view_args or {}).items() if is_secret(str(n))}
    matched = _matched_secrets.get(ctx) if _matched_secrets else None
    return {**found, **matched} if matched else found


def _record_url_match(tracer: _AppTracer, trace: Trace) -> None:
    """Record the URL match (endpoint, rule, view args) or the routing error."""
    try:
        ctx = _get_request_ctx(None)
        if ctx is None:
            return
        req = ctx.request
        clock = tracer.clock
        now = clock()
        error = req.routing_exception
        if error is not None:
            attrs: dict[str, Any] = {"error": type(error).__name__}
            code = getattr(error, "code", None)
            if code is not None:
                attrs["code"] = code
            new_url = getattr(error, "new_url", None)
            if new_url:
                # Werkzeug's redirect carries the request's query string on:
                # redacted as the Location header that repeats it is.
                url = tracer.redactor.url(str(new_url))
                redact = _redirect_redaction(tracer, ctx, str(new_url))
                if redact is not None:
                    url = redact(url)
                    if not _matched_before(trace):  # else a request dispatched inside it
                        trace.path = redact(trace.path)
                        trace._flatten_headers = _LocationRedactingFlattener(
                            tracer.middleware._flatten_response_headers, redact
                        )
                attrs["redirect"] = cut(url, tracer.max_string)
            trace.record("url_match", "url_match", now, now, attrs)
            return
        rule = req.url_rule
        for key in trace._keys:
            if key[0] != "url_match":
                continue
            # Not the first: a request the app dispatches itself inside this
            # one (in a test_request_context, or a copy of the environ with
            # another path). Its URL is not this request's: only noted.
            limit = tracer.max_string
            attrs = {} if rule is None else {"endpoint": _view_arg(rule.endpoint, limit)}
            if rule is not None:
                attrs["rule"] = cut(rule.rule, limit)
            trace.record("url_match", "url_match", now, now, attrs)
            return
        if rule is not None:
            endpoint = rule.endpoint
            trace.endpoint = endpoint if type(endpoint) is str else str(endpoint)
            trace.rule = rule.rule
        if req.view_args:
            limit = tracer.max_string
            is_secret = tracer.redactor.is_secret
            view_args: dict[str, Any] = {}
            secrets: list[str] = []
            for name, value in req.view_args.items():
                if is_secret(name):
                    view_args[name] = REDACTED
                    secrets.append(name)
                else:
                    view_args[name] = _view_arg(value, limit)
            if secrets:
                # /reset/<token>: the value is in the path too.
                trace.path = _redact_secret_args(trace.path, rule, req.view_args, secrets)
                _matched_secrets[ctx] = {name: req.view_args[name] for name in secrets}
            trace.view_args = view_args
        trace.record_key(_URL_MATCH_KEY, now, now)
    except Exception:
        report_internal_error("flask.url_match", trace)


def _matched_before(trace: Trace) -> bool:
    """Whether the trace has a URL match already, so that this one is of a
    request the app dispatches inside its own (the match that succeeds runs
    the same check inline, on every request's path).
    """
    return any(key[0] == "url_match" for key in trace._keys)


def _redirect_redaction(tracer: _AppTracer, ctx: Any, new_url: str) -> Callable[[str], str] | None:
    """For a routing redirect (``/reset/<token>/`` asked without its
    slash), a function that redacts the view arguments under secret-looking
    names of the rule it leads to from the request's path or the redirect's
    URL, or ``None`` when there are none. The request matched no rule, so
    they are found by matching the redirect's path.
    """
    adapter = ctx.url_adapter
    if adapter is None:
        return None
    path = unquote(urlsplit(new_url).path)
    root = adapter.script_name.rstrip("/")
    if root and path.startswith(root):
        path = path[len(root) :]
    try:
        rule, args = adapter.match(path, ctx.request.method, return_rule=True)
    except Exception:  # another redirect, a 404 or a 405: nothing to redact
        return None
    is_secret = tracer.redactor.is_secret
    secrets = [name for name in args if is_secret(name)]
    if not secrets:
        return None
    # Kept until the trace's headers are read: their text, not the app's objects.
    args = {name: str(args[name]) for name in secrets}
    root_segments = root.count("/")

    def redact_path(path: str, skip: int) -> str:
        # The rule's segments are the path's after the script root (a URL's
        # path has it, the trace's does not), with the redirect's slash.
        slash = rule.rule.endswith("/") and not path.endswith(("/", TRUNCATION_MARKER))
        segments = (path + "/" if slash else path).split("/")
        head = "/".join(segments[: skip + 1])
        tail = "/" + "/".join(segments[skip + 1 :])
        tail = _redact_secret_args(tail, rule, args, secrets)
        return head + (tail[:-1] if slash else tail)

    def redact(text: str) -> str:
        parts = urlsplit(text)
        if parts.scheme or parts.netloc:
            path = redact_path(parts.path, root_segments)
            return urlunsplit(parts._replace(path=path))
        return redact_path(text, 0)

    return redact


class _LocationRedactingFlattener:
    """Lays out a redirect's response headers as the middleware does, with
    the secret view arguments also redacted from its ``Location``.
    """

    __slots__ = ("_flatten", "_redact")

    def __init__(self, flatten: HeaderFlattener, redact: Callable[[str], str]) -> None:
        self._flatten = flatten
        self._redact = redact

    def __call__(self, headers: list[tuple[str, str]]) -> HeaderLayout:
        layout = self._flatten(headers)
        flat = list(layout.headers)
        for index in range(0, len(flat) - 1, 2):
            if flat[index].lower() == "location":
                flat[index + 1] = self._redact(flat[index + 1])
        return layout._replace(headers=tuple(flat))


def redact_request_path(message: str, is_secret: Callable[[str], bool]) -> str:
    """``message`` with the current request's path redacted as the trace's
    is, when a view argument under a secret-looking name is in it: Flask's
    own ``Exception on /reset/<token> [GET]`` log record repeats the path.
    """
    ctx = _get_request_ctx(None)
    if ctx is None:
        return message
    req = ctx.request
    if not req.view_args and not _matched_secrets:
        return message
    secrets = _secret_view_args(ctx, is_secret)
    path = req.path
    if not secrets or path not in message:
        return message
    return message.replace(path, _redact_secret_args(path, req.url_rule, secrets, list(secrets)))


def _redact_secret_args(path: str, rule: Any, view_args: dict[str, Any], names: list[str]) -> str:
    """``path`` with the view arguments ``names`` (secret-looking) redacted:
    where ``rule`` puts them, and wherever their values still show.
    """
    if rule is not None:
        path = _redact_rule_segments(path, rule, names)
    for name in names:
        path = _redact_path_value(path, view_args[name])
    return path


#: A variable of a URL rule, ``<name>`` or ``<converter(args):name>``.
_VARIABLE_RE = re.compile(r"<(?:[^<>]*:)?([A-Za-z_][A-Za-z0-9_]*)>")


def _redact_rule_segments(path: str, rule: Any, names: list[str]) -> str:
    """``path`` with the segments where ``rule`` puts a variable of
    ``names`` replaced by the redaction marker (static text around the
    variable in its segment, ``<token>.json``, is kept).

    Found by position, so whatever a converter accepted there goes, not
    only the text of its value: ``0042`` for ``<int:pin_key>`` 42, an
    upper-case UUID, bytes that are not UTF-8. A rule with more than one
    variable spanning segments (``path``), or a path of another shape, is
    left to :func:`_redact_path_value`.
    """
    marker = ""
    if path.endswith(TRUNCATION_MARKER):
        path, marker = path[: -len(TRUNCATION_MARKER)], TRUNCATION_MARKER
    pattern = rule.rule.split("/")
    segments = path.split("/")
    converters = getattr(rule, "_converters", {})
    spanning = [
        index
        for index, part in enumerate(pattern)
        if any(
            not getattr(converters.get(v), "part_isolating", True)
            for v in _VARIABLE_RE.findall(part)
        )
    ]
    # Each of the rule's segments: the path segments it matched, [start, end).
    spans: list[tuple[int, int]] = []
    if not spanning:
        if len(segments) != len(pattern) and not marker:
            return path + marker
        spans = [(index, index + 1) for index in range(len(pattern))]
    elif len(spanning) == 1:
        first = spanning[0]
        spans = [(index, index + 1) for index in range(first)]
        if marker:
            # Cut: the end of the path is no longer where the rule's is.
            spans.append((first, len(segments)))
        else:
            after = len(pattern) - first - 1
            if len(segments) - after <= first:
                return path + marker
            spans.append((first, len(segments) - after))
            spans.extend(
                (len(segments) - after + i, len(segments) - after + i + 1) for i in range(after)
            )
    else:
        return path + marker
    out: list[str] = []
    done = 0
    for part, (start, end) in zip(pattern, spans, strict=False):
        if start >= len(segments):
            break
        out.extend(segments[done:start])
        done = min(end, len(segments))
        held = "/".join(segments[start:done])
        found = _VARIABLE_RE.findall(part)
        if not any(name in names for name in found):
            out.append(held)
            continue
        head, _, tail = part.partition("<")
        tail = tail.partition(">")[2]
        if len(found) == 1 and held.startswith(head) and held.endswith(tail):
            held = head + REDACTED + tail if len(head) + len(tail) <= len(held) else REDACTED
        else:
            held = REDACTED
        out.append(held)
    out.extend(segments[done:])
    return "/".join(out) + marker


def _redact_path_value(path: str, value: Any) -> str:
    """``path`` with the path segments that hold ``value`` (a view argument
    under a secret-looking name) replaced by the redaction marker.

    The path is the request's bytes read as latin-1 (PEP 3333) and may still
    hold percent-escapes; the value is what the URL converter made of them.
    A ``path`` converter's value spans segments, and a path cut at
    ``max_string`` may end in the first part of the value: both are redacted
    too.
    """
    text = str(value)
    if not text:
        return path
    marker = ""
    if path.endswith(TRUNCATION_MARKER):
        path, marker = path[: -len(TRUNCATION_MARKER)], TRUNCATION_MARKER
    forms = {text, _wsgi_path(text), quote(text, safe="")}
    for form in forms:
        if "/" in form:
            # /files/<path:secret>: whole segments, or anywhere when long.
            pattern = re.escape(form)
            if len(text) < 6:
                pattern = f"(?<=/){pattern}(?=/|\\Z)"
            path = re.sub(pattern, lambda _: REDACTED, path)
    segments = path.split("/")
    for index, segment in enumerate(segments):
        if segment and (segment in forms or unquote(segment) == text):
            segments[index] = REDACTED
        elif len(text) >= 6:
            # A value inside a segment (/reset/<token>.json): cut it out.
            for form in forms:
                segment = segment.replace(form, REDACTED)
            segments[index] = segment
    path = "/".join(segments)
    if marker:
        path = _redact_cut_value(path, forms, len(text) >= 6)
    return path + marker


def _redact_cut_value(path: str, forms: set[str], inside: bool) -> str:
    """``path``, cut at ``max_string``, with its end redacted when it is the
    start of one of ``forms``: at the start of a segment, or anywhere in one
    when ``inside`` (a value long enough to be looked for inside segments).
    """
    longest = 0
    for form in forms:
        for size in range(min(len(form) - 1, len(path)), longest, -1):
            head = path[: len(path) - size]
            if path.endswith(form[:size]) and (inside or head.endswith("/")):
                longest = size
                break
    return path[: len(path) - longest] + REDACTED if longest else path


def _snapshot_session(tracer: _AppTracer, trace: Trace) -> None:
    """Keep the session's keys (and, when enabled, its values, redacted)
    without marking the session accessed. Only on the request's own thread
    (see :func:`_snapshot_g`).
    """
    try:
        ctx = _get_request_ctx(None)
        if ctx is None or _get_ident() != trace.thread:
            return
        session = _session_dict(ctx)
        if not session:
            return
        keys = [str(k) for k in dict.keys(session)]
        trace.session_keys = [cut(k, tracer.max_string) for k in keys[:64]]
        if tracer.session_values:
            is_secret = tracer.redactor.is_secret
            values = {}
            # By position: a key that is not a string (session[7] = ...) is
            # not found under its str().
            for key, value in zip(keys[:64], dict.values(session), strict=False):
                values[key] = REDACTED if is_secret(key) else safe_repr(value, tracer.max_string)
            trace.record("session", "session", tracer.clock(), tracer.clock(), {"values": values})
    except Exception:
        report_internal_error("flask.session", trace)


def _session_dict(ctx: Any) -> dict[Any, Any] | None:
    """The request's session, read without marking it accessed (Flask 3.1
    keeps it in ``_session`` behind a property that does; Flask 3.0 in a
    plain ``session`` attribute), when it is a dict, as Flask's are. Another
    mapping (a server-side session's class) is not read: its methods are the
    app's code, and may load or mark it.
    """
    session = getattr(ctx, "_session", None)
    if session is None:
        session = vars(ctx).get("session")
    return session if isinstance(session, dict) else None


def _scrubber(
    redactor: Redactor, environ_secrets: set[str] | None = None
) -> Callable[[str], str] | None:
    """A function that replaces, in free text (an error's message and
    traceback, a log message), the values of the current request that its
    trace redacts: secret view arguments, query values, headers (and the
    credentials inside them), fields of a form the app parsed, and session
    values. ``None`` when there are none (or they could not be read, which
    is reported).

    :param environ_secrets: The request's :meth:`Redactor.request_secrets`,
        when the caller already has them (they do not change during a
        request; the form and the session may).
    """
    try:
        return _make_scrubber(redactor, environ_secrets)
    except Exception:
        report_internal_error("flask.scrub")
        return None


def _request_environ_secrets(redactor: Redactor) -> set[str] | None:
    """The current request's :meth:`Redactor.request_secrets`, or ``None``
    outside a request (or when they could not be read, which is reported).
    """
    try:
        ctx = _get_request_ctx(None)
        return None if ctx is None else redactor.request_secrets(ctx.request.environ)
    except Exception:
        report_internal_error("flask.scrub")
        return None


def _make_scrubber(
    redactor: Redactor, environ_secrets: set[str] | None
) -> Callable[[str], str] | None:
    ctx = _get_request_ctx(None)
    if ctx is None:
        return None
    is_secret = redactor.is_secret
    req = ctx.request
    if environ_secrets is None:
        found = redactor.request_secrets(req.environ)
    else:
        found = set(environ_secrets)
    for name, value in (req.view_args or {}).items():
        if is_secret(str(name)):
            found.add(str(value))
    # As the URL matched them, also: a url_value_preprocessor may have
    # popped or replaced them since.
    matched = _matched_secrets.get(ctx) if _matched_secrets else None
    if matched:
        found.update(str(value) for value in matched.values())
    # Only a form the app parsed: the tracer never reads wsgi.input.
    form = vars(req).get("form")
    if form is not None:
        found.update(str(v) for k, v in form.items(multi=True) if is_secret(str(k)))
    session = _session_dict(ctx)
    if session:
        found.update(str(v) for k, v in dict.items(session) if is_secret(str(k)))
    return scrubber(found)


def _snapshot_g(tracer: _AppTracer, trace: Trace) -> None:
    """Keep ``g``'s keys with safe, cut reprs of its values.

    Only on the request's own thread: another thread whose context is a
    copy of the request's (a job the view started) tears down contexts of
    its own, maybe after the trace finished.
    """
    try:
        app_ctx = _get_app_ctx(None)
        if app_ctx is None or _get_ident() != trace.thread:
            return
        g_dict = getattr(app_ctx.g, "__dict__", _NO_G)
        if not g_dict:
            return
        is_secret = tracer.redactor.is_secret
        limit = tracer.max_string
        flat: list[str] = []
        for key, value in list(g_dict.items())[:64]:
            name = key if type(key) is str else str(key)
            flat.append(name if len(name) <= limit else cut(name, limit))
            flat.append(REDACTED if is_secret(name) else safe_repr(value, limit))
        trace._g = tuple(flat)
    except Exception:
        report_internal_error("flask.g", trace)


def _snapshot_callers_g(tracer: _AppTracer, trace: Trace, ctx: Any) -> None:
    """At the request's teardown, keep ``g`` if the app context is not one
    the request pushed (whose teardown keeps it) but the caller's (``with
    app.app_context():`` around a test's requests), which is not torn down
    with the request. Called when the app context is not a traced one.
    """
    try:
        if ctx._cv_tokens[-1][1] is None:  # (token, app context it pushed)
            _snapshot_g(tracer, trace)
    except Exception:
        report_internal_error("flask.g", trace)


def _view_arg(value: Any, limit: int) -> Any:
    """A view argument as kept on the trace: numbers as they are, text cut,
    anything else (a converter's object, which may hold the app or a
    database session) as its cut repr, taken now, inside the request.
    """
    if value is None or type(value) in (int, float, bool):
        return value
    if type(value) is str:
        return cut(value, limit)
    return safe_repr(value, limit)


def _g_changes(
    before: dict[str, Any] | None, after: dict[str, Any] | None
) -> dict[str, Any] | None:
    """Keys of ``g`` added, changed (by identity) or removed by a hook."""
    if not after:
        return {"g_removed": sorted(before)} if before else None
    if before is None:
        return {"g_added": list(after)}
    if len(before) == len(after):
        for key, value in before.items():
            if after.get(key, _MISSING) is not value:
                break
        else:
            return None
    changes: dict[str, Any] = {}
    added = [k for k in after if k not in before]
    changed = [k for k in after if k in before and after[k] is not before[k]]
    removed = [k for k in before if k not in after]
    if added:
        changes["g_added"] = added
    if changed:
        changes["g_changed"] = changed
    if removed:
        changes["g_removed"] = removed
    return changes or None


#: Names of ``g`` keys kept in each list of a hook's changes (``g_added``,
#: ``g_changed``, ``g_removed``); the rest are counted (``g_added_more``, ...).
MAX_G_NAMES = 32


def _bounded_changes(changes: dict[str, Any], max_string: int) -> dict[str, Any] | None:
    """:func:`_g_changes`'s ``changes`` with each list cut to
    :data:`MAX_G_NAMES` names, each text cut to ``max_string``, and the count
    of the rest as ``<list>_more``; ``None`` when none is over these caps.
    """
    if not any(
        type(value) is list
        and (
            len(value) > MAX_G_NAMES
            or any(isinstance(name, str) and len(name) > max_string for name in value)
        )
        for value in changes.values()
    ):
        return None
    bounded: dict[str, Any] = {}
    for key, value in changes.items():
        if type(value) is not list:
            bounded[key] = value
            continue
        bounded[key] = [
            cut(name, max_string) if isinstance(name, str) else name for name in value[:MAX_G_NAMES]
        ]
        if len(value) > MAX_G_NAMES:
            bounded[f"{key}_more"] = len(value) - MAX_G_NAMES
    return bounded
