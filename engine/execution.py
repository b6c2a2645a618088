"""The tensor work of one loop iteration: initialise admitted jobs, step a lane, decode finished jobs.

Every batched piece of work (prompt encoding, the denoiser forward, the VAE decode) is pure, so a failure can
be retried in smaller pieces: halves on out-of-memory, job by job otherwise. Only the jobs that still fail alone
are reported to `fail`; their neighbours carry on. Per-job work (sampler steps, init) is isolated per job.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .families.base import Conditioning, Family
from .memory import BatchBudget
from .requests import Job
from .errors import InvalidRequest
from .samplers import SamplerFactory, step_accepts_generator

FailJob = Callable[[Job, BaseException], None]
Result = TypeVar("Result")


@dataclass
class Inpaint:
    """What the per-step mask blend needs: the clean image latents, the job's noise, the latent-layout mask."""

    image_latents: torch.Tensor
    noise: torch.Tensor
    mask: torch.Tensor


@dataclass
class JobState:
    """A job's tensors and sampler, owned by the scheduler thread."""

    latents: torch.Tensor
    sampler: Any
    timesteps: torch.Tensor
    generator: torch.Generator
    cond: Conditioning
    uncond: Conditioning | None
    guidance: float
    step_kwargs: dict
    inpaint: Inpaint | None = None
    previews_at: list[int] = field(default_factory=list)


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    message = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


