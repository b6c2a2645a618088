"""Attention dispatch for the denoisers: one attention core, several kernels, chosen once at load.

Every kernel computes the same thing, softmax(q k^T * scale + mask) v, on `[batch, heads, sequence, head_dim]`
tensors (what `F.scaled_dot_product_attention` takes), and `reference` is that formula in plain torch, the
definition the parity tests hold each kernel to:

- `sdpa`: PyTorch's scaled_dot_product_attention. Everywhere, the default, and the only one that exports
  (torch.compile, ONNX, TensorRT all trace it).
- `xformers`: xformers' memory_efficient_attention. CUDA only (xformers has no CPU kernels), when installed.
- `flash`: flash-attn's flash_attn_func. CUDA, float16/bfloat16, when installed; a call it cannot serve (a mask,
  float32, head_dim > 256) goes to SDPA.

`install(module)` puts Kiln's attention processors on a diffusers denoiser (UNet, SD3 or FLUX transformer) in
place of diffusers' SDPA processors. They are diffusers' own processors with the attention core swapped for the
chosen kernel, written with shape-free ops (slicing instead of reshapes through Python ints), so that the
legacy ONNX exporter keeps the batch, spatial and sequence axes dynamic; the numbers are the same.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger("kiln.kernels")

Kernel = Callable[..., torch.Tensor]  # (q, k, v, mask=None) -> out, all [B, H, S, D]
KERNEL_NAMES = ("sdpa", "xformers", "flash")
AUTO_ORDER = ("flash", "xformers", "sdpa")  # what `preferred="auto"` tries, first available wins


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The definition: softmax(q k^T / sqrt(d) + mask) v in float32, cast back. A boolean mask keeps True."""
    scores = q.float() @ k.float().transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)


def xformers_attention(q, k, v, mask=None):
    if mask is not None:  # xformers wants aligned, expanded biases: not worth it for the masks diffusers passes
        return sdpa(q, k, v, mask)
    import xformers.ops

    out = xformers.ops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def flash_attention(q, k, v, mask=None):
    if mask is not None or q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] > 256:
        return sdpa(q, k, v, mask)
    from flash_attn import flash_attn_func

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=0.0, causal=False)
    return out.transpose(1, 2)


@dataclass(frozen=True)
class KernelInfo:
    name: str
    fn: Kernel
    package: str | None  # the import it needs
    cuda_only: bool
    half_only: bool


KERNELS: dict[str, KernelInfo] = {
    "sdpa": KernelInfo("sdpa", sdpa, None, cuda_only=False, half_only=False),
    "xformers": KernelInfo("xformers", xformers_attention, "xformers", cuda_only=True, half_only=False),
    "flash": KernelInfo("flash", flash_attention, "flash_attn", cuda_only=True, half_only=True),
}


def unavailable_reason(name: str, device: torch.device | str, dtype: torch.dtype) -> str | None:
    """Why kernel `name` cannot run on this device and dtype, or None when it can."""
    if name not in KERNELS:
        return f"unknown attention kernel {name!r}; known: {', '.join(KERNEL_NAMES)}"
    info = KERNELS[name]
    if info.cuda_only and torch.device(device).type != "cuda":
        return f"{name} runs on CUDA devices only"
    if info.half_only and dtype not in (torch.float16, torch.bfloat16):
        return f"{name} runs in float16/bfloat16 only"
    if info.package and importlib.util.find_spec(info.package) is None:
        return f"{name} needs the {info.package} package, which is not installed"
    return None


