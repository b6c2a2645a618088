"""LoRA launch options, torch-free: Xinference's `peft_model_config` and vLLM's slot options.

    peft_model_config = {"lora_list": [{"lora_name": "pixel", "local_path": "/loras/pixel.safetensors"}],
                         "image_lora_load_kwargs": {...}, "image_lora_fuse_kwargs": {"lora_scale": 0.8}}
    max_loras (0: fused, as Xinference; N: per-row mode with N resident slots), max_lora_rank (64),
    max_cpu_loras (parsed adapters kept in host memory), max_loras_per_request (3),
    lora_dir (a folder of .safetensors files, names = stems, loaded on first use), lora_default (all | none),
    lora_batching (mixed | per-config: the peers' one lane per LoRA set, to compare against)

Everything a launch body can get wrong is refused here with the option's name, before anything loads; what needs
the model (a file that does not fit it) is checked at load by `engine.parts.lora`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from kiln.engine.coerce import Unparsable, to_bool, to_float, to_int
from kiln.engine.errors import InvalidRequest

MAX_SCALE = 10.0  # |scale| bound of a request's LoRA (and of a launch's default scale)
MAX_RANK = 512  # vLLM's largest max_lora_rank
DEFAULTS = ("all", "none")
# How per-row mode batches: rows with different LoRAs in one forward (Kiln's way), or one lane per LoRA set (the
# peers' way: vLLM-Omni, tt-inference-server, llama.cpp), kept as a switch to measure the difference.
BATCHING = ("mixed", "per-config")
# lora_state_dict's keywords that a launch may pass through image_lora_load_kwargs (low_cpu_mem_usage has no
# effect here: Kiln never builds peft layers); image_lora_fuse_kwargs follows diffusers' fuse_lora.
LOAD_KWARGS = frozenset({"weight_name", "subfolder", "use_safetensors", "local_files_only", "cache_dir", "revision",
                         "low_cpu_mem_usage"})
FUSE_KWARGS = frozenset({"lora_scale", "safe_fusing", "adapter_names", "components"})


class LoraOptionError(InvalidRequest):
    def __init__(self, message: str, param: str):
        super().__init__(message, param, "invalid_launch_option")


def check_name(name: Any, where: str) -> str:
    """A LoRA name: non-empty text without path separators or '..', so no name reaches outside lora_dir."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidRequest(f"{where}: a LoRA name must be a non-empty string, got {name!r}", where)
    if "/" in name or "\\" in name or ".." in name or "\0" in name:
        raise InvalidRequest(f"{where}: LoRA name {name!r} may not contain path separators or '..'", where)
    return name


def check_scale(value: Any, where: str) -> float:
    """A finite number in [-10, 10]: past that a LoRA only produces noise, and NaN or inf would poison the
    row's whole image."""
    try:
        scale = to_float(value)
    except Unparsable:
        scale = math.nan
    if not -MAX_SCALE <= scale <= MAX_SCALE:
        raise InvalidRequest(f"{where}: a LoRA scale must be a finite number between -{MAX_SCALE:g} and "
                             f"{MAX_SCALE:g}, got {value!r}", where)
    return scale


@dataclass(frozen=True)
class LoraSource:
    """One LoRA of the launch list: its name, its file (or folder, with weight_name), its default scale."""

    name: str
    path: str
    scale: float = 1.0


@dataclass(frozen=True)
class LoraOptions:
    loras: tuple[LoraSource, ...] = ()
    load_kwargs: tuple[tuple[str, Any], ...] = ()
    fuse_scale: float = 1.0  # image_lora_fuse_kwargs.lora_scale
    fuse_adapters: tuple[str, ...] | None = None  # image_lora_fuse_kwargs.adapter_names (None: all)
    fuse_components: tuple[str, ...] | None = None  # image_lora_fuse_kwargs.components (None: all)
    safe_fusing: bool = False
    max_loras: int = 0
    max_lora_rank: int = 64
    max_cpu_loras: int = 0  # as given (0: not given); `host_capacity` is what the host library keeps
    max_loras_per_request: int = 3
    lora_dir: str | None = None
    lora_default: str = "all"
    lora_batching: str = "mixed"

    @property
    def per_row(self) -> bool:
        return self.max_loras > 0

    @property
    def host_capacity(self) -> int:
        """Parsed LoRAs kept in host memory: max_cpu_loras, but never fewer than the slots, one request's LoRAs or
        the launch list (which per-row mode keeps parsed to refill slots)."""
        return max(self.max_cpu_loras, self.max_loras, self.max_loras_per_request, len(self.loras), 1)

    @property
    def configured(self) -> bool:
        return bool(self.loras) or self.lora_dir is not None or self.per_row

    def default_selection(self) -> tuple[tuple[str, float], ...]:
        """What a request without a `lora` field gets: every launch LoRA (that fused mode fuses) at its scale
        times the fuse scale, as Xinference's fused pipeline applies them; nothing with lora_default none."""
        if self.lora_default == "none":
            return ()
        fused = self.fuse_adapters
        return tuple((lora.name, lora.scale * self.fuse_scale) for lora in self.loras
                     if fused is None or lora.name in fused)


