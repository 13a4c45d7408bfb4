"""Where a forwarded request goes: request routers for the replica deployment.

`AdapterAwareRouter` (the default) ranks replicas for a request's adapter, keyed by its content hash, by the
requests queued there plus what bringing the adapter there costs, counted in requests: nothing where it sits
in a slot, `host_cost` (2) where it is in host memory, `disk_cost` (8) where it must be read from disk. At
equal queues that is slot, then host memory, then the least-loaded replica; a holder whose queue is longer
than another replica's by more than the difference in cost is passed over, so a hot adapter spreads over the
replicas (in host memory first) instead of queueing on one (Serve's multiplex routing keeps a model on the
replicas that report it, however long their queues). Base-model requests go to the shortest queue.

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
    def initialize_state(self, host_cost: float = 2.0, disk_cost: float = 8.0, memory_s: float = 5.0) -> None:
        """Costs, in requests queued ahead: an adapter in host memory is copied into a slot before the step
        (and may evict another), one on disk is read and validated on the replica's core first (tens of
        milliseconds, about a queue of several short requests here). `memory_s`: how long where this router
        sent an adapter counts as residency before the replica's own report says so."""
        self._host_cost = host_cost
        self._disk_cost = disk_cost
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

    def _residency_cost(self, replica: RunningReplica, adapter: str, sent: set[ReplicaID]) -> float:
        stats = replica.routing_stats or {}
        if adapter in stats.get("slot", ()) or replica.replica_id in sent:
            return 0.0
        if adapter in stats.get("host", ()):
            return self._host_cost
        return self._disk_cost

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        """Every replica, one per rank, best first by queue length plus what getting the adapter there costs;
        ties to where the adapter already is, then to the replica with the fewest adapters in slots (where
        this one evicts least). Serve sends the request to the first that has room."""
        route = route_of(pending_request)
        candidates = eligible(candidate_replicas, route)
        if route.replica is not None or len(candidates) < 2:
            return [candidates] if candidates else []
        now = time.monotonic()
        sent = {rid for rid, at in self._sent.get(route.adapter, {}).items() if now - at < self._memory_s}

        def score(r: RunningReplica) -> tuple[float, float, int]:
            cost = self._residency_cost(r, route.adapter, sent) if route.adapter else 0.0
            return self._load(r) + cost, cost, len((r.routing_stats or {}).get("slot", ()))

        return [[r] for r in sorted(candidates, key=score)]

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
