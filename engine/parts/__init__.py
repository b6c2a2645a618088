"""Per-job parts: features a job may carry (an image-to-image start, an inpainting blend, ControlNet units, per-row
LoRAs) that plug into the step through a few hooks instead of branches in the loop.

A part type is instantiated once per launched model, when the launch can use it (`enabled`); it may hold the
model's resources for the feature (a ControlNet's weights, LoRA slots). The executor calls its hooks on the
scheduler thread, for the jobs that use it (`used_by`), in the order of `PART_TYPES`:

    check(request)         at submit, any thread: refuse what this model cannot do for the request (400)
    admission()            each scheduling round: a gate that may keep a waiting job waiting (a LoRA not yet
                           resident); `release(job_id)` when an admitted job leaves
    lane_key(request)      at submit: what the part adds to the job's lane key (None: it shares lanes)
    encoder_context(req)   at admission: what changes how the job's prompts encode (the prompt cache keys on
                           it); `encoding(context)` is entered around the encoder call for those prompts
    prepare(state)         at admission, after the sampler, timesteps and conditioning exist and before the
                           default start noise is drawn (a part that sets `state.latents` provides the start)
    before_forward(batch)  before each batched denoiser forward: add or change the named inputs of its rows
    after_step(state)      after each of the job's sampler steps: transform its latents
    example_inputs(...)    at launch: forward inputs with the part's additions, for the backend's warm-up
    describe()             what the model's description shows of the part; `metrics()` what /metrics adds

`backends` names the backends that can run the part (None: all; `backends_for(options)` when it depends on the
launch, as LoRA's mode does); a launch whose parts some backend cannot run never gets that backend
(`unsupported_backends`). A request whose `part_inputs` name a part the model was not launched with is refused
(LoRA's part is there on every launch, so `lora: []` works everywhere and a named LoRA gets LoRA's own 400).
Adding a feature is a new module here plus an entry in `PART_TYPES`.
"""

from __future__ import annotations

from typing import Any

from ..backends import SPECIFIC_BACKENDS
from .base import Part
from .controlnet import ControlNet
from .init_image import InitImage
from .inpaint import InpaintBlend
from .lora import LoraPart

# Every part type, in hook order: ControlNet first (FLUX's control images take the job's generator before the
# image-to-image start does, as in diffusers), and the inpainting blend builds on the image-to-image start. LoRA
# only sets its rows' adapters before the forward and its prompts' encoding, so its place does not matter.
PART_TYPES: tuple[type[Part], ...] = (ControlNet, InitImage, InpaintBlend, LoraPart)

__all__ = ["PART_TYPES", "Part", "make_parts", "unsupported_backends"]


def make_parts(spec: Any, options: Any, family: Any) -> list[Part]:
    """The parts a launched model can use, one instance each, in hook order."""
    return [part_type(family, options, spec=spec) for part_type in PART_TYPES if part_type.enabled(spec, options)]


def unsupported_backends(spec: Any, options: Any) -> dict[str, str]:
    """backend -> why it cannot run this launch's parts (torch-light: from the part types, before loading)."""
    reasons: dict[str, str] = {}
    for part_type in PART_TYPES:
        if not part_type.enabled(spec, options):
            continue
        backends, why = part_type.backends_for(options)
        if backends is not None:
            for backend in SPECIFIC_BACKENDS:
                if backend not in backends:
                    reasons.setdefault(backend, why or f"{part_type.name} runs on {' or '.join(sorted(backends))}")
    return reasons
