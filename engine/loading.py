"""Find a catalogue model's weights and load its diffusers pipeline as the launch options ask.

Weights come from, in order: an explicit local directory, the tiny random-weight checkpoint, the Hugging Face
cache, the hub. Every failure a user can cause (no weights, no GPU, wrong checkpoint, missing bitsandbytes) is a
`ModelLoadError` whose message says what to do, raised before any large weights are read where possible.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import diffusers
import torch
import transformers
from diffusers import DiffusionPipeline
from huggingface_hub import constants as hub_constants
from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError

from kiln.engine.catalogue import ModelSpec
from kiln.engine.errors import ModelLoadError
from kiln.engine.options import LaunchOptions, resolve_dtype
from kiln.engine.tiny import tiny_checkpoint

# What a hub download fetches: the diffusers layout in full precision, not the single-file or fp16 duplicates.
_HUB_ALLOW = ["model_index.json", "*/*.json", "*/*.txt", "*/*.model", "*/*.safetensors"]
_HUB_IGNORE = ["*.fp16.*", "*non_ema*"]
_TRUE = frozenset({"1", "true", "yes", "on"})


@dataclass
class LoadedModel:
    """A loaded pipeline with where it runs and where its weights came from."""

    spec: ModelSpec
    pipeline: DiffusionPipeline
    device: torch.device
    dtype: torch.dtype
    source: str


def _quiet_libraries() -> None:
    """A server's log is not a terminal: no per-component progress bars, and no bitsandbytes warning on every
    8-bit forward (it says the CPU path casts activations to float16, which is expected)."""
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)


_quiet_libraries()


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, from HF_HUB_CACHE or HF_HOME as they are now.

    huggingface_hub reads these variables once, at import; reading them here honours a change made later in the
    process (a launcher, a test) and is what snapshot_download is then told.
    """
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(hub_constants.HF_HUB_CACHE)


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as it is now; see hub_cache_dir for why not the import-time value."""
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return flag.strip().lower() in _TRUE or hub_constants.HF_HUB_OFFLINE


def resolve_weights(spec: ModelSpec, options: LaunchOptions) -> Path:
    """The local diffusers directory to load `spec` from (a registered model's is its folder), downloading it
    only when nothing local has it."""
    local = options.model_path or (None if spec.builtin else spec.hub_id)
    if local:
        path = Path(local).expanduser()
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"model_path {str(path)!r} is not a diffusers checkpoint: it has no model_index.json; pass a "
                "directory written by DiffusionPipeline.save_pretrained or downloaded from the hub"
            )
        return path
    if options.tiny:
        return tiny_checkpoint(spec.name)
    # A variant's files are what a variant launch loads: fetch them instead of skipping them.
    ignore = [pattern for pattern in _HUB_IGNORE if not options.variant or f".{options.variant}." not in pattern]
    return hub_snapshot(
        spec.hub_id, f"the weights of {spec.name}", "model_index.json", _HUB_ALLOW, ignore,
        "pass model_path=<a local diffusers directory>, or pass tiny=True for random tiny weights",
    )


def hub_snapshot(hub_id: str, what: str, marker: str, allow: list[str], ignore: list[str], hint: str) -> Path:
    """The local snapshot of hub repository `hub_id` that holds `marker`: the Hugging Face cache's, else one
    downloaded now (never while HF_HUB_OFFLINE is set). `what` and `hint` word the error when there is none."""
    cache = hub_cache_dir()
    try:
        path = Path(snapshot_download(hub_id, cache_dir=cache, local_files_only=True))
        if (path / marker).is_file():
            return path
    except LocalEntryNotFoundError:
        pass
    if _hub_offline():
        raise _not_found(what, hub_id, cache, "the hub is not tried because HF_HUB_OFFLINE is set", hint)
    try:
        return Path(snapshot_download(hub_id, cache_dir=cache, allow_patterns=allow, ignore_patterns=ignore))
    except Exception as error:  # network, auth and gating errors all end the same way for the user
        raise _not_found(what, hub_id, cache, f"downloading from the hub failed: {error}", hint) from error


def _not_found(what: str, hub_id: str, cache: Path, reason: str, hint: str) -> ModelLoadError:
    return ModelLoadError(
        f"{what} ({hub_id}) are not in the Hugging Face cache (looked in {cache}, set by HF_HUB_CACHE or HF_HOME) "
        f"and {reason}. Download them there, or {hint}"
    )


def resolve_device(options: LaunchOptions) -> torch.device:
    """The device to run on; asking for CUDA where there is none is an error, not a silent CPU fallback."""
    if options.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(options.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"device={options.device!r}, but torch sees no CUDA device here (no GPU, or a CPU-only torch "
                "build); use device='cpu' or device='auto'"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"device={options.device!r}, but this machine has {torch.cuda.device_count()} CUDA device(s); "
                f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
    return device


def _read_model_index(path: Path) -> dict:
    with open(path / "model_index.json", encoding="utf-8") as file:
        return json.load(file)


def _check_family(spec: ModelSpec, index: dict, path: Path) -> None:
    """The checkpoint's pipeline class (what DiffusionPipeline.from_pretrained will build) must be the one the
    model's family adapter drives; checked from model_index.json, before any weights are read."""
    expected = spec.family.pipeline
    found = index.get("_class_name")
    if found != expected:
        raise ModelLoadError(
            f"{path} holds a {found} checkpoint, but {spec.name} is a {spec.family.name} model that needs a {expected} "
            "checkpoint; point model_path at the right model"
        )


def _quantized_text_encoder(path: Path, index: dict, name: str, options: LaunchOptions, dtype: torch.dtype,
                            device: torch.device) -> torch.nn.Module:
    """Load one text encoder through transformers' bitsandbytes loader, which, unlike diffusers' own, also
    works without a GPU. It is loaded straight onto its device, so it never needs moving afterwards."""
    library, class_name = index.get(name) or (None, None)
    if library != "transformers":
        raise ModelLoadError(f"quantize_text_encoder: {path} has no transformers text encoder named {name!r}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(
            "quantize_text_encoder needs bitsandbytes, which is not installed: pip install bitsandbytes, "
            "or launch with quantize_text_encoder=''"
        )
    if options.text_encoder_quantization == "8-bit":
        config = transformers.BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_compute_dtype=dtype)
    model_class = getattr(transformers, class_name)
    try:
        model = model_class.from_pretrained(path, subfolder=name, quantization_config=config, dtype=dtype,
                                            device_map={"": device}, **_weight_files(options))
        _probe_text_encoder(model, device)
    except Exception as error:  # bitsandbytes' failures depend on its build, the CPU and the layer shapes
        raise ModelLoadError(
            f"{name} of {path} cannot run quantized to {options.text_encoder_quantization} on this machine: "
            f"{type(error).__name__}: {error}; launch without quantizing {name}, or with another "
            "text_encoder_quantization"
        ) from error
    return model


