"""The SDK's layout rules: API paths in one module, in-container code apart from the
client SDK, and (see test_import_graph_is_acyclic) no import cycles."""

from __future__ import annotations

import ast
from pathlib import Path

import flare

PKG = Path(flare.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def test_api_paths_live_in_one_module() -> None:
    offenders = [
        str(path.relative_to(PKG))
        for name, path in _modules().items()
        if name != "flare._api" and "/v1/" in path.read_text()
    ]
    assert offenders == [], f"spell API paths with flare._api, not literally: {offenders}"
