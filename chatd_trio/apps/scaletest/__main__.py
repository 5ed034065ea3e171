"""`python -m chatd_trio.apps.scaletest worker`: a replica process of a PostgreSQL run;
with other arguments, the `scaletest` command itself."""

import argparse
import logging
import sys

import trio

from chatd_trio.apps.channel import WORKER, replica_process_settings
from chatd_trio.apps.scaletest.command import add_scaletest_command, run_scaletest_command
from chatd_trio.apps.scaletest.worker import worker_main

if sys.argv[1:] == [WORKER]:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    replica_process_settings()
    trio.run(worker_main)
else:
    parser = argparse.ArgumentParser(prog="python -m chatd_trio.apps.scaletest")
    add_scaletest_command(parser.add_subparsers(dest="command", required=True))
    sys.exit(run_scaletest_command(parser.parse_args(["scaletest", *sys.argv[1:]])))
