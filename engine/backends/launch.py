"""Putting a backend in place for a loaded model: choose (`auto`), build (export, compile, engine), replace
`family.denoiser`, warm up. What the runner calls at load, and what `kiln build-engines` shares."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from kiln.kernels import attention

from . import BACKEND_NAMES, backend_unavailable, compile_unavailable
from .base import BackendUnavailable, EagerBackend, ExampleInputs, max_rows, unwrap
from .cache import EngineCache, module_fingerprint
from .cache import weights_fingerprint as folder_fingerprint
from .compile import CompileBackend
from .onnx import ONNX_FILE, OnnxBackend, ensure_export, onnx_key
from .tensorrt import (Profile, TensorRTBackend, check_precision, compute_capability, engine_key, ensure_engine,
                       find_engine, precision_for, profile_shapes, tensorrt_unavailable, tensorrt_version)

log = logging.getLogger("kiln.engine")


def weights_fingerprint(family: Any, source: str | None, cache: Any) -> str:
    """A fingerprint of the denoiser's weights: its checkpoint folder's files when there is one, else its
    tensors."""
    if source:
        folder = Path(source) / family.spec.denoiser
        if folder.is_dir():
            return folder_fingerprint(folder, memo_root=cache.root / "fingerprints")
    return module_fingerprint(family.denoiser.model)


def export_sizes(stride: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Two lane sizes (width, height) to export on: the first traced, the second only to find dynamic axes.
    Small (cheap to trace) yet deep enough for every down-sampling stage of the real UNets."""
    return (16 * stride, 16 * stride), (20 * stride, 24 * stride)


def onnx_export_for(family: Any, model: str, source: str | None, cache: Any):
    """The cached ONNX export of the family's denoiser (exported now when missing): (key, entry)."""
    denoiser = unwrap(family.denoiser)
    key = onnx_key(model, weights_fingerprint(family, source, cache), denoiser, family.dtype)
    entry = cache.lookup(key)
    if entry is None:
        first, second = export_sizes(family.spec.stride)
        example = ExampleInputs(family, *first).named(2)
        other = ExampleInputs(family, *second).named(3)
        entry = ensure_export(cache, key, denoiser, example, other)
    return key, entry


def make_backend(requested: str, family: Any, *, model: str, source: str | None = None,
                 max_batch_size: int = 16, sizes: list[tuple[int, int]] | None = None, cpu_offload: bool = False,
                 cache: Any = None, compiler: str | None = None, compile_mode: str | None = None,
                 unsupported: Mapping[str, str] | None = None):
    """The backend `requested` (or chosen by `auto`) for the family's denoiser; raises BackendUnavailable (a
    ModelLoadError) with the reason when it cannot run here. `unsupported` maps backends the launch's parts cannot
    run on to why (auto never picks them). Installs the attention processors first."""
    unsupported = unsupported or {}
    if requested in unsupported:
        raise BackendUnavailable(f"backend {requested!r} cannot run this launch: {unsupported[requested]}")
    if requested not in BACKEND_NAMES:
        raise BackendUnavailable(f"unknown backend {requested!r}; accepted: {', '.join(BACKEND_NAMES)}")
    denoiser = unwrap(family.denoiser)
    device = family.device
    cache = cache if cache is not None else EngineCache()
    compiler = compiler or os.environ.get("KILN_COMPILE_BACKEND") or "inductor"
    compile_mode = compile_mode or os.environ.get("KILN_COMPILE_MODE") or None
    rows = max_rows(family, max_batch_size)
    sizes = sizes or []
    name = requested
    engine_entry = None
    if requested == "auto":
        name = "eager"
        if device.type == "cuda" and not cpu_offload:
            if "tensorrt" not in unsupported:
                engine_entry = _cached_engine(family, model, source, cache, sizes, rows)
            name = "tensorrt" if engine_entry is not None else "compile"
            if name == "compile" and (compile_unavailable("cuda", compiler) or "compile" in unsupported):
                name = "eager"
        log.info("backend auto -> %s", name)
    else:
        if cpu_offload and name != "eager":
            raise BackendUnavailable(f"backend {name!r} cannot run with cpu_offload, which moves the denoiser "
                                     "between devices at every forward; launch with backend='eager'")
        reason = backend_unavailable(name, device, family.dtype, compiler)
        if reason:
            raise BackendUnavailable(f"backend {name!r} is not available on this machine: {reason}")

    attention.install(denoiser.model, "auto" if name == "eager" else "sdpa")
    if name == "eager":
        return EagerBackend(denoiser)
    if name == "compile":
        return CompileBackend(denoiser, rows, compiler=compiler, mode=compile_mode)
    if name == "onnx":
        _, entry = onnx_export_for(family, model, source, cache)
        return OnnxBackend(denoiser, entry.file(ONNX_FILE), device)
    if engine_entry is None:
        engine_entry = _build_engine_now(family, model, source, cache, sizes, rows)
    return TensorRTBackend(denoiser, engine_entry, device)


