"""``flare queue create NAME | list | peek NAME [-n N] [--partition P] | len NAME
[--partition P | --total] | clear NAME [--partition P | --all] --yes | delete NAME --yes``:
the server's queues (``flare.Queue``). ``peek`` shows the first items with ``repr``
without removing them."""

from __future__ import annotations

import argparse

from .. import _api, exception
from ..queue import _load, _partition
from ._common import UserError, _print_table, _when

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from ._common import Connect


def register(sub: Any) -> None:
    p = sub.add_parser("queue", help="manage queues (flare.Queue)")
    p_sub = p.add_subparsers(dest="queue_cmd", metavar="SUBCOMMAND")
    create = p_sub.add_parser("create", help="create a named queue")
    create.add_argument("name", metavar="NAME")
    p_sub.add_parser("list", help="list queues, with their number of items")
    peek = p_sub.add_parser("peek", help="print the first items of a partition (they stay in the queue)")
    peek.add_argument("name", metavar="NAME")
    peek.add_argument("-n", type=int, default=1, help="how many (default 1)")
    peek.add_argument("--partition", default=None, help="partition key (default: the default partition)")
    length = p_sub.add_parser("len", help="print the number of items of a partition")
    length.add_argument("name", metavar="NAME")
    length.add_argument("--partition", default=None, help="partition key (default: the default partition)")
    length.add_argument("--total", action="store_true", help="count every partition")
    clear = p_sub.add_parser("clear", help="remove the items of a partition (or of all)")
    clear.add_argument("name", metavar="NAME")
    clear.add_argument("--partition", default=None, help="partition key (default: the default partition)")
    clear.add_argument("--all", action="store_true", help="every partition")
    clear.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    delete = p_sub.add_parser("delete", help="delete a queue and its items")
    delete.add_argument("name", metavar="NAME")
    delete.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")


def _queue_id(client: Any, name: str) -> str:
    try:
        info = client.request("POST", _api.queues(), {"name": name})
    except exception.NotFoundError:
        raise UserError(f"no queue named {name!r}", "see `flare queue list`") from None
    return str(info["queue_id"])


def _confirm(args: argparse.Namespace, what: str) -> None:
    if args.yes:
        return
    answer = input(f"{what} queue {args.name!r}? [y/N] ")
    if answer.strip().lower() not in ("y", "yes"):
        raise UserError("cancelled")


def _part(args: argparse.Namespace) -> str:
    try:
        return _partition(args.partition)
    except exception.InvalidError as e:
        raise UserError(str(e)) from None


def cmd(args: argparse.Namespace, rest: list[str], connect: Connect) -> int:
    if args.queue_cmd == "create":
        client = connect()
        info = client.request("POST", _api.queues(), {"name": args.name, "create_if_missing": True})
        print(("Created" if info.get("created") else "Exists:") + f" queue {args.name!r} ({info['queue_id']})")
        return 0
    if args.queue_cmd == "list":
        queues = connect().request("GET", _api.queues()).get("queues", [])
        rows: list[tuple[str, ...]] = [("NAME", "QUEUE ID", "ITEMS", "CREATED")]
        rows += [
            (str(q.get("name") or "(ephemeral)"), str(q["queue_id"]), str(q.get("len", "")), _when(q.get("created_at")))
            for q in queues
        ]
        _print_table(rows)
        return 0
    if args.queue_cmd == "peek":
        client = connect()
        part = _part(args)
        body = {"partition": part, "after": 0, "limit": max(1, min(args.n, 1000)), "timeout": 0}
        page = client.request("POST", _api.queue_op(_queue_id(client, args.name), "peek"), body)
        for v in page.get("values", []):
            print(repr(_load(v["value"])))
        return 0
    if args.queue_cmd == "len":
        client = connect()
        if args.total and args.partition is not None:
            raise UserError("pass --partition or --total, not both")
        part = _part(args)
        print(int(client.request("GET", _api.queue_len(_queue_id(client, args.name), part, args.total))["len"]))
        return 0
    if args.queue_cmd in ("clear", "delete"):
        client = connect()
        qid = _queue_id(client, args.name)
        if args.queue_cmd == "clear":
            if args.all and args.partition is not None:
                raise UserError("pass --partition or --all, not both")
            part = _part(args)
            _confirm(args, "Clear")
            client.request("POST", _api.queue_op(qid, "clear"), {"partition": part, "all": args.all})
            print(f"Cleared queue {args.name!r}" + (f" partition {part!r}" if part else ""))
        else:
            _confirm(args, "Delete")
            client.request("DELETE", _api.queue(qid), {})
            print(f"Deleted queue {args.name!r}")
        return 0
    raise UserError("usage: flare queue create NAME | list | peek NAME | len NAME | clear NAME | delete NAME")
