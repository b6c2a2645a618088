"""Launch options of OCR models, parsed and validated before anything is loaded.

The same loosely typed key/values as the diffusion models' launch options (Xinference's launch kwargs, CLI
strings, JSON), refused with `LaunchOptionError` naming the option when unknown, mistyped, or meaningless for the
model's engine (an onnxruntime thread count means nothing to GOT-OCR2, a torch dtype nothing to PP-OCR).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from kiln.engine.catalogue import OcrSpec
from kiln.engine.coerce import Unparsable, to_float
from kiln.engine.options import (
    LaunchOptionError,
    boolean,
    device_name,
    dtype_name,
    invalid_option,
    local_path,
    positive_int,
)


@dataclass(frozen=True)
class OcrOptions:
    """Validated launch options of one OCR model. `None` means the engine's default."""

    device: str = "auto"  # cpu, cuda, cuda:N or auto (CUDA when the engine can use it)
    model_path: str | None = None  # PP-OCR: a directory of det/rec(/cls) .onnx files; GOT: a checkpoint dir
    max_batch_size: int | None = None  # PP-OCR: text crops per recognition forward; GOT: pages per generate
    max_queue_size: int = 64  # requests waiting before 429
    intra_op_num_threads: int = 1  # PP-OCR: onnxruntime threads per forward (1: leave cores to other models)
    text_score: float = 0.5  # PP-OCR: lines recognised with a lower confidence are dropped
    torch_dtype: str | None = None  # GOT: None is bfloat16 on CUDA, float32 on CPU
    max_new_tokens: int = 4096  # GOT: longest text generated per page


def _batch(name: str, value: object) -> int | None:
    return None if value is None else positive_int(name, value)


def _score(name: str, value: object) -> float:
    try:
        score = to_float(value)
    except Unparsable:
        score = -1.0
    if 0 <= score <= 1:
        return score
    raise invalid_option(name, "a number between 0 and 1", value)


def _no_tiny(name: str, value: object) -> bool:
    """`tiny` is accepted only as false: OCR models have no random-weight stand-in (PP-OCR's real weights ship
    with rapidocr and load in a second, so there is nothing to stand in for)."""
    if value is not None and boolean(name, value):
        raise LaunchOptionError(
            "launch option 'tiny': OCR models have no tiny checkpoint; PP-OCR's real weights ship with the "
            "rapidocr package and need no download, so launch it without tiny", name,
        )
    return False


# option -> (OcrOptions field or None to drop, parser, engines that take it)
_BOTH = ("onnxruntime", "transformers")
_OPTIONS: Mapping[str, tuple[str | None, Callable[[str, object], object], tuple[str, ...]]] = {
    "device": ("device", device_name, _BOTH),
    "model_path": ("model_path", local_path, _BOTH),
    "max_batch_size": ("max_batch_size", _batch, _BOTH),
    "max_queue_size": ("max_queue_size", positive_int, _BOTH),
    "tiny": (None, _no_tiny, _BOTH),
    "intra_op_num_threads": ("intra_op_num_threads", positive_int, ("onnxruntime",)),
    "text_score": ("text_score", _score, ("onnxruntime",)),
    "torch_dtype": ("torch_dtype", dtype_name, ("transformers",)),
    "max_new_tokens": ("max_new_tokens", positive_int, ("transformers",)),
}


def option_names(spec: OcrSpec) -> list[str]:
    """The launch options `spec`'s engine accepts."""
    return [name for name, (_, _, engines) in _OPTIONS.items() if spec.engine in engines]


def parse_ocr_options(spec: OcrSpec, raw: Mapping[str, object]) -> OcrOptions:
    """Merge the catalogue's default launch options under `raw` and validate them for `spec`'s engine."""
    accepted = option_names(spec)
    unknown = sorted(set(raw) - set(accepted))
    if unknown:
        raise LaunchOptionError(
            f"unknown launch option {unknown[0]!r} for {spec.name} (an OCR model on {spec.engine}); accepted: "
            f"{', '.join(accepted)}", unknown[0],
        )
    fields = {}
    for name, value in {**spec.default_launch, **raw}.items():
        field_name, parse, _ = _OPTIONS[name]
        parsed = parse(name, value)
        if field_name is not None:
            fields[field_name] = parsed
    return OcrOptions(**fields)
