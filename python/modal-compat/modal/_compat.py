"""How a Modal name resolves here: to the Flare object of the same name, or to a clear error.

Nothing is faked. A Modal name that Flare has (``flare.__all__``, ``flare.exception``) is
Flare's own object; one it does not have raises :class:`UnavailableError` when it is used,
saying so, instead of Python's bare "cannot import name". The lookups are made at access
time, so a name Flare gains later is picked up without a change here.

This module is imported in every container that runs code importing ``modal``: it imports
nothing but the standard library at import time.
"""

from __future__ import annotations

import importlib
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

DOCS = "see docs/COMPAT.md"


class UnavailableError(ImportError):
    """A Modal name that Flare does not provide (yet, or at all on a self-hosted platform).

    An ``ImportError`` (and not an ``AttributeError``) so that ``from modal import Secret``
    shows this message instead of Python's generic one."""


# Modal names Flare does not have, with why: an open issue (``#N``), or the reason the
# name has no meaning on a self-hosted platform (``n/a: ...``). A name not listed here and
# missing from Flare is still reported, with no note.
NOTES = {
    "Client": "#14",
    "CloudBucketMount": "",
    "Environment": "",
    "NetworkFileSystem": "deprecated in Modal in favour of Volumes, #13",
    "Probe": "",
    "Proxy": "n/a: self-hosted containers leave through the operator's own network",
    "Sandbox": "",
    "SandboxSnapshot": "",
    "SchedulerPlacement": "n/a: a Flare fleet places containers by cpu, memory and GPUs of its workers",
    "Secret": "#14",
    "Server": "#12 (Flare has web_server, asgi_app, wsgi_app and fastapi_endpoint; not the Server class)",
    "Tunnel": "",
    "Workspace": "#14",
    "billing": "n/a: a self-hosted platform sends no bill",
    "forward": "",
    "interact": "",
    "types": "",
    # modal.exception
    "AlreadyExistsError": "#13",
    "AuthError": "#14",
    "PermissionDeniedError": "#14",
    "WorkspaceManagementError": "#14",
    "VolumeUploadTimeoutError": "#13",
    "simulate_preemption": "n/a: Flare has no preemptible capacity; a lost worker's inputs run again elsewhere",
}


def unavailable(qualname: str) -> UnavailableError:
    """The error for Modal name ``qualname`` (``"modal.Secret"``, ``"modal.exception.AuthError"``)."""
    note = NOTES.get(qualname.rsplit(".", 1)[-1], "")
    if note.startswith("n/a: "):
        return UnavailableError(f"{qualname} has no equivalent in Flare ({note[5:]}; {DOCS})")
    why = f"{note}; {DOCS}" if note else DOCS
    return UnavailableError(f"{qualname} is not available in Flare yet ({why})")


def flare_name(name: str) -> Any:
    """Flare's top-level public ``name``, or ``None`` when ``flare.__all__`` lacks it."""
    import flare

    if name not in getattr(flare, "__all__", ()):
        return None
    return getattr(flare, name)


def resolve(module: str, name: str, modal_names: Any, flare_lookup: Any = flare_name) -> Any:
    """The value of Modal name ``name`` in Modal's module ``module``: the Flare object that
    ``flare_lookup`` finds, else an :class:`UnavailableError` for a name of ``modal_names``,
    else the ``AttributeError`` any module raises for a name it does not have."""
    if name in modal_names:
        value = flare_lookup(name)
        if value is not None:
            return value
        raise unavailable(f"{module}.{name}")
    raise AttributeError(f"module {module!r} has no attribute {name!r}")


def flare_has(name: str) -> bool:
    """Whether ``flare.__all__`` has ``name`` (without importing what it names)."""
    import flare

    return name in getattr(flare, "__all__", ())


def available(modal_names: Any, has: Any = flare_has) -> list[str]:
    """Those of ``modal_names`` that Flare has now (``has(name)`` says so)."""
    return [n for n in modal_names if has(n)]


# Modal's own submodules that have no Flare counterpart here: importing one raises the
# clear error (via the finder below) instead of "No module named ...".
MISSING_SUBMODULES = {
    "billing": "n/a: a self-hosted platform sends no bill",
    "call_graph": "",
    "cli": "the `modal` command is Flare's CLI",
    "client": "#14",
    "cloud_bucket_mount": "",
    "cls": "#11",
    "config": "Flare's settings are environment variables: FLARE_SERVER_URL, FLARE_HOME, ...",
    "container_process": "",
    "environments": "",
    "experimental": "",
    "file_io": "",
    "io_streams": "",
    "mount": "",
    "network_file_system": "",
    "object": "",
    "parallel_map": "",
    "proxy": "n/a: self-hosted containers leave through the operator's own network",
    "runner": "use `with app.run():` and `app.deploy()`",
    "running_app": "",
    "sandbox": "",
    "sandbox_fs": "",
    "scheduler_placement": "n/a: a Flare fleet places containers by cpu, memory and GPUs of its workers",
    "secret": "#14",
    "server": "#12",
    "serving": "#12",
    "skills": "",
    "snapshot": "",
    "stream_type": "",
    "token_flow": "#14",
    "types": "",
    "workspace": "#14",
}


class _MissingSubmoduleFinder:
    """Last on ``sys.meta_path``: answers only for ``modal.<one of MISSING_SUBMODULES>``,
    which no earlier finder found, by raising the clear error."""

    @staticmethod
    def find_spec(fullname: str, path: Any = None, target: Any = None) -> None:
        package, _, sub = fullname.partition(".")
        if package == "modal" and sub in MISSING_SUBMODULES:
            note = MISSING_SUBMODULES[sub]
            if note.startswith("n/a: "):
                raise UnavailableError(f"{fullname} has no equivalent in Flare ({note[5:]}; {DOCS})")
            why = f"{note}; {DOCS}" if note else DOCS
            raise UnavailableError(f"{fullname} is not available in Flare yet ({why})")
        return None


def install_finder() -> None:
    if not any(isinstance(f, _MissingSubmoduleFinder) for f in sys.meta_path):
        sys.meta_path.append(_MissingSubmoduleFinder())


def submodule(name: str) -> Any:
    return importlib.import_module(f"modal.{name}")
