"""Exceptions raised by Flare (mirrors ``modal.exception``)."""

from __future__ import annotations

import builtins


class Error(Exception):
    """Base class for all Flare errors."""


class NotFoundError(Error):
    """An app, function or call does not exist."""


class InvalidError(Error):
    """Invalid use of the API (bad arguments or configuration)."""


class ExecutionError(Error):
    """Something went wrong while running a function (not the user's code)."""


class RemoteError(Error):
    """A remote exception that could not be reconstructed locally."""


class ImageBuildError(RemoteError):
    """An image build step failed; the message has the step and its output's last lines."""


class FunctionTimeoutError(Error):
    """An input ran longer than the function's ``timeout``."""


class InputCancellation(BaseException):
    """The input was cancelled (like Modal's, a BaseException so user code cannot swallow it by accident)."""


class OutOfMemoryError(Error):
    """The container exceeded its memory limit and was killed."""


class PayloadTooLargeError(InvalidError):
    """A request, an argument or a result is over the server's size limit (``docs/PROTOCOL.md``)."""


class SerializationError(Error):
    """A value could not be serialized (pickled) or deserialized."""


class DeserializationError(SerializationError):
    """A value could not be deserialized."""


class TimeoutError(Error, builtins.TimeoutError):
    """A client-side wait (e.g. ``FunctionCall.get(timeout=...)``) ran out."""


class ConnectionError(Error, builtins.ConnectionError):
    """The Flare server could not be reached."""


class ResourceExhaustedError(ExecutionError):
    """HTTP 429: the server asks for the same request again later (a ``.map``'s inputs
    while its caller has not read enough of the outputs: back-pressure)."""


class ServerError(Error):
    """The server answered with an internal error."""


class ConflictError(Error):
    """The request conflicts with the current state."""


class RemoteTraceback(Exception):
    """Carries the traceback text of an exception raised in a container.

    Attached as ``__cause__`` of re-raised remote exceptions, so that the standard
    traceback printout shows the remote frames first (like ``concurrent.futures``).
    """

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return '\n"""\n' + self.tb.rstrip("\n") + '\n"""'
