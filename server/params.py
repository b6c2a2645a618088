"""One path from request fields to a validated generation, for every image endpoint.

Parameters arrive three ways, merged with later winning: the catalogue defaults, the `kwargs` field (a JSON
string as Xinference clients send it, or an object), and top-level fields (JSON values, or multipart text).
A value may be a JSON-typed value or text; text is parsed by the field's kind, so JSON and multipart share the
same rules. Everything the engine would refuse is refused here first, with a message naming the field.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from kiln.engine.catalogue import INPAINTING, TEXT2IMAGE, ModelSpec
from kiln.engine.images import FORMATS
from kiln.engine.requests import MAX_SEED, ImageRequest, PreviewCallback
from kiln.engine.runner import MAX_GUIDANCE, MAX_STEPS
from kiln.engine.samplers import sampler_names
from kiln.engine.textinput import TextInputError, parse_integer, parse_json

from .errors import bad_request

# OpenAI fields that have no meaning here: accepted and ignored.
IGNORED_FIELDS = frozenset(
    {"quality", "style", "user", "background", "moderation", "safety_identifier", "input_fidelity", "complexity"}
)
MAX_REQUEST_ID_CHARS = 200
DEFAULT_STRENGTH = {"image2image": 0.8, INPAINTING: 1.0}  # the engine's defaults, to check steps * strength


@dataclass(frozen=True)
class Limits:
    """Bounds on one image request; server settings, documented in `server.app.Settings`."""

    max_images: int = 10  # n times the number of prompts, as OpenAI bounds n
    max_prompt_chars: int = 4000
    max_partial_images: int = 3


@dataclass(frozen=True)
class Generation:
    """A validated image request for one model, before it becomes the engine's ImageRequest."""

    prompt: str | list[str]
    negative_prompt: str | None
    n: int
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int | list[int] | None
    sampler: str
    strength: float | None
    request_id: str | None
    response_format: str
    output_format: str
    output_compression: int | None
    stream: bool
    partial_images: int

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    def to_request(self, image=None, mask=None, on_preview: PreviewCallback | None = None) -> ImageRequest:
        extra = {"request_id": self.request_id} if self.request_id else {}
        return ImageRequest(
            prompt=self.prompt, width=self.width, height=self.height, steps=self.steps,
            guidance_scale=self.guidance_scale, n=self.n, negative_prompt=self.negative_prompt,
            sampler=self.sampler, seed=self.seed, strength=self.strength, image=image, mask=mask,
            preview_count=self.partial_images if self.stream else 0, on_preview=on_preview, **extra,
        )


# --- coercion: a JSON value or a text value -> the field's type ---------------------------------------------
def _integer(name: str, value: Any) -> int:
    if isinstance(value, str) and (number := parse_integer(value)) is not None:
        return number
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise bad_request(f"{name} must be an integer, got {value!r}", name)


def _number(name: str, value: Any) -> float:
    number = None
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    if number is None or not math.isfinite(number):
        raise bad_request(f"{name} must be a finite number, got {value!r}", name)
    return number


