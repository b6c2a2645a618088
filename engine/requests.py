"""What the engine is asked for (requests), what it works on (jobs), and what it hands back.

A request asks for `n` images per prompt; each image is a job with its own seed, sampler and latents, so jobs
of one request can run beside jobs of others and still give the image they would give alone.
"""

from __future__ import annotations

import itertools
import random
import threading
import uuid
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from PIL import Image

from .errors import InvalidRequest

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


@dataclass(eq=False)
class Job:
    """One image of one request, as the scheduler sees it. `state` holds the tensors; only the runner reads it."""

    handle: "RequestHandle"
    index: int
    prompt: str
    seed: int
    lane: tuple
    total_steps: int = 0
    done_steps: int = 0
    state: Any = None
    id: int = field(default_factory=lambda: next(_job_ids))

    @property
    def request(self) -> ImageRequest:
        return self.handle.request

    @property
    def finished(self) -> bool:
        return self.total_steps > 0 and self.done_steps >= self.total_steps


class RequestHandle:
    """The caller's view of a submitted request: a future of its images, its progress, and cancel()."""

    def __init__(self, request: ImageRequest, lane: tuple, on_preview: PreviewCallback | None = None):
        self.request = request
        self.on_preview = on_preview
        self.future: Future[list[GeneratedImage]] = Future()
        seeds = draw_seeds(request.seed, request.image_count)
        prompts = [p for p in request.prompts for _ in range(request.n)]
        self.jobs = [Job(self, i, prompt, seed, lane) for i, (prompt, seed) in enumerate(zip(prompts, seeds))]
        self.images: list[GeneratedImage | None] = [None] * len(self.jobs)
        self._cancelled = threading.Event()

    @property
    def seeds(self) -> list[int]:
        return [job.seed for job in self.jobs]

    @property
    def progress(self) -> float:
        """Fraction of denoising steps done over all of the request's jobs (1.0 once it has finished)."""
        if self.future.done():
            return 1.0
        total = sum(job.total_steps for job in self.jobs)
        return sum(job.done_steps for job in self.jobs) / total if total else 0.0

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> bool:
        """Ask for the request's jobs to leave at the next step. False if it had already finished."""
        if self.future.done():
            return False
        self._cancelled.set()
        return True

    def result(self, timeout: float | None = None) -> list[GeneratedImage]:
        return self.future.result(timeout)

    # Called by the runner only.
    def complete_job(self, job: Job, image: Image.Image) -> None:
        self.images[job.index] = GeneratedImage(image, job.seed)
        if all(item is not None for item in self.images) and not self.future.done():
            self.future.set_result(list(self.images))

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


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
