"""The ``flare`` command line: run, serve, deploy, app list|stop|logs, container list, worker
list, image list|inspect, dict create|list|get|items|clear|delete, queue
create|list|peek|len|clear|delete, volume create|list|ls|put|get|rm|cp|delete, proxy-auth
create|list|delete, server start|stop|status. One module per command group; this one
parses the command line and maps errors to messages."""

from __future__ import annotations

import argparse
import sys
import traceback

from .. import __version__, exception
from .._server import ensure_server
from . import app, container, deploy, dicts, image, proxy_auth, queues, run, serve, server, volumes, worker
from ._common import UserError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NoReturn, Sequence

# The command groups, in the order `flare --help` lists them.
_COMMANDS = {
    "run": run,
    "serve": serve,
    "deploy": deploy,
    "app": app,
    "container": container,
    "worker": worker,
    "image": image,
    "dict": dicts,
    "queue": queues,
    "volume": volumes,
    "proxy-auth": proxy_auth,
    "server": server,
}


def _client() -> Any:
    """A client for a live server (the embedded one is started when none is configured)."""
    return ensure_server()


def _connect() -> Any:
    return _client()  # looked up when called, so tests can stand in for the server


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flare", description="Flare: serverless Python on your own machines")
    parser.add_argument("--version", action="version", version=f"flare {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _COMMANDS.values():
        module.register(sub)
    return parser


def _fail(message: str, hint: str | None = None, code: int = 1) -> NoReturn:
    print(f"Error: {message}", file=sys.stderr)
    if hint:
        print(f"Hint: {hint}", file=sys.stderr)
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    # `flare run TARGET [entrypoint flags...]`: everything after TARGET belongs to the entrypoint.
    rest: list[str] = []
    if argv and argv[0] == "run":
        i = 1
        while i < len(argv) and argv[i].startswith("-") and argv[i] in ("-m", "--detach", "-d"):
            i += 1
        if i < len(argv) and argv[i] in ("-h", "--help"):
            parser.parse_args(["run", "--help"])
        rest = argv[i + 1 :]
        argv = argv[: i + 1]
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        status: int = _COMMANDS[args.command].cmd(args, rest, _connect)
        return status
    except UserError as e:
        _fail(str(e), e.hint)
    except exception.ConnectionError as e:
        first, _, _ = str(e).partition(". Start")
        _fail(first.rstrip("."), "start a server with `flare server start`, or set FLARE_SERVER_URL to a running one")
    except (exception.NotFoundError, exception.InvalidError) as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except exception.ImageBuildError as e:
        _fail(str(e))
    except exception.ExecutionError as e:
        if "flared binary" in str(e):
            _fail(str(e))
        traceback.print_exc()
        return 1
    except KeyboardInterrupt:
        print("Interrupted", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - the user's own exception: show its traceback
        traceback.print_exc()
        return 1

