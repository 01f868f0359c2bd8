"""``flare image list|inspect IMAGE_ID [--json]``."""

from __future__ import annotations

import argparse
import json

from .. import _api
from ._common import UserError, _bytes, _count, _print_table, _when

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from ._common import Connect


def register(sub: Any) -> None:
    image = sub.add_parser("image", help="inspect built images")
    image_sub = image.add_subparsers(dest="image_cmd", metavar="SUBCOMMAND")
    image_sub.add_parser("list", help="list built images")
    inspect = image_sub.add_parser("inspect", help="show an image's layers, env, mounts and sizes")
    inspect.add_argument("image_id")
    inspect.add_argument("--json", action="store_true", help="print the server's JSON answer")


def cmd(args: argparse.Namespace, rest: list[str], connect: Connect) -> int:
    client = connect()
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
