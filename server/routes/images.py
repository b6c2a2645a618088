"""The image endpoints: read the body, pick the model, validate, submit, await (watching for a client that
leaves), and format. All four share `_generate`; they differ only in how the body arrives and which images
go with it.
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

from PIL import Image
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from kiln.engine.catalogue import IMAGE2IMAGE, INPAINTING, TEXT2IMAGE
from kiln.engine.images import ImageStore, ImageTooLarge, NotAnImage, decode_upload, encode, media_type
from kiln.engine.endpoint import ModelEndpoint
from kiln.engine.requests import GeneratedImage, ImageRequest, RequestHandle
from kiln.engine.schema import Delivery, ParsedRequest, fit_size, parse_image_request

from ..errors import ApiError, bad_request
from ..streaming import PreviewChannel, image_events
from . import context
from .bodies import Upload, read_form, read_json_object
from .waiting import ClientGone, client_gone_response, result_or_cancel

_IMAGE_FIELDS = ("image", "image[]", "images", "images[]")  # OpenAI's and Xinference's spellings


# --- endpoints -------------------------------------------------------------------------------------------------
async def generations(request: Request) -> Response:
    """Text to image (JSON body)."""
    body = await read_json_object(request)
    runner = context.registry(request).pick(_model_name(body), TEXT2IMAGE)
    parsed = parse_image_request(runner.spec, body, limits=context.settings(request).limits, mode=TEXT2IMAGE)
    return await _generate(request, runner, parsed, prefix="image_generation")


async def variations(request: Request) -> Response:
    """Image to image (multipart), Xinference's and OpenAI's form; the prompt is optional."""
    return await _from_form(request, mask_field=None, prompt_required=False, prefix="image_generation")


async def inpainting(request: Request) -> Response:
    """Xinference's inpainting (multipart): `image` plus `mask_image` (white = repaint)."""
    return await _from_form(request, mask_field="mask_image", mask_required=True, prompt_required=False,
                            prefix="image_generation")


async def edits(request: Request) -> Response:
    """OpenAI's edit (multipart): with `mask` it inpaints, without it runs image to image; `model` optional."""
    return await _from_form(request, mask_field="mask", prompt_required=True, prefix="image_edit")


async def stored_file(request: Request) -> Response:
    """A stored `url` image; unknown or expired names are 404."""
    name = request.path_params["name"]
    data = await asyncio.to_thread(context.store(request).read, name)
    if data is None:
        raise ApiError(404, f"no image {name!r}: it never existed or has expired (images are kept "
                       f"{context.store(request).ttl:g} seconds)", code="file_not_found")
    return Response(data, media_type=media_type(name), headers={"Cache-Control": "private, max-age=3600"})


# --- the shared path -------------------------------------------------------------------------------------------
async def _from_form(
    request: Request, *, mask_field: str | None, prompt_required: bool, prefix: str, mask_required: bool = False
) -> Response:
    """The multipart endpoints: one input image, an optional mask (required for Xinference's inpainting), and
    a size that defaults to the input's. A mask makes it inpainting, else image to image."""
    fields, files = await read_form(request, _IMAGE_FIELDS + ((mask_field,) if mask_field else ()))
    mask_data = _one_file(files, (mask_field,), required=mask_required) if mask_field else None
    ability = INPAINTING if mask_data is not None else IMAGE2IMAGE
    runner = context.registry(request).pick(_model_name(fields), ability)
    image = await read_upload(request, _one_file(files, _IMAGE_FIELDS, required=True), "image")
    mask = await _mask(request, mask_data, mask_field, image) if mask_data is not None else None
    parsed = parse_image_request(runner.spec, fields, limits=context.settings(request).limits, mode=ability,
                                 default_size=fit_size(runner.spec, *image.size), prompt_required=prompt_required,
                                 image=image, mask=mask)
    return await _generate(request, runner, parsed, prefix=prefix)


