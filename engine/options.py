"""Launch options: how a model is loaded and run, parsed and validated before anything touches torch.

Launch options arrive as loosely typed key/values (Xinference's launch kwargs, CLI flags as strings, JSON), and a
bad one must fail at launch with a message that names it and says what is accepted, not deep inside a loader. So
this module turns them into one frozen `LaunchOptions` and stays torch-free, usable from the server and the CLI.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

from kiln.engine.backends import BACKEND_NAMES, package_unavailable
from kiln.engine.catalogue import CATALOGUE, ModelSpec
from kiln.engine.coerce import Unparsable, is_none_word, to_bool, to_int
from kiln.engine.errors import InvalidRequest
from kiln.engine.lora_options import OPTION_SCHEMAS as LORA_SCHEMAS
from kiln.engine.lora_options import LoraOptions, check_option, parse_lora_options

DTYPES = ("float32", "float16", "bfloat16")
HALF_DTYPES = frozenset({"float16", "bfloat16"})
QUANTIZATIONS = ("8-bit", "4-bit")
TRANSFORMER_QUANTIZATIONS = (*QUANTIZATIONS, "nf4")  # Xinference's spelling; 4-bit is NF4 here too
ATTENTION_SLICES = ("auto", "max")
CONTROLNET_LANES = ("shared", "split")
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
    # Memory and speed options of Xinference's diffusers engine, each applied through diffusers' own mechanism.
    vae_tiling: bool = False  # vae.enable_tiling(): decode and encode large images in overlapping tiles
    vae_slicing: bool = False  # vae.enable_slicing(): decode a batch one image at a time
    attention_slicing: str | int | None = None  # enable_attention_slicing(value) on UNets; None: off
    sequential_cpu_offload: bool = False  # enable_sequential_cpu_offload(): weights on the GPU one layer at a time
    variant: str | None = None  # weights variant to load, e.g. "fp16" (diffusion_pytorch_model.fp16.safetensors)
    low_cpu_mem_usage: bool | None = None  # None: diffusers' default (True with accelerate)
    use_safetensors: bool | None = None  # None: safetensors when present, else .bin
    transformer_quantization: str | None = None  # the denoiser in 8-bit or 4-bit through diffusers' bitsandbytes
    # Resident ControlNets: (name, local path or None for the catalogue's hub id), in launch order.
    controlnet: tuple[tuple[str, str | None], ...] = ()
    controlnet_lanes: str = "shared"  # "split": jobs with ControlNet get lanes of their own (a benchmark baseline)
    lora: LoraOptions = LoraOptions()  # peft_model_config, max_loras, lora_dir, ... (engine/lora_options.py)

    @property
    def eager_only(self) -> str | None:
        """Why only the eager backend can run this launch (None: any backend can). Each of these rewrites the
        denoiser's modules at load in a way exports and compiled graphs do not follow."""
        if self.sequential_cpu_offload:
            return "sequential_cpu_offload moves each layer's weights to the GPU as it runs"
        if self.transformer_quantization:
            return "transformer_quantization runs bitsandbytes layers, which exports and compiled graphs cannot take"
        if self.attention_slicing is not None:
            return "attention_slicing runs diffusers' sliced attention, a Python loop over slices"
        return None


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


def _optional_boolean(name: str, value: object) -> bool | None:
    return None if value is None else boolean(name, value)


def _optional_choice(choices: tuple[str, ...]) -> Callable[[str, object], str | None]:
    parse = _choice(choices)
    return lambda name, value: None if is_none_word(value) else parse(name, value)


def _attention_slicing(name: str, value: object) -> str | int | None:
    """True (Xinference's form) is diffusers' "auto"; "auto", "max", a slice size >= 1, or false/None (off)."""
    if is_none_word(value):
        return None
    if isinstance(value, str) and value.strip().lower() in ATTENTION_SLICES:
        return value.strip().lower()
    try:
        return "auto" if boolean(name, value) else None
    except LaunchOptionError:
        pass
    try:
        return positive_int(name, value)
    except LaunchOptionError:
        raise invalid_option(name, "true, false, 'auto', 'max' or a slice size >= 1", value) from None


