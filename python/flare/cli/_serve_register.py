"""``python -m flare.cli._serve_register --app-id ID --result PATH [-m] TARGET``: what a
``flare serve`` reload runs in a fresh interpreter (``serve.py``): import TARGET, register
its app's functions into the running app ``ID`` (new versions), and write
``{"urls": [[name, url], ...], "functions": [name, ...]}`` to PATH. Exit status 1 (the error
on stderr) if the code does not import or the registration fails."""

from __future__ import annotations

import argparse
import json
import sys
import traceback

from .._output import enable_output
from .._server import ensure_server
from ..app import _publish, web_urls
from ._common import UserError
from ._load import _import_target, _the_app

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flare serve (reload)")
    parser.add_argument("--app-id", required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("-m", action="store_true")
    parser.add_argument("target")
    args = parser.parse_args(argv)
    try:
        module, _ = _import_target(args.target, args.m)
        app = _the_app(module, "serve")
        client = ensure_server()
        with enable_output():
            _publish(app, client, app._default_name(), "ephemeral", True, into_app_id=args.app_id)
        result = {"urls": [list(u) for u in web_urls(app)], "functions": list(app._functions)}
        with open(args.result, "w", encoding="utf-8") as fh:
            json.dump(result, fh)
        return 0
    except UserError as e:
        print(f"Error: {e}", file=sys.stderr)
        if e.hint:
            print(f"Hint: {e.hint}", file=sys.stderr)
        return 1
    except Exception:  # noqa: BLE001 - the user's code failed to import: show why
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
