"""Prometheus metrics, one registry per app (so several apps, e.g. in tests, never share counters).

Request-level numbers (tokens, TTFT, inter-token latency) are recorded by the request handlers, as the
client sees them; engine state (batch, KV cache, adapter caches) is read from the engine at scrape time.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector

from loraserve.engine.async_engine import AsyncLLMEngine
from loraserve.engine.engine import LLMEngine
from loraserve.lora.manager import LoRAStats

TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)


@dataclass
class EngineSnapshot:
    running: int  # requests with a sequence in the running batch
    waiting: int  # requests with a sequence waiting for admission
    num_blocks: int
    free_blocks: int
    preemptions: int
    lora: LoRAStats | None
    lora_slots: int
    lora_slots_used: int
    lora_host_cached: int

    @classmethod
    def of(cls, engine: LLMEngine) -> EngineSnapshot:
        """Run on the step thread (AsyncLLMEngine.run_between_steps), which mutates all of it."""
        manager = engine.lora_manager
        return cls(
            running=len({seq.request_id for seq in engine.scheduler.running}),
            waiting=len({seq.request_id for seq in engine.scheduler.waiting}),
            num_blocks=engine.blocks.num_blocks, free_blocks=engine.blocks.num_free_blocks,
            preemptions=engine.scheduler.num_preemptions,
            lora=replace(manager.stats) if manager else None,
            lora_slots=len(manager.slot_owner) if manager else 0,
            lora_slots_used=sum(owner is not None for owner in manager.slot_owner) if manager else 0,
            lora_host_cached=len(manager.host_adapters) if manager else 0)


class _EngineCollector(Collector):
    def __init__(self, engine: AsyncLLMEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        s: EngineSnapshot = self.engine.run_between_steps(EngineSnapshot.of, self.engine.engine)
        yield GaugeMetricFamily("loraserve_num_requests_running", "Requests in the running batch.", s.running)
        yield GaugeMetricFamily("loraserve_num_requests_waiting", "Requests waiting to be scheduled.", s.waiting)
        yield GaugeMetricFamily("loraserve_kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).",
                                1 - s.free_blocks / s.num_blocks)
        yield GaugeMetricFamily("loraserve_kv_cache_free_blocks", "Free KV-cache blocks.", s.free_blocks)
        yield GaugeMetricFamily("loraserve_kv_cache_blocks", "KV-cache blocks in all.", s.num_blocks)
        yield CounterMetricFamily("loraserve_num_preemptions", "Sequences preempted for lack of KV blocks.",
                                  s.preemptions)
        if s.lora is None:
            return
        yield GaugeMetricFamily("loraserve_lora_slots", "Adapter slots beside the model (max_loras).", s.lora_slots)
        yield GaugeMetricFamily("loraserve_lora_slots_used", "Adapter slots holding an adapter.", s.lora_slots_used)
        yield GaugeMetricFamily("loraserve_lora_host_cached", "Adapters held in host memory.", s.lora_host_cached)
        for cache, hits, loads, evictions in (("slot", s.lora.slot_hits, s.lora.slot_loads, s.lora.slot_evictions),
                                              ("host", s.lora.host_hits, s.lora.host_loads, s.lora.host_evictions)):
            family = CounterMetricFamily(f"loraserve_lora_{cache}_cache_events",
                                         f"Adapter {cache}-cache hits, loads and evictions.", labels=["event"])
            for event, value in (("hit", hits), ("load", loads), ("eviction", evictions)):
                family.add_metric([event], value)
            yield family
        yield SummaryMetricFamily("loraserve_lora_load_seconds", "Time reading and validating adapters from disk.",
                                  count_value=s.lora.host_loads, sum_value=s.lora.load_seconds)


class ServerMetrics:
    def __init__(self, engine: AsyncLLMEngine) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("loraserve_requests", "Generation requests (one per prompt) by served model and "
                                "outcome: finished, aborted (client gone, shutdown) or failed.",
                                ["model", "outcome"], registry=r)
        self.prompt_tokens = Counter("loraserve_prompt_tokens", "Prompt tokens processed.", ["model"], registry=r)
        self.generation_tokens = Counter("loraserve_generation_tokens", "Tokens generated.", ["model"], registry=r)
        self.ttft = Histogram("loraserve_time_to_first_token_seconds", "From request arrival to its first token.",
                              ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("loraserve_inter_token_latency_seconds", "Between consecutive tokens of a request.",
                             ["model"], buckets=ITL_BUCKETS, registry=r)
        r.register(_EngineCollector(engine))

    def render(self) -> bytes:
        """Prometheus text format. Waits for the end of the current step: call it off the event loop."""
        return generate_latest(self.registry)