@torch.no_grad()
def _probe_text_encoder(model: torch.nn.Module, device: torch.device) -> None:
    """One forward of a few tokens. Quantized kernels check shapes only when they first run (bitsandbytes'
    4-bit CPU path on avx512_bf16 CPUs needs layer widths divisible by 64): the probe makes a model that cannot
    run fail its launch, instead of every request after it."""
    model(input_ids=torch.ones(1, 4, dtype=torch.long, device=device))


def _weight_files(options: LaunchOptions) -> dict:
    """Which weight files from_pretrained reads (variant, safetensors or .bin), as the launch options say; unset
    options are left to the libraries' defaults."""
    return {key: value for key, value in (("variant", options.variant), ("use_safetensors", options.use_safetensors))
            if value is not None}


def _quantized_denoiser(path: Path, index: dict, spec: ModelSpec, options: LaunchOptions,
                        dtype: torch.dtype) -> torch.nn.Module:
    """The UNet/transformer through diffusers' own bitsandbytes loader (transformer_quantization), which needs a
    GPU: its quantizer refuses to run without one."""
    name = spec.family.denoiser
    library, class_name = index.get(name) or (None, None)
    if library != "diffusers":
        raise ModelLoadError(f"transformer_quantization: {path} has no diffusers {name}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError("transformer_quantization needs bitsandbytes, which is not installed: pip install "
                             "bitsandbytes, or launch without transformer_quantization")
    if options.transformer_quantization == "8-bit":
        config = diffusers.BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = diffusers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_compute_dtype=dtype)
    try:
        return getattr(diffusers, class_name).from_pretrained(path, subfolder=name, quantization_config=config,
                                                              torch_dtype=dtype, **_weight_files(options))
    except Exception as error:  # bitsandbytes' failures depend on its build, the GPU and the layer shapes
        raise ModelLoadError(f"{name} of {path} cannot be quantized to {options.transformer_quantization}: "
                             f"{type(error).__name__}: {error}; launch without transformer_quantization") from error


