"""What each tiny (and reference-size) checkpoint is made of: pure data, the recipes' free dimensions per
scale wired into the seven catalogue models with their real structural flags and sampler configs."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from diffusers import (
    AutoencoderKL,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PNDMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

from kiln.engine.catalogue import CATALOGUE


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
