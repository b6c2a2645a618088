"""Progress and abort of one request by its `request_id`, in Xinference's form."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from . import context
from ..errors import ApiError



async def progress(request: Request) -> Response:
    """`{"progress": 0..1}`: denoising steps done over all of the request's images (1.0 once it ended)."""
    request_id = request.path_params["request_id"]
    progress = context.registry(request).request_progress(request_id)
    if progress is None:
        raise ApiError(404, f"no request with request_id {request_id!r} (unknown, or finished long ago); put "
                       f"\"request_id\" in the request's parameters to follow it", code="request_not_found")
    return JSONResponse({"progress": progress})


async def abort(request: Request) -> Response:
    """`{"msg": "DONE"|"NO_OP"|"NOT_FOUND"}`. The aborted request answers 409; its jobs leave the batch at the
    next step. Xinference's `block_duration` body is accepted and ignored (Kiln refuses duplicate running ids
    instead of blocking ids)."""
    runner = context.registry(request).runner(request.path_params["uid"])
    return JSONResponse({"msg": runner.abort(request.path_params["request_id"])})
