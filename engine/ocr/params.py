"""OCR request parameters (the `kwargs` of `/v1/images/ocr`), validated against the model's engine.

Values arrive as JSON values (from the `kwargs` JSON string) or as text (top-level multipart fields); both are
parsed by the parameter's kind, so `"pages": [1, 3]`, `pages=1,3` and `pages=[1,3]` mean the same. An unknown
parameter is refused, naming it and listing what the model accepts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from kiln.engine.catalogue import OcrSpec
from kiln.engine.coerce import to_bool, to_int
from kiln.engine.schema import read_as, read_kwargs
from kiln.engine.textinput import parse_json

from ..errors import InvalidRequest
from .document import DocumentLimits

MAX_REQUEST_ID_CHARS = 200
GOT_OCR_TYPES = ("ocr", "format")
GOT_COLORS = ("red", "green", "blue")


@dataclass(frozen=True)
class OcrParams:
    """A validated OCR request's parameters. `pages`/`dpi` None: every page / the default dpi."""

    detail: bool = False
    pages: tuple[int, ...] | None = None
    dpi: int | None = None
    request_id: str | None = None
    ocr_type: str = "ocr"  # GOT: "format" asks for markdown/LaTeX
    ocr_box: tuple[float, float, float, float] | None = None  # GOT: read only this region (pixels)
    ocr_color: str | None = None  # GOT: read only text of this colour


def _boolean(name: str, value: Any) -> bool:
    return read_as(name, to_bool, value)


def _integer(name: str, value: Any) -> int:
    return read_as(name, to_int, value)


def _pages(name: str, value: Any) -> tuple[int, ...]:
    """An int or a list of 1-based page numbers (text: `3`, `1,3` or `[1, 3]`); repeats are dropped."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = parse_json(text)
            except ValueError:
                raise InvalidRequest(f"{name} must be a page number or a list of them, got {value!r}", name) from None
        else:
            value = [part for part in text.split(",") if part.strip()] if "," in text else text
    items = value if isinstance(value, list) else [value]
    if not items:
        raise InvalidRequest(f"{name} is an empty list; give at least one 1-based page number", name)
    try:
        numbers = [_integer(name, item) for item in items]
    except InvalidRequest:
        raise InvalidRequest(f"{name} must be a page number or a list of them (1-based), got {value!r}",
                            name) from None
    if any(number < 1 for number in numbers):
        raise InvalidRequest(f"{name} are 1-based page numbers; got {numbers}", name)
    return tuple(dict.fromkeys(numbers))


def _request_id(name: str, value: Any) -> str:
    if isinstance(value, str) and 0 < len(value) <= MAX_REQUEST_ID_CHARS:
        return value
    raise InvalidRequest(f"{name} must be a string of 1 to {MAX_REQUEST_ID_CHARS} characters", name)


def _choice(choices: tuple[str, ...]) -> Callable[[str, Any], str]:
    def parse(name: str, value: Any) -> str:
        if isinstance(value, str) and value.strip().lower() in choices:
            return value.strip().lower()
        raise InvalidRequest(f"{name} must be one of {', '.join(choices)}; got {value!r}", name)

    return parse


def _plain_only(name: str, value: Any) -> str:
    """PP-OCR reads plain text only; GOT's `ocr_type: "ocr"` is accepted for clients written for GOT."""
    if value == "ocr":
        return "ocr"
    raise InvalidRequest(f"{name}: this model reads plain text only; accepted: 'ocr' (formatted output needs "
                        f"GOT-OCR2_0), got {value!r}", name)


