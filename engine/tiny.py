"""Tiny random-weight checkpoints of every catalogue model, in real diffusers layout.

No weights can be downloaded where Kiln is developed and tested, yet the engine must run the real diffusers and
transformers code paths. So this module writes, for each catalogue model, a checkpoint directory that looks exactly
like the hub one (model_index.json, one subfolder per component, safetensors, tokenizer files, sampler config) and
mirrors the real model's structure and flags, only scaled down: it loads with the plain
`DiffusionPipeline.from_pretrained` and the same `engine.loading` path as real weights, and it builds in about a
second. The same recipes at real sizes (`REFERENCE_CONFIGS`) give random-weight models that cost what the real ones
cost, for GPU benchmarks without weights.

One recipe table per scale holds only the free dimensions; `_recipes` wires them into the seven models with the
real structural flags and sampler configs, and derives every dimension one component imposes on another (a UNet's
cross-attention width is its text encoder's width, and so on), so both scales stay consistent by construction.
"""

from __future__ import annotations

import functools
import importlib
import io
import json
import os
import shutil
import tempfile
import threading
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping

import sentencepiece
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxControlNetModel,
    FluxPipeline,
    FluxTransformer2DModel,
    PNDMScheduler,
    SD3ControlNetModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    T5EncoderModel,
    T5Tokenizer,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from kiln.engine.catalogue import CATALOGUE, get_spec
from kiln.engine.families.specs import FamilySpec

# Bump whenever the builder's output changes: it is part of the cache path, so old caches are never reused.
FORMAT_VERSION = 4
CONTROLNETS_FOLDER = "controlnets"  # <checkpoint>/controlnets/<name>: the tiny ControlNets of the model's catalogue names

# ---------------------------------------------------------------------------------------------------------------
# Recipes: pure data saying what to build.


@dataclass(frozen=True)
class Part:
    """A model or sampler component: the class that builds it and its config (as in its config.json)."""

    cls: type
    config: Mapping[str, Any]


@dataclass(frozen=True)
class TokenizerPart:
    """A tokenizer component: CLIP byte-level BPE or T5 sentencepiece, trained locally on a built-in corpus.

    The pad token differs between CLIP tokenizers as in the real checkpoints: OpenAI CLIP-L pads with
    <|endoftext|>, OpenCLIP (SD2, SDXL's second encoder) with "!".
    """

    kind: str  # "clip" or "t5"
    pad_token: str = "<|endoftext|>"
    model_max_length: int = 77


@dataclass(frozen=True)
class Recipe:
    """One checkpoint: the pipeline class, its components (None for an empty slot) and pipeline-level config."""

    pipeline: type
    parts: Mapping[str, Part | TokenizerPart | None]
    pipeline_config: Mapping[str, Any] = field(default_factory=dict)


CLIP_L_PAD = TokenizerPart("clip")
OPENCLIP_PAD = TokenizerPart("clip", pad_token="!")
T5_TOKENIZER = TokenizerPart("t5", pad_token="<pad>", model_max_length=512)

# Free dimensions of each component type, at real size. Everything else is wired in `_recipes`.
_REFERENCE_SIZES: Mapping[str, Mapping[str, Any]] = {
    "clip-l": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, projection_dim=768),
    "openclip-h": dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                       num_attention_heads=16, projection_dim=512),
    "openclip-g": dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                       num_attention_heads=20, projection_dim=1280),
    "t5-xxl": dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64),
    "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
    "unet-sd1": dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                     down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=8),
    "unet-sd2": dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                     down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=(5, 10, 20, 20)),
    "unet-sdxl": dict(block_out_channels=(320, 640, 1280), layers_per_block=2,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                      transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                      addition_time_embed_dim=256),
    "mmdit-sd3": dict(num_layers=24, attention_head_dim=64, num_attention_heads=24, pos_embed_max_size=192),
    "flux": dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                 axes_dims_rope=(16, 56, 56)),
}

