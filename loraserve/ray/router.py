"""Where a forwarded request goes: request routers for the replica deployment.

`AdapterAwareRouter` (the default) ranks replicas in tiers for a request's adapter, keyed by its content hash:
the replicas holding it in a slot, then those holding it in host memory, then every replica; Serve takes the
replica with the shortest queue within the first tier that has room (on a tie, the one with the fewest
adapters in slots). A holder whose batch is full, or whose queue is longer than the shortest by more than a
margin, drops out of the first two tiers, so a hot adapter spreads instead of queueing on one replica
(Serve's multiplex routing keeps a model on the replicas that report it). Base-model requests rank every
replica as one tier: the shortest queue wins.

Residency comes from each replica's routing stats (EngineReplica.record_routing_stats, a fraction of a second
old), and, until those catch up, from where this router sent the adapter last: the burst of requests for an
adapter nobody holds goes to one replica, not to all of them.

`RoundRobinRouter` and `MultiplexRouter` (Serve's default power-of-two-choices with multiplexed model ids) are
the baselines benchmarks/scale_out.py compares with. All three honour a request pinned to one replica (the
ingress's `x-loraserve-replica` request header).
"""
from __future__ import annotations

import itertools
import time
from collections import Counter
from dataclasses import dataclass

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica


@dataclass(frozen=True)
class Route:
    """What routers read of a forwarded request: the first argument of EngineReplica.forward."""

    adapter: str = ""  # the content hash of the adapter the request applies; '' for the base model
    replica: str | None = None  # pinned to the replica with this id (ReplicaID.unique_id)
    version: int = 0  # the adapter catalog's version the ingress saw; a replica behind it catches up first


def route_of(request: PendingRequest | None) -> Route:
    """The request's Route, read by field names: Serve ships a router class to the handle's process by value,
    so its `Route` is a copy of this one and isinstance() would not know the ingress's instances."""
    first = request.args[0] if request is not None and request.args else None
    if type(first).__name__ != Route.__name__:
        return Route()
    return Route(**{f: getattr(first, f) for f in Route.__dataclass_fields__})


def eligible(candidates: list[RunningReplica], route: Route) -> list[RunningReplica]:
    """The pinned replica alone (none while it is not running: Serve retries until it is), else all."""
    if route.replica is not None:
        return [r for r in candidates if r.replica_id.unique_id == route.replica]
    return candidates


class AdapterAwareRouter(RequestRouter):
    def initialize_state(self, saturation: int | None = None, imbalance: int = 8, memory_s: float = 5.0) -> None:
        """A holder is passed over, for a replica with fewer requests, once its batch is full (`saturation`
        requests; default its max_num_seqs, beyond which requests wait) or once it has more than `imbalance`
        requests above the least-loaded replica (on a CPU each request in a batch slows the step for all: a
        cold load, tens of milliseconds, costs less than a much longer batch). `memory_s`: how long where
        this router sent an adapter counts as residency before the replica's own report says so."""
        self._saturation = saturation
        self._imbalance = imbalance
        self._memory_s = memory_s
        self._sent: dict[str, dict[ReplicaID, float]] = {}
        self._in_flight: Counter[ReplicaID] = Counter()  # requests this router sent that have not ended

    def _load(self, replica: RunningReplica) -> int:
        """Requests on the replica: the most of what this router has in flight there (exact for its own),
        Serve's queue-length cache (the replica's count at the last probe, which forgets after a while) and
        the replica's last report (what other ingress replicas sent too, a fraction of a second old)."""
        stats = replica.routing_stats or {}
        reported = int(stats.get("running", 0)) + int(stats.get("waiting", 0))
        cached = self.replica_queue_len_cache.get(replica.replica_id) or 0
        return max(self._in_flight[replica.replica_id], cached, reported)

    def _full_at(self, replica: RunningReplica) -> int:
        if self._saturation is not None:
            return self._saturation
        return int((replica.routing_stats or {}).get("max_num_seqs", 1 << 30))

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        route = route_of(pending_request)
        candidates = eligible(candidate_replicas, route)
        if route.replica is not None or not route.adapter or len(candidates) < 2:
            return [candidates] if candidates else []
        loads = {r.replica_id: self._load(r) for r in candidates}
        least = min(loads.values())

        def has_room(r: RunningReplica) -> bool:
            load = loads[r.replica_id]
            return load <= least or (load < self._full_at(r) and load - least <= self._imbalance)

        now = time.monotonic()
        sent = {rid for rid, at in self._sent.get(route.adapter, {}).items() if now - at < self._memory_s}
        in_slot, in_host = [], []
        for r in candidates:
            stats = r.routing_stats or {}
            if route.adapter in stats.get("slot", ()) or r.replica_id in sent:
                in_slot.append(r)
            elif route.adapter in stats.get("host", ()):
                in_host.append(r)
        tiers = [[r for r in in_slot if has_room(r)], [r for r in in_host if has_room(r)], candidates]
        # Among equal queues Serve takes the first: the replica with the fewest adapters in slots, where this
        # one evicts least.
        return [sorted(tier, key=lambda r: len((r.routing_stats or {}).get("slot", ()))) for tier in tiers if tier]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        self._in_flight[replica_id] += 1
        route = route_of(pending_request)
        if route.adapter:
            self._sent.setdefault(route.adapter, {})[replica_id] = time.monotonic()

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        if self._in_flight[replica_id] > 0:
            self._in_flight[replica_id] -= 1

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._in_flight.pop(replica_id, None)
        for replicas in self._sent.values():
            replicas.pop(replica_id, None)


class RoundRobinRouter(RequestRouter):
    """Each request to the next replica in turn, whatever it applies (a baseline)."""

    def initialize_state(self) -> None:
        self._turn = itertools.count()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        candidates = sorted(eligible(candidate_replicas, route_of(pending_request)),
                            key=lambda r: r.replica_id.unique_id)
        return [[candidates[next(self._turn) % len(candidates)]]] if candidates else []


class MultiplexRouter(PowerOfTwoChoicesRequestRouter):
    """Serve's default router, multiplexed model id = the adapter's content hash (a baseline)."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        route = route_of(pending_request)
        if route.replica is not None:
            pinned = eligible(candidate_replicas, route)
            return [pinned] if pinned else []
        return await super().choose_replicas(candidate_replicas, pending_request)


ROUTERS = {"adapter-aware": AdapterAwareRouter, "round-robin": RoundRobinRouter, "multiplex": MultiplexRouter}
