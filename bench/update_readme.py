"""Write saved bench results into README.md without running the benches again.

Usage::

    python bench/inprocess.py --json inprocess.json
    python bench/serve.py --json serve.json
    python bench/update_readme.py [--inprocess inprocess.json] [--serve serve.json]
                                  [README.md]

Each given result replaces its own sub-block inside the README's
``<!-- bench:start -->`` … ``<!-- bench:end -->`` block (see
``_report.replace_readme_block``); the other sub-block is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import inprocess
import serve
from _report import replace_readme_block

DEFAULT_README = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md"
)


def _load(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python bench/update_readme.py",
        description="Write saved bench results (--json files) into README.md.",
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("readme", nargs="?", default=DEFAULT_README)
    parser.add_argument("--inprocess", metavar="JSON", help="output of inprocess.py --json")
    parser.add_argument("--serve", metavar="JSON", help="output of serve.py --json")
    args = parser.parse_args(argv)
    if not args.inprocess and not args.serve:
        parser.error("give --inprocess and/or --serve")
    with open(args.readme, encoding="utf-8") as f:
        readme = f.read()
    if args.inprocess:
        body = "#### In-process\n\n" + inprocess.render(_load(args.inprocess), markdown=True)
        readme = replace_readme_block(readme, "inprocess", body)
    if args.serve:
        body = "#### Served (gunicorn + wrk)\n\n" + serve.render(_load(args.serve), markdown=True)
        readme = replace_readme_block(readme, "serve", body)
    with open(args.readme, "w", encoding="utf-8") as f:
        f.write(readme)
    print(f"updated {args.readme}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
