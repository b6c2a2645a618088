"""An OCR runner: one launched OCR model, its waiting pages, and the one worker thread that runs it.

It implements the `ModelEndpoint` protocol (engine/endpoint.py) as the image runner does, so the registry, the
metrics and the progress/abort routes treat both alike. Inside, the unit of work is a *page* (an image is one
page):

    step = take pages     round-robin over waiting requests, up to a page and a pixel budget
           render         PDF pages are rasterised now, one step at a time, so memory stays bounded
           read           the model reads all the step's pages together (PP-OCR: detection per page, then the
                          text crops of every page in shared recognition forwards; GOT: one batched generate)
           complete       pages become lines in reading order; a request resolves when its last page does

All model work happens on the worker thread, never on the event loop; onnxruntime and torch release the GIL
while they compute, so other models' threads keep running. A page that fails (a render error, a model fault)
fails its own request only: the step's other pages are read again one by one.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from PIL import Image

from kiln.engine.catalogue import OcrSpec
from kiln.engine.errors import EngineError, InvalidRequest, QueueFull, RequestAborted
from kiln.engine.worker import ModelWorker

from .document import Document
from .layout import PageText, Segment, format_result
from .options import OcrOptions
from .params import OcrParams

log = logging.getLogger("kiln.engine.ocr")

PAGES_PER_STEP = 8  # PP-OCR: pages detected before their crops are recognised together
STEP_PIXELS = 48_000_000  # rendered pixels per step (at least one page): bounds a step's memory


class OcrModel(Protocol):
    """What a runner needs of a model: read a step's pages, each to segments (with boxes) or plain text."""

    max_batch_size: int

    def read(self, images: Sequence[Image.Image], params: Sequence[OcrParams]) -> list[list[Segment] | str]: ...


@dataclass
class OcrRequest:
    """One validated OCR call: the opened document and its parameters."""

    document: Document
    params: OcrParams = field(default_factory=OcrParams)
    request_id: str = ""

    def __post_init__(self) -> None:
        if not self.request_id:
            self.request_id = self.params.request_id or uuid.uuid4().hex


class OcrHandle:
    """The caller's view of a submitted OCR request: a future of its response body, progress, cancel()."""

    def __init__(self, request: OcrRequest):
        self.request = request
        self.future: Future[Any] = Future()
        self.pages: list[PageText | None] = [None] * len(request.document)
        self._lock = threading.Lock()
        self._cancelled = False
        self.future.add_done_callback(lambda _: request.document.close())

    @property
    def progress(self) -> float:
        """Pages read over pages asked for (1.0 once the request has ended)."""
        if self.future.done():
            return 1.0
        return sum(page is not None for page in self.pages) / len(self.pages)

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> bool:
        """End the request now with RequestAborted (its waiting pages are skipped). False if it had ended."""
        with self._lock:
            if self.future.done():
                return False
            self._cancelled = True
            self.future.set_exception(RequestAborted(f"The request has been cancelled: {self.request.request_id}"))
            return True

    def result(self, timeout: float | None = None) -> Any:
        return self.future.result(timeout)

    # Called by the runner's worker thread only.
    def complete_page(self, index: int, page: PageText) -> None:
        with self._lock:
            if self.future.done():
                return
            self.pages[index] = page
            if all(item is not None for item in self.pages):
                params, document = self.request.params, self.request.document
                self.future.set_result(format_result(self.pages, detail=params.detail, document=document.is_pdf))

    def fail(self, error: BaseException) -> None:
        with self._lock:
            if not self.future.done():
                self.future.set_exception(error)


