"""The backend interface, the eager backend, and what several backends share: batch buckets, row padding and
example inputs.

A backend stands in for `family.denoiser`: it is called as `backend(*tensors)` with the denoiser's inputs in the
order `input_names` and returns the prediction, batch first. `shared_inputs` name the inputs without a batch
dimension (FLUX's positional ids). Nothing else about it is visible to the scheduler or the family.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import torch

from ..errors import ModelLoadError
from ..families.denoisers import Denoiser


Examples = Callable[[int], Sequence[torch.Tensor]]  # rows -> the denoiser's inputs for that many rows


class BackendUnavailable(ModelLoadError):
    """The requested backend cannot run on this machine (missing package, no GPU, unsupported dtype)."""


class Backend:
    """What executes the denoiser forward. Subclasses implement `forward(*inputs)`."""

    name = ""

    def __init__(self, denoiser: Denoiser):
        self.denoiser = denoiser
        self.input_names: tuple[str, ...] = tuple(denoiser.input_names)
        self.shared_inputs: frozenset[str] = frozenset(denoiser.shared_inputs)
        self.control_inputs: tuple[str, ...] = tuple(denoiser.control_inputs)
        self.warmup_seconds: float | None = None  # set by warmup()

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.forward(*inputs)

    def names(self, inputs: Sequence[torch.Tensor]) -> tuple[str, ...]:
        """The names of a call's inputs: `input_names`, then the ControlNet additions when the call has them."""
        return self.input_names if len(inputs) == len(self.input_names) else self.input_names + self.control_inputs

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def config(self):
        return self.denoiser.config

    @property
    def model(self) -> torch.nn.Module:
        """The diffusers model inside the denoiser."""
        return self.denoiser.model

    def warmup_rows(self, max_rows: int) -> list[int]:
        """The batch sizes (rows) warm-up runs: one forward is enough unless the backend specialises on shape."""
        return [1]

    @torch.no_grad()
    def warmup(self, examples: Examples, max_rows: int) -> float:
        """Run the forwards that make later ones fast (compilation, kernel selection, allocator growth); the
        seconds it took, also kept in `warmup_seconds`."""
        started = time.perf_counter()
        for rows in self.warmup_rows(max_rows):
            self(*examples(rows))
        self.warmup_seconds = time.perf_counter() - started
        return self.warmup_seconds

    def describe(self) -> dict[str, Any]:
        """JSON-ready facts for logs and the runner's description."""
        return {"backend": self.name, "warmup_seconds": self.warmup_seconds}


def unwrap(denoiser: Denoiser | Backend) -> Denoiser:
    """The flat-signature module itself, whether a backend runs it or not."""
    return denoiser.denoiser if isinstance(denoiser, Backend) else denoiser


class EagerBackend(Backend):
    """Today's path: the PyTorch module itself."""

    name = "eager"

    def warmup_rows(self, max_rows: int) -> list[int]:
        return []  # nothing to prepare

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.denoiser(*inputs)


# --- batch buckets and padding ----------------------------------------------------------------------------------
def batch_buckets(max_rows: int, fine: bool = False) -> tuple[int, ...]:
    """The batch sizes a shape-specialising backend compiles, up to max_rows (itself the last), so that any
    batch of 1..max_rows rows runs on a compiled size: 1, 2, 4, 8, ... (a batch padded to at most twice its rows),
    or with `fine` also 3, 6, 12, 24, ... between them (padding at most a third of a bucket: where every padded row
    costs as much as a real one, as in a CUDA graph on a busy GPU, at the price of more graphs)."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    sizes, size = set(), 1
    while size < max_rows:
        sizes.add(size)
        if fine and size >= 2 and size * 3 // 2 < max_rows:
            sizes.add(size * 3 // 2)
        size *= 2
    return (*sorted(sizes), max_rows)


def bucket_for(rows: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding `rows` (callers split batches larger than the largest bucket)."""
    for size in buckets:
        if size >= rows:
            return size
    raise ValueError(f"{rows} rows exceed the largest bucket {buckets[-1]}")


def pad_rows(inputs: Sequence[torch.Tensor], names: Sequence[str], shared: frozenset[str],
             rows: int) -> list[torch.Tensor]:
    """Each batched input grown to `rows` by repeating its last row; shared inputs as they are.

    Repeating a real row (rather than zeros) keeps the padding rows in the numeric range the model expects, and
    since no denoiser mixes rows, the real rows' outputs do not depend on them. An input given several times (the
    ControlNet additions of blocks that share one) is padded once and stays one tensor."""
    padded, done = [], {}
    for name, tensor in zip(names, inputs):
        missing = rows - tensor.shape[0]
        if name in shared or missing <= 0:
            padded.append(tensor)
        else:
            if id(tensor) not in done:
                done[id(tensor)] = torch.cat([tensor, tensor[-1:].expand(missing, *tensor.shape[1:])])
            padded.append(done[id(tensor)])
    return padded


def split_rows(inputs: Sequence[torch.Tensor], names: Sequence[str], shared: frozenset[str],
               size: int) -> list[list[torch.Tensor]]:
    """The inputs cut into consecutive chunks of at most `size` rows (shared inputs go to every chunk)."""
    rows = batch_rows(inputs, names, shared)
    return [
        [tensor if name in shared else tensor[start : start + size] for name, tensor in zip(names, inputs)]
        for start in range(0, rows, size)
    ]


def batch_rows(inputs: Sequence[torch.Tensor], names: Sequence[str], shared: frozenset[str]) -> int:
    return next(tensor.shape[0] for name, tensor in zip(names, inputs) if name not in shared)


# --- example inputs ---------------------------------------------------------------------------------------------
def max_rows(family: Any, max_batch_size: int) -> int:
    """The largest denoiser batch a launch with this max_batch_size (images per forward) produces."""
    return family.spec.rows_per_job * max_batch_size


class ExampleInputs:
    """Realistic denoiser inputs of one lane size for any number of rows: what warm-up, export and engine
    builds run. The text conditioning is encoded once (the empty prompt) and repeated; latents are seeded noise;
    each row has its own timestep and guidance, as in a real mixed batch."""

    def __init__(self, family: Any, width: int, height: int, seed: int = 0):
        self.family, self.width, self.height, self.seed = family, width, height, seed
        self._cond: dict[str, torch.Tensor] | None = None

    @torch.no_grad()
    def named(self, rows: int) -> dict[str, torch.Tensor]:
        family = self.family
        if self._cond is None:
            cond = family.encode([""])[0]
            self._cond = {**cond, **family.size_conditioning(self.width, self.height)}
        generator = torch.Generator("cpu").manual_seed(self.seed)
        shape = (rows, *family.latent_shape(self.width, self.height)[1:])
        latents = family.pack(torch.randn(shape, generator=generator).to(family.device, family.dtype))
        cond = {key: value.expand(rows, *value.shape[1:]).contiguous() for key, value in self._cond.items()}
        timesteps = torch.linspace(999.0, 1.0, rows, device=family.device)
        guidance = torch.linspace(1.0, 8.0, rows, device=family.device)
        return family.denoiser_inputs(latents, timesteps, cond, guidance, self.width, self.height)

    def __call__(self, rows: int) -> tuple[torch.Tensor, ...]:
        named = self.named(rows)
        return tuple(named[name] for name in self.family.denoiser.input_names)
