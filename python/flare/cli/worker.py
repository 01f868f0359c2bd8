"""``flare worker list``."""

from __future__ import annotations

import argparse

from .. import _api
from ._common import UserError, _print_table

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from ._common import Connect


def register(sub: Any) -> None:
    worker = sub.add_parser("worker", help="inspect workers")
    worker_sub = worker.add_subparsers(dest="worker_cmd", metavar="SUBCOMMAND")
    worker_sub.add_parser("list", help="list workers with their resources")


def cmd(args: argparse.Namespace, rest: list[str], connect: Connect) -> int:
    if args.worker_cmd != "list":
        raise UserError("usage: flare worker list")
    workers = connect().request("GET", _api.workers())["workers"]
    rows = [("WORKER ID", "ADDRESS", "STATE", "CPU", "MEMORY (MiB)", "GPUS", "CONTAINERS")]
    for w in workers:
        cpu = f"{w.get('cpu_millis_used', 0) / 1000:g}/{w.get('cpu_millis', 0) / 1000:g}"
        mem = f"{w.get('memory_mb_used', 0)}/{w.get('memory_mb', 0)}"
        gpus_total = w.get("gpus") or {}
        gpus_used = w.get("gpus_used") or {}
        gpus = ", ".join(f"{t} {gpus_used.get(t, 0)}/{n}" for t, n in sorted(gpus_total.items())) or "-"
        rows.append((
            str(w.get("worker_id", "")),
            str(w.get("address") or "-"),
            str(w.get("state", "")),
            cpu,
            mem,
            gpus,
            str(w.get("containers", 0)),
        ))
    _print_table(rows)
    return 0
