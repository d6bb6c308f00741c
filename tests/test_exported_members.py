"""The public surface of ``wsgitrace``: a sorted ``__all__`` holding every
public name, and an import that stays cheap for a plain WSGI app.
"""

from __future__ import annotations
import __future__

import importlib.metadata
import json
import subprocess
import sys
import types

import wsgitrace


def _isort_key(name: str) -> tuple[int, str]:
    """CONSTANTS, then Classes, then functions (ruff's RUF022 order)."""
    if name.isupper():
        return (0, name)
    if name[0].isupper():
        return (1, name)
    return (2, name)


def test_every_public_name_is_exported() -> None:
    public = {
        name
        for name, value in vars(wsgitrace).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and value is not __future__.annotations
    }
    assert public == set(wsgitrace.__all__)


def test_all_is_sorted_and_resolvable() -> None:
    assert wsgitrace.__all__ == sorted(wsgitrace.__all__, key=_isort_key)
    assert len(set(wsgitrace.__all__)) == len(wsgitrace.__all__)
    for name in wsgitrace.__all__:
        assert getattr(wsgitrace, name) is not None


def test_version_matches_the_distribution() -> None:
    assert wsgitrace.__version__ == importlib.metadata.version("wsgitrace")


def test_import_does_not_load_flask_rich_or_pytest() -> None:
    code = (
        "import json, sys\n"
        "import wsgitrace\n"
        "heavy = ('flask', 'rich', 'pytest', 'click', 'blinker', 'sqlite3', 'opentelemetry')\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in heavy)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(result.stdout) == []
