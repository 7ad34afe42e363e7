"""The operator's Prometheus metrics (served on --metrics-port at /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

RECONCILES = Counter(
    "loraplex_operator_reconciles",
    "Reconciles by kind and result (ok, invalid, infeasible, error).",
    ["kind", "result"],
    registry=REGISTRY,
)
RECONCILE_SECONDS = Histogram(
    "loraplex_operator_reconcile_seconds",
    "Wall time of one reconcile.",
    ["kind"],
    registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
ADAPTERS = Gauge(
    "loraplex_operator_adapters",
    "LoRAAdapters by phase, as last written to their status.",
    ["phase"],
    registry=REGISTRY,
)
MANIFEST_PUSHES = Counter(
    "loraplex_operator_manifest_pushes",
    "Adapter manifest pushes to pods by result (ok, failed).",
    ["result"],
    registry=REGISTRY,
)
STATUS_WRITES = Counter(
    "loraplex_operator_status_writes",
    "LoRAAdapter status PATCHes by result (ok; gone: deleted meanwhile; failed: decided again).",
    ["result"],
    registry=REGISTRY,
)
STATUS_PENDING = Gauge(
    "loraplex_operator_status_writes_pending",
    "LoRAAdapter statuses decided but not yet written (queued or in flight).",
    registry=REGISTRY,
)

# Every series name the operator exports (dashboards are checked against this list).
METRIC_NAMES: frozenset[str] = frozenset(
    {
        "loraplex_operator_reconciles_total",
        "loraplex_operator_reconcile_seconds_bucket",
        "loraplex_operator_reconcile_seconds_sum",
        "loraplex_operator_reconcile_seconds_count",
        "loraplex_operator_adapters",
        "loraplex_operator_manifest_pushes_total",
        "loraplex_operator_status_writes_total",
        "loraplex_operator_status_writes_pending",
    }
)
