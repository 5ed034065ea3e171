"""The `chatd-trio` command line: demo, scaletest, agent, diagrams."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `chatd-trio` console script."""
    from chatd_trio.agent.server import add_agent_command, run_agent_command
    from chatd_trio.apps.demo import add_demo_command, run_demo_command
    from chatd_trio.apps.scaletest import add_scaletest_command, run_scaletest_command
    from statecharts.render import add_arguments as add_diagrams_arguments
    from statecharts.render import run as run_diagrams

    parser = argparse.ArgumentParser(prog="chatd-trio", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    diagrams = sub.add_parser(
        "diagrams",
        help="render the statechart diagrams (Graphviz `dot` draws the SVGs)",
        description="Render docs/statecharts.md and docs/statecharts/ from the chart classes.",
    )
    add_diagrams_arguments(diagrams)
    add_agent_command(sub)
    add_demo_command(sub)
    add_scaletest_command(sub)
    args = parser.parse_args(argv)
    if args.command == "diagrams":
        return run_diagrams(args)
    if args.command == "agent":
        return run_agent_command(args)
    if args.command == "demo":
        return run_demo_command(args)
    if args.command == "scaletest":
        return run_scaletest_command(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