_VARIANT = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


def _variant(name: str, value: object) -> str | None:
    """A weights variant name (the `fp16` of `model.fp16.safetensors`): a file-name part, nothing path-like."""
    if is_none_word(value):
        return None
    if isinstance(value, str) and _VARIANT.match(value):
        return value
    raise invalid_option(name, "a variant name such as 'fp16' (letters, digits, '_' or '-')", value)


@dataclass(frozen=True)
class LaunchOption:
    """One launch option: the LaunchOptions field it sets (None: checked, then dropped, or read with its group:
    the LoRA options make `LaunchOptions.lora` together), how its value is read, and what the API document says
    about it (`schema` is the JSON schema of the values it accepts)."""

    field: str | None
    parse: Callable[[str, object], object]
    schema: Mapping[str, Any]
    description: str


_BOOL: Mapping[str, Any] = {"type": "boolean"}
_NULLABLE_BOOL: Mapping[str, Any] = {"type": ["boolean", "null"]}
_POSITIVE: Mapping[str, Any] = {"type": "integer", "minimum": 1}


def _enum(values: tuple[str, ...], nullable: bool = False) -> Mapping[str, Any]:
    return {"enum": [*values, None]} if nullable else {"type": "string", "enum": list(values)}


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


LAUNCH_OPTIONS: Mapping[str, LaunchOption] = {
    "torch_dtype": LaunchOption("torch_dtype", dtype_name, _enum(DTYPES, nullable=True),
                                "Weights dtype; default: the catalogue's (float32 on a CPU for half-precision ones)."),
    "device": LaunchOption("device", device_name, {"type": "string", "pattern": r"^(auto|cpu|cuda(:\d+)?)$"},
                           "auto (CUDA when available), cpu, cuda or cuda:N."),
    "cpu_offload": LaunchOption("cpu_offload", boolean, _BOOL,
                                "Keep components on the CPU and move each to the GPU while it runs (GPU only)."),
    "quantize_text_encoder": LaunchOption(
        "quantize_text_encoder", _names,
        {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}, {"type": "null"}]},
        "Text encoders to quantize with bitsandbytes (comma-separated or a list), e.g. text_encoder_2."),
    "text_encoder_quantization": LaunchOption("text_encoder_quantization", _choice(QUANTIZATIONS),
                                              _enum(QUANTIZATIONS), "8-bit or 4-bit (NF4) for quantize_text_encoder."),
    "text_encoder_3": LaunchOption("drop_text_encoder_3", _drop, {"type": "null"},
                                   "null loads SD3 without its T5 text encoder."),
    "tiny": LaunchOption("tiny", boolean, _BOOL, "Load Kiln's tiny random-weight checkpoint (no download)."),
    "model_path": LaunchOption("model_path", local_path, {"type": ["string", "null"]},
                               "A local diffusers checkpoint directory."),
    "max_batch_size": LaunchOption("max_batch_size", _batch_size,
                                   {"oneOf": [_POSITIVE, {"const": "auto"}, {"type": "null"}]},
                                   "Images denoised together; auto: from free GPU memory (16 on a CPU)."),
    "max_queue_size": LaunchOption("max_queue_size", positive_int, _POSITIVE, "Images waiting before 429."),
    "backend": LaunchOption("backend", _backend, _enum(BACKENDS),
                            "What runs the denoiser: auto, eager, compile, onnx or tensorrt."),
    "vae_tiling": LaunchOption("vae_tiling", boolean, _BOOL,
                               "Decode (and encode) large images in overlapping tiles: bounded VAE memory."),
    "vae_slicing": LaunchOption("vae_slicing", boolean, _BOOL, "Decode a batch one image at a time."),
    "attention_slicing": LaunchOption(
        "attention_slicing", _attention_slicing,
        {"oneOf": [{"type": "boolean"}, {"enum": list(ATTENTION_SLICES)}, _POSITIVE, {"type": "null"}]},
        "diffusers' sliced attention on UNet models (SD, SDXL): true or auto, max, or a slice size; eager only."),
    "sequential_cpu_offload": LaunchOption(
        "sequential_cpu_offload", boolean, _BOOL,
        "Keep weights on the CPU and move each layer to the GPU while it runs (GPU only; least memory, slowest)."),
    "variant": LaunchOption("variant", _variant, {"type": ["string", "null"], "pattern": _VARIANT.pattern},
                            "Weights variant to load, e.g. fp16."),
    "low_cpu_mem_usage": LaunchOption("low_cpu_mem_usage", _optional_boolean, _NULLABLE_BOOL,
                                      "Load weights without a random initialisation first (diffusers' default)."),
    "use_safetensors": LaunchOption("use_safetensors", _optional_boolean, _NULLABLE_BOOL,
                                    "true: load .safetensors only; false: .bin only; null: safetensors when present."),
    "transformer_quantization": LaunchOption(
        "transformer_quantization", _optional_choice(TRANSFORMER_QUANTIZATIONS),
        _enum(TRANSFORMER_QUANTIZATIONS, nullable=True),
        "Quantize the UNet/transformer with bitsandbytes through diffusers: 8-bit, 4-bit or nf4 (NF4); CUDA only."),
    "controlnet": LaunchOption(
        "controlnet", _controlnets,
        {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}},
                   {"type": "object", "additionalProperties": {"type": "string"}}, {"type": "null"}]},
        "ControlNets kept resident: a catalogue name, a list of names, or {name: local diffusers folder}."),
    "controlnet_lanes": LaunchOption("controlnet_lanes", _choice(CONTROLNET_LANES), _enum(CONTROLNET_LANES),
                                     "shared: ControlNet and plain jobs in the same forwards; split: apart (a "
                                     "benchmark baseline)."),
    **{name: LaunchOption(None, check_option, schema, description)
       for name, (schema, description) in LORA_SCHEMAS.items()},
}


