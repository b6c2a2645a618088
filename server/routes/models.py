"""Model management, as Xinference's clients drive it: launch, list, describe, terminate, and the catalogue
published as image model registrations."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kiln.engine.catalogue import CATALOGUE, OCR_CATALOGUE
from kiln.engine.schema import PARAMETERS

from ..errors import ApiError, bad_request
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
    """`GET /v1/models/{uid}/replicas` -> {"replica": N, "replicas": [{"id", "status", "pid", "node"}]}."""
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


async def registrations(request: Request) -> Response:
    """`[{"model_name", "is_builtin"}]`, sorted; `?detailed=true` adds each catalogue description."""
    detailed = request.query_params.get("detailed", "false").lower() in ("true", "1")
    return JSONResponse([_registration(name, detailed) for name in sorted(_REGISTRATIONS)])


async def registration(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in _REGISTRATIONS:
        raise ApiError(404, f"no image model registration {name!r}; catalogue models: {', '.join(_REGISTRATIONS)}",
                       param="model_name", code="model_not_found")
    return JSONResponse(_registration(name, detailed=True))


# Xinference lists OCR models among image registrations too (model_type "image", ability "ocr").
_REGISTRATIONS = {**CATALOGUE, **OCR_CATALOGUE}


def _registration(name: str, detailed: bool) -> dict:
    if not detailed:
        return {"model_name": name, "is_builtin": True}
    spec = _REGISTRATIONS[name]
    generation = {"generation_parameters": list(PARAMETERS)} if name in CATALOGUE else {}
    return {**spec.describe(), "model_type": "image", "is_builtin": True, **generation,
            "default_launch_options": dict(spec.default_launch)}