# The same at tiny size: a few thousand to a few hundred thousand parameters per component. Head dims stay
# constant across UNet blocks where the real model's do (SD2, SDXL), the two SDXL/SD3 CLIP widths differ like the
# real ones so that mixing them up fails, and the SD3 patch grid still covers the catalogue's 2048 px.
# Every text-encoder Linear takes a multiple of 64 inputs: bitsandbytes' 4-bit CPU kernel on CPUs with
# avx512_bf16 repacks weights in blocks of 64 inputs and refuses other widths, and any text encoder may be
# quantized at launch.
_TINY_SIZES: Mapping[str, Mapping[str, Any]] = {
    "clip-l": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   projection_dim=32),
    "openclip-h": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       projection_dim=16),
    "openclip-g": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                       projection_dim=64),
    # SD3 pads the two CLIP widths, side by side, to T5's width: it must be at least their sum.
    "t5-xxl": dict(d_model=192, d_kv=32, d_ff=128, num_layers=2, num_heads=6),
    "vae": dict(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=8),
    # SD UNets are narrower than the others: the benchmark's 64 px CFG workload should be dominated, as on real
    # hardware with real models at small batch, by per-forward cost rather than arithmetic.
    "unet-sd1": dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4),
    "unet-sd2": dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4)),
    "unet-sdxl": dict(block_out_channels=(32, 64), layers_per_block=1,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                      transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), addition_time_embed_dim=8),
    "mmdit-sd3": dict(num_layers=2, attention_head_dim=8, num_attention_heads=4, pos_embed_max_size=128),
    "flux": dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                 axes_dims_rope=(4, 6, 6)),
}

# Sampler configs of the real checkpoints (their scheduler_config.json, minus keys the class ignores).
_SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 prediction_type="epsilon", steps_offset=1)
_SAMPLERS: Mapping[str, Part] = {
    "sd-turbo": Part(EulerDiscreteScheduler, dict(_SD_BETAS, timestep_spacing="trailing", interpolation_type="linear")),
    "stable-diffusion-v1.5": Part(PNDMScheduler, dict(_SD_BETAS, skip_prk_steps=True, set_alpha_to_one=False)),
    "sdxl-turbo": Part(EulerAncestralDiscreteScheduler, dict(_SD_BETAS, timestep_spacing="trailing")),
    "stable-diffusion-xl-base-1.0": Part(
        EulerDiscreteScheduler, dict(_SD_BETAS, timestep_spacing="leading", interpolation_type="linear")
    ),
    "sd3-medium": Part(FlowMatchEulerDiscreteScheduler, dict(num_train_timesteps=1000, shift=3.0)),
    "FLUX.1-schnell": Part(FlowMatchEulerDiscreteScheduler, dict(num_train_timesteps=1000, shift=1.0,
                                                                 use_dynamic_shifting=False)),
    "FLUX.1-dev": Part(FlowMatchEulerDiscreteScheduler, dict(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )),
}


