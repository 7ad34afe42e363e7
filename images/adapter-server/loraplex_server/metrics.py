"""Prometheus metrics of the server, on a registry of its own.

`METRIC_NAMES` is the one list of what is exported; the Grafana dashboard is checked against it,
so add a name there whenever a metric is added here. Adapters are labelled by served name;
requests for names that are not declared share the label "unknown" so clients cannot blow up
the series count.

Label cardinality is bounded for declared adapters too: with 10,000 adapters on a pod, one
series per adapter per family (histograms: 17 series each) would be hundreds of thousands of
series per pod. `AdapterSeries` keeps its own series only for the `max_adapter_series` (200)
adapters used most recently; when a new adapter needs a series, the least recently used one's
series are removed from every family and it is counted under adapter="other" from then on
until it is among the recent ones again. Sums over all adapters stay right (`sum(rate(...))`
sees the removed series end and "other" grow); per-adapter detail is kept where it is wanted,
for the adapters in use. The gauge of adapters by state is per state, not per adapter.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase

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
)


OTHER = "other"
_SHARED = frozenset({OTHER, "unknown"})
M = TypeVar("M", bound=MetricWrapperBase)


class AdapterSeries:
    """Which adapters get series of their own: the `limit` used most recently (see above)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._families: list[MetricWrapperBase] = []

    def label(self, adapter: str) -> str:
        if adapter in _SHARED:
            return adapter
        if adapter in self._recent:
            self._recent.move_to_end(adapter)
            return adapter
        if self.limit <= 0:
            return OTHER
        if len(self._recent) >= self.limit:
            old, _ = self._recent.popitem(last=False)
            self._drop(old)
        self._recent[adapter] = None
        return adapter

    def _drop(self, adapter: str) -> None:
        for family in self._families:
            # prometheus_client has no "remove by one label"; its children are keyed by tuple.
            for values in [v for v in list(family._metrics) if v and v[0] == adapter]:
                family.remove(*values)


class Bounded(Generic[M]):
    """A family whose first label is the adapter, passed through `AdapterSeries`."""

    def __init__(self, family: M, series: AdapterSeries) -> None:
        self.family = family
        self._series = series
        series._families.append(family)

    def labels(self, adapter: str, *rest: str) -> M:
        child: M = self.family.labels(self._series.label(adapter), *rest)
        return child

    def __getattr__(self, name: str) -> Any:
        return getattr(self.family, name)


class Metrics:
    """All collectors, created once per app so tests can run several apps in one process."""

    def __init__(self, max_adapter_series: int = 200) -> None:
        self.series = AdapterSeries(max_adapter_series)
        self._init_families()
        for name in (
            "requests",
            "request_errors",
            "ttfb",
            "duration",
            "prompt_tokens",
            "completion_tokens",
            "loads",
            "load_seconds",
            "evictions",
            "failures",
            "download_bytes",
        ):
            setattr(self, name, Bounded(getattr(self, name), self.series))

    def _init_families(self) -> None:
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
            registry=r,
        )
        self.adapters = Gauge(
            PREFIX + "adapters",
            "Declared adapters by state.",
            ["state"],
            registry=r,
        )
        self.vllm_healthy = Gauge(
            PREFIX + "vllm_healthy",
            "1 when vLLM's /health answered OK.",
            registry=r,
        )
        self.generation = Gauge(
            PREFIX + "manifest_generation",
            "Generation of the manifest being served.",
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
