"""``kernelfleet audit verify|query``: check the gateway's audit chain, ask who ran what.

- ``verify`` walks every record of the chain (rotated files too) and names the first bad
  one: edited, deleted, cut off the end, or unreadable. Exit 0 when intact, 1 when not.
- ``query --user alice --since 2h [--kernelspec K] [--json]`` lists executions (one row
  each, with the outcome from its ``execute_reply``) as a table or JSON; ``--lifecycle``
  lists starts, stops and refusals instead.

The file format is the gateway's (``gateway.server.audit_format``, pure Python: reading it
needs no EG); the chain is at ``<state_dir>/audit/audit.jsonl`` unless ``--path`` says.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from gateway.server.audit_format import chain_files, parse_timestamp, read_records, verify_chain

from .config import load_config, parse_duration
from .devsecrets import audit_log_path
from .errors import KernelfleetError

EXECUTION_EVENTS = ("execute",)
REPLY_EVENT = "execute_reply"
END_EVENTS = ("kernel_stop", "kernel_evict")
LIFECYCLE_EVENTS = ("kernel_start", "kernel_warm_claim", "kernel_stop", "kernel_evict",
                    "kernel_refused", "gateway_start", "gateway_stop", "audit_gap")  # fmt: skip
CODE_WIDTH = 60


def add_parser(subparsers: Any) -> None:
    """Register ``audit`` and its sub-commands on the CLI's sub-parsers."""
    parser = subparsers.add_parser(
        "audit",
        help="verify and query the gateway's audit trail",
        description="The gateway records every kernel start, stop, refusal and execution "
        "in a hash-chained JSON Lines file (docs/compliance.md).",
    )
    commands = parser.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    verify = commands.add_parser(
        "verify",
        help="check the hash chain; name the first edited or deleted record",
        description="Exit 0 if every record is intact and in order, 1 naming the first "
        "bad record otherwise.",
    )
    _add_path(verify)
    verify.set_defaults(func=run_verify)
    query = commands.add_parser(
        "query",
        help="who ran what: executions (or lifecycle events) as a table or JSON",
        description="Executions matching every filter given, oldest first.",
    )
    _add_path(query)
    query.add_argument("--user", help="only this user's")
    query.add_argument("--since", help="only newer: a duration back from now (2h, 30m, 1d) "
                       "or a time (2026-11-22T10:00:00Z)")  # fmt: skip
    query.add_argument("--kernelspec", help="only on this kernelspec")
    query.add_argument("--kernel", help="only on kernels whose id starts with this")
    query.add_argument(
        "--lifecycle",
        action="store_true",
        help="list kernel starts, stops and refusals instead of executions",
    )
    query.add_argument("--json", action="store_true", help="print JSON instead of a table")
    query.set_defaults(func=run_query)


def _add_path(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--path",
        type=Path,
        help="the chain's current file (default: <state_dir>/audit/audit.jsonl of --config)",
    )


def _chain_path(args: argparse.Namespace) -> Path:
    path: Path = args.path or audit_log_path(load_config(args.config))
    if not chain_files(path):
        raise KernelfleetError(f"no audit records at {path} (has the gateway run?)")
    return path


# -- verify ----------------------------------------------------------------------------------


def run_verify(args: argparse.Namespace) -> int:
    """``kernelfleet audit verify``: 0 if the chain is intact, 1 naming the first bad record."""
    path = _chain_path(args)
    result = verify_chain(path)
    files = len(result.files)
    if result.problem is not None:
        print(f"audit chain broken at {result.problem.describe()}", file=sys.stderr)
        print(f"{result.records} records before it are intact", file=sys.stderr)
        return 1
    print(f"ok: {result.records} records (seq {result.first_seq} to {result.last_seq}) "
          f"in {files} file{'s' if files != 1 else ''}, chain intact")  # fmt: skip
    for note in result.notes:
        print(f"note: {note}")
    return 0


# -- query -----------------------------------------------------------------------------------


def since_time(value: str, *, now: float | None = None) -> float:
    """Unix time for ``--since``: a duration back from ``now`` or an ISO time."""
    try:
        return (time.time() if now is None else now) - parse_duration(value)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise KernelfleetError(
            f"--since '{value}' is neither a duration (2h, 30m) nor a time (2026-11-22T10:00Z)"
        ) from None
    return moment.timestamp()


