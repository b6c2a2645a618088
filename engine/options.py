"""Launch options: how a model is loaded and run, parsed and validated before anything touches torch.

Launch options arrive as loosely typed key/values (Xinference's launch kwargs, CLI flags as strings, JSON), and a
bad one must fail at launch with a message that names it and says what is accepted, not deep inside a loader. So
this module turns them into one frozen `LaunchOptions` and stays torch-free, usable from the server and the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Mapping

from kiln.engine.backends import BACKEND_NAMES, package_unavailable
from kiln.engine.catalogue import CATALOGUE, ModelSpec
from kiln.engine.coerce import Unparsable, is_none_word, to_bool, to_int
from kiln.engine.errors import InvalidRequest

DTYPES = ("float32", "float16", "bfloat16")
HALF_DTYPES = frozenset({"float16", "bfloat16"})
QUANTIZATIONS = ("8-bit", "4-bit")
BACKENDS = BACKEND_NAMES  # auto, eager, compile, onnx, tensorrt (engine/backends)


class LaunchOptionError(InvalidRequest):
    """A launch option is unknown, of the wrong type, or has a value that is not accepted."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message, param, "invalid_launch_option")


@dataclass(frozen=True)
class LaunchOptions:
    """Validated launch options of one model. Defaults are what a launch with no options gets."""

    torch_dtype: str | None = None  # None: the catalogue default (float32 on CPU for half-precision defaults)
    device: str = "auto"  # cpu, cuda, cuda:N or auto (cuda when available)
    cpu_offload: bool = False
    quantize_text_encoder: tuple[str, ...] = ()
    text_encoder_quantization: str = "8-bit"
    drop_text_encoder_3: bool = False  # SD3 without T5, from text_encoder_3=None
    tiny: bool = False  # use the tiny random-weight checkpoint (engine.tiny)
    model_path: str | None = None  # a local diffusers directory
    max_batch_size: int | None = None  # active jobs (images) at most; None ("auto"): from free GPU memory, 16 on CPU
    max_queue_size: int = 256  # jobs waiting for admission
    backend: str = "auto"  # auto: tensorrt with a cached engine, else compile on a GPU, else eager
    # Resident ControlNets: (name, local path or None for the catalogue's hub id), in launch order.
    controlnet: tuple[tuple[str, str | None], ...] = ()
    controlnet_lanes: str = "shared"  # "split": jobs with ControlNet get lanes of their own (a benchmark baseline)


def resolve_dtype(spec: ModelSpec, options: LaunchOptions, device_type: str) -> str:
    """The dtype to load in: an explicit one as given; else the catalogue default, except that half precision
    becomes float32 on CPU, where float16 is slow or unsupported and bfloat16 much slower than float32."""
    if options.torch_dtype is not None:
        return options.torch_dtype
    if device_type == "cpu" and spec.default_dtype in HALF_DTYPES:
        return "float32"
    return spec.default_dtype


# The option parsers below are shared with the OCR models' launch options (engine/ocr/options.py).
def invalid_option(name: str, what: str, value: object) -> LaunchOptionError:
    return LaunchOptionError(f"launch option {name!r}: got {value!r}; accepted: {what}", name)


def boolean(name: str, value: object) -> bool:
    """A bool, or the words a CLI passes (true/false, 1/0, yes/no, on/off)."""
    try:
        return to_bool(value)
    except Unparsable as error:
        raise invalid_option(name, error.expected, value) from None


def positive_int(name: str, value: object) -> int:
    """An int >= 1 (or its text); bools and fractional numbers are refused."""
    try:
        number = to_int(value)
    except Unparsable:
        number = 0
    if number >= 1:
        return number
    raise invalid_option(name, "an integer >= 1", value)


def _batch_size(name: str, value: object) -> int | None:
    """A positive int, or "auto" (None): derived from free memory at load (engine/memory.py)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    try:
        return positive_int(name, value)
    except LaunchOptionError:
        raise invalid_option(name, "an integer >= 1 or 'auto'", value) from None


def _choice(choices: tuple[str, ...]) -> Callable[[str, object], str]:
    def parse(name: str, value: object) -> str:
        if isinstance(value, str) and value in choices:
            return value
        raise invalid_option(name, " or ".join(repr(choice) for choice in choices), value)

    return parse


def dtype_name(name: str, value: object) -> str | None:
    """A dtype name; `torch.float16` (str of a torch dtype) is accepted too, None means the catalogue default."""
    if value is None:
        return None
    return _choice(DTYPES)(name, value.removeprefix("torch.") if isinstance(value, str) else value)


def device_name(name: str, value: object) -> str:
    if isinstance(value, str):
        device = value.strip().lower()
        index = device.removeprefix("cuda:")
        if device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and index.isdigit()):
            return device
    raise invalid_option(name, "'auto', 'cpu', 'cuda' or 'cuda:N'", value)


def _names(name: str, value: object) -> tuple[str, ...]:
    """Component names from a comma-separated string or a list of strings, without repeats."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) for item in items):
        raise invalid_option(name, "a comma-separated string or a list of text encoder names", value)
    return tuple(dict.fromkeys(item.strip() for item in items if item.strip()))


def local_path(name: str, value: object) -> str | None:
    if value is None or (isinstance(value, str) and value.strip()):
        return value
    if hasattr(value, "__fspath__"):
        return str(value)
    raise invalid_option(name, "a path to a local model directory", value)


