"""``wsgitrace run``'s option flags, one per tracing option.

Made from :data:`~wsgitrace.config.OPTION_SPECS`, so a new option gets its
flag (and its README row, checked by ``tests/test_config.py``) without being
spelt out here. A flag is a keyword, so it beats the app's config and the
environment, as keywords do. Left out:

* ``token``: the token never comes only from argv, which other users of the
  machine can read (``--token-file`` or ``WSGITRACE_TOKEN``);
* ``enabled`` and ``endpoint``: ``run`` exists to trace and to serve the
  endpoint;
* ``sample`` as a callable: a flag takes a rate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from .config import (
    OPTION_SPECS,
    _bool,
    _count,
    _networks,
    _paths,
    _positive_int,
    _prefix,
    _sample,
    _str_list,
)

#: Options with no ``run`` flag (see the module docstring).
NO_FLAG = frozenset({"token", "enabled", "endpoint"})

_METAVARS: dict[Callable[[Any], Any], str] = {
    _positive_int: "N",
    _count: "N",
    _sample: "RATE",
    _paths: "/A,/B",
    _str_list: "A,B",
    _networks: "CIDR,…",
    _prefix: "PATH",
}
_HELP = {"sample": "Rate in [0, 1] of requests traced."}


def flag_name(option: str) -> str:
    """The ``run`` flag of an option: ``max_traces`` → ``--max-traces``."""
    return "--" + option.replace("_", "-")


def run_flags() -> dict[str, str]:
    """Every option that has a ``run`` flag, with the flag as the README shows it."""
    flags = {}
    for name, spec in OPTION_SPECS.items():
        if name in NO_FLAG:
            continue
        flag = flag_name(name)
        if spec.parse is _bool:
            flag = f"{flag}/--no-{flag[2:]}"
        flags[name] = flag
    return flags


class _OptionValue(click.ParamType):  # type: ignore[type-arg]
    """A value checked by the option's own parser, so a bad one is a usage
    error naming the flag.
    """

    def __init__(self, option: str) -> None:
        self.option = option
        self.name = option.upper()

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        """Check ``value`` with the option's parser and return it as typed.

        The text, not the parsed value, is what the keyword gets: the
        keyword is parsed again, and some parsers do not take their own
        results (``allow``'s networks), while others turn a value into
        ``None`` (``--store ''``), which would read as "not given" and let
        the environment win.
        """
        try:
            OPTION_SPECS[self.option].parse(value)
        except (TypeError, ValueError) as exc:
            self.fail(str(exc), param, ctx)
        return value


def with_run_flags(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add a flag per option to the ``run`` command ``func``; each flag not
    given arrives as ``None``.
    """
    for name, flag in reversed(list(run_flags().items())):
        spec = OPTION_SPECS[name]
        text = _HELP.get(name, spec.help)
        if spec.parse is _bool:
            option = click.option(flag, name, default=None, help=text)
        else:
            metavar = _METAVARS.get(
                spec.parse, "FILE" if name in ("token_file", "store") else "TEXT"
            )
            option = click.option(
                flag, name, type=_OptionValue(name), default=None, metavar=metavar, help=text
            )
        func = option(func)
    return func


def given_options(values: dict[str, Any]) -> dict[str, Any]:
    """The tracing options among a command's parameters that were given."""
    return {
        name: value for name, value in values.items() if name in OPTION_SPECS and value is not None
    }