def _recipes(size: Mapping[str, Mapping[str, Any]]) -> Mapping[str, Recipe]:
    """Wire one size table into the seven catalogue models with the real structural flags.

    Dimensions that one component imposes on another are derived here, never written twice.
    """
    clip_l = dict(size["clip-l"], hidden_act="quick_gelu", max_position_embeddings=77)
    openclip_h = dict(size["openclip-h"], hidden_act="gelu", max_position_embeddings=77)
    openclip_g = dict(size["openclip-g"], hidden_act="gelu", max_position_embeddings=77)
    t5 = dict(size["t5-xxl"], feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
              relative_attention_max_distance=128, layer_norm_epsilon=1e-6)

    def vae(**flags: Any) -> Part:
        blocks = len(size["vae"]["block_out_channels"])
        return Part(AutoencoderKL, dict(
            size["vae"], down_block_types=("DownEncoderBlock2D",) * blocks,
            up_block_types=("UpDecoderBlock2D",) * blocks, in_channels=3, out_channels=3, **flags,
        ))

    sd_vae = vae(latent_channels=4, scaling_factor=0.18215, sample_size=512)
    sdxl_vae = vae(latent_channels=4, scaling_factor=0.13025, sample_size=1024, force_upcast=True)
    flow_vae = dict(latent_channels=16, sample_size=1024, use_quant_conv=False, use_post_quant_conv=False)

    def sd(name: str, unet: str, encoder: Mapping[str, Any], tokenizer: TokenizerPart, **unet_flags: Any) -> Recipe:
        return Recipe(StableDiffusionPipeline, {
            "vae": sd_vae,
            "text_encoder": Part(CLIPTextModel, encoder),
            "tokenizer": tokenizer,
            "unet": Part(UNet2DConditionModel, dict(
                size[unet], sample_size=64, in_channels=4, out_channels=4,
                cross_attention_dim=encoder["hidden_size"], **unet_flags,
            )),
            "scheduler": _SAMPLERS[name],
            "safety_checker": None,
            "feature_extractor": None,
        }, {"requires_safety_checker": False})

    def sdxl(name: str, sample_size: int) -> Recipe:
        unet = size["unet-sdxl"]
        return Recipe(StableDiffusionXLPipeline, {
            "vae": sdxl_vae,
            "text_encoder": Part(CLIPTextModel, clip_l),
            "text_encoder_2": Part(CLIPTextModelWithProjection, openclip_g),
            "tokenizer": CLIP_L_PAD,
            "tokenizer_2": OPENCLIP_PAD,
            "unet": Part(UNet2DConditionModel, dict(
                unet, sample_size=sample_size, in_channels=4, out_channels=4, use_linear_projection=True,
                cross_attention_dim=clip_l["hidden_size"] + openclip_g["hidden_size"],
                addition_embed_type="text_time", addition_embed_type_num_heads=64,
                # SDXL conditions on six size/crop numbers plus the second encoder's pooled projection.
                projection_class_embeddings_input_dim=6 * unet["addition_time_embed_dim"] + openclip_g["projection_dim"],
            )),
            "scheduler": _SAMPLERS[name],
        }, {"force_zeros_for_empty_prompt": True})

    def sd3(name: str) -> Recipe:
        mmdit = size["mmdit-sd3"]
        return Recipe(StableDiffusion3Pipeline, {
            "transformer": Part(SD3Transformer2DModel, dict(
                mmdit, sample_size=128, patch_size=2, in_channels=16, out_channels=16,
                caption_projection_dim=mmdit["num_attention_heads"] * mmdit["attention_head_dim"],
                joint_attention_dim=t5["d_model"],
                pooled_projection_dim=clip_l["projection_dim"] + openclip_g["projection_dim"],
            )),
            "scheduler": _SAMPLERS[name],
            "vae": vae(**flow_vae, scaling_factor=1.5305, shift_factor=0.0609),
            "text_encoder": Part(CLIPTextModelWithProjection, clip_l),
            "tokenizer": CLIP_L_PAD,
            "text_encoder_2": Part(CLIPTextModelWithProjection, openclip_g),
            "tokenizer_2": OPENCLIP_PAD,
            "text_encoder_3": Part(T5EncoderModel, t5),
            "tokenizer_3": T5_TOKENIZER,
        })

    def flux(name: str, guidance_embeds: bool) -> Recipe:
        return Recipe(FluxPipeline, {
            "scheduler": _SAMPLERS[name],
            "vae": vae(**flow_vae, scaling_factor=0.3611, shift_factor=0.1159),
            "text_encoder": Part(CLIPTextModel, clip_l),
            "tokenizer": CLIP_L_PAD,
            "text_encoder_2": Part(T5EncoderModel, t5),
            "tokenizer_2": T5_TOKENIZER,
            "transformer": Part(FluxTransformer2DModel, dict(
                size["flux"], patch_size=1, in_channels=64, guidance_embeds=guidance_embeds,
                joint_attention_dim=t5["d_model"], pooled_projection_dim=clip_l["hidden_size"],
            )),
        })

    return MappingProxyType({
        "sd-turbo": sd("sd-turbo", "unet-sd2", openclip_h, OPENCLIP_PAD, use_linear_projection=True),
        "sdxl-turbo": sdxl("sdxl-turbo", sample_size=64),
        "stable-diffusion-v1.5": sd("stable-diffusion-v1.5", "unet-sd1", clip_l, CLIP_L_PAD),
        "stable-diffusion-xl-base-1.0": sdxl("stable-diffusion-xl-base-1.0", sample_size=128),
        "sd3-medium": sd3("sd3-medium"),
        "FLUX.1-schnell": flux("FLUX.1-schnell", guidance_embeds=False),
        "FLUX.1-dev": flux("FLUX.1-dev", guidance_embeds=True),
    })


