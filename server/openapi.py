"""The OpenAPI 3.1 document of Kiln's HTTP API (`GET /openapi.json`), generated from the declarations the
validators run on, so the two cannot drift: the image request parameters (`engine.schema.PARAMETERS`, with the
server's own Limits as ranges), the launch options (`engine.options`, `engine.ocr.options`), the OCR parameters
(`engine.ocr.params`), the client fields a launch accepts (`server.registry`), A1111's fields (`server.a1111`) and
the one error shape (`server.errors`).

`OPERATIONS` says, for each route of the routing table, what its body and answers are; `document(app)` walks the
app's routes and describes each one found there (a route missing from `OPERATIONS` is missing from the document,
which tests/server/test_openapi.py catches). The pages that only serve the document (/openapi.json, /docs) and
the playground (/ui) are not in it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from starlette.routing import Route

from kiln.engine.catalogue import CATALOGUE, MIN_SIZE
from kiln.engine.families.specs import FAMILY_SPECS
from kiln.engine.ocr.options import OCR_LAUNCH_OPTIONS
from kiln.engine.ocr.params import OCR_PARAMETERS
from kiln.engine.options import LAUNCH_OPTIONS
from kiln.engine.samplers import sampler_names
from kiln.engine.schema import IGNORED_FIELDS, PARAMETERS, PROMPT, SEED, Limits, Parameter

from . import a1111
from .registrations import ABILITIES
from .registry import CLIENT_FIELDS

# The pages that serve the document, and the playground (`/` redirects to it): web pages, not the API.
UNDOCUMENTED = frozenset({"/openapi.json", "/docs", "/", "/ui", "/ui/config.json"})
Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


# --- request parameters, from their declarations ----------------------------------------------------------------
def parameter_schema(parameter: Parameter, limits: Limits, text: bool = False) -> Schema:
    """The JSON schema of one request parameter with its range (bounds read from `limits`) and choices. `text`:
    as a multipart field, where prompts and seeds are one text value."""
    if text and parameter.kind is PROMPT:
        schema: Schema = {"type": "string"}
    elif text and parameter.kind is SEED:
        schema = {"oneOf": [{"type": "integer"}, {"type": "string", "description": "a JSON list of seeds"}]}
    else:
        schema = dict(parameter.kind.json_schema)
    low, high = parameter.bounds(limits)
    target = schema.get("oneOf", [schema])[0] if "oneOf" in schema else schema
    if low is not None:
        target["exclusiveMinimum" if parameter.low_open else "minimum"] = low
    if high is not None:
        target["maximum"] = high
    if parameter.name in ("width", "height"):
        target.update(minimum=MIN_SIZE, maximum=max(spec.max_size for spec in CATALOGUE.values()),
                      multipleOf=min(family.stride for family in FAMILY_SPECS.values()))
    choices = sampler_names(False) if callable(parameter.choices) else parameter.choices
    if choices:
        schema["enum"] = list(choices)
    schema["description"] = parameter.description
    return schema


def _kwargs_field() -> Schema:
    return {"description": "More parameters, as a JSON string (Xinference's clients send one) or an object.",
            "oneOf": [{"type": "string"}, {"type": "object"}]}


def generation_request(limits: Limits) -> Schema:
    properties = {name: parameter_schema(p, limits) for name, p in PARAMETERS.items()}
    properties["model"] = {"type": "string", "description": "A model uid; default: the first ready model able to."}
    properties["kwargs"] = _kwargs_field()
    for name in sorted(IGNORED_FIELDS):
        properties[name] = {"description": "An OpenAI field with no meaning here: accepted and ignored."}
    return {"type": "object", "required": ["prompt"], "properties": properties, "additionalProperties": False}


def form_request(limits: Limits, files: Mapping[str, bool], prompt_required: bool) -> Schema:
    """A multipart body: the parameters as text fields, and the image files (`files`: name -> required)."""
    properties: Schema = {name: parameter_schema(p, limits, text=True) for name, p in PARAMETERS.items()}
    properties["model"] = {"type": "string", "description": "A model uid; default: the first ready model able to."}
    properties["kwargs"] = {"type": "string", "description": "More parameters, as a JSON string."}
    for name in files:
        properties[name] = {"type": "string", "contentMediaType": "application/octet-stream",
                            "description": "An image file (PNG, JPEG, WebP, GIF, BMP or TIFF)."}
    required = [name for name, needed in files.items() if needed] + (["prompt"] if prompt_required else [])
    return {"type": "object", "required": required, "properties": properties, "additionalProperties": False}


def ocr_request() -> Schema:
    properties: Schema = {name: {**p.schema, "description": p.description} for name, p in OCR_PARAMETERS.items()}
    properties.update(
        model={"type": "string", "description": "An OCR model uid; default: the first ready OCR model."},
        kwargs={"type": "string", "description": "The parameters as a JSON string (Xinference's client)."},
        image={"type": "string", "contentMediaType": "application/octet-stream",
               "description": "An image, or a PDF (by content type or %PDF magic)."},
    )
    return {"type": "object", "required": ["image"], "properties": properties, "additionalProperties": False}


def launch_request() -> Schema:
    options = {**OCR_LAUNCH_OPTIONS, **LAUNCH_OPTIONS}  # the image models' form where both have an option
    properties: Schema = {name: {**option.schema, "description": option.description} for name, option in
                          options.items()}
    properties.update(
        model_name={"type": "string", "description": "A catalogue or registered model name.",
                    "examples": ["sd-turbo", "FLUX.1-schnell", "PP-OCR"]},
        model_type={"type": ["string", "null"], "description": "image (the default)."},
        model_uid={"type": ["string", "null"], "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
                   "description": "Default: the model name."},
    )
    for name, honoured in CLIENT_FIELDS.items():
        accepted = ", ".join(repr(value) for value in honoured) or "the model's own engine"
        properties[name] = {"description": f"Sent by Xinference's client; accepted when null or {accepted}."}
    return {"type": "object", "required": ["model_name"], "properties": properties, "additionalProperties": False,
            "examples": [{"model_name": "sd-turbo", "model_uid": "my-sd", "tiny": True}]}


def a1111_request(fields: Mapping[str, a1111.Field], limits: Limits) -> Schema:
    properties: Schema = {}
    for name, declared in fields.items():
        if declared.parameter is not None:
            schema = parameter_schema(PARAMETERS[declared.parameter], limits)
            schema["description"] = declared.description
        else:
            schema = {**declared.json_schema(), "description": declared.description or
                      {a1111.IGNORED: "Accepted; no effect.", a1111.DEFAULT_ONLY: "Its default only."}.get(
                          declared.treatment, "")}
        if declared.default is not None:
            schema["default"] = declared.default
        properties[name] = schema
    return {"type": "object", "properties": properties, "additionalProperties": False}


def registration_spec() -> Schema:
    """The custom model spec carried (as a JSON string) in a registration's `model`."""
    return {"type": "object", "required": ["model_name", "model_uri"], "properties": {
        "model_name": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"},
        "model_family": {"enum": ["stable_diffusion", *FAMILY_SPECS],
                         "description": "stable_diffusion (or absent): detected from model_index.json at launch."},
        "model_ability": {"type": "array", "items": {"enum": list(ABILITIES)}},
        "model_uri": {"type": "string", "description": "The absolute path (or file:// URI) of a local diffusers "
                      "checkpoint folder."},
        "default_model_config": {"type": "object", "description": "Launch options (see POST /v1/models)."},
        "default_generate_config": {"type": "object", "description": "Request parameters under every request's."},
        "controlnet": {"oneOf": [{"type": "null"}, {"type": "array", "items": {
            "type": "object", "required": ["model_name", "model_uri"], "properties": {
                "model_name": {"type": "string"}, "model_family": {"const": "controlnet"},
                "model_uri": {"type": "string", "description": "A local diffusers ControlNet folder."}}}}],
            "description": "ControlNets the model launches with by name (launch option controlnet)."},
        "version": {"enum": [1, 2]},
    }}


