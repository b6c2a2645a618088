"""Waiting on the engine from a route: the result, or, when the client disconnects first, a cancelled request."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from typing import Any, Callable

from starlette.requests import Request
from starlette.responses import Response

from ..errors import error_response


class ClientGone(Exception):
    """The client disconnected while its request ran; the request was cancelled."""


def client_gone_response() -> Response:
    """What a disconnected client would have been told (logged as 499, as nginx does)."""
    return error_response(499, "client disconnected; the request was aborted", code="client_disconnected")


async def result_or_cancel(request: Request, future: Future, cancel: Callable[[], Any]) -> Any:
    """The engine's result (or its exception, which the app's handlers turn into the HTTP error); if the client
    disconnects first, `cancel()` the request (its jobs leave the batch) and raise ClientGone."""
    result = asyncio.wrap_future(future)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not result.done():  # the client left, or this task was cancelled
            cancel()
            result.add_done_callback(lambda done: done.cancelled() or done.exception())  # nobody awaits it
    if not result.done():
        raise ClientGone()
    return result.result()


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so only a disconnect can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
