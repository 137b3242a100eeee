"""The ``kernelfleet`` command: one entry point, a sub-command per activity.

Each sub-command lives in its own module and registers itself through a small
``add_parser(subparsers)`` function, so this file stays a table of contents.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .errors import KernelfleetError


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command registered."""
    from . import audit, bootstrap, evictions_cmd, ops, up, warm_cmd
    from .kernelspecs import commands as kernelspec_commands

    parser = argparse.ArgumentParser(
        prog="kernelfleet",
        description="Remote kernels for JupyterHub on CPU and GPU pools.",
    )
    parser.add_argument(
        "--config",
        default="kernelfleet.yaml",
        help="platform configuration file (default: ./kernelfleet.yaml)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    up.add_parser(subparsers)
    bootstrap.add_parser(subparsers)
    kernelspec_commands.add_parser(subparsers)
    audit.add_parser(subparsers)
    ops.add_parser(subparsers)
    evictions_cmd.add_parser(subparsers)
    warm_cmd.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; user-facing errors become one line on stderr and exit code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KernelfleetError as e:
        print(f"kernelfleet: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