TINY_CONFIGS: Mapping[str, Recipe] = _recipes(_TINY_SIZES)
REFERENCE_CONFIGS: Mapping[str, Recipe] = _recipes(_REFERENCE_SIZES)
assert set(TINY_CONFIGS) == set(CATALOGUE), "every catalogue model needs a tiny recipe"

# ---------------------------------------------------------------------------------------------------------------
# Tokenizers, trained once per process on a built-in corpus of prompt-like English.

_SUBJECTS = ("a cat", "an astronaut", "a red fox", "the old lighthouse", "two children", "a bowl of fruit",
             "a dragon", "my grandmother", "a vintage car", "the city skyline", "a robot", "an owl", "a sailing ship",
             "a mountain village", "three horses", "a bicycle", "the forest", "a cup of coffee", "a knight", "Paris")
_MODIFIERS = ("sitting on a chair", "riding a horse", "in the rain", "at sunset", "under the stars",
              "on the moon", "by the sea", "in a garden", "made of glass", "covered in snow", "with flowers",
              "in front of a castle", "during a storm", "on a wooden table", "near the river")
_STYLES = ("photograph, 35mm, film grain", "oil painting by a famous artist", "digital art, highly detailed",
           "watercolor illustration", "studio lighting, 8k, sharp focus", "anime style, vibrant colors",
           "pencil sketch, black and white", "cinematic, dramatic light", "isometric 3D render",
           "portrait, soft bokeh, 85mm lens", "trending on artstation", "low poly, pastel colours")
# Every character class once, so neither tokenizer needs an unknown token for plain ASCII prompts.
_ALPHABET = ("The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG! "
             "0123456789 (x2) [high quality], {wide}: 'yes'; \"no\" - a/b @ #1 $5 % & * + = ? ~ ` ^ | \\ < >")


def _corpus() -> list[str]:
    """Deterministic prompt-like sentences: every subject with several modifiers and styles, plus the alphabet."""
    lines = [_ALPHABET]
    for i, subject in enumerate(_SUBJECTS):
        for j in range(6):
            modifier = _MODIFIERS[(i + 4 * j) % len(_MODIFIERS)]
            style = _STYLES[(3 * i + j) % len(_STYLES)]
            lines.append(f"{subject} {modifier}, {style}")
            lines.append(f"{subject.capitalize()} {modifier}.")
    return lines


_CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def _clip_words() -> Counter[tuple[str, ...]]:
    """The corpus split into byte-level words exactly as transformers' CLIPTokenizer splits text (its own
    normaliser and pre-tokenizer), each word a tuple of byte symbols, the last one with CLIP's end-of-word </w>."""
    backend = CLIPTokenizer().backend_tokenizer
    words: Counter[tuple[str, ...]] = Counter()
    for line in _corpus():
        for word, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(line)):
            words[(*word[:-1], word[-1] + "</w>")] += 1
    return words


