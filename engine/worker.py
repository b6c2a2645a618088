"""What the image and OCR runners share: a launched model's status, the one thread that does its work, and the
requests it answers for by id (progress, abort)."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from .errors import RequestAborted
from .openmp import release_thread_pool
from .requests import RequestBook


class ModelWorker:
    """The lifecycle of one launched model: created -> loading -> ready | failed; stopped after close().

    Subclasses provide `_loop` (the worker thread's body, until `_stopping` is set), `_wake` (make a waiting
    loop look again) and `_drop_waiting` (forget queued work at close)."""

    thread_name = "kiln-worker"

    def __init__(self, uid: str):
        self.uid = uid
        self.status = "created"
        self.error: str | None = None
        self.created = int(time.time())
        self._requests = RequestBook()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def _load_and_start(self, load: Callable[[], None], start: bool) -> None:
        """Run `load` (recording its error, which is raised), then start the worker thread unless start=False,
        in which case the caller drives the work with `iterate()` (tests choose what runs together)."""
        self.status = "loading"
        try:
            load()
        except Exception as error:
            self.status, self.error = "failed", str(error)
            raise
        finally:
            release_thread_pool()  # the loading thread (a server pool thread) will not run this model
        if start:
            self._thread = threading.Thread(target=self._loop, name=f"{self.thread_name}-{self.uid}", daemon=True)
            self._thread.start()
        self.status = "ready"

    def close(self) -> None:
        """Stop the thread; requests still waiting or running fail with RequestAborted."""
        self._stopping.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._drop_waiting()
        self._requests.fail_all(RequestAborted(f"model {self.uid} was terminated"))
        self.status = "stopped"

    def get(self, request_id: str) -> Any | None:
        return self._requests.get(request_id)

    def abort(self, request_id: str) -> str:
        """Xinference's abort answer: DONE (cancelled), NO_OP (already finished) or NOT_FOUND."""
        handle = self.get(request_id)
        if handle is None:
            return "NOT_FOUND"
        if not handle.cancel():
            return "NO_OP"
        self._wake()
        return "DONE"

    def _loop(self) -> None:
        raise NotImplementedError

    def _wake(self) -> None:
        raise NotImplementedError

    def _drop_waiting(self) -> None:
        """Nothing by default: queued jobs fail with their requests."""
