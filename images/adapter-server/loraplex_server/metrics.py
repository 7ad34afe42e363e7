"""Prometheus metrics of the server, on a registry of its own.

`METRIC_NAMES` is the one list of what is exported; the Grafana dashboard is checked against it,
so add a name there whenever a metric is added here. Adapters are labelled by served name;
requests for names that are not declared share the label "unknown" so clients cannot blow up
the series count.

With --workers > 1 every process writes its samples to the directory named by
PROMETHEUS_MULTIPROC_DIR (set by the owner before any worker imports prometheus_client), and
`render` merges all of them, so one scrape on any process shows the whole pod. Gauges are set
by the owner only and merged with `livemax`.

Label cardinality is bounded for declared adapters too: with 10,000 adapters on a pod, one
series per adapter per family (histograms: 17 series each) would be hundreds of thousands of
series per pod. `AdapterSeries` keeps its own series only for at most `max_adapter_series`
(--max-adapter-series, 200) adapters, the ones used most recently. When all are taken, a new
adapter takes the slot of the least recently used one only if that one has been idle for
--adapter-series-idle seconds (300); until then the new adapter counts under adapter="other".
The adapter that lost its slot is counted under "other" from then on until it gets a slot
again. Sums over all adapters stay right (`sum(rate(...))` sees an ended series stop and
"other" grow); per-adapter detail is kept where it is wanted, for the adapters in use, and a
pod where more than 200 adapters are busy does not churn series (every churned series is a new
one Prometheus keeps for hours). The gauge of adapters by state is per state, not per adapter.

With several workers one process decides which adapters are recent: the owner, which every
adapter request passes through (its own, and followers' holds). A follower mirrors the owner's
set: a hold's answer says whether the adapter has its own series, and the set itself comes
with the owner's status and with each scrape. A scrape shows exactly the owner's current set
(plus "other", "unknown" and the base model): multiprocess files keep an ended series' last
values (prometheus_client cannot delete them), so `render` leaves out every adapter outside
the set, and the series resumes from those values, never lower, if the adapter comes back.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric

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


OTHER = "other"
# Labels that are one series each whatever the adapters: never counted against the limit.
_SHARED = frozenset({OTHER, "unknown", "none"})
M = TypeVar("M", bound=MetricWrapperBase)


class AdapterSeries:
    """Which adapters get series of their own: at most `limit`, the ones used most recently
    (see above). A full set takes a newcomer only in place of an adapter idle for
    `idle_after` seconds; until then the newcomer counts under "other". So series are bounded
    at any moment and also over time: when more adapters are busy than there are slots, the
    set does not churn (each churned series is a new series for Prometheus to keep).

    The deciding process (`decides`, the owner) keeps the order; a follower only mirrors the
    owner's set (`mirror`, `admit`) and labels everything outside it "other", so no two
    processes disagree for longer than one status poll."""

    def __init__(
        self,
        limit: int,
        *,
        idle_after: float = 300.0,
        decides: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.idle_after = idle_after
        self.decides = decides
        self.clock = clock
        self.base: set[str] = set()  # the base model's served name(s): shared, like "none"
        self._recent: OrderedDict[str, float] = OrderedDict()  # adapter -> last used
        self._families: list[Bounded[Any]] = []

    def label(self, adapter: str) -> str:
        if adapter in _SHARED or adapter in self.base:
            return adapter
        if adapter in self._recent:
            if self.decides:
                self._recent.move_to_end(adapter)
                self._recent[adapter] = self.clock()
            return adapter
        if self.limit <= 0 or not self.decides:
            return OTHER
        now = self.clock()
        if len(self._recent) >= self.limit:
            oldest, used = next(iter(self._recent.items()))
            if now - used < self.idle_after:
                return OTHER  # every slot is busy: aggregate rather than churn
            del self._recent[oldest]
            self._drop(oldest)
        self._recent[adapter] = now
        return adapter

    def peek(self, adapter: str) -> str:
        """The label for `adapter` now, without counting a use."""
        if adapter in _SHARED or adapter in self.base or adapter in self._recent:
            return adapter
        return OTHER

    def own(self) -> list[str]:
        """The adapters with series of their own, least recently used first."""
        return list(self._recent)

    def visible(self) -> set[str]:
        """Every adapter label a scrape shows now."""
        return {*self._recent, *_SHARED, *self.base}

    def mirror(self, own: Iterable[str], base: Iterable[str], asked_at: float) -> None:
        """A follower takes the owner's set as it was when asked at `asked_at` (this clock);
        adapters admitted since then stay, the answer may predate their holds."""
        new: OrderedDict[str, float] = OrderedDict.fromkeys(own, 0.0)
        for name, admitted in self._recent.items():
            if admitted >= asked_at:
                new[name] = admitted
        for old in [a for a in self._recent if a not in new]:
            self._drop(old)
        self._recent = new
        self.base = set(base)

    def admit(self, adapter: str) -> None:
        """A follower: the owner just gave `adapter` a series of its own (a hold's answer)."""
        self._recent[adapter] = self.clock()

    def _drop(self, adapter: str) -> None:
        multiprocess_files = bool(os.environ.get(MULTIPROC_ENV))
        for bounded in self._families:
            bounded.forget(adapter)
            if multiprocess_files:
                continue  # the files cannot forget a series: `render` leaves it out instead
            family = bounded.family
            # prometheus_client has no "remove by one label"; its children are keyed by tuple.
            for values in [v for v in list(family._metrics) if v and v[0] == adapter]:
                family.remove(*values)


class Bounded(Generic[M]):
    """A family whose first label is the adapter, passed through `AdapterSeries`: request
    families count as a use (`touch`); an adapter's downloads, loads and evictions do not (a
    pod fetches all 10,000 adapters at start: that is not 10,000 uses)."""

    def __init__(self, family: M, series: AdapterSeries, *, touch: bool) -> None:
        self.family = family
        self._series = series
        self._touch = touch
        # Children by label values: prometheus_client's `labels` validates and locks on every
        # call, and the proxy asks five times per request.
        self._children: dict[tuple[str, ...], M] = {}
        series._families.append(self)

    def labels(self, adapter: str, *rest: str) -> M:
        label = self._series.label(adapter) if self._touch else self._series.peek(adapter)
        key = (label, *rest)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.family.labels(label, *rest)
        return child

    def forget(self, adapter: str) -> None:
        """`adapter` lost its series: its next sample makes a new child (or goes to "other")."""
        for key in [k for k in self._children if k[0] == adapter]:
            del self._children[key]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.family, name)


