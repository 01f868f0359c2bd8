"""``flare deploy FILE``: deploy an app."""

from __future__ import annotations

import argparse

from .._output import enable_output
from ..app import web_urls
from ._common import UserError
from ._load import _apps_in, _import_target

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from ._common import Connect


def register(sub: Any) -> None:
    deploy = sub.add_parser("deploy", help="deploy an app")
    deploy.add_argument("-m", action="store_true", help="TARGET is a module name, not a file")
    deploy.add_argument("target", metavar="FILE")
    deploy.add_argument("--name", default=None, help="deploy under this name (default: the App's name)")


def cmd(args: argparse.Namespace, rest: list[str], connect: Connect) -> int:
    module, _ = _import_target(args.target, args.m)
    apps = _apps_in(module)
    if not apps:
        raise UserError(f"no flare.App found in {module.__name__}")
    if len(apps) > 1:
        raise UserError(f"{module.__name__} defines several apps; deploy one module per app")
    app = apps[0]
    name = args.name or app.name
    if not name:
        raise UserError("the app has no name", "use flare.App(\"name\") or `flare deploy FILE --name NAME`")
    with enable_output():  # shows image builds
        app.deploy(name)
    print(f"Deployed app {name!r} ({app.app_id}) with functions: {', '.join(app._functions) or '(none)'}")
    for fn_name, url in web_urls(app):
        print(f"  web function {fn_name} => {url}")
    return 0
