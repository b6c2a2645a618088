"""`backend: auto`: time the backends a launch can use on its default lane and keep the fastest, once per machine.

Which backend is fastest depends on the model, the lane size, the batch, the CPU and the library versions: on
the tiny models of these 2-core Intel machines onnxruntime runs the SD1.5 UNet 2-5x faster than eager, OpenVINO
runs tiny FLUX 1.5x faster than eager at 8 rows while onnxruntime is slower than eager there. So `auto` measures
instead of guessing. At launch every candidate is built (the ONNX export is shared by onnx and openvino) and warmed
up, then each runs the same forwards at one job, a quarter of `max_batch_size` and all of it, interleaved round by
round so that a noisy neighbour hits them all alike. A candidate's score is its time relative to the fastest at
each batch, averaged over the batches; a backend other than eager must beat eager by `MARGIN` to be kept (its
export costs memory and a load). The others are dropped.

The choice is stored in the engine cache (kind `auto`) under everything it depends on: the model, its weights'
fingerprint, the device (CPU model and count, or GPU name and compute capability), dtype, torch threads, lane size,
batch sizes, the candidates and the versions of torch, diffusers, onnxruntime, openvino and tensorrt. A restart
with the same key builds only the chosen backend and measures nothing.

Candidates: eager, onnx and openvino on a CPU; eager, onnx (with onnxruntime-gpu), tensorrt (only with a cached
engine: building one takes minutes, `kiln build-engines` does it ahead) and compile (with CUDA graphs; last, so
that the attention processors it was traced with stay in place) on a GPU. Backends the launch cannot use
(`unsupported`) or this machine cannot run are skipped, with the reason in the description.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import statistics
import time
from typing import Any, Callable, Mapping, Sequence

import torch

from kiln.kernels import attention

from .base import Backend, ExampleInputs
from .cache import CacheKey, EngineCache

log = logging.getLogger("kiln.engine")

CPU_CANDIDATES = ("eager", "onnx", "openvino")
GPU_CANDIDATES = ("eager", "onnx", "tensorrt", "compile")
MARGIN = 0.05  # a backend other than eager is kept only when at least 5 % faster than eager
BUDGET_SECONDS = 10.0  # of timing per launch; larger batch sizes are left out past it (the first always runs)
ROUNDS = 5  # timed forwards per backend and batch size, at most
FORMAT = 1  # bump when the measurement changes, so old choices miss
VERSIONED = ("torch", "diffusers", "onnxruntime", "onnxruntime-gpu", "openvino", "tensorrt")

Build = Callable[[str], Backend]


def measured_rows(rows_per_job: int, max_batch_size: int) -> list[int]:
    """The denoiser batches timed: one job, a quarter of the batch bound, and all of it."""
    return sorted({rows_per_job * jobs for jobs in (1, max(1, max_batch_size // 4), max_batch_size)})


def device_facts(device: torch.device) -> str:
    """What identifies the hardware a measurement holds for."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return f"{torch.cuda.get_device_name(index)} sm{major}{minor}"
    model = "unknown cpu"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} x{os.cpu_count()}"


