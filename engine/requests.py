"""What the engine is asked for (requests), what it works on (jobs), and what it hands back: plain data that can
cross a process boundary, and the caller's handle of a submitted request.

A request asks for `n` images per prompt; each image is a job with its own seed, sampler and latents, so jobs
of one request can run beside jobs of others and still give the image they would give alone.
"""

from __future__ import annotations

import itertools
import random
import threading
import uuid
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Mapping

from PIL import Image

from .errors import InvalidRequest, RequestAborted

MAX_SEED = 2**31 - 1


@dataclass(frozen=True)
class GeneratedImage:
    image: Image.Image
    seed: int


# Called from the scheduler thread with (job index within the request, preview number, preview image).
PreviewCallback = Callable[[int, int, Image.Image], None]


@dataclass
class ImageRequest:
    """One client call after validation. `prompt` may be a list: `n` images are made for each prompt."""

    prompt: str | list[str]
    width: int
    height: int
    steps: int
    guidance_scale: float
    n: int = 1
    negative_prompt: str | None = None
    sampler: str = "default"
    seed: int | list[int] | None = None
    strength: float | None = None
    image: Image.Image | None = None
    mask: Image.Image | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    preview_count: int = 0
    part_inputs: Mapping[str, Any] = field(default_factory=dict)  # what per-job parts read, by part name

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def image_count(self) -> int:
        return self.n * len(self.prompts)

    @property
    def mode(self) -> str:
        if self.mask is not None:
            return "inpainting"
        return "image2image" if self.image is not None else "text2image"


def draw_seeds(seed: int | list[int] | None, count: int) -> list[int]:
    """One seed per image: an int s gives s, s+1, ... (so each image is reproducible alone with n=1); a list
    gives one per image, padded with random seeds; None or -1 draws at random."""
    if isinstance(seed, list):
        given = [s if s != -1 else None for s in seed[:count]]
        given += [None] * (count - len(given))
    elif seed is None or seed == -1:
        given = [None] * count
    else:
        given = [(seed + i) % (MAX_SEED + 1) for i in range(count)]
    return [s if s is not None else random.randint(0, MAX_SEED) for s in given]


_job_ids = itertools.count()


@dataclass(frozen=True, order=True)
class LaneKey:
    """What jobs must share to run in one denoiser forward: the latent size, and whatever the job's parts add
    (sorted (part, key) pairs; most parts add nothing: rows with different LoRAs or ControlNets share lanes)."""

    width: int
    height: int
    parts: tuple[tuple[str, Hashable], ...] = ()

    def __str__(self) -> str:
        extra = "".join(f",{name}={key}" for name, key in self.parts)
        return f"{self.width}x{self.height}{extra}"


@dataclass(frozen=True, eq=False)
class JobSpec:
    """One image of one request, as plain data: what the scheduler plans with and the executor initialises."""

    request: ImageRequest
    index: int  # within its request
    prompt: str
    seed: int
    lane: LaneKey
    id: int = field(default_factory=lambda: next(_job_ids))

    @property
    def request_id(self) -> str:
        return self.request.request_id


def job_specs(request: ImageRequest, lane: LaneKey) -> list[JobSpec]:
    """The request's jobs: `n` per prompt, each with its seed (drawn now when the request leaves it open)."""
    seeds = draw_seeds(request.seed, request.image_count)
    prompts = [prompt for prompt in request.prompts for _ in range(request.n)]
    return [JobSpec(request, index, prompt, seed, lane) for index, (prompt, seed) in enumerate(zip(prompts, seeds))]


