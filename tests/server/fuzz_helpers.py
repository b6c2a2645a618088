"""Hypothesis strategies for fuzzing the image endpoints: request parameters, raw JSON and uploads.

The parameters come from the request schema (`engine.schema.PARAMETERS`: name -> Parameter with its kind), each
drawn from values of its kind and from arbitrary JSON, so a parameter added to the schema is fuzzed without a
change here; `KINDS` is the one place that knows the kinds. Valid draws
stay cheap (a few steps at small sizes), so most time goes to the input paths.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st
from PIL import Image

from kiln.engine import schema
from kiln.engine.schema import PARAMETERS


@dataclass(frozen=True)
class Raw:
    """JSON text that goes into a body as it is: what json.dumps will not write (huge numbers, deep nesting)."""

    text: str


def to_json(value: Any) -> str:
    """json.dumps, with each Raw value spliced in as its text (lone surrogates come out as \\udxxx escapes)."""
    raws: list[str] = []

    def splice(item: Any) -> str:
        if not isinstance(item, Raw):
            raise TypeError(f"not JSON: {item!r}")
        raws.append(item.text)
        return f"\ue000{len(raws) - 1}\ue000"

    text = json.dumps(value, default=splice)  # ensure_ascii: the marker is written as \ue000
    return re.sub(r'"\\ue000(\d+)\\ue000"', lambda match: raws[int(match.group(1))], text)


def as_text(value: Any) -> str:
    """A value as a multipart text field carries it: strings as they are, anything else as JSON."""
    return value if isinstance(value, str) else value.text if isinstance(value, Raw) else to_json(value)


# --- values ------------------------------------------------------------------------------------------------------
_characters = st.one_of(st.characters(), st.characters(categories=["Cs"]), st.sampled_from("x0 -*[]{}\"\\\n"))
TOKENS = ["", "url", "b64_json", "png", "jpeg", "webp", "gif", "default", "Euler", "Euler a", "64x64", "128*64",
          "64x72", "auto", "true", "false", "1", "-1", "[1, 2]", "{}", "null", "nan"]
texts = st.one_of(st.sampled_from(TOKENS), st.text(_characters, max_size=12))
raw = st.one_of(
    st.integers(4301, 4400).map(lambda digits: Raw("9" * digits)),  # past the int-string conversion limit
    st.sampled_from([Raw("NaN"), Raw("-Infinity"), Raw("1e999"), Raw("-0.0"), Raw("1E+2")]),
    st.integers(60, 2000).map(lambda depth: Raw("[" * depth + "]" * depth)),
)
integers = st.one_of(st.integers(-2, 5), st.sampled_from([64, 72, 128, 1023, 4096, 2**31, -(2**63), 10**20]), raw)
numbers = st.one_of(st.floats(0, 10), st.floats(allow_nan=True, allow_infinity=True), integers)
anything = st.recursive(st.none() | st.booleans() | integers | numbers | texts,
                        lambda children: st.lists(children, max_size=3) | st.dictionaries(texts, children, max_size=3),
                        max_leaves=6)
# Parameter kind (engine.schema) -> plausible values of that kind.
KINDS = {
    schema.INTEGER: integers,
    schema.NUMBER: numbers,
    schema.TEXT: texts,
    schema.BOOLEAN: st.one_of(st.booleans(), st.sampled_from(["true", "0", "yes"])),
    schema.SEED: st.one_of(integers, st.lists(integers, max_size=3)),
    schema.PROMPT: st.one_of(texts, st.lists(texts, max_size=3)),
}


def parameter_values(name: str) -> st.SearchStrategy:
    return st.one_of(KINDS.get(PARAMETERS[name].kind, anything), anything) if name in PARAMETERS else anything


@st.composite
def parameters(draw: st.DrawFn, max_fields: int = 4, nested: bool = True) -> dict[str, Any]:
    """Some request parameters (known names mostly, unknown ones too), maybe with `kwargs` holding more of them
    as an object, as the JSON string Xinference's clients send, or as junk."""
    names = st.one_of(st.sampled_from(sorted(PARAMETERS)), texts)
    fields = {}
    for _ in range(draw(st.integers(0, max_fields))):
        name = draw(names)
        fields[name] = draw(parameter_values(name))
    if nested and draw(st.booleans()):
        inner = parameters(max_fields=3, nested=False)
        fields["kwargs"] = draw(st.one_of(inner, inner.map(to_json), texts, anything))
    return fields


# --- uploads -------------------------------------------------------------------------------------------------------
MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "I;16", "F")
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")


def _writable(mode: str, fmt: str) -> bool:
    try:
        Image.new(mode, (2, 2)).save(io.BytesIO(), format=fmt)
    except (OSError, ValueError, KeyError):
        return False
    return True


WRITABLE = [(mode, fmt) for mode in MODES for fmt in FORMATS if _writable(mode, fmt)]
EXOTIC = [(mode, fmt) for mode, fmt in WRITABLE if mode not in ("L", "RGB", "RGBA")]  # where decoders break
sizes = st.one_of(st.tuples(st.integers(1, 80), st.integers(1, 80)),
                  st.sampled_from([(64, 64), (1, 3000), (3000, 1), (2, 900), (1100, 70)]))


def encoded(mode: str, fmt: str, size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format=fmt)
    return buffer.getvalue()


@st.composite
def upload(draw: st.DrawFn, size: tuple[int, int] | None = None) -> bytes:
    """An image in any mode and format PIL writes, sometimes truncated; or bytes that are no image at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=64))
    mode, fmt = draw(st.one_of(st.sampled_from(WRITABLE), st.sampled_from(EXOTIC)))
    data = encoded(mode, fmt, size or draw(sizes))
    if draw(st.integers(0, 5)) == 0:
        data = data[: draw(st.integers(0, len(data)))]
    return data