class Executor:
    """Runs a plan's tensor work for one model through its family adapter."""

    def __init__(self, family: Family, budget: BatchBudget):
        self.family = family
        self.budget = budget
        self.samplers = SamplerFactory(family.pipeline.scheduler, family.spec.flow)
        self.forward_limit = budget.max_batch_size  # jobs per call at any size; lowered after an out-of-memory error
        self.on_forward: Callable[[int, float], None] | None = None  # (rows, seconds), for metrics

    # --- failure isolation --------------------------------------------------------------------------------
    def _isolated(
        self, jobs: list[Job], compute: Callable[[list[Job]], list[Result]], fail: FailJob
    ) -> dict[Job, Result]:
        """compute(jobs) -> one result per job, retried in halves on out-of-memory and job by job on other
        errors, so that only jobs failing on their own are failed."""
        try:
            return dict(zip(jobs, compute(jobs)))
        except Exception as error:  # noqa: BLE001 - any fault is contained to the jobs that cause it
            if len(jobs) == 1:
                fail(jobs[0], error)
                return {}
            if is_out_of_memory(error):
                half = len(jobs) // 2
                self.forward_limit = min(self.forward_limit, len(jobs) - 1)  # the largest size not yet refused
                parts = [jobs[:half], jobs[half:]]
            else:
                parts = [[job] for job in jobs]
            results: dict[Job, Result] = {}
            for part in parts:
                results.update(self._isolated(part, compute, fail))
            return results

    # --- admission ----------------------------------------------------------------------------------------
    def admit(self, jobs: list[Job], fail: FailJob) -> None:
        """Batched prompt encoding for newly admitted jobs, then each job's latents and sampler."""
        if not jobs:  # most steps admit nobody; encoding an empty batch raises inside the tokenizer
            return
        conditioning = self._isolated(jobs, self._encode, fail)
        for job, (cond, uncond) in conditioning.items():
            try:
                job.state = self._initial_state(job, cond, uncond)
                job.total_steps = len(job.state.timesteps)
            except Exception as error:  # noqa: BLE001
                fail(job, error)

    @torch.no_grad()
    def _encode(self, jobs: list[Job]) -> list[tuple[Conditioning, Conditioning | None]]:
        cond = self.family.encode_cached([job.prompt for job in jobs])
        cfg = [i for i, job in enumerate(jobs) if self.family.uses_cfg(job.request.guidance_scale)]
        uncond: list[Conditioning | None] = [None] * len(jobs)
        if cfg:
            texts = [jobs[i].request.negative_prompt for i in cfg]
            for i, negative in zip(cfg, self.family.encode_negatives(texts, [cond[i] for i in cfg])):
                uncond[i] = negative
        return list(zip(cond, uncond))

    @torch.no_grad()
    def _initial_state(self, job: Job, cond: Conditioning, uncond: Conditioning | None) -> JobState:
        family, request = self.family, job.request
        width, height = request.width, request.height
        generator = torch.Generator("cpu").manual_seed(job.seed)
        sampler = self.samplers.make(request.sampler)
        family.configure_sampler(sampler, request.steps, width, height)
        timesteps = sampler.timesteps
        size_cond = family.size_conditioning(width, height)
        cond = {**cond, **size_cond}
        uncond = {**uncond, **size_cond} if uncond is not None else None
        step_kwargs = {"generator": generator} if step_accepts_generator(sampler) else {}
        inpaint = None
        if request.image is None:
            latents = family.pack(family.noise(width, height, generator) * _init_noise_sigma(sampler))
        else:
            image_latents = family.encode_image(request.image, width, height, generator)
            strength = request.strength if request.strength is not None else (1.0 if request.mask else 0.8)
            start = (request.steps - min(int(request.steps * strength), request.steps)) * sampler.order
            timesteps = timesteps[start:]
            if len(timesteps) == 0:
                raise InvalidRequest(f"strength {strength} with {request.steps} steps leaves no step to run")
            if hasattr(sampler, "set_begin_index"):  # PNDM has none, as in diffusers' img2img
                sampler.set_begin_index(start)
            noise = family.pack(family.noise(width, height, generator))
            if request.mask is not None and strength >= 1.0:
                latents = noise * _init_noise_sigma(sampler)
            else:
                latents = _renoise(sampler, image_latents, noise, timesteps[:1])
            if request.mask is not None:
                inpaint = Inpaint(image_latents, noise, self._mask_latent(request.mask, width, height))
        return JobState(
            latents=latents, sampler=sampler, timesteps=timesteps, generator=generator, cond=cond, uncond=uncond,
            guidance=float(request.guidance_scale), step_kwargs=step_kwargs, inpaint=inpaint,
            previews_at=_preview_steps(request.preview_count, len(timesteps)),
        )

    def _mask_latent(self, mask: Image.Image, width: int, height: int) -> torch.Tensor:
        """White = repaint. Binarised at 0.5 and resized to the latent grid, as diffusers' inpaint pipelines do."""
        pixels = torch.from_numpy(np.array(mask.convert("L").resize((width, height), Image.Resampling.LANCZOS)))
        binary = (pixels.float() / 255.0 >= 0.5).float()[None, None]
        factor = self.family.vae_scale_factor
        small = F.interpolate(binary, size=(height // factor, width // factor))
        return self.family.mask_to_latent(small.to(self.family.device, self.family.dtype))

    # --- the step -------------------------------------------------------------------------------------------
    def _calls(self, jobs: list[Job]) -> list[list[Job]]:
        """A lane's jobs cut into the batches one forward or decode may hold at the lane's size."""
        request = jobs[0].request
        size = min(self.forward_limit, self.budget.jobs_per_call(request.width, request.height))
        return [jobs[start : start + size] for start in range(0, len(jobs), size)]

    def step(self, jobs: list[Job], fail: FailJob) -> None:
        """One denoising step for a lane: batched forwards (as many jobs each as memory allows), then every
        job's own sampler step."""
        predictions: dict[Job, torch.Tensor] = {}
        for chunk in self._calls(jobs):
            predictions.update(self._isolated(chunk, self._predict, fail))
        for job, prediction in predictions.items():
            try:
                self._advance(job, prediction)
            except Exception as error:  # noqa: BLE001
                fail(job, error)

    @torch.no_grad()
    def _predict(self, jobs: list[Job]) -> list[torch.Tensor]:
        rows_x, rows_t, rows_cond, rows_g = [], [], [], []
        for job in jobs:
            state = job.state
            t = state.timesteps[job.done_steps]
            scale = getattr(state.sampler, "scale_model_input", None)
            x = scale(state.latents, t) if scale else state.latents
            for cond in (state.uncond, state.cond) if state.uncond is not None else (state.cond,):
                rows_x.append(x)
                rows_t.append(t)
                rows_cond.append(cond)
                rows_g.append(state.guidance)
        family = self.family
        width, height = jobs[0].request.width, jobs[0].request.height
        started = time.perf_counter()
        output = family.denoise(
            torch.cat(rows_x),
            torch.stack([t.to(torch.float32) for t in rows_t]).to(family.device),
            {key: torch.cat([cond[key] for cond in rows_cond]) for key in rows_cond[0]},
            torch.tensor(rows_g, dtype=torch.float32, device=family.device),
            width,
            height,
        )
        if self.on_forward is not None:
            self.on_forward(len(rows_x), time.perf_counter() - started)
        predictions, row = [], 0
        for job in jobs:
            if job.state.uncond is not None:
                uncond, text = output[row : row + 1], output[row + 1 : row + 2]
                predictions.append(uncond + job.state.guidance * (text - uncond))
                row += 2
            else:
                predictions.append(output[row : row + 1])
                row += 1
        return predictions

    def _advance(self, job: Job, prediction: torch.Tensor) -> None:
        state = job.state
        t = state.timesteps[job.done_steps]
        state.latents = state.sampler.step(prediction, t, state.latents, return_dict=False, **state.step_kwargs)[0]
        if state.inpaint is not None:
            known = state.inpaint.image_latents
            if job.done_steps + 1 < len(state.timesteps):
                known = _renoise(state.sampler, known, state.inpaint.noise, state.timesteps[job.done_steps + 1 :][:1])
            mask = state.inpaint.mask
            state.latents = (1 - mask) * known + mask * state.latents
        job.done_steps += 1
        request, on_preview = job.request, job.handle.on_preview
        if job.done_steps in state.previews_at and on_preview is not None:
            number = state.previews_at.index(job.done_steps)
            on_preview(job.index, number, self.family.preview(state.latents, request.width, request.height))

    # --- decode ---------------------------------------------------------------------------------------------
    def decode(self, jobs: list[Job], fail: FailJob) -> dict[Job, Image.Image]:
        """Batched VAE decode of finished jobs (they share a lane, hence a size)."""
        if not jobs:
            return {}
        width, height = jobs[0].request.width, jobs[0].request.height
        images: dict[Job, Image.Image] = {}
        for chunk in self._calls(jobs):
            images.update(self._isolated(
                chunk, lambda part: self.family.decode(torch.cat([j.state.latents for j in part]), width, height), fail
            ))
        return images


def _renoise(sampler: Any, clean: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """Noise clean latents to `timestep`: flow-matching samplers interpolate, the others add scaled noise."""
    if hasattr(sampler, "scale_noise"):
        return sampler.scale_noise(clean, timestep, noise)
    return sampler.add_noise(clean, noise, timestep)


def _preview_steps(count: int, total: int) -> list[int]:
    """`count` step numbers spread over the run, each before the last step (the final image is not a preview)."""
    return sorted({min(total - 1, max(1, round(total * (k + 1) / (count + 1)))) for k in range(count)} - {0})


def _init_noise_sigma(sampler: Any) -> float:
    """Initial noise scale; flow-matching samplers start from unit noise and do not define it."""
    return getattr(sampler, "init_noise_sigma", 1.0)