def _merge_pair(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged, i = [], 0
    while i < len(word):
        if word[i : i + 2] == pair:
            merged.append(pair[0] + pair[1])
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return tuple(merged)


@functools.cache
def _clip_vocab_and_merges() -> tuple[dict[str, int], tuple[str, ...]]:
    """Learn byte-level BPE merges and lay the vocabulary out as OpenAI CLIP does.

    A plain BPE learner, because the `tokenizers` trainer breaks ties between equally frequent pairs differently
    in every process and so would change the checkpoint bytes; here ties go to the smallest pair. CLIP's vocab is
    the 256 byte symbols, the same with the end-of-word suffix </w>, one token per merge, then <|startoftext|> and
    <|endoftext|> last (so the end token has the highest id, as CLIP's pooling assumes).
    """
    words = _clip_words()
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        best = min(pairs, key=lambda pair: (-pairs[pair], pair), default=None)
        if best is None or pairs[best] < 2:
            break
        merges.append(best)
        words = Counter({_merge_pair(word, best): count for word, count in words.items()})
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges] + list(_CLIP_SPECIALS)
    return {token: i for i, token in enumerate(tokens)}, tuple(f"{a} {b}" for a, b in merges)


@functools.cache
def _t5_spiece_model() -> bytes:
    """Train a sentencepiece unigram model with T5's special ids: pad 0, eos 1, unk 2, no bos."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        # vocab_size is an upper bound (hard_vocab_limit=False): the small corpus yields what it can.
        sentence_iterator=iter(_corpus()), model_writer=model, model_type="unigram", vocab_size=400,
        hard_vocab_limit=False, character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        num_threads=1, minloglevel=2,
    )
    return model.getvalue()


def _tokenizer_files(part: TokenizerPart) -> dict[str, bytes]:
    """The files of a tokenizer folder, named as in the real checkpoints."""
    if part.kind == "clip":
        vocab, merges = _clip_vocab_and_merges()
        special = {"bos_token": _CLIP_SPECIALS[0], "eos_token": _CLIP_SPECIALS[1], "unk_token": _CLIP_SPECIALS[1],
                   "pad_token": part.pad_token}
        files = {"vocab.json": json.dumps(vocab), "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n"}
        config = dict(special, tokenizer_class="CLIPTokenizer", do_lower_case=True, errors="replace")
    else:
        special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": part.pad_token}
        files = {"spiece.model": _t5_spiece_model()}
        config = dict(special, tokenizer_class="T5Tokenizer", extra_ids=100)
    config["model_max_length"] = part.model_max_length
    files["tokenizer_config.json"] = json.dumps(config, indent=2, sort_keys=True)
    files["special_tokens_map.json"] = json.dumps(special, indent=2, sort_keys=True)
    return {name: content.encode() if isinstance(content, str) else content for name, content in files.items()}


def _write_tokenizer(part: TokenizerPart, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in _tokenizer_files(part).items():
        (folder / name).write_bytes(content)


@functools.cache
def _tokenizer(part: TokenizerPart) -> PreTrainedTokenizerBase:
    """The tokenizer object, loaded from its files exactly as a pipeline load would (transformers 5 ignores
    vocab/merges paths given to the constructor, so `from_pretrained` on a folder is the only faithful check)."""
    cls = CLIPTokenizer if part.kind == "clip" else T5Tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        _write_tokenizer(part, Path(tmp))
        return cls.from_pretrained(tmp)


# ---------------------------------------------------------------------------------------------------------------
# Building.


def _token_ids(config: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """A text encoder's config with the vocabulary size and special ids its tokenizer really produces."""
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    vocab_size = max(config.get("vocab_size", 0), len(tokenizer))
    return dict(config, vocab_size=vocab_size, **{key: value for key, value in ids.items() if value is not None})


# Weights come from torch's global generator, seeded per component: builds in two threads at once would interleave
# draws and lose determinism, so construction is serialised.
_SEEDED_INIT = threading.Lock()


