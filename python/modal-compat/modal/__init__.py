"""Modal's module name on Flare: ``import modal`` gives Flare's SDK under Modal's names.

Part of the opt-in ``flare-modal-compat`` distribution (``pip install ./python/modal-compat``),
never installed with Flare itself, since it would shadow a real Modal install.

``modal.App is flare.App``, and so on for every Modal name Flare has (``flare.__all__``).
A Modal name Flare does not have raises ``ImportError`` saying so when it is used
(``from modal import Secret``, ``modal.Secret``); docs/COMPAT.md has the full table.
Imported at container cold start, so nothing is imported until a name is used.
"""

from __future__ import annotations

from . import _compat

# Flare's SDK ships this package into containers (at /__flare/modal) only when it has this
# marker: a real Modal install is never shipped.
__flare_compat__ = True

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from flare import (
        App as App,
        Cls as Cls,
        Cron as Cron,
        Dict as Dict,
        Error as Error,
        FilePatternMatcher as FilePatternMatcher,
        Function as Function,
        FunctionCall as FunctionCall,
        Image as Image,
        Period as Period,
        Queue as Queue,
        Retries as Retries,
        Volume as Volume,
        __version__ as __version__,
        asgi_app as asgi_app,
        batched as batched,
        concurrent as concurrent,
        current_function_call_id as current_function_call_id,
        current_input_id as current_input_id,
        enable_output as enable_output,
        enter as enter,
        exit as exit,
        fastapi_endpoint as fastapi_endpoint,
        is_local as is_local,
        method as method,
        parameter as parameter,
        web_endpoint as web_endpoint,
        web_server as web_server,
        wsgi_app as wsgi_app,
    )

    from . import exception as exception

# Modal's public names (its ``modal/__init__.py`` ``__all__``, client 1.5.4).
MODAL_NAMES = (
    "__version__",
    "App",
    "Client",
    "Cls",
    "CloudBucketMount",
    "Cron",
    "Dict",
    "Environment",
    "Error",
    "FilePatternMatcher",
    "Function",
    "FunctionCall",
    "Image",
    "NetworkFileSystem",
    "Period",
    "Probe",
    "Proxy",
    "Queue",
    "Retries",
    "Sandbox",
    "SandboxSnapshot",
    "SchedulerPlacement",
    "Secret",
    "Server",
    "Tunnel",
    "Volume",
    "Workspace",
    "asgi_app",
    "batched",
    "billing",
    "concurrent",
    "current_function_call_id",
    "current_input_id",
    "enable_output",
    "enter",
    "exit",
    "fastapi_endpoint",
    "forward",
    "interact",
    "is_local",
    "method",
    "parameter",
    "types",
    "web_endpoint",
    "web_server",
    "wsgi_app",
)

# This package's submodules that stand for Modal's of the same name.
SUBMODULES = (
    "app",
    "dict",
    "exception",
    "file_pattern_matcher",
    "functions",
    "image",
    "output",
    "partial_function",
    "queue",
    "retries",
    "schedule",
    "volume",
)

_compat.install_finder()


def __getattr__(name: str) -> Any:
    if name in SUBMODULES:
        return _compat.submodule(name)  # importing it also sets it here
    if name == "Stub":
        # Modal's old name for App (removed in Modal 1.0); old programs still say it.
        import warnings

        warnings.warn("modal.Stub is modal.App on Flare; rename it to App", DeprecationWarning, stacklevel=2)
        return _compat.resolve("modal", "App", MODAL_NAMES)
    value = _compat.resolve("modal", name, MODAL_NAMES)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(SUBMODULES))


# What ``from modal import *`` gives: the Modal names Flare has.
__all__ = sorted(_compat.available(MODAL_NAMES))
