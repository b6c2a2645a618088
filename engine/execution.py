"""The tensor work of one loop iteration: `Executor.execute(plan) -> StepResult`.

In plan order: free the state of dropped jobs; decode the jobs that finished; admit the new ones (their prompts
encoded in one batch through the prompt cache, then each job's generator, sampler, conditioning, guidance,
parts and start latents); step the lane (batched denoiser forwards, then each job's own sampler step, its
parts' after-step hooks and its previews).

Every batched piece of work (prompt encoding, the forward, the decode) is pure, so a failure is retried in
smaller pieces: halves on out-of-memory, job by job otherwise. Only the jobs that still fail alone are reported
in the result; their neighbours carry on. Per-job work (initialisation, sampler steps) is isolated per job.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, TypeVar

import torch

from .errors import EngineError, InvalidRequest, RequestAborted
from .families.base import Conditioning, Family
from .memory import BatchBudget
from .parts import Part
from .parts.guidance import ClassifierFree, Guidance, SingleRow
from .prompts import PromptCache, PromptKey
from .requests import JobSpec
from .samplers import SamplerFactory, init_noise_sigma, step_accepts_generator
from .scheduler import Call, StepPlan, StepResult

log = logging.getLogger("kiln.engine")
Result = TypeVar("Result")
_ENGINE_ERRORS = (InvalidRequest, RequestAborted, EngineError)


@dataclass(eq=False)
class JobState:
    """A job's tensors and sampler, owned by the scheduler thread. `step` counts the sampler steps taken;
    `parts` holds each part's data for this job, `uses` the parts it uses, in hook order."""

    job: JobSpec
    generator: torch.Generator
    sampler: Any
    timesteps: torch.Tensor
    cond: Conditioning
    uncond: Conditioning | None
    guidance: Guidance
    step_kwargs: dict
    uses: list[Part]
    parts: dict[str, Any] = field(default_factory=dict)
    latents: torch.Tensor | None = None
    previews_at: list[int] = field(default_factory=list)
    step: int = 0


@dataclass
class ForwardBatch:
    """One batched denoiser forward: its rows (a job and which of its rows, "cond" or "uncond") and the named
    inputs built from them, which parts' `before_forward` hooks may change or add to for their rows."""

    rows: list[tuple[JobState, str]]
    inputs: dict[str, torch.Tensor]
    width: int
    height: int

    def rows_using(self, part: Part) -> list[int]:
        return [index for index, (state, _) in enumerate(self.rows) if part in state.uses]


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    message = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