def _instantiate(name: str, part: Part, config: Mapping[str, Any], dtype: torch.dtype, device: str):
    """Build one component with weights seeded by its name, so every build gives the same bytes."""
    if not issubclass(part.cls, torch.nn.Module):
        return part.cls.from_config(dict(config))
    with _SEEDED_INIT, torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(zlib.crc32(name.encode()))
        if issubclass(part.cls, PreTrainedModel):
            model = part.cls(part.cls.config_class(**config))
        else:
            model = part.cls.from_config(dict(config))
    # Skipping the no-op cast to float32 spares a diffusers warning about casting with `to()`.
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def instantiate_component(recipe: Recipe, name: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """One component of a recipe, without writing anything: e.g. a reference denoiser on the meta device."""
    part = recipe.parts[name]
    config = part.config
    if name.startswith("text_encoder"):
        config = _token_ids(config, _tokenizer(recipe.parts[name.replace("text_encoder", "tokenizer")]))
    return _instantiate(name, part, config, dtype, device)


# ---------------------------------------------------------------------------------------------------------------
# Tiny ControlNets, made from the tiny denoiser as ControlNets are trained from theirs (the encoder copied).
# The layers a ControlNet zero-initialises (its output projections, and the control input's embedding for SD3 and
# FLUX) are drawn at random instead: a ControlNet made from config adds exactly zero, and every test of it would
# pass vacuously. Weights are drawn at unit gain for their fan-in (biases small), and the SD/SDXL control-image
# encoder is redrawn at a gain that keeps its signal through SiLU (slope 1/2 at 0): at PyTorch's default init its
# seven convolutions shrink the image's signal so much that the control image would barely matter.
def _randomise(module: torch.nn.Module, gain: float) -> None:
    for layer in module.modules():
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
            fan_in = layer.weight[0].numel()
            layer.weight.normal_(0.0, gain / fan_in**0.5)
            if layer.bias is not None:
                layer.bias.normal_(0.0, 0.02)


def _zero_initialised(controlnet: torch.nn.Module) -> list[torch.nn.Module]:
    if isinstance(controlnet, ControlNetModel):
        return [controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                controlnet.controlnet_cond_embedding.conv_out]
    if isinstance(controlnet, SD3ControlNetModel):
        return [controlnet.controlnet_blocks, controlnet.pos_embed_input]
    return [controlnet.controlnet_blocks, controlnet.controlnet_single_blocks, controlnet.controlnet_x_embedder]


def make_controlnet(denoiser: torch.nn.Module, family: FamilySpec, name: str) -> torch.nn.Module:
    """A small ControlNet for `denoiser` (the family's own ControlNet class), seeded by `name`, its
    zero-initialised layers randomised."""
    with _SEEDED_INIT, torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(f"controlnet-{name}".encode()))
        config = dict(denoiser.config)
        if family.controlnet == "ControlNetModel":
            # One stride-2 stage per VAE downsampling: the control image enters at latent size.
            controlnet = ControlNetModel.from_unet(denoiser, conditioning_embedding_out_channels=(4, 8, 8, 16))
        elif family.controlnet == "SD3ControlNetModel":
            controlnet = SD3ControlNetModel.from_config({**config, "num_layers": 1, "extra_conditioning_channels": 0})
            for part in ("pos_embed", "time_text_embed", "context_embedder"):
                getattr(controlnet, part).load_state_dict(getattr(denoiser, part).state_dict())
            controlnet.transformer_blocks.load_state_dict(denoiser.transformer_blocks.state_dict(), strict=False)
        else:
            controlnet = FluxControlNetModel.from_transformer(
                denoiser, num_layers=1, num_single_layers=1, attention_head_dim=config["attention_head_dim"],
                num_attention_heads=config["num_attention_heads"],
            )
        with torch.no_grad():
            if isinstance(controlnet, ControlNetModel):
                _randomise(controlnet.controlnet_cond_embedding, 2.5)
            for module in _zero_initialised(controlnet):
                _randomise(module, 1.0)
    return controlnet.eval()


