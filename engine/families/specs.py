"""What each family is, as plain data: one `FamilySpec` per architecture, beside its adapter in this package.

The catalogue, the launch options, the request schema, the loaders and the backends all ask a family the same
questions (which stride, which pipeline class, which text encoders, which denoiser component, how many rows a
job brings). The answers live here, once, and torch-free, so the server and the CLI read them without loading
torch. The adapter (the torch side: encoding, the batched denoiser call, latents <-> pixels) is named by its
import path and imported only when a model is loaded (`kiln.engine.families.make_family`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

TEXT2IMAGE = "text2image"
IMAGE2IMAGE = "image2image"
INPAINTING = "inpainting"
MIN_SIZE = 64  # smallest width or height for every family: 8x8 latents


@dataclass(frozen=True)
class FamilySpec:
    """One architecture. `pipelines` maps each ability to its diffusers pipeline class: checkpoints hold the
    text2image one (what `model_index.json` names), the others are what Kiln's images are checked against."""

    name: str
    stride: int  # sizes are multiples of this: the VAE factor 8, times the 2x2 patching of SD3/FLUX
    flow: bool  # flow matching (SD3, FLUX): samples with FlowMatchEuler only
    cfg: bool  # guidance above 1 adds an unconditional row per job; False: guidance-distilled (FLUX)
    pipelines: Mapping[str, str]
    text_encoders: tuple[str, ...]  # pipeline component names
    denoiser: str  # the pipeline component that denoises: its weights folder
    adapter: str  # "module:Class" of the torch adapter, relative to this package
    max_sequence_length: int | None = None  # T5 tokens, fixed so that the text shape never splits a lane
    controlnet: str = ""  # the diffusers ControlNet model class that fits the denoiser
    # ability -> diffusers' ControlNet pipeline class: what Kiln's ControlNet images are checked against.
    controlnet_pipelines: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    lora_loader: str = ""  # the diffusers LoRA loader mixin whose lora_state_dict reads this family's LoRA files

    @property
    def rows_per_job(self) -> int:
        """Denoiser rows one job contributes at most: unconditional + conditional with CFG, else one."""
        return 2 if self.cfg else 1

    @property
    def pipeline(self) -> str:
        """The pipeline class a checkpoint of this family holds."""
        return self.pipelines[TEXT2IMAGE]

    def steps_kept(self, steps: int, strength: float) -> int:
        """How many of `steps` an image-to-image or inpainting job runs at `strength`, rounded as the family's
        diffusers pipelines round: UNet pipelines keep int(steps x strength), flow-matching ones (SD3, FLUX) skip
        int(steps - steps x strength), which keeps one more step whenever steps x strength is not whole."""
        if self.flow:
            return steps - int(max(steps - min(steps * strength, steps), 0))
        return min(int(steps * strength), steps)


def _pipelines(text2image: str, image2image: str, inpainting: str) -> Mapping[str, str]:
    return MappingProxyType({TEXT2IMAGE: text2image, IMAGE2IMAGE: image2image, INPAINTING: inpainting})


SD = FamilySpec(
    name="sd", stride=8, flow=False, cfg=True,
    pipelines=_pipelines("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                         "StableDiffusionInpaintPipeline"),
    text_encoders=("text_encoder",), denoiser="unet", adapter="sd:SDFamily", controlnet="ControlNetModel",
    controlnet_pipelines=_pipelines("StableDiffusionControlNetPipeline", "StableDiffusionControlNetImg2ImgPipeline",
                                    "StableDiffusionControlNetInpaintPipeline"),
    lora_loader="StableDiffusionLoraLoaderMixin",
)
SDXL = FamilySpec(
    name="sdxl", stride=8, flow=False, cfg=True,
    pipelines=_pipelines("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                         "StableDiffusionXLInpaintPipeline"),
    text_encoders=("text_encoder", "text_encoder_2"), denoiser="unet", adapter="sdxl:SDXLFamily",
    controlnet="ControlNetModel",
    controlnet_pipelines=_pipelines("StableDiffusionXLControlNetPipeline", "StableDiffusionXLControlNetImg2ImgPipeline",
                                    "StableDiffusionXLControlNetInpaintPipeline"),
    lora_loader="StableDiffusionXLLoraLoaderMixin",
)
SD3 = FamilySpec(
    name="sd3", stride=16, flow=True, cfg=True,
    pipelines=_pipelines("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline",
                         "StableDiffusion3InpaintPipeline"),
    text_encoders=("text_encoder", "text_encoder_2", "text_encoder_3"), denoiser="transformer",
    adapter="sd3:SD3Family", max_sequence_length=256, controlnet="SD3ControlNetModel",
    # diffusers' SD3 ControlNet inpainting pipeline is for inpainting ControlNets (mask as extra channels).
    controlnet_pipelines=MappingProxyType({TEXT2IMAGE: "StableDiffusion3ControlNetPipeline"}),
    lora_loader="SD3LoraLoaderMixin",
)
FLUX = FamilySpec(
    name="flux", stride=16, flow=True, cfg=False,
    pipelines=_pipelines("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline"),
    text_encoders=("text_encoder", "text_encoder_2"), denoiser="transformer", adapter="flux:FluxFamily",
    max_sequence_length=512, controlnet="FluxControlNetModel",
    controlnet_pipelines=_pipelines("FluxControlNetPipeline", "FluxControlNetImg2ImgPipeline",
                                    "FluxControlNetInpaintPipeline"),
    lora_loader="FluxLoraLoaderMixin",
)

FAMILY_SPECS: Mapping[str, FamilySpec] = MappingProxyType({spec.name: spec for spec in (SD, SDXL, SD3, FLUX)})
