"""The engine's metrics on Ray Serve's Prometheus endpoint, tagged per adapter.

`ServeEngineMetrics` implements the engine's `EngineMetrics` hooks with `ray.serve.metrics`, which add
the deployment, replica and application tags; Ray exports them (prefixed `ray_`) on every node's
metrics port. Create it inside a replica: the Serve tags are only known there.
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

PREFIX = "loraforge_"
ADAPTER_TAG = "adapter"
# Seconds: a tiny CPU model answers in milliseconds, a large one behind a long queue in seconds.
TTFT_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
TOKENS_PER_S_BOUNDARIES = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]


class ServeEngineMetrics:
    """EngineMetrics for one replica; called from the engine's loop thread."""

    def __init__(self) -> None:
        tags = (ADAPTER_TAG,)
        self.ttft = Histogram(f"{PREFIX}time_to_first_token_seconds", "seconds from arrival to the first token",
                              boundaries=TTFT_BOUNDARIES, tag_keys=tags)
        self.tokens = Counter(f"{PREFIX}generated_tokens", "completion tokens generated", tag_keys=tags)
        self.tokens_per_s = Histogram(f"{PREFIX}request_tokens_per_second",
                                      "completion tokens / seconds from first token to the last, per request",
                                      boundaries=TOKENS_PER_S_BOUNDARIES, tag_keys=tags)
        self.waiting = Gauge(f"{PREFIX}queue_waiting_requests", "requests queued, not yet in the batch")
        self.running = Gauge(f"{PREFIX}running_requests", "requests in the running batch")
        self.cache_hits = Counter(f"{PREFIX}adapter_cache_hits", "lookups that found the adapter resident",
                                  tag_keys=tags)
        self.cache_misses = Counter(f"{PREFIX}adapter_cache_misses", "lookups that had to load the adapter",
                                    tag_keys=tags)

    def queue_length(self, waiting: int, running: int) -> None:
        self.waiting.set(waiting)
        self.running.set(running)

    def first_token(self, model: str, seconds: float) -> None:
        self.ttft.observe(seconds, tags={ADAPTER_TAG: model})

    def generated(self, model: str, tokens: int, seconds: float) -> None:
        if tokens <= 0:
            return
        self.tokens.inc(tokens, tags={ADAPTER_TAG: model})
        if seconds > 0:
            self.tokens_per_s.observe(tokens / seconds, tags={ADAPTER_TAG: model})

    def cache_lookup(self, model: str, hit: bool) -> None:
        (self.cache_hits if hit else self.cache_misses).inc(1, tags={ADAPTER_TAG: model})
