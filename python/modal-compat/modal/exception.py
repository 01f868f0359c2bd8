"""Modal's ``modal.exception`` names on Flare's exceptions (``flare.exception``).

Every name is Flare's own class, so ``except modal.exception.NotFoundError`` catches what
Flare raises. Two Modal names are spelled differently in Flare and mean the same thing:
``InternalError`` is ``flare.exception.ServerError`` and ``RequestSizeError`` is
``flare.exception.PayloadTooLargeError``. A Modal name Flare has no class for raises
``ImportError`` saying so (docs/COMPAT.md).
"""

from __future__ import annotations

from . import _compat

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# Modal's exception module's public names (client 1.5.4).
MODAL_NAMES = (
    "AlreadyExistsError",
    "AsyncUsageWarning",
    "AuthError",
    "ClientClosed",
    "ConflictError",
    "ConnectionError",
    "DataLossError",
    "DeprecationError",
    "DeserializationError",
    "Error",
    "ExecTimeoutError",
    "ExecutionError",
    "FilesystemExecutionError",
    "FunctionTimeoutError",
    "ImageBuildError",
    "InputCancellation",
    "InteractiveTimeoutError",
    "InternalError",
    "InternalFailure",
    "InvalidError",
    "LogsFetchError",
    "ModuleNotMountable",
    "MountUploadTimeoutError",
    "NotFoundError",
    "OutputExpiredError",
    "PermissionDeniedError",
    "RemoteError",
    "RequestSizeError",
    "ResourceExhaustedError",
    "SandboxFilesystemDirectoryNotEmptyError",
    "SandboxFilesystemError",
    "SandboxFilesystemFileTooLargeError",
    "SandboxFilesystemIsADirectoryError",
    "SandboxFilesystemNotADirectoryError",
    "SandboxFilesystemNotFoundError",
    "SandboxFilesystemPathAlreadyExistsError",
    "SandboxFilesystemPermissionError",
    "SandboxTerminatedError",
    "SandboxTimeoutError",
    "SerializationError",
    "ServerWarning",
    "ServiceError",
    "SnapshotCreationError",
    "TimeoutError",
    "UnimplementedError",
    "VersionError",
    "VolumeUploadTimeoutError",
    "WorkspaceManagementError",
    "simulate_preemption",
)

# Modal names whose Flare class has another name (same meaning).
RENAMED = {
    "InternalError": "ServerError",
    "RequestSizeError": "PayloadTooLargeError",
}


def _flare_exception(name: str) -> Any:
    import flare.exception as fe

    value = getattr(fe, RENAMED.get(name, name), None)
    if isinstance(value, type) and issubclass(value, BaseException):
        return value
    return None


def __getattr__(name: str) -> Any:
    value = _compat.resolve("modal.exception", name, MODAL_NAMES, _flare_exception)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = sorted(_compat.available(MODAL_NAMES, lambda name: _flare_exception(name) is not None))
