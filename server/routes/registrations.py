"""Image model registrations, as Xinference publishes and takes them: the catalogue (built-in), the models users
register (`POST`, `DELETE`), and the engines each can launch with."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kiln.engine.catalogue import CATALOGUE, OCR_CATALOGUE
from kiln.engine.ocr.options import OCR_LAUNCH_OPTIONS
from kiln.engine.options import LAUNCH_OPTIONS
from kiln.engine.schema import PARAMETERS

from ..errors import ApiError, bad_request
from ..registrations import Registration, parse_registration
from . import context
from .bodies import read_json_object

# Xinference lists OCR models among image registrations too (model_type "image", ability "ocr").
_BUILTIN = {**CATALOGUE, **OCR_CATALOGUE}


async def registrations(request: Request) -> Response:
    """`[{"model_name", "is_builtin"}]`, sorted; `?detailed=true` adds each description."""
    detailed = request.query_params.get("detailed", "false").lower() in ("true", "1")
    registered = context.registry(request).registrations
    names = sorted({*_BUILTIN, *registered})
    if not detailed:
        return JSONResponse([{"model_name": name, "is_builtin": name in _BUILTIN} for name in names])
    return JSONResponse([_describe(request, name) for name in names])


async def registration(request: Request) -> Response:
    return JSONResponse(_describe(request, request.path_params["name"]))


async def register(request: Request) -> Response:
    """Xinference's `{"model": "<JSON string of a spec>", "persist": bool, "worker_ip": null}`."""
    body = await read_json_object(request)
    unknown = sorted(set(body) - {"model", "persist", "worker_ip"})
    if unknown:
        raise bad_request(f"unknown field {unknown[0]!r}; send model (the spec as a JSON string), persist and "
                          "worker_ip", unknown[0])
    if body.get("worker_ip") is not None:
        raise bad_request("worker_ip is not supported: Kiln registers models on this server", "worker_ip")
    parsed = parse_registration(body.get("model"), body.get("persist"))
    context.registry(request).registrations.add(parsed)
    return JSONResponse(None)


async def unregister(request: Request) -> Response:
    name = request.path_params["name"]
    registry = context.registry(request)
    _registered(request, name)
    running = [runner.uid for runner in registry.runners() if runner.spec.name == name]
    if running:
        raise bad_request(f"model {name!r} is running as {', '.join(running)}; terminate it first", "model_name",
                          "model_running")
    registry.registrations.remove(name)
    return JSONResponse(None)


async def engines(request: Request) -> Response:
    """`GET /v1/engines/image/{model_name}`: `{engine: [{model_name, model_format, launch_options}]}`, the one
    engine each image model launches with and the options it takes."""
    name = request.path_params["model_name"]
    if name in OCR_CATALOGUE:
        engine, options = OCR_CATALOGUE[name].engine, OCR_LAUNCH_OPTIONS
    else:
        if name not in CATALOGUE:
            _registered(request, name)
        engine, options = "diffusers", LAUNCH_OPTIONS
    described = {option: {"description": declared.description, "schema": declared.schema}
                 for option, declared in options.items()}
    return JSONResponse({engine: [{"model_name": name, "model_engine": engine, "model_format": "pytorch",
                                   "launch_options": described}]})


def _registered(request: Request, name: str) -> Registration:
    registration = context.registry(request).registrations.get(name)
    if registration is None:
        if name in _BUILTIN:
            raise bad_request(f"{name!r} is a built-in model; only registered models can be unregistered",
                              "model_name", "model_builtin")
        raise _not_found(request, name)
    return registration


def _not_found(request: Request, name: str) -> ApiError:
    registered = list(context.registry(request).registrations)
    return ApiError(404, f"no image model registration {name!r}; catalogue models: {', '.join(_BUILTIN)}; "
                    f"registered models: {', '.join(registered) or 'none'}", param="model_name",
                    code="model_not_found")


def _describe(request: Request, name: str) -> dict[str, Any]:
    if name in _BUILTIN:
        spec = _BUILTIN[name]
        generation = {"generation_parameters": list(PARAMETERS)} if name in CATALOGUE else {}
        return {**spec.describe(), "model_type": "image", "is_builtin": True, **generation,
                "default_launch_options": dict(spec.default_launch)}
    registration = context.registry(request).registrations.get(name)
    if registration is None:
        raise _not_found(request, name)
    return registration.describe()
