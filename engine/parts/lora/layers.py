"""Per-row LoRA layers: each row of one batched call adds its own adapters' deltas, in a few batched kernels
per layer.

Every adapted Linear/Conv2d is replaced by a wrapper that keeps the base layer and, as buffers, a stack of slots:
A `[S, R, in(, kh, kw)]` and B (kept transposed, `[S, R, out]`), slot 0 all zeros, ranks zero-padded to
R = max_lora_rank, alpha/r folded into B when an adapter is copied in (in place, so buffer addresses never change).
Before each call the part writes, for every row, the K slots it uses and their scales into one `RowSelection`
shared by the layers; each layer computes

    y = base(x) + sum_k scale[:, k] * B[slot[:, k]] @ (A[slot[:, k]] @ x)

per row: each row's K slots gathered, then batched matmuls. Why this shape and not peft's per-adapter loop:
shapes are static and the selection is tensors, so torch.compile never recompiles when rows, adapters or scales
change (it always computes all K slots at full R: slot 0 adds exact zeros). Eager calls skip a layer no row's
adapter touches, compute only the rank some row uses, and pick by cost (KERNEL_FLOPS per kernel, ELEMENT_FLOPS
per element of per-row weight copies) between that gather (5 kernels), running the used slots densely for every
row with per-row scales (3 kernels, no per-row copies) and, for small layers, merging each row's delta weight
sum_k scale_k B_k A_k and applying it with one batched matmul (2-3 kernels). The last two run in float32 only:
in half precision a neighbour's adapter could overflow into inf x 0 = NaN in a row that does not use it, so half
precision always gathers. A row without LoRA therefore gets exactly its base output, whatever its neighbours
carry. Rows must be the first dimension at every adapted layer, as in the denoisers and text encoders.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn


# What one extra kernel costs, in FLOPs of matmul time (eager; measured order of magnitude: ~20 us per small
# kernel on one CPU core at ~20 GFLOP/s; ~5 us launch on a GPU at ~100 TFLOP/s). Each eager call picks the
# cheapest way for its shapes: kernel launches dominate small layers, FLOPs large ones.
KERNEL_FLOPS = {"cpu": 4e5, "cuda": 5e8}
# What writing one element of a per-row weight copy costs (the gathered slots, the merged delta weights), in the
# same FLOPs: ~7 ns per element on one CPU core, measured on reference-size SD1.5 layers (and memory bandwidth
# against compute on GPUs gives the same order). Without it a gather over the deep, few-pixel UNet stages, where
# each row copies megabytes of weights to multiply a handful of positions, looked cheap: 7x slower LoRA deltas.
ELEMENT_FLOPS = 100


class RowSelection:
    """Which slots (and at which scales) each row of the next call uses. `slots`/`scales` are `[rows, K]`
    tensors written in place; a one-row selection applies to every row (text encoders: one adapter set per
    encode call). `used` (the slots some row uses) and `width` (adapters per row) let eager calls skip work;
    the per-row scale tensors the layers multiply by are built once per call and rank, and shared."""

    def __init__(self, rows: int, per_row: int, device: torch.device, dtype: torch.dtype):
        self.slots = torch.zeros(rows, per_row, dtype=torch.long, device=device)
        self.scales = torch.zeros(rows, per_row, dtype=dtype, device=device)
        self.used: tuple[int, ...] = ()
        self.used_set: frozenset[int] = frozenset()
        self.width = 0
        self._rows: list[tuple[tuple[int, ...], tuple[float, ...]]] = []
        self._made: dict[tuple, torch.Tensor] = {}

    def set(self, rows: list[tuple[tuple[int, ...], tuple[float, ...]]]) -> None:
        """Each row's (slots, scales); rows past the last (a compiled backend's padding repeats the last row)
        repeat it too. Raises if there are more rows than the selection holds."""
        capacity, per_row = self.slots.shape
        if len(rows) > capacity:
            raise ValueError(f"{len(rows)} rows for a LoRA selection of {capacity}")
        rows = rows + [rows[-1]] * (capacity - len(rows)) if rows else [((), ())] * capacity
        slots = [list(s) + [0] * (per_row - len(s)) for s, _ in rows]
        scales = [list(c) + [0.0] * (per_row - len(c)) for _, c in rows]
        self.slots.copy_(torch.tensor(slots, dtype=torch.long))
        self.scales.copy_(torch.tensor(scales, dtype=self.scales.dtype))
        self.used_set = frozenset(slot for s, _ in rows for slot in s) - {0}
        self.used = tuple(sorted(self.used_set))
        self.width = max(len(s) for s, _ in rows)
        self._rows = rows
        self._made = {}

    def clear(self) -> None:
        self.set([])

    def rows(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.slots.shape[0] == 1:
            return self.slots.expand(count, -1), self.scales.expand(count, -1)
        return self.slots[:count], self.scales[:count]

    def gathered_scales(self, count: int, width: int, rank: int) -> torch.Tensor:
        """`[n, 1, K*r]`: each row's K scales, each repeated r times (the gathered slots' columns)."""
        key = ("gather", count, width, rank)
        if key not in self._made:
            scales = self.rows(count)[1][:, :width]
            self._made[key] = scales.repeat_interleave(rank, dim=1)[:, None, :]
        return self._made[key]

    def dense_scales(self, count: int, used: tuple[int, ...], rank: int) -> torch.Tensor:
        """`[n, U*r]`: for each used slot, each row's scale of it (0 where the row does not use it)."""
        key = ("dense", count, used, rank)
        if key not in self._made:
            rows = self._rows[:count] if len(self._rows) > 1 else self._rows * count
            table = [[dict(zip(s, c)).get(slot, 0.0) for slot in used] for s, c in rows]
            scales = torch.tensor(table, dtype=self.scales.dtype).to(self.scales.device)
            self._made[key] = scales.repeat_interleave(rank, dim=1)
        return self._made[key]