def _box(name: str, value: Any) -> tuple[float, float, float, float] | None:
    """GOT's region: [x1, y1, x2, y2] in pixels, as a list or its text (GOT's own API takes the text)."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = parse_json(value)
        except ValueError:
            pass
    if (isinstance(value, list) and len(value) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                          and math.isfinite(v) for v in value)):
        x1, y1, x2, y2 = (float(v) for v in value)
        if 0 <= x1 < x2 and 0 <= y1 < y2:
            return (x1, y1, x2, y2)
    raise InvalidRequest(f"{name} must be [x1, y1, x2, y2] in pixels with x1 < x2 and y1 < y2, got {value!r}", name)


@dataclass(frozen=True)
class OcrParameter:
    """One OCR request parameter: how its value is read, and what the API document says of it."""

    parse: Callable[[str, Any], Any]
    schema: Mapping[str, Any]
    description: str


_DPI = DocumentLimits()  # the dpi bounds open_document enforces
_PAGES_SCHEMA = {"oneOf": [{"type": "integer", "minimum": 1},
                           {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 1},
                           {"type": "string"}]}
_COMMON: dict[str, OcrParameter] = {
    "detail": OcrParameter(_boolean, {"type": "boolean"}, "PP-OCR: answer {text, lines: [{text, box, score}]}."),
    "pages": OcrParameter(_pages, _PAGES_SCHEMA, "PDF: the 1-based pages to read (an int, a list, or '1,3')."),
    "dpi": OcrParameter(_integer, {"type": "integer", "minimum": _DPI.min_dpi, "maximum": _DPI.max_dpi},
                        f"PDF: rasterising resolution (default {_DPI.default_dpi})."),
    "request_id": OcrParameter(_request_id, {"type": "string", "minLength": 1, "maxLength": MAX_REQUEST_ID_CHARS},
                               "Your id for progress and abort calls."),
}
_BY_ENGINE: dict[str, dict[str, OcrParameter]] = {
    "onnxruntime": {**_COMMON, "ocr_type": OcrParameter(_plain_only, {"const": "ocr"}, "PP-OCR reads plain text.")},
    "transformers": {
        **_COMMON,
        "ocr_type": OcrParameter(_choice(GOT_OCR_TYPES), {"enum": list(GOT_OCR_TYPES)},
                                 "GOT-OCR2: ocr (plain text) or format (markdown/LaTeX)."),
        "ocr_box": OcrParameter(_box, {"oneOf": [{"type": "array", "items": {"type": "number"}, "minItems": 4,
                                                  "maxItems": 4}, {"type": "string"}]},
                                "GOT-OCR2: read only this region, [x1, y1, x2, y2] in pixels."),
        "ocr_color": OcrParameter(_choice(GOT_COLORS), {"enum": list(GOT_COLORS)},
                                  "GOT-OCR2: read only text of this colour."),
    },
}
# Every OCR parameter of any engine, for the API document.
OCR_PARAMETERS: Mapping[str, OcrParameter] = {name: p for params in _BY_ENGINE.values() for name, p in params.items()}


def parameter_names(spec: OcrSpec) -> list[str]:
    return list(_BY_ENGINE[spec.engine])


def parse_ocr_fields(spec: OcrSpec, fields: Mapping[str, Any]) -> OcrParams:
    """An OCR call's multipart text fields: `kwargs` (a JSON string or object) under the other top-level
    fields, validated for `spec`."""
    raw = {**read_kwargs(fields.get("kwargs")), **{k: v for k, v in fields.items() if k not in ("model", "kwargs")}}
    return parse_ocr_params(spec, raw)


def parse_ocr_params(spec: OcrSpec, raw: Mapping[str, Any]) -> OcrParams:
    """Validate request parameters for `spec`; None values count as absent."""
    parsers = _BY_ENGINE[spec.engine]
    unknown = sorted(name for name in raw if name not in parsers)
    if unknown:
        raise InvalidRequest(
            f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} for {spec.name}; "
            f"accepted: {', '.join(parsers)}", unknown[0],
        )
    values = {name: parsers[name].parse(name, value) for name, value in raw.items() if value is not None}
    if spec.engine == "transformers" and values.get("detail"):
        raise InvalidRequest(f"detail: {spec.name} reads text without line boxes; detail=true needs PP-OCR",
                            "detail")
    return OcrParams(**values)
