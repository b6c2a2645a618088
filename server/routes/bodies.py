"""Reading request bodies into plain values: a JSON object, or multipart text fields and file bytes.

The body size is bounded while it is read (see `server.app.BodyLimit`), so nothing here can be made to buffer
more than the server's limit. Every malformed body is a 4xx that says what to send instead.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from starlette.datastructures import UploadFile
from starlette.requests import Request

from kiln.engine.textinput import TextInputError, parse_json

from ..errors import ApiError, bad_request

MAX_FILES = 8
MAX_FIELDS = 100


async def read_json_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object (whatever the Content-Type says, as curl users often send none)."""
    body = await request.body()
    if not body.strip():
        raise bad_request("the request body is empty; send a JSON object", code="invalid_json")
    try:
        value = parse_json(body)
    except TextInputError as error:
        raise bad_request(f"the request body is not valid JSON: {error}", code="invalid_json") from None
    if not isinstance(value, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(value).__name__}", code="invalid_json")
    return value


class Upload(NamedTuple):
    """One uploaded file: its bytes and the content type its part declared (None when it declared none)."""

    data: bytes
    content_type: str | None


async def read_form(request: Request, file_fields: tuple[str, ...]) -> tuple[dict[str, str], dict[str, list[Upload]]]:
    """A multipart body as (text fields, uploads by field name). A repeated text field keeps its last value;
    files may repeat. A file under any other name than `file_fields`, or text under one of them, is a 400."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise ApiError(415, f"send multipart/form-data (this endpoint takes image uploads), not "
                       f"{content_type or 'a body without Content-Type'}", code="unsupported_media_type")
    form = await request.form(max_files=MAX_FILES, max_fields=MAX_FIELDS)
    fields: dict[str, str] = {}
    files: dict[str, list[Upload]] = {}
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name not in file_fields:
                    raise bad_request(f"{name!r} must be a text field, not a file; this endpoint takes files in: "
                                      f"{', '.join(file_fields)}", name)
                files.setdefault(name, []).append(Upload(await value.read(), value.content_type))
            elif name in file_fields:
                raise bad_request(f"{name} must be a file upload (multipart file part), not text", name)
            else:
                fields[name] = value
    finally:
        await form.close()
    return fields, files