def _drop(name: str, value: object) -> bool:
    """text_encoder_3 takes only None: Xinference's way of saying "load SD3 without its T5 encoder"."""
    if is_none_word(value):
        return True
    raise invalid_option(name, "None (load SD3 without its T5 text encoder)", value)


def _backend(name: str, value: object) -> str:
    """A backend name whose packages are installed here (whether the device suits it is checked at load)."""
    backend = _choice(BACKENDS)(name, value)
    reason = package_unavailable(backend)
    if reason:
        usable = [choice for choice in BACKENDS if package_unavailable(choice) is None]
        raise LaunchOptionError(
            f"launch option {name!r}: backend {backend!r} is not available on this machine: {reason}; "
            f"accepted here: {' or '.join(repr(choice) for choice in usable)}", name,
        )
    return backend


def _controlnets(name: str, value: object) -> tuple[tuple[str, str | None], ...]:
    """Xinference's `controlnet`: a name or a list of names (the catalogue's), or Kiln's {name: local path}."""
    if is_none_word(value) or value == "":
        return ()
    if isinstance(value, str):
        value = [item.strip() for item in value.split(",") if item.strip()]
    if isinstance(value, (list, tuple)) and all(isinstance(item, str) and item for item in value):
        return tuple((item, None) for item in dict.fromkeys(value))
    if isinstance(value, Mapping) and value and all(isinstance(key, str) and key for key in value):
        return tuple((key, local_path(f"{name}.{key}", path)) for key, path in value.items())
    raise invalid_option(name, "a ControlNet name, a list of names, or {name: local path}", value)


# Launch option name -> (LaunchOptions field, parser).
_OPTIONS: Mapping[str, tuple[str, Callable[[str, object], object]]] = {
    "torch_dtype": ("torch_dtype", dtype_name),
    "device": ("device", device_name),
    "cpu_offload": ("cpu_offload", boolean),
    "quantize_text_encoder": ("quantize_text_encoder", _names),
    "text_encoder_quantization": ("text_encoder_quantization", _choice(QUANTIZATIONS)),
    "text_encoder_3": ("drop_text_encoder_3", _drop),
    "tiny": ("tiny", boolean),
    "model_path": ("model_path", local_path),
    "max_batch_size": ("max_batch_size", _batch_size),
    "max_queue_size": ("max_queue_size", positive_int),
    "backend": ("backend", _backend),
    "controlnet": ("controlnet", _controlnets),
    "controlnet_lanes": ("controlnet_lanes", _choice(("shared", "split"))),
}


def parse_launch_options(spec: ModelSpec, raw: Mapping[str, object]) -> LaunchOptions:
    """Merge the catalogue's default launch options under `raw` and validate the result against the model."""
    unknown = sorted(set(raw) - set(_OPTIONS))
    if unknown:
        raise LaunchOptionError(f"unknown launch option {unknown[0]!r}; accepted: {', '.join(_OPTIONS)}",
                                unknown[0])
    fields = {}
    for name, value in {**spec.default_launch, **raw}.items():
        field_name, parse = _OPTIONS[name]
        fields[field_name] = parse(name, value)
    options = LaunchOptions(**fields)
    _check_text_encoders(spec, options, explicit=_names("quantize_text_encoder", raw.get("quantize_text_encoder")))
    if options.drop_text_encoder_3 and "text_encoder_3" in options.quantize_text_encoder:
        # Only the catalogue default can get here (an explicit request is refused above): drop it quietly.
        kept = tuple(name for name in options.quantize_text_encoder if name != "text_encoder_3")
        options = replace(options, quantize_text_encoder=kept)
    _check_controlnets(spec, options)
    return options


def _check_controlnets(spec: ModelSpec, options: LaunchOptions) -> None:
    """ControlNets named without a path must be the model's; a name of another model's list says whose it is."""
    for name, path in options.controlnet:
        if path is not None or name in spec.controlnets:
            continue
        accepted = ", ".join(spec.controlnets) or "none by name (pass {name: local path})"
        owners = sorted((other for other in CATALOGUE.values() if name in other.controlnets),
                        key=lambda other: other.family is not spec.family)  # the same family first
        whose = (f"; {name!r} is a ControlNet of {owners[0].name} ({owners[0].controlnets[name].hub_id}), made for "
                 f"another denoiser than {spec.name}'s") if owners else ""
        raise LaunchOptionError(f"launch option 'controlnet': {spec.name} has no ControlNet {name!r}{whose}; "
                                f"accepted: {accepted}", "controlnet")


def _check_text_encoders(spec: ModelSpec, options: LaunchOptions, explicit: tuple[str, ...]) -> None:
    """Quantized and dropped text encoders must exist in the model's family, and not contradict each other."""
    encoders = spec.family.text_encoders
    for name in options.quantize_text_encoder:
        if name not in encoders:
            raise LaunchOptionError(
                f"launch option 'quantize_text_encoder': {spec.name} ({spec.family.name}) has no {name!r}; "
                f"accepted: {', '.join(encoders)}", "quantize_text_encoder",
            )
    if options.drop_text_encoder_3 and "text_encoder_3" not in encoders:
        raise LaunchOptionError(
            f"launch option 'text_encoder_3': {spec.name} ({spec.family.name}) has no text_encoder_3; only SD3 models do",
            "text_encoder_3",
        )
    if options.drop_text_encoder_3 and "text_encoder_3" in explicit:
        raise LaunchOptionError(
            "launch options 'text_encoder_3' and 'quantize_text_encoder' conflict: text_encoder_3=None drops the "
            "encoder that quantize_text_encoder asks to quantize; pass only one of them", "text_encoder_3",
        )
