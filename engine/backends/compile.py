"""The `compile` backend: torch.compile on batch-size buckets, replayed as CUDA graphs on a GPU.

torch.compile specialises a graph on its input shapes, and compiling one takes seconds to minutes: a batch size it
has not seen, arriving mid-traffic, would stall every job in the lane while it compiles. So the batch is padded
(last row repeated) up to the next bucket and the output sliced back; warm-up at launch compiles every bucket for a
lane size, after which no batch size of that lane compiles again. A lane size not warmed up compiles once per
bucket on first use.

On a GPU each (bucket, lane size) is also captured as a CUDA graph (`torch.cuda.CUDAGraph`, static input buffers,
one memory pool shared by all graphs of the model), so a forward is one graph launch instead of hundreds of kernel
launches from Python: what makes small batches and small models GPU-bound rather than CPU-bound. The buckets are
finer there (1, 2, 3, 4, 6, 8, 12, ...: a padded row costs a real row's compute). Explicit capture rather than
torch.compile's "reduce-overhead" mode, whose CUDA-graph trees are thread-local: the runner warms up on the loading
thread and replays on its scheduler thread, where reduce-overhead would record every graph again mid-traffic.
A shape whose capture fails (an op that syncs with the CPU, a capture error) runs the compiled code without a
graph, and the reason is kept in `describe()`; a compile mode that brings its own graphs ("reduce-overhead",
"max-autotune") turns the explicit capture off.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from kiln.engine.families.denoisers import Denoiser

from .base import Backend, batch_buckets, batch_rows, bucket_for, pad_rows, split_rows

log = logging.getLogger("kiln.engine")

LANES_PER_MODEL = 8  # lane sizes per model that may each compile all buckets before dynamo gives up recompiling
MODES_WITH_GRAPHS = ("reduce-overhead", "max-autotune")  # torch.compile modes that capture CUDA graphs themselves


@dataclass
class CapturedGraph:
    """One CUDA graph of the compiled denoiser at one input signature: copy inputs in, replay, read `output`."""

    graph: Any  # torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]
    output: torch.Tensor


def _signature(inputs: Sequence[torch.Tensor]) -> tuple:
    return tuple((tuple(tensor.shape), tensor.dtype) for tensor in inputs)


class CompileBackend(Backend):
    """torch.compile(dynamic=False) of the denoiser, fed only bucket-sized batches; CUDA graphs per bucket when
    `graphs` (default: on a CUDA device, unless the compile mode captures its own)."""

    name = "compile"

    def __init__(self, denoiser: Denoiser, max_rows: int, compiler: str = "inductor", mode: str | None = None,
                 graphs: bool | None = None):
        super().__init__(denoiser)
        parameter = next(denoiser.model.parameters(), None)
        self.device = parameter.device if parameter is not None else torch.device("cpu")
        if graphs is None:
            graphs = self.device.type == "cuda" and mode not in MODES_WITH_GRAPHS
        self.graphs = graphs
        self.buckets = batch_buckets(max_rows, fine=graphs)
        self.compiler, self.mode = compiler, mode
        # One graph per (bucket, lane size) on the same code: past dynamo's recompile limit (8 by default) it would
        # silently fall back to eager.
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, LANES_PER_MODEL * len(self.buckets))
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * config.recompile_limit)
        self.compiled = torch.compile(denoiser, backend=compiler, mode=mode, dynamic=False)
        self._captured: dict[tuple, CapturedGraph | str] = {}  # signature -> graph, or why it could not be captured
        self._pool = None  # the memory pool all graphs share (they never run at once)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        names, shared = self.names(inputs), self.shared_inputs
        rows = batch_rows(inputs, names, shared)
        largest = self.buckets[-1]
        if rows > largest:  # more rows than max_rows: run in bucket-sized pieces
            return torch.cat([self.forward(*chunk) for chunk in split_rows(inputs, names, shared, largest)])
        padded = pad_rows(inputs, names, shared, bucket_for(rows, self.buckets))
        if not self.graphs:
            return self.compiled(*padded)[:rows]
        captured = self._captured.get(_signature(padded))
        if captured is None:
            captured = self._captured[_signature(padded)] = self._capture(padded)
        if isinstance(captured, str):
            return self.compiled(*padded)[:rows]
        for static, tensor in zip(captured.inputs, padded):
            static.copy_(tensor)
        captured.graph.replay()
        return captured.output[:rows].clone()  # the next replay overwrites the graph's output

    def _capture(self, inputs: Sequence[torch.Tensor]) -> CapturedGraph | str:
        """Compile and capture the graph for these input shapes (static copies of `inputs`), or say why not."""
        try:
            static = [tensor.clone() for tensor in inputs]
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # compile and warm up outside the capture, as CUDA graphs require
                for _ in range(2):
                    self.compiled(*static)
            torch.cuda.current_stream(self.device).wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            # thread_local: another model's scheduler thread working on the GPU meanwhile does not spoil the capture
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                output = self.compiled(*static)
            return CapturedGraph(graph, static, output)
        except Exception as error:  # noqa: BLE001 - any capture failure leaves the compiled code to run this shape
            reason = f"{type(error).__name__}: {error}"
            log.warning("compile: no CUDA graph for %s, running it without one: %s", _signature(inputs), reason)
            return reason

    def warmup_rows(self, max_rows: int) -> list[int]:
        return list(self.buckets)

    def describe(self):
        info = {**super().describe(), "buckets": list(self.buckets), "compiler": self.compiler, "mode": self.mode}
        if self.graphs:
            failed = {str([list(shape) for shape, _ in key]): why for key, why in self._captured.items()
                      if isinstance(why, str)}
            info["cuda_graphs"] = {"captured": sum(not isinstance(c, str) for c in self._captured.values()),
                                   "failed": failed}
        else:
            info["cuda_graphs"] = "torch.compile's own" if self.mode in MODES_WITH_GRAPHS else False
        return info