# --- responses -----------------------------------------------------------------------------------------------
ERROR: Schema = {
    "type": "object", "required": ["error", "detail"],
    "properties": {
        "error": {"type": "object", "required": ["message", "type", "param", "code"], "properties": {
            "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
            "code": {"type": ["string", "null"]}}},
        "detail": {"type": "string", "description": "The message again, where Xinference's clients read it."},
    },
}
_STATUS_WORDS = {400: "Invalid input: the message names the field", 401: "Missing or wrong API key",
                 404: "Unknown model uid, request id or name", 405: "Method not allowed", 409: "Request aborted",
                 413: "Body or upload too large", 415: "Not an image, or not multipart",
                 429: "Queue full (Retry-After)", 499: "Launch cancelled, or the client disconnected",
                 500: "Internal fault, or a model that failed to load",
                 503: "Model still loading (Retry-After)"}
IMAGE_LIST: Schema = {"type": "object", "required": ["created", "data"], "properties": {
    "created": {"type": "integer"},
    "data": {"type": "array", "items": {"type": "object", "required": ["url", "b64_json", "seed"], "properties": {
        "url": {"type": ["string", "null"]}, "b64_json": {"type": ["string", "null"]}, "seed": {"type": "integer"}}}}}}
_NULL: Schema = {"type": "null"}
_OBJECT: Schema = {"type": "object"}
_PROGRESS: Schema = {"type": "object", "required": ["progress"],
                     "properties": {"progress": {"type": "number", "minimum": 0, "maximum": 1}}}
