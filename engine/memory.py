"""How many jobs a batch may hold: `max_batch_size` "auto" derives it from free GPU memory, so that a full batch
never runs out of memory.

A job's share is measured, not guessed: the peak memory of a denoiser forward and of a VAE decode at one and at
two jobs, at the model's default size. The difference is what each further job adds; the one-job peak less that
is the fixed cost (workspaces). A lane of another size costs in proportion to its pixels, so the same budget also
bounds the jobs of one forward or decode at each size (`BatchBudget.jobs_per_call`).

On a CPU, memory is seldom the bound (and a step's cost grows with its batch anyway): "auto" is 16 there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .backends.base import ExampleInputs

log = logging.getLogger("kiln.engine")

CPU_BATCH_SIZE = 16
MAX_AUTO_BATCH_SIZE = 64  # beyond this a GPU step is compute-bound: more jobs add latency, not throughput
HEADROOM = 0.85  # of the memory free after loading: room for fragmentation and for neighbours' growth


@dataclass(frozen=True)
class BatchBudget:
    """The batch bound of one launched model, and the memory figures it came from (None when not measured)."""

    max_batch_size: int
    usable_bytes: int | None = None  # free memory x HEADROOM, less the fixed cost
    bytes_per_pixel: float | None = None  # one job's memory per output pixel

    @classmethod
    def derive(cls, free_bytes: int, fixed_bytes: int, job_bytes: int, pixels: int) -> "BatchBudget":
        """The budget for `free_bytes` of free memory when a call costs `fixed_bytes` plus `job_bytes` per job
        at `pixels` (width x height). At least one job, even if memory looks short: a request must run, and
        the executor's out-of-memory handling has the last word."""
        usable = max(0, int(free_bytes * HEADROOM) - fixed_bytes)
        size = max(1, min(MAX_AUTO_BATCH_SIZE, usable // max(1, job_bytes)))
        return cls(size, usable, job_bytes / pixels)

    def jobs_per_call(self, width: int, height: int) -> int:
        """The most jobs one denoiser forward or VAE decode at this size may hold."""
        if self.bytes_per_pixel is None:
            return self.max_batch_size
        fitting = int(self.usable_bytes // max(1.0, self.bytes_per_pixel * width * height))
        return max(1, min(self.max_batch_size, fitting))


def free_bytes(device: torch.device) -> int | None:
    """Memory free on `device` now: the GPU's, or the host's MemAvailable for a CPU (None where unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def batch_budget(family: Any, requested: int | None, size: tuple[int, int]) -> BatchBudget:
    """The launch's budget: a given `max_batch_size` as it is; "auto" (None) measured on a CUDA device, 16
    elsewhere. Runs before the backend is in place, so the eager denoiser is measured (compiled backends and
    TensorRT engines need no more memory than it)."""
    if requested is not None:
        return BatchBudget(requested)
    if family.device.type != "cuda":
        return BatchBudget(CPU_BATCH_SIZE)
    fixed, per_job = measure_job_memory(family, *size)
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(family.device)
    budget = BatchBudget.derive(free, fixed, per_job, size[0] * size[1])
    log.info("max_batch_size auto: %d (%.1f GiB free, %.0f MiB fixed, %.0f MiB per job at %dx%d)",
             budget.max_batch_size, free / 2**30, fixed / 2**20, per_job / 2**20, *size)
    return budget


@torch.no_grad()
def measure_job_memory(family: Any, width: int, height: int) -> tuple[int, int]:
    """(fixed bytes, bytes per job) of the larger of a denoiser forward and a VAE decode at this size, from
    their CUDA peaks at one and at two jobs."""
    examples, rows = ExampleInputs(family, width, height), family.spec.rows_per_job

    def forward(jobs: int) -> Callable[[], Any]:
        inputs = examples(rows * jobs)
        return lambda: family.denoiser(*inputs)

    def decode(jobs: int) -> Callable[[], Any]:
        latents = family.pack(torch.randn((jobs, *family.latent_shape(width, height)[1:]),
                                          device=family.device, dtype=family.dtype))
        return lambda: family.decode(latents, width, height)

    fixed = per_job = 0
    for call in (forward, decode):
        one, two = _peak_bytes(family.device, call(1)), _peak_bytes(family.device, call(2))
        job = max(1, two - one)
        per_job, fixed = max(per_job, job), max(fixed, one - job)
    return fixed, per_job


def _peak_bytes(device: torch.device, run: Callable[[], Any]) -> int:
    """Memory allocated at the peak of `run`, above what was allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before
