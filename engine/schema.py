"""The one request schema: every image-request parameter declared once, with how it is read, its default, its
range and the words of its 400.

    parsed = parse_image_request(spec, fields, limits=Limits(), mode=TEXT2IMAGE)   # the server, per request
    parsed.request      # the engine's plain-data ImageRequest
    parsed.delivery     # how the response goes back (url or b64, image format, streaming)
    check_request(spec, request, limits)                    # the engine's own check, from the same declarations

Parameters arrive three ways, merged with later winning: the model's defaults (the catalogue's, or a registered
model's default_generate_config), the `kwargs` field (Xinference's
JSON string, or an object), and top-level fields (JSON values, or multipart text read by the parameter's kind).
Unknown names are refused, naming them; OpenAI fields that do not apply are accepted and ignored. The module is
torch-free: the server, the CLI and the API document read it without loading a model.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .catalogue import IMAGE2IMAGE, INPAINTING, TEXT2IMAGE, ModelSpec
from .coerce import Unparsable, is_none_word, to_bool, to_float, to_int, to_json_object, to_text
from .controlnet_units import MAX_SCALE, read_numbers, read_units
from .errors import InvalidRequest
from .images import FORMATS
from .lora_options import MAX_SCALE as MAX_LORA_SCALE
from .lora_options import read_loras
from .requests import MAX_SEED, ImageRequest
from .samplers import sampler_names

# OpenAI fields that have no meaning here: accepted and ignored.
IGNORED_FIELDS = frozenset(
    {"quality", "style", "user", "background", "moderation", "safety_identifier", "input_fidelity", "complexity"}
)
RESPONSE_FORMATS = ("url", "b64_json")
# The strength an image-to-image or inpainting job runs at when the request gives none (diffusers' defaults).
DEFAULT_STRENGTH: Mapping[str, float] = {IMAGE2IMAGE: 0.8, INPAINTING: 1.0}
_TOP_LEVEL_ONLY = frozenset({"model", "kwargs"})


@dataclass(frozen=True)
class Limits:
    """Bounds on one image request. The server's settings carry one (`server.app.Settings.limits`), and the
    runners check with the same one, so the two can never disagree."""

    max_images: int = 10  # n times the number of prompts, as OpenAI bounds n
    max_prompt_chars: int = 4000
    max_partial_images: int = 3
    max_steps: int = 500
    max_guidance: float = 100.0
    max_request_id_chars: int = 200


# --- kinds: how a JSON value or a text value becomes the parameter's type ------------------------------------
@dataclass(frozen=True, eq=False)
class Kind:
    """A conversion (raising Unparsable) and the JSON schema of what it accepts, for the API document."""

    convert: Callable[[Any], Any]
    json_schema: Mapping[str, Any]


def _to_prompt(value: Any) -> str | list[str]:
    if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
        return value
    raise Unparsable("a string or a non-empty list of strings")


def _to_seed(value: Any) -> int | list[int]:
    if isinstance(value, str) and value.strip().startswith("["):
        value = to_json_object(f'{{"seed": {value}}}')["seed"]
    try:
        return [to_int(item) for item in value] if isinstance(value, list) else to_int(value)
    except Unparsable:
        raise Unparsable("an integer or a list of integers") from None


INTEGER = Kind(to_int, {"type": "integer"})
NUMBER = Kind(to_float, {"type": "number"})
BOOLEAN = Kind(to_bool, {"type": "boolean"})
TEXT = Kind(to_text, {"type": "string"})
PROMPT = Kind(_to_prompt, {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}]})
SEED = Kind(_to_seed, {"oneOf": [{"type": "integer"}, {"type": "array", "items": {"type": "integer"}}]})
NUMBERS = Kind(read_numbers, {"oneOf": [{"type": "number"}, {"type": "array", "items": {"type": "number"}}]})
CONTROLNET_UNITS = Kind(read_units, {"type": "array", "items": {"type": "object", "properties": {
    "name": {"type": "string"}, "image": {"type": "string", "contentEncoding": "base64"},
    "scale": {"type": "number"}, "start": {"type": "number"}, "end": {"type": "number"},
    "guess_mode": {"type": "boolean"}, "preprocess": {"enum": ["canny"]}, "low": {"type": "integer"},
    "high": {"type": "integer"}}}})
_LORA_ITEM = {"type": "object", "required": ["name"],
              "properties": {"name": {"type": "string"}, "scale": {"type": "number", "minimum": -MAX_LORA_SCALE,
                                                                   "maximum": MAX_LORA_SCALE}}}
LORAS = Kind(read_loras, {"oneOf": [_LORA_ITEM, {"type": "array", "items": _LORA_ITEM}]})

Bound = float | str | None  # a number, or the name of a Limits field


@dataclass(frozen=True)
class Parameter:
    """One request parameter. `low`/`high` bound numbers (inclusive, `low_open` excludes `low`); a bound given
    as a string is read from the request's Limits. `choices` (or a function of the model) lists the values a
    text parameter accepts."""

    name: str
    kind: Kind
    description: str
    low: Bound = None
    high: Bound = None
    low_open: bool = False
    choices: tuple[str, ...] | Callable[[ModelSpec], tuple[str, ...]] | None = None
    hint: str = ""  # added to the out-of-range message
    part: str | None = None  # the per-job part (engine/parts) that reads it: request.part_inputs[part][name]

    def read(self, value: Any) -> Any:
        """The value as the parameter's type; a 400 naming the parameter otherwise."""
        return read_as(self.name, self.kind.convert, value)

    def check(self, value: Any, spec: ModelSpec, limits: Limits) -> None:
        """Range and choices; a 400 naming the parameter."""
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, (int, float)) and not isinstance(item, bool):
                self._check_range(item, limits)
        if self.choices is None:
            return
        if callable(self.choices):  # the model decides
            if value not in self.choices(spec):
                raise InvalidRequest(f"{self.name} {value!r} is not accepted; {spec.name} accepts: "
                                     f"{', '.join(self.choices(spec))}", self.name)
        elif value not in self.choices:
            accepted = " or ".join(self.choices) if len(self.choices) == 2 else f"one of {', '.join(self.choices)}"
            raise InvalidRequest(f"{self.name} must be {accepted}, got {_shown(value)}", self.name)

    def bounds(self, limits: Limits) -> tuple[float | None, float | None]:
        return tuple(getattr(limits, b) if isinstance(b, str) else b for b in (self.low, self.high))

    def _check_range(self, value: float, limits: Limits) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidRequest(f"{self.name} must be a finite number, got {value}", self.name)
        low, high = self.bounds(limits)
        if (low is not None and (value < low or (self.low_open and value == low))) or (high is not None and value > high):
            rule = f"above {low} and at most {high}" if self.low_open else f"between {low} and {high}"
            shown = int(value) if isinstance(value, float) and value.is_integer() else value  # 101 = 101.0
            raise InvalidRequest(f"{self.name} {_shown(shown)} is out of range: it must be {rule}{self.hint}", self.name)