_DESCRIPTION: Schema = {"type": "object", "required": ["id", "model_type", "model_name", "model_ability", "status"],
                        "properties": {"id": {"type": "string"}, "model_type": {"const": "image"},
                                       "model_name": {"type": "string"},
                                       "model_ability": {"type": "array", "items": {"type": "string"}},
                                       "status": {"enum": ["created", "loading", "ready", "failed", "stopped"]}}}
_INSTANCE: Schema = {"type": "object", "required": ["model_name", "model_uid", "status"], "properties": {
    "model_name": {"type": "string"}, "model_uid": {"type": "string"},
    "status": {"enum": ["CREATING", "LOADING", "READY", "ERROR", "TERMINATING", "TERMINATED"]}}}
_A1111_RESULT: Schema = {"type": "object", "required": ["images", "parameters", "info"], "properties": {
    "images": {"type": "array", "items": {"type": "string", "description": "base64 PNG"}},
    "parameters": {"type": "object"}, "info": {"type": "string", "description": "A JSON object, as a string"}}}


_REPLICAS: Schema = {"type": "object", "required": ["replica", "replicas"], "properties": {
    "replica": {"type": "integer"}, "replicas": {"type": "array", "items": {
        "type": "object", "required": ["id", "status"], "properties": {
            "id": {"type": "string"}, "status": {"type": "string"}, "pid": {"type": "integer"},
            "node": {"type": "string"},
            "loras": {"type": "array", "items": {"type": "string"}, "description": "LoRAs resident in its slots"}}}}}}


@dataclass(frozen=True)
class Operation:
    """One route's documentation: summary, body (JSON or multipart), query parameters, answers."""

    summary: str
    ok: Schema | None = None  # the 200 JSON schema (None: any JSON value)
    errors: tuple[int, ...] = ()
    json_body: str | None = None  # a components schema name
    form_body: str | None = None
    body_required: bool = True
    query: Mapping[str, Schema] = field(default_factory=dict)
    ok_media: Mapping[str, Schema] | None = None  # other 200 media types (then `ok` is ignored unless JSON is among)
    tag: str = "images"


_GEN_ERRORS = (400, 404, 409, 413, 429, 499, 500, 503)
_FORM_ERRORS = (*_GEN_ERRORS, 415)
_EVENTS = [f"{prefix}.{kind}" for prefix in ("image_generation", "image_edit") for kind in ("partial_image",
                                                                                          "completed")]
