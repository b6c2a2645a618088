"""Attention dispatch: the kernel chosen per device, each kernel against the plain-torch reference, and Kiln's
processors against diffusers' own on the tiny denoisers of the three architectures."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb

from kiln.engine.catalogue import get_spec
from kiln.engine.families import make_family
from kiln.engine.loading import load_model
from kiln.engine.options import LaunchOptions
from kiln.kernels import attention
from kiln.kernels.attention import FluxAttnProcessor, JointAttnProcessor, AttnProcessor


def qkv(batch=2, heads=3, queries=17, keys=23, dim=16, dtype=torch.float32, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    make = lambda length: torch.randn(batch, heads, length, dim, generator=generator).to(device, dtype)  # noqa: E731
    return make(queries), make(keys), make(keys)


def test_auto_picks_sdpa_on_cpu_and_unavailable_kernels_fall_back_to_it():
    assert attention.choose("auto", "cpu", torch.float32) == "sdpa"
    assert attention.choose("auto", "cpu", torch.float16) == "sdpa"
    assert attention.choose("xformers", "cpu", torch.float32) == "sdpa"
    assert attention.choose("flash", "cpu", torch.bfloat16) == "sdpa"
    assert attention.choose("sdpa", "cpu", torch.float32) == "sdpa"
    with pytest.raises(ValueError, match="unknown attention kernel 'magic'"):
        attention.choose("magic", "cpu", torch.float32)


def test_unavailable_reasons_name_the_requirement():
    assert "CUDA" in attention.unavailable_reason("xformers", "cpu", torch.float16)
    assert "CUDA" in attention.unavailable_reason("flash", "cpu", torch.float16)
    assert "float16" in attention.unavailable_reason("flash", "cuda", torch.float32)
    assert attention.unavailable_reason("sdpa", "cpu", torch.float32) is None


def test_reference_is_softmax_attention():
    q, k, v = qkv(batch=1, heads=1, queries=2, keys=3, dim=4)
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / 2.0  # sqrt(4)
    expected = torch.einsum("bhqk,bhkd->bhqd", torch.softmax(scores, dim=-1), v)
    assert torch.allclose(attention.reference(q, k, v), expected, atol=1e-6)


@pytest.mark.parametrize("mask_kind", [None, "bool", "additive"])
def test_sdpa_matches_the_reference(mask_kind):
    q, k, v = qkv()
    mask = None
    if mask_kind is not None:
        keep = torch.rand(2, 1, 17, 23, generator=torch.Generator().manual_seed(1)) > 0.3
        keep[..., 0] = True  # no fully masked row
        mask = keep if mask_kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, -1e4)
    assert torch.allclose(attention.sdpa(q, k, v, mask), attention.reference(q, k, v, mask), atol=1e-5)


def test_flash_and_xformers_wrappers_fall_back_to_sdpa_where_they_cannot_run():
    """float32 is outside flash-attn's kernels and masks outside both wrappers: those calls go to SDPA (no
    import of either package is needed for that)."""
    q, k, v = qkv()
    mask = torch.ones(2, 1, 17, 23, dtype=torch.bool)
    assert torch.equal(attention.flash_attention(q, k, v), attention.sdpa(q, k, v))
    assert torch.equal(attention.xformers_attention(q, k, v, mask), attention.sdpa(q, k, v, mask))


@pytest.mark.parametrize("name", ["xformers", "flash"])
def test_gpu_kernels_match_the_reference(name):
    if not torch.cuda.is_available():
        pytest.skip(f"{name} runs on CUDA only and this machine has no GPU")
    reason = attention.unavailable_reason(name, "cuda", torch.float16)
    if reason:
        pytest.skip(reason)
    q, k, v = qkv(dtype=torch.float16, device="cuda", dim=64)
    out = attention.KERNELS[name].fn(q, k, v)
    assert torch.allclose(out.float(), attention.reference(q, k, v).float(), atol=2e-3)


def test_rotary_matches_diffusers():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 3, 8, generator=generator)  # [B, S, H, D]
    freqs = (torch.randn(5, 8, generator=generator), torch.randn(5, 8, generator=generator))
    assert torch.equal(attention.rotary(x, freqs), apply_rotary_emb(x, freqs, sequence_dim=1))


@pytest.mark.parametrize(("model", "processor"), [
    ("stable-diffusion-v1.5", AttnProcessor),
    ("sd3-medium", JointAttnProcessor),
    ("FLUX.1-dev", FluxAttnProcessor),
])
def test_installed_processors_match_diffusers(tiny_root, model, processor):
    """install() puts Kiln's processors on every attention layer and the denoiser computes what it did with
    diffusers' processors."""
    from kiln.engine.backends.base import ExampleInputs

    spec = get_spec(model)
    loaded = load_model(spec, LaunchOptions(tiny=True, device="cpu"))
    family = make_family(spec.family, loaded.pipeline, loaded.device, loaded.dtype)
    inputs = ExampleInputs(family, 64, 96)(3)
    with torch.no_grad():
        before = family.denoiser(*inputs)
        assert attention.install(family.denoiser.model) == "sdpa"
        after = family.denoiser(*inputs)
    layers = [m for m in family.denoiser.model.modules() if hasattr(m, "set_processor")]
    assert layers and all(isinstance(layer.processor, processor) for layer in layers)
    assert attention.installed(family.denoiser.model) == "sdpa"
    assert torch.allclose(before, after, atol=1e-6), (before - after).abs().max()
