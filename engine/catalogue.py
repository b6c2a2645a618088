"""The built-in models Kiln knows by name, with the defaults Xinference's registry gives them.

A catalogue entry is pure data: which family adapter runs it, where its weights live on the hub, what it can do,
and the defaults a request or a launch falls back to. Nothing here touches torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from .families.specs import FLUX, IMAGE2IMAGE, INPAINTING, MIN_SIZE, SD, SD3, SDXL, TEXT2IMAGE, FamilySpec

OCR = "ocr"


@dataclass(frozen=True)
class ControlNetSpec:
    """One ControlNet a model can be launched with (launch option `controlnet`): its name and hub repository."""

    name: str
    hub_id: str

    def describe(self) -> dict:
        """Xinference's controlnet spec entry."""
        return {"model_family": "controlnet", "model_name": self.name, "model_id": self.hub_id}


def controlnets(hub_ids: Mapping[str, str]) -> Mapping[str, ControlNetSpec]:
    """name -> hub id, as a catalogue entry's (or a registered model's) ControlNets."""
    return MappingProxyType({name: ControlNetSpec(name, hub_id) for name, hub_id in hub_ids.items()})


# ControlNets per architecture. SD1.5 and SDXL as Xinference's registry lists them; the turbo models take their
# base architecture's (sd-turbo is SD 2.1, so SD 1.5 ControlNets do not fit it). FLUX.1-dev ControlNets embed
# guidance, which FLUX.1-schnell has not: schnell has none here (a local one trained for it loads by path).
SD15_CONTROLNETS = controlnets({name: f"lllyasviel/sd-controlnet-{name}"
                                for name in ("canny", "mlsd", "hed", "scribble", "openpose", "normal", "seg")})
SD21_CONTROLNETS = controlnets({name: f"thibaud/controlnet-sd21-{name}-diffusers"
                                for name in ("canny", "depth", "hed", "openpose", "scribble")})
SDXL_CONTROLNETS = controlnets({name: f"diffusers/controlnet-{name}-sdxl-1.0" for name in ("canny", "depth", "zoe-depth")})
SD3_CONTROLNETS = controlnets({"canny": "InstantX/SD3-Controlnet-Canny", "pose": "InstantX/SD3-Controlnet-Pose",
                               "tile": "InstantX/SD3-Controlnet-Tile"})
FLUX_DEV_CONTROLNETS = controlnets({"canny": "InstantX/FLUX.1-dev-Controlnet-Canny",
                                    "depth": "Shakker-Labs/FLUX.1-dev-ControlNet-Depth"})


@dataclass(frozen=True)
class ModelSpec:
    """One catalogue model: its family, weights location, abilities and defaults."""

    name: str
    family: FamilySpec
    hub_id: str
    abilities: tuple[str, ...]
    default_size: tuple[int, int]  # (width, height)
    default_steps: int
    default_guidance: float
    default_dtype: str
    max_size: int  # largest width or height accepted, in pixels
    default_launch: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))
    engine: str = "diffusers"  # what runs it, as Xinference's model_engine names it
    # Request parameters under every request's own (a registered model's default_generate_config).
    default_parameters: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))
    builtin: bool = True  # False: registered by a user (engine.custom)
    controlnets: Mapping[str, ControlNetSpec] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def stride(self) -> int:
        return self.family.stride

    @property
    def min_size(self) -> int:
        return MIN_SIZE

    def describe(self) -> dict:
        """The JSON-ready description the server publishes for this model."""
        return {
            "model_name": self.name,
            "model_family": "stable_diffusion",
            "model_ability": list(self.abilities),
            "model_hub_id": self.hub_id,
            "default_size": f"{self.default_size[0]}x{self.default_size[1]}",
            "default_steps": self.default_steps,
            "default_guidance_scale": self.default_guidance,
            # Xinference's registration lists the ControlNets a launch may name (a launched model: the resident ones)
            "controlnet": [controlnet.describe() for controlnet in self.controlnets.values()] or None,
        }


_ALL = (TEXT2IMAGE, IMAGE2IMAGE, INPAINTING)

