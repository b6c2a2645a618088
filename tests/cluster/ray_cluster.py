"""A real two-node Ray cluster for the Ray tier, inside network namespaces (kiln.cluster.isolation).

The test process moves into a namespace of its own with only loopback, adds a veth pair to a second namespace,
and starts: a Ray head on 10.77.0.1 (here), a Ray worker node on 10.77.0.2 (the other namespace), and
`kiln serve --ray 10.77.0.1:PORT` (here), whose Serve proxy listens on 127.0.0.1. Nothing is reachable but
those addresses. Every process is stopped by its id at the end, the namespaces are deleted, and the test process
returns to its own namespace.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from kiln.cluster.isolation import Namespace, VethPair, require_isolated, stop_session
from kiln.server.client import wait_until_serving

REPO = Path(__file__).resolve().parents[2]
HEAD_CPUS, WORKER_CPUS = 4, 2  # logical: replicas reserve 0.5 each and run one torch thread
TOKEN = secrets.token_hex(32)  # Ray's token auth, shared by this cluster's nodes and drivers only
STARTUP_SECONDS = 120


def unavailable() -> str | None:
    """Why the Ray tier cannot run here, or None."""
    try:
        import ray  # noqa: F401
        import ray.serve  # noqa: F401
    except ImportError:
        return "ray[serve] is not installed (pip install 'kiln[ray]')"
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return "needs root and iproute2 to run Ray inside network namespaces"
    return None


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env.update(RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1", KILN_CACHE=str(REPO / ".kiln-cache"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
               RAY_DEDUP_LOGS="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN)
    env.pop("RAY_ADDRESS", None)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RayCluster:
    veth: VethPair
    logs: Path
    gcs: str = ""
    url: str = ""
    processes: list[subprocess.Popen] = field(default_factory=list)
    namespace: Namespace | None = None

    def start(self, name: str, command: list[str]) -> subprocess.Popen:
        with (self.logs / f"{name}.log").open("w") as log:
            process = subprocess.Popen(command, cwd=REPO, env=environment(), stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        self.processes.append(process)
        return process

    def log_tail(self, name: str, chars: int = 3000) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")[-chars:]

    def nodes(self) -> list[dict]:
        """Ray's view of the alive nodes (a short-lived driver)."""
        script = ("import json, ray; ray.init(address=%r, logging_level='ERROR'); "
                  "print(json.dumps([{'ip': n['NodeManagerAddress'], 'cpus': n['Resources'].get('CPU')} "
                  "for n in ray.nodes() if n['Alive']]))" % self.gcs)
        out = subprocess.run([sys.executable, "-c", script], env=environment(), capture_output=True, text=True,
                             timeout=60)
        return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else []

    def stop(self) -> None:
        """Stop the front (it removes its Serve applications), then every process of each Ray node by id."""
        for process in reversed(self.processes):
            stop_session(process)
        self.veth.delete()
        if self.namespace is not None:
            self.namespace.leave()
        shutil.rmtree(self.logs, ignore_errors=True)


def start_cluster() -> RayCluster:
    """Enter the namespaces and start head, worker and front; raises (after cleaning up) on any failure."""
    namespace = Namespace()
    cluster = RayCluster(VethPair(f"kiln-ray-{os.getpid()}"), Path(tempfile.mkdtemp(prefix="kiln-ray-")),
                         namespace=namespace)
    try:
        require_isolated()
        cluster.veth.create()
        require_isolated(allowed=(cluster.veth.local,))
        ray = str(Path(sys.executable).with_name("ray"))
        port = free_port()
        cluster.gcs = f"{cluster.veth.local_ip}:{port}"
        common = ["--num-gpus", "0", "--disable-usage-stats", "--block", "--temp-dir", str(cluster.logs / "ray")]
        cluster.start("head", [ray, "start", "--head", "--node-ip-address", cluster.veth.local_ip, "--port",
                               str(port), "--num-cpus", str(HEAD_CPUS), "--include-dashboard", "false", *common])
        _wait_for_port(cluster.veth.local_ip, port, cluster, "head")
        cluster.start("worker", cluster.veth.in_peer([ray, "start", "--address", cluster.gcs, "--node-ip-address",
                                                      cluster.veth.peer_ip, "--num-cpus", str(WORKER_CPUS), *common]))
        deadline = time.monotonic() + STARTUP_SECONDS
        while len(cluster.nodes()) < 2:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the worker node did not join:\n{cluster.log_tail('worker')}")
            time.sleep(1)
        http = free_port()
        cluster.url = f"http://127.0.0.1:{http}"
        front = cluster.start("front", [sys.executable, "-m", "kiln.server.cli", "serve", "--ray", cluster.gcs,
                                        "--host", "127.0.0.1", "--port", str(http), "--replica-cpus", "0.5",
                                        "--threads", "1"])
        if not wait_until_serving(cluster.url, STARTUP_SECONDS, lambda: front.poll() is None):
            raise RuntimeError(f"kiln serve --ray did not answer:\n{cluster.log_tail('front')}")
        return cluster
    except BaseException:
        cluster.stop()
        raise


def _wait_for_port(host: str, port: int, cluster: RayCluster, name: str) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        with socket.socket() as sock:
            if sock.connect_ex((host, port)) == 0:
                return
        if time.monotonic() > deadline or cluster.processes[-1].poll() is not None:
            raise RuntimeError(f"Ray {name} did not start:\n{cluster.log_tail(name)}")
        time.sleep(0.3)
