"""Backends: what executes the denoiser forward. One interface (base.Backend), four implementations:

- `eager`: the PyTorch module itself (attention through kernels.attention: flash-attn or xformers on a GPU
  when installed, else PyTorch SDPA).
- `compile`: torch.compile with the batch padded to buckets 1, 2, 4, ... max_rows, every bucket compiled at
  launch (compile.py).
- `onnx`: the denoiser exported to ONNX (dynamic batch and spatial axes, cached on disk) and run by onnxruntime,
  CUDA or CPU provider (onnx.py).
- `tensorrt`: TensorRT engines built from that export, cached per GPU architecture, TensorRT version,
  precision and profile (tensorrt.py; untested here: no GPU).

`auto` picks tensorrt when a cached engine matches this model, GPU and TensorRT version, else compile on a GPU,
else eager. `launch_backend` is what the runner calls: choose, build, replace `family.denoiser`, warm up.

Environment: KILN_COMPILE_BACKEND (torch.compile backend, default inductor), KILN_COMPILE_MODE (e.g.
max-autotune, default torch's), KILN_ENGINE_CACHE (the cache root; default $KILN_CACHE/engines).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

BACKEND_NAMES = ("auto", "eager", "compile", "onnx", "tensorrt")
SPECIFIC_BACKENDS = BACKEND_NAMES[1:]

log = logging.getLogger("kiln.engine")


def package_unavailable(name: str) -> str | None:
    """Why `name` cannot run on this machine judging by installed packages alone (no torch import), or None.
    Device checks (a GPU for tensorrt) come at load."""
    if name == "onnx":
        missing = [p for p in ("onnx", "onnxruntime") if importlib.util.find_spec(p) is None]
        if missing:
            return f"{' and '.join(missing)} not installed (pip install 'kiln[onnx]')"
    if name == "tensorrt" and importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt package is not installed (pip install 'kiln[tensorrt]' on a machine with an NVIDIA GPU)"
    return None


def compile_unavailable(device_type: str, compiler: str) -> str | None:
    """Why torch.compile with `compiler` cannot run on this device type, or None."""
    if compiler != "inductor":
        return None
    if device_type == "cuda" and importlib.util.find_spec("triton") is None:
        return "torch.compile's inductor needs triton on CUDA, which is not installed"
    if device_type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX") or "g++", "c++", "clang++")):
        return "torch.compile's inductor needs a C++ compiler on the CPU (install g++)"
    return None


def backend_unavailable(name: str, device: Any, dtype: Any, compiler: str = "inductor") -> str | None:
    """Why backend `name` cannot run the denoiser on this device in this dtype, or None when it can."""
    import torch

    if name in ("eager", "auto"):
        return None
    if name == "compile":
        return compile_unavailable(device.type, compiler)
    reason = package_unavailable(name)
    if reason:
        return reason
    if name == "onnx":
        from .onnx import onnxruntime_unavailable

        if dtype == torch.bfloat16:
            return "onnxruntime's IO binding takes no bfloat16 tensors; launch with torch_dtype float16"
        return onnxruntime_unavailable(device)
    from .tensorrt import tensorrt_unavailable

    return tensorrt_unavailable(device)


def denoiser_component(family: Any) -> str:
    """The pipeline component name of the family's denoiser (unet or transformer): its weights folder."""
    model = family.denoiser.model
    for name, component in family.pipeline.components.items():
        if component is model:
            return name
    return "unet" if family.name in ("sd", "sdxl") else "transformer"


def weights_fingerprint(family: Any, source: str | None, cache: Any) -> str:
    """A fingerprint of the denoiser's weights: its checkpoint folder's files when there is one, else its
    tensors."""
    from .cache import module_fingerprint
    from .cache import weights_fingerprint as folder_fingerprint

    if source:
        folder = Path(source) / denoiser_component(family)
        if folder.is_dir():
            return folder_fingerprint(folder, memo_root=cache.root / "fingerprints")
    return module_fingerprint(family.denoiser.model)


