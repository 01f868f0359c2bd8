"""The ``flare`` command line: run, deploy, app list|stop|logs, image list|inspect, server start|stop|status."""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__, _api, exception

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, NoReturn, Sequence

    from .function import Function
    from .app import App, LocalEntrypoint


class UserError(Exception):
    """A mistake on the command line: printed as one `Error:` line (plus a hint)."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


# --------------------------------------------------------------------- loading


def _import_file(path: str) -> Any:
    import importlib.util

    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise UserError(f"file not found: {path}")
    if not path.endswith(".py"):
        raise UserError(f"not a Python file: {path}")
    stem = os.path.splitext(os.path.basename(path))[0]
    directory = os.path.dirname(path)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    spec = importlib.util.spec_from_file_location(stem, path)
    if spec is None or spec.loader is None:
        raise UserError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[stem] = module
    spec.loader.exec_module(module)
    return module


def _import_target(target: str, as_module: bool) -> tuple[Any, str | None]:
    ref, _, name = target.partition("::")
    if as_module:
        import importlib

        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(ref)
        except ModuleNotFoundError as e:
            if e.name and ref.startswith(e.name):
                raise UserError(f"module not found: {ref}") from None
            raise
    else:
        module = _import_file(ref)
    return module, name or None


def _apps_in(module: Any) -> list[App]:
    from .app import App

    seen: list[App] = []
    for value in vars(module).values():
        if isinstance(value, App) and value not in seen:
            seen.append(value)
    return seen


def _resolve(module: Any, name: str | None) -> tuple[App, LocalEntrypoint | Function]:
    apps = _apps_in(module)
    if not apps:
        raise UserError(f"no flare.App found in {module.__name__}", "define one with `app = flare.App(\"name\")`")
    entrypoints = [(a, ep) for a in apps for ep in a._local_entrypoints.values()]
    functions = [(a, f) for a in apps for f in a._functions.values()]
    if name is not None:
        for a, ep in entrypoints:
            if ep.name == name:
                return a, ep
        for a, f in functions:
            if f._tag == name:
                return a, f
        names = [ep.name for _, ep in entrypoints] + [f._tag for _, f in functions]
        raise UserError(f"no local entrypoint or function named {name!r} in {module.__name__}", f"available: {', '.join(names) or 'none'}")
    if len(entrypoints) == 1:
        return entrypoints[0]
    if len(entrypoints) > 1:
        names = ", ".join(ep.name for _, ep in entrypoints)
        raise UserError(
            f"{module.__name__} has several local entrypoints ({names})",
            f"pick one with FILE::NAME, e.g. {module.__name__}.py::{entrypoints[0][1].name}",
        )
    if len(functions) == 1:
        return functions[0]
    raise UserError(
        f"no local entrypoint in {module.__name__}",
        "add @app.local_entrypoint() or name a function with FILE::NAME",
    )


# ------------------------------------------------------------- entrypoint flags


def _annotation_type(annotation: Any) -> Any:
    if isinstance(annotation, str):
        return {"int": int, "float": float, "str": str, "bool": bool}.get(annotation.strip(), str)
    if annotation in (int, float, str, bool):
        return annotation
    return str


class _EntrypointParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        raise UserError(message, f"run `{self.prog} --help` to see the options")


def _parse_entry_args(func: Callable[..., Any], argv: Sequence[str], prog: str) -> dict[str, Any]:
    import inspect

    try:
        hints = __import__("typing").get_type_hints(func)
    except Exception:  # noqa: BLE001 - unresolvable annotations fall back to their text
        hints = {}
    parser = _EntrypointParser(prog=prog, add_help=True)
    params = inspect.signature(func).parameters
    for p in params.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        typ = _annotation_type(hints.get(p.name, p.annotation if p.annotation is not p.empty else (type(p.default) if p.default not in (p.empty, None) else str)))
        flags = [f"--{p.name}"]
        if "_" in p.name:
            flags.insert(0, f"--{p.name.replace('_', '-')}")
        required = p.default is p.empty
        if typ is bool:
            parser.add_argument(*flags, dest=p.name, action=argparse.BooleanOptionalAction, required=required,
                                default=None if required else p.default)
        else:
            parser.add_argument(*flags, dest=p.name, type=typ, required=required,
                                default=None if required else p.default, metavar=typ.__name__.upper())
    ns, unknown = parser.parse_known_args(list(argv))
    if unknown:
        raise UserError(f"unknown option(s) for {prog}: {' '.join(unknown)}", f"run `{prog} --help` to see the options")
    return vars(ns)


# ------------------------------------------------------------------- commands


def cmd_run(args: argparse.Namespace, rest: list[str]) -> int:
    from ._output import enable_output

    module, name = _import_target(args.target, args.m)
    app, target = _resolve(module, name)
    from .function import Function

    if isinstance(target, Function):
        raw = target.get_raw_f()
        kwargs = _parse_entry_args(raw, rest, f"flare run {args.target}")
        with enable_output(), app.run():
            if target._is_generator:
                for item in target.remote_gen(**kwargs):
                    print(item)
            else:
                result = target.remote(**kwargs)
                if result is not None:
                    print(result)
        return 0
    kwargs = _parse_entry_args(target.raw_f, rest, f"flare run {args.target}")
    with enable_output(), app.run():
        result = target.raw_f(**kwargs)
        if hasattr(result, "__await__"):
            import asyncio

            async def wait() -> Any:
                return await result

            asyncio.run(wait())
    return 0


def cmd_deploy(args: argparse.Namespace, rest: list[str]) -> int:
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
    from ._output import enable_output

    with enable_output():  # shows image builds
        app.deploy(name)
    print(f"Deployed app {name!r} ({app.app_id}) with functions: {', '.join(app._functions) or '(none)'}")
    return 0


def _client() -> Any:
    from ._server import ensure_server

    return ensure_server()


def _find_app(client: Any, name: str) -> dict[str, Any]:
    apps = client.request("GET", _api.apps())["apps"]
    matches = [a for a in apps if a["name"] == name or a["app_id"] == name]
    live = [a for a in matches if a.get("state") != "stopped"]
    if live:
        return dict(live[-1])
    if matches:
        return dict(matches[-1])
    raise exception.NotFoundError(f"no app named {name!r}")


def cmd_app(args: argparse.Namespace, rest: list[str]) -> int:
    import time

    client = _client()
    if args.app_cmd == "list":
        apps = client.request("GET", _api.apps())["apps"]
        rows = [("APP ID", "NAME", "STATE", "VERSION", "CREATED", "FUNCTIONS (containers/backlog)")]
        for a in apps:
            created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(a.get("created_at", 0)))
            fns = ", ".join(
                f"{f['name']}({f.get('containers', 0)}/{f.get('backlog', 0)})" for f in a.get("functions", [])
            )
            rows.append((a["app_id"], a["name"], a.get("state", ""), str(a.get("version", "")), created, fns))
        _print_table(rows)
        return 0
    if args.app_cmd == "stop":
        app = _find_app(client, args.name)
        client.request("POST", _api.app_stop(app["app_id"]), {}, timeout=120)
        print(f"Stopped app {app['name']!r} ({app['app_id']})")
        return 0
    if args.app_cmd == "logs":
        from ._output import follow_logs

        app = _find_app(client, args.name)
        for rec in follow_logs(client, app["app_id"], args.follow):
            stream = rec.get("stream")
            data = rec.get("data", "")
            out = sys.stdout if stream == "stdout" else sys.stderr
            out.write(data if stream != "system" else f"[flare] {data}" + ("" if data.endswith("\n") else "\n"))
            out.flush()
        return 0
    raise UserError("usage: flare app list|stop NAME|logs NAME [--follow]")


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _age(seconds: Any) -> str:
    s = float(seconds or 0)
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{s // 60:.0f}m{s % 60:02.0f}s"
    if s < 86400:
        return f"{s // 3600:.0f}h{s % 3600 // 60:02.0f}m"
    return f"{s // 86400:.0f}d{s % 86400 // 3600:02.0f}h"


def _memory_limit(mb: Any) -> str:
    """A container's memory limit for display: ``2 GiB``, ``512 MiB``, ``-`` (none)."""
    if not mb:
        return "-"
    mb = int(mb)
    return f"{mb // 1024} GiB" if mb % 1024 == 0 else f"{mb} MiB"