def _int(name: str, value: Any, low: int, high: int | None = None) -> int:
    try:
        number = to_int(value)
    except Unparsable:
        number = low - 1
    if number < low or (high is not None and number > high):
        accepted = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"
        raise LoraOptionError(f"launch option {name!r}: got {value!r}; accepted: {accepted}", name)
    return number


def _mapping(name: str, value: Any) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise LoraOptionError(f"{name} must be an object, got {value!r}", name)
    return value


def _lora_list(value: Any) -> tuple[LoraSource, ...]:
    where = "peft_model_config.lora_list"
    if value is None:
        return ()
    if not isinstance(value, list):
        raise LoraOptionError(f"{where} must be a list of {{lora_name, local_path}}, got {value!r}", where)
    loras: list[LoraSource] = []
    for index, item in enumerate(value):
        spot = f"{where}[{index}]"
        if not isinstance(item, Mapping) or not {"lora_name", "local_path"} <= set(item):
            raise LoraOptionError(f"{spot} must be an object with lora_name and local_path, got {item!r}", where)
        unknown = set(item) - {"lora_name", "local_path", "lora_scale"}
        if unknown:
            raise LoraOptionError(f"{spot}: unknown field(s) {sorted(unknown)}; accepted: lora_name, local_path, "
                                  "lora_scale", where)
        try:
            name = check_name(item["lora_name"], f"{spot}.lora_name")
            scale = check_scale(item.get("lora_scale", 1.0), f"{spot}.lora_scale")
        except InvalidRequest as error:
            raise LoraOptionError(str(error), where) from None
        path = item["local_path"]
        if not isinstance(path, str) or not path.strip():
            raise LoraOptionError(f"{spot}.local_path must be a path, got {path!r}", where)
        if name in {lora.name for lora in loras}:
            raise LoraOptionError(f"{where} lists the LoRA name {name!r} twice", where)
        loras.append(LoraSource(name, os.path.expanduser(path), scale))
    return tuple(loras)


def _fuse_fields(fuse: Mapping[str, Any], loras: tuple[LoraSource, ...]) -> dict[str, Any]:
    where = "peft_model_config.image_lora_fuse_kwargs"
    fields: dict[str, Any] = {}
    try:
        if fuse.get("lora_scale") is not None:
            fields["fuse_scale"] = check_scale(fuse["lora_scale"], f"{where}.lora_scale")
        if fuse.get("safe_fusing") is not None:
            fields["safe_fusing"] = to_bool(fuse["safe_fusing"])
    except (InvalidRequest, Unparsable) as error:
        raise LoraOptionError(f"{where}: {getattr(error, 'expected', error)}", where) from None
    for key, field in (("adapter_names", "fuse_adapters"), ("components", "fuse_components")):
        names = fuse.get(key)
        if names is None:
            continue
        names = [names] if isinstance(names, str) else names
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise LoraOptionError(f"{where}.{key} must be a list of names, got {names!r}", where)
        fields[field] = tuple(names)
    unknown_adapters = set(fields.get("fuse_adapters", ())) - {lora.name for lora in loras}
    if unknown_adapters:
        raise LoraOptionError(f"{where}.adapter_names: {sorted(unknown_adapters)} are not in lora_list "
                              f"({', '.join(lora.name for lora in loras)})", where)
    return fields