def _samplers(spec: ModelSpec) -> tuple[str, ...]:
    return sampler_names(spec.family.flow)


# Every generation parameter may come top-level or in `kwargs`.
PARAMETERS: Mapping[str, Parameter] = {p.name: p for p in (
    Parameter("prompt", PROMPT, "What to draw; a list makes `n` images of each prompt."),
    Parameter("negative_prompt", TEXT, "What to steer away from (models with classifier-free guidance)."),
    Parameter("n", INTEGER, "Images per prompt.", 1, "max_images"),
    Parameter("size", TEXT, "WIDTHxHEIGHT (or W*H); default: the model's size, or the input image's."),
    Parameter("width", INTEGER, "Width in pixels (wins over size)."),
    Parameter("height", INTEGER, "Height in pixels (wins over size)."),
    Parameter("num_inference_steps", INTEGER, "Denoising steps; default: the model's.", 1, "max_steps"),
    Parameter("guidance_scale", NUMBER, "Classifier-free (or distilled) guidance; default: the model's.", 0,
              "max_guidance"),
    Parameter("seed", SEED, "-1 or absent: random; an int s gives s, s+1, ...; or one seed per image.", -1,
              MAX_SEED, hint=" (-1 draws one at random)"),
    Parameter("sampler_name", TEXT, "Sampler, as A1111 names them ('Euler a', 'DPM++ 2M Karras', ...).",
              choices=_samplers),
    Parameter("strength", NUMBER, "How far image-to-image and inpainting move from the input image.", 0, 1,
              low_open=True),
    Parameter("request_id", TEXT, "Your id for progress and abort calls."),
    Parameter("response_format", TEXT, "url (a real, expiring HTTP URL) or b64_json.", choices=RESPONSE_FORMATS),
    Parameter("output_format", TEXT, "png, jpeg or webp.", choices=FORMATS),
    Parameter("output_compression", INTEGER, "JPEG/WebP quality.", 0, 100),
    Parameter("stream", BOOLEAN, "Server-sent events with partial images, OpenAI's streaming form."),
    Parameter("partial_images", INTEGER, "Previews streamed while denoising (with stream).", 0,
              "max_partial_images"),
    Parameter("controlnet", CONTROLNET_UNITS, "ControlNet units [{name, image (base64, or multipart files "
              "control_image), scale, start, end, guess_mode, preprocess: canny, low, high}].", part="controlnet"),
    Parameter("controlnet_conditioning_scale", NUMBERS, "diffusers' ControlNet scale (one, or one per unit).", 0,
              MAX_SCALE, part="controlnet"),
    Parameter("control_guidance_start", NUMBERS, "Fraction of the steps where ControlNet starts (one, or one per "
              "unit).", 0, 1, part="controlnet"),
    Parameter("control_guidance_end", NUMBERS, "Fraction of the steps where ControlNet stops (one, or one per unit).",
              0, 1, part="controlnet"),
    Parameter("guess_mode", BOOLEAN, "diffusers' ControlNet guess mode (SD, SDXL).", part="controlnet"),
    Parameter("lora", LORAS, "LoRAs: {name, scale} or a list of them; [] is none; absent: the launch default.",
              part="lora"),
    Parameter("lora_name", TEXT, "One LoRA by name (with lora_scale), as Dify's Xinference plugin asks.",
              part="lora"),
    Parameter("lora_scale", NUMBER, "The scale of lora_name (default 1).", -MAX_LORA_SCALE, MAX_LORA_SCALE, part="lora"),
)}


