"""The processes the harness drives: the Kiln server (over HTTP) and the baseline/limit workers.

Each system runs in its own process, one at a time, with the same torch thread count.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping

import httpx

from kiln.server.client import wait_until_serving

from .load import REQUEST_TIMEOUT, Outcome
from .machine import REPO, process_memory, subprocess_env
from .scenarios import BenchRequest

STARTUP_SECONDS = 180
LAUNCH_SECONDS = 1800  # reference-size checkpoints load slowly


@functools.cache
def control_image(width: int, height: int) -> str:
    """The control image ControlNet requests send (base64 PNG): a grid of white lines on black, an edge map."""
    import numpy as np
    from PIL import Image

    pixels = np.zeros((height, width), dtype=np.uint8)
    pixels[::8], pixels[:, ::8] = 255, 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert("RGB").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


class BenchError(RuntimeError):
    """The harness could not run a system; the message says which and why."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class KilnHttp:
    """A Kiln server process and an HTTP client for it. `start()` sends one request from a pool thread.

    `module` is what runs: `benchmarks.kiln_server` (the instrumented app, default) or `server.cli` (the plain
    `kiln serve`, for the memory check), with `args` after it."""

    def __init__(self, threads: int, log: Path, module: str = "kiln.benchmarks.kiln_server", args: tuple[str, ...] = (),
                 pool_size: int = 512):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [sys.executable, "-m", module]
        if module == "kiln.server.cli":
            command.append("serve")
        command += ["--port", str(self.port), "--threads", str(threads), *args]
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as sink:
            self.process = subprocess.Popen(command, cwd=REPO, env=subprocess_env(threads), stdout=sink,
                                            stderr=subprocess.STDOUT)
        self._pool = ThreadPoolExecutor(max_workers=pool_size, thread_name_prefix="kiln-client")
        # One client for every thread (httpx clients are thread-safe): building one per thread costs ~20 ms of CPU
        # each (an SSL context), which a burst would pay on the machine Kiln runs on.
        self._client = httpx.Client(base_url=self.endpoint, timeout=REQUEST_TIMEOUT,
                                    limits=httpx.Limits(max_connections=pool_size,
                                                        max_keepalive_connections=pool_size))
        self._wait_for_status()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def _wait_for_status(self) -> None:
        if wait_until_serving(self.endpoint, STARTUP_SECONDS, lambda: self.process.poll() is None):
            return
        if self.process.poll() is not None:
            raise BenchError(f"the Kiln server exited with {self.process.returncode}:\n{self._log_tail()}")
        self.stop()
        raise BenchError(f"the Kiln server did not answer within {STARTUP_SECONDS}s:\n{self._log_tail()}")

    def launch(self, model: str, options: Mapping[str, Any]) -> None:
        body = {"model_name": model, "model_uid": model, "model_type": "image", **options}
        httpx.delete(f"{self.endpoint}/v1/models/{model}", timeout=60)  # a relaunch with other options
        response = httpx.post(f"{self.endpoint}/v1/models", json=body, timeout=LAUNCH_SECONDS)
        if response.status_code != 200:
            raise BenchError(f"launching {model} failed: {response.status_code} {response.text}")

    def wait_ready(self, models: list[str], timeout: float = STARTUP_SECONDS) -> None:
        """Wait until every model in `models` is ready (for models launched at server start)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = httpx.get(f"{self.endpoint}/status", timeout=10).json().get("models", {})
            if any(status.get(model) == "failed" for model in models):
                raise BenchError(f"a model failed to load: {status}\n{self._log_tail()}")
            if all(status.get(model) == "ready" for model in models):
                return
            time.sleep(0.5)
        raise BenchError(f"models not ready within {timeout}s: {models}")

    def describe(self, model: str) -> dict[str, Any]:
        response = httpx.get(f"{self.endpoint}/v1/models/{model}", timeout=60)
        response.raise_for_status()
        return response.json()

    def models(self) -> list[str]:
        return list(httpx.get(f"{self.endpoint}/status", timeout=10).json().get("models", {}))

    def stats(self, reset: bool = True) -> dict[str, Any]:
        response = httpx.get(f"{self.endpoint}/bench/stats", params={"reset": int(reset)}, timeout=60)
        response.raise_for_status()
        return response.json()

    def memory(self) -> dict[str, int | None]:
        return process_memory(self.pid)

    # --- requests -------------------------------------------------------------------------------------------
    def start(self, request: BenchRequest, scheduled: float) -> Future[Outcome]:
        return self._pool.submit(self._call, request, scheduled)

    def _call(self, request: BenchRequest, scheduled: float) -> Outcome:
        body = {
            "model": request.model, "prompt": request.prompt, "n": request.n,
            "size": f"{request.width}x{request.height}", "num_inference_steps": request.steps,
            "guidance_scale": request.guidance, "seed": request.seed, "request_id": request.id,
            "response_format": "b64_json",
        }
        if request.controlnet:
            body["controlnet"] = [{"name": request.controlnet, "image": control_image(request.width, request.height)}]
        if request.lora:
            body["lora"] = [{"name": request.lora}]
        sent = time.monotonic()
        error = None
        try:
            response = self._client.post("/v1/images/generations", json=body)
            if response.status_code != 200:
                error = f"HTTP {response.status_code}: {response.text[:300]}"
            elif len(response.json().get("data", [])) != request.n:
                error = f"expected {request.n} images"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        return Outcome(request.id, request.model, request.n, scheduled, sent, time.monotonic(), None, error)

    def stop(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def run_worker(job: Mapping[str, Any], threads: int, log: Path) -> dict[str, Any]:
    """Run `benchmarks.worker` on `job` in a child process and return its result."""
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as folder:
        job_path, result_path = Path(folder) / "job.json", Path(folder) / "result.json"
        job_path.write_text(json.dumps(job))
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as sink:
            completed = subprocess.run([sys.executable, "-m", "kiln.benchmarks.worker", str(job_path), str(result_path)],
                                       cwd=REPO, env=subprocess_env(threads), stdout=sink, stderr=subprocess.STDOUT)
        if completed.returncode != 0 or not result_path.is_file():
            tail = log.read_text(errors="replace")[-3000:]
            raise BenchError(f"the {job['system']} worker failed ({completed.returncode}):\n{tail}")
        return json.loads(result_path.read_text())
