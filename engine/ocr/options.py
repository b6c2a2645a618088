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
    LAUNCH_OPTIONS,
    LaunchOption,
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


# option -> (how it is read, engines that take it). The options both kinds of model share read as the image
# models' do, described once in engine.options; OCR's own are declared here.
_BOTH = ("onnxruntime", "transformers")
_POSITIVE = {"type": "integer", "minimum": 1}


def _shared(name: str, parse: Callable[[str, object], object], field: str | None = None, **changes) -> LaunchOption:
    option = LAUNCH_OPTIONS[name]
    return LaunchOption(field if field is not None else option.field, parse, changes.get("schema", option.schema),
                        changes.get("description", option.description))


_OPTIONS: Mapping[str, tuple[LaunchOption, tuple[str, ...]]] = {
    "device": (_shared("device", device_name), _BOTH),
    "model_path": (_shared("model_path", local_path, description="PP-OCR: a directory of det/rec(/cls) .onnx "
                           "files; GOT-OCR2: a checkpoint directory."), _BOTH),
    "max_batch_size": (_shared("max_batch_size", _batch, schema={"type": ["integer", "null"], "minimum": 1},
                               description="PP-OCR: text crops per recognition forward; GOT-OCR2: pages per "
                               "generate."), _BOTH),
    "max_queue_size": (_shared("max_queue_size", positive_int, description="Requests waiting before 429."), _BOTH),
    "tiny": (LaunchOption(None, _no_tiny, {"const": False}, "OCR models have no tiny checkpoint: false only."),
             _BOTH),
    "intra_op_num_threads": (LaunchOption("intra_op_num_threads", positive_int, _POSITIVE,
                                          "PP-OCR: onnxruntime threads per forward."), ("onnxruntime",)),
    "text_score": (LaunchOption("text_score", _score, {"type": "number", "minimum": 0, "maximum": 1},
                                "PP-OCR: lines recognised with a lower confidence are dropped."), ("onnxruntime",)),
    "torch_dtype": (_shared("torch_dtype", dtype_name, description="GOT-OCR2: default bfloat16 on CUDA, float32 "
                            "on a CPU."), ("transformers",)),
    "max_new_tokens": (LaunchOption("max_new_tokens", positive_int, _POSITIVE,
                                    "GOT-OCR2: longest text generated per page."), ("transformers",)),
}
OCR_LAUNCH_OPTIONS: Mapping[str, LaunchOption] = {name: option for name, (option, _) in _OPTIONS.items()}


def option_names(spec: OcrSpec) -> list[str]:
    """The launch options `spec`'s engine accepts."""
    return [name for name, (_, engines) in _OPTIONS.items() if spec.engine in engines]


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
        option = _OPTIONS[name][0]
        parsed = option.parse(name, value)
        if option.field is not None:
            fields[option.field] = parsed
    return OcrOptions(**fields)
