"""Graceful drain: on SIGTERM or SIGINT Kiln keeps listening but admits no new work, lets the admitted requests
finish for up to the drain timeout, ends what is left with a clean error, and exits with code 0.

uvicorn alone closes the listener at once and, `timeout_graceful_shutdown` later, cancels the request tasks:
clients get a bare text/plain 500, streams stop mid-body without an `error` event, the log shows a
CancelledError traceback, and the signal is re-raised so the exit status says "killed". Here uvicorn is told to
exit only once the drain is over and nothing of Kiln's is running.

- `Drain`: serving -> draining, the admitted requests, and the drain itself (`run`, cut short by `hurry`).
- `DrainGate`: the outermost middleware but the Host check. While draining, a request that would start work (a
  POST, aborts excepted) gets 503 + Retry-After; reads still pass, so url images, progress and `/status` (503,
  "draining") answer. When the drain ends with requests still running, each is cancelled, which aborts its jobs
  as a client disconnect does, and answered here: a 503 in the error shape or, for a stream under way, a final
  `error` event.
- `DrainingServer`: uvicorn's Server, whose first exit signal starts the drain and whose second cuts it short.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from types import FrameType

import uvicorn
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_body, error_response
from .streaming import sse

log = logging.getLogger("uvicorn.error")  # lifecycle messages beside uvicorn's own, at its log level

CUT_GRACE_SECONDS = 10.0  # for cancelled requests to send their error; uvicorn's own bound comes after


class Drain:
    """The requests admitted so far and the drain that ends them. Used on the event loop only."""

    def __init__(self, timeout: float, retry_after: int):
        self.timeout = timeout
        self.retry_after = retry_after
        self.draining = False
        self._running: set[asyncio.Task] = set()
        self._cut: set[asyncio.Task] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._hurry = asyncio.Event()

    def admit(self, task: asyncio.Task) -> None:
        self._running.add(task)
        self._idle.clear()

    def release(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        self._cut.discard(task)
        if not self._running:
            self._idle.set()

    def was_cut(self, task: asyncio.Task) -> bool:
        """Whether the drain, not the server or the client, cancelled `task`."""
        return task in self._cut

    def hurry(self) -> None:
        """End the drain now: what is still running is cut at once."""
        self._hurry.set()

    async def run(self) -> None:
        """Refuse new work, wait for the admitted requests (up to `timeout`, or until `hurry()`), then cancel
        what is left and wait for the cancelled requests to send their errors."""
        self.draining = True
        log.info("draining: %d request(s) in flight may run %gs more; new work gets 503", len(self._running),
                 self.timeout)
        waits = [asyncio.ensure_future(self._idle.wait()), asyncio.ensure_future(self._hurry.wait())]
        await asyncio.wait(waits, timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED)
        for wait in waits:
            wait.cancel()
        if self._running:
            log.warning("drain over: ending %d unfinished request(s) with 503", len(self._running))
            for task in self._running:
                self._cut.add(task)
                task.cancel()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), CUT_GRACE_SECONDS)
        log.info("drained")

    def refusal(self) -> Response:
        """The answer to new work while draining."""
        return error_response(503, "Kiln is shutting down and takes no new work; retry on another instance or "
                              "once it is back", code="server_draining", headers=self._headers())

    def cut_response(self) -> Response:
        """The answer to a request the drain cut before it had started to respond."""
        return error_response(503, self._cut_message(), code="drain_timeout", headers=self._headers())

    def cut_event(self) -> bytes:
        """The last event of a stream the drain cut."""
        return sse("error", error_body(503, self._cut_message(), code="drain_timeout"))

    def _cut_message(self) -> str:
        return (f"Kiln is shutting down and this request did not finish within the drain (at most {self.timeout:g} "
                "s), so it was aborted; retry it")

    def _headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after), "Connection": "close"}


def starts_work(scope: Scope) -> bool:
    """What a draining server refuses: POSTs (generations, uploads, launches) but aborts, which end work."""
    return scope["method"] == "POST" and not scope["path"].endswith("/abort")


class DrainGate:
    """Refuses new work while draining and answers for admitted requests the drain cuts (see the module)."""

    def __init__(self, app: ASGIApp, drain: Drain):
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.drain.draining and starts_work(scope):
            await self.drain.refusal()(scope, receive, send)
            return
        sent: dict[str, object] = {}  # the response start, and whether the body has ended

        async def watched_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                sent["start"] = message
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                sent["ended"] = True
            await send(message)

        task = asyncio.ensure_future(self.app(scope, receive, watched_send))
        self.drain.admit(task)
        try:
            await task
        except asyncio.CancelledError:
            if not self.drain.was_cut(task):
                raise  # uvicorn or the client cancelled it: not ours to answer
            await self._answer_cut(scope, receive, send, sent)
        finally:
            self.drain.release(task)

    async def _answer_cut(self, scope: Scope, receive: Receive, send: Send, sent: dict) -> None:
        """A clean end for a cut request: the error response, or the `error` event that ends a stream."""
        if sent.get("ended"):
            return
        start = sent.get("start")
        if start is None:
            await self.drain.cut_response()(scope, receive, send)
            return
        stream = dict(start.get("headers", [])).get(b"content-type", b"").startswith(b"text/event-stream")
        await send({"type": "http.response.body", "body": self.drain.cut_event() if stream else b"",
                    "more_body": False})


class DrainingServer(uvicorn.Server):
    """uvicorn's Server, draining on exit signals: the first SIGTERM/SIGINT runs `drain.run()` and then lets
    uvicorn shut down; a second one cuts the drain short. Signals are not re-raised after a drained shutdown
    (uvicorn's default), so the process exits with 0."""

    def __init__(self, config: uvicorn.Config, drain: Drain):
        super().__init__(config)
        self.drain = drain
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drainer: asyncio.Task | None = None

    async def serve(self, sockets: list | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """The signal handler (main thread, between bytecodes): hand over to the event loop."""
        if self._loop is None:
            self.should_exit = True
        else:
            self._loop.call_soon_threadsafe(self._on_signal, sig)

    def _on_signal(self, sig: int) -> None:
        if self._drainer is None:
            log.info("%s received: draining (a second signal ends the drain at once)", signal.Signals(sig).name)
            self._drainer = asyncio.ensure_future(self._drain_then_exit())
        else:
            log.info("%s received: ending the drain now", signal.Signals(sig).name)
            self.drain.hurry()

    async def _drain_then_exit(self) -> None:
        await self.drain.run()
        self.should_exit = True
