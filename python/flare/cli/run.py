"""``flare run FILE[::NAME]``: run a local entrypoint (or a function) of an app."""

from __future__ import annotations

import argparse
import asyncio

from .._output import enable_output
from ..function import Function
from ._load import _import_target, _parse_entry_args, _resolve

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from ._common import Connect


def register(sub: Any) -> None:
    run = sub.add_parser("run", help="run a local entrypoint (or a function) of an app", add_help=False)
    run.add_argument("-m", action="store_true", help="TARGET is a module name, not a file")
    run.add_argument(
        "-d",
        "--detach",
        action="store_true",
        help="keep the app running after this command exits, until its calls are done",
    )
    run.add_argument("target", metavar="FILE[::NAME]")


def cmd(args: argparse.Namespace, rest: list[str], connect: Connect) -> int:
    module, name = _import_target(args.target, args.m)
    app, target = _resolve(module, name)
    if isinstance(target, Function):
        raw = target.get_raw_f()
        kwargs = _parse_entry_args(raw, rest, f"flare run {args.target}", target._batched)
        with enable_output(), app.run(detach=args.detach):
            if target._is_generator:
                for item in target.remote_gen(**kwargs):
                    print(item)
            else:
                # A batched function takes positional arguments only (flags in signature order).
                result = target.remote(*kwargs.values()) if target._batched else target.remote(**kwargs)
                if result is not None:
                    print(result)
        return 0
    kwargs = _parse_entry_args(target.raw_f, rest, f"flare run {args.target}")
    with enable_output(), app.run(detach=args.detach):
        result = target.raw_f(**kwargs)
        if hasattr(result, "__await__"):

            async def wait() -> Any:
                return await result

            asyncio.run(wait())
    return 0
