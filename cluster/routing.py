"""Which replica takes a request: the one with the least pending work, preferring one that holds the request's
LoRAs (or most of them), then one whose lane is open.

Serve's default router compares queue lengths (requests in flight), which counts a 1-step 64x64 request the same
as a 50-step 1024x1024 one. Replicas here report their pending work (images x steps x pixels, less what is done),
their open lanes and their LoRAs (resident in slots, or wanted by a request they hold) in
`KilnModel.record_routing_stats`, every ROUTING_STATS_PERIOD_S. To each report the router adds what it has itself
sent that the report does not show yet (`Bookings`), so a burst does not all land on the replica that looked
idlest, nor miss the replica that was just sent a LoRA.

A request's LoRAs reach the router as its Serve multiplexed model id (`wire.lora_set_id`, set by the front).
Serve's own multiplexing ranks replicas by the ids that `@serve.multiplexed` loaders report; Kiln's LoRAs are
loaded by the engine into slots it evicts itself, so the replicas report the LoRAs themselves, and a request is
matched by names (a replica holding a, b and c holds the set "a/b"). Serve's MultiplexMixin still takes part: a
replica chosen for one LoRA set goes to the oldest pending request of that set, not to whichever came first.

`rank` is the policy, plain and tested without Ray. `KilnRouter` is the one adapter to Serve's RequestRouter API,
which Ray 2.60 still marks alpha; within a rank Serve still skips replicas at max_ongoing_requests.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any, Hashable, Iterable, Mapping, Sequence

from ray.serve.request_router import FIFOMixin, MultiplexMixin, PendingRequest, RequestRouter, RunningReplica

from .wire import lane_of, lora_set_names, request_work

SENT_MEMORY_S = 30.0  # how long the router remembers work it sent (well past a routing stats period)


def rank(replicas: Mapping[Hashable, Mapping[str, Any]], lane: Sequence[int] | None,
         loras: Iterable[str] = (), work: float = 0.0) -> list[Hashable]:
    """Replica ids, best first. A preference wins over less work only on a replica whose pending work is within
    twice the least plus the request's own `work` (worth a join or a load saved, not a queue; and a replica that
    has just finished a request like this one may still be seen with its work). Among those, first one holding
    every LoRA of the request (elsewhere the job waits until they are read and in a slot), else one holding the
    most of them (fewer to load), then one with an open lane of the request's key. `replicas` maps id ->
    {"pending_work": float, "open_lanes": [[w, h], ...], "loras": [name, ...]}."""
    if not replicas:
        return []
    least = min(stats.get("pending_work", 0.0) for stats in replicas.values())
    wanted = set(loras)

    def key(replica_id: Hashable) -> tuple[bool, int, bool, float]:
        stats = replicas[replica_id]
        pending = stats.get("pending_work", 0.0)
        if pending > 2 * least + work:
            return (True, len(wanted), True, pending)
        missing = len(wanted - set(stats.get("loras", ())))
        joins = lane is not None and list(lane) in [list(open_lane) for open_lane in stats.get("open_lanes", ())]
        return (False, missing, not joins, pending)

    return sorted(replicas, key=key)


@dataclass
class _Booking:
    request_id: str  # Kiln's, as replicas report the requests they hold
    replica: Hashable
    at: float
    work: float
    loras: list[str]
    done: bool = False


class Bookings:
    """What the router sent to each replica that the replica's last report does not show yet.

    A request is booked under Serve's id of it (booked again: replaced). A report shows a booking when it was
    taken after it and either holds the request (by Kiln's id) or the request had completed (its LoRAs are
    then resident, its work done). Until then the booking's LoRAs, and its work while it runs, are added to the
    report: a burst does not all land on one replica, and a request still on its way, or one that finished
    before the next report, is not missed. Bookings are forgotten after SENT_MEMORY_S."""

    def __init__(self) -> None:
        self._sent: dict[str, _Booking] = {}

    def book(self, key: str, request_id: str, replica: Hashable, work: float, loras: list[str], now: float) -> None:
        self._sent = {other: sent for other, sent in self._sent.items() if sent.at > now - SENT_MEMORY_S}
        self._sent[key] = _Booking(request_id, replica, now, work, loras)

    def complete(self, key: str) -> None:
        if key in self._sent:
            self._sent[key].done = True

    def estimate(self, replica: Hashable, stats: Mapping[str, Any]) -> dict[str, Any]:
        """The replica's routing stats (as `rank` reads them) with what its report does not show yet."""
        at, held = stats.get("at", 0.0), set(stats.get("requests", ()))
        unseen = [sent for sent in self._sent.values() if sent.replica == replica
                  and (sent.at > at or not (sent.done or sent.request_id in held))]
        return {"pending_work": stats.get("pending_work", 0.0) + sum(s.work for s in unseen if not s.done),
                "open_lanes": stats.get("open_lanes", []),
                "loras": set(stats.get("loras", ())).union(*(sent.loras for sent in unseen))}


class KilnRouter(FIFOMixin, MultiplexMixin, RequestRouter):
    """Serve's RequestRouter over `rank` and `Bookings`. A request is booked to its first-ranked replica when it
    is chosen, and again to the replica Serve sends it to (Serve skips a replica at max_ongoing_requests, and
    hands a chosen replica to the oldest pending request of the same LoRA set, or else the oldest); it is marked
    done when Serve completes it."""

    def initialize_state(self, **kwargs: Any) -> None:
        self._bookings = Bookings()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        payload = _payload(pending_request)
        candidates = random.sample(candidate_replicas, len(candidate_replicas))  # ties go either way
        by_id = {replica.replica_id: replica for replica in candidates}
        estimates = {replica_id: self._bookings.estimate(replica_id, replica.routing_stats or {})
                     for replica_id, replica in by_id.items()}
        ranked = rank(estimates, lane_of(payload) if payload else None, _loras(pending_request),
                      request_work(payload) if payload else 0.0)
        if ranked:
            self._book(pending_request, ranked[0])
        return [[by_id[replica_id]] for replica_id in ranked]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: Any, result: Any) -> None:
        self._book(pending_request, replica_id)

    def on_request_completed(self, replica_id: Any, internal_request_id: str) -> None:
        self._bookings.complete(internal_request_id)

    def _book(self, pending_request: PendingRequest | None, replica_id: Any) -> None:
        payload = _payload(pending_request)
        if payload:
            self._bookings.book(pending_request.metadata.internal_request_id, payload["request_id"], replica_id,
                                request_work(payload), _loras(pending_request), time.time())


def _loras(pending_request: PendingRequest | None) -> list[str]:
    """The request's LoRAs, from its multiplexed model id (the front's `wire.request_lora_set`)."""
    return lora_set_names(pending_request.metadata.multiplexed_model_id) if pending_request else []


def _payload(pending_request: PendingRequest | None) -> dict | None:
    """The image request's payload, for `generate` calls (OCR calls carry none and rank by reports alone)."""
    if pending_request is None or not pending_request.args:
        return None
    payload = pending_request.args[0]
    return payload if isinstance(payload, dict) and "steps" in payload else None
