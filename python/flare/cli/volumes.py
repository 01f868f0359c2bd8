"""``flare volume create NAME | list | ls NAME [PATH] [-r] | put NAME LOCAL [REMOTE] [-f] |
get NAME REMOTE [LOCAL] [-f] | rm NAME PATH [-r] | cp NAME SRC... DST [-r] | delete NAME
--yes``: the server's volumes (``flare.Volume``). ``get`` to ``-`` writes to stdout."""

from __future__ import annotations

import argparse
import os
import sys
import time

from .. import _api, exception
from ._common import UserError, _print_table, _when

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from ..volume import Volume
    from ._common import Connect


def register(sub: Any) -> None:
    p = sub.add_parser("volume", help="manage volumes (flare.Volume)")
    p_sub = p.add_subparsers(dest="volume_cmd", metavar="SUBCOMMAND")
    create = p_sub.add_parser("create", help="create a named volume")
    create.add_argument("name", metavar="NAME")
    p_sub.add_parser("list", help="list volumes, with their versions")
    ls = p_sub.add_parser("ls", help="list the files of a volume")
    ls.add_argument("name", metavar="NAME")
    ls.add_argument("path", metavar="PATH", nargs="?", default="/")
    ls.add_argument("-r", "--recursive", action="store_true", help="everything below PATH")
    put = p_sub.add_parser("put", help="upload a local file or directory")
    put.add_argument("name", metavar="NAME")
    put.add_argument("local", metavar="LOCAL")
    put.add_argument("remote", metavar="REMOTE", nargs="?", default="/")
    put.add_argument("-f", "--force", action="store_true", help="replace files that exist")
    get = p_sub.add_parser("get", help="download a file or directory ('-': the file to stdout)")
    get.add_argument("name", metavar="NAME")
    get.add_argument("remote", metavar="REMOTE")
    get.add_argument("local", metavar="LOCAL", nargs="?", default=".")
    get.add_argument("-f", "--force", action="store_true", help="replace local files that exist")
    rm = p_sub.add_parser("rm", help="remove a file (a directory with -r)")
    rm.add_argument("name", metavar="NAME")
    rm.add_argument("path", metavar="PATH")
    rm.add_argument("-r", "--recursive", action="store_true", help="remove a directory and what is below it")
    cp = p_sub.add_parser("cp", help="copy files inside a volume")
    cp.add_argument("name", metavar="NAME")
    cp.add_argument("paths", metavar="PATH", nargs="+", help="sources, then the destination")
    cp.add_argument("-r", "--recursive", action="store_true", help="copy directories")
    delete = p_sub.add_parser("delete", help="delete a volume")
    delete.add_argument("name", metavar="NAME")
    delete.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")


def _volume(name: str) -> Volume:
    from ..volume import Volume

    v = Volume.from_name(name)
    try:
        v.hydrate()
    except exception.NotFoundError:
        raise UserError(f"no volume named {name!r}", "see `flare volume list`") from None
    return v


def _files(call: Any) -> Any:
    try:
        return call()
    except (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError) as e:
        raise UserError(str(e)) from None


def _download(v: Volume, remote: str, local: str, force: bool) -> int:
    """Write the file ``remote`` to ``local`` (atomically); returns its size."""
    if os.path.exists(local) and not force:
        raise UserError(f"{local} exists", "pass --force to replace it")
    os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
    tmp = f"{local}.flare-{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as fh:
            n = int(_files(lambda: v.read_file_into_fileobj(remote, fh)))
        os.replace(tmp, local)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return n


def cmd(args: argparse.Namespace, rest: list[str], connect: Connect) -> int:
    what = args.volume_cmd
    if what is None:
        raise UserError("usage: flare volume create|list|ls|put|get|rm|cp|delete ...")
    client = connect()
    if what == "create":
        info = client.request("POST", _api.volumes(), {"name": args.name, "create_if_missing": True})
        print(("Created" if info.get("created") else "Exists:") + f" volume {args.name!r} ({info['volume_id']})")
        return 0
    if what == "list":
        volumes = client.request("GET", _api.volumes()).get("volumes", [])
        rows: list[tuple[str, ...]] = [("NAME", "VOLUME ID", "VERSION", "CREATED")]
        rows += [
            (str(v.get("name") or "(ephemeral)"), str(v["volume_id"]), str(v.get("version", "")), _when(v.get("created_at")))
            for v in volumes
        ]
        _print_table(rows)
        return 0
    v = _volume(args.name)
    if what == "ls":
        entries = _files(lambda: v.listdir(args.path, recursive=args.recursive))
        table: list[tuple[str, ...]] = [("PATH", "TYPE", "SIZE", "MODIFIED")]
        table += [("/" + e.path, e.type.name.lower(), str(e.size), _when(e.mtime)) for e in entries]
        _print_table(table)
        return 0
    if what == "put":
        remote = args.remote
        start = time.monotonic()
        with v.batch_upload(force=args.force) as batch:
            if os.path.isdir(args.local):
                batch.put_directory(args.local, remote)
            elif os.path.isfile(args.local):
                batch.put_file(args.local, remote if not remote.endswith("/") else remote + os.path.basename(args.local))
            else:
                raise UserError(f"no file or directory {args.local}")
            n = len(batch._files)
            try:
                batch._flush()
            except (FileExistsError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
                raise UserError(str(e), "pass --force to replace existing files") from None
        print(f"Uploaded {n} file{'s' if n != 1 else ''} to volume {args.name!r} in {time.monotonic() - start:.1f}s")
        return 0
    if what == "get":
        remote = args.remote
        if args.local == "-":
            stream = v.read_file(remote)
            first = _files(lambda: next(stream, b""))
            sys.stdout.buffer.write(first)
            for piece in stream:
                sys.stdout.buffer.write(piece)
            sys.stdout.buffer.flush()
            return 0
        entries = _files(lambda: v.listdir(remote, recursive=True))
        files = [e for e in entries if e.type.name == "FILE"]
        base = remote.strip("/")
        single = len(entries) == 1 and entries[0].path == base and files
        if single:
            local = os.path.join(args.local, os.path.basename(base)) if os.path.isdir(args.local) else args.local
            n = _download(v, remote, local, args.force)
            print(f"Downloaded /{base} ({n} bytes) to {local}")
            return 0
        for f in files:
            rel = f.path[len(base) :].lstrip("/") if base else f.path
            _download(v, "/" + f.path, os.path.join(args.local, *rel.split("/")), args.force)
        print(f"Downloaded {len(files)} file{'s' if len(files) != 1 else ''} to {args.local}")
        return 0
    if what == "rm":
        _files(lambda: v.remove_file(args.path, recursive=args.recursive))
        print(f"Removed {args.path} from volume {args.name!r}")
        return 0
    if what == "cp":
        if len(args.paths) < 2:
            raise UserError("usage: flare volume cp NAME SRC... DST")
        _files(lambda: v.copy_files(args.paths[:-1], args.paths[-1], recursive=args.recursive))
        print(f"Copied {', '.join(args.paths[:-1])} to {args.paths[-1]}")
        return 0
    if what == "delete":
        if not args.yes:
            answer = input(f"Delete volume {args.name!r} and its files? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                raise UserError("cancelled")
        client.request("DELETE", _api.volume(v._hydrate()), {})
        print(f"Deleted volume {args.name!r}")
        return 0
    raise UserError("usage: flare volume create|list|ls|put|get|rm|cp|delete ...")
