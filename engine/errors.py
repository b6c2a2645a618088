"""The engine's exceptions, in one torch-free module so that every layer (options, loading, backends, the
server's one error boundary) can raise and catch them without importing each other.

The server maps each to its HTTP meaning in one place (`server/errors.py`): InvalidRequest 400 (naming `param`),
QueueFull 429, RequestAborted 409, ModelLoadError 400 at launch, LaunchCancelled 499 (Xinference's), EngineError
500.
"""

from __future__ import annotations


class EngineError(RuntimeError):
    """A request failed inside the engine (a fault in its own jobs, never a neighbour's)."""


class InvalidRequest(ValueError):
    """Client input that cannot run (a request parameter, a launch option, an upload); nothing was queued or
    changed. `param` names the field at fault when there is one; `code` is the error code clients see."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_parameter"):
        super().__init__(message)
        self.param = param
        self.code = code


class QueueFull(RuntimeError):
    """The waiting queue is at its bound; the client should retry later (HTTP 429)."""


class RequestAborted(RuntimeError):
    """The request was cancelled by its client or an abort call (HTTP 409)."""


class ModelLoadError(RuntimeError):
    """A model cannot be loaded as asked; the message says why and what to do."""


class LaunchCancelled(RuntimeError):
    """A launch was cancelled (`POST /v1/models/{uid}/cancel`) before its model was ready."""