def _peft_model_config(value: Any) -> dict[str, Any]:
    """Xinference's launch field -> LoraOptions fields (null or {} is no LoRA)."""
    config = _mapping("peft_model_config", value)
    unknown = set(config) - {"lora_list", "image_lora_load_kwargs", "image_lora_fuse_kwargs"}
    if unknown:
        raise LoraOptionError(f"peft_model_config: unknown field(s) {sorted(unknown)}; accepted: lora_list, "
                              "image_lora_load_kwargs, image_lora_fuse_kwargs", "peft_model_config")
    loras = _lora_list(config.get("lora_list"))
    load = _mapping("peft_model_config.image_lora_load_kwargs", config.get("image_lora_load_kwargs"))
    fuse = _mapping("peft_model_config.image_lora_fuse_kwargs", config.get("image_lora_fuse_kwargs"))
    for given, accepted, key in ((load, LOAD_KWARGS, "image_lora_load_kwargs"),
                                 (fuse, FUSE_KWARGS, "image_lora_fuse_kwargs")):
        unknown = set(given) - accepted
        if unknown:
            raise LoraOptionError(f"peft_model_config.{key}: Kiln cannot honour {sorted(unknown)}; accepted: "
                                  f"{', '.join(sorted(accepted))}", f"peft_model_config.{key}")
    return {"loras": loras, "load_kwargs": tuple(sorted(load.items())), **_fuse_fields(fuse, loras)}


def _lora_dir(value: Any) -> str | None:
    if value is None:
        return None
    path = os.path.realpath(os.path.expanduser(str(value)))
    if not os.path.isdir(path):
        raise LoraOptionError(f"launch option 'lora_dir': {value!r} is not a directory", "lora_dir")
    return path


def _choice(name: str, choices: tuple[str, ...]) -> Callable[[Any], dict[str, Any]]:
    def parse(value: Any) -> dict[str, Any]:
        if value in choices:
            return {name: value}
        raise LoraOptionError(f"launch option {name!r}: got {value!r}; accepted: "
                              f"{' or '.join(repr(choice) for choice in choices)}", name)

    return parse


_PARSERS: Mapping[str, Callable[[Any], dict[str, Any]]] = {
    "peft_model_config": _peft_model_config,
    "max_loras": lambda value: {"max_loras": _int("max_loras", value, 0)},
    "max_lora_rank": lambda value: {"max_lora_rank": _int("max_lora_rank", value, 1, MAX_RANK)},
    "max_cpu_loras": lambda value: {"max_cpu_loras": _int("max_cpu_loras", value, 1)},
    "max_loras_per_request": lambda value: {"max_loras_per_request": _int("max_loras_per_request", value, 1)},
    "lora_dir": lambda value: {"lora_dir": _lora_dir(value)},
    "lora_default": _choice("lora_default", DEFAULTS),
    "lora_batching": _choice("lora_batching", BATCHING),
}
_LORA_ENTRY = {"type": "object", "required": ["lora_name", "local_path"], "properties": {
    "lora_name": {"type": "string"}, "local_path": {"type": "string"},
    "lora_scale": {"type": "number", "minimum": -MAX_SCALE, "maximum": MAX_SCALE}}}
_KWARGS = {"type": ["object", "null"]}
# option -> (JSON schema, description): what the API document says of each (engine.options.LAUNCH_OPTIONS).
OPTION_SCHEMAS: Mapping[str, tuple[Mapping[str, Any], str]] = {
    "peft_model_config": ({"type": ["object", "null"], "properties": {
        "lora_list": {"type": "array", "items": _LORA_ENTRY}, "image_lora_load_kwargs": _KWARGS,
        "image_lora_fuse_kwargs": _KWARGS}},
        "Xinference's LoRAs: lora_list [{lora_name, local_path}], image_lora_load_kwargs (lora_state_dict's), "
        "image_lora_fuse_kwargs (fuse_lora's: lora_scale, default 1)."),
    "max_loras": ({"type": "integer", "minimum": 0},
                  "LoRA slots for per-row mode, where each request picks its LoRAs; 0 (default): the launch LoRAs "
                  "are fused into the weights, as Xinference does."),
    "max_lora_rank": ({"type": "integer", "minimum": 1, "maximum": MAX_RANK},
                      "The largest LoRA rank per-row slots hold (default 64)."),
    "max_cpu_loras": ({"type": "integer", "minimum": 1},
                      "Parsed LoRAs kept in host memory (default: max_loras, max_loras_per_request or the launch "
                      "list, whichever is largest)."),
    "max_loras_per_request": ({"type": "integer", "minimum": 1}, "LoRAs one request may stack (default 3)."),
    "lora_dir": ({"type": ["string", "null"]},
                 "A folder of .safetensors LoRAs that requests name by file stem, read on first use (per-row mode)."),
    "lora_default": ({"type": "string", "enum": list(DEFAULTS)},
                     "What a request without lora gets: all (every launch LoRA, as Xinference) or none."),
    "lora_batching": ({"type": "string", "enum": list(BATCHING)},
                      "mixed: rows with different LoRAs share forwards; per-config: one lane per LoRA set (the "
                      "peers' way, a benchmark baseline)."),
}
OPTION_NAMES = tuple(_PARSERS)


