"""Raw component calls of one model, at a given batch: prompt encoding, one denoiser forward, the VAE decode.

These are the batched pieces of work every system must do; what a scheduler adds around them (sampler steps,
bookkeeping, HTTP) is its overhead. `measure_work` times each distinct shape Kiln ran (a count of calls per
shape, recorded by `benchmarks.kiln_server`) in isolation, and the limit is the images over the summed time.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch

from .scenarios import PROMPTS

# A shape key: ("forward", width, height, rows) | ("decode", width, height, images) | (encode kind, texts)
Shape = tuple


@dataclass
class Components:
    """A loaded model's family adapter with ready inputs for its raw calls."""

    family: Any

    @property
    def device(self) -> torch.device:
        return self.family.device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _conditioning(self, width: int, height: int) -> dict[str, torch.Tensor]:
        cond = self.family.encode([PROMPTS[0]])[0]
        return {**cond, **self.family.size_conditioning(width, height)}

    def _latents(self, width: int, height: int, count: int) -> torch.Tensor:
        generator = torch.Generator("cpu").manual_seed(0)
        one = self.family.pack(self.family.noise(width, height, generator))
        return torch.cat([one] * count)

    def call(self, shape: Shape) -> Callable[[], Any]:
        """A no-argument function making the raw call of `shape` (inputs built once, outside the timing), without
        autograd as in the engine."""
        call = self._call(shape)
        return torch.no_grad()(call)

    @torch.no_grad()
    def _call(self, shape: Shape) -> Callable[[], Any]:
        family = self.family
        kind = shape[0]
        if kind == "forward":
            _, width, height, rows = shape
            cond = self._conditioning(width, height)
            latents = self._latents(width, height, rows)
            timesteps = torch.full((rows,), 500.0, dtype=torch.float32, device=self.device)
            conditioning = {key: torch.cat([value] * rows) for key, value in cond.items()}
            guidance = torch.full((rows,), 3.5, dtype=torch.float32, device=self.device)
            return lambda: family.denoise(latents, timesteps, conditioning, guidance, width, height)
        if kind == "decode":
            _, width, height, images = shape
            latents = self._latents(width, height, images)
            return lambda: family.decode(latents, width, height)
        if kind == "encode":
            texts = [PROMPTS[i % len(PROMPTS)] + (f" {i}" if i >= len(PROMPTS) else "") for i in range(shape[1])]
            return lambda: family.encode(texts)
        raise ValueError(f"unknown component shape {shape!r}")

    @torch.no_grad()
    def time(self, shape: Shape, repeats: int = 5, min_seconds: float = 0.05) -> float:
        """Median seconds of the raw call of `shape` (one warm-up call, then at least `repeats` timed calls
        and at least `min_seconds` of them)."""
        call = self.call(shape)
        call()
        self.sync()
        times: list[float] = []
        while len(times) < repeats or sum(times) < min_seconds:
            started = time.perf_counter()
            call()
            self.sync()
            times.append(time.perf_counter() - started)
            if len(times) >= 50:
                break
        return statistics.median(times)


def load_components(model: str, options: Mapping[str, Any], backend: str | None = None,
                    max_batch_size: int = 16) -> Components:
    """Load a catalogue model as the server would (same launch options) and wrap its family adapter; with
    `backend` (what the Kiln server ran, e.g. "onnx") the denoiser runs on it, as in the server (the baselines
    keep the plain pipeline)."""
    from kiln.engine.backends.launch import launch_backend
    from kiln.engine.catalogue import get_spec
    from kiln.engine.families import make_family
    from kiln.engine.loading import load_model
    from kiln.engine.options import parse_launch_options

    spec = get_spec(model)
    loaded = load_model(spec, parse_launch_options(spec, dict(options)))
    family = make_family(spec.family, loaded.pipeline, loaded.device, loaded.dtype)
    if backend is not None:
        launch_backend(backend, family, model=spec.name, source=loaded.source, max_batch_size=max_batch_size,
                       warmup_size=(64, 64) if options.get("tiny") else spec.default_size)
    return Components(family)


def work_from_records(records: Mapping[str, Any]) -> Counter:
    """Kiln's recorded component calls of one model -> a count per shape."""
    work: Counter = Counter()
    for width, height, rows, _ in records.get("forwards", []):
        work[("forward", width, height, rows)] += 1
    for width, height, images, _ in records.get("decodes", []):
        work[("decode", width, height, images)] += 1
    for kind, texts, _ in records.get("encodes", []):
        if texts:  # the engine also calls encode([]) on steps that admit nobody: overhead, not work
            work[(kind, texts)] += 1
    return work


def in_run_seconds(records: Mapping[str, Any]) -> dict[str, float]:
    """What the same calls took inside Kiln's run (under its load), by component."""
    return {
        "encode": sum(row[2] for row in records.get("encodes", []) if row[1]),
        "forward": sum(row[3] for row in records.get("forwards", [])),
        "decode": sum(row[3] for row in records.get("decodes", [])),
    }


def component_of(shape: Shape) -> str:
    return "forward" if shape[0] == "forward" else "decode" if shape[0] == "decode" else "encode"


def work_seconds(work: Counter, times: Mapping[Shape, float]) -> dict[str, float]:
    """Seconds the counted work takes at the measured raw times, by component."""
    seconds = {"encode": 0.0, "forward": 0.0, "decode": 0.0}
    for shape, count in work.items():
        seconds[component_of(shape)] += count * times[shape]
    return seconds


def shape_key(shape: Iterable) -> str:
    """A JSON-friendly name for a shape, e.g. 'forward:64x64:32'."""
    shape = tuple(shape)
    if shape[0] in ("forward", "decode"):
        return f"{shape[0]}:{shape[1]}x{shape[2]}:{shape[3]}"
    return f"{shape[0]}:{shape[1]}"


def parse_shape_key(key: str) -> Shape:
    parts = key.split(":")
    if parts[0] in ("forward", "decode"):
        width, height = parts[1].split("x")
        return (parts[0], int(width), int(height), int(parts[2]))
    return (parts[0], int(parts[1]))