class RequestHandle:
    """The caller's view of a submitted request: a future of its images, its progress, cancel().

    The runner's loop drives it from the scheduler's events (progress, previews, finished images, failure);
    `cancel()` fails the request at once and asks the scheduler, through `on_cancel`, to drop its jobs at the
    next step."""

    def __init__(self, request: ImageRequest, jobs: list[JobSpec], on_preview: PreviewCallback | None = None,
                 on_cancel: Callable[[str], None] | None = None):
        self.request = request
        self.jobs = jobs
        self.future: Future[list[GeneratedImage]] = Future()
        self.on_preview = on_preview
        self._on_cancel = on_cancel
        self._steps = [(0, 0)] * len(jobs)  # (done, total) per job
        self.images: list[GeneratedImage | None] = [None] * len(jobs)

    @property
    def seeds(self) -> list[int]:
        return [job.seed for job in self.jobs]

    def job_steps(self, index: int) -> tuple[int, int]:
        """(steps done, steps in all) of one of the request's jobs, as far as its events have told."""
        return self._steps[index]

    @property
    def progress(self) -> float:
        """Fraction of denoising steps done over all of the request's jobs (1.0 once it has ended)."""
        if self.future.done():
            return 1.0
        total = sum(total for _, total in self._steps)
        return sum(done for done, _ in self._steps) / total if total else 0.0

    def cancel(self) -> bool:
        """End the request now with RequestAborted; its jobs leave the batch at the next step. False if it had
        already ended."""
        if self.future.done():
            return False
        self.fail(RequestAborted(f"The request has been cancelled: {self.request.request_id}"))
        if self._on_cancel is not None:
            self._on_cancel(self.request.request_id)
        return True

    def result(self, timeout: float | None = None) -> list[GeneratedImage]:
        return self.future.result(timeout)

    # Driven by the runner's loop from the scheduler's events.
    def set_progress(self, index: int, done: int, total: int) -> None:
        self._steps[index] = (done, total)

    def preview(self, index: int, number: int, image: Image.Image) -> None:
        if self.on_preview is not None and not self.future.done():
            self.on_preview(index, number, image)

    def complete_job(self, index: int, image: Image.Image) -> None:
        self.images[index] = GeneratedImage(image, self.jobs[index].seed)
        if all(item is not None for item in self.images):
            self._resolve(self.future.set_result, list(self.images))

    def fail(self, error: BaseException) -> None:
        self._resolve(self.future.set_exception, error)

    def _resolve(self, setter: Callable[[Any], None], value: Any) -> None:
        """Resolve the future once: the loop thread finishing and a client cancelling may race."""
        if not self.future.done():
            try:
                setter(value)
            except InvalidStateError:
                pass


class RequestBook:
    """The requests a runner answers for by id (progress, abort): those under way, and the `keep_finished` most
    recently finished ones so that their progress stays readable for a while. Shared by the image and OCR
    runners; thread-safe. Handles need a `future` and `fail(error)`."""

    def __init__(self, keep_finished: int = 1024):
        self._handles: dict[str, Any] = {}
        self._finished: deque[tuple[str, Any]] = deque()  # in the order they finished
        self._keep = keep_finished
        self._lock = threading.Lock()

    def add(self, request_id: str, handle: Any) -> None:
        """Record a new request; InvalidRequest if one with the same id is still under way."""
        with self._lock:
            previous = self._handles.get(request_id)
            if previous is not None and not previous.future.done():
                raise InvalidRequest(f"request_id {request_id!r} is already running")
            self._handles[request_id] = handle
        handle.future.add_done_callback(lambda _: self._on_finished(request_id, handle))

    def _on_finished(self, request_id: str, handle: Any) -> None:
        """Past the bound, forget the request that finished longest ago (unless its id has been reused)."""
        with self._lock:
            self._finished.append((request_id, handle))
            while len(self._finished) > self._keep:
                old_id, old = self._finished.popleft()
                if self._handles.get(old_id) is old:
                    del self._handles[old_id]

    def discard(self, request_id: str, handle: Any) -> None:
        """Forget `handle` (a request refused after `add`)."""
        with self._lock:
            if self._handles.get(request_id) is handle:
                del self._handles[request_id]

    def get(self, request_id: str) -> Any | None:
        with self._lock:
            return self._handles.get(request_id)

    def fail_all(self, error: BaseException) -> None:
        """Fail every request still under way (the runner is closing)."""
        with self._lock:
            handles = list(self._handles.values())
        for handle in handles:
            handle.fail(error)
