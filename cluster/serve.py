"""`kiln serve --ray local|ADDRESS` and `kiln ray-config`: Kiln's front on Ray Serve.

`--ray local` starts a Ray instance in this process (one machine, e.g. several GPUs); `--ray ADDRESS` joins an
existing cluster (`auto`, `HOST:PORT`, or `ray://HOST:PORT`). Either way Serve's proxy listens on --host/--port,
the `kiln` application is the ingress, and each launched model becomes application `kiln-m-<uid>`. The command
runs until interrupted, then removes the applications it deployed (and, with `local`, stops Ray). For a
deployment that outlives the command, `kiln ray-config` writes the Serve config for `serve deploy` or a KubeRay
RayService. This module imports Ray only when a command runs: the base install has none.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Any

from kiln.server.app import Settings

from .front import APP_PREFIX, ClusterSettings

INGRESS_IMPORT_PATH = "kiln.cluster.ingress:build"


def serve_on_ray(address: str, host: str, port: int, settings: Settings, cluster: ClusterSettings) -> int:
    """Deploy the front on Ray and block until SIGINT/SIGTERM."""
    try:
        import ray
        from ray import serve
    except ImportError:
        print("kiln: error: --ray needs Ray Serve: pip install 'kiln[ray]'", file=sys.stderr)
        return 2
    from .ingress import INGRESS_APP, application

    local = address == "local"
    # "local" always starts a new instance: without an address ray.init would join the last `ray start` cluster.
    ray.init(address=address, include_dashboard=False if local else None)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        serve.start(proxy_location="HeadOnly", http_options={"host": host, "port": port})
        serve.run(application(settings, cluster), name=INGRESS_APP, route_prefix="/")
        print(f"Kiln is serving on Ray Serve at http://{host}:{port}", flush=True)
        stop.wait()
    finally:
        apps = list(serve.status().applications) if ray.is_initialized() else []
        for name in apps:
            if name == INGRESS_APP or name.startswith(APP_PREFIX):
                serve.delete(name)
        if local:
            serve.shutdown()
            ray.shutdown()
    return 0


def serve_config(host: str, port: int, launch: list[dict[str, Any]], cluster: ClusterSettings) -> dict[str, Any]:
    """A Serve config (ServeDeploySchema) that runs Kiln's front: JSON, which YAML readers accept as it is."""
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": host, "port": port},
        "applications": [{
            "name": "kiln",
            "route_prefix": "/",
            "import_path": INGRESS_IMPORT_PATH,
            "args": {"launch": launch, "cpus_per_replica": cluster.cpus_per_replica, "threads": cluster.threads},
        }],
    }


def cmd_ray_config(args: argparse.Namespace) -> int:
    launch = [{"model_name": name} for name in dict.fromkeys(args.launch)]
    config = serve_config(args.host, args.port, launch, ClusterSettings(args.replica_cpus, args.threads))
    print(json.dumps(config, indent=2))
    return 0


def add_command(commands: argparse._SubParsersAction) -> None:
    """The `kiln ray-config` subcommand (a `kiln.commands` entry point)."""
    parser = commands.add_parser("ray-config", help="print a Ray Serve config for `serve deploy` or KubeRay")
    parser.add_argument("--host", default="0.0.0.0", help="where Serve's proxy listens (default: %(default)s)")
    parser.add_argument("--port", type=int, default=9997)
    parser.add_argument("--launch", nargs="+", default=[], metavar="NAME", help="models launched with the front")
    parser.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs reserved per model replica")
    parser.add_argument("--threads", type=int, help="torch threads in each replica")
    parser.set_defaults(handler=cmd_ray_config)