_STREAM = {"application/json": _ref("ImageList"), "text/event-stream": {
    "description": "With stream: true, OpenAI's server-sent events: partial images, then each completed image (or "
                   "one error event with the error shape).",
    "type": "object", "required": ["event", "data"], "properties": {
        "event": {"enum": [*_EVENTS, "error"]},
        "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": {"type": "object"}}}}}

OPERATIONS: Mapping[tuple[str, str], Operation] = {
    ("POST", "/v1/images/generations"): Operation("Text to image (OpenAI's and Xinference's)", None, _GEN_ERRORS,
                                                  json_body="GenerationRequest", ok_media=_STREAM),
    ("POST", "/v1/images/variations"): Operation("Image to image", None, _FORM_ERRORS, form_body="VariationForm",
                                                 ok_media=_STREAM),
    ("POST", "/v1/images/inpainting"): Operation("Inpainting (Xinference's): white mask pixels are repainted", None,
                                                 _FORM_ERRORS, form_body="InpaintingForm", ok_media=_STREAM),
    ("POST", "/v1/images/edits"): Operation("OpenAI's edit: inpainting with a mask, else image to image", None,
                                            _FORM_ERRORS, form_body="EditForm", ok_media=_STREAM),
    ("POST", "/v1/images/ocr"): Operation("OCR of an image or PDF: the text (a JSON string), or with detail lines",
                                          None, (400, 404, 409, 413, 415, 429, 499, 500, 503), form_body="OcrForm",
                                          ok_media={"application/json": {}}),
    ("GET", "/v1/images/files/{name}"): Operation("A stored url image (expires)", None, (404,), ok_media={
        media: {"type": "string", "contentMediaType": media} for media in ("image/png", "image/jpeg", "image/webp")}),
    ("POST", "/v1/models"): Operation(
        "Launch a model",
        {"type": "object", "required": ["model_uid"], "properties": {"model_uid": {"type": "string"}}},
        (400, 499, 500), json_body="LaunchRequest", query={"wait_ready": {"type": "boolean", "default": True}},
        tag="models"),
    ("GET", "/v1/models"): Operation("Running models", {
        "type": "object", "required": ["object", "data"],
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _ref("ModelDescription")}}},
        tag="models"),
    ("GET", "/v1/models/instances"): Operation(
        "Instance records, with Xinference's status", {"type": "array", "items": _ref("Instance")},
        query={"model_name": {"type": "string"}, "model_uid": {"type": "string"}}, tag="models"),
    ("GET", "/v1/models/{uid}"): Operation("One model's description", _ref("ModelDescription"), (404,), tag="models"),
    ("DELETE", "/v1/models/{uid}"): Operation("Terminate a model", _NULL, (404,), tag="models"),
    ("GET", "/v1/models/{uid}/progress"): Operation("Launch progress (load stages done)", _PROGRESS, (404,),
                                                    tag="models"),
    ("POST", "/v1/models/{uid}/cancel"): Operation("Cancel a launch under way", _NULL, (400, 404), tag="models"),
    ("GET", "/v1/models/{uid}/replicas"): Operation("The replica count and each replica's status", _REPLICAS,
                                                    (404,), tag="models"),
    ("POST", "/v1/models/{uid}/replicas"): Operation(
        "Change the replica count without restarting the others", {
            "type": "object", "required": ["model_uid", "replica"], "properties": {
                "model_uid": {"type": "string"}, "replica": {"type": "integer"}}},
        (400, 404, 409), json_body="ScaleRequest", tag="models"),
    ("POST", "/v1/models/{uid}/requests/{request_id}/abort"): Operation(
        "Abort a request by its request_id", {"type": "object", "required": ["msg"], "properties": {
            "msg": {"enum": ["DONE", "NO_OP", "NOT_FOUND"]}}}, (404,), json_body="AbortRequest", body_required=False,
        tag="requests"),
    ("GET", "/v1/requests/{request_id}/progress"): Operation("A request's progress", _PROGRESS, (404,),
                                                             tag="requests"),
    ("GET", "/v1/model_registrations/image"): Operation(
        "Image model registrations (built-in and registered)", {"type": "array", "items": {
            "type": "object", "required": ["model_name", "is_builtin"]}},
        query={"detailed": {"type": "boolean", "default": False}}, tag="registrations"),
    ("POST", "/v1/model_registrations/image"): Operation("Register a custom model (a local diffusers folder)", _NULL,
                                                         (400,), json_body="RegistrationRequest", tag="registrations"),
    ("GET", "/v1/model_registrations/image/{name}"): Operation("One registration", _OBJECT, (404,),
                                                               tag="registrations"),
    ("DELETE", "/v1/model_registrations/image/{name}"): Operation("Unregister a custom model", _NULL, (400, 404),
                                                                  tag="registrations"),
    ("GET", "/v1/engines/image/{model_name}"): Operation(
        "The engine a model launches with, and its launch options", {"type": "object", "additionalProperties": {
            "type": "array", "items": _OBJECT}}, (404,), tag="registrations"),
    ("GET", "/v1/cluster/auth"): Operation("Whether API keys are on", {"type": "object", "required": ["auth"],
                                           "properties": {"auth": {"type": "boolean"}}}, tag="system"),
    ("GET", "/v1/address"): Operation("This server's host:port", {"type": "string"}, tag="system"),
    ("POST", "/sdapi/v1/txt2img"): Operation("A1111 text to image", _ref("A1111Result"), (400, 404, 409, 413, 429, 499,
                                             500, 503), json_body="A1111Txt2Img", tag="sdapi"),
    ("POST", "/sdapi/v1/img2img"): Operation("A1111 image to image and inpainting", _ref("A1111Result"), (
        400, 404, 409, 413, 415, 429, 499, 500, 503), json_body="A1111Img2Img", tag="sdapi"),
    ("GET", "/sdapi/v1/options"): Operation("A1111 options: the current checkpoint", _OBJECT, tag="sdapi"),
    ("POST", "/sdapi/v1/options"): Operation("Set sd_model_checkpoint", _OBJECT, (400, 404, 500, 503),
                                             json_body="A1111Options", tag="sdapi"),
    ("GET", "/sdapi/v1/sd-models"): Operation("Launched image models as A1111 checkpoints", {
        "type": "array", "items": {"type": "object", "required": ["title", "model_name", "hash", "sha256", "filename",
                                                                  "config"]}}, tag="sdapi"),
    ("GET", "/sdapi/v1/samplers"): Operation("Sampler names", {"type": "array", "items": {
        "type": "object", "required": ["name", "aliases", "options"]}}, tag="sdapi"),
    ("GET", "/sdapi/v1/scripts"): Operation("Scripts (none)", _OBJECT, tag="sdapi"),
    ("GET", "/sdapi/v1/progress"): Operation("Progress of the oldest A1111 call in flight", {
        "type": "object", "required": ["progress", "eta_relative", "state", "current_image"], "properties": {
            "progress": {"type": "number"}, "eta_relative": {"type": "number"}, "state": _OBJECT,
            "current_image": {"type": ["string", "null"]}}}, (400,),
        query={"skip_current_image": {"type": "boolean", "default": False}}, tag="sdapi"),
    ("POST", "/sdapi/v1/interrupt"): Operation("Interrupt the A1111 calls in flight", _OBJECT, tag="sdapi"),
    ("GET", "/status"): Operation("Health, and each model's status", _OBJECT, tag="system"),
    ("GET", "/metrics"): Operation("Prometheus metrics", None, ok_media={"text/plain": {"type": "string"}},
                                   tag="system"),
}


