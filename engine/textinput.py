"""Reading client text strictly: JSON documents and decimal integers, for every layer that parses them (request
and launch bodies, `kwargs` strings, JSON-valued and numeric text fields).

`json.loads` and `int` accept input that breaks the layers after them, each found by fuzzing the server:
- lone UTF-16 surrogates (`"\\ud800"`, or raw CESU-8 bytes, which `json.loads` decodes with surrogatepass): no
  UTF-8 encoder can write them back, so a tokenizer fails on them and even an error message naming them fails;
- numbers past Python's int-string conversion limit (`sys.get_int_max_str_digits()`, 4300 digits), a ValueError
  that is not a JSONDecodeError, and floats that overflow to infinity;
- nesting deep enough to exhaust the recursion limit (RecursionError), and NaN/Infinity, which are not JSON.
Here each is a `TextInputError` (a ValueError) whose message says what to fix and never echoes the text.
"""

from __future__ import annotations

import json
import math
import re
import sys
from typing import Any

MAX_DEPTH = 64  # nesting levels of arrays and objects; Kiln's bodies need 3
_INTEGER = re.compile(r"\s*[+-]?[0-9]+\s*")


class TextInputError(ValueError):
    """Client text that is not acceptable JSON."""


def parse_json(data: bytes | str) -> Any:
    """The JSON value of `data` (bytes in UTF-8, -16 or -32, as json detects them); TextInputError otherwise."""
    try:
        value = json.loads(data, parse_constant=_not_json, parse_float=_finite)
    except TextInputError:
        raise
    except json.JSONDecodeError as error:
        raise TextInputError(f"{error.msg} at position {error.pos}") from None
    except UnicodeDecodeError:
        raise TextInputError("it is not UTF-8 text") from None
    except RecursionError:
        raise TextInputError(f"it is nested deeper than {MAX_DEPTH} levels") from None
    except ValueError:  # json's only other ValueError: an integer past the conversion limit
        raise TextInputError(f"a number has more than {sys.get_int_max_str_digits()} digits") from None
    _check(value)
    return value


def parse_integer(text: str) -> int | None:
    """`text` as an int if it is a decimal integer (ASCII digits, optional sign, surrounding spaces) that Python
    can convert, else None (the caller says what it expected)."""
    if not _INTEGER.fullmatch(text):
        return None
    try:
        return int(text)
    except ValueError:  # more digits than the int-string conversion limit
        return None


def _not_json(constant: str) -> Any:
    raise TextInputError(f"{constant} is not a JSON number; send a finite number")


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise TextInputError("a number is too large to be a finite float")
    return number


def _check(value: Any) -> None:
    """Refuse lone surrogates in any key or string, and nesting past MAX_DEPTH (iteratively: no recursion)."""
    pending = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    raise TextInputError("a string holds a lone UTF-16 surrogate (such as \\ud800), which is not "
                                         "Unicode text; send valid UTF-8") from None
        elif isinstance(item, (list, dict)):
            if depth >= MAX_DEPTH:
                raise TextInputError(f"it is nested deeper than {MAX_DEPTH} levels")
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            pending.extend((child, depth + 1) for child in children)