def check_option(name: str, value: Any) -> None:
    """One LoRA launch option alone (a registered model's default_model_config); LoraOptionError if it is bad.
    How the options fit together is checked when a launch reads them all (`parse_lora_options`)."""
    if value is not None:
        _PARSERS[name](value)


def parse_lora_options(raw: Mapping[str, Any]) -> LoraOptions:
    """The LoRA launch options among `raw` (names in OPTION_NAMES; None means absent), validated together."""
    fields: dict[str, Any] = {}
    for name, value in raw.items():
        if value is not None:
            fields.update(_PARSERS[name](value))
    options = LoraOptions(**fields)
    given_cpu = fields.get("max_cpu_loras")
    if given_cpu is not None and given_cpu < options.max_loras:
        raise LoraOptionError(f"launch option 'max_cpu_loras' ({given_cpu}) must be at least max_loras "
                              f"({options.max_loras}): slots are filled from host memory", "max_cpu_loras")
    _check_modes(options)
    return options


def _check_modes(options: LoraOptions) -> None:
    """What fused mode (max_loras=0) cannot do, and what per-row mode's slots cannot hold."""
    if not options.per_row:
        if options.lora_dir is not None:
            raise LoraOptionError("launch option 'lora_dir' needs per-row mode (LoRAs loaded per request): set "
                                  "max_loras to the number of LoRAs to keep resident (e.g. 4)", "lora_dir")
        if options.lora_default == "none" and options.loras:
            raise LoraOptionError("lora_default 'none' needs per-row mode: in fused mode (max_loras 0, as "
                                  "Xinference) every listed LoRA is fused into the weights; set max_loras >= 1",
                                  "lora_default")
        return
    default = options.default_selection()
    if len(default) > min(options.max_loras, options.max_loras_per_request):
        raise LoraOptionError(
            f"lora_default 'all' gives every request {len(default)} LoRAs, but max_loras is {options.max_loras} "
            f"and max_loras_per_request {options.max_loras_per_request}; raise them or set lora_default 'none'",
            "max_loras")


# --- a request's LoRAs -------------------------------------------------------------------------------------------
Selection = tuple[tuple[str, float], ...]  # (name, scale) in the request's order


def read_loras(value: Any) -> Selection:
    """A request's `lora` field: {"name", "scale"} or a list of them (a bare name means scale 1; a string
    holding JSON is read as JSON, as multipart forms send it); [] is no LoRA. InvalidRequest otherwise."""
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        try:
            value = json.loads(value)
        except ValueError:
            raise InvalidRequest(f"lora must be an object or a list of objects, got {value!r}", "lora") from None
    items = value if isinstance(value, (list, tuple)) else [value]
    selection: list[tuple[str, float]] = []
    for item in items:
        if isinstance(item, tuple) and len(item) == 2:  # already read (an engine caller passing a Selection)
            item = {"name": item[0], "scale": item[1]}
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, Mapping) or "name" not in item:
            raise InvalidRequest(f"lora items must be objects like {{\"name\": ..., \"scale\": 1.0}}, got {item!r}",
                                 "lora")
        unknown = set(item) - {"name", "scale"}
        if unknown:
            raise InvalidRequest(f"lora item {item!r}: unknown field(s) {sorted(unknown)}; accepted: name, scale",
                                 "lora")
        name = check_name(item["name"], "lora")
        scale = check_scale(item.get("scale", 1.0), "lora")
        if name in dict(selection):
            raise InvalidRequest(f"lora lists {name!r} twice", "lora")
        selection.append((name, scale))
    return tuple(selection)


def requested(inputs: Mapping[str, Any], default: Selection) -> Selection:
    """The LoRAs a request asks for from its part inputs (`lora`, or the aliases `lora_name` + `lora_scale`);
    the launch default when it names none."""
    if "lora" in inputs and "lora_name" in inputs:
        raise InvalidRequest("give lora or lora_name (with lora_scale), not both", "lora_name")
    if "lora_scale" in inputs and "lora_name" not in inputs:
        raise InvalidRequest("lora_scale goes with lora_name (or give lora: [{\"name\", \"scale\"}])", "lora_scale")
    if "lora" in inputs:
        return read_loras(inputs["lora"])
    if "lora_name" in inputs:
        return read_loras({"name": inputs["lora_name"], "scale": inputs.get("lora_scale", 1.0)})
    return default
