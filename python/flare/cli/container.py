"""``flare container list``."""

from __future__ import annotations

import argparse

from .. import _api
from ._common import UserError, _age, _memory_limit, _print_table

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from ._common import Connect


def register(sub: Any) -> None:
    container = sub.add_parser("container", help="inspect containers")
    container_sub = container.add_subparsers(dest="container_cmd", metavar="SUBCOMMAND")
    container_sub.add_parser("list", help="list live containers (and calls waiting for a place to run)")


def cmd(args: argparse.Namespace, rest: list[str], connect: Connect) -> int:
    if args.container_cmd != "list":
        raise UserError("usage: flare container list")
    client = connect()
    containers = client.request("GET", _api.containers())["containers"]
    names = {a["app_id"]: a["name"] for a in client.request("GET", _api.apps())["apps"]}
    rows = [("CONTAINER ID", "APP", "FUNCTION", "WORKER", "STATE", "AGE", "MEMORY")]
    for c in containers:
        app_id = c.get("app_id", "")
        waiting = str(c.get("state", "")).startswith("waiting")
        rows.append((
            c.get("container_id") or "-",
            names.get(app_id, app_id),
            c.get("function", ""),
            str(c.get("worker_id") or c.get("worker") or "-"),
            str(c.get("state", "")),
            "-" if waiting else _age(c.get("age_s")),
            _memory_limit(c.get("memory_limit_mb")),
        ))
    _print_table(rows)
    return 0