def choose(preferred: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """The kernel to use: `preferred` when it can run here, else (and for "auto") the first of AUTO_ORDER that can."""
    if preferred != "auto":
        reason = unavailable_reason(preferred, device, dtype)
        if reason is None:
            return preferred
        if preferred not in KERNELS:
            raise ValueError(reason)
        log.warning("attention kernel %r unavailable (%s); choosing another", preferred, reason)
    return next(name for name in AUTO_ORDER if unavailable_reason(name, device, dtype) is None)


# --- processors -------------------------------------------------------------------------------------------------
class AttnProcessor:
    """diffusers' AttnProcessor2_0 (the UNets' self- and cross-attention) with a pluggable attention core."""

    def __init__(self, kernel: str = "sdpa"):
        self.kernel_name = kernel
        self.kernel = KERNELS[kernel].fn

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attention_mask is not None:
            batch_size, sequence_length, _ = context.shape
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(context)
        value = attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (_heads(x, head_dim) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = self.kernel(query, key, value, attention_mask)
        hidden_states = hidden_states.transpose(1, 2).flatten(2).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(residual.shape)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class JointAttnProcessor:
    """diffusers' JointAttnProcessor2_0 (SD3's joint image-text attention) with a pluggable attention core."""

    def __init__(self, kernel: str = "sdpa"):
        self.kernel_name = kernel
        self.kernel = KERNELS[kernel].fn

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        residual = hidden_states
        head_dim = attn.to_k.out_features // attn.heads
        query, key, value = (_heads(proj(hidden_states), head_dim) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            context = [_heads(proj(encoder_hidden_states), head_dim)
                       for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)]
            if attn.norm_added_q is not None:
                context[0] = attn.norm_added_q(context[0])
            if attn.norm_added_k is not None:
                context[1] = attn.norm_added_k(context[1])
            query, key, value = (torch.cat([x, c], dim=2) for x, c in zip((query, key, value), context))
        hidden_states = self.kernel(query, key, value, None)
        hidden_states = hidden_states.transpose(1, 2).flatten(2).to(query.dtype)
        if encoder_hidden_states is not None:
            length = residual.shape[1]
            hidden_states, encoder_hidden_states = hidden_states[:, :length], hidden_states[:, length:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


class FluxAttnProcessor:
    """diffusers' FluxAttnProcessor with a pluggable attention core and a rotary embedding written with slices
    (diffusers reshapes through Python ints, which the ONNX tracer freezes to the example's batch and length)."""

    def __init__(self, kernel: str = "sdpa"):
        self.kernel_name = kernel
        self.kernel = KERNELS[kernel].fn

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))  # [B, S, H, D]
        query, key = attn.norm_q(query), attn.norm_k(key)
        if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
            if attn.fused_projections:
                context = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                context = (attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                           attn.add_v_proj(encoder_hidden_states))
            c_query, c_key, c_value = (x.unflatten(-1, (-1, attn.head_dim)) for x in context)
            c_query, c_key = attn.norm_added_q(c_query), attn.norm_added_k(c_key)
            query = torch.cat([c_query, query], dim=1)
            key = torch.cat([c_key, key], dim=1)
            value = torch.cat([c_value, value], dim=1)
        if image_rotary_emb is not None:
            query = rotary(query, image_rotary_emb)
            key = rotary(key, image_rotary_emb)
        mask = attention_mask
        hidden_states = self.kernel(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), mask)
        hidden_states = hidden_states.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            length = encoder_hidden_states.shape[1]
            encoder_hidden_states, hidden_states = hidden_states[:, :length], hidden_states[:, length:]
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


def rotary(x: torch.Tensor, freqs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """diffusers' apply_rotary_emb(use_real=True, unbind_dim=-1, sequence_dim=1) on [B, S, H, D], shape-free."""
    cos, sin = (f[None, :, None, :].to(x.device) for f in freqs)
    real, imag = x[..., 0::2], x[..., 1::2]
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[B, S, H*D] -> [B, H, S, D]."""
    return x.unflatten(-1, (-1, head_dim)).transpose(1, 2)


def _replacement(processor: object) -> type | None:
    """Kiln's processor class for a diffusers processor, or None where Kiln has none (IP-adapters, LoRA...)."""
    names = {
        "AttnProcessor2_0": AttnProcessor, "AttnProcessor": AttnProcessor,
        "JointAttnProcessor2_0": JointAttnProcessor, "FluxAttnProcessor": FluxAttnProcessor,
        "FluxAttnProcessor2_0": FluxAttnProcessor,
    }
    if isinstance(processor, (AttnProcessor, JointAttnProcessor, FluxAttnProcessor)):
        return type(processor)
    return names.get(type(processor).__name__)


def install(module: torch.nn.Module, preferred: str = "auto") -> str:
    """Put Kiln's processors with the chosen kernel on every attention layer of a diffusers model; the name of
    the kernel chosen. Layers with processors Kiln does not know keep theirs (logged): a model whose layers all
    run diffusers' sliced attention (launch option attention_slicing) keeps it, and the name says so."""
    parameter = next(module.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None else torch.float32
    kernel = choose(preferred, device, dtype)
    replaced, kept = 0, set()
    for layer in module.modules():
        processor = getattr(layer, "processor", None)
        if processor is None or not hasattr(layer, "set_processor"):
            continue
        cls = _replacement(processor)
        if cls is None:
            kept.add(type(processor).__name__)
            continue
        layer.set_processor(cls(kernel))
        replaced += 1
    if kept:
        log.info("attention: %d layers kept their own processors (%s)", len(kept), ", ".join(sorted(kept)))
    # With no layer replaced (diffusers' sliced attention, say), what runs is diffusers' processors: say so.
    chosen = kernel if replaced or not kept else f"diffusers ({', '.join(sorted(kept))})"
    module._kiln_attention = chosen
    log.info("attention kernel %s on %d layers of %s", chosen, replaced, type(module).__name__)
    return chosen


def installed(module: torch.nn.Module) -> str | None:
    """The kernel `install` put on this module, if any."""
    return getattr(module, "_kiln_attention", None)