CATALOGUE: Mapping[str, ModelSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            ModelSpec("sd-turbo", SD, "stabilityai/sd-turbo", (TEXT2IMAGE,), (512, 512), 1, 0.0, "float16", 1024,
                      controlnets=SD21_CONTROLNETS),
            ModelSpec(
                "sdxl-turbo", SDXL, "stabilityai/sdxl-turbo", (TEXT2IMAGE,), (512, 512), 1, 0.0, "float16", 2048,
                controlnets=SDXL_CONTROLNETS,
            ),
            ModelSpec(
                "stable-diffusion-v1.5", SD, "runwayml/stable-diffusion-v1-5", _ALL, (512, 512), 50, 7.5,
                "float16", 1024, controlnets=SD15_CONTROLNETS,
            ),
            ModelSpec(
                "stable-diffusion-xl-base-1.0", SDXL, "stabilityai/stable-diffusion-xl-base-1.0", _ALL,
                (1024, 1024), 50, 5.0, "float16", 2048, controlnets=SDXL_CONTROLNETS,
            ),
            ModelSpec(
                "sd3-medium", SD3, "stabilityai/stable-diffusion-3-medium-diffusers", _ALL, (1024, 1024), 28, 7.0,
                "float16", 2048, MappingProxyType({"quantize_text_encoder": "text_encoder_3"}),
                controlnets=SD3_CONTROLNETS,
            ),
            ModelSpec(
                "FLUX.1-schnell", FLUX, "black-forest-labs/FLUX.1-schnell", _ALL, (1024, 1024), 4, 0.0,
                "bfloat16", 2048, MappingProxyType({"quantize_text_encoder": "text_encoder_2"}),
            ),
            ModelSpec(
                "FLUX.1-dev", FLUX, "black-forest-labs/FLUX.1-dev", _ALL, (1024, 1024), 28, 3.5, "bfloat16",
                2048, MappingProxyType({"quantize_text_encoder": "text_encoder_2"}), controlnets=FLUX_DEV_CONTROLNETS,
            ),
        )
    }
)


@dataclass(frozen=True)
class OcrSpec:
    """One OCR model: which engine runs it (`engine.ocr`), where its weights are, and what it is.

    OCR models are image models to Xinference's clients (`model_type` "image", ability "ocr") but share nothing
    with the diffusion families, so they have their own catalogue below and their own runner (`engine.ocr`).
    """

    name: str
    engine: str  # "onnxruntime" (PP-OCR, weights in the rapidocr wheel) or "transformers" (GOT-OCR2)
    hub_ids: tuple[str, ...]  # where the weights are looked for in the Hugging Face cache, in order
    description: str
    abilities: tuple[str, ...] = (OCR,)
    family: str = "ocr"
    default_launch: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def hub_id(self) -> str | None:
        return self.hub_ids[0] if self.hub_ids else None

    def describe(self) -> dict:
        return {
            "model_name": self.name,
            "model_family": "ocr",
            "model_ability": list(self.abilities),
            "model_hub_id": self.hub_id,
            "model_description": self.description,
        }


DEFAULT_OCR_MODEL = "PP-OCR"
OCR_CATALOGUE: Mapping[str, OcrSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            OcrSpec(
                "PP-OCR", "onnxruntime", (),
                "PaddleOCR PP-OCRv6 small text detection and recognition with the v2.0 direction classifier, on "
                "onnxruntime (CPU, or CUDA with onnxruntime-gpu). The weights ship inside the rapidocr wheel: "
                "nothing is downloaded. Line boxes and scores with kwargs {\"detail\": true}.",
            ),
            OcrSpec(
                "GOT-OCR2_0", "transformers", ("stepfun-ai/GOT-OCR-2.0-hf", "stepfun-ai/GOT-OCR2_0"),
                "StepFun GOT-OCR 2.0 through transformers: the -hf checkpoint (GotOcr2ForConditionalGeneration, "
                "CPU or CUDA, pages batched) or the original remote-code checkpoint (CUDA only). Weights are read "
                "from model_path or the Hugging Face cache, never downloaded. Kiln's tests run it only on a tiny "
                "random-weight -hf checkpoint; the real weights and the remote-code checkpoint are untested.",
            ),
        )
    }
)


def get_spec(name: str) -> ModelSpec:
    """Look a model up by catalogue name; the error lists what exists."""
    try:
        return CATALOGUE[name]
    except KeyError:
        raise KeyError(f"unknown model name {name!r}; catalogue models: {', '.join(CATALOGUE)}") from None
