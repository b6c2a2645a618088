"""Per-row LoRA layers: each row of one batched call adds its own adapters' deltas, in one gather and two
batched matmuls per layer.

Every adapted Linear/Conv2d is replaced by a wrapper that keeps the base layer and, as buffers, a stack of slots:
A `[S, R, in(, kh, kw)]` and B `[S, out, R]`, slot 0 all zeros, ranks zero-padded to R = max_lora_rank, alpha/r
folded into B when an adapter is copied in (in place, so buffer addresses never change). Before each call the
part writes, for every row, the K slots it uses and their scales into one `RowSelection` shared by the layers;
each layer computes

    y = base(x) + sum_k scale[:, k] * B[slot[:, k]] @ (A[slot[:, k]] @ x)

per row. Why this shape and not peft's per-adapter loop: shapes are static and the selection is tensors, so
torch.compile never recompiles when rows, adapters or scales change (it always computes all K slots at full R:
slot 0 adds exact zeros); eager calls compute only the slots and rank some row of the call uses, and skip a
layer none of them adapts. A row without LoRA therefore gets exactly its base output, whatever its neighbours
carry. Rows must be the first dimension at every adapted layer, as in the denoisers and text encoders.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn


class RowSelection:
    """Which slots (and at which scales) each row of the next call uses. `slots`/`scales` are `[rows, K]`
    tensors written in place; a one-row selection applies to every row (text encoders: one adapter set per
    encode call). `used` (the slots some row uses) and `width` (adapters per row) let eager calls skip work."""

    def __init__(self, rows: int, per_row: int, device: torch.device, dtype: torch.dtype):
        self.slots = torch.zeros(rows, per_row, dtype=torch.long, device=device)
        self.scales = torch.zeros(rows, per_row, dtype=dtype, device=device)
        self.used: frozenset[int] = frozenset()
        self.width = 0

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
        self.used = frozenset(slot for s, _ in rows for slot in s) - {0}
        self.width = max(len(s) for s, _ in rows)

    def clear(self) -> None:
        self.set([])

    def rows(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.slots.shape[0] == 1:
            return self.slots.expand(count, -1), self.scales.expand(count, -1)
        return self.slots[:count], self.scales[:count]


class _SlotLayer(nn.Module):
    """What the Linear and Conv2d wrappers share: the base layer, the slot stacks, the selection they read."""

    def __init__(self, base: nn.Module, selection: RowSelection, slots: int, rank: int, a_shape: tuple[int, ...],
                 out_features: int):
        super().__init__()
        self.base = base
        self.selection = selection  # a plain object, not a submodule: shared by every layer of the model
        weight = base.weight
        self.register_buffer("lora_a", weight.new_zeros(slots, rank, *a_shape), persistent=False)
        self.register_buffer("lora_b", weight.new_zeros(slots, out_features, rank), persistent=False)
        self.ranks: dict[int, int] = {}  # slot -> rank of the adapter it holds for this layer

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
        if weights is not None:
            a, b = weights
            rank = a.shape[0]
            self.lora_a[slot, :rank].copy_(a)
            self.lora_b[slot, :, :rank].copy_(b)
            self.ranks[slot] = rank

    def _plan(self, count: int) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """The rows' slots, scales and the rank to compute; None when no row's adapter touches this layer."""
        slots, scales = self.selection.rows(count)
        if torch.compiler.is_compiling():
            return slots, scales, self.lora_a.shape[1]
        used = self.selection.used & self.ranks.keys()
        if not used:
            return None
        width = self.selection.width
        return slots[:, :width], scales[:, :width], max(self.ranks[slot] for slot in used)

    def _weights(self, slots: torch.Tensor, scales: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: A `[n, K*r, ...]` and the scaled B `[n, out, K*r]`."""
        count, width = slots.shape
        a = self.lora_a[slots][:, :, :rank]  # [n, K, r, ...]
        b = self.lora_b[slots][..., :rank] * scales[:, :, None, None]  # [n, K, out, r]
        return a.reshape(count, width * rank, *a.shape[3:]), b.permute(0, 2, 1, 3).reshape(count, -1, width * rank)


class LoraLinear(_SlotLayer):
    def __init__(self, base: nn.Linear, selection: RowSelection, slots: int, rank: int):
        super().__init__(base, selection, slots, rank, (base.in_features,), base.out_features)
        self.in_features, self.out_features = base.in_features, base.out_features  # read by attention processors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        plan = self._plan(x.shape[0])
        if plan is None:
            return out
        a, b = self._weights(*plan)
        hidden = torch.bmm(x.reshape(x.shape[0], -1, x.shape[-1]), a.transpose(1, 2))  # [n, T, K*r]
        return out + torch.bmm(hidden, b.transpose(1, 2)).reshape(out.shape)


class LoraConv2d(_SlotLayer):
    """A has the base kernel, stride and padding (as peft's conv LoRA), B is 1x1: the rows' A run as one
    grouped convolution (groups = rows), the rows' B as one batched matmul."""

    def __init__(self, base: nn.Conv2d, selection: RowSelection, slots: int, rank: int):
        super().__init__(base, selection, slots, rank, (base.in_channels, *base.kernel_size), base.out_channels)
        self.in_channels, self.out_channels = base.in_channels, base.out_channels
        self.kernel_size, self.stride, self.padding = base.kernel_size, base.stride, base.padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        plan = self._plan(x.shape[0])
        if plan is None:
            return out
        a, b = self._weights(*plan)
        count, channels = x.shape[:2]
        hidden = F.conv2d(x.reshape(1, count * channels, *x.shape[2:]), a.reshape(-1, *a.shape[2:]), None,
                          self.stride, self.padding, groups=count)  # [1, n*K*r, H', W']
        return out + torch.bmm(b, hidden.reshape(count, b.shape[2], -1)).reshape(out.shape)


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