def _boolean(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise bad_request(f"{name} must be true or false, got {value!r}", name)


def _text(name: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    raise bad_request(f"{name} must be a string, got {value!r}", name)


def _seed(name: str, value: Any) -> int | list[int]:
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = parse_json(value)
        except TextInputError:
            raise bad_request(f"{name} must be an integer or a list of integers, got {value!r}", name) from None
    seeds = [_integer(name, item) for item in value] if isinstance(value, list) else [_integer(name, value)]
    for seed in seeds:
        if not -1 <= seed <= MAX_SEED:
            raise bad_request(f"{name} {seed} is out of range: use -1 (random) or 0 to {MAX_SEED}", name)
    return seeds if isinstance(value, list) else seeds[0]


def _prompt(name: str, value: Any) -> str | list[str]:
    if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        return value
    if isinstance(value, str):
        return value
    raise bad_request(f"{name} must be a string or a non-empty list of strings", name)


# name -> parser. Every generation parameter may come top-level or in `kwargs`.
PARAMETERS: Mapping[str, Callable[[str, Any], Any]] = {
    "prompt": _prompt,
    "negative_prompt": _text,
    "n": _integer,
    "size": _text,
    "width": _integer,
    "height": _integer,
    "num_inference_steps": _integer,
    "guidance_scale": _number,
    "seed": _seed,
    "sampler_name": _text,
    "strength": _number,
    "request_id": _text,
    "response_format": _text,
    "output_format": _text,
    "output_compression": _integer,
    "stream": _boolean,
    "partial_images": _integer,
}
_TOP_LEVEL_ONLY = frozenset({"model", "kwargs"})


def parse_kwargs(value: Any) -> dict[str, Any]:
    """Xinference's `kwargs`: a JSON object, or a string holding one."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = parse_json(value)
        except TextInputError as error:
            raise bad_request(f"kwargs is not valid JSON: {error}", "kwargs") from None
    if not isinstance(value, dict):
        raise bad_request("kwargs must be a JSON object (or a string holding one)", "kwargs")
    return value


def merge_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """`kwargs` under top-level fields, parsed by kind; nulls (and empty non-text form values) count as absent.
    Unknown names are refused, ignored OpenAI fields are dropped."""
    merged: dict[str, Any] = {}
    for layer, where in ((parse_kwargs(fields.get("kwargs")), "kwargs"), (fields, "the request")):
        for name, value in layer.items():
            if name in IGNORED_FIELDS or (name in _TOP_LEVEL_ONLY and where == "the request"):
                continue
            parser = PARAMETERS.get(name)
            if parser is None:
                raise bad_request(
                    f"unknown parameter {name!r} in {where}; known parameters: {', '.join(PARAMETERS)}",
                    name, "unknown_parameter",
                )
            if value is None or (value == "" and parser is not _text):
                continue
            merged[name] = parser(name, value)
    return merged


def parse_size(text: str) -> tuple[int, int] | None:
    """'WxH', 'W*H' (any single non-digit separator); None for ''/'auto'/'original' (use the default)."""
    text = text.strip()
    if text.lower() in ("", "auto", "original"):
        return None
    match = re.fullmatch(r"([0-9]+)\s*[^\d\s]\s*([0-9]+)", text)
    size = (parse_integer(match.group(1)), parse_integer(match.group(2))) if match else (None, None)
    if None in size:
        raise bad_request(f"size {text!r} is not WIDTHxHEIGHT (e.g. 512x512 or 512*512)", "size")
    return size


def fit_size(spec: ModelSpec, width: int, height: int) -> tuple[int, int]:
    """An input image's size as an output size: rounded down to the stride and clamped to the model's limits."""

    def fit(value: int) -> int:
        return min(max(value // spec.stride * spec.stride, spec.min_size), spec.max_size)

    return fit(width), fit(height)


def _check_range(name: str, value: float, low: float, high: float, low_open: bool = False) -> None:
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise bad_request(f"{name} {value} is out of range {bracket}{low}, {high}]", name)


def parse_generation(
    spec: ModelSpec,
    fields: Mapping[str, Any],
    *,
    limits: Limits,
    mode: str = TEXT2IMAGE,
    default_size: tuple[int, int] | None = None,
    prompt_required: bool = True,
) -> Generation:
    """Merge and validate one request's parameters for model `spec`. `default_size` (else the model's) is the
    size used when the request gives none; `mode` is text2image, image2image or inpainting."""
    p = merge_fields(fields)

    prompt = p.get("prompt", "")
    if prompt_required and "prompt" not in p:
        raise bad_request("prompt is required", "prompt", "missing_parameter")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    negative = p.get("negative_prompt")
    for name, text in [("prompt", item) for item in prompts] + [("negative_prompt", negative or "")]:
        if len(text) > limits.max_prompt_chars:
            raise bad_request(f"{name} is {len(text)} characters; the limit is {limits.max_prompt_chars}", name)

    n = p.get("n", 1)
    if not 1 <= n <= limits.max_images:
        raise bad_request(f"n must be between 1 and {limits.max_images}, got {n}", "n")
    if n * len(prompts) > limits.max_images:
        raise bad_request(
            f"n={n} images for each of {len(prompts)} prompts is {n * len(prompts)} images; "
            f"the limit is {limits.max_images} per request", "n",
        )

    width, height = parse_size(p.get("size", "")) or default_size or spec.default_size
    width, height = p.get("width", width), p.get("height", height)
    for name, value in (("width", width), ("height", height)):
        if value % spec.stride or not spec.min_size <= value <= spec.max_size:
            raise bad_request(
                f"size {width}x{height} does not fit {spec.name}: {name} must be a multiple of {spec.stride} "
                f"between {spec.min_size} and {spec.max_size}", "size", "invalid_size",
            )

    steps = p.get("num_inference_steps", spec.default_steps)
    _check_range("num_inference_steps", steps, 1, MAX_STEPS)
    guidance = p.get("guidance_scale", spec.default_guidance)
    _check_range("guidance_scale", guidance, 0, MAX_GUIDANCE)
    strength = p.get("strength")
    if strength is not None:
        _check_range("strength", strength, 0, 1, low_open=True)
    if mode in DEFAULT_STRENGTH:
        effective = strength if strength is not None else DEFAULT_STRENGTH[mode]
        if int(steps * effective) < 1:
            raise bad_request(
                f"num_inference_steps {steps} with strength {effective} runs no denoising step "
                f"(steps x strength must be at least 1); raise num_inference_steps or strength",
                "num_inference_steps",
            )

    seed = p.get("seed")
    if isinstance(seed, list) and len(seed) > n * len(prompts):
        raise bad_request(f"seed lists {len(seed)} seeds for {n * len(prompts)} images", "seed")

    sampler = p.get("sampler_name", "default")
    accepted = sampler_names(spec.is_flow)
    if sampler not in accepted:
        raise bad_request(f"unknown sampler_name {sampler!r} for {spec.name}; use one of: {', '.join(accepted)}",
                          "sampler_name")

    request_id = p.get("request_id")
    if request_id is not None and not 0 < len(request_id) <= MAX_REQUEST_ID_CHARS:
        raise bad_request(f"request_id must be 1 to {MAX_REQUEST_ID_CHARS} characters", "request_id")

    response_format = p.get("response_format", "url")
    if response_format not in ("url", "b64_json"):
        raise bad_request(f"response_format must be url or b64_json, got {response_format!r}", "response_format")
    output_format = p.get("output_format", "png")
    if output_format not in FORMATS:
        raise bad_request(f"output_format must be one of {', '.join(FORMATS)}, got {output_format!r}",
                          "output_format")
    compression = p.get("output_compression")
    if compression is not None:
        _check_range("output_compression", compression, 0, 100)

    partial_images = p.get("partial_images", 0)
    _check_range("partial_images", partial_images, 0, limits.max_partial_images)

    return Generation(
        prompt=prompt, negative_prompt=negative, n=n, width=width, height=height, steps=steps,
        guidance_scale=guidance, seed=seed, sampler=sampler, strength=strength, request_id=request_id,
        response_format=response_format, output_format=output_format, output_compression=compression,
        stream=p.get("stream", False), partial_images=partial_images,
    )
