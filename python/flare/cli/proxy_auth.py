"""``flare proxy-auth create [--name N] | list | delete TOKEN_ID``: the tokens that web
endpoints with ``requires_proxy_auth=True`` accept (``Flare-Key`` / ``Flare-Secret``
headers; Modal's ``Modal-Key`` / ``Modal-Secret`` too)."""

from __future__ import annotations

import argparse
import time

from .. import _api
from ._common import UserError, _print_table, _when

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from ._common import Connect


def register(sub: Any) -> None:
    p = sub.add_parser("proxy-auth", help="manage the proxy auth tokens of web endpoints")
    p_sub = p.add_subparsers(dest="proxy_auth_cmd", metavar="SUBCOMMAND")
    create = p_sub.add_parser("create", help="create a token (its secret is shown once)")
    create.add_argument("--name", default=None, help="a name to tell it by (default: token-<date>-<time>)")
    p_sub.add_parser("list", help="list tokens")
    delete = p_sub.add_parser("delete", help="delete a token: requests with it are refused from now on")
    delete.add_argument("token_id", metavar="TOKEN_ID")


def cmd(args: argparse.Namespace, rest: list[str], connect: Connect) -> int:
    if args.proxy_auth_cmd == "create":
        name = args.name or time.strftime("token-%Y%m%d-%H%M%S")
        tok = connect().request("POST", _api.proxy_auth_tokens(), {"name": name})
        print(f"Created proxy auth token {tok.get('name', name)!r}")
        print(f"Token ID:     {tok['token_id']}")
        print(f"Token secret: {tok['token_secret']}")
        print("The secret is shown only now. Requests to endpoints with requires_proxy_auth=True send both:")
        print(f'  curl -H "Flare-Key: {tok["token_id"]}" -H "Flare-Secret: {tok["token_secret"]}" URL')
        return 0
    if args.proxy_auth_cmd == "list":
        tokens = connect().request("GET", _api.proxy_auth_tokens()).get("tokens", [])
        rows = [("TOKEN ID", "NAME", "CREATED")]
        rows += [(str(t["token_id"]), str(t.get("name", "")), _when(t.get("created_at"))) for t in tokens]
        _print_table(rows)
        return 0
    if args.proxy_auth_cmd == "delete":
        connect().request("DELETE", _api.proxy_auth_token(args.token_id), {})
        print(f"Deleted proxy auth token {args.token_id}")
        return 0
    raise UserError("usage: flare proxy-auth create [--name NAME] | list | delete TOKEN_ID")