def _components(limits: Limits) -> Schema:
    return {
        "schemas": {
            "Error": ERROR, "ImageList": IMAGE_LIST, "ModelDescription": _DESCRIPTION, "Instance": _INSTANCE,
            "A1111Result": _A1111_RESULT,
            "GenerationRequest": generation_request(limits),
            "VariationForm": form_request(limits, {"image": True}, prompt_required=False),
            "InpaintingForm": form_request(limits, {"image": True, "mask_image": True}, prompt_required=False),
            "EditForm": form_request(limits, {"image": True, "mask": False}, prompt_required=True),
            "OcrForm": ocr_request(),
            "LaunchRequest": launch_request(),
            "ScaleRequest": {"type": "object", "required": ["replica"], "properties": {
                "replica": {"type": "integer", "minimum": 1}}},
            "AbortRequest": {"type": "object", "properties": {"block_duration": {
                "type": "integer", "description": "Xinference's; accepted and ignored."}}},
            "RegistrationSpec": registration_spec(),
            "RegistrationRequest": {"type": "object", "required": ["model"], "additionalProperties": False,
                                    "properties": {"model": {"type": "string", "description": "A RegistrationSpec as "
                                                             "a JSON string (or the object)."},
                                                   "persist": {"type": "boolean", "default": False},
                                                   "worker_ip": {"type": "null"}}},
            "A1111Txt2Img": a1111_request(a1111.TXT2IMG, limits),
            "A1111Img2Img": a1111_request(a1111.IMG2IMG, limits),
            "A1111Options": {"type": "object", "additionalProperties": False, "properties": {
                "sd_model_checkpoint": {"type": "string", "description": "A launched image model's uid"}}},
        },
        "responses": {str(code): {"description": words, "content": {"application/json": {"schema": _ref("Error")}}}
                      for code, words in _STATUS_WORDS.items()},
        "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer",
                                       "description": "Needed when the server runs with API keys"}},
    }