def cmd_container(args: argparse.Namespace, rest: list[str]) -> int:
    if args.container_cmd != "list":
        raise UserError("usage: flare container list")
    client = _client()
    containers = client.request("GET", _api.containers())["containers"]
    names = {a["app_id"]: a["name"] for a in client.request("GET", _api.apps())["apps"]}
    rows = [("CONTAINER ID", "APP", "FUNCTION", "WORKER", "STATE", "AGE", "MEMORY")]
    for c in containers:
        app_id = c.get("app_id", "")
        waiting = str(c.get("state", "")).startswith("waiting")
        rows.append((
            c.get("container_id") or "-",
            names.get(app_id, app_id),
            c.get("function", ""),
            str(c.get("worker_id") or c.get("worker") or "-"),
            str(c.get("state", "")),
            "-" if waiting else _age(c.get("age_s")),
            _memory_limit(c.get("memory_limit_mb")),
        ))
    _print_table(rows)
    return 0


def cmd_worker(args: argparse.Namespace, rest: list[str]) -> int:
    if args.worker_cmd != "list":
        raise UserError("usage: flare worker list")
    workers = _client().request("GET", _api.workers())["workers"]
    rows = [("WORKER ID", "ADDRESS", "STATE", "CPU", "MEMORY (MiB)", "GPUS", "CONTAINERS")]
    for w in workers:
        cpu = f"{w.get('cpu_millis_used', 0) / 1000:g}/{w.get('cpu_millis', 0) / 1000:g}"
        mem = f"{w.get('memory_mb_used', 0)}/{w.get('memory_mb', 0)}"
        gpus_total = w.get("gpus") or {}
        gpus_used = w.get("gpus_used") or {}
        gpus = ", ".join(f"{t} {gpus_used.get(t, 0)}/{n}" for t, n in sorted(gpus_total.items())) or "-"
        rows.append((
            str(w.get("worker_id", "")),
            str(w.get("address") or "-"),
            str(w.get("state", "")),
            cpu,
            mem,
            gpus,
            str(w.get("containers", 0)),
        ))
    _print_table(rows)
    return 0


