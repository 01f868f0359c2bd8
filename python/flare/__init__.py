"""Flare: self-hostable serverless compute for Python.

``import flare`` runs at every container cold start, so this module imports nothing
eagerly: public names are resolved on first use (PEP 562).
"""

from __future__ import annotations

import sys

__version__ = "0.1.0"

TYPE_CHECKING = False
if TYPE_CHECKING:
    from . import exception as exception
    from ._options import Retries as Retries
    from ._output import enable_output as enable_output
    from ._runtime.context import (
        current_function_call_id as current_function_call_id,
        current_input_id as current_input_id,
        is_local as is_local,
    )
    from .app import App as App
    from .batching import batched as batched
    from .cls import Cls as Cls, enter as enter, exit as exit, method as method, parameter as parameter
    from .cron import Cron as Cron
    from .dict import Dict as Dict
    from .exception import Error as Error
    from .function import Function as Function, concurrent as concurrent
    from .function_call import FunctionCall as FunctionCall
    from .image import FilePatternMatcher as FilePatternMatcher, Image as Image
    from .period import Period as Period
    from .queue import Queue as Queue
    from .volume import Volume as Volume
    from .web_endpoints import (
        asgi_app as asgi_app,
        fastapi_endpoint as fastapi_endpoint,
        web_endpoint as web_endpoint,
        web_server as web_server,
        wsgi_app as wsgi_app,
    )

_LAZY = {
    "App": ("flare.app", "App"),
    "Function": ("flare.function", "Function"),
    "Cls": ("flare.cls", "Cls"),
    "Dict": ("flare.dict", "Dict"),
    "Queue": ("flare.queue", "Queue"),
    "Cron": ("flare.cron", "Cron"),
    "Period": ("flare.period", "Period"),
    "Volume": ("flare.volume", "Volume"),
    "enter": ("flare.cls", "enter"),
    "exit": ("flare.cls", "exit"),
    "method": ("flare.cls", "method"),
    "parameter": ("flare.cls", "parameter"),
    "Image": ("flare.image", "Image"),
    "FilePatternMatcher": ("flare.image", "FilePatternMatcher"),
    "FunctionCall": ("flare.function_call", "FunctionCall"),
    "Retries": ("flare._options", "Retries"),
    "concurrent": ("flare.function", "concurrent"),
    "batched": ("flare.batching", "batched"),
    "fastapi_endpoint": ("flare.web_endpoints", "fastapi_endpoint"),
    "web_endpoint": ("flare.web_endpoints", "web_endpoint"),
    "asgi_app": ("flare.web_endpoints", "asgi_app"),
    "wsgi_app": ("flare.web_endpoints", "wsgi_app"),
    "web_server": ("flare.web_endpoints", "web_server"),
    "is_local": ("flare._runtime.context", "is_local"),
    "current_input_id": ("flare._runtime.context", "current_input_id"),
    "current_function_call_id": ("flare._runtime.context", "current_function_call_id"),
    "enable_output": ("flare._output", "enable_output"),
    "Error": ("flare.exception", "Error"),
    "exception": ("flare.exception", None),
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> object:
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'flare' has no attribute {name!r}") from None
    # __import__ and sys.modules rather than importlib.import_module: ``importlib``'s
    # package imports ``warnings``, which a container's start would pay for (~0.4 ms).
    __import__(module_name)
    module = sys.modules[module_name]
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