def parse_launch_options(spec: ModelSpec, raw: Mapping[str, object]) -> LaunchOptions:
    """Merge the catalogue's default launch options under `raw` and validate the result against the model."""
    unknown = sorted(set(raw) - set(LAUNCH_OPTIONS))
    if unknown:
        raise LaunchOptionError(f"unknown launch option {unknown[0]!r}; accepted: {', '.join(LAUNCH_OPTIONS)}",
                                unknown[0])
    given = {**spec.default_launch, **raw}
    fields: dict[str, object] = {"lora": parse_lora_options({k: v for k, v in given.items() if k in LORA_SCHEMAS})}
    for name, value in given.items():
        option = LAUNCH_OPTIONS[name]
        parsed = option.parse(name, value)
        if option.field is not None:
            fields[option.field] = parsed
    options = _check_memory_options(spec, LaunchOptions(**fields))
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


def _check_memory_options(spec: ModelSpec, options: LaunchOptions) -> LaunchOptions:
    """The memory options against each other, the model and the backend. `auto` becomes eager when only eager can
    run them; an explicit other backend is refused."""
    if options.cpu_offload and options.sequential_cpu_offload:
        raise LaunchOptionError(
            "launch options 'cpu_offload' and 'sequential_cpu_offload' conflict: both decide where the weights live; "
            "pass one of them (sequential_cpu_offload needs less GPU memory and runs slower)", "sequential_cpu_offload",
        )
    if options.attention_slicing is not None and spec.family.denoiser != "unet":
        raise LaunchOptionError(
            f"launch option 'attention_slicing': diffusers slices the attention of UNets only, and {spec.name} "
            f"({spec.family.name}) denoises with a {spec.family.denoiser}; launch without it (its attention already "
            "runs scaled_dot_product_attention, which does not hold the whole attention matrix)", "attention_slicing",
        )
    reason = options.eager_only
    if reason and options.backend not in ("auto", "eager"):
        raise LaunchOptionError(
            f"launch option 'backend': {options.backend!r} cannot run this launch: {reason}; use backend='eager' or "
            "'auto'", "backend",
        )
    return replace(options, backend="eager") if reason else options