def versions() -> str:
    found = []
    for package in VERSIONED:
        try:
            found.append(f"{package}={importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ",".join(found)


def choice_key(model: str, weights: str, device: torch.device, dtype: torch.dtype, size: tuple[int, int],
               rows: Sequence[int], candidates: Sequence[str]) -> CacheKey:
    return CacheKey.make(
        "auto", model, weights=weights, device=device_facts(device), dtype=str(dtype).removeprefix("torch."),
        threads=torch.get_num_threads(), size=f"{size[0]}x{size[1]}", rows=",".join(map(str, rows)),
        candidates=",".join(candidates), versions=versions(), format=FORMAT,
    )


CHOICE_SCOPE = ("device", "dtype", "threads", "size", "rows", "candidates")  # a new choice supersedes older ones


def score(timings: Mapping[str, Mapping[int, float]]) -> dict[str, float]:
    """Each backend's time relative to the fastest at every batch size, averaged (1.0: fastest at all)."""
    rows = sorted(set.intersection(*(set(times) for times in timings.values())))
    best = {r: min(times[r] for times in timings.values()) for r in rows}
    return {name: statistics.fmean(times[r] / best[r] for r in rows) for name, times in timings.items()}


def pick(timings: Mapping[str, Mapping[int, float]]) -> str:
    """The fastest backend; eager unless another is faster than it by MARGIN."""
    scores = score(timings)
    fastest = min(scores, key=scores.get)
    if "eager" in scores and fastest != "eager" and scores[fastest] * (1 + MARGIN) > scores["eager"]:
        return "eager"
    return fastest


@torch.no_grad()
def measure(backends: Mapping[str, Backend], examples: ExampleInputs, rows: Sequence[int],
            budget: float = BUDGET_SECONDS) -> dict[str, dict[int, float]]:
    """Median seconds per forward of each backend at each batch size. The first batch size always runs; a larger
    one only when its estimated cost (the last round's, scaled by rows, twice: a first call at a new shape, then
    a timed round) fits in what is left of `budget`."""
    device = examples.family.device
    timings: dict[str, dict[int, float]] = {name: {} for name in backends}
    started = time.perf_counter()
    last_round = 0.0
    for index, count in enumerate(rows):
        if index and time.perf_counter() - started + 2 * last_round * count / rows[index - 1] > budget:
            break
        inputs = examples(count)
        for backend in backends.values():
            backend(*inputs)  # a new shape: allocations, kernel choice
        samples: dict[str, list[float]] = {name: [] for name in backends}
        level_end = started + budget * (index + 1) / len(rows)
        for _ in range(ROUNDS):
            round_started = time.perf_counter()
            for name, backend in backends.items():
                samples[name].append(_timed(backend, inputs, device))
            last_round = time.perf_counter() - round_started
            if time.perf_counter() + last_round > level_end:
                break
        for name, values in samples.items():
            timings[name][count] = statistics.median(values)
    return timings


def _timed(backend: Backend, inputs: Sequence[torch.Tensor], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    backend(*inputs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def choose(candidates: Sequence[str], build: Build, examples: ExampleInputs, max_rows: int, rows: Sequence[int],
           cache: EngineCache, key: CacheKey, skipped: dict[str, str]) -> tuple[Backend, dict[str, Any]]:
    """The fastest of `candidates` (built with `build`, warmed up), or the cached choice for `key`; with what
    `GET /v1/models/{uid}` says about it: chosen, why, per-backend milliseconds per forward, skipped backends."""
    entry = cache.lookup(key)
    if entry is not None and entry.info.get("chosen") in candidates:
        chosen = entry.info["chosen"]
        backend = build(chosen)
        backend.warmup(examples, max_rows)
        info = {**entry.info, "cached": True, "skipped": skipped}
        log.info("backend auto -> %s (measured before: %s)", chosen, _summary(info))
        return backend, info

    built: dict[str, Backend] = {}
    for name in candidates:
        try:
            backend = build(name)
            backend.warmup(examples, max_rows)
            built[name] = backend
        except Exception as error:  # noqa: BLE001 - a candidate that cannot run this model is skipped
            if name == "eager":
                raise
            skipped[name] = f"{type(error).__name__}: {error}"
            log.warning("backend auto: %s skipped: %s", name, skipped[name])
    started = time.perf_counter()
    timings = measure(built, examples, rows)
    chosen = pick(timings)
    scores = score(timings)
    info = {
        "chosen": chosen,
        "why": f"fastest at {examples.width}x{examples.height} over batches of {', '.join(map(str, timings[chosen]))} "
               f"rows (time relative to the fastest, averaged: "
               + ", ".join(f"{name} {value:.2f}" for name, value in sorted(scores.items(), key=lambda kv: kv[1]))
               + f"; another backend than eager must be {MARGIN:.0%} faster than it)",
        "forward_ms": {name: {str(r): round(s * 1000, 3) for r, s in times.items()} for name, times in timings.items()},
        "measure_seconds": round(time.perf_counter() - started, 3),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    cache.store(key, lambda directory: info, replaces=CHOICE_SCOPE)
    backend = built.pop(chosen)
    built.clear()  # the others' sessions and compiled models go now
    if chosen == "eager":  # the exported or compiled candidates traced with SDPA after eager was built
        attention.install(backend.model, "auto")
    info = {**info, "cached": False, "skipped": skipped}
    log.info("backend auto -> %s (%s)", chosen, _summary(info))
    return backend, info


def _summary(info: Mapping[str, Any]) -> str:
    return "; ".join(f"{name}: " + " / ".join(f"{ms} ms at {rows} rows" for rows, ms in times.items())
                     for name, times in info["forward_ms"].items())