def _build(recipe: Recipe, directory: Path, dtype: torch.dtype, device: str,
           controlnets: Iterable[str] = ()) -> Path:
    """Write a checkpoint: model_index.json from the assembled pipeline, then each component's own files, then
    the tiny ControlNets named (under controlnets/<name>)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    components: dict[str, Any] = {}
    for name, part in recipe.parts.items():
        if isinstance(part, TokenizerPart):
            _write_tokenizer(part, directory / name)
            components[name] = _tokenizer(part)
        elif part is None:
            components[name] = None
        else:
            components[name] = instantiate_component(recipe, name, dtype, device)
            components[name].save_pretrained(directory / name)
    # Assembling the pipeline checks the components fit together and yields the real model_index.json.
    recipe.pipeline(**components, **recipe.pipeline_config).save_config(directory)
    family = next(spec.family for spec in CATALOGUE.values() if spec.family.pipeline == recipe.pipeline.__name__)
    for name in controlnets:
        make_controlnet(components[family.denoiser], family, name).save_pretrained(directory / CONTROLNETS_FOLDER / name)
    return directory


def build_tiny(model_name: str, directory: Path) -> Path:
    """Build the tiny checkpoint of one catalogue model, with a tiny ControlNet for each of its catalogue
    ControlNet names, into `directory` (created if needed); returns it."""
    spec = get_spec(model_name)
    return _build(TINY_CONFIGS[spec.name], directory, torch.float32, "cpu", controlnets=spec.controlnets)


def build_reference(model_name: str, directory: Path, dtype: torch.dtype = torch.float16, device: str = "cpu") -> Path:
    """Build a real-size, random-weight checkpoint of one catalogue model, for benchmarks at true cost.

    FLUX needs about 48 GB of memory while building (float32 init, then cast); pass device="cuda" on a GPU
    machine to build there.
    """
    return _build(REFERENCE_CONFIGS[get_spec(model_name).name], directory, dtype, device)


def build_all(directory: Path, names: Iterable[str] | None = None, loras: bool = True) -> list[Path]:
    """Build the tiny checkpoints of `names` (default: the whole catalogue) into directory/<name>, and their
    tiny LoRAs into directory/loras/<name>/ (unless loras=False).

    Every name is checked first, so a typo fails before anything is written.
    """
    specs = [get_spec(name) for name in (names or CATALOGUE)]
    paths = []
    for spec in specs:
        paths.append(build_tiny(spec.name, Path(directory) / spec.name))
        if loras:
            build_tiny_loras(spec.name, paths[-1], Path(directory) / "loras" / spec.name)
            paths.append(Path(directory) / "loras" / spec.name)
    return paths


def default_cache_root() -> Path:
    """$KILN_CACHE/tiny, else ~/.cache/kiln/tiny."""
    base = os.environ.get("KILN_CACHE")
    return Path(base) / "tiny" if base else Path.home() / ".cache" / "kiln" / "tiny"


def tiny_checkpoint(model_name: str, cache_root: Path | None = None) -> Path:
    """The cached tiny checkpoint of a catalogue model, built on first use.

    Builds go to a temporary folder beside the target and are renamed into place, so concurrent processes never
    see a half-written checkpoint; a process that loses the race discards its copy and uses the winner's.
    """
    target = Path(cache_root or default_cache_root()) / f"v{FORMAT_VERSION}" / get_spec(model_name).name
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build_tiny(model_name, staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------------------------
# Tiny LoRAs: made with peft on the tiny checkpoints, saved as people's files are.

# Layers the tiny LoRAs adapt, by family: attention everywhere, and the feed-forward and resnet convolutions where
# the family has them, so every kind of slot layer (Linear, 1x1 and 3x3 Conv2d) is exercised.
LORA_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_JOINT = ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
LORA_DENOISER_TARGETS: Mapping[str, list[str]] = {
    "sd": [*LORA_ATTENTION, "ff.net.0.proj", "ff.net.2", "proj_in", "conv1", "conv2"],
    "sdxl": [*LORA_ATTENTION, "ff.net.0.proj", "ff.net.2", "proj_in", "conv1", "conv2"],
    "sd3": [*LORA_ATTENTION, *LORA_JOINT, "ff.net.2"],
    "flux": [*LORA_ATTENTION, *LORA_JOINT, "proj_mlp"],
}
LORA_TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


@dataclass(frozen=True)
class LoraRecipe:
    """One tiny LoRA: rank and alpha (alpha != rank, so the alpha/r factor is tested) per component kind;
    `kohya` saves it in kohya/A1111 keys (through diffusers' own converter) instead of diffusers/peft ones."""

    rank: int
    alpha: float
    denoiser: tuple[str, ...] | None = None  # None: the family's default targets; (): no denoiser weights
    text: bool = False
    kohya: bool = False


TINY_LORAS: Mapping[str, LoraRecipe] = {
    "style": LoraRecipe(rank=4, alpha=8),  # the denoiser's attention, feed-forward and convolutions
    "detail": LoraRecipe(rank=8, alpha=16, denoiser=("to_q", "to_v", "to_out.0")),  # another rank, fewer layers
    "text": LoraRecipe(rank=4, alpha=6, denoiser=(), text=True),  # every LoRA-loadable text encoder only
}
KOHYA_LORA = ("kohya", LoraRecipe(rank=4, alpha=4, text=True, kohya=True))  # SD1.5 only
LORA_FORMAT_VERSION = 1  # bump whenever the tiny LoRAs change: part of their cache path


def tiny_lora_recipes(model_name: str) -> Mapping[str, LoraRecipe]:
    spec = get_spec(model_name)
    return {**TINY_LORAS, **(dict([KOHYA_LORA]) if spec.name == "stable-diffusion-v1.5" else {})}


def build_tiny_loras(model_name: str, checkpoint: Path, directory: Path) -> list[Path]:
    """Write the tiny LoRAs of one model (made for its tiny checkpoint) into `directory`: <name>.safetensors."""
    return [write_lora(model_name, checkpoint, name, recipe, directory)
            for name, recipe in tiny_lora_recipes(model_name).items()]


def write_lora(model_name: str, checkpoint: Path, name: str, recipe: LoraRecipe, directory: Path) -> Path:
    """One LoRA made with peft on the checkpoint's components, saved as <directory>/<name>.safetensors.

    peft's default init makes B zero, a LoRA that changes nothing and lets every test pass; this uses
    `init_lora_weights=False` (A and B both random), seeded by model and LoRA name so every build is the same."""
    from diffusers import DiffusionPipeline
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    spec = get_spec(model_name)
    family = spec.family
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pipeline = DiffusionPipeline.from_pretrained(checkpoint)
    loader = getattr(importlib.import_module("diffusers.loaders"), family.lora_loader)
    targets = {family.denoiser: list(LORA_DENOISER_TARGETS[family.name] if recipe.denoiser is None
                                     else recipe.denoiser)}
    if recipe.text:
        targets.update({c: LORA_TEXT_TARGETS for c in loader._lora_loadable_modules if c != family.denoiser})
    layers, metadata = {}, {}
    with _SEEDED_INIT, torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(f"{spec.name}/{name}".encode()))
        for component, modules in targets.items():
            if not modules:
                continue
            config = LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, target_modules=modules,
                                init_lora_weights=False)
            model = getattr(pipeline, component)
            model.add_adapter(config)
            layers[component] = get_peft_model_state_dict(model)
            metadata[component] = config.to_dict()
    path = directory / f"{name}.safetensors"
    if recipe.kohya:
        peft_keys = {f"{c}.{key}": value for c, state in layers.items() for key, value in state.items()}
        save_file({k: v.contiguous() for k, v in convert_state_dict_to_kohya(peft_keys).items()}, path)
    else:
        type(pipeline).save_lora_weights(
            directory, weight_name=path.name, **{f"{c}_lora_layers": state for c, state in layers.items()},
            **{f"{c}_lora_adapter_metadata": meta for c, meta in metadata.items()},
        )
    return path


def tiny_loras(model_name: str, cache_root: Path | None = None) -> Path:
    """The cached folder of a catalogue model's tiny LoRAs (built on first use, like `tiny_checkpoint`)."""
    root = Path(cache_root or default_cache_root())
    target = root / f"v{FORMAT_VERSION}" / f"loras-v{LORA_FORMAT_VERSION}" / get_spec(model_name).name
    if all((target / f"{name}.safetensors").is_file() for name in tiny_lora_recipes(model_name)):
        return target
    checkpoint = tiny_checkpoint(model_name, cache_root)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build_tiny_loras(model_name, checkpoint, staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "style.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