def _apply_memory_options(pipeline: DiffusionPipeline, options: LaunchOptions, device: torch.device) -> None:
    """Offload, VAE tiling and slicing, and attention slicing, each through diffusers' own switch. The engine's
    batched decode goes through `vae.decode`, which honours tiling and slicing for a whole batch."""
    if options.sequential_cpu_offload:
        pipeline.enable_sequential_cpu_offload(device=device)
    elif options.cpu_offload:
        pipeline.enable_model_cpu_offload(device=device)
    else:
        # Quantized text encoders (and a quantized denoiser) are on `device` already, so this does not move them.
        pipeline.to(device)
    if options.vae_tiling:
        pipeline.vae.enable_tiling()
    if options.vae_slicing:
        pipeline.vae.enable_slicing()
    if options.attention_slicing is not None:
        pipeline.enable_attention_slicing(options.attention_slicing)


def _needs_gpu(options: LaunchOptions, device: torch.device) -> None:
    """Options that only run on a GPU, refused (naming the option) before any weights are read."""
    wanted = [name for name in ("cpu_offload", "sequential_cpu_offload", "transformer_quantization")
              if getattr(options, name)]
    if wanted and device.type != "cuda":
        why = "device='cpu' was asked for" if torch.cuda.is_available() else "there is no CUDA device"
        what = {"cpu_offload": "cpu_offload keeps models on the CPU and runs each on a GPU",
                "sequential_cpu_offload": "sequential_cpu_offload keeps weights on the CPU and runs each layer on a "
                                          "GPU",
                "transformer_quantization": "transformer_quantization runs diffusers' bitsandbytes layers, which "
                                            "need a GPU"}[wanted[0]]
        raise ModelLoadError(f"{what}, but this launch runs on the CPU ({why}); launch without {wanted[0]}, or with "
                             "device='cuda' on a machine with a GPU")


# diffusers and transformers switch process-wide torch state while they build models (default dtype, meta-device
# init), so two loads in parallel threads corrupt each other ("Cannot copy out of meta tensor"): one at a time.
LOAD_LOCK = threading.Lock()


def load_model(spec: ModelSpec, options: LaunchOptions,
               on_progress: Callable[[float], None] = lambda fraction: None) -> LoadedModel:
    """Load the text-to-image pipeline of `spec` honouring dtype, device, offload, quantization, dropped T5 and
    the memory options. `on_progress(fraction)` is told each stage done (weights found, encoders quantized,
    pipeline built, placed): what `GET /v1/models/{uid}/progress` shows, and where a cancelled launch stops."""
    with LOAD_LOCK:
        return _load_model(spec, options, on_progress)


def _load_model(spec: ModelSpec, options: LaunchOptions, on_progress: Callable[[float], None]) -> LoadedModel:
    device = resolve_device(options)
    _needs_gpu(options, device)
    dtype = getattr(torch, resolve_dtype(spec, options, device.type))
    path = resolve_weights(spec, options)
    index = _read_model_index(path)
    _check_family(spec, index, path)
    on_progress(0.1)
    overrides = {name: _quantized_text_encoder(path, index, name, options, dtype, device)
                 for name in options.quantize_text_encoder}
    if options.drop_text_encoder_3:
        overrides.update(text_encoder_3=None, tokenizer_3=None)
    if options.transformer_quantization:
        overrides[spec.family.denoiser] = _quantized_denoiser(path, index, spec, options, dtype)
    on_progress(0.3)
    files = _weight_files(options)
    if options.low_cpu_mem_usage is not None:
        files["low_cpu_mem_usage"] = options.low_cpu_mem_usage
    try:
        pipeline = DiffusionPipeline.from_pretrained(path, dtype=dtype, **files, **overrides)
    except Exception as error:  # corrupt or partial checkpoints fail in many library-specific ways
        raise ModelLoadError(
            f"could not load {spec.name} from {path}: {error}; check that it is a complete diffusers checkpoint"
        ) from error
    on_progress(0.7)
    _apply_memory_options(pipeline, options, device)
    on_progress(0.8)
    pipeline.set_progress_bar_config(disable=True)
    return LoadedModel(spec=spec, pipeline=pipeline, device=device, dtype=dtype, source=str(path))
