"""Loading the user's app for ``flare run`` and ``flare deploy``: importing FILE or
``-m MODULE``, finding its apps and entrypoints, and the entrypoint's command-line flags."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import os
import sys
import typing

from ..app import App, LocalEntrypoint
from ..function import Function
from ._common import UserError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, NoReturn, Sequence


def _import_file(path: str) -> Any:
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
    seen: list[App] = []
    for value in vars(module).values():
        if isinstance(value, App) and value not in seen:
            seen.append(value)
    return seen


def _the_app(module: Any, command: str) -> App:
    """The one app of ``module`` (``flare deploy``/``flare serve`` take one app per module)."""
    apps = _apps_in(module)
    if not apps:
        raise UserError(f"no flare.App found in {module.__name__}", "define one with `app = flare.App(\"name\")`")
    if len(apps) > 1:
        raise UserError(f"{module.__name__} defines several apps; {command} one module per app")
    return apps[0]


def _resolve(module: Any, name: str | None) -> tuple[App, LocalEntrypoint | Function]:
    apps = _apps_in(module)
    if not apps:
        raise UserError(f"no flare.App found in {module.__name__}", "define one with `app = flare.App(\"name\")`")
    entrypoints = [(a, ep) for a in apps for ep in a._local_entrypoints.values()]
    functions = [(a, f) for a in apps for f in a._functions.values() if not getattr(f, "_is_class", False)]
    if name is not None:
        for a, ep in entrypoints:
            if ep.name == name:
                return a, ep
        for a, f in functions:
            if f._tag == name:
                return a, f
        cls_name, _, method = name.partition(".")
        for a in apps:
            c = a._classes.get(cls_name)
            if c is not None and method in (c._info.get("methods") or {}):
                # A class's method with the default parameters (FILE::Model.predict).
                return a, getattr(c(), method)
        available = [ep.name for _, ep in entrypoints] + [f._tag for _, f in functions]
        available += [f"{t}.{m}" for a in apps for t, c in a._classes.items() for m in c._info.get("methods") or {}]
        raise UserError(f"no local entrypoint or function named {name!r} in {module.__name__}", f"available: {', '.join(available) or 'none'}")
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


def _element_type(annotation: Any) -> Any:
    """``int`` for ``list[int]`` (or the text ``"list[int]"``), else ``annotation``."""
    if isinstance(annotation, str):
        text = annotation.strip()
        for prefix in ("list[", "List[", "typing.List[", "tuple[", "Sequence["):
            if text.startswith(prefix) and text.endswith("]"):
                return text[len(prefix) : -1].split(",")[0].strip()
        return annotation
    if typing.get_origin(annotation) in (list, tuple):
        args = typing.get_args(annotation)
        return args[0] if args else str
    return annotation


class _EntrypointParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UserError(message, f"run `{self.prog} --help` to see the options")


def _parse_entry_args(func: Callable[..., Any], argv: Sequence[str], prog: str, batched: bool = False) -> dict[str, Any]:
    """The flags of ``func``'s parameters, parsed from ``argv``. ``batched``: ``func`` takes a
    list per argument and a flag gives one element (``xs: list[int]`` -> ``--xs 3`` is 3)."""
    try:
        hints = typing.get_type_hints(func)
    except Exception:  # noqa: BLE001 - unresolvable annotations fall back to their text
        hints = {}
    parser = _EntrypointParser(prog=prog, add_help=True)
    params = inspect.signature(func).parameters
    for p in params.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        ann = hints.get(p.name, p.annotation if p.annotation is not p.empty else (type(p.default) if p.default not in (p.empty, None) else str))
        typ = _annotation_type(_element_type(ann) if batched else ann)
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
