"""Xinference's scale-out launch fields -> where and how many replicas Serve runs, and Serve's own settings.

    placement = parse_placement(fields, ClusterView(node_ips=("10.0.0.1",), gpus=8))  # pops the fields; 400s
    options = deployment_options(placement, cpus_per_replica=1.0)                    # Deployment.options(...)

Serve's defaults are replaced here on purpose, each with its reason: its `max_ongoing_requests` default (5) would
cap a replica, and the ingress with it the whole service, at 5 concurrent requests, and its 20 s graceful
shutdown would kill a long generation when a replica is scaled down. Torch-free and Ray-free, so the rules are
tested without a cluster.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, MutableMapping

from kiln.engine.coerce import Unparsable, to_int
from kiln.engine.errors import InvalidRequest

SCALE_FIELDS = ("replica", "n_gpu", "gpu_idx", "worker_ip", "request_limits")

# One model replica: requests it holds at once (Kiln's own scheduler batches and queues them, up to its
# max_queue_size; more in flight than the largest lane batch keeps its batches full).
MODEL_MAX_ONGOING = 64
# The ingress holds every in-flight HTTP request of the service, streams included.
INGRESS_MAX_ONGOING = 4096
GRACEFUL_SHUTDOWN_S = 600.0  # a draining replica finishes its generations (Serve's default: 20 s)
GRACEFUL_WAIT_LOOP_S = 1.0
HEALTH_PERIOD_S = 5.0
HEALTH_TIMEOUT_S = 30.0
CONSTRUCTOR_RETRIES = 2  # a model that cannot load fails its launch fast, instead of restarting forever
ROUTING_STATS_PERIOD_S = 0.5  # how often replicas report their pending work to the router


@dataclass(frozen=True)
class ClusterView:
    """What the placement rules need to know of the cluster: its alive nodes' addresses and its GPUs."""

    node_ips: tuple[str, ...]
    gpus: float = 0.0


@dataclass(frozen=True)
class Placement:
    """Where one model's replicas run. `gpu_idx` pins replica i to GPU gpu_idx[i % len] of its node."""

    replicas: int = 1
    gpus_per_replica: float = 0.0
    gpu_idx: tuple[int, ...] = ()
    worker_ip: str | None = None
    request_limits: int | None = None  # requests in flight across the model's replicas; past it, 429

    def describe(self) -> dict[str, Any]:
        return {**asdict(self), "gpu_idx": list(self.gpu_idx)}


def _bad(field: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"{field}: {message}", field, "unsupported_option")


def _count(field: str, value: Any, low: int) -> int:
    try:
        number = to_int(value)
    except Unparsable:
        number = low - 1
    if number < low:
        raise _bad(field, f"got {value!r}; accepted: an integer >= {low}")
    return number


def parse_placement(fields: MutableMapping[str, Any], cluster: ClusterView) -> Placement:
    """Pop the scale-out fields from a launch body and check them against the cluster (InvalidRequest, a 400
    naming the field, when one cannot be honoured)."""
    raw = {name: fields.pop(name, None) for name in SCALE_FIELDS if name != "n_gpu"}
    n_gpu = fields.pop("n_gpu", "auto")  # absent: auto; null: no GPU (Xinference's `--n-gpu none`)
    replicas = 1 if raw["replica"] is None else _count("replica", raw["replica"], 1)
    worker_ip = raw["worker_ip"]
    if worker_ip is not None and worker_ip not in cluster.node_ips:
        raise _bad("worker_ip", f"no alive Ray node has address {worker_ip!r}; nodes: {', '.join(cluster.node_ips)}")
    gpu_idx = _gpu_idx(raw["gpu_idx"], cluster, worker_ip)
    if isinstance(n_gpu, str) and n_gpu.lower() == "auto":
        gpus = 0.0 if gpu_idx else float(cluster.gpus > 0)
    elif n_gpu is None:
        gpus = 0.0
    else:
        gpus = float(_count("n_gpu", n_gpu, 0))
        if gpu_idx and gpus:
            raise _bad("n_gpu", "give n_gpu or gpu_idx, not both: gpu_idx already names the GPUs")
        if gpus > cluster.gpus:
            raise _bad("n_gpu", f"{int(gpus)} GPUs per replica asked for; the cluster has {cluster.gpus:g}")
    limits = raw["request_limits"]
    return Placement(replicas, gpus, gpu_idx, worker_ip, None if limits is None else _count("request_limits", limits, 1))


def _gpu_idx(value: Any, cluster: ClusterView, worker_ip: str | None) -> tuple[int, ...]:
    """GPU indices name devices of one machine, so they mean something only on a one-node cluster or with
    worker_ip; Ray does not track them (its GPU accounting may double-book them)."""
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    indices = tuple(_count("gpu_idx", item, 0) for item in items)
    if not indices:
        return ()
    if len(cluster.node_ips) > 1 and worker_ip is None:
        raise _bad("gpu_idx", f"GPU indices name the GPUs of one machine, and this cluster has "
                              f"{len(cluster.node_ips)} nodes; give worker_ip too, or use n_gpu and let Ray place "
                              f"the replicas")
    if cluster.gpus == 0:
        raise _bad("gpu_idx", "the cluster has no GPUs")
    return indices


def deployment_options(placement: Placement, cpus_per_replica: float) -> dict[str, Any]:
    """`Deployment.options(...)` for one model's deployment (the request router is added by `front`)."""
    actor: dict[str, Any] = {"num_cpus": cpus_per_replica, "num_gpus": placement.gpus_per_replica}
    if placement.worker_ip is not None:
        actor["resources"] = {f"node:{placement.worker_ip}": 0.001}  # every Ray node has this resource
    return {
        "num_replicas": placement.replicas,
        "ray_actor_options": actor,
        "max_ongoing_requests": MODEL_MAX_ONGOING,
        "graceful_shutdown_timeout_s": GRACEFUL_SHUTDOWN_S,
        "graceful_shutdown_wait_loop_s": GRACEFUL_WAIT_LOOP_S,
        "health_check_period_s": HEALTH_PERIOD_S,
        "health_check_timeout_s": HEALTH_TIMEOUT_S,
        "max_constructor_retry_count": CONSTRUCTOR_RETRIES,
    }


def ingress_options() -> dict[str, Any]:
    """The ingress: no CPU reserved (it only awaits), one replica (it holds the progress table and url images)."""
    return {
        "name": "KilnIngress",
        "num_replicas": 1,
        "ray_actor_options": {"num_cpus": 0},
        "max_ongoing_requests": INGRESS_MAX_ONGOING,
        "graceful_shutdown_timeout_s": GRACEFUL_SHUTDOWN_S,
        "graceful_shutdown_wait_loop_s": GRACEFUL_WAIT_LOOP_S,
        "health_check_period_s": HEALTH_PERIOD_S,
        "health_check_timeout_s": HEALTH_TIMEOUT_S,
    }


def device_for(placement: Placement, rank: int) -> str | None:
    """The `device` launch option of the replica of this rank: pinned by gpu_idx, else Kiln's own choice."""
    if not placement.gpu_idx:
        return None
    return f"cuda:{placement.gpu_idx[rank % len(placement.gpu_idx)]}"


def placement_from(described: Mapping[str, Any]) -> Placement:
    """The inverse of `Placement.describe` (a placement crosses to the replicas as plain data)."""
    return Placement(**{**described, "gpu_idx": tuple(described.get("gpu_idx", ()))})