def _cached_engine(family, model, source, cache, sizes, rows):
    """A cached TensorRT engine for this model, GPU, TensorRT version and launch precision, or None."""
    if tensorrt_unavailable(family.device):
        return None
    key = onnx_key(model, weights_fingerprint(family, source, cache), unwrap(family.denoiser), family.dtype)
    size = sizes[0] if sizes else (0, 0)
    return find_engine(cache, key, compute_capability(family.device), tensorrt_version(),
                       precision_for(family.dtype), size, rows)


def _build_engine_now(family, model, source, cache, sizes, rows):
    """backend='tensorrt' with no cached engine: build one for the launch's lane sizes and rows (minutes)."""
    onnx, entry = onnx_export_for(family, model, source, cache)
    capability, precision = compute_capability(family.device), precision_for(family.dtype)
    check_precision(precision, capability)
    profile = Profile.make(sizes or [export_sizes(family.spec.stride)[0]], 1, rows)
    examples = {size: ExampleInputs(family, *size).named(1) for size in profile.sizes}
    key = engine_key(onnx, capability, tensorrt_version(), precision, profile)
    log.info("building a TensorRT engine (%s, %s): this takes minutes once; `kiln build-engines` does it ahead",
             profile.describe(), precision)
    return ensure_engine(cache, key, entry.file(ONNX_FILE), profile_shapes(unwrap(family.denoiser), examples, profile),
                         precision, onnx["dtype"], profile)


def launch_backend(requested: str, family: Any, *, model: str, source: str | None,
                   max_batch_size: int, warmup_size: tuple[int, int], cpu_offload: bool = False,
                   cache: Any = None, unsupported: Mapping[str, str] | None = None,
                   variants: Sequence[Callable[[dict, int, int], list[dict]]] = ()) -> dict[str, Any]:
    """What the runner calls after loading: make the backend, put it in place of `family.denoiser`, warm it
    up at `warmup_size` (compile: every bucket; and every input variant the parts' `variants` give, such as
    ControlNet additions), and return its description (backend, warm-up seconds, ...)."""
    started = time.perf_counter()
    backend = make_backend(requested, family, model=model, source=source, max_batch_size=max_batch_size,
                           sizes=[warmup_size], cpu_offload=cpu_offload, cache=cache, unsupported=unsupported)
    prepared = time.perf_counter() - started
    family.denoiser = backend
    examples = ExampleInputs(family, *warmup_size)
    rows = max_rows(family, max_batch_size)
    seconds = backend.warmup(examples, rows)
    if variants:
        started = time.perf_counter()
        with torch.no_grad():
            for bucket in backend.warmup_rows(rows):
                named = examples.named(bucket)
                for variant in variants:
                    for inputs in variant(named, *warmup_size):
                        family.forward(inputs)
        seconds += time.perf_counter() - started
        backend.warmup_seconds = seconds
    info = {**backend.describe(), "requested": requested, "prepare_seconds": round(prepared, 3),
            "warmup_seconds": round(seconds, 3), "warmup_size": f"{warmup_size[0]}x{warmup_size[1]}",
            "attention": getattr(backend.denoiser.model, "_kiln_attention", None)}
    log.info("model %s: backend %s ready (prepare %.1f s, warm-up %.1f s at %s)", model, backend.name, prepared,
             seconds, info["warmup_size"])
    return info

