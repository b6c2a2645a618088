"""Kiln against the real Xinference, on loopback, serving the same checkpoint from disk:

    python -m kiln.benchmarks.xinference --xinference-bin /tmp/xinf/bin [--clients 16] [--requests 64]

Xinference (`xinference-local`, from its own virtual environment: `pip install xinference==4.1.0 torch==2.13.0
diffusers==0.42.1`, no torchvision) and `kiln serve` each launch `stable-diffusion-v1.5` with `model_path` =
Kiln's tiny checkpoint, one server at a time, and get the same closed loop of requests through the same
Xinference-shaped body (`size` "64*64", steps and guidance in `kwargs`) from the same client threads. Both run torch
on one thread (OMP_NUM_THREADS=1 for Xinference's model process, `--threads 1` for Kiln). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from .load import percentiles
from .machine import load_average, machine_facts
from .systems import free_port

MODEL = "stable-diffusion-v1.5"


def _wait(endpoint: str, path: str, seconds: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            if httpx.get(endpoint + path, timeout=5).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{endpoint} did not answer within {seconds} s")


def closed_loop(endpoint: str, uid: str, clients: int, requests: int, steps: int, guidance: float,
                headers: dict[str, str] | None = None) -> dict:
    """`clients` threads sending `requests` in all, each its next one when its last returns."""
    client = httpx.Client(base_url=endpoint, timeout=900, limits=httpx.Limits(max_connections=clients),
                          headers=headers)
    latencies: list[float] = []
    errors: list[str] = []
    counter = iter(range(requests))
    lock = threading.Lock()

    def body(index: int) -> dict:
        return {"model": uid, "prompt": f"a lighthouse at dusk {index}", "n": 1, "size": "64*64",
                "response_format": "b64_json",
                "kwargs": json.dumps({"num_inference_steps": steps, "guidance_scale": guidance})}

    def worker() -> None:
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            started = time.monotonic()
            response = client.post("/v1/images/generations", json=body(index))
            if response.status_code != 200:
                errors.append(f"{response.status_code}: {response.text[:200]}")
            latencies.append(time.monotonic() - started)

    for index in range(2):  # unmeasured warm-up: first forwards are slow
        client.post("/v1/images/generations", json=body(10_000 + index))
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.monotonic() - started
    return {"images_per_s": (requests - len(errors)) / seconds, "seconds": seconds, "errors": errors[:3],
            "latency_s": percentiles(latencies)}


def _first_run_login(endpoint: str, log: Path) -> dict[str, str]:
    """Xinference 4 serves nothing before an admin exists: create one with the setup token it logs, log in."""
    import re

    found = re.search(r"Setup token: (\S+)", log.read_text(errors="replace"))
    if found is None:
        return {}
    account = {"username": "bench", "password": "bench-password-1"}
    httpx.post(f"{endpoint}/v1/admin/setup", json={"setup_token": found.group(1), **account}, timeout=60)
    token = httpx.post(f"{endpoint}/token", json=account, timeout=60).json()["access_token"]
    return {"Authorization": f"Bearer {token}"}


def run_xinference(bin_dir: Path, checkpoint: Path, args: argparse.Namespace) -> dict:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="xinference-") as home:
        env = {**os.environ, "XINFERENCE_HOME": home, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        with open(Path(home) / "server.log", "w") as log:
            process = subprocess.Popen([str(bin_dir / "xinference-local"), "-H", "127.0.0.1", "-p", str(port)],
                                       env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait(endpoint, "/v1/models", 300, process)
            headers = _first_run_login(endpoint, Path(home) / "server.log")
            launch = httpx.post(f"{endpoint}/v1/models", timeout=900, headers=headers, json={
                "model_uid": "sd", "model_name": MODEL, "model_type": "image", "model_path": str(checkpoint)})
            if launch.status_code != 200:
                raise RuntimeError(f"Xinference launch failed: {launch.status_code} {launch.text[:500]}")
            return closed_loop(endpoint, "sd", args.clients, args.requests, args.steps, args.guidance, headers)
        finally:
            process.terminate()
            process.wait(timeout=60)


def run_kiln(checkpoint: Path, args: argparse.Namespace) -> dict:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "kiln.server.cli", "serve", "--port", str(port), "--threads", "1",
                                "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        _wait(endpoint, "/status", 300, process)
        launch = httpx.post(f"{endpoint}/v1/models", timeout=900, json={
            "model_uid": "sd", "model_name": MODEL, "model_type": "image", "model_path": str(checkpoint),
            "backend": args.kiln_backend})
        if launch.status_code != 200:
            raise RuntimeError(f"Kiln launch failed: {launch.status_code} {launch.text[:500]}")
        backend = httpx.get(f"{endpoint}/v1/models/sd", timeout=30).json().get("backend", {})
        return {**closed_loop(endpoint, "sd", args.clients, args.requests, args.steps, args.guidance),
                "backend": backend.get("backend")}
    finally:
        process.terminate()
        process.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kiln.benchmarks.xinference", description=__doc__)
    parser.add_argument("--xinference-bin", type=Path, required=True, help="bin/ of Xinference's virtual env")
    parser.add_argument("--kiln-backend", default="auto", help="Kiln's launch option backend (default: auto, which "
                        "times the backends at the model's default size, 512x512, not the 64x64 served here)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=7.5)
    args = parser.parse_args(argv)
    from kiln.engine.tiny import tiny_checkpoint

    checkpoint = tiny_checkpoint(MODEL)
    facts = machine_facts(1)
    before = load_average()
    kiln = run_kiln(checkpoint, args)
    xinference = run_xinference(args.xinference_bin, checkpoint, args)
    print(json.dumps({"cpu": facts["cpu_model"], "load_before": before, "load_after": load_average(),
                      "clients": args.clients, "requests": args.requests, "steps": args.steps, "kiln": kiln,
                      "xinference": xinference, "kiln/xinference": kiln["images_per_s"] / xinference["images_per_s"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