def _bytes(n: Any) -> str:
    size = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # unreachable


def _when(ts: Any) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(ts or 0))) if ts else "-"


def _count(value: Any) -> str:
    if isinstance(value, (list, tuple, dict)):
        return str(len(value))
    return "-" if value is None else str(value)


def cmd_image(args: argparse.Namespace, rest: list[str]) -> int:
    client = _client()
    if args.image_cmd == "list":
        images = client.request("GET", _api.images())["images"]
        rows: list[tuple[str, ...]] = [("IMAGE ID", "CREATED", "LAYERS", "SIZE", "PYTHON", "DESCRIPTION")]
        for im in images:
            rows.append((
                str(im.get("image_id", "")),
                _when(im.get("created_at")),
                _count(im.get("layers")),
                _bytes(im.get("total_bytes")),
                str(im.get("python") or "-"),
                str(im.get("description") or ""),
            ))
        _print_table(rows)
        return 0
    if args.image_cmd == "inspect":
        im = client.request("GET", _api.image(args.image_id))
        if args.json:
            import json

            print(json.dumps(im, indent=2, sort_keys=True))
            return 0
        print(f"Image {im.get('image_id', args.image_id)}")
        print(f"Python: {im.get('python') or '(none)'}")
        layer_rows: list[tuple[str, ...]] = [("#", "DESCRIPTION", "FILES", "SIZE", "ADDED", "BUILD")]
        for layer in im.get("layers") or []:
            secs = layer.get("build_seconds")
            layer_rows.append((
                str(layer.get("index", "")),
                str(layer.get("description", "")),
                _count(layer.get("files")),
                _bytes(layer.get("total_bytes")),
                _bytes(layer.get("added_bytes")),
                "-" if secs is None else f"{float(secs):.1f}s",
            ))
        print("Layers:")
        _print_table(layer_rows)
        env = im.get("env") or {}
        items = env.items() if isinstance(env, dict) else (str(e).partition("=")[::2] for e in env)
        print("Env:" + ("" if env else " (none)"))
        for k, v in sorted(items):
            print(f"  {k}={v}")
        print(f"Workdir: {im.get('workdir') or '(default)'}")
        mounts = im.get("mounts") or []
        print("Mounts:" + ("" if mounts else " (none)"))
        for m in mounts:
            if isinstance(m, dict):
                detail = [f"{_count(m.get('entries', m.get('files')))} entries"] if ("entries" in m or "files" in m) else []
                if m.get("total_bytes") is not None:
                    detail.append(_bytes(m.get("total_bytes")))
                print(f"  {m.get('dest', '?')}" + (f" ({', '.join(detail)})" if detail else ""))
            else:
                print(f"  {m}")
        print(f"Files: {_count(im.get('files'))}")
        print(f"Total size: {_bytes(im.get('total_bytes'))}")
        shared = [s for s in im.get("shared") or [] if s.get("bytes")]
        total_shared = sum(int(s.get("bytes") or 0) for s in shared)
        print(f"Shared with other images: {_bytes(total_shared)}" + ("" if shared else " (none)"))
        for s in sorted(shared, key=lambda s: -int(s.get("bytes") or 0)):
            print(f"  {s.get('image_id')}: {_bytes(s.get('bytes'))}")
        return 0
    raise UserError("usage: flare image list|inspect IMAGE_ID")


