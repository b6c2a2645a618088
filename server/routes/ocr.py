"""`POST /v1/images/ocr`: Xinference's OCR endpoint.

Multipart: `model` (an OCR model uid; optional in Kiln: the first ready OCR model), `image` (an image file, or a
PDF by content type or `%PDF` magic), `kwargs` (a JSON string, as Xinference's client sends it; an object works
too). Parameters may also come as top-level text fields; they win over `kwargs`, and an unknown one is a 400
naming it. The body is the recognised text as a JSON string, or with `detail` an object with line boxes.
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kiln.engine.catalogue import OCR
from kiln.engine.images import ImageTooLarge, NotAnImage
from kiln.engine.ocr import (
    DocumentLimits, OcrRequest, open_document, parse_ocr_fields,
)

from ..errors import ApiError, bad_request
from . import context
from .bodies import read_form
from .waiting import ClientGone, client_gone_response, result_or_cancel

FILE_FIELD = "image"


async def ocr(request: Request) -> Response:
    fields, upload, content_type = await _read_form(request)
    registry = context.registry(request)
    runner = registry.pick(_model(fields), OCR)
    params = parse_ocr_fields(runner.spec, fields)
    settings = context.settings(request)
    if len(upload) > settings.max_upload_bytes:
        raise ApiError(413, f"{FILE_FIELD} is {len(upload)} bytes; the limit is {settings.max_upload_bytes}",
                       param=FILE_FIELD, code="upload_too_large")
    limits = DocumentLimits(max_image_pixels=settings.max_image_pixels)
    try:
        document = await asyncio.to_thread(
            open_document, upload, content_type, pages=params.pages, dpi=params.dpi, limits=limits, field=FILE_FIELD,
        )
    except ImageTooLarge as error:
        raise ApiError(413, f"{FILE_FIELD}: {error}", param=FILE_FIELD, code="image_too_large") from None
    except NotAnImage as error:
        raise ApiError(415, f"{FILE_FIELD}: {error}, or a PDF", param=FILE_FIELD, code="not_an_image") from None
    try:
        handle = runner.submit(OcrRequest(document, params))
    except Exception:
        document.close()
        raise
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
