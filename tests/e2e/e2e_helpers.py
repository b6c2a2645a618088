"""End-to-end helpers: real `kiln serve` processes on loopback, driven by the `kiln` CLI and the Python client.

Servers run torch single-threaded and reuse the tiny checkpoints under the repo's .kiln-cache, so the suite stays
fast and stable on small machines.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from kiln.server.client import wait_until_serving

REPO = Path(__file__).resolve().parents[2]
STARTUP_SECONDS = 120
READY_SECONDS = 300


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        KILN_CACHE=str(REPO / ".kiln-cache"),
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )
    env.pop("KILN_ENDPOINT", None)
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class KilnServer:
    """A running `kiln serve` subprocess."""

    process: subprocess.Popen
    endpoint: str
    log: Path

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def wait_for_status(self) -> None:
        if wait_until_serving(self.endpoint, STARTUP_SECONDS, lambda: self.process.poll() is None):
            return
        if self.process.poll() is not None:
            pytest.fail(f"kiln serve exited with {self.process.returncode}:\n{self.log_tail()}")
        pytest.fail(f"kiln serve did not answer /status within {STARTUP_SECONDS}s:\n{self.log_tail()}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_server(log: Path, *args: str, env: dict[str, str] | None = None) -> KilnServer:
    """`kiln serve ARGS` on a free loopback port (`env` adds to its environment), once it answers /status."""
    port = _free_port()
    command = [sys.executable, "-m", "kiln.server.cli", "serve", "--port", str(port), "--threads", "1", *args]
    with log.open("w") as sink:
        process = subprocess.Popen(command, cwd=REPO, env={**_env(), **(env or {})}, stdout=sink,
                                   stderr=subprocess.STDOUT)
    server = KilnServer(process, f"http://127.0.0.1:{port}", log)
    server.wait_for_status()
    return server


def run_kiln(*args: str, endpoint: str | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """Run the `kiln` CLI in a subprocess, as a user would."""
    command = [sys.executable, "-m", "kiln.server.cli", *args]
    if endpoint:
        command += ["--endpoint", endpoint]
    return subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=READY_SECONDS)


def png_image(data: bytes) -> Image.Image:
    """Decode bytes that must be a PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def png_bytes(size: tuple[int, int], color: int | tuple[int, int, int]) -> bytes:
    """A plain test image (RGB, or a mask when color is an int), as PNG bytes."""
    image = Image.new("L" if isinstance(color, int) else "RGB", size, color)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
