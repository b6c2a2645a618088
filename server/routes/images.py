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
from kiln.engine.controlnet_units import PART, ControlUnit, complete_units, with_image
from kiln.engine.images import ImageStore, ImageTooLarge, NotAnImage, decode_upload, encode, media_type
from kiln.engine.endpoint import ModelEndpoint
from kiln.engine.requests import GeneratedImage, ImageRequest, RequestHandle
from kiln.engine.schema import Delivery, ParsedRequest, fit_size, parse_image_request, read_kwargs

from ..errors import ApiError, bad_request
from ..streaming import PreviewChannel, image_events
from . import context
from .bodies import Upload, read_form, read_json_object
from .waiting import ClientGone, client_gone_response, result_or_cancel

_IMAGE_FIELDS = ("image", "image[]", "images", "images[]")  # OpenAI's and Xinference's spellings
_CONTROL_FIELD = "control_image"  # ControlNet units' images as multipart files, in unit order


# --- endpoints -------------------------------------------------------------------------------------------------
async def generations(request: Request) -> Response:
    """Text to image (JSON body)."""
    body = await read_json_object(request)
    runner = context.registry(request).pick(_model_name(body), TEXT2IMAGE)
    parsed = parse_image_request(runner.spec, body, limits=context.settings(request).limits, mode=TEXT2IMAGE)
    await _complete_controlnet(request, runner, parsed, [])
    return await _generate(request, runner, parsed, prefix="image_generation")


async def variations(request: Request) -> Response:
    """Image to image (multipart), Xinference's and OpenAI's form; the prompt is optional. On a model launched
    with ControlNet and without `controlnet` units in the request, Xinference's ControlNet form: `image` is the
    control image of the launched ControlNets (one for all, or one each) and the job is text to image."""
    fields, files = await read_form(request, _IMAGE_FIELDS + (_CONTROL_FIELD,))
    registry = context.registry(request)
    uid = _model_name(fields)
    launched = _launched_controlnets(registry.runner(uid)) if uid is not None else ()
    if not launched or PART in fields or PART in read_kwargs(fields.get("kwargs")):
        return await _from_form(request, mask_field=None, prompt_required=False, prefix="image_generation",
                                form=(fields, files))
    runner = registry.pick(uid, TEXT2IMAGE)
    uploads = [upload.data for name in _IMAGE_FIELDS for upload in files.get(name, [])]
    if not uploads:
        raise bad_request("image is required: on a model launched with ControlNet it is the control image; send it "
                          "as a file in multipart/form-data", "image", "missing_parameter")
    if len(uploads) not in (1, len(launched)):
        raise bad_request(f"image: send one control image for all {len(launched)} launched ControlNets "
                          f"({', '.join(launched)}) or one each, not {len(uploads)}", "image")
    first = await read_upload(request, uploads[0], "image")
    parsed = parse_image_request(runner.spec, fields, limits=context.settings(request).limits, mode=TEXT2IMAGE,
                                 default_size=fit_size(runner.spec, *first.size), prompt_required=False)
    if parsed.request.strength is not None:
        raise bad_request("strength: on a model launched with ControlNet, /v1/images/variations' image is the "
                          "control image (Xinference's form) and there is no input image to keep; send the input "
                          "image with controlnet units to run image to image with ControlNet", "strength")
    units = tuple(ControlUnit(name) for name in launched)
    inputs = parsed.request.part_inputs.get(PART, {})
    parsed.request.part_inputs = {**parsed.request.part_inputs, PART: {**inputs, PART: units}}
    await _complete_controlnet(request, runner, parsed, uploads * len(launched) if len(uploads) == 1 else uploads,
                               "image")
    return await _generate(request, runner, parsed, prefix="image_generation")


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
    request: Request, *, mask_field: str | None, prompt_required: bool, prefix: str, mask_required: bool = False,
    form: tuple[dict, dict] | None = None,
) -> Response:
    """The multipart endpoints: one input image, an optional mask (required for Xinference's inpainting), and
    a size that defaults to the input's. A mask makes it inpainting, else image to image. `form`: the body when
    the caller has read it already."""
    fields, files = form or await read_form(request, _IMAGE_FIELDS + ((mask_field,) if mask_field else ())
                                            + (_CONTROL_FIELD,))
    mask_data = _one_file(files, (mask_field,), required=mask_required) if mask_field else None
    ability = INPAINTING if mask_data is not None else IMAGE2IMAGE
    runner = context.registry(request).pick(_model_name(fields), ability)
    image = await read_upload(request, _one_file(files, _IMAGE_FIELDS, required=True), "image")
    mask = await _mask(request, mask_data, mask_field, image) if mask_data is not None else None
    parsed = parse_image_request(runner.spec, fields, limits=context.settings(request).limits, mode=ability,
                                 default_size=fit_size(runner.spec, *image.size), prompt_required=prompt_required,
                                 image=image, mask=mask)
    await _complete_controlnet(request, runner, parsed, [upload.data for upload in files.get(_CONTROL_FIELD, [])])
    return await _generate(request, runner, parsed, prefix=prefix)


# --- ControlNet ------------------------------------------------------------------------------------------------
def _launched_controlnets(runner: ModelEndpoint) -> tuple[str, ...]:
    return tuple(name for name, _ in getattr(runner.options, "controlnet", ()))


async def _complete_controlnet(request: Request, runner: ModelEndpoint, parsed: ParsedRequest, uploads: list[bytes],
                               field: str = _CONTROL_FIELD) -> None:
    """Complete the request's ControlNet units in place: decode their images off the event loop (a unit's
    base64 image, else the next of `uploads`, files of the form field `field`), preprocess them, and fill in
    diffusers' kwargs and the defaults (engine.controlnet_units). `controlnet: []` asks for none."""
    inputs = parsed.request.part_inputs.get(PART)
    if inputs is None:
        if uploads:
            raise bad_request(f"{field}: the request sends control images but no controlnet units; add "
                              "controlnet: [{\"name\": ...}]", field)
        return
    units = inputs.get(PART)
    if units == () and set(inputs) == {PART}:  # `controlnet: []`: none (variations runs image to image then)
        parsed.request.part_inputs = {key: value for key, value in parsed.request.part_inputs.items() if key != PART}
        return
    if not units:
        given = next(key for key in inputs if key != PART) if set(inputs) - {PART} else PART
        raise bad_request(f"{given}: the request has no ControlNet units to apply it to; add controlnet: "
                          "[{\"name\": ..., \"image\": ...}]", given)
    pending, done = list(uploads), []
    for index, unit in enumerate(units):
        where = f"controlnet[{index}].image"
        if unit.image is None:
            if not pending:
                raise bad_request(f"{where} is missing: give it in the unit (base64) or as a multipart file named "
                                  f"{_CONTROL_FIELD}", PART, "missing_parameter")
            data, where = pending.pop(0), field
        else:
            data = unit.image
        image = await read_upload(request, data, where)
        done.append(await asyncio.to_thread(with_image, unit, image))
    if pending:
        raise bad_request(f"{field}: {len(uploads)} files for {len(uploads) - len(pending)} ControlNet units without "
                          "an image; send one file per such unit", field)
    complete = complete_units(done, inputs, _launched_controlnets(runner))
    parsed.request.part_inputs = {**parsed.request.part_inputs, PART: {PART: complete}}


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

