"""The ``modal`` command (and ``python -m modal``): Flare's CLI, with the same arguments.

``modal run app.py`` is ``flare run app.py``, ``modal app list`` is ``flare app list``, and
so on; a command Flare lacks gets Flare's own usage error. The CLI is whatever the
``flare`` console script of the installed Flare points to (its ``[project.scripts]``),
looked up when the command runs, so it follows Flare wherever its CLI lives.
"""

from __future__ import annotations

import os
import re
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Sequence

SCRIPT = "flare"


def _from_metadata() -> str | None:
    """``module:attr`` of the ``flare`` console script in the installed distributions' metadata."""
    from importlib import metadata

    try:
        eps: Any = metadata.entry_points()
        found = eps.select(group="console_scripts", name=SCRIPT) if hasattr(eps, "select") else [
            e for e in eps.get("console_scripts", ()) if e.name == SCRIPT
        ]
    except Exception:  # noqa: BLE001 - broken metadata elsewhere must not break the command
        return None
    found = list(found)
    # Flare's own distribution first, should another one also name a script `flare`.
    found.sort(key=lambda e: getattr(getattr(e, "dist", None), "name", None) != "flare")
    for ep in found:
        return str(ep.value)
    return None


def _from_pyproject() -> str | None:
    """``module:attr`` of ``[project.scripts] flare`` in the pyproject.toml beside the
    importable ``flare`` package (a source checkout on ``PYTHONPATH``, not installed)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("flare")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = os.path.join(os.path.dirname(os.path.abspath(location)), "pyproject.toml")
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except OSError:
            continue
        section = re.search(r"^\[project\.scripts\][ \t]*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
        if section:
            m = re.search(rf"^{SCRIPT}[ \t]*=[ \t]*[\"']([\w.]+:[\w.]+)[\"']", section.group(1), re.M)
            if m:
                return m.group(1)
    return None


def flare_cli() -> Callable[..., Any]:
    """Flare's CLI entry function (what the ``flare`` console script calls)."""
    import importlib

    target = _from_metadata() or _from_pyproject()
    if target is None:
        raise SystemExit("Error: Flare's CLI was not found: install Flare first (pip install ./python)")
    module_name, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        # Metadata of a Flare that is gone (or moved): a source checkout may still have it.
        fallback = _from_pyproject()
        if fallback is None or fallback == target:
            raise SystemExit(f"Error: Flare's CLI ({target}) cannot be imported: {e}") from None
        module_name, _, attr = fallback.partition(":")
        obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj  # type: ignore[no-any-return]


def main(argv: Sequence[str] | None = None) -> Any:
    """Run Flare's CLI on ``argv`` (default: this process's arguments)."""
    cli = flare_cli()
    if argv is None:
        return cli()
    saved = sys.argv
    sys.argv = [saved[0] if saved else "modal", *argv]
    try:
        return cli()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    sys.exit(main())
