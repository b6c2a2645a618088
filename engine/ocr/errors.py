"""The OCR engine's own exceptions; everything else it raises is one of `engine.requests`'."""

from __future__ import annotations

from kiln.engine.requests import InvalidRequest


class OcrLoadError(ValueError):
    """An OCR model cannot be loaded as asked (no weights, no CUDA provider, a bad model_path); the message says
    what to do. A ValueError, so a launch that hits it is the client's 400, not a server fault."""


class OcrParamError(InvalidRequest):
    """A parameter or the upload is not acceptable (HTTP 400); `param` names the field at fault."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param
