"""`POST /v1/images/ocr`: Xinference's OCR endpoint.

Multipart: `model` (an OCR model uid; optional in Kiln: the first ready OCR model), `image` (an image file, or a
PDF by content type or `%PDF` magic), `kwargs` (a JSON string, as Xinference's client sends it; an object works
too). Parameters may also come as top-level text fields; they win over `kwargs`, and an unknown one is a 400
naming it. The body is the recognised text as a JSON string, or with `detail` an object with line boxes.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kiln.engine.catalogue import OCR
from kiln.engine.images import ImageTooLarge, NotAnImage
from kiln.engine.ocr import (
    DocumentLimits, OcrParamError, OcrParams, OcrRequest, OcrRunner, open_document, parse_ocr_params,
)
from kiln.engine.textinput import TextInputError, parse_json

from ..errors import ENGINE_ERRORS, ApiError, bad_request, from_engine
from . import context
from .bodies import read_form
from .waiting import ClientGone, client_gone_response, result_or_cancel

FILE_FIELD = "image"
_FORM_FIELDS = ("model", "kwargs")


async def ocr(request: Request) -> Response:
    fields, upload, content_type = await _read_form(request)
    registry = context.registry(request)
    runner = registry.pick(_model(fields), OCR)
    if not isinstance(runner, OcrRunner):  # an image model given the OCR ability by a custom catalogue
        raise bad_request(f"model {runner.uid} is not an OCR model", "model")
    params = _params(runner, fields)
    settings = context.settings(request)
    if len(upload) > settings.max_upload_bytes:
        raise ApiError(413, f"{FILE_FIELD} is {len(upload)} bytes; the limit is {settings.max_upload_bytes}",
                       param=FILE_FIELD, code="upload_too_large")
    limits = DocumentLimits(max_image_pixels=settings.max_image_pixels)
    try:
        document = await asyncio.to_thread(
            open_document, upload, content_type, pages=params.pages, dpi=params.dpi, limits=limits, field=FILE_FIELD,
        )
    except OcrParamError as error:
        raise bad_request(str(error), error.param) from None
    except ImageTooLarge as error:
        raise ApiError(413, f"{FILE_FIELD}: {error}", param=FILE_FIELD, code="image_too_large") from None
    except NotAnImage as error:
        raise ApiError(415, f"{FILE_FIELD}: {error}, or a PDF", param=FILE_FIELD, code="not_an_image") from None
    try:
        handle = runner.submit(OcrRequest(document, params))
    except ENGINE_ERRORS as error:
        document.close()
        raise from_engine(error, registry.retry_after) from None
    try:
        return JSONResponse(await result_or_cancel(request, handle.future, handle.cancel))
    except ClientGone:
        return client_gone_response()


# --- the body ----------------------------------------------------------------------------------------------------
async def _read_form(request: Request) -> tuple[dict[str, str], bytes, str | None]:
    """Text fields, and the one uploaded file with its declared content type."""
    fields, files = await read_form(request, (FILE_FIELD,))
    uploads = files.get(FILE_FIELD, [])
    if not uploads:
        raise bad_request(f"{FILE_FIELD} is required: send the image or PDF as a file in multipart/form-data",
                          FILE_FIELD, "missing_parameter")
    if len(uploads) > 1:
        raise bad_request(f"{FILE_FIELD}: send one file per request (got {len(uploads)}); a PDF carries many pages",
                          FILE_FIELD)
    return fields, *uploads[0]


def _model(fields: dict[str, str]) -> str | None:
    return fields.get("model") or None


def _params(runner: OcrRunner, fields: dict[str, str]) -> OcrParams:
    """`kwargs` (JSON string or object) under the top-level text fields; validated for the model."""
    raw: dict[str, Any] = {}
    text = fields.get("kwargs")
    if text is not None and text.strip() not in ("", "null"):
        try:
            value = parse_json(text)
        except TextInputError as error:
            raise bad_request(f"kwargs must be a JSON object (as a string), e.g. '{{\"detail\": true}}': {error}",
                              "kwargs") from None
        if not isinstance(value, dict):
            raise bad_request(f"kwargs must be a JSON object, got {type(value).__name__}", "kwargs")
        raw.update(value)
    raw.update({name: value for name, value in fields.items() if name not in _FORM_FIELDS})
    try:
        return parse_ocr_params(runner.spec, raw)
    except OcrParamError as error:
        raise bad_request(str(error), error.param) from None