def cmd_server(args: argparse.Namespace, rest: list[str]) -> int:
    from . import _server
    from ._transport import get_client, server_url

    if args.server_cmd == "start":
        listen = args.listen
        client = get_client("http://" + listen)
        if _server.health(client) is not None:
            print(f"A Flare server is already running at http://{listen}")
            return 0
        _server.start_server(listen)
        print(f"Started flared at http://{listen} (home {_server.flare_home()}, log {_server._log_path()})")
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


# ------------------------------------------------------------------------ main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flare", description="Flare: serverless Python on your own machines")
    parser.add_argument("--version", action="version", version=f"flare {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run a local entrypoint (or a function) of an app", add_help=False)
    run.add_argument("-m", action="store_true", help="TARGET is a module name, not a file")
    run.add_argument("target", metavar="FILE[::NAME]")

    deploy = sub.add_parser("deploy", help="deploy an app")
    deploy.add_argument("-m", action="store_true", help="TARGET is a module name, not a file")
    deploy.add_argument("target", metavar="FILE")
    deploy.add_argument("--name", default=None, help="deploy under this name (default: the App's name)")

    app = sub.add_parser("app", help="manage apps")
    app_sub = app.add_subparsers(dest="app_cmd", metavar="SUBCOMMAND")
    app_sub.add_parser("list", help="list apps")
    stop = app_sub.add_parser("stop", help="stop an app")
    stop.add_argument("name")
    logs = app_sub.add_parser("logs", help="show an app's logs")
    logs.add_argument("name")
    logs.add_argument("--follow", "-f", action="store_true")

    container = sub.add_parser("container", help="inspect containers")
    container_sub = container.add_subparsers(dest="container_cmd", metavar="SUBCOMMAND")
    container_sub.add_parser("list", help="list live containers (and calls waiting for a place to run)")

    worker = sub.add_parser("worker", help="inspect workers")
    worker_sub = worker.add_subparsers(dest="worker_cmd", metavar="SUBCOMMAND")
    worker_sub.add_parser("list", help="list workers with their resources")

    image = sub.add_parser("image", help="inspect built images")
    image_sub = image.add_subparsers(dest="image_cmd", metavar="SUBCOMMAND")
    image_sub.add_parser("list", help="list built images")
    inspect = image_sub.add_parser("inspect", help="show an image's layers, env, mounts and sizes")
    inspect.add_argument("image_id")
    inspect.add_argument("--json", action="store_true", help="print the server's JSON answer")

    server = sub.add_parser("server", help="manage the local flared server")
    server_sub = server.add_subparsers(dest="server_cmd", metavar="SUBCOMMAND")
    start = server_sub.add_parser("start", help="start flared in the background")
    start.add_argument("--listen", default="127.0.0.1:7878")
    server_sub.add_parser("stop", help="stop the background flared")
    server_sub.add_parser("status", help="is a server answering?")
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
        while i < len(argv) and argv[i].startswith("-") and argv[i] in ("-m",):
            i += 1
        if i < len(argv) and argv[i] in ("-h", "--help"):
            parser.parse_args(["run", "--help"])
        rest = argv[i + 1 :]
        argv = argv[: i + 1]
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    handlers = {
        "run": cmd_run,
        "deploy": cmd_deploy,
        "app": cmd_app,
        "container": cmd_container,
        "worker": cmd_worker,
        "image": cmd_image,
        "server": cmd_server,
    }
    try:
        return handlers[args.command](args, rest)
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
        import traceback

        traceback.print_exc()
        return 1
    except KeyboardInterrupt:
        print("Interrupted", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - the user's own exception: show its traceback
        import traceback

        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
