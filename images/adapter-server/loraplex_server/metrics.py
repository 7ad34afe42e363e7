"""Prometheus metrics of the server, on a registry of its own.

`METRIC_NAMES` is the one list of what is exported; the Grafana dashboard is checked against it,
so add a name there whenever a metric is added here. Adapters are labelled by served name;
requests for names that are not declared share the label "unknown" so clients cannot blow up
the series count.

With --workers > 1 every process writes its samples to the directory named by
PROMETHEUS_MULTIPROC_DIR (set by the owner before any worker imports prometheus_client), and
`render` merges all of them, so one scrape on any process shows the whole pod. Gauges are set
by the owner only and merged with `livemax`.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

PREFIX = "loraplex_server_"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

# Names as Prometheus exposes them (counters gain `_total`, histograms `_bucket|_sum|_count`).
METRIC_NAMES: tuple[str, ...] = (
    "loraplex_server_requests_total",
    "loraplex_server_request_errors_total",
    "loraplex_server_request_ttfb_seconds",
    "loraplex_server_request_duration_seconds",
    "loraplex_server_prompt_tokens_total",
    "loraplex_server_completion_tokens_total",
    "loraplex_server_adapter_loads_total",
    "loraplex_server_adapter_load_seconds",
    "loraplex_server_adapter_evictions_total",
    "loraplex_server_adapter_failures_total",
    "loraplex_server_download_bytes_total",
    "loraplex_server_cache_size_bytes",
    "loraplex_server_adapters",
    "loraplex_server_vllm_healthy",
    "loraplex_server_manifest_generation",
    "loraplex_server_adapter_probes_total",
    "loraplex_server_adapter_probe_seconds",
)


class Metrics:
    """All collectors, created once per app so tests can run several apps in one process."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            PREFIX + "requests",
            "Proxied requests by adapter and HTTP status.",
            ["adapter", "code"],
            registry=r,
        )
        self.request_errors = Counter(
            PREFIX + "request_errors",
            "Proxied requests that ended in an error (>=400 or broken).",
            ["adapter"],
            registry=r,
        )
        self.ttfb = Histogram(
            PREFIX + "request_ttfb_seconds",
            "Time to the first response byte from vLLM.",
            ["adapter"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            PREFIX + "request_duration_seconds",
            "Whole request time, including adapter loads.",
            ["adapter"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens",
            "Prompt tokens vLLM reported in `usage`.",
            ["adapter"],
            registry=r,
        )
        self.completion_tokens = Counter(
            PREFIX + "completion_tokens",
            "Completion tokens vLLM reported in `usage`.",
            ["adapter"],
            registry=r,
        )
        self.loads = Counter(
            PREFIX + "adapter_loads",
            "Successful adapter loads into vLLM.",
            ["adapter"],
            registry=r,
        )
        self.load_seconds = Histogram(
            PREFIX + "adapter_load_seconds",
            "Seconds vLLM took to load an adapter.",
            ["adapter"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.evictions = Counter(
            PREFIX + "adapter_evictions",
            "Adapters unloaded to free a slot.",
            ["adapter"],
            registry=r,
        )
        self.failures = Counter(
            PREFIX + "adapter_failures",
            "Adapter failures by machine reason.",
            ["adapter", "reason"],
            registry=r,
        )
        self.download_bytes = Counter(
            PREFIX + "download_bytes",
            "Bytes downloaded for adapters.",
            ["adapter"],
            registry=r,
        )
        self.cache_size = Gauge(
            PREFIX + "cache_size_bytes",
            "Bytes of adapters installed in the cache directory.",
            multiprocess_mode="livemax",
            registry=r,
        )
        self.adapters = Gauge(
            PREFIX + "adapters",
            "Declared adapters by state.",
            ["state"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.vllm_healthy = Gauge(
            PREFIX + "vllm_healthy",
            "1 when vLLM's /health answered OK.",
            multiprocess_mode="livemax",
            registry=r,
        )
        self.generation = Gauge(
            PREFIX + "manifest_generation",
            "Generation of the manifest being served.",
            multiprocess_mode="livemax",
            registry=r,
        )

        self.probes = Counter(
            PREFIX + "adapter_probes",
            "Probes of newly loaded adapter files, by outcome (effect, no_effect).",
            ["outcome"],
            registry=r,
        )
        self.probe_seconds = Histogram(
            PREFIX + "adapter_probe_seconds",
            "Seconds one probe took (adapter and, once per vLLM start, base requests).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

    def render(self) -> bytes:
        path = os.environ.get(MULTIPROC_ENV)
        if not path:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path)  # type: ignore[no-untyped-call]
        return generate_latest(merged)
