"""Every metric and label docs/grafana/loraplex-dashboard.json queries is really exported.

Matrix:
- every PromQL expression (panel targets and template variables) x every metric name in it:
  the name is in `loraplex.metrics.METRIC_NAMES` (operator) or
  `loraplex_server.metrics.METRIC_NAMES` (adapter-server) or vLLM's gauges the adapter-server
  passes through (`loraplex_server.epp_metrics.VLLM_GAUGES`), expanded to the series Prometheus
  scrapes (histograms as _bucket/_sum/_count, counters with _total), and the collector
  registries agree that series exists;
- every label in `by (...)` and in `{...}` matchers is one of the metric's labels, `le` for
  histogram buckets, or a target label Prometheus adds (namespace, pod, basemodel, ...);
- the layout: unique panel ids, panels inside the 24-column grid and not overlapping, every
  target on the `${datasource}` variable;
- controls: the extractor finds names in a known expression and rejects invented ones.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "docs" / "grafana" / "loraplex-dashboard.json"

# Labels Prometheus adds to every target (kubernetes SD + the chart's monitors).
TARGET_LABELS = {"namespace", "pod", "container", "job", "instance", "service", "basemodel"}

PROMQL_WORDS = {
    # aggregations and modifiers
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "group", "by", "without", "on", "ignoring", "group_left", "group_right",
    "offset", "bool", "and", "or", "unless", "atan2",
    # functions used or likely in dashboards
    "rate", "irate", "increase", "delta", "idelta", "deriv", "histogram_quantile", "clamp_min",
    "clamp_max", "clamp", "abs", "ceil", "floor", "round", "sqrt", "exp", "ln", "log2", "log10",
    "time", "timestamp", "vector", "scalar", "sort", "sort_desc", "label_replace", "label_join",
    "absent", "absent_over_time", "changes", "resets", "avg_over_time", "min_over_time",
    "max_over_time", "sum_over_time", "count_over_time", "last_over_time", "quantile_over_time",
    "predict_linear", "label_values", "query_result", "metrics", "inf", "nan",
}  # fmt: skip


@dataclass(frozen=True)
class Family:
    name: str  # as declared to prometheus_client, e.g. loraplex_server_requests
    kind: str  # counter, gauge, histogram, summary
    labels: frozenset[str]

    def series(self) -> dict[str, frozenset[str]]:
        """Series name -> labels, as Prometheus scrapes them."""
        if self.kind == "counter":
            base = self.name.removesuffix("_total")
            return {f"{base}_total": self.labels}
        if self.kind in {"histogram", "summary"}:
            out = {f"{self.name}_sum": self.labels, f"{self.name}_count": self.labels}
            if self.kind == "histogram":
                out[f"{self.name}_bucket"] = self.labels | {"le"}
            return out
        return {self.name: self.labels}


def families(registry: Any) -> list[Family]:
    """Collectors in a prometheus_client registry, with their label names."""
    found = []
    for collector in list(registry._collector_to_names):  # stable since prometheus_client 0.4
        found.append(
            Family(
                name=collector._name,
                kind=collector._type,
                labels=frozenset(collector._labelnames),
            )
        )
    return found


def exported(declared: Any, registry: Any) -> dict[str, frozenset[str]]:
    """Series named by METRIC_NAMES (bare or suffixed), restricted to what the registry has."""
    series: dict[str, frozenset[str]] = {}
    for family in families(registry):
        series.update(family.series())
    by_family = {f.name: f for f in families(registry)}
    allowed: dict[str, frozenset[str]] = {}
    for name in declared:
        if name in series:
            allowed[name] = series[name]
        elif name in by_family:  # a histogram's base name stands for its series
            allowed.update(by_family[name].series())
        else:
            pytest.fail(f"{name} is in METRIC_NAMES but no collector exports it")
    return allowed


@pytest.fixture(scope="module")
def catalogue() -> dict[str, frozenset[str]]:
    from loraplex import metrics as operator_metrics
    from loraplex_server import metrics as server_metrics
    from loraplex_server.epp_metrics import VLLM_GAUGES

    return {
        **exported(operator_metrics.METRIC_NAMES, operator_metrics.REGISTRY),
        **exported(server_metrics.METRIC_NAMES, server_metrics.Metrics().registry),
        # vLLM's own gauges, passed through the adapter-server's /metrics (checked against a
        # real vLLM in tests/server/test_vllm_epp_metrics.py).
        **VLLM_GAUGES,
    }


def strip_strings(expr: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)


@dataclass(frozen=True)
class Use:
    metric: str
    labels: frozenset[str]  # labels in its matcher


def uses(expr: str) -> list[Use]:
    """Metric names in a PromQL expression, with the labels their matchers name."""
    text = strip_strings(expr)
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\$\{?\w+\}?", "", text)  # Grafana variables outside strings
    found = []
    for m in re.finditer(r"(?<![\w:.])([a-zA-Z_:][\w:]*)\s*(\{[^}]*\})?", text):
        name, matcher = m.group(1), m.group(2) or ""
        if name.lower() in PROMQL_WORDS:
            continue
        labels = frozenset(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", matcher))
        found.append(Use(name, labels))
    return found


def grouping_labels(expr: str) -> set[str]:
    text = strip_strings(expr)
    out: set[str] = set()
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", text):
        out |= {g.strip() for g in group.split(",") if g.strip()}
    return out


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def expressions() -> list[tuple[str, str]]:
    """(where, expr) for every panel target and query variable."""
    out = []
    for panel in all_panels(dashboard()["panels"]):
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            # label_values(selector, label) reads `label` from `selector`'s series: check it
            # the way a PromQL grouping is checked.
            m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", query)
            assert m, f"variable {var['name']}: unsupported query {query!r}"
            out.append((f"variable {var['name']}", f"sum by ({m.group(2)}) ({m.group(1)})"))
    return out


EXPRS = expressions()


def test_extractor_control() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, adapter) (rate(foo_seconds_bucket{a="x"}[5m])))'
        " / on (pod) group_left bar_total + sum without (le) (baz)"
    )
    assert [u.metric for u in uses(expr)] == ["foo_seconds_bucket", "bar_total", "baz"]
    assert uses(expr)[0].labels == {"a"}
    assert grouping_labels(expr) == {"le", "adapter", "pod"}


def test_catalogue_control(catalogue: dict[str, frozenset[str]]) -> None:
    assert "loraplex_operator_reconciles_total" in catalogue
    assert "loraplex_operator_reconcile_seconds_bucket" in catalogue
    assert "loraplex_server_request_duration_seconds_bucket" in catalogue
    assert "loraplex_server_requests" not in catalogue  # counters only scrape as _total
    assert "loraplex_server_adapters_count" not in catalogue  # a gauge has no _count
    assert "loraplex_operator_made_up_total" not in catalogue


@pytest.mark.parametrize(("where", "expr"), EXPRS, ids=[w for w, _ in EXPRS])
def test_metrics_and_labels_are_exported(
    catalogue: dict[str, frozenset[str]], where: str, expr: str
) -> None:
    found = uses(expr)
    assert found, f"{where}: no metric in {expr!r}"
    known_labels: set[str] = set(TARGET_LABELS)
    for use in found:
        assert use.metric in catalogue, f"{where}: {use.metric} is not exported"
        labels = catalogue[use.metric] | TARGET_LABELS
        assert use.labels <= labels, f"{where}: {use.metric} has no label {use.labels - labels}"
        known_labels |= labels
    unknown = grouping_labels(expr) - known_labels
    assert not unknown, f"{where}: grouping by labels no metric has: {unknown}"


def test_dashboard_covers_every_metric(catalogue: dict[str, frozenset[str]]) -> None:
    """Each exported metric family shows on at least one panel."""
    used = {u.metric for _, expr in EXPRS for u in uses(expr)}
    bases = {re.sub(r"_(bucket|sum|count)$", "", name) for name in catalogue}
    shown = {re.sub(r"_(bucket|sum|count)$", "", name) for name in used}
    assert bases - shown == set()


def test_layout() -> None:
    data = dashboard()
    assert data["uid"] and data["title"]
    panels = list(all_panels(data["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    boxes = []
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, f"{p['title']} leaves the grid"
        boxes.append((p["title"], g["x"], g["y"], g["x"] + g["w"], g["y"] + g["h"]))
        for target in p.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}"
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            overlap = a[1] < b[3] and b[1] < a[3] and a[2] < b[4] and b[2] < a[4]
            assert not overlap, f"panels {a[0]!r} and {b[0]!r} overlap"
