"""A runner is one launched image model: its components, its parts, its scheduler, and the one thread that does
its torch work. It implements the `ModelEndpoint` protocol (engine/endpoint.py).

The thread loops over the scheduler's three beats (schedule -> execute -> update) and turns the update's events
into the requests' handles: progress, previews, finished images, failures. Callers (the server's event loop,
tests, benchmarks) only `submit`, `abort` and read progress and stats; every tensor is touched by the scheduler
thread alone, so no lock is held around model code.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Callable

import torch

from .backends import SPECIFIC_BACKENDS
from .backends.launch import launch_backend
from .catalogue import ModelSpec
from .endpoint import EndpointStats
from .errors import EngineError, InvalidRequest, ModelLoadError, QueueFull
from .execution import Executor
from .families import make_family
from .loading import LoadedModel, load_model
from .memory import CPU_BATCH_SIZE, batch_budget
from .openmp import release_thread_pool
from .options import LaunchOptions
from .parts import Part, make_parts, unsupported_backends
from .requests import ImageRequest, LaneKey, PreviewCallback, RequestHandle, job_specs
from .scheduler import Event, Failed, Finished, Preview, Progress, Scheduler, StepPlan, StepResult
from .schema import Limits, check_request
from .worker import ModelWorker

log = logging.getLogger("kiln.engine")

StepObserver = Callable[[StepPlan, StepResult], None]
TINY_LANE = (64, 64)  # the lane tiny checkpoints serve in the tests, the demo and the benchmarks: warmed and timed


class Runner(ModelWorker):
    """One launched image model. `load()` blocks; `submit()` is safe from any thread."""

    thread_name = "kiln-scheduler"

    def __init__(self, uid: str, spec: ModelSpec, options: LaunchOptions, limits: Limits = Limits()):
        super().__init__(uid, spec, options)
        self.limits = limits
        self.scheduler = Scheduler(options.max_batch_size or CPU_BATCH_SIZE, options.max_queue_size,  # set by load
                                   admission=self._admission)
        self.loaded: LoadedModel | None = None
        self.executor: Executor | None = None
        self.parts: list[Part] = []
        self.backend_info: dict = {}  # the backend that runs the denoiser, its warm-up time, ... (set by load)
        self.observers: list[StepObserver] = []  # called with each iteration's plan and result (benchmarks)
        self._handles: dict[int, RequestHandle] = {}  # job id -> its request's handle, while the request runs

    # --- lifecycle ------------------------------------------------------------------------------------------
    def load(self, start: bool = True, warmup_size: tuple[int, int] | None = None) -> None:
        """Load the weights, put the backend in place and warm it up, and start the scheduler thread. Raises (and
        records) load errors.

        With start=False no thread runs and the caller drives the loop with `iterate()`, one step at a time:
        tests use this to make requests join at chosen steps. Warm-up (compile: every batch bucket) runs at
        `warmup_size` (width, height), by default the model's default size."""

        def load() -> None:
            unsupported = unsupported_backends(self.spec, self.options)
            if self.options.backend in unsupported:
                able = [name for name in SPECIFIC_BACKENDS if name not in unsupported]
                raise ModelLoadError(f"backend {self.options.backend!r} cannot run this launch: "
                                     f"{unsupported[self.options.backend]}; launch with backend "
                                     f"{' or '.join(repr(name) for name in able)}")
            self.loaded = load_model(self.spec, self.options, on_progress=self.report_load)
            family = make_family(self.spec.family, self.loaded.pipeline, self.loaded.device, self.loaded.dtype)
            budget = batch_budget(family, self.options.max_batch_size, self.spec.default_size)
            self.scheduler.max_batch_size = budget.max_batch_size
            # Parts before the backend, which compiles or exports what they change (LoRA slot layers, fused LoRAs).
            self.parts = make_parts(self.spec, replace(self.options, max_batch_size=budget.max_batch_size), family)
            for part in self.parts:
                part.wake = self._wake
            self.backend_info = launch_backend(
                self.options.backend, family, model=self.spec.name, source=self.loaded.source,
                max_batch_size=budget.max_batch_size,
                warmup_size=warmup_size or (TINY_LANE if self.options.tiny else self.spec.default_size),
                cpu_offload=self.options.cpu_offload, unsupported=unsupported,
                variants=[part.example_inputs for part in self.parts],
            )
            self.executor = Executor(family, budget, self.parts)

        self._load_and_start(load, start)

    # --- the doors ------------------------------------------------------------------------------------------
    def validate(self, request: ImageRequest) -> None:
        """What the request schema checks (the server ran the same checks before submitting, with the same
        limits), the model's abilities, what its parts refuse, and the queue bound; raises InvalidRequest."""
        spec = self.spec
        if request.mode not in spec.abilities:
            raise InvalidRequest(f"model {self.uid} ({spec.name}) cannot do {request.mode}; it can: "
                                 f"{', '.join(spec.abilities)}", "model", "ability_not_supported")
        check_request(spec, request, self.limits)
        missing = sorted(set(request.part_inputs) - {part.name for part in self.parts})
        if missing:
            raise InvalidRequest(f"{missing[0]}: model {self.uid} ({spec.name}) was launched without {missing[0]}; "
                                 f"launch it with the {missing[0]!r} launch option to use it", missing[0])
        for part in self.parts:
            if part.used_by(request):
                part.check(request)
        if request.image_count > self.options.max_queue_size:
            raise InvalidRequest(f"a request may ask for 1 to {self.options.max_queue_size} images", "n")

    def lane_key(self, request: ImageRequest) -> LaneKey:
        """The latent size, and what the request's parts add to it."""
        parts = sorted((part.name, key) for part in self.parts
                       if part.used_by(request) and (key := part.lane_key(request)) is not None)
        return LaneKey(request.width, request.height, tuple(parts))

    def submit(self, request: ImageRequest, on_preview: PreviewCallback | None = None) -> RequestHandle:
        """Queue a request; raises InvalidRequest, or QueueFull when the waiting queue is at its bound.
        `on_preview(job index, preview number, image)` is called from the scheduler thread as previews come."""
        if self.status != "ready":
            raise EngineError(f"model {self.uid} is not ready (status: {self.status})")
        self.validate(request)
        jobs = job_specs(request, self.lane_key(request))
        handle = RequestHandle(request, jobs, on_preview, on_cancel=self._cancel)
        self._requests.add(request.request_id, handle)
        for job in jobs:
            self._handles[job.id] = handle
        try:
            self.scheduler.add(jobs)
        except QueueFull:
            self._requests.discard(request.request_id, handle)
            self._forget(handle)
            raise
        handle.future.add_done_callback(lambda future: self._ended(future, handle))
        return handle

    @property
    def max_batch_size(self) -> int | None:
        """Active jobs at most: the launch option, or what "auto" derived at load (None until loaded)."""
        return self.scheduler.max_batch_size if self.executor is not None else None

    @property
    def queue_depth(self) -> int:
        return self.scheduler.waiting_count

    @property
    def active_jobs(self) -> int:
        return self.scheduler.active_count

    def describe(self) -> dict:
        parts = {key: value for part in self.parts for key, value in part.describe().items()}
        return {**super().describe(), "backend": self.backend_info, "memory_bytes": self.memory_bytes,
                "controlnet": None, "lora": None, **parts}

    def stats(self) -> EndpointStats:
        return replace(super().stats(), extra=tuple(metric for part in self.parts for metric in part.metrics()))

    @property
    def resident_loras(self) -> list[str]:
        """The LoRAs in per-row slots now (from any thread): a replica reports them so that requests for them
        are routed here (kiln.cluster.routing)."""
        lora = next((part for part in self.parts if part.name == "lora"), None)
        return lora.slots.resident if lora is not None else []

    @property
    def memory_bytes(self) -> int | None:
        """Bytes of the loaded weights (every component's parameters and buffers), None until loaded."""
        if self.loaded is None:
            return None
        modules = [c for c in self.loaded.pipeline.components.values() if isinstance(c, torch.nn.Module)]
        tensors = {id(t): t for m in modules for t in (*m.parameters(), *m.buffers())}
        return sum(t.numel() * t.element_size() for t in tensors.values())

    # --- the scheduler thread -------------------------------------------------------------------------------
    def _wake(self) -> None:
        self.scheduler.wake()

    def _cancel(self, request_id: str) -> None:
        self.scheduler.abort(request_id)

    def _admission(self):
        """The scheduler's admission round: the gates of the parts that may hold jobs back (a LoRA not yet in a
        slot), each asked about the jobs that use it."""
        gates = [(part, gate) for part in self.parts if (gate := part.admission()) is not None]
        if not gates:
            return None
        return lambda job: all(gate(job) for part, gate in gates if part.used_by(job.request))

    def _loop(self) -> None:
        while not self._stopping.is_set():
            if self.scheduler.wait_for_work(timeout=0.5):
                self.iterate()
            else:  # idle for half a second: hold no OpenMP workers that would slow the other models (openmp.py)
                release_thread_pool()

    @torch.no_grad()
    def iterate(self) -> None:
        """One turn of the loop: plan, execute, update, deliver the events."""
        assert self.executor is not None
        plan = self.scheduler.schedule()
        if plan.idle:
            return
        try:
            result = self.executor.execute(plan)
        except Exception as error:  # noqa: BLE001 - a bug here must not kill the model
            log.exception("scheduler iteration failed")
            failure = EngineError(f"internal error: {error}")
            jobs = {job.id for job in plan.admitted} | set(plan.step) | set(plan.decode)
            result = StepResult(failed={job_id: failure for job_id in jobs})
        self._deliver(self.scheduler.update(plan, result))
        self._count(result)
        for observe in self.observers:
            observe(plan, result)

    def _deliver(self, events: list[Event]) -> None:
        """The events, onto the handles of the requests they belong to (gone requests are skipped)."""
        for event in events:
            handle = self._handles.get(event.job_id)
            if handle is None:
                continue
            index = next(job.index for job in handle.jobs if job.id == event.job_id)
            if isinstance(event, Progress):
                handle.set_progress(index, event.done, event.total)
            elif isinstance(event, Preview):
                handle.preview(index, event.number, event.image)
            elif isinstance(event, Finished):
                handle.complete_job(index, event.image)
            elif isinstance(event, Failed):
                handle.fail(event.error)

    def _count(self, result: StepResult) -> None:
        if "step" in result.seconds:
            self.counters.record_step(result.seconds["step"])
        for call in result.calls:
            if call.component == "forward":
                self.counters.record_forward(call.items, call.seconds)

    def _ended(self, future, handle: RequestHandle) -> None:
        if future.exception() is None:
            self.counters.images_generated += len(handle.jobs)
        else:
            self.counters.requests_failed += 1
        self._forget(handle)

    def _forget(self, handle: RequestHandle) -> None:
        for job in handle.jobs:
            self._handles.pop(job.id, None)
