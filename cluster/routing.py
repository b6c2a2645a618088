"""Which replica takes a request: the one with the least pending work, preferring one whose lane is open.

Serve's default router compares queue lengths (requests in flight), which counts a 1-step 64x64 request the same
as a 50-step 1024x1024 one. Replicas here report their pending work (images x steps x pixels, less what is done)
and their open lanes (`KilnModel.record_routing_stats`, every ROUTING_STATS_PERIOD_S). Between reports the router
adds the work it has itself sent since, so a burst does not all land on the replica that looked idlest.

`rank` is the policy, plain and tested without Ray. `KilnRouter` is the one adapter to Serve's RequestRouter API,
which Ray 2.60 still marks alpha; within a rank Serve still skips replicas at max_ongoing_requests.
"""

from __future__ import annotations

import random
import time
from typing import Any, Hashable, Mapping, Sequence

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from .wire import lane_of, request_work

SENT_MEMORY_S = 30.0  # how long the router remembers work it sent (well past a routing stats period)


def rank(replicas: Mapping[Hashable, Mapping[str, Any]], lane: Sequence[int] | None) -> list[Hashable]:
    """Replica ids, best first: an open lane of the request's key wins over less work only when the lane's
    replica has no more than twice the least pending work (a lane is worth joining, not worth queueing behind).
    `replicas` maps id -> {"pending_work": float, "open_lanes": [[w, h], ...]}."""
    if not replicas:
        return []
    least = min(stats.get("pending_work", 0.0) for stats in replicas.values())

    def key(replica_id: Hashable) -> tuple[int, float]:
        stats = replicas[replica_id]
        work = stats.get("pending_work", 0.0)
        joins = lane is not None and list(lane) in [list(open_lane) for open_lane in stats.get("open_lanes", ())]
        return (0 if joins and work <= 2 * least + 1 else 1, work)

    return sorted(replicas, key=key)


class KilnRouter(FIFOMixin, RequestRouter):
    """Serve's RequestRouter over `rank`, with the work sent since each replica's last report added in.

    The work is booked to the first-ranked replica when it is chosen (Serve takes it unless that replica is at
    max_ongoing_requests) under the request's id, so a request ranked again replaces its booking; it is
    released when the request completes, and forgotten after SENT_MEMORY_S."""

    def initialize_state(self, **kwargs: Any) -> None:
        self._sent: dict[str, tuple[Any, float, float]] = {}  # request id -> (replica id, time, work)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        payload = _payload(pending_request)
        candidates = random.sample(candidate_replicas, len(candidate_replicas))  # ties go either way
        by_id = {replica.replica_id: replica for replica in candidates}
        estimates = {replica_id: self._estimate(replica) for replica_id, replica in by_id.items()}
        ranked = rank(estimates, lane_of(payload) if payload else None)
        if payload and ranked:
            now = time.time()
            self._sent = {key: sent for key, sent in self._sent.items() if sent[1] > now - SENT_MEMORY_S}
            self._sent[pending_request.metadata.internal_request_id] = (ranked[0], now, request_work(payload))
        return [[by_id[replica_id]] for replica_id in ranked]

    def on_request_completed(self, replica_id: Any, internal_request_id: str) -> None:
        self._sent.pop(internal_request_id, None)

    def _estimate(self, replica: RunningReplica) -> dict[str, Any]:
        stats = replica.routing_stats or {}
        reported_at = stats.get("at", 0.0)
        since = sum(work for replica_id, at, work in self._sent.values()
                    if replica_id == replica.replica_id and at > reported_at)
        return {"pending_work": stats.get("pending_work", 0.0) + since, "open_lanes": stats.get("open_lanes", [])}


def _payload(pending_request: PendingRequest | None) -> dict | None:
    """The image request's payload, for `generate` calls (OCR calls carry none and rank by reports alone)."""
    if pending_request is None or not pending_request.args:
        return None
    payload = pending_request.args[0]
    return payload if isinstance(payload, dict) and "steps" in payload else None
