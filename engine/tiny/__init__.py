"""Tiny random-weight checkpoints of every catalogue model, in real diffusers layout.

No weights can be downloaded where Kiln is developed and tested, yet the engine must run the real diffusers and
transformers code paths. So this package writes, for each catalogue model, a checkpoint directory that looks exactly
like the hub one (model_index.json, one subfolder per component, safetensors, tokenizer files, sampler config) and
mirrors the real model's structure and flags, only scaled down: it loads with the plain
`DiffusionPipeline.from_pretrained` and the same `engine.loading` path as real weights, and it builds in about a
second. The same recipes at real sizes (`REFERENCE_CONFIGS`) give random-weight models that cost what the real ones
cost, for GPU benchmarks without weights.

One recipe table per scale holds only the free dimensions; `_recipes` wires them into the seven models with the
real structural flags and sampler configs, and derives every dimension one component imposes on another (a UNet's
cross-attention width is its text encoder's width, and so on), so both scales stay consistent by construction.

Layout: `recipes` (what each checkpoint is made of), `tokenizers` (trained on a built-in corpus), `components`
(seeded weights, tiny ControlNets, writing a checkpoint), `loras` (tiny LoRAs made with peft); this module builds
and caches them.
"""


from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import torch

from kiln.engine.catalogue import CATALOGUE, get_spec

from .components import CONTROLNETS_FOLDER, instantiate_component, write_checkpoint
from .loras import (LORA_DENOISER_TARGETS, LORA_FORMAT_VERSION, LoraRecipe, build_tiny_loras, tiny_lora_recipes,
                    write_lora)
from .recipes import REFERENCE_CONFIGS, TINY_CONFIGS

__all__ = ["CONTROLNETS_FOLDER", "FORMAT_VERSION", "LORA_DENOISER_TARGETS", "LoraRecipe", "REFERENCE_CONFIGS",
           "TINY_CONFIGS", "build_all", "build_reference", "build_tiny", "default_cache_root", "instantiate_component",
           "tiny_checkpoint", "tiny_lora_recipes", "tiny_loras", "write_lora"]

# Bump whenever the builder's output changes: it is part of the cache path, so old caches are never reused.
FORMAT_VERSION = 4


def build_tiny(model_name: str, directory: Path) -> Path:
    """Build the tiny checkpoint of one catalogue model, with a tiny ControlNet for each of its catalogue
    ControlNet names, into `directory` (created if needed); returns it."""
    spec = get_spec(model_name)
    return write_checkpoint(TINY_CONFIGS[spec.name], directory, torch.float32, "cpu", controlnets=spec.controlnets)


def build_reference(model_name: str, directory: Path, dtype: torch.dtype = torch.float16, device: str = "cpu") -> Path:
    """Build a real-size, random-weight checkpoint of one catalogue model, for benchmarks at true cost.

    FLUX needs about 48 GB of memory while building (float32 init, then cast); pass device="cuda" on a GPU
    machine to build there.
    """
    return write_checkpoint(REFERENCE_CONFIGS[get_spec(model_name).name], directory, dtype, device)


def build_all(directory: Path, names: Iterable[str] | None = None, loras: bool = True) -> list[Path]:
    """Build the tiny checkpoints of `names` (default: the whole catalogue) into directory/<name>, and their
    tiny LoRAs into directory/loras/<name>/ (unless loras=False).

    Every name is checked first, so a typo fails before anything is written.
    """
    specs = [get_spec(name) for name in (names or CATALOGUE)]
    paths = []
    for spec in specs:
        paths.append(build_tiny(spec.name, Path(directory) / spec.name))
        if loras:
            build_tiny_loras(spec.name, paths[-1], Path(directory) / "loras" / spec.name)
            paths.append(Path(directory) / "loras" / spec.name)
    return paths


def default_cache_root() -> Path:
    """$KILN_CACHE/tiny, else ~/.cache/kiln/tiny."""
    base = os.environ.get("KILN_CACHE")
    return Path(base) / "tiny" if base else Path.home() / ".cache" / "kiln" / "tiny"


def tiny_checkpoint(model_name: str, cache_root: Path | None = None) -> Path:
    """The cached tiny checkpoint of a catalogue model, built on first use."""
    target = Path(cache_root or default_cache_root()) / f"v{FORMAT_VERSION}" / get_spec(model_name).name
    return _built_once(target, lambda: (target / "model_index.json").is_file(),
                       lambda staging: build_tiny(model_name, staging))


def tiny_loras(model_name: str, cache_root: Path | None = None) -> Path:
    """The cached folder of a catalogue model's tiny LoRAs (made for its tiny checkpoint), built on first use."""
    root = Path(cache_root or default_cache_root())
    target = root / f"v{FORMAT_VERSION}" / f"loras-v{LORA_FORMAT_VERSION}" / get_spec(model_name).name
    names = tiny_lora_recipes(model_name)
    return _built_once(target, lambda: all((target / f"{name}.safetensors").is_file() for name in names),
                       lambda staging: build_tiny_loras(model_name, tiny_checkpoint(model_name, cache_root), staging))


def _built_once(target: Path, ready: Callable[[], bool], build: Callable[[Path], object]) -> Path:
    """`target`, built by `build(folder)` unless `ready()`. Builds go to a temporary folder beside the target and
    are renamed into place, so concurrent processes never see a half-written one; a process that loses the race
    discards its copy and uses the winner's."""
    if ready():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not ready():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
