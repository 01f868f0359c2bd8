"""``flare app list|stop NAME|logs NAME [--follow]``."""

from __future__ import annotations

import argparse
import sys
import time

from .. import _api, exception
from .._output import follow_logs
from ._common import UserError, _print_table

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from ._common import Connect


def register(sub: Any) -> None:
    app = sub.add_parser("app", help="manage apps")
    app_sub = app.add_subparsers(dest="app_cmd", metavar="SUBCOMMAND")
    app_sub.add_parser("list", help="list apps")
    stop = app_sub.add_parser("stop", help="stop an app")
    stop.add_argument("name")
    logs = app_sub.add_parser("logs", help="show an app's logs")
    logs.add_argument("name")
    logs.add_argument("--follow", "-f", action="store_true")


def _find_app(client: Any, name: str) -> dict[str, Any]:
    apps = client.request("GET", _api.apps())["apps"]
    matches = [a for a in apps if a["name"] == name or a["app_id"] == name]
    live = [a for a in matches if a.get("state") != "stopped"]
    if live:
        return dict(live[-1])
    if matches:
        return dict(matches[-1])
    raise exception.NotFoundError(f"no app named {name!r}")


def _variant_of(name: str) -> tuple[str, str] | None:
    """``("Model", "p1a2b3c4d5e6f")`` for a class's parameter/options pool ``Model.p1a2b3c4d5e6f``
    (flare/cls.py names them so), else None."""
    base, sep, pool = name.rpartition(".")
    if sep and base and len(pool) == 13 and pool[0] == "p" and all(c in "0123456789abcdef" for c in pool[1:]):
        return base, pool
    return None


def _functions_column(functions: list[dict[str, Any]]) -> str:
    """``f(containers/backlog), ...``; a class with pools besides its default one as
    ``Model [class, pools: default(1/0), p1a2b3c4d5e6f(1/0)]``."""
    groups: dict[str, list[str]] = {}
    for f in functions:
        v = _variant_of(f["name"])
        base, pool = v if v is not None else (f["name"], "default")
        groups.setdefault(base, []).append(f"{pool}({f.get('containers', 0)}/{f.get('backlog', 0)})")
    out = []
    for base, pools in groups.items():
        if pools == [pools[0]] and pools[0].startswith("default("):
            out.append(base + pools[0][len("default"):])
        else:
            out.append(f"{base} [class, pools: {', '.join(pools)}]")
    return ", ".join(out)


def _next_runs_column(functions: list[dict[str, Any]]) -> str:
    """``f 2026-12-01 23:15:02 UTC, ...``: each scheduled function's next run."""
    return ", ".join(
        f"{f['name']} {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(f['next_run']))}"
        for f in functions
        if f.get("next_run") is not None
    )


def cmd(args: argparse.Namespace, rest: list[str], connect: Connect) -> int:
    client = connect()
    if args.app_cmd == "list":
        apps = client.request("GET", _api.apps())["apps"]
        rows = [("APP ID", "NAME", "STATE", "VERSION", "CREATED", "FUNCTIONS (containers/backlog)", "NEXT RUN")]
        for a in apps:
            created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(a.get("created_at", 0)))
            fns = _functions_column(a.get("functions", []))
            runs = _next_runs_column(a.get("functions", []))
            rows.append((a["app_id"], a["name"], a.get("state", ""), str(a.get("version", "")), created, fns, runs))
        _print_table(rows)
        return 0
    if args.app_cmd == "stop":
        app = _find_app(client, args.name)
        client.request("POST", _api.app_stop(app["app_id"]), {}, timeout=120)
        print(f"Stopped app {app['name']!r} ({app['app_id']})")
        return 0
    if args.app_cmd == "logs":
        app = _find_app(client, args.name)
        for rec in follow_logs(client, app["app_id"], args.follow):
            stream = rec.get("stream")
            data = rec.get("data", "")
            out = sys.stdout if stream == "stdout" else sys.stderr
            out.write(data if stream != "system" else f"[flare] {data}" + ("" if data.endswith("\n") else "\n"))
            out.flush()
        return 0
    raise UserError("usage: flare app list|stop NAME|logs NAME [--follow]")
