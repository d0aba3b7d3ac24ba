"""The server's Prometheus metrics, and the per-sequence bookkeeping that time-to-first-token and
inter-token latency need (kept here so the HTTP handlers only report events)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.running = Gauge("engine_requests_running", "Sequences being generated", registry=r)
        self.waiting = Gauge("engine_requests_waiting", "Sequences waiting for admission", registry=r)
        self.kv_used = Gauge("engine_kv_pages_used", "KV pages held by running sequences", registry=r)
        self.kv_free = Gauge("engine_kv_pages_free", "KV pages free or evictable from the prefix cache", registry=r)
        self.kv_cached = Gauge("engine_kv_pages_cached", "KV pages held by the prefix cache", registry=r)
        self.preemptions = Gauge("engine_preemptions", "Sequences preempted (recomputed later) so far", registry=r)
        self.decode_compiled = Gauge(
            "engine_decode_compiled", "1 once decode steps run the compiled graphs", registry=r
        )
        self.spec = [
            (
                Gauge("engine_spec_steps", "Speculative verifications (a sequence's draft scored) so far", registry=r),
                "spec_steps",
            ),
            (Gauge("engine_spec_proposed_tokens", "Draft tokens proposed so far", registry=r), "spec_proposed_tokens"),
            (Gauge("engine_spec_accepted_tokens", "Draft tokens accepted so far", registry=r), "spec_accepted_tokens"),
        ]
        self.spec_mean_accepted = Gauge(
            "engine_spec_mean_accepted_length", "Draft tokens accepted per verification, on average", registry=r
        )
        self.requests = Counter("engine_requests", "Requests received", registry=r)
        self.prompt_tokens = Counter("engine_prompt_tokens", "Prompt tokens received", registry=r)
        self.generated = Counter("engine_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("engine_time_to_first_token_seconds", "Time to first token", buckets=_BUCKETS, registry=r)
        self.itl = Histogram(
            "engine_inter_token_latency_seconds", "Time between tokens of a sequence", buckets=_BUCKETS, registry=r
        )
        self.e2e = Histogram("engine_e2e_request_latency_seconds", "Request latency", buckets=_BUCKETS, registry=r)
        self.cached_tokens = Counter(
            "engine_prompt_tokens_cached", "Prompt tokens found in the prefix cache", registry=r
        )
        # What gateways read to pick a replica, under the names vLLM's and SGLang's servers use: the Kubernetes
        # inference gateway's model-server protocol (queue length, KV-cache use), llm-d, vLLM's router.
        self.gateway = [
            (Gauge("vllm:num_requests_waiting", "Requests waiting (vLLM's name)", registry=r), "waiting"),
            (Gauge("vllm:num_requests_running", "Requests running (vLLM's name)", registry=r), "running"),
            (Gauge("vllm:kv_cache_usage_perc", "KV-cache use, 0-1 (vLLM's name)", registry=r), "kv_usage"),
            (Gauge("vllm:gpu_cache_usage_perc", "KV-cache use, 0-1 (vLLM's earlier name)", registry=r), "kv_usage"),
            (Gauge("sglang:num_queue_reqs", "Requests waiting (SGLang's name)", registry=r), "waiting"),
            (Gauge("sglang:num_running_reqs", "Requests running (SGLang's name)", registry=r), "running"),
            (Gauge("sglang:token_usage", "KV-cache use, 0-1 (SGLang's name)", registry=r), "kv_usage"),
        ]
        self.cache_config = Gauge(
            "vllm:cache_config_info", "KV-cache layout (vLLM's name)", ["block_size", "num_gpu_blocks"], registry=r
        )
        self._last_token_at: dict[str, float] = {}  # seq_id -> when its latest token arrived

    def update(self, stats: dict[str, int]) -> None:
        """The engine's stats after a step."""
        free = stats["kv_pages_free"] + stats["kv_pages_evictable"]
        self.running.set(stats["running"])
        self.waiting.set(stats["waiting"])
        self.kv_free.set(free)
        self.kv_used.set(stats["kv_pages_total"] - free)
        self.kv_cached.set(stats["kv_pages_cached"])
        self.decode_compiled.set(stats["decode_compiled"])
        self.preemptions.set(stats["preemptions"])
        for gauge, key in self.spec:
            gauge.set(stats.get(key, 0))
        self.spec_mean_accepted.set(stats.get("spec_accepted_tokens", 0) / max(1, stats.get("spec_steps", 0)))
        # Pages the prefix cache could give back count as free, as vLLM counts its evictable blocks.
        values = {**stats, "kv_usage": 1 - free / max(1, stats["kv_pages_total"])}
        for gauge, key in self.gateway:
            gauge.set(values[key])

    def describe_cache(self, page_size: int, pages: int) -> None:
        self.cache_config.labels(block_size=str(page_size), num_gpu_blocks=str(pages)).set(1)

    def request_received(self, prompt_tokens: int) -> None:
        self.requests.inc()
        self.prompt_tokens.inc(prompt_tokens)

    def tokens_arrived(self, seq_id: str, count: int, submitted_at: float, cached: int = 0) -> None:
        """`count` new tokens of a sequence: its first ones count toward TTFT (and its prompt's `cached` tokens
        toward the prefix cache's), later ones toward ITL."""
        if count == 0:
            return
        now = time.perf_counter()
        self.generated.inc(count)
        last = self._last_token_at.get(seq_id)
        if last is None:
            self.cached_tokens.inc(cached)
        (self.ttft if last is None else self.itl).observe(now - (submitted_at if last is None else last))
        self._last_token_at[seq_id] = now

    def sequence_ended(self, seq_id: str) -> None:
        self._last_token_at.pop(seq_id, None)

    def render(self) -> bytes:
        return generate_latest(self.registry)