class _SlotLayer(nn.Module):
    """What the Linear and Conv2d wrappers share: the base layer, the slot stacks, the selection they read.
    A is `[S, R, in(, kh, kw)]`, B is kept transposed, `[S, R, out]`, so a gather is already in matmul layout."""

    def __init__(self, base: nn.Module, selection: RowSelection, slots: int, rank: int, a_shape: tuple[int, ...],
                 out_features: int):
        super().__init__()
        self.base = base
        self.selection = selection  # a plain object, not a submodule: shared by every layer of the model
        weight = base.weight
        self.register_buffer("lora_a", weight.new_zeros(slots, rank, *a_shape), persistent=False)
        self.register_buffer("lora_b", weight.new_zeros(slots, rank, out_features), persistent=False)
        self.ranks: dict[int, int] = {}  # slot -> rank of the adapter it holds for this layer
        self.out_features = out_features
        self._flops_per_rank = 2 * (math.prod(a_shape) + out_features)  # per output position and rank: A then B
        self._merged_flops = 2 * math.prod(a_shape) * out_features  # per output position: a merged delta weight
        self._kernel = KERNEL_FLOPS.get(weight.device.type, KERNEL_FLOPS["cuda"])
        self._cache: dict[tuple, tuple[torch.Tensor, ...]] = {}  # stacked or merged weights of used slots

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @torch.no_grad()
    def fill(self, slot: int, weights: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Copy one adapter's (A, B·alpha/r) for this layer into `slot`, or zero it (no weights here)."""
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self.ranks.pop(slot, None)
        self._cache.clear()
        if weights is not None:
            a, b = weights
            rank = a.shape[0]
            self.lora_a[slot, :rank].copy_(a)
            self.lora_b[slot, :rank].copy_(b.t())
            self.ranks[slot] = rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._base(x)
        if torch.compiler.is_compiling():  # static shapes and no Python caches: every row's K slots at full rank
            slots, scales = self.selection.rows(x.shape[0])
            rank = self.lora_a.shape[1]
            return self._gathered(x, out, slots, scales.repeat_interleave(rank, dim=1)[:, None, :], rank)
        if self.selection.used_set.isdisjoint(self.ranks):  # no row's adapter has weights here
            return out
        return self._delta(x, out)

    def _delta(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out` plus the rows' deltas, eager, the cheapest of the three ways for this call's shapes."""
        used = tuple(slot for slot in self.selection.used if slot in self.ranks)
        rank, width = max(self.ranks[slot] for slot in used), self.selection.width
        positions = out.numel() / self.out_features  # rows x tokens (or output pixels)
        lora = positions * rank * self._flops_per_rank  # one slot for every row
        count, copies = x.shape[0], ELEMENT_FLOPS * x.shape[0]  # per-row weights: one copy per row
        costs = {"gathered": 5 * self._kernel + width * lora + copies * width * rank * self._flops_per_rank / 2}
        if x.dtype == torch.float32:
            costs["dense"] = 3 * self._kernel + len(used) * lora
            costs["merged"] = (self._merged_kernels * self._kernel + positions * self._merged_flops
                               + count * len(used) * self._merged_flops / 2 + copies * self._merged_flops / 2)
        return self.apply_way(min(costs, key=costs.get), x, out, used, rank)

    def apply_way(self, way: str, x: torch.Tensor, out: torch.Tensor, used: tuple[int, ...], rank: int):
        """`out` plus the deltas computed `way` ("gathered", "dense" or "merged"); all three give the same."""
        count, selection = x.shape[0], self.selection
        if way == "gathered":
            width = selection.width
            slots = selection.rows(count)[0][:, :width]
            return self._gathered(x, out, slots, selection.gathered_scales(count, width, rank), rank)
        scales = selection.dense_scales(count, used, rank if way == "dense" else 1)
        key = (way, used, rank)
        if key not in self._cache:
            a = self.lora_a[list(used), :rank]  # [U, r, ...]
            b = self.lora_b[list(used), :rank]  # [U, r, out]
            self._cache[key] = ((a.flatten(0, 1), b.flatten(0, 1)) if way == "dense"
                                else (torch.einsum("uro,uri->uoi", b, a.flatten(2)).flatten(1),))
        return (self._dense_rows if way == "dense" else self._merged_rows)(x, out, *self._cache[key], scales)


class LoraLinear(_SlotLayer):
    _merged_kernels = 2

    def __init__(self, base: nn.Linear, selection: RowSelection, slots: int, rank: int):
        super().__init__(base, selection, slots, rank, (base.in_features,), base.out_features)
        self.in_features, self.out_features = base.in_features, base.out_features  # read by attention processors

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.base.weight, self.base.bias)  # the base layer without a second module call

    def _gathered(self, x, out, slots, scales, rank):
        count, width = slots.shape
        a = self.lora_a[:, :rank][slots].reshape(count, width * rank, -1)  # [n, K*r, in]
        b = self.lora_b[:, :rank][slots].reshape(count, width * rank, -1)  # [n, K*r, out]
        hidden = torch.bmm(x.reshape(count, -1, x.shape[-1]), a.transpose(1, 2)) * scales  # [n, T, K*r]
        return torch.baddbmm(out.reshape(count, -1, out.shape[-1]), hidden, b).reshape(out.shape)

    def _dense_rows(self, x, out, a, b, scales):
        hidden = F.linear(x, a).reshape(x.shape[0], -1, a.shape[0]) * scales[:, None, :]  # [n, T, U*r]
        flat = out.reshape(-1, out.shape[-1])
        return flat.addmm_(hidden.reshape(-1, a.shape[0]), b).reshape(out.shape)

    def _merged_rows(self, x, out, merged, scales):
        count = x.shape[0]
        weights = (scales @ merged).view(count, self.out_features, -1)  # each row's sum_k s_k B_k A_k: [n, out, in]
        flat = out.reshape(count, -1, self.out_features)
        return torch.baddbmm(flat, x.reshape(count, -1, x.shape[-1]), weights.transpose(1, 2)).reshape(out.shape)


class LoraConv2d(_SlotLayer):
    """A has the base kernel, stride and padding (as peft's conv LoRA), B is 1x1. Gathered, the rows' A run as
    one grouped convolution (groups = rows) and their B as one batched matmul."""

    _merged_kernels = 3

    def __init__(self, base: nn.Conv2d, selection: RowSelection, slots: int, rank: int):
        super().__init__(base, selection, slots, rank, (base.in_channels, *base.kernel_size), base.out_channels)
        self.in_channels, self.out_channels = base.in_channels, base.out_channels
        self.kernel_size, self.stride, self.padding = base.kernel_size, base.stride, base.padding

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        return self.base._conv_forward(x, self.base.weight, self.base.bias)

    def _gathered(self, x, out, slots, scales, rank):
        count, width = slots.shape
        a = self.lora_a[:, :rank][slots].flatten(0, 2)  # [n*K*r, C, kh, kw]
        b = self.lora_b[:, :rank][slots].reshape(count, width * rank, -1)  # [n, K*r, out]
        hidden = F.conv2d(x.reshape(1, -1, *x.shape[2:]), a, None, self.stride, self.padding, groups=count)
        hidden = hidden.reshape(count, width * rank, -1) * scales.transpose(1, 2)  # [n, K*r, H'W']
        return torch.baddbmm(out.reshape(count, out.shape[1], -1), b.transpose(1, 2), hidden).reshape(out.shape)

    def _dense_rows(self, x, out, a, b, scales):
        hidden = F.conv2d(x, a, None, self.stride, self.padding)  # [n, U*r, H', W']
        hidden = hidden.reshape(x.shape[0], a.shape[0], -1) * scales[:, :, None]
        flat = out.reshape(x.shape[0], out.shape[1], -1)
        return torch.baddbmm(flat, b.t().expand(x.shape[0], -1, -1), hidden).reshape(out.shape)

    def _merged_rows(self, x, out, merged, scales):
        count = x.shape[0]
        weights = (scales @ merged).view(count * self.out_features, self.in_channels, *self.kernel_size)
        delta = F.conv2d(x.reshape(1, -1, *x.shape[2:]), weights, None, self.stride, self.padding, groups=count)
        return out.add_(delta.reshape(out.shape))


SlotLayer = LoraLinear | LoraConv2d


def install(model: nn.Module, names: Iterable[str], selection: RowSelection, slots: int,
            rank: int) -> dict[str, SlotLayer]:
    """Replace the named layers of `model` by slot layers reading `selection`; the layers by name."""
    layers: dict[str, SlotLayer] = {}
    for name in names:
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, attribute)
        layer_type = LoraLinear if isinstance(base, nn.Linear) else LoraConv2d
        layers[name] = layer_type(base, selection, slots, rank)
        setattr(parent, attribute, layers[name])
    return layers


@torch.no_grad()
def fuse(layer: nn.Module, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    """Merge scale·B·A into a plain layer's weight (fused mode), computed in float32 as diffusers' fuse does."""
    weight = layer.weight
    a32, b32 = a.to(weight.device, torch.float32), b.to(weight.device, torch.float32)
    if isinstance(layer, nn.Conv2d):
        delta = torch.einsum("or,rikl->oikl", b32, a32)
    else:
        delta = b32 @ a32
    weight.copy_((weight.float() + scale * delta).to(weight.dtype))
