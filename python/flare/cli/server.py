"""``flare server start|stop|status``: the local flared server."""

from __future__ import annotations

import argparse

from .. import _server
from .._home import flare_home
from .._transport import get_client, server_url
from ._common import UserError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from ._common import Connect


def register(sub: Any) -> None:
    server = sub.add_parser("server", help="manage the local flared server")
    server_sub = server.add_subparsers(dest="server_cmd", metavar="SUBCOMMAND")
    start = server_sub.add_parser("start", help="start flared in the background")
    start.add_argument("--listen", default="127.0.0.1:7878")
    server_sub.add_parser("stop", help="stop the background flared")
    server_sub.add_parser("status", help="is a server answering?")


def cmd(args: argparse.Namespace, rest: list[str], connect: Connect) -> int:
    if args.server_cmd == "start":
        listen = args.listen
        client = get_client("http://" + listen)
        if _server.health(client) is not None:
            print(f"A Flare server is already running at http://{listen}")
            return 0
        _server.start_server(listen)
        print(f"Started flared at http://{listen} (home {flare_home()}, log {_server._log_path()})")
        return 0
    if args.server_cmd == "stop":
        if _server.stop_server():
            print("Stopped flared")
            return 0
        print("No flared started by flare is running")
        return 0
    if args.server_cmd == "status":
        url = server_url()
        info = _server.health(get_client(url))
        if info is None:
            print(f"No Flare server answers at {url}")
            return 1
        print(f"Flare server at {url}: {info.get('status')} (version {info.get('version')}, id {info.get('server_id')})")
        return 0
    raise UserError("usage: flare server start|stop|status")
