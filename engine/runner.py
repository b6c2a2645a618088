"""A runner is one launched model: its components, its scheduler, and the one thread that does its torch work.

Callers (the server's event loop, tests, benchmarks) only `submit`, `abort` and read progress and stats; every
tensor is touched by the scheduler thread alone, so no lock is held around model code.
"""

from __future__ import annotations

import logging
import time

import torch

from .backends.launch import launch_backend
from .catalogue import ModelSpec
from .execution import Executor
from .families import make_family
from .loading import LoadedModel, load_model
from .memory import CPU_BATCH_SIZE, batch_budget
from .options import LaunchOptions
from .requests import ImageRequest, Job, PreviewCallback, RequestHandle
from .schema import Limits, check_request
from .errors import EngineError, InvalidRequest, QueueFull, RequestAborted
from .scheduler import Scheduler, StepPlan
from .worker import ModelWorker

log = logging.getLogger("kiln.engine")



class Runner(ModelWorker):
    """One launched image model. `load()` blocks; `submit()` is safe from any thread."""

    thread_name = "kiln-scheduler"

    def __init__(self, uid: str, spec: ModelSpec, options: LaunchOptions, limits: Limits = Limits()):
        super().__init__(uid, spec, options)
        self.limits = limits
        self.scheduler = Scheduler(options.max_batch_size or CPU_BATCH_SIZE, options.max_queue_size)  # set by load
        self.loaded: LoadedModel | None = None
        self.executor: Executor | None = None
        self.backend_info: dict = {}  # the backend that runs the denoiser, its warm-up time, ... (set by load)

    # --- lifecycle ------------------------------------------------------------------------------------------
    def load(self, start: bool = True, warmup_size: tuple[int, int] | None = None) -> None:
        """Load the weights, put the backend in place and warm it up, and start the scheduler thread. Raises (and
        records) load errors.

        With start=False no thread runs and the caller drives the loop with `iterate()`, one step at a time:
        tests use this to make requests join at chosen steps. Warm-up (compile: every batch bucket) runs at
        `warmup_size` (width, height), by default the model's default size."""

        def load() -> None:
            self.loaded = load_model(self.spec, self.options, on_progress=self.report_load)
            family = make_family(self.spec.family, self.loaded.pipeline, self.loaded.device, self.loaded.dtype)
            budget = batch_budget(family, self.options.max_batch_size, self.spec.default_size)
            self.scheduler.max_batch_size = budget.max_batch_size
            self.backend_info = launch_backend(
                self.options.backend, family, model=self.spec.name, source=self.loaded.source, max_batch_size=budget.max_batch_size,
                warmup_size=warmup_size or self.spec.default_size, cpu_offload=self.options.cpu_offload,
            )
            self.executor = Executor(family, budget)
            self.executor.on_forward = self.counters.record_forward

        self._load_and_start(load, start)

    # --- the doors ------------------------------------------------------------------------------------------
    def validate(self, request: ImageRequest) -> None:
        """What the request schema checks (the server ran the same checks before submitting, with the same
        limits), the model's abilities, and the queue bound; raises InvalidRequest."""
        spec = self.spec
        if request.mode not in spec.abilities:
            raise InvalidRequest(f"model {self.uid} ({spec.name}) cannot do {request.mode}; it can: "
                                 f"{', '.join(spec.abilities)}", "model", "ability_not_supported")
        check_request(spec, request, self.limits)
        if request.image_count > self.options.max_queue_size:
            raise InvalidRequest(f"a request may ask for 1 to {self.options.max_queue_size} images", "n")

    def submit(self, request: ImageRequest, on_preview: PreviewCallback | None = None) -> RequestHandle:
        """Queue a request; raises InvalidRequest, or QueueFull when the waiting queue is at its bound.
        `on_preview(job index, preview number, image)` is called from the scheduler thread as previews come."""
        if self.status != "ready":
            raise EngineError(f"model {self.uid} is not ready (status: {self.status})")
        self.validate(request)
        handle = RequestHandle(request, lane=(request.width, request.height), on_preview=on_preview)
        self._requests.add(request.request_id, handle)
        try:
            self.scheduler.add(handle.jobs)
        except QueueFull:
            self._requests.discard(request.request_id, handle)
            raise
        handle.future.add_done_callback(lambda future: self._count_outcome(future, handle))
        return handle

    @property
    def max_batch_size(self) -> int | None:
        """Active jobs at most: the launch option, or what "auto" derived at load (None until loaded)."""
        return self.scheduler.max_batch_size if self.executor is not None else None

    def describe(self) -> dict:
        return {**super().describe(), "backend": self.backend_info, "memory_bytes": self.memory_bytes}

    @property
    def memory_bytes(self) -> int | None:
        """Bytes of the loaded weights (every component's parameters and buffers), None until loaded."""
        if self.loaded is None:
            return None
        modules = [c for c in self.loaded.pipeline.components.values() if isinstance(c, torch.nn.Module)]
        tensors = {id(t): t for m in modules for t in (*m.parameters(), *m.buffers())}
        return sum(t.numel() * t.element_size() for t in tensors.values())

    @property
    def queue_depth(self) -> int:
        return self.scheduler.waiting_count

    @property
    def active_jobs(self) -> int:
        return self.scheduler.active_count

    # --- the scheduler thread -------------------------------------------------------------------------------
    def _wake(self) -> None:
        self.scheduler.wake()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            if self.scheduler.wait_for_work(timeout=0.5):
                self.iterate()

    @torch.no_grad()
    def iterate(self) -> None:
        """One turn of the loop: plan, execute, update."""
        plan = self.scheduler.schedule()
        try:
            self.execute(plan)
        except Exception as error:  # noqa: BLE001 - a bug here must not kill the model
            log.exception("scheduler iteration failed")
            for job in plan.admitted + plan.jobs:
                self._fail(job, EngineError(f"internal error: {error}"))
        self.scheduler.update(plan)

    def execute(self, plan: StepPlan) -> None:
        """All tensor work of one iteration."""
        assert self.executor is not None
        for job in plan.dropped:
            if job.handle.cancelled:
                job.handle.fail(RequestAborted(f"The request has been cancelled: {job.request.request_id}"))
        self.executor.admit([job for job in plan.admitted if _live(job)], self._fail)
        jobs = [job for job in plan.jobs if _live(job) and job.state is not None]
        if not jobs:
            return
        started = time.perf_counter()
        self.executor.step(jobs, self._fail)
        self.counters.record_step(time.perf_counter() - started)
        finished = [job for job in jobs if job.finished and _live(job)]
        for job, image in self.executor.decode(finished, self._fail).items():
            job.state = None  # free the tensors now; the image is all that is left
            job.handle.complete_job(job, image)

    def _fail(self, job: Job, error: BaseException) -> None:
        """A job's fault fails its own request only, with the error's message."""
        if isinstance(error, (InvalidRequest, RequestAborted, EngineError)):
            job.handle.fail(error)
        else:
            log.warning("request %s failed: %r", job.request.request_id, error, exc_info=error)
            job.handle.fail(EngineError(f"{type(error).__name__}: {error}"))

    def _count_outcome(self, future, handle: RequestHandle) -> None:
        if future.exception() is None:
            self.counters.images_generated += len(handle.jobs)
        else:
            self.counters.requests_failed += 1


def _live(job: Job) -> bool:
    return not (job.handle.future.done() or job.handle.cancelled)
