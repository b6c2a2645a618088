"""OpenAI-style image streaming: `text/event-stream` with partial images during denoising, then the finals.

Events are `<prefix>.partial_image` and `<prefix>.completed`, where the prefix is `image_generation` for
/generations and `image_edit` for /edits, exactly as the openai SDK's stream event types expect. Previews come
from the engine's cheap latent -> RGB callback on the scheduler thread and are handed to the event loop here.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import AsyncIterator, Callable

from PIL import Image

from kiln.engine.images import encode
from kiln.engine.requests import RequestHandle
from kiln.engine.schema import Delivery

from .errors import ENGINE_ERRORS, error_body, from_engine

# The completed event's `usage` (OpenAI counts tokens; Kiln has none to count, the SDK expects the object).
_USAGE = {
    "input_tokens": 0,
    "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
    "output_tokens": 0,
    "total_tokens": 0,
}


class PreviewChannel:
    """Carries previews from the scheduler thread to the event loop, then a `None` when the request ends."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.queue: asyncio.Queue[tuple[int, int, Image.Image] | None] = asyncio.Queue()
        self._loop = loop

    def on_preview(self, job_index: int, number: int, image: Image.Image) -> None:
        """The engine's `on_preview` callback (scheduler thread)."""
        self._loop.call_soon_threadsafe(self.queue.put_nowait, (job_index, number, image))

    def watch(self, handle: RequestHandle) -> None:
        """Close the channel when the request ends; previews queued before the end are read first."""
        handle.future.add_done_callback(lambda _: self._loop.call_soon_threadsafe(self.queue.put_nowait, None))


def sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def image_events(
    channel: PreviewChannel,
    handle: RequestHandle,
    delivery: Delivery,
    prefix: str,
    abort: Callable[[], object],
    retry_after: int,
) -> AsyncIterator[bytes]:
    """The event stream of one submitted request. If the client goes away the request is aborted."""
    common = {
        "size": f"{handle.request.width}x{handle.request.height}",
        "quality": "auto",
        "background": "opaque",
        "output_format": delivery.output_format,
    }

    async def b64(image: Image.Image) -> str:
        data = await asyncio.to_thread(encode, image, delivery.output_format, delivery.output_compression)
        return base64.b64encode(data).decode()

    try:
        while (item := await channel.queue.get()) is not None:
            job_index, number, preview = item
            yield sse(f"{prefix}.partial_image", {
                "type": f"{prefix}.partial_image", "created_at": int(time.time()), **common,
                "b64_json": await b64(preview), "partial_image_index": number, "image_index": job_index,
            })
        try:
            images = handle.future.result()
        except ENGINE_ERRORS as error:
            failure = from_engine(error, retry_after)
            yield sse("error", error_body(failure.status, failure.message, code=failure.code))
            return
        for index, generated in enumerate(images):
            yield sse(f"{prefix}.completed", {
                "type": f"{prefix}.completed", "created_at": int(time.time()), **common,
                "b64_json": await b64(generated.image), "usage": _USAGE, "image_index": index,
                "seed": generated.seed,
            })
    finally:
        if not handle.future.done():
            abort()
