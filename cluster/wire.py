"""What crosses between the front and a replica: requests as plain data, and the events a replica streams back.

A replica streams, for one request: `accepted` (which replica took it), `progress`, `partial` (a preview), then
`done` or `error`. Images travel as raw pixels (mode, size, bytes): lossless, and neither side spends CPU on PNG.
Seeds are drawn before a request leaves the front, so a retry on another replica gives the same images. Engine
exceptions travel as their class name and message and are raised again on the front, where the app's one error
boundary turns them into HTTP errors exactly as in single-process Kiln. A request's per-row LoRAs also travel
as its Serve multiplexed model id (`request_lora_set`), which the router and the replica read.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

from PIL import Image

from kiln.engine.errors import EngineError, InvalidRequest, QueueFull, RequestAborted
from kiln.engine.lora_options import requested
from kiln.engine.requests import ImageRequest, draw_seeds

_ERRORS = {cls.__name__: cls for cls in (InvalidRequest, QueueFull, RequestAborted, EngineError)}


def pack_image(image: Image.Image) -> dict[str, Any]:
    return {"mode": image.mode, "size": image.size, "data": image.tobytes()}


def unpack_image(packed: dict[str, Any]) -> Image.Image:
    return Image.frombytes(packed["mode"], tuple(packed["size"]), packed["data"])


def request_payload(request: ImageRequest) -> dict[str, Any]:
    """An image request as plain data, with one seed drawn per image (`draw_seeds`)."""
    fields = {f.name: getattr(request, f.name) for f in dataclasses.fields(ImageRequest)}
    fields["seed"] = draw_seeds(request.seed, request.image_count)
    for name in ("image", "mask"):
        if fields[name] is not None:
            fields[name] = pack_image(fields[name])
    return fields


def image_request(payload: dict[str, Any]) -> ImageRequest:
    fields = dict(payload)
    for name in ("image", "mask"):
        if fields[name] is not None:
            fields[name] = unpack_image(fields[name])
    return ImageRequest(**fields)


def request_work(payload: dict[str, Any]) -> float:
    """What routing weighs a request by: images x steps x pixels (image to image runs steps x strength)."""
    strength = payload.get("strength") or 1.0
    steps = max(1, int(payload["steps"] * (strength if payload.get("image") is not None else 1.0)))
    images = len(payload["seed"])
    return float(images * steps * payload["width"] * payload["height"])


def lane_of(payload: dict[str, Any]) -> list[int]:
    """The lane key the replica's scheduler will put the request in (width x height today)."""
    return [payload["width"], payload["height"]]


def lora_set_id(names: Iterable[str]) -> str:
    """The Serve multiplexed model id of a request's LoRAs: its names, sorted and joined by "/" (no LoRA name
    holds one). Scales do not change which LoRAs must be resident, so they are left out; "" is no LoRA."""
    return "/".join(sorted(set(names)))


def lora_set_names(set_id: str) -> list[str]:
    """The inverse of `lora_set_id`."""
    return set_id.split("/") if set_id else []


def request_lora_set(request: ImageRequest, options: Any) -> str:
    """The set id of the LoRAs a request runs with (its `lora` field, else the launch default) when the model
    runs per-row LoRAs; "" otherwise (fused LoRAs are in every replica's weights). InvalidRequest as the
    replica would raise it."""
    config = options.lora
    if not config.per_row:
        return ""
    return lora_set_id(name for name, _ in requested(request.part_inputs.get("lora", {}), config.default_selection()))


def error_event(error: BaseException) -> dict[str, Any]:
    """An engine exception as an event; anything else is an internal EngineError with its message."""
    known = isinstance(error, tuple(_ERRORS.values()))
    name = next(n for n, cls in _ERRORS.items() if isinstance(error, cls)) if known else "EngineError"
    message = str(error) if known else f"{type(error).__name__}: {error}"
    event = {"type": "error", "error": name, "message": message}
    if isinstance(error, InvalidRequest):
        event.update(param=error.param, code=error.code)
    return event


def raise_error(event: dict[str, Any]) -> BaseException:
    """The exception an `error` event stands for."""
    cls = _ERRORS.get(event["error"], EngineError)
    if cls is InvalidRequest:
        return InvalidRequest(event["message"], event.get("param"), event.get("code") or "invalid_parameter")
    return cls(event["message"])
