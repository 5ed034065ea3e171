"""The `chatd-trio` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `chatd-trio` console script."""
    parser = argparse.ArgumentParser(prog="chatd-trio", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("diagrams", help="render the statechart diagrams into docs/statecharts/")
    args = parser.parse_args(argv)
    if args.command == "diagrams":
        from statecharts.render import main as render_main

        return render_main([])
    return 2


if __name__ == "__main__":
    sys.exit(main())
