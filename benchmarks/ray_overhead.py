"""What Ray Serve costs Kiln on one small machine: start-up time and memory of a local Ray with two tiny
replicas, the latency the proxy, the ingress and the replica hop add per request against single-process Kiln,
throughput with one replica and with two, and the time Serve takes to replace a SIGKILLed replica.

    python -m kiln.benchmarks.ray_overhead [--requests 200] [--out benchmarks/results/ray.json]

Run as root: it moves itself into a network namespace with only loopback first (Ray advertises the machine's
address otherwise) and refuses to start Ray anywhere else. Every server is its own process session, stopped by
pid at the end; nothing runs beside another.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from kiln.cluster.isolation import Namespace, require_isolated, session_pids, stop_session
from kiln.server.client import wait_until_serving

REPO = Path(__file__).resolve().parent.parent
ONE_STEP = {"prompt": "a lighthouse", "size": "64x64", "response_format": "b64_json", "num_inference_steps": 1}
WORK = {**ONE_STEP, "num_inference_steps": 20}
LOGS = Path("/tmp") / f"kiln-ray-bench-{os.getpid()}"  # server logs and Ray's session files, removed at the end


def env() -> dict[str, str]:
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1", "RAY_TMPDIR": str(LOGS),
            "KILN_CACHE": os.environ.get("KILN_CACHE", str(REPO / ".kiln-cache")),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pss_mb(sid: int) -> float:
    """Proportional set size of every process of the session (shared pages split between them), in MB."""
    total = 0
    for pid in session_pids(sid):
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def start(args: list[str], log: Path, started: list[subprocess.Popen]) -> tuple[subprocess.Popen, str]:
    http = port()
    command = [sys.executable, "-m", "kiln.server.cli", "serve", "--port", str(http), "--threads", "1", *args]
    with log.open("w") as sink:
        process = subprocess.Popen(command, cwd=REPO, env=env(), stdout=sink, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    started.append(process)
    url = f"http://127.0.0.1:{http}"
    if not wait_until_serving(url, 300, lambda: process.poll() is None):
        raise RuntimeError(f"server did not start: {log.read_text()[-2000:]}")
    return process, url


def latency(clients: dict[str, httpx.Client], uids: dict[str, str] | None, count: int) -> dict[str, dict[str, float]]:
    """One request at a time, alternating between the servers (so both see the same machine load): p50/p99 of a
    1-step 64x64 request (engine time: a few ms), or with `uids` None of `GET /status` (no model at all: the
    proxy -> ingress hop alone)."""
    seconds: dict[str, list[float]] = {name: [] for name in clients}
    for round_ in range(count + 10):
        for name, http in clients.items():
            started = time.perf_counter()
            if uids is None:
                assert http.get("/status").status_code == 200
            else:
                assert http.post("/v1/images/generations", json={**ONE_STEP, "model": uids[name]}).status_code == 200
            if round_ >= 10:  # the first ten are warm-up
                seconds[name].append(time.perf_counter() - started)
    out = {}
    for name, values in seconds.items():
        values.sort()
        out[name] = {"p50_ms": 1000 * statistics.median(values), "p99_ms": 1000 * values[int(0.99 * (len(values) - 1))],
                     "mean_ms": 1000 * statistics.fmean(values)}
    return out


def throughput(url: str, uid: str, clients: int = 8, per_client: int = 6) -> float:
    """Closed loop: images/s of 20-step 64x64 requests from `clients` concurrent clients."""
    def run(_: int) -> None:
        with httpx.Client(base_url=url, timeout=300) as http:
            for _ in range(per_client):
                assert http.post("/v1/images/generations", json={**WORK, "model": uid}).status_code == 200

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(run, range(clients)))
    return clients * per_client / (time.perf_counter() - started)


def launch(http: httpx.Client, uid: str, **fields) -> float:
    started = time.perf_counter()
    response = http.post("/v1/models", json={"model_name": "sd-turbo", "model_uid": uid, "tiny": True, **fields})
    assert response.status_code == 200, response.text
    return time.perf_counter() - started


def ready_replicas(http: httpx.Client, uid: str) -> list[dict]:
    return [r for r in http.get(f"/v1/models/{uid}").json()["replicas"] if r["status"] == "ready"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ray.json")
    args = parser.parse_args()
    namespace = Namespace()
    require_isolated()
    load_start = os.getloadavg()[0]  # other work on the machine skews every figure: recorded beside them
    logs = LOGS
    logs.mkdir()
    results: dict[str, object] = {}
    started_here: list[subprocess.Popen] = []
    try:
        single, single_url = start([], logs / "single.log", started_here)
        solo = httpx.Client(base_url=single_url, timeout=300)
        launch(solo, "one")
        results["single_process"] = {"pss_mb": pss_mb(single.pid)}
        started = time.perf_counter()
        ray, url = start(["--ray", "local", "--replica-cpus", "0.5"], logs / "ray.log", started_here)
        front_s = time.perf_counter() - started
        http = httpx.Client(base_url=url, timeout=300)
        idle_mb = pss_mb(ray.pid)
        launch_s = launch(http, "pair", replica=2)
        results["ray"] = {"front_start_s": front_s, "two_replica_launch_s": launch_s,
                          "pss_mb_idle_front": idle_mb, "pss_mb_two_replicas": pss_mb(ray.pid)}
        figures = latency({"single_process": solo, "ray": http}, {"single_process": "one", "ray": "pair"},
                          args.requests)
        for name, values in figures.items():
            results[name].update(values)
        results["ray"]["added_p50_ms"] = figures["ray"]["p50_ms"] - figures["single_process"]["p50_ms"]
        results["ray"]["added_p99_ms"] = figures["ray"]["p99_ms"] - figures["single_process"]["p99_ms"]
        status = latency({"single_process": solo, "ray": http}, None, args.requests)
        for name, values in status.items():
            results[name]["status"] = values
        # Throughput, bracketed: single, two replicas, one replica, single again.
        single_runs = [throughput(single_url, "one")]
        results["ray"]["images_per_s_two_replicas"] = throughput(url, "pair")
        assert http.post("/v1/models/pair/replicas", json={"replica": 1}).status_code == 200
        while len(ready_replicas(http, "pair")) != 1:
            time.sleep(0.5)
        results["ray"]["images_per_s_one_replica"] = throughput(url, "pair")
        single_runs.append(throughput(single_url, "one"))
        results["single_process"]["images_per_s"] = statistics.fmean(single_runs)
        results["single_process"]["images_per_s_runs"] = single_runs
        assert http.post("/v1/models/pair/replicas", json={"replica": 2}).status_code == 200
        while len(ready_replicas(http, "pair")) != 2:
            time.sleep(0.5)
        victim = ready_replicas(http, "pair")[0]
        killed = time.perf_counter()
        os.kill(victim["pid"], 9)
        while True:
            listed = ready_replicas(http, "pair")
            if len(listed) == 2 and victim["pid"] not in {r["pid"] for r in listed}:
                break
            time.sleep(0.2)
        results["ray"]["replace_killed_replica_s"] = time.perf_counter() - killed
        solo.close()
        http.close()
    finally:
        for process in started_here:
            stop_session(process)
        namespace.leave()
        shutil.rmtree(LOGS, ignore_errors=True)
    results["machine"] = {"cpus": os.cpu_count(), "requests": args.requests, "load_average_start": load_start,
                          "load_average_end": os.getloadavg()[0]}
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