def read_as(name: str, convert: Callable[[Any], Any], value: Any) -> Any:
    """`convert(value)`, or a 400 naming the parameter and saying what it accepts (any endpoint's parameters)."""
    try:
        return convert(value)
    except Unparsable as error:
        raise InvalidRequest(f"{name} must be {error.expected}, got {_shown(value)}", name) from None


# --- parsing ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Delivery:
    """How the response is sent: nothing the engine needs."""

    response_format: str = "url"
    output_format: str = "png"
    output_compression: int | None = None
    stream: bool = False
    partial_images: int = 0


@dataclass(frozen=True)
class ParsedRequest:
    request: ImageRequest
    delivery: Delivery


def read_kwargs(value: Any) -> dict[str, Any]:
    """Xinference's `kwargs` field of any endpoint: a JSON object or a string holding one; absent, empty or
    null is no parameters."""
    try:
        return to_json_object(None if is_none_word(value) else value)
    except Unparsable as error:
        raise InvalidRequest(f"kwargs must be {error.expected}", "kwargs") from None


def merge_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """`kwargs` under top-level fields, each read by its parameter's kind; nulls (and empty non-text form
    values) count as absent. Unknown names are refused; ignored OpenAI fields are dropped."""
    merged: dict[str, Any] = {}
    for layer, where in ((read_kwargs(fields.get("kwargs")), "kwargs"), (fields, "the request")):
        for name, value in layer.items():
            if name in IGNORED_FIELDS or (name in _TOP_LEVEL_ONLY and where == "the request"):
                continue
            parameter = PARAMETERS.get(name)
            if parameter is None:
                raise InvalidRequest(f"unknown parameter {name!r} in {where}; known parameters: "
                                     f"{', '.join(PARAMETERS)}", name, "unknown_parameter")
            if value is None or (value == "" and parameter.kind is not TEXT):
                continue
            merged[name] = parameter.read(value)
    return merged


def parse_size(text: str) -> tuple[int, int] | None:
    """'WxH', 'W*H' (any single non-digit separator); None for ''/'auto'/'original' (use the default)."""
    text = text.strip()
    if text.lower() in ("", "auto", "original"):
        return None
    match = re.fullmatch(r"([0-9]{1,6})\s*[^\d\s]\s*([0-9]{1,6})", text)
    if match is None:
        raise InvalidRequest(f"size {text!r} is not WIDTHxHEIGHT (e.g. 512x512 or 512*512)", "size")
    return int(match.group(1)), int(match.group(2))


