"""``flare serve FILE``: run an app's functions as an ephemeral app, print its web
endpoints' URLs, and re-register them whenever a ``.py`` file under FILE's directory
changes (new versions: the old containers finish their in-flight requests, then drain).
Ctrl-C stops the app.

A reload imports the changed code in a fresh interpreter (``python -m
flare.cli._serve_register``), never into this process: an edited module, a syntax
error or a changed import graph leave this process and the served version alone.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from .._output import enable_output
from ..app import web_urls
from ._load import _import_target, _the_app

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from ..app import App
    from ._common import Connect

POLL_INTERVAL = 0.25
# Directories a change in which is no reason to reload (and which can be huge).
_SKIP_DIRS = frozenset({"__pycache__", "node_modules", "venv", "env", "site-packages", "build", "dist"})
_MAX_FILES = 20000


def register(sub: Any) -> None:
    serve = sub.add_parser("serve", help="serve an app's web endpoints, reloading when its code changes")
    serve.add_argument("-m", action="store_true", help="TARGET is a module name, not a file")
    serve.add_argument("target", metavar="FILE")
    serve.add_argument("--timeout", type=float, default=None, help="stop the app after this many seconds")


def print_web_urls(urls: list[tuple[str, str]], functions: list[str], verb: str = "Created") -> None:
    """One line per function: its web endpoint's URL, or that it is a plain function."""
    with_url = {name.split(".")[0] for name, _ in urls}
    for name, url in urls:
        print(f"  {verb} web function {name} => {url}")
    for name in functions:
        if name not in with_url:
            print(f"  {verb} function {name}")
    sys.stdout.flush()


def cmd(args: argparse.Namespace, rest: list[str], connect: Connect) -> int:
    module, _ = _import_target(args.target, args.m)
    app = _the_app(module, "serve")
    root = watch_root(module)
    deadline = time.monotonic() + args.timeout if args.timeout else None
    with enable_output(), app.run():
        app_id = app.app_id
        assert app_id is not None
        print(f"Serving app {app._default_name()!r} ({app_id})")
        print_web_urls(web_urls(app), list(app._functions))
        print(f"Watching {root} for changes (Ctrl-C to stop)")
        sys.stdout.flush()
        try:
            _watch(args, app, root, deadline)
        except KeyboardInterrupt:
            print("Stopping app...", file=sys.stderr)
    return 0


def watch_root(module: Any) -> str:
    """The directory whose ``.py`` files are watched: the app file's."""
    f = getattr(module, "__file__", None)
    return os.path.dirname(os.path.abspath(f)) if isinstance(f, str) else os.getcwd()


def snapshot(root: str) -> dict[str, int]:
    """``{path: mtime_ns}`` of the ``.py`` files under ``root`` (hidden and build dirs left out)."""
    out: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in _SKIP_DIRS)
        for name in filenames:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                try:
                    out[path] = os.stat(path).st_mtime_ns
                except OSError:
                    pass
        if len(out) >= _MAX_FILES:
            break
    return out


def changed_files(before: dict[str, int], after: dict[str, int]) -> list[str]:
    return sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))


def _watch(args: argparse.Namespace, app: App, root: str, deadline: float | None) -> None:
    seen = snapshot(root)
    while deadline is None or time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL)
        now = snapshot(root)
        changed = changed_files(seen, now)
        if not changed:
            continue
        time.sleep(POLL_INTERVAL)  # an editor's save is often several writes
        now = snapshot(root)
        names = ", ".join(os.path.relpath(p, root) for p in changed[:3]) + (" ..." if len(changed) > 3 else "")
        print(f"Change detected in {names}: reloading", flush=True)
        result = reregister(args.target, args.m, app.app_id or "")
        if result is None:
            print("Reload failed (see above); still serving the previous version", flush=True)
        else:
            print("App reloaded:", flush=True)
            print_web_urls([(str(n), str(u)) for n, u in result.get("urls", [])], list(result.get("functions", [])), "Updated")
        seen = now


def reregister(target: str, as_module: bool, app_id: str) -> dict[str, Any] | None:
    """Register the file's functions again into ``app_id``, from a fresh interpreter; its
    result (``{"urls": [[name, url], ...], "functions": [...]}``), or None if it failed."""
    import json
    import subprocess
    import tempfile

    import flare

    sdk_parent = os.path.dirname(os.path.dirname(os.path.abspath(flare.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (sdk_parent, env.get("PYTHONPATH", "")) if p)
    fd, result_path = tempfile.mkstemp(prefix="flare-serve-", suffix=".json")
    os.close(fd)
    try:
        argv = [sys.executable, "-m", "flare.cli._serve_register", "--app-id", app_id, "--result", result_path]
        if as_module:
            argv.append("-m")
        argv.append(target)
        rc = subprocess.call(argv, env=env)
        if rc != 0:
            return None
        with open(result_path, encoding="utf-8") as fh:
            result: dict[str, Any] = json.load(fh)
        return result
    except (OSError, ValueError):
        return None
    finally:
        try:
            os.unlink(result_path)
        except OSError:
            pass
