"""The `compile` backend: torch.compile on batch-size buckets.

torch.compile specialises a graph on its input shapes, and compiling one takes seconds to minutes: a batch size it
has not seen, arriving mid-traffic, would stall every job in the lane while it compiles. So the batch is padded
(last row repeated) up to the next bucket of 1, 2, 4, ... max_rows and the output sliced back; warm-up at launch
compiles every bucket for a lane size, after which no batch size of that lane compiles again. A lane size not
warmed up compiles once per bucket on first use.
"""

from __future__ import annotations

import torch

from kiln.engine.families.denoisers import Denoiser

from .base import Backend, batch_buckets, batch_rows, bucket_for, pad_rows, split_rows

LANES_PER_MODEL = 8  # lane sizes per model that may each compile all buckets before dynamo gives up recompiling


class CompileBackend(Backend):
    """torch.compile(dynamic=False) of the denoiser, fed only bucket-sized batches."""

    name = "compile"

    def __init__(self, denoiser: Denoiser, max_rows: int, compiler: str = "inductor", mode: str | None = None):
        super().__init__(denoiser)
        self.buckets = batch_buckets(max_rows)
        self.compiler, self.mode = compiler, mode
        # One graph per (bucket, lane size) on the same code: past dynamo's recompile limit (8 by default) it would
        # silently fall back to eager.
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, LANES_PER_MODEL * len(self.buckets))
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * config.recompile_limit)
        self.compiled = torch.compile(denoiser, backend=compiler, mode=mode, dynamic=False)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        names, shared = self.names(inputs), self.shared_inputs
        rows = batch_rows(inputs, names, shared)
        largest = self.buckets[-1]
        if rows > largest:  # more rows than max_rows: run in bucket-sized pieces
            return torch.cat([self.forward(*chunk) for chunk in split_rows(inputs, names, shared, largest)])
        bucket = bucket_for(rows, self.buckets)
        return self.compiled(*pad_rows(inputs, names, shared, bucket))[:rows]

    def warmup_rows(self, max_rows: int) -> list[int]:
        return list(self.buckets)

    def describe(self):
        return {**super().describe(), "buckets": list(self.buckets), "compiler": self.compiler, "mode": self.mode}
