"""Model management, as Xinference's clients and CLI drive it: launch (with its progress and cancel), list,
describe, the instance records, terminate."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..errors import bad_request
from . import context
from .bodies import read_json_object


async def launch(request: Request) -> Response:
    """`POST /v1/models[?wait_ready=false]` -> {"model_uid"}."""
    wait_ready = request.query_params.get("wait_ready", "true").lower()
    if wait_ready not in ("true", "false", "1", "0"):
        raise bad_request(f"wait_ready must be true or false, got {wait_ready!r}", "wait_ready")
    body = await read_json_object(request)
    uid = await context.registry(request).launch(body, wait_ready=wait_ready in ("true", "1"))
    return JSONResponse({"model_uid": uid})


async def list_models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": context.registry(request).describe_all()})


async def describe(request: Request) -> Response:
    return JSONResponse(context.registry(request).describe(request.path_params["uid"]))


async def replicas(request: Request) -> Response:
    """`GET /v1/models/{uid}/replicas` -> {"replica": N, "replicas": [{"id", "status", "pid", "node", "loras"}]}."""
    description = context.registry(request).describe(request.path_params["uid"])
    return JSONResponse({"replica": description["replica"], "replicas": description.get("replicas", [])})


async def scale(request: Request) -> Response:
    """`POST /v1/models/{uid}/replicas` {"replica": N}: change the replica count without restarting the others."""
    body = await read_json_object(request)
    if "replica" not in body:
        raise bad_request('send {"replica": N}, the number of replicas wanted', "replica", "missing_parameter")
    uid = request.path_params["uid"]
    await context.registry(request).scale(uid, body["replica"])
    return JSONResponse({"model_uid": uid, "replica": body["replica"]})


async def terminate(request: Request) -> Response:
    """Xinference answers a terminate with a JSON null."""
    await context.registry(request).terminate(request.path_params["uid"])
    return JSONResponse(None)


async def instances(request: Request) -> Response:
    """`GET /v1/models/instances[?model_name=&model_uid=]`: Xinference's instance records, status CREATING,
    LOADING, READY, ERROR, TERMINATING or TERMINATED (the last ones of ended models are kept a while)."""
    query = request.query_params
    return JSONResponse(context.registry(request).instances(query.get("model_name") or None,
                                                            query.get("model_uid") or None))


async def launch_progress(request: Request) -> Response:
    """`{"progress": 0..1}` of a launch: the load stages done, what Xinference's CLI polls."""
    return JSONResponse({"progress": context.registry(request).launch_progress(request.path_params["uid"])})


async def cancel(request: Request) -> Response:
    """Cancel a launch under way: its uid is free at once, and its load stops at the next stage."""
    context.registry(request).cancel(request.path_params["uid"])
    return JSONResponse(None)