class OcrRunner(ModelWorker):
    """One launched OCR model. `load()` blocks; `submit()` is safe from any thread."""

    thread_name = "kiln-ocr"

    def __init__(self, uid: str, spec: OcrSpec, options: OcrOptions,
                 model_factory: Callable[[OcrSpec, OcrOptions, Callable[[int, float], None]], OcrModel] | None = None):
        super().__init__(uid, spec, options)
        self.model: OcrModel | None = None
        self._model_factory = model_factory or make_model
        self._waiting: deque[tuple[OcrHandle, deque[int]]] = deque()  # requests with pages left, round-robin
        self._waiting_pages = 0
        self._active_pages = 0
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)

    # --- lifecycle ------------------------------------------------------------------------------------------
    def load(self, start: bool = True) -> None:
        """Load the model and start the worker thread; raises (and records) load errors. With start=False no
        thread runs and the caller drives the work with `iterate()` (tests use this to choose what batches)."""

        def load() -> None:
            self.model = self._model_factory(self.spec, self.options, self.counters.record_forward)

        self._load_and_start(load, start)

    def _wake(self) -> None:
        with self._work:
            self._work.notify_all()

    def _drop_waiting(self) -> None:
        with self._lock:
            self._waiting.clear()
            self._waiting_pages = 0

    # --- the doors ------------------------------------------------------------------------------------------
    @property
    def max_batch_size(self) -> int | None:
        return self.model.max_batch_size if self.model is not None else None

    def submit(self, request: OcrRequest) -> OcrHandle:
        """Queue a request; raises InvalidRequest, or QueueFull when max_queue_size requests are waiting."""
        if self.status != "ready":
            raise EngineError(f"model {self.uid} is not ready (status: {self.status})")
        if len(request.document) == 0:
            raise InvalidRequest("the request has no pages to read")
        handle = OcrHandle(request)
        with self._work:
            if len(self._waiting) >= self.options.max_queue_size:
                raise QueueFull(f"model {self.uid} has {len(self._waiting)} OCR requests waiting (the bound is "
                                f"max_queue_size={self.options.max_queue_size}); retry shortly")
            self._requests.add(request.request_id, handle)
            self._waiting.append((handle, deque(range(len(request.document)))))
            self._waiting_pages += len(request.document)
            self._work.notify()
        handle.future.add_done_callback(self._count_failure)
        return handle

    @property
    def queue_depth(self) -> int:
        """Pages waiting for a step."""
        return self._waiting_pages

    @property
    def active_jobs(self) -> int:
        """Pages being read now."""
        return self._active_pages

    # --- the worker thread ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping.is_set():
            with self._work:
                if not self._waiting:
                    self._work.wait(timeout=0.5)
                    continue
            self.iterate()

    def iterate(self) -> None:
        """One step: take pages, render them, read them together, complete them."""
        tasks = self._take()
        if not tasks:
            return
        started = time.perf_counter()
        try:
            self._read(tasks)
        except Exception as error:  # noqa: BLE001 - a bug here must not kill the model
            log.exception("OCR step failed")
            for handle, _ in tasks:
                handle.fail(EngineError(f"internal error: {error}"))
        finally:
            self._active_pages = 0
        self.counters.record_step(time.perf_counter() - started)

    def _take(self) -> list[tuple[OcrHandle, int]]:
        """Up to a step's pages, one from each waiting request in turn (a long PDF does not hold back the
        images that arrive after it), within the step's pixel budget; cancelled requests are dropped."""
        limit = PAGES_PER_STEP if self.spec.engine == "onnxruntime" else max(1, self.max_batch_size)
        tasks: list[tuple[OcrHandle, int]] = []
        pixels = 0
        with self._lock:
            while self._waiting and len(tasks) < limit:
                handle, pages = self._waiting[0]
                if handle.future.done():
                    self._waiting.popleft()
                    self._waiting_pages -= len(pages)
                    continue
                size = handle.request.document.pixels(pages[0])
                if tasks and pixels + size > STEP_PIXELS:
                    break
                self._waiting.popleft()
                tasks.append((handle, pages.popleft()))
                pixels += size
                self._waiting_pages -= 1
                if pages:
                    self._waiting.append((handle, pages))
            self._active_pages = len(tasks)
        return tasks

    def _read(self, tasks: list[tuple[OcrHandle, int]]) -> None:
        assert self.model is not None
        rendered: list[tuple[OcrHandle, int, Image.Image]] = []
        for handle, index in tasks:
            try:
                rendered.append((handle, index, handle.request.document.render(index)))
            except Exception as error:  # noqa: BLE001 - the page's own fault
                number = handle.request.document.page_numbers[index]
                self._fail(handle, error, f"page {number} could not be rendered")
        if not rendered:
            return
        try:
            results = self.model.read([image for _, _, image in rendered], [h.request.params for h, _, _ in rendered])
        except Exception as error:  # noqa: BLE001
            if len(rendered) == 1:
                handle, index, _ = rendered[0]
                self._fail(handle, error, "OCR failed")
                return
            log.warning("OCR step of %d pages failed (%r); reading them one by one", len(rendered), error)
            for one in rendered:  # isolate the faulty page: the others still get their text
                self._read_one(*one)
            return
        for (handle, index, image), result in zip(rendered, results):
            self._complete(handle, index, image, result)

    def _read_one(self, handle: OcrHandle, index: int, image: Image.Image) -> None:
        assert self.model is not None
        try:
            (result,) = self.model.read([image], [handle.request.params])
        except Exception as error:  # noqa: BLE001
            self._fail(handle, error, "OCR failed")
            return
        self._complete(handle, index, image, result)

    def _complete(self, handle: OcrHandle, index: int, image: Image.Image, result: list[Segment] | str) -> None:
        number = handle.request.document.page_numbers[index]
        if isinstance(result, str):
            page = PageText(number, image.width, image.height, result)
        else:
            page = PageText.from_segments(number, image.width, image.height, result)
        self.counters.images_generated += 1
        handle.complete_page(index, page)

    def _fail(self, handle: OcrHandle, error: BaseException, what: str) -> None:
        if isinstance(error, (InvalidRequest, RequestAborted, EngineError)):
            handle.fail(error)
            return
        log.warning("OCR request %s: %s: %r", handle.request.request_id, what, error, exc_info=error)
        handle.fail(EngineError(f"{what}: {type(error).__name__}: {error}"))



def make_model(spec: OcrSpec, options: OcrOptions, on_forward: Callable[[int, float], None]) -> OcrModel:
    """Load `spec`'s model as `options` ask."""
    if spec.engine == "onnxruntime":
        from .paddle import PaddleOcr

        return PaddleOcr(options, on_forward)
    if spec.engine == "transformers":
        from .got import GotOcr

        return GotOcr(spec, options, on_forward)
    raise ValueError(f"unknown OCR engine {spec.engine!r} for {spec.name}")
