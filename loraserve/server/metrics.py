"""Prometheus metrics, one registry per app (so several apps, e.g. in tests, never share counters).

Request-level numbers (tokens, TTFT, inter-token latency) are recorded by the request handlers, as the
client sees them; engine state (batch, KV cache, adapter caches) is read from the engine at scrape time.
Beside loraserve's own `loraserve_*` names, engine state is also exported under the `vllm:` names that
Kubernetes LoRA-aware routers (Gateway API inference extension / llm-d endpoint picker, KServe) scrape; their
"gpu" / "cpu" words are kept for those readers although everything here is in CPU memory (docs/scale-out.md).
"""
from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from loraserve.engine.async_engine import EngineStats

MAX_ADAPTER_LABELS = 256
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)


class _EngineCollector(Collector):
    """Engine state from the snapshot the /metrics handler took just before rendering."""

    def __init__(self) -> None:
        self.stats: EngineStats | None = None

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        if s is None:
            return
        yield GaugeMetricFamily("loraserve_num_requests_running", "Requests in the running batch.", s.running)
        yield GaugeMetricFamily("loraserve_num_requests_waiting", "Requests waiting to be scheduled.", s.waiting)
        yield GaugeMetricFamily("loraserve_kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).",
                                1 - s.free_blocks / s.num_blocks)
        yield GaugeMetricFamily("loraserve_kv_cache_free_blocks", "Free KV-cache blocks.", s.free_blocks)
        yield GaugeMetricFamily("loraserve_kv_cache_blocks", "KV-cache blocks in all.", s.num_blocks)
        yield GaugeMetricFamily("loraserve_model_weight_bytes", "Bytes of model weights held (quantized weights "
                                "at their quantized size).", s.weight_bytes)
        yield GaugeMetricFamily("loraserve_model_resident_bytes", "Resident memory that building the model added "
                                "to the process (compare with loraserve_model_weight_bytes).", s.model_resident_bytes)
        yield GaugeMetricFamily("loraserve_resident_memory_bytes", "The process's resident memory.", s.resident_bytes)
        yield CounterMetricFamily("loraserve_num_preemptions", "Sequences preempted for lack of KV blocks.",
                                  s.preemptions)
        yield CounterMetricFamily("loraserve_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                  s.prefix_queried_tokens)
        yield CounterMetricFamily("loraserve_prefix_cache_hits", "Prompt tokens found in the prefix cache (their "
                                  "KV reused, not recomputed).", s.prefix_hit_tokens)
        yield from _vllm_engine_metrics(s)
        lora = s.lora
        if lora is None:
            return
        yield from _vllm_lora_metrics(s)
        yield GaugeMetricFamily("loraserve_lora_slots", "Adapter slots beside the model (max_loras).", lora.num_slots)
        yield GaugeMetricFamily("loraserve_lora_slots_used", "Adapter slots holding an adapter.", lora.slots_used)
        yield GaugeMetricFamily("loraserve_lora_host_cached", "Adapters held in host memory.", lora.host.cached)
        events = (("slot", "Adapter slot events, counted per step that needs the adapter", lora.slots),
                  ("host", "Adapter host-cache events, one per request that uses an adapter", lora.host))
        for cache, doc, counts in events:
            family = CounterMetricFamily(f"loraserve_lora_{cache}_cache_events", f"{doc}: hits, loads, evictions.",
                                         labels=["event"])
            for event, value in (("hit", counts.hits), ("load", counts.loads), ("eviction", counts.evictions)):
                family.add_metric([event], value)
            yield family
        yield SummaryMetricFamily("loraserve_lora_load_seconds", "Time reading and validating adapters from disk.",
                                  count_value=lora.host.loads, sum_value=lora.host.load_seconds)
        yield _load_histogram(lora.host.load_buckets, lora.host.load_seconds)


def _vllm_engine_metrics(s: EngineStats) -> Iterator[Metric]:
    """vLLM's names for the batch and the KV cache: the same values as the loraserve_ ones."""
    yield GaugeMetricFamily("vllm:num_requests_running", "Requests in the running batch.", s.running)
    yield GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting to be scheduled.", s.waiting)
    yield GaugeMetricFamily("vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).",
                            1 - s.free_blocks / s.num_blocks)
    info = GaugeMetricFamily("vllm:cache_config_info", "KV-cache configuration (block_size in tokens; "
                             "num_gpu_blocks: KV blocks, in CPU memory here).",
                             labels=["block_size", "num_gpu_blocks"])
    info.add_metric([str(s.block_size), str(s.num_blocks)], 1)
    yield info


def _vllm_lora_metrics(s: EngineStats) -> Iterator[Metric]:
    """vLLM's adapter names, which routers read to send a request where its adapter is running or resident."""
    lora = s.lora
    assert lora is not None  # called only when LoRA is enabled
    info = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on lora requests (value: time of the "
                             "snapshot, unix seconds).",
                             labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
    info.add_metric([",".join(s.running_adapters), ",".join(s.waiting_adapters), str(lora.num_slots)], s.taken_at)
    yield info
    loaded = GaugeMetricFamily("vllm:lora_adapter_loaded", "Adapters resident: level gpu in a slot beside the "
                               "model, cpu in host memory only (both CPU memory here).",
                               labels=["adapter_name", "level", "rank"])
    by_name: dict[str, tuple[bool, int]] = {}
    for adapter in lora.resident:  # one series per name (ids may share one): "gpu" if any of them is in a slot
        by_name[adapter.name] = max(by_name.get(adapter.name, (False, 0)), (adapter.in_slot, adapter.rank))
    for name, (in_slot, rank) in sorted(by_name.items()):
        loaded.add_metric([name, "gpu" if in_slot else "cpu", str(rank)], 1)
    yield loaded
    yield GaugeMetricFamily("vllm:num_gpu_loaded_lora_adapters", "Adapters in a slot beside the model.",
                            lora.slots_used)
    yield GaugeMetricFamily("vllm:max_gpu_lora_adapters", "Adapter slots beside the model (max_loras).",
                            lora.num_slots)


def _load_histogram(counts: tuple[tuple[float, int], ...], total_seconds: float) -> Metric:
    """Each adapter load from disk, from the host cache's (upper bound, count) per bucket, made cumulative."""
    cumulative, buckets = 0, []
    for bound, count in counts:
        cumulative += count
        buckets.append((floatToGoString(bound), cumulative))
    return HistogramMetricFamily("loraserve_lora_load_duration_seconds", "Time reading and validating one "
                                 "adapter from disk.", buckets=buckets, sum_value=total_seconds)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # "adapter": what the request applied, '' (the base), a name, name@scale or a mix's name*weight+...
        self.requests = Counter("loraserve_requests", "Generation requests (one per prompt) by served model, "
                                "adapter identity and outcome: finished, aborted (client gone, shutdown) or failed.",
                                ["model", "adapter", "outcome"], registry=r)
        self.prompt_tokens = Counter("loraserve_prompt_tokens", "Prompt tokens processed.", ["model", "adapter"],
                                     registry=r)
        self.generation_tokens = Counter("loraserve_generation_tokens", "Tokens generated.", ["model", "adapter"],
                                         registry=r)
        self.ttft = Histogram("loraserve_time_to_first_token_seconds", "From request arrival to its first token.",
                              ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("loraserve_inter_token_latency_seconds", "Between consecutive tokens of a request.",
                             ["model"], buckets=ITL_BUCKETS, registry=r)
        self.refused = Counter("loraserve_requests_refused", "Requests refused before any work, by reason: "
                               "unauthorized, invalid_request, model_not_found, adapter_source, body_too_large, "
                               "a limit's name, concurrency_limit, queue_full...", ["reason"], registry=r)
        self.failed = Counter("loraserve_requests_failed", "Requests that failed while running, by reason: "
                              "step_error, nonfinite_logits, engine_stopped, internal_error.", ["reason"], registry=r)
        self._engine = _EngineCollector()
        r.register(self._engine)
        self._adapter_labels: set[str] = set()

    def adapter(self, identity: str) -> str:
        """The `adapter` label for an identity: itself for the first MAX_ADAPTER_LABELS identities seen, then
        "other" (clients choose scales and weights freely; the series must not grow without bound)."""
        if identity in self._adapter_labels:
            return identity
        if len(self._adapter_labels) < MAX_ADAPTER_LABELS:
            self._adapter_labels.add(identity)
            return identity
        return "other"

    def render(self, stats: EngineStats) -> bytes:
        """Prometheus text format, with the engine's state as of `stats`."""
        self._engine.stats = stats
        return generate_latest(self.registry)
