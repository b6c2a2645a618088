"""Putting a backend in place for a loaded model: choose (`auto`, auto.py), build (export, compile, engine),
replace `family.denoiser`, warm up. What the runner calls at load, and what `kiln build-engines` shares."""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from kiln.kernels import attention

from . import BACKEND_NAMES, SPECIFIC_BACKENDS, backend_unavailable
from .auto import CPU_CANDIDATES, GPU_CANDIDATES, choice_key, choose, measured_rows
from .base import BackendUnavailable, EagerBackend, ExampleInputs, max_rows, unwrap
from .cache import EngineCache, module_fingerprint
from .cache import weights_fingerprint as folder_fingerprint
from .compile import CompileBackend
from .onnx import ONNX_FILE, OnnxBackend, ensure_export, onnx_key
from .openvino import OpenVinoBackend
from .tensorrt import (Profile, TensorRTBackend, check_precision, compute_capability, engine_key, ensure_engine,
                       find_engine, precision_for, profile_shapes, tensorrt_unavailable, tensorrt_version)

log = logging.getLogger("kiln.engine")


def weights_fingerprint(family: Any, source: str | None, cache: Any) -> str:
    """A fingerprint of the denoiser's weights: its checkpoint folder's files when there is one, else its
    tensors; plus what changed them after loading (fused LoRAs: `family.weights_tag`)."""
    tag = f"+{family.weights_tag}" if family.weights_tag else ""
    if source:
        folder = Path(source) / family.spec.denoiser
        if folder.is_dir():
            return folder_fingerprint(folder, memo_root=cache.root / "fingerprints") + tag
    return module_fingerprint(family.denoiser.model) + tag


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


def make_backend(name: str, family: Any, *, model: str, source: str | None = None,
                 max_batch_size: int = 16, sizes: list[tuple[int, int]] | None = None, cpu_offload: bool = False,
                 cache: Any = None, compiler: str | None = None, compile_mode: str | None = None,
                 unsupported: Mapping[str, str] | None = None):
    """The backend `name` (not auto: launch_backend chooses) for the family's denoiser; raises BackendUnavailable
    (a ModelLoadError) with the reason when this launch (`unsupported`: backend -> why this launch cannot use it)
    or this machine cannot run it, naming a backend that can. Installs the attention processors first."""
    if name not in SPECIFIC_BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; accepted: {', '.join(BACKEND_NAMES)}")
    denoiser = unwrap(family.denoiser)
    cache = cache if cache is not None else EngineCache()
    compiler = compiler or os.environ.get("KILN_COMPILE_BACKEND") or "inductor"
    compile_mode = compile_mode or os.environ.get("KILN_COMPILE_MODE") or None
    refused = refusals(unsupported, cpu_offload)
    reason = refused.get(name) or backend_unavailable(name, family.device, family.dtype, compiler)
    if reason:
        where = "cannot run this launch" if name in refused else "is not available on this machine"
        raise BackendUnavailable(f"backend {name!r} {where}: {reason}; {_alternative(family, refused, compiler, name)}")
    rows = max_rows(family, max_batch_size)
    attention.install(denoiser.model, "auto" if name == "eager" else "sdpa")
    if name == "eager":
        return EagerBackend(denoiser)
    if name == "compile":
        return CompileBackend(denoiser, rows, compiler=compiler, mode=compile_mode)
    if name in ("onnx", "openvino"):
        _, entry = onnx_export_for(family, model, source, cache)
        if name == "onnx":
            return OnnxBackend(denoiser, entry.file(ONNX_FILE), family.device)
        return OpenVinoBackend(denoiser, entry.file(ONNX_FILE), family.dtype)
    sizes = sizes or []
    engine_entry = _cached_engine(family, model, source, cache, sizes, rows) or _build_engine_now(
        family, model, source, cache, sizes, rows)
    return TensorRTBackend(denoiser, engine_entry, family.device)


def refusals(unsupported: Mapping[str, str] | None, cpu_offload: bool) -> dict[str, str]:
    """Backend -> why this launch cannot use it: what the caller says, and cpu_offload's own refusals."""
    refused = dict(unsupported or {})
    if cpu_offload:
        for name in SPECIFIC_BACKENDS:
            if name != "eager":
                refused.setdefault(name, "cpu_offload moves the denoiser between devices at every forward")
    return refused


def _alternative(family: Any, refused: Mapping[str, str], compiler: str, name: str) -> str:
    """The advice in a refusal: a backend that can run this launch here."""
    for other in SPECIFIC_BACKENDS:
        if other != name and other not in refused and backend_unavailable(other, family.device, family.dtype,
                                                                          compiler) is None:
            return f"launch with backend={other!r} (or 'auto')"
    return "no backend can run this launch here"


def auto_candidates(family: Any, *, model: str, source: str | None, cache: Any, sizes: list[tuple[int, int]],
                    rows: int, compiler: str, refused: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """The backends `auto` times for this launch (auto.py), and those it skips with the reason."""
    names = GPU_CANDIDATES if family.device.type == "cuda" else CPU_CANDIDATES
    candidates, skipped = [], {}
    for name in names:
        reason = refused.get(name) or backend_unavailable(name, family.device, family.dtype, compiler)
        if reason is None and name == "tensorrt" and _cached_engine(family, model, source, cache, sizes, rows) is None:
            reason = "no cached TensorRT engine matches (kiln build-engines builds one; a launch does not wait minutes)"
        if reason:
            skipped[name] = reason
        else:
            candidates.append(name)
    if not candidates:
        raise BackendUnavailable(f"no backend can run this launch here: {skipped}")
    return candidates, skipped


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
    """What the runner calls after loading: make the backend (auto: the fastest of those this launch can use,
    measured here or remembered), put it in place of `family.denoiser`, warm it up at `warmup_size` (compile:
    every bucket; and every input variant the parts' `variants` give, such as ControlNet additions), and return
    its description (backend, warm-up seconds, what auto measured, ...).

    `unsupported` maps backend names to why this launch cannot use them (per-row LoRA, ControlNet, ...): auto
    skips them, and asking for one fails with BackendUnavailable naming a backend that can."""
    started = time.perf_counter()
    cache = cache if cache is not None else EngineCache()
    examples = ExampleInputs(family, *warmup_size)
    rows = max_rows(family, max_batch_size)
    build = functools.partial(make_backend, family=family, model=model, source=source, max_batch_size=max_batch_size,
                              sizes=[warmup_size], cpu_offload=cpu_offload, cache=cache, unsupported=unsupported)
    choice = None
    if requested == "auto":
        compiler = os.environ.get("KILN_COMPILE_BACKEND") or "inductor"
        candidates, skipped = auto_candidates(family, model=model, source=source, cache=cache, sizes=[warmup_size],
                                              rows=rows, compiler=compiler, refused=refusals(unsupported, cpu_offload))
        timed = measured_rows(family.spec.rows_per_job, max_batch_size)
        key = choice_key(model, weights_fingerprint(family, source, cache), family.device, family.dtype, warmup_size,
                         timed, candidates)
        backend, choice = choose(candidates, build, examples, rows, timed, cache, key, skipped)
    else:
        backend = build(requested)
    prepared = time.perf_counter() - started
    family.denoiser = backend
    seconds = backend.warmup_seconds
    if seconds is None:
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
    if choice is not None:
        info["auto"] = choice
    log.info("model %s: backend %s ready (prepare %.1f s, warm-up %.1f s at %s)", model, backend.name, prepared,
             seconds, info["warmup_size"])
    return info