async def _generate(request: Request, runner: ModelEndpoint, parsed: ParsedRequest, *, prefix: str) -> Response:
    delivery = parsed.delivery
    if delivery.stream:
        channel = PreviewChannel(asyncio.get_running_loop())
        handle = _submit(request, runner, parsed.request, channel.on_preview)
        channel.watch(handle)
        events = image_events(channel, handle, delivery, prefix, lambda: runner.abort(handle.request.request_id),
                              context.registry(request).retry_after)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    handle = _submit(request, runner, parsed.request)
    try:
        images = await result_or_cancel(request, handle.future, lambda: runner.abort(handle.request.request_id))
    except ClientGone:
        return client_gone_response()
    base_url = context.base_url(request)
    data = await asyncio.to_thread(_items, images, delivery, context.store(request), base_url)
    return JSONResponse({"created": int(time.time()), "data": data})


def _submit(request: Request, runner: ModelEndpoint, image_request: ImageRequest, on_preview=None) -> RequestHandle:
    progress = context.registry(request).request_progress(image_request.request_id)
    if progress is not None and progress < 1.0:
        raise bad_request(f"request_id {image_request.request_id!r} is already running; use a new one",
                          "request_id", "duplicate_request_id")
    return runner.submit(image_request, on_preview=on_preview)


def _items(images: list[GeneratedImage], delivery: Delivery, store: ImageStore, base_url: str) -> list[dict]:
    """Encode and format the data items (a worker thread: encoding is CPU work)."""
    items = []
    for generated in images:
        data = encode(generated.image, delivery.output_format, delivery.output_compression)
        if delivery.response_format == "url":
            url = f"{base_url}v1/images/files/{store.put(data, delivery.output_format)}"
            items.append({"url": url, "b64_json": None, "seed": generated.seed})
        else:
            items.append({"url": None, "b64_json": base64.b64encode(data).decode(), "seed": generated.seed})
    return items


# --- uploads ---------------------------------------------------------------------------------------------------
def _one_file(files: dict[str, list[Upload]], names: tuple[str, ...], *, required: bool) -> bytes | None:
    uploads = [upload.data for name in names for upload in files.get(name, [])]
    if len(uploads) > 1:
        raise bad_request(f"{names[0]}: send one file; Kiln edits one input image per request (got {len(uploads)})",
                          names[0])
    if not uploads and required:
        raise bad_request(f"{names[0]} is required: send it as a file in multipart/form-data", names[0],
                          "missing_parameter")
    return uploads[0] if uploads else None


async def read_upload(request: Request, data: bytes, field: str, mode: str = "RGB") -> Image.Image:
    """Decode one uploaded image off the event loop; 413 past the byte or pixel bounds, 415 if it is not an
    image."""
    config = context.settings(request)
    if len(data) > config.max_upload_bytes:
        raise ApiError(413, f"{field} is {len(data)} bytes; the limit is {config.max_upload_bytes}", param=field,
                       code="upload_too_large")
    try:
        return await asyncio.to_thread(decode_upload, data, config.max_image_pixels, mode)
    except ImageTooLarge as error:
        raise ApiError(413, f"{field}: {error}", param=field, code="image_too_large") from None
    except NotAnImage as error:
        raise ApiError(415, f"{field}: {error}", param=field, code="not_an_image") from None


async def _mask(request: Request, data: bytes, field: str, image: Image.Image) -> Image.Image:
    mask = await read_upload(request, data, field, mode="L")
    if mask.size != image.size:
        raise bad_request(f"{field} is {mask.size[0]}x{mask.size[1]} but the image is {image.size[0]}x"
                          f"{image.size[1]}; the mask must have the image's size", field, "mask_size_mismatch")
    return mask


def _model_name(fields: dict[str, Any]) -> str | None:
    model = fields.get("model")
    if model is None or model == "":
        return None
    if not isinstance(model, str):
        raise bad_request(f"model must be a model uid string, got {model!r}", "model")
    return model