class Metrics:
    """All collectors, created once per app so tests can run several apps in one process."""

    def __init__(
        self,
        max_adapter_series: int = 200,
        *,
        idle_after: float = 300.0,
        decides: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.series = AdapterSeries(
            max_adapter_series, idle_after=idle_after, decides=decides, clock=clock
        )
        self._init_families()
        for name in ("requests", "request_errors", "ttfb", "duration"):
            setattr(self, name, Bounded(getattr(self, name), self.series, touch=True))
        for name in ("prompt_tokens", "completion_tokens"):  # same requests, counted again
            setattr(self, name, Bounded(getattr(self, name), self.series, touch=True))
        for name in ("loads", "load_seconds", "evictions", "failures", "download_bytes"):
            setattr(self, name, Bounded(getattr(self, name), self.series, touch=False))

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
        merged.register(_Visible(path, self.series.visible()))
        return generate_latest(merged)


# The families whose first label is the adapter (bounded by `AdapterSeries`).
_ADAPTER_FAMILIES = frozenset(
    PREFIX + n
    for n in (
        "requests",
        "request_errors",
        "request_ttfb_seconds",
        "request_duration_seconds",
        "prompt_tokens",
        "completion_tokens",
        "adapter_loads",
        "adapter_load_seconds",
        "adapter_evictions",
        "adapter_failures",
        "download_bytes",
    )
)


class _Visible:
    """Every process's samples (multiprocess files), without the adapters outside `visible`:
    ended series stay in the files with their last values, and must not be shown."""

    def __init__(self, path: str, visible: set[str]) -> None:
        self.path = path
        self.visible = visible

    def collect(self) -> Iterator[Metric]:
        collector = multiprocess.MultiProcessCollector(None, self.path)  # type: ignore[no-untyped-call]
        for metric in collector.collect():  # type: ignore[no-untyped-call]
            if metric.name in _ADAPTER_FAMILIES:
                metric.samples = [
                    s for s in metric.samples if s.labels.get("adapter", OTHER) in self.visible
                ]
            yield metric