def _operation(method: str, path: str, operation: Operation, secured: bool) -> Schema:
    parameters = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                  for name in _path_names(path)]
    parameters += [{"name": name, "in": "query", "required": False, "schema": schema}
                   for name, schema in operation.query.items()]
    media = operation.ok_media or {"application/json": operation.ok if operation.ok is not None else {}}
    responses: Schema = {"200": {"description": operation.summary,
                                 "content": {kind: {"schema": schema} for kind, schema in media.items()}}}
    codes = set(operation.errors) | ({401} if secured else set()) | ({413} if operation.json_body or
                                                                    operation.form_body else set())
    for code in sorted(codes):
        responses[str(code)] = {"$ref": f"#/components/responses/{code}"}
    described: Schema = {"summary": operation.summary, "tags": [operation.tag],
                         "operationId": f"{method.lower()}{path.replace('/', '_').replace('{', '').replace('}', '')}",
                         "responses": responses}
    if parameters:
        described["parameters"] = parameters
    if operation.json_body:
        described["requestBody"] = {"required": operation.body_required, "content": {
            "application/json": {"schema": _ref(operation.json_body)}}}
    if operation.form_body:
        described["requestBody"] = {"required": True, "content": {
            "multipart/form-data": {"schema": _ref(operation.form_body)}}}
    if not secured:
        described["security"] = []
    return described


def _path_names(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{") and part.endswith("}")]


def document(routes: list[Any], limits: Limits, open_paths: frozenset[str] = frozenset()) -> Schema:
    """The document for an app's routing table; `open_paths` answer without an API key."""
    paths: Schema = {}
    for route in routes:
        if not isinstance(route, Route) or route.path in UNDOCUMENTED:
            continue
        for method in sorted(route.methods or ()):
            operation = OPERATIONS.get((method, route.path))
            if operation is not None and method != "HEAD":
                paths.setdefault(route.path, {})[method.lower()] = _operation(method, route.path, operation,
                                                                              route.path not in open_paths)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Kiln", "version": "0.1.0", "description": (
            "Image generation with step-level batching: Xinference's image API, OpenAI's images API and "
            "AUTOMATIC1111's API. Every error has the shape of components.schemas.Error (OpenAI's `error` and "
            "Xinference's `detail`).")},
        "security": [{"apiKey": []}],
        "paths": paths,
        "components": _components(limits),
        "tags": [{"name": name} for name in ("images", "models", "requests", "registrations", "sdapi", "system")],
    }