def fit_size(spec: ModelSpec, width: int, height: int) -> tuple[int, int]:
    """An input image's size as an output size: rounded down to the stride and clamped to the model's limits."""

    def fit(value: int) -> int:
        return min(max(value // spec.stride * spec.stride, spec.min_size), spec.max_size)

    return fit(width), fit(height)


def parse_image_request(
    spec: ModelSpec,
    fields: Mapping[str, Any],
    *,
    limits: Limits,
    mode: str = TEXT2IMAGE,
    default_size: tuple[int, int] | None = None,
    prompt_required: bool = True,
    image: Any = None,
    mask: Any = None,
) -> ParsedRequest:
    """Merge, read and check one request's parameters for model `spec`. `default_size` (else the model's) is
    the size used when the request gives none; `mode` is text2image, image2image or inpainting; `image` and
    `mask` are the decoded uploads of the multipart endpoints."""
    p = {**merge_fields(spec.default_parameters), **merge_fields(fields)}
    if prompt_required and "prompt" not in p:
        raise InvalidRequest("prompt is required", "prompt", "missing_parameter")
    width, height = parse_size(p.get("size", "")) or default_size or spec.default_size
    delivery = Delivery(**{f.name: p[f.name] for f in dataclasses.fields(Delivery) if f.name in p})
    extra = {"request_id": p["request_id"]} if "request_id" in p else {}
    part_inputs: dict[str, dict[str, Any]] = {}
    for name, value in p.items():
        if PARAMETERS[name].part is not None:
            PARAMETERS[name].check(value, spec, limits)
            part_inputs.setdefault(PARAMETERS[name].part, {})[name] = value
    request = ImageRequest(
        prompt=p.get("prompt", ""), width=p.get("width", width), height=p.get("height", height),
        steps=p.get("num_inference_steps", spec.default_steps),
        guidance_scale=p.get("guidance_scale", spec.default_guidance), n=p.get("n", 1),
        negative_prompt=p.get("negative_prompt"), sampler=p.get("sampler_name", "default"), seed=p.get("seed"),
        strength=p.get("strength"), image=image, mask=mask,
        preview_count=delivery.partial_images if delivery.stream else 0, part_inputs=part_inputs, **extra,
    )
    check_request(spec, request, limits)
    for name in ("response_format", "output_format", "output_compression", "partial_images"):
        PARAMETERS[name].check(getattr(delivery, name), spec, limits)
    return ParsedRequest(request, delivery)


# --- checking --------------------------------------------------------------------------------------------------
# ImageRequest field -> the parameter that sets it (the wire names differ for three of them).
_FIELD_PARAMETERS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "n": "n",
                     "steps": "num_inference_steps", "guidance_scale": "guidance_scale", "seed": "seed",
                     "sampler": "sampler_name", "strength": "strength"}


def check_request(spec: ModelSpec, request: ImageRequest, limits: Limits) -> None:
    """Everything a request must satisfy to run on `spec`, from the declarations above: what the server checks
    before submitting and what the runner checks again for callers that bypass the server. 400s name the
    parameter."""
    for attribute, name in _FIELD_PARAMETERS.items():
        value = getattr(request, attribute)
        if value is not None:
            PARAMETERS[name].check(value, spec, limits)
    _check_prompts(request, limits)
    _check_size(spec, request.width, request.height)
    _check_strength(spec, request)
    if request.request_id is not None and not 0 < len(request.request_id) <= limits.max_request_id_chars:
        raise InvalidRequest(f"request_id must be 1 to {limits.max_request_id_chars} characters", "request_id")


def _check_prompts(request: ImageRequest, limits: Limits) -> None:
    texts = [("prompt", item) for item in request.prompts] + [("negative_prompt", request.negative_prompt or "")]
    for name, text in texts:
        if len(text) > limits.max_prompt_chars:
            raise InvalidRequest(f"{name} is {len(text)} characters; the limit is {limits.max_prompt_chars}", name)
    images = request.image_count
    if len(request.prompts) > 1 and images > limits.max_images:
        raise InvalidRequest(f"n={request.n} images for each of {len(request.prompts)} prompts is {images} images; "
                             f"the limit is {limits.max_images} per request", "n")
    if isinstance(request.seed, list) and len(request.seed) > images:
        raise InvalidRequest(f"seed lists {len(request.seed)} seeds for {images} images", "seed")


def _check_size(spec: ModelSpec, width: int, height: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if value % spec.stride or not spec.min_size <= value <= spec.max_size:
            raise InvalidRequest(
                f"size {width}x{height} does not fit {spec.name}: {name} must be a multiple of {spec.stride} "
                f"between {spec.min_size} and {spec.max_size}", "size", "invalid_size",
            )


def strength_of(request: ImageRequest) -> float:
    """The strength an image-to-image or inpainting request runs at: its own, else the mode's default."""
    return request.strength if request.strength is not None else DEFAULT_STRENGTH[request.mode]


def _check_strength(spec: ModelSpec, request: ImageRequest) -> None:
    """Image-to-image and inpainting run the steps the strength keeps (rounded as the family does): at least one."""
    if request.mode not in DEFAULT_STRENGTH:
        return
    strength = strength_of(request)
    if spec.family.steps_kept(request.steps, strength) < 1:
        raise InvalidRequest(
            f"num_inference_steps {request.steps} with strength {strength} runs no denoising step "
            f"(steps x strength must reach at least one step); raise num_inference_steps or strength",
            "num_inference_steps",
        )


def _shown(value: Any) -> str:
    """A value as an error message shows it: its repr, cut short (a client may send megabytes)."""
    if isinstance(value, int) and value.bit_length() > 160:
        return f"an integer of {value.bit_length()} bits"  # repr of a huge int is slow, or refused outright
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
