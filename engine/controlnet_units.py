"""ControlNet units: what a request asks of the model's resident ControlNets, as plain data (torch-free).

A request carries units in Kiln's form, `controlnet: [{"name", "image", "scale", "start", "end", "guess_mode",
"preprocess", "low", "high"}]` (top level or in `kwargs`; one object is one unit), or, on a model launched with
ControlNet, in Xinference's form: `/v1/images/variations`' `image` is the control image of every launched
ControlNet. diffusers' kwargs (`controlnet_conditioning_scale`, `control_guidance_start`, `control_guidance_end`,
`guess_mode`; a number or one per unit) fill what a unit leaves out, as they do for diffusers' pipelines.

Parsing happens in three steps, so that images are decoded off the server's event loop: `read_units` (the request
schema's kind) checks every field and keeps a base64 image as bytes; the server decodes the images (a unit
without one takes the next `control_image` upload) with `with_image`, which also runs `preprocess`; then
`complete_units` applies the kwargs and the defaults. What the engine receives is complete units with images.
"""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

from .coerce import Unparsable, to_bool, to_float, to_int, to_json_object
from .errors import InvalidRequest

PART = "controlnet"  # the part (engine/parts/controlnet) and the request field
MAX_SCALE = 5.0
PREPROCESSORS = ("canny",)
CANNY_THRESHOLDS = (100, 200)  # OpenCV's Canny (low, high), as diffusers' ControlNet examples use
KWARGS = ("controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end", "guess_mode")
_FIELDS = ("name", "image", "scale", "start", "end", "guess_mode", "preprocess", "low", "high")


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet applied to one job: which resident ControlNet, its control image (bytes or None while the
    request is parsed, an RGB PIL image once complete), its scale, the fraction of the steps it acts in
    [start, end], and guess mode (SD/SDXL: only the conditional row, residuals tapered from 0.1 to 1)."""

    name: str | None = None
    image: Any = None
    scale: float | None = None
    start: float | None = None
    end: float | None = None
    guess_mode: bool | None = None
    preprocess: str | None = None
    low: int | None = None
    high: int | None = None


def _field(where: str, key: str, convert, value: Any) -> Any:
    try:
        return convert(value)
    except Unparsable as error:
        raise InvalidRequest(f"{where}.{key} must be {error.expected}, got {value!r:.80}", PART) from None


def _fraction(where: str, key: str, value: Any, low: float = 0.0, high: float = 1.0) -> float:
    number = _field(where, key, to_float, value)
    if not low <= number <= high:
        raise InvalidRequest(f"{where}.{key} {number} is out of range: it must be between {low:g} and {high:g}", PART)
    return number


def _image_bytes(where: str, value: Any) -> bytes:
    """A base64 image (a data: URL too) as bytes."""
    if not isinstance(value, str):
        raise InvalidRequest(f"{where}.image must be a base64 string (or a multipart file named control_image)", PART)
    text = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{where}.image is not valid base64", PART) from None


def _unit(where: str, item: Any) -> ControlUnit:
    if not isinstance(item, Mapping):
        raise InvalidRequest(f"{where} must be an object with {', '.join(_FIELDS)}", PART)
    unknown = sorted(set(item) - set(_FIELDS))
    if unknown:
        raise InvalidRequest(f"{where}: unknown field {unknown[0]!r}; a unit has: {', '.join(_FIELDS)}", PART)
    given = {key: value for key, value in item.items() if value is not None}
    name = given.get("name")
    if name is not None and (not isinstance(name, str) or not name):
        raise InvalidRequest(f"{where}.name must be the name of a launched ControlNet", PART)
    preprocess = given.get("preprocess")
    if preprocess is not None and preprocess not in PREPROCESSORS:
        raise InvalidRequest(f"{where}.preprocess must be {' or '.join(PREPROCESSORS)}, got {preprocess!r:.80}", PART)
    low, high = (_field(where, key, to_int, given[key]) if key in given else None for key in ("low", "high"))
    if (low is not None or high is not None) and preprocess is None:
        raise InvalidRequest(f"{where}: low and high are the canny thresholds; they need \"preprocess\": \"canny\"",
                             PART)
    for key, value in (("low", low), ("high", high)):
        if value is not None and not 0 <= value <= 255:
            raise InvalidRequest(f"{where}.{key} {value} is out of range: it must be between 0 and 255", PART)
    unit = ControlUnit(
        name=name,
        image=_image_bytes(where, given["image"]) if "image" in given else None,
        scale=_fraction(where, "scale", given["scale"], 0.0, MAX_SCALE) if "scale" in given else None,
        start=_fraction(where, "start", given["start"]) if "start" in given else None,
        end=_fraction(where, "end", given["end"]) if "end" in given else None,
        guess_mode=_field(where, "guess_mode", to_bool, given["guess_mode"]) if "guess_mode" in given else None,
        preprocess=preprocess, low=low, high=high,
    )
    _check_window(where, unit.start, unit.end)
    _check_thresholds(where, unit)
    return unit


def _check_window(where: str, start: float | None, end: float | None) -> None:
    if start is not None and end is not None and start > end:
        raise InvalidRequest(f"{where}: start {start} is after end {end}; the unit acts from start to end "
                             "(fractions of the steps)", PART)


def _check_thresholds(where: str, unit: ControlUnit) -> None:
    low, high = unit.low or CANNY_THRESHOLDS[0], unit.high or CANNY_THRESHOLDS[1]
    if unit.preprocess and low > high:
        raise InvalidRequest(f"{where}: canny low {low} is above high {high}", PART)


def read_units(value: Any) -> tuple[ControlUnit, ...]:
    """The request field: a list of unit objects, one object, or (multipart text) the JSON of either."""
    if isinstance(value, str):
        try:
            value = to_json_object(f'{{"units": {value}}}')["units"]
        except Unparsable:
            raise Unparsable("a list of ControlNet units (JSON objects)") from None
    items = [value] if isinstance(value, Mapping) else value
    if not isinstance(items, list):
        raise Unparsable("a list of ControlNet units (JSON objects)")
    return tuple(_unit(f"controlnet[{index}]", item) for index, item in enumerate(items))


def read_numbers(value: Any) -> float | list[float]:
    """A diffusers kwarg given as a number or as one number per unit (multi-ControlNet)."""
    if isinstance(value, list):
        return [to_float(item) for item in value]
    return to_float(value)


def canny(image: Any, low: int | None = None, high: int | None = None) -> Any:
    """An RGB edge map of `image` (OpenCV's Canny on its grey levels), what canny ControlNets were trained on."""
    import cv2  # OpenCV comes with rapidocr; imported here so the request schema stays light
    import numpy as np
    from PIL import Image

    grey = np.asarray(image.convert("L"))
    edges = cv2.Canny(grey, low or CANNY_THRESHOLDS[0], high or CANNY_THRESHOLDS[1])
    return Image.fromarray(edges).convert("RGB")


def with_image(unit: ControlUnit, image: Any) -> ControlUnit:
    """The unit with its decoded control image, preprocessed as the unit asks (CPU work: off the event loop)."""
    if unit.preprocess == "canny":
        image = canny(image, unit.low, unit.high)
    return replace(unit, image=image)


def _per_unit(inputs: Mapping[str, Any], key: str, count: int) -> list[Any]:
    value = inputs.get(key)
    if not isinstance(value, list):
        return [value] * count
    if len(value) != count:
        raise InvalidRequest(f"{key} lists {len(value)} values for {count} ControlNet units; give one number, or "
                             "one per unit", key)
    return value


def complete_units(units: Sequence[ControlUnit], inputs: Mapping[str, Any],
                   launched: Sequence[str]) -> tuple[ControlUnit, ...]:
    """Every field of every unit: its own, else diffusers' kwarg in `inputs`, else the default (scale 1, the whole
    run, no guess mode). A unit without a name takes the model's ControlNet when exactly one is launched."""
    count = len(units)
    scales, starts, ends = (_per_unit(inputs, key, count) for key in KWARGS[:3])
    guess = inputs.get("guess_mode")
    done = []
    for index, unit in enumerate(units):
        where = f"controlnet[{index}]"
        name = unit.name if unit.name is not None else (launched[0] if len(launched) == 1 else None)
        if name is None:
            raise InvalidRequest(f"{where}.name is required: this model has ControlNets {', '.join(launched)}"
                                 if launched else f"{where}: this model was launched without ControlNet", PART)
        scale = unit.scale if unit.scale is not None else scales[index]
        start = unit.start if unit.start is not None else starts[index]
        end = unit.end if unit.end is not None else ends[index]
        unit = replace(unit, name=name, scale=1.0 if scale is None else scale, start=start or 0.0,
                       end=1.0 if end is None else end,
                       guess_mode=unit.guess_mode if unit.guess_mode is not None else bool(guess))
        check_unit(where, unit)
        done.append(unit)
    return tuple(done)


def check_unit(where: str, unit: ControlUnit) -> None:
    """What a complete unit must be (the engine checks again for callers that build units themselves)."""
    if not isinstance(unit.name, str) or unit.image is None or isinstance(unit.image, (bytes, str)):
        raise InvalidRequest(f"{where} needs a name and a decoded control image", PART)
    for key, value, high in (("scale", unit.scale, MAX_SCALE), ("start", unit.start, 1.0), ("end", unit.end, 1.0)):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0.0 <= value <= high:
            raise InvalidRequest(f"{where}.{key} {value!r} is out of range: it must be between 0 and {high:g}", PART)
    _check_window(where, unit.start, unit.end)


def part_inputs(units: Sequence[ControlUnit]) -> dict[str, dict[str, tuple[ControlUnit, ...]]]:
    """`ImageRequest.part_inputs` for complete units."""
    return {PART: {PART: tuple(units)}}