def executions(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per ``execute`` record, with the outcome of its reply.

    ``outcome`` is the reply's (ok, error, aborted), ``no_reply`` when the kernel ended
    without answering, ``pending`` while it may still be running.
    """
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for record in records:
        event, kernel_id = record.get("event"), str(record.get("kernel_id") or "")
        if event in EXECUTION_EVENTS:
            rows[(kernel_id, str(record.get("msg_id")))] = _row(record)
        elif event == REPLY_EVENT:
            row = rows.get((kernel_id, str(record.get("msg_id"))))
            if row is not None:
                row.update(outcome=record.get("outcome"), duration_ms=record.get("duration_ms"))
                if record.get("error"):
                    row["error"] = record["error"]
        elif event in END_EVENTS:
            for (kid, _), row in rows.items():
                if kid == kernel_id and row["outcome"] == "pending":
                    row["outcome"] = "no_reply"
    return list(rows.values())


#: The fields of an ``execute`` record that a query row keeps.
ROW_KEYS = (
    "time", "user", "groups", "owner", "kernel_id", "kernelspec", "pool", "msg_id",
    "notebook_path", "cell_id", "via", "code", "code_sha256", "redacted", "seq",
)  # fmt: skip


def _row(record: dict[str, Any]) -> dict[str, Any]:
    row = {key: record[key] for key in ROW_KEYS if key in record}
    row.update(outcome="pending", duration_ms=None)
    return row


def _matches(row: dict[str, Any], args: argparse.Namespace, since: float | None) -> bool:
    if args.user and row.get("user") != args.user:
        return False
    if args.kernelspec and row.get("kernelspec") != args.kernelspec:
        return False
    if args.kernel and not str(row.get("kernel_id", "")).startswith(args.kernel):
        return False
    if since is not None:
        try:
            return parse_timestamp(str(row.get("time"))) >= since
        except ValueError:
            return False
    return True


def run_query(args: argparse.Namespace) -> int:
    """``kernelfleet audit query``: matching executions (or lifecycle records)."""
    path = _chain_path(args)
    since = since_time(args.since) if args.since else None
    if args.lifecycle:
        rows = [r for r in read_records(path) if r.get("event") in LIFECYCLE_EVENTS]
    else:
        rows = executions(read_records(path))
    rows = [row for row in rows if _matches(row, args, since)]
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        print_table(rows, lifecycle=args.lifecycle)
    return 0


def print_table(rows: list[dict[str, Any]], *, lifecycle: bool = False) -> None:
    """Rows as aligned columns (a line saying so when there are none)."""
    if not rows:
        print("no matching records")
        return
    header, lines = (_lifecycle_lines if lifecycle else _execution_lines)(rows)
    widths = [max(len(str(cells[i])) for cells in [header, *lines]) for i in range(len(header))]
    for cells in [header, *lines]:
        print("  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())


def _execution_lines(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    with_path = any(row.get("notebook_path") for row in rows)
    header = ["TIME", "USER", "KERNELSPEC", "KERNEL", "OUTCOME", "MS"]
    header += ["NOTEBOOK"] if with_path else []
    lines = []
    for row in rows:
        ms = row.get("duration_ms")
        cells = [
            _short_time(row.get("time")),
            *(str(row.get(key, "")) for key in ("user", "kernelspec")),
            str(row.get("kernel_id", ""))[:8],
            str(row.get("outcome", "")),
            "" if ms is None else f"{ms:.0f}",
        ]
        cells += [str(row.get("notebook_path", ""))] if with_path else []
        lines.append([*cells, _code_summary(row)])
    return [*header, "CODE"], lines


def _lifecycle_lines(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["TIME", "EVENT", "USER", "KERNELSPEC", "KERNEL", "DETAIL"]
    lines = []
    for row in rows:
        detail = row.get("message") or row.get("reason") or ""
        if row.get("by"):
            detail = f"{detail} by {row['by']}"
        cells = [
            _short_time(row.get("time")),
            *(str(row.get(key, "")) for key in ("event", "user", "kernelspec")),
            str(row.get("kernel_id", ""))[:8],
            detail,
        ]
        lines.append(cells)
    return header, lines


def _short_time(value: Any) -> str:
    text = str(value or "")
    return text[:19].replace("T", " ") if len(text) >= 19 else text


def _code_summary(row: dict[str, Any]) -> str:
    if "code" not in row:
        return f"sha256:{str(row.get('code_sha256', ''))[:12]}"
    lines = [line for line in str(row["code"]).splitlines() if line.strip()]
    first = lines[0].strip() if lines else ""
    more = len(lines) > 1 or len(first) > CODE_WIDTH
    return first[:CODE_WIDTH] + (" …" if more else "")