class Executor:
    """Runs plans' tensor work for one model through its family adapter and its parts."""

    def __init__(self, family: Family, budget: BatchBudget, parts: list[Part]):
        self.family = family
        self.budget = budget
        self.parts = parts
        self.samplers = SamplerFactory(family.pipeline.scheduler, family.spec.flow)
        self.prompts = PromptCache()
        self.forward_limit = budget.max_batch_size  # jobs per call at any size; lowered after an out-of-memory error
        self.states: dict[int, JobState] = {}  # by job id
        self._result = StepResult()

    def execute(self, plan: StepPlan) -> StepResult:
        self._result = result = StepResult()
        for job_id in plan.dropped:
            self._free(job_id)
        with self._timed("decode"):
            self._decode([self.states[i] for i in plan.decode if i in self.states])
        with self._timed("admit"):
            self._admit(list(plan.admitted))
        stepping = [self.states[i] for i in plan.step if i in self.states]
        if stepping:
            result.step_started = time.monotonic()
            with self._timed("step"):
                self._step(stepping)
        return result

    # --- failure isolation --------------------------------------------------------------------------------
    def _fail(self, state_or_job: JobState | JobSpec, error: BaseException) -> None:
        """A job's fault fails its own request only, with the error's message; its state is freed."""
        job = state_or_job.job if isinstance(state_or_job, JobState) else state_or_job
        if not isinstance(error, _ENGINE_ERRORS):
            log.warning("request %s failed: %r", job.request_id, error, exc_info=error)
            error = EngineError(f"{type(error).__name__}: {error}")
        self._result.failed[job.id] = error
        self._free(job.id)

    def _free(self, job_id: int) -> None:
        """Forget a job's state; its parts release what they held for it (a LoRA slot)."""
        self.states.pop(job_id, None)
        for part in self.parts:
            part.release(job_id)

    def _isolated(self, items: list, compute: Callable[[list], list[Result]]) -> dict[Any, Result]:
        """compute(items) -> one result per item, retried in halves on out-of-memory and one by one on other
        errors, so that only items failing on their own are failed."""
        try:
            return dict(zip(items, compute(items)))
        except Exception as error:  # noqa: BLE001 - any fault is contained to the jobs that cause it
            if len(items) == 1:
                self._fail(items[0], error)
                return {}
            if is_out_of_memory(error):
                half = len(items) // 2
                self.forward_limit = min(self.forward_limit, len(items) - 1)  # the largest size not yet refused
                pieces = [items[:half], items[half:]]
            else:
                pieces = [[item] for item in items]
            results: dict[Any, Result] = {}
            for piece in pieces:
                results.update(self._isolated(piece, compute))
            return results

    def _timed(self, phase: str):
        return _Timer(self._result.seconds, phase)

    def _call(self, component: str, items: int, width: int = 0, height: int = 0):
        """Time one component call into the result's calls."""
        return _Timer(None, component, lambda seconds: self._result.calls.append(
            Call(component, items, seconds, width, height)))

    # --- admission ----------------------------------------------------------------------------------------
    def _admit(self, jobs: list[JobSpec]) -> None:
        """Batched prompt encoding of newly admitted jobs, then each job's initial state."""
        if not jobs:
            return
        uses = {job.id: [part for part in self.parts if part.used_by(job.request)] for job in jobs}
        conditioning = self._isolated(jobs, lambda some: self._encode(some, uses))
        for job, (cond, uncond) in conditioning.items():
            try:
                state = self._initial_state(job, uses[job.id], cond, uncond)
            except Exception as error:  # noqa: BLE001
                self._fail(job, error)
                continue
            self.states[job.id] = state
            self._result.admitted[job.id] = len(state.timesteps)

    def _guidance(self, job: JobSpec) -> Guidance:
        scale = job.request.guidance_scale
        return ClassifierFree(float(scale)) if self.family.uses_cfg(scale) else SingleRow()

    @torch.no_grad()
    def _encode(self, jobs: list[JobSpec], uses: dict[int, list[Part]]) -> list[tuple[Conditioning, Conditioning | None]]:
        """Each job's conditional and (with CFG) unconditional rows, from the prompt cache; what is missing is
        encoded in one call per encoder context."""
        keys: dict[int, tuple[PromptKey, PromptKey | None]] = {}
        for job in jobs:
            context = tuple((part.name, c) for part in uses[job.id]
                            if (c := part.encoder_context(job.request)) is not None)
            negative = job.request.negative_prompt
            wants_negative = len(self._guidance(job).rows) == 2 and not (negative is None and self.family.zero_negative)
            keys[job.id] = ((context, job.prompt), (context, negative or "") if wants_negative else None)
        wanted = [key for pair in keys.values() for key in pair if key is not None]
        missing = self.prompts.missing(wanted)
        for context in dict.fromkeys(context for context, _ in missing):
            texts = [text for c, text in missing if c == context]
            with self._encoding(context), self._call("encode", len(texts)):
                rows = self.family.encode(texts)
            for text, row in zip(texts, rows):
                self.prompts.put((context, text), row)
        found = dict(zip(wanted, self.prompts.take(wanted)))
        pairs = []
        for job in jobs:
            positive, negative = keys[job.id]
            cond = found[positive]
            if negative is not None:
                uncond = found[negative]
            elif len(self._guidance(job).rows) == 2:  # CFG without a negative prompt on a zero-negative family
                uncond = {key: torch.zeros_like(value) for key, value in cond.items()}
            else:
                uncond = None
            pairs.append((cond, uncond))
        return pairs

    def _encoding(self, context: tuple[tuple[str, Hashable], ...]):
        """The parts' text-encoder set-up for `context`, entered together."""
        stack = ExitStack()
        by_name = {part.name: part for part in self.parts}
        for name, value in context:
            stack.enter_context(by_name[name].encoding(value))
        return stack

    @torch.no_grad()
    def _initial_state(self, job: JobSpec, uses: list[Part], cond: Conditioning,
                       uncond: Conditioning | None) -> JobState:
        family, request = self.family, job.request
        width, height = request.width, request.height
        generator = torch.Generator("cpu").manual_seed(job.seed)
        sampler = self.samplers.make(request.sampler)
        family.configure_sampler(sampler, request.steps, width, height)
        size_cond = family.size_conditioning(width, height)
        state = JobState(
            job=job, generator=generator, sampler=sampler, timesteps=sampler.timesteps, cond={**cond, **size_cond},
            uncond={**uncond, **size_cond} if uncond is not None else None, guidance=self._guidance(job),
            step_kwargs={"generator": generator} if step_accepts_generator(sampler) else {}, uses=uses,
        )
        for part in uses:
            part.prepare(state)
        if state.latents is None:
            state.latents = family.pack(family.noise(width, height, generator) * init_noise_sigma(sampler))
        state.previews_at = _preview_steps(request.preview_count, len(state.timesteps))
        return state

    # --- the step -------------------------------------------------------------------------------------------
    def _chunks(self, states: list[JobState]) -> list[list[JobState]]:
        """A lane's jobs cut into the batches one forward or decode may hold at the lane's size."""
        request = states[0].job.request
        size = min(self.forward_limit, self.budget.jobs_per_call(request.width, request.height))
        return [states[start : start + size] for start in range(0, len(states), size)]

    def _step(self, states: list[JobState]) -> None:
        """One denoising step for a lane: batched forwards (as many jobs each as memory allows), then every
        job's own sampler step."""
        predictions: dict[JobState, torch.Tensor] = {}
        for chunk in self._chunks(states):
            predictions.update(self._isolated(chunk, self._predict))
        for state, prediction in predictions.items():
            try:
                self._advance(state, prediction)
            except Exception as error:  # noqa: BLE001
                self._fail(state, error)

    @torch.no_grad()
    def _predict(self, states: list[JobState]) -> list[torch.Tensor]:
        family = self.family
        request = states[0].job.request
        rows, xs, ts, conds, scales = [], [], [], [], []
        for state in states:
            t = state.timesteps[state.step]
            scale = getattr(state.sampler, "scale_model_input", None)
            x = scale(state.latents, t) if scale else state.latents
            for kind in state.guidance.rows:
                rows.append((state, kind))
                xs.append(x)
                ts.append(t.to(torch.float32))
                conds.append(state.uncond if kind == "uncond" else state.cond)
                scales.append(state.job.request.guidance_scale)
        inputs = family.denoiser_inputs(
            torch.cat(xs), torch.stack(ts).to(family.device), {key: torch.cat([c[key] for c in conds]) for key in conds[0]},
            torch.tensor(scales, dtype=torch.float32, device=family.device), request.width, request.height,
        )
        batch = ForwardBatch(rows, inputs, request.width, request.height)
        for part in self.parts:
            using = batch.rows_using(part)
            if using and type(part).before_forward is not Part.before_forward:  # timed as a component call
                with self._call(part.name, len(using), request.width, request.height):
                    part.before_forward(batch)
        with self._call("forward", len(rows), request.width, request.height):
            output = family.forward(batch.inputs)
        predictions, row = [], 0
        for state in states:
            count = len(state.guidance.rows)
            predictions.append(state.guidance.combine(output[row : row + count]))
            row += count
        return predictions

    def _advance(self, state: JobState, prediction: torch.Tensor) -> None:
        t = state.timesteps[state.step]
        state.latents = state.sampler.step(prediction, t, state.latents, return_dict=False, **state.step_kwargs)[0]
        for part in state.uses:
            part.after_step(state)
        state.step += 1
        self._result.stepped.append(state.job.id)
        if state.step in state.previews_at:
            request = state.job.request
            preview = self.family.preview(state.latents, request.width, request.height)
            self._result.previews.append((state.job.id, state.previews_at.index(state.step), preview))

    # --- decode ---------------------------------------------------------------------------------------------
    def _decode(self, states: list[JobState]) -> None:
        """Batched VAE decode of finished jobs, by size; their state is freed."""
        by_size: dict[tuple[int, int], list[JobState]] = {}
        for state in states:
            by_size.setdefault((state.job.request.width, state.job.request.height), []).append(state)
        for (width, height), group in by_size.items():
            for chunk in self._chunks(group):
                def decode(part: list[JobState]) -> list:
                    with self._call("decode", len(part), width, height):
                        return self.family.decode(torch.cat([s.latents for s in part]), width, height)

                for state, image in self._isolated(chunk, decode).items():
                    self._result.images[state.job.id] = image
                    self._free(state.job.id)


class _Timer:
    """Adds the seconds of a with-block to `totals[key]`, and/or hands them to `then`."""

    def __init__(self, totals: dict[str, float] | None, key: str, then: Callable[[float], None] | None = None):
        self.totals, self.key, self.then = totals, key, then

    def __enter__(self) -> None:
        self.started = time.perf_counter()

    def __exit__(self, *exc_info: object) -> None:
        seconds = time.perf_counter() - self.started
        if self.totals is not None:
            self.totals[self.key] = self.totals.get(self.key, 0.0) + seconds
        if self.then is not None and exc_info[0] is None:
            self.then(seconds)


def _preview_steps(count: int, total: int) -> list[int]:
    """`count` step numbers spread over the run, each before the last step (the final image is not a preview)."""
    return sorted({min(total - 1, max(1, round(total * (k + 1) / (count + 1)))) for k in range(count)} - {0})