def export_sizes(stride: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Two lane sizes (width, height) to export on: the first traced, the second only to find dynamic axes.
    Small (cheap to trace) yet deep enough for every down-sampling stage of the real UNets."""
    return (16 * stride, 16 * stride), (20 * stride, 24 * stride)


def onnx_export_for(family: Any, model: str, source: str | None, cache: Any, stride: int):
    """The cached ONNX export of the family's denoiser (exported now when missing): (key, entry)."""
    from .base import ExampleInputs, unwrap
    from .onnx import ensure_export, onnx_key

    denoiser = unwrap(family.denoiser)
    key = onnx_key(model, weights_fingerprint(family, source, cache), denoiser, family.dtype)
    entry = cache.lookup(key)
    if entry is None:
        first, second = export_sizes(stride)
        example = ExampleInputs(family, *first).named(2)
        other = ExampleInputs(family, *second).named(3)
        entry = ensure_export(cache, key, denoiser, example, other)
    return key, entry


def make_backend(requested: str, family: Any, *, model: str, stride: int, source: str | None = None,
                 max_batch_size: int = 16, sizes: list[tuple[int, int]] | None = None, cpu_offload: bool = False,
                 cache: Any = None, compiler: str | None = None, compile_mode: str | None = None):
    """The backend `requested` (or chosen by `auto`) for the family's denoiser; raises BackendUnavailable (a
    ModelLoadError) with the reason when it cannot run here. Installs the attention processors first."""
    from kiln.kernels import attention

    from .base import BackendUnavailable, EagerBackend, max_rows, unwrap
    from .cache import EngineCache

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
            engine_entry = _cached_engine(family, model, source, cache, stride, sizes, rows)
            name = "tensorrt" if engine_entry is not None else "compile"
            if name == "compile" and compile_unavailable("cuda", compiler):
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
        from .compile import CompileBackend

        return CompileBackend(denoiser, rows, compiler=compiler, mode=compile_mode)
    if name == "onnx":
        from .onnx import ONNX_FILE, OnnxBackend

        _, entry = onnx_export_for(family, model, source, cache, stride)
        return OnnxBackend(denoiser, entry.file(ONNX_FILE), device)
    from .tensorrt import TensorRTBackend

    if engine_entry is None:
        engine_entry = _build_engine_now(family, model, source, cache, stride, sizes, rows)
    return TensorRTBackend(denoiser, engine_entry, device)


def _cached_engine(family, model, source, cache, stride, sizes, rows):
    """A cached TensorRT engine for this model, GPU, TensorRT version and launch precision, or None."""
    from .base import unwrap
    from .onnx import onnx_key
    from .tensorrt import compute_capability, find_engine, precision_for, tensorrt_unavailable, tensorrt_version

    if tensorrt_unavailable(family.device):
        return None
    key = onnx_key(model, weights_fingerprint(family, source, cache), unwrap(family.denoiser), family.dtype)
    size = sizes[0] if sizes else (0, 0)
    return find_engine(cache, key, compute_capability(family.device), tensorrt_version(),
                       precision_for(family.dtype), size, rows)


def _build_engine_now(family, model, source, cache, stride, sizes, rows):
    """backend='tensorrt' with no cached engine: build one for the launch's lane sizes and rows (minutes)."""
    from .base import ExampleInputs, unwrap
    from .onnx import ONNX_FILE
    from .tensorrt import (Profile, check_precision, compute_capability, engine_key, ensure_engine, precision_for,
                           profile_shapes, tensorrt_version)

    onnx, entry = onnx_export_for(family, model, source, cache, stride)
    capability, precision = compute_capability(family.device), precision_for(family.dtype)
    check_precision(precision, capability)
    profile = Profile.make(sizes or [export_sizes(stride)[0]], 1, rows)
    examples = {size: ExampleInputs(family, *size).named(1) for size in profile.sizes}
    key = engine_key(onnx, capability, tensorrt_version(), precision, profile)
    log.info("building a TensorRT engine (%s, %s): this takes minutes once; `kiln build-engines` does it ahead",
             profile.describe(), precision)
    return ensure_engine(cache, key, entry.file(ONNX_FILE), profile_shapes(unwrap(family.denoiser), examples, profile),
                         precision, onnx["dtype"], profile)


def launch_backend(requested: str, family: Any, *, model: str, stride: int, source: str | None,
                   max_batch_size: int, warmup_size: tuple[int, int], cpu_offload: bool = False,
                   cache: Any = None) -> dict[str, Any]:
    """What the runner calls after loading: make the backend, put it in place of `family.denoiser`, warm it
    up at `warmup_size` (compile: every bucket), and return its description (backend, warm-up seconds, ...)."""
    from .base import ExampleInputs, max_rows

    started = time.perf_counter()
    backend = make_backend(requested, family, model=model, stride=stride, source=source,
                           max_batch_size=max_batch_size, sizes=[warmup_size], cpu_offload=cpu_offload, cache=cache)
    prepared = time.perf_counter() - started
    family.denoiser = backend
    seconds = backend.warmup(ExampleInputs(family, *warmup_size), max_rows(family, max_batch_size))
    info = {**backend.describe(), "requested": requested, "prepare_seconds": round(prepared, 3),
            "warmup_seconds": round(seconds, 3), "warmup_size": f"{warmup_size[0]}x{warmup_size[1]}",
            "attention": getattr(backend.denoiser.model, "_kiln_attention", None)}
    log.info("model %s: backend %s ready (prepare %.1f s, warm-up %.1f s at %s)", model, backend.name, prepared,
             seconds, info["warmup_size"])
    return info
