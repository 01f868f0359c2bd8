"""``flare dict create NAME | list | get NAME KEY | items NAME [-n N] | clear NAME --yes |
delete NAME --yes``: the server's dicts (``flare.Dict``). Keys typed on the command line
are strings; values are shown with ``repr``."""

from __future__ import annotations

import argparse

from .. import _api, exception
from ..dict import _key, _load
from ._common import UserError, _print_table, _when

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from ._common import Connect


def register(sub: Any) -> None:
    p = sub.add_parser("dict", help="manage dicts (flare.Dict)")
    p_sub = p.add_subparsers(dest="dict_cmd", metavar="SUBCOMMAND")
    create = p_sub.add_parser("create", help="create a named dict")
    create.add_argument("name", metavar="NAME")
    p_sub.add_parser("list", help="list dicts, with their number of entries")
    get = p_sub.add_parser("get", help="print the value of a (string) key")
    get.add_argument("name", metavar="NAME")
    get.add_argument("key", metavar="KEY")
    items = p_sub.add_parser("items", help="print a dict's first entries")
    items.add_argument("name", metavar="NAME")
    items.add_argument("-n", type=int, default=20, help="how many (default 20)")
    for what, text in (("clear", "remove every entry of a dict"), ("delete", "delete a dict and its entries")):
        c = p_sub.add_parser(what, help=text)
        c.add_argument("name", metavar="NAME")
        c.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")


def _dict_id(client: Any, name: str, create: bool = False) -> str:
    try:
        info = client.request("POST", _api.dicts(), {"name": name, "create_if_missing": create})
    except exception.NotFoundError:
        raise UserError(f"no dict named {name!r}", "see `flare dict list`") from None
    return str(info["dict_id"])


def _confirm(args: argparse.Namespace, what: str) -> None:
    if args.yes:
        return
    answer = input(f"{what} dict {args.name!r}? [y/N] ")
    if answer.strip().lower() not in ("y", "yes"):
        raise UserError("cancelled")


def cmd(args: argparse.Namespace, rest: list[str], connect: Connect) -> int:
    if args.dict_cmd == "create":
        client = connect()
        info = client.request("POST", _api.dicts(), {"name": args.name, "create_if_missing": True})
        print(("Created" if info.get("created") else "Exists:") + f" dict {args.name!r} ({info['dict_id']})")
        return 0
    if args.dict_cmd == "list":
        dicts = connect().request("GET", _api.dicts()).get("dicts", [])
        rows: list[tuple[str, ...]] = [("NAME", "DICT ID", "ENTRIES", "CREATED")]
        rows += [
            (str(d.get("name") or "(ephemeral)"), str(d["dict_id"]), str(d.get("len", "")), _when(d.get("created_at")))
            for d in dicts
        ]
        _print_table(rows)
        return 0
    if args.dict_cmd == "get":
        client = connect()
        r = client.request("POST", _api.dict_op(_dict_id(client, args.name), "get"), {"key": _key(args.key)})
        if not r.get("found"):
            raise UserError(f"dict {args.name!r} has no key {args.key!r}")
        print(repr(_load(r["value"])))
        return 0
    if args.dict_cmd == "items":
        client = connect()
        did = _dict_id(client, args.name)
        page = client.request("GET", _api.dict_items(did, 0, max(1, min(args.n, 1000)), False))
        table: list[tuple[str, ...]] = [("KEY", "VALUE")]
        table += [(repr(_load(e["key"])), repr(_load(e["value"]))) for e in page.get("items", [])]
        _print_table(table)
        return 0
    if args.dict_cmd in ("clear", "delete"):
        client = connect()
        did = _dict_id(client, args.name)
        _confirm(args, args.dict_cmd.capitalize())
        if args.dict_cmd == "clear":
            client.request("POST", _api.dict_op(did, "clear"), {})
            print(f"Cleared dict {args.name!r}")
        else:
            client.request("DELETE", _api.dict_(did), {})
            print(f"Deleted dict {args.name!r}")
        return 0
    raise UserError("usage: flare dict create NAME | list | get NAME KEY | items NAME | clear NAME | delete NAME")
