"""``kernelfleet kernelspecs validate|build``: check curated kernelspecs, render them for EG.

Results go to stdout, problems to stderr (one line each, every problem, not just the
first); any error makes the command exit 2 without changing anything.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from ..config import load_config
from ..errors import KernelfleetError
from .render import (
    BACKENDS,
    InvalidKernelspecs,
    Problem,
    SpecCheck,
    build,
    check_kernelspecs,
    default_output,
)


def add_parser(subparsers: Any) -> None:
    """Register ``kernelspecs`` and its sub-commands on the CLI's sub-parsers."""
    parser = subparsers.add_parser(
        "kernelspecs",
        help="validate and build the curated kernelspecs",
        description="Curated kernelspecs: kernelspecs/<name>/spec.yaml, rendered for EG.",
    )
    commands = parser.add_subparsers(dest="kernelspecs_command", metavar="ACTION", required=True)
    validate = commands.add_parser(
        "validate",
        help="check every spec.yaml against itself and kernelfleet.yaml",
        description="Print one line per kernelspec, or every problem (file, field, why); "
        "exit 2 on errors. Changes nothing.",
    )
    validate.set_defaults(func=run_validate)
    build_cmd = commands.add_parser(
        "build",
        help="render EG kernelspec directories (kernel.json) from the spec.yaml files",
        description="Validate, then render <output>/kernels/<name>/kernel.json for every "
        "kernelspec, replacing the previous output in one step.",
    )
    build_cmd.add_argument(
        "--backend",
        choices=BACKENDS,
        default=None,
        help="where kernels run (default: backend in kernelfleet.yaml)",
    )
    build_cmd.add_argument(
        "--output",
        type=Path,
        default=None,
        help="output folder (default: <state_dir>/kernelspecs/<backend>)",
    )
    build_cmd.set_defaults(func=run_build)


def run_validate(args: argparse.Namespace) -> int:
    """``kernelfleet kernelspecs validate``."""
    config = load_config(args.config)
    result = check_kernelspecs(config)
    _print_problems(result.general)
    for check in result.checks:
        if check.ok:
            print(_summary_line(check))
        _print_problems(check.problems)
    errors = result.errors
    if errors:
        bad = sum(1 for check in result.checks if not check.ok)
        raise KernelfleetError(
            f"{len(errors)} error(s) in {bad} of {len(result.checks)} kernelspec(s)"
        )
    return 0


def run_build(args: argparse.Namespace) -> int:
    """``kernelfleet kernelspecs build``."""
    config = load_config(args.config)
    backend = args.backend or config.backend
    output = Path(os.path.abspath(args.output or default_output(config, backend)))
    try:
        result = build(config, backend=backend, output=output)
    except InvalidKernelspecs as e:
        _print_problems(e.problems)
        errors = sum(1 for p in e.problems if p.is_error)
        raise KernelfleetError(
            f"{errors} error(s) in the kernelspecs; nothing was written to {output}"
        ) from e
    _print_problems(result.warnings)
    print(f"built {len(result.names)} kernelspecs into {result.output}")
    return 0


def _summary_line(check: SpecCheck) -> str:
    spec = check.spec
    assert spec is not None  # only called for checks that are ok
    groups = ",".join(spec.groups)
    return f"ok  {spec.name}  pool={spec.pool} gpus={spec.resources.gpus} groups={groups}"


def _print_problems(problems: tuple[Problem, ...] | list[Problem]) -> None:
    for problem in problems:
        print(f"kernelfleet: {problem.severity}: {problem.describe()}", file=sys.stderr)
