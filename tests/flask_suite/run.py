"""Run Flask's own test suite twice, plain and with every app traced, and
report each test whose outcome differs: the transparency contract checked
against the tests Flask's maintainers wrote.

Usage (from the project root, in the dev virtualenv)::

    python tests/flask_suite/run.py [--keep DIR] [pytest args ...]

It downloads the source distribution of the installed Flask version (from
the package index pip is configured with), runs its ``tests/`` with
``-p trace_all_apps`` (see ``trace_all_apps.py``) and without, and compares
the JUnit XML reports test by test. Exit status 1 when a test passed plain
but not traced, 0 otherwise. The test suite runs it
(``tests/test_flask.py``), so it needs the index; the two runs take a few
seconds.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def fetch_tests(workdir: Path) -> Path:
    """Download the installed Flask's sdist and extract its ``tests/``."""
    version = importlib.metadata.version("flask")
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"),
            *("--no-binary", ":all:", f"flask=={version}", "-d", str(workdir)),
        ],
        check=True,
    )
    (sdist,) = workdir.glob("flask-*.tar.gz")
    with tarfile.open(sdist) as archive:
        archive.extractall(workdir, filter="data")
    source = workdir / f"flask-{version}"
    conftest = source / "tests" / "conftest.py"
    import _pytest.monkeypatch

    if hasattr(_pytest.monkeypatch, "notset"):
        return source  # the name Flask 3.1's tests use is still there
    # Newer pytest renamed _pytest.monkeypatch.notset to NOTSET.
    text = conftest.read_text(encoding="utf-8")
    conftest.write_text(text.replace("monkeypatch.notset", "monkeypatch.NOTSET"))
    for path in (source / "tests").glob("test_*.py"):
        text = path.read_text(encoding="utf-8")
        old = "from _pytest.monkeypatch import notset"
        if old in text:
            path.write_text(text.replace(old, "from _pytest.monkeypatch import NOTSET as notset"))
    return source


def run_suite(source: Path, report: Path, *, traced: bool, extra: list[str]) -> None:
    """Run Flask's tests, writing a JUnit XML report (failures are expected)."""
    env = dict(os.environ)
    paths = [str(ROOT), str(HERE), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env = {k: v for k, v in env.items() if not k.startswith("WSGITRACE_")}
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    args += ["-p", "trace_all_apps"] if traced else []
    args += [f"--junitxml={report}", "tests", *extra]
    print("$", " ".join(args), flush=True)
    subprocess.run(args, cwd=source, env=env, check=False)


def outcomes(report: Path) -> dict[str, str]:
    """Each test's outcome in a JUnit XML report."""
    result = {}
    for case in ET.parse(report).iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = child.tag
        result[f"{case.get('classname')}::{case.get('name')}"] = outcome
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=Path, help="work in DIR and keep it")
    args, extra = parser.parse_known_args(argv)
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="wsgitrace-flask-suite-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        source = fetch_tests(workdir)
        plain, traced = workdir / "plain.xml", workdir / "traced.xml"
        run_suite(source, plain, traced=False, extra=extra)
        run_suite(source, traced, traced=True, extra=extra)
        before, after = outcomes(plain), outcomes(traced)
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"plain:  {dict(Counter(before.values()))}")
    print(f"traced: {dict(Counter(after.values()))}")
    broken = 0
    for name in sorted(before.keys() | after.keys()):
        if before.get(name) != after.get(name):
            print(f"DIFFERS {name}: {before.get(name)} plain, {after.get(name)} traced")
            broken += before.get(name) == "passed"
    print("no test differs" if before == after else f"{broken} passed plain only")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
