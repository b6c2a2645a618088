"""Loosely typed values -> Python values: the one set of conversions for image requests, OCR requests and
launch options.

Values arrive as JSON values, as multipart or command-line text, or as Xinference's `kwargs` JSON string, so a
number may be `8`, `8.0` or `"8"` and a flag `true` or `"True"`. Each conversion accepts exactly the same
spellings everywhere; what it refuses raises `Unparsable`, which says what is accepted, and each caller words
its own message around it (a request's 400 names the parameter, a launch error names the option).
"""

from __future__ import annotations

import math
from typing import Any

from .textinput import TextInputError, parse_integer, parse_json

TRUE_WORDS = frozenset({"true", "1", "yes", "on"})
FALSE_WORDS = frozenset({"false", "0", "no", "off"})
NONE_WORDS = frozenset({"none", "null"})


class Unparsable(ValueError):
    """A value is not of the kind asked for; `expected` says what is accepted (e.g. "an integer")."""

    def __init__(self, expected: str):
        super().__init__(expected)
        self.expected = expected


def to_int(value: Any) -> int:
    """An int, an integral float (JSON clients send 8.0), or decimal text; never a bool."""
    if isinstance(value, bool):
        raise Unparsable("an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and (number := parse_integer(value)) is not None:
        return number
    raise Unparsable("an integer")


def to_float(value: Any) -> float:
    """A finite number, or its text; never a bool."""
    number = None
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an int too large for a float
            pass
    if number is None or not math.isfinite(number):
        raise Unparsable("a finite number")
    return number


def to_bool(value: Any) -> bool:
    """A bool, or one of the words a CLI or a form sends (true/false, 1/0, yes/no, on/off)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS | FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise Unparsable("true or false")


def to_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise Unparsable("a string")


def is_none_word(value: Any) -> bool:
    """None, or the text a CLI sends for it (None, null)."""
    return value is None or (isinstance(value, str) and value.strip().lower() in NONE_WORDS)


def to_json_object(value: Any) -> dict[str, Any]:
    """A JSON object, or a string holding one (Xinference's `kwargs`); None and "" are the empty object."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = parse_json(value)
        except TextInputError as error:
            raise Unparsable(f"valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise Unparsable("a JSON object (or a string holding one)")
    return value
