"""Pure core: adapter verdicts, conditions, drift, status, token derivation, field paths.

Matrix: judge() accepts valid adapters, refuses name clashes (oldest wins), undeclared claims,
the base's own name; set_condition keeps lastTransitionTime unless status flips; is_subset
ignores server-added fields but sees list changes; adapter_status maps pod states to phases;
base_status maps readiness to phases; admin tokens are stable per object and key.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from loraplex.adapters import ACCEPTED, judge, read_candidate
from loraplex.api.basemodel import BaseModelSpec, BaseModelStatus
from loraplex.api.loraadapter import LoRAAdapterStatus
from loraplex.conditions import get_condition, set_condition
from loraplex.diff import drifted, is_subset
from loraplex.errors import InvalidSpec
from loraplex.planner import AdapterDemand, plan_base_model
from loraplex.podsync import admin_token, ready_pods
from loraplex.status import PodView, adapter_status, base_status
from loraplex.validation import parse_spec
from loraplex_server.manifest import AdapterReport, AdapterState

BASE = BaseModelSpec.model_validate(
    {
        "model": {"source": "hf://Qwen/Qwen2.5-7B-Instruct"},
        "gpu": {"product": "H100-80GB"},
        "adapterVolumes": [{"claimName": "team"}],
    }
)


def adapter(name: str, created: str = "2026-01-01T00:00:00Z", **spec: Any) -> dict[str, Any]:
    body = {"baseModel": "base", "source": f"hf://org/{name}", **spec}
    return {
        "metadata": {"name": name, "uid": f"uid-{name}", "creationTimestamp": created},
        "spec": body,
    }


def test_judge_accepts_and_refuses() -> None:
    cands = [
        read_candidate(adapter("a")),
        read_candidate(adapter("b", "2026-01-02T00:00:00Z", servedName="a")),  # clashes with a
        read_candidate(adapter("c", source="pvc://team/x")),
        read_candidate(adapter("d", source="pvc://other/x")),
        read_candidate(adapter("e", servedName="base")),
        read_candidate(adapter("f", rank="x")),
    ]
    v = judge("base", BASE, cands)
    assert v["a"] == ACCEPTED and v["c"] == ACCEPTED
    assert (v["b"].reason, v["d"].reason, v["e"].reason) == (
        "NameConflict",
        "InvalidSource",
        "NameConflict",
    )
    assert v["f"].reason == "InvalidSpec" and "spec.rank" in v["f"].message
    assert "claimName: other" in v["d"].message


def test_oldest_adapter_keeps_a_contested_name() -> None:
    old = read_candidate(adapter("zeta", "2026-01-01T00:00:00Z", servedName="x"))
    new = read_candidate(adapter("alpha", "2026-01-05T00:00:00Z", servedName="x"))
    v = judge("base", BASE, [new, old])
    assert v["zeta"].accepted and not v["alpha"].accepted


def test_set_condition_keeps_transition_time_unless_status_flips() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    t1 = datetime(2026, 1, 2, tzinfo=UTC)
    conds = set_condition([], "Ready", "False", "A", "a", generation=1, at=t0)
    conds = set_condition(conds, "Ready", "False", "B", "b", generation=2, at=t1)
    c = get_condition(conds, "Ready")
    assert c is not None and c.last_transition_time == t0 and c.reason == "B"
    assert c.observed_generation == 2
    conds = set_condition(conds, "Ready", "True", "C", "c", generation=2, at=t1)
    c = get_condition(conds, "Ready")
    assert c is not None and c.last_transition_time == t1
    assert len(conds) == 1


@pytest.mark.parametrize(
    ("desired", "observed", "subset"),
    [
        ({"a": 1}, {"a": 1, "b": 2}, True),
        ({"a": {"x": 1}}, {"a": {"x": 1, "defaulted": True}}, True),
        ({"a": [1, 2]}, {"a": [1, 2, 3]}, False),
        ({"a": [{"n": 1}]}, {"a": [{"n": 1, "extra": 0}]}, True),
        ({"limits": {"gpu": 1}}, {"limits": {"gpu": "1"}}, True),
        ({"a": 1}, {"a": 2}, False),
        ({"a": 1}, None, False),
    ],
    ids=[
        "extra-key",
        "nested-default",
        "list-longer",
        "list-item-defaults",
        "quantity",
        "changed",
        "missing",
    ],
)
def test_is_subset(desired: Any, observed: Any, subset: bool) -> None:
    assert is_subset(desired, observed) is subset


def test_drifted_ignores_write_only_fields() -> None:
    assert not drifted({"kind": "Secret", "stringData": {"t": "x"}}, {"kind": "Secret", "data": {}})
    assert drifted({"kind": "Secret"}, None)


def report(name: str, state: AdapterState, **kw: Any) -> AdapterReport:
    return AdapterReport(name=name, served_name=name, state=state, **kw)


@pytest.mark.parametrize(
    ("states", "phase", "reason"),
    [
        ([], "Pending", "NoReadyReplicas"),
        ([AdapterState.LOADED, AdapterState.CACHED], "Ready", "Ready"),
        ([AdapterState.LOADED, AdapterState.LOADING], "Loading", "Loading"),
        ([AdapterState.DOWNLOADING], "Downloading", "Downloading"),
        ([AdapterState.LOADED, AdapterState.FAILED], "Failed", "DownloadFailed"),
    ],
    ids=["no-pods", "all-ready", "loading", "downloading", "one-failed"],
)
def test_adapter_phase_from_pods(states: list[AdapterState], phase: str, reason: str) -> None:
    pods = [
        PodView(
            f"p{i}",
            report(
                "a",
                s,
                reason="DownloadFailed" if s == AdapterState.FAILED else None,
                message="HTTP 404" if s == AdapterState.FAILED else None,
                rank=8,
            ),
            True,
        )
        for i, s in enumerate(states)
    ]
    st = adapter_status(LoRAAdapterStatus(), 3, ACCEPTED, served_name="a", pods=pods)
    ready = get_condition(st.conditions, "Ready")
    assert st.phase == phase and ready is not None and ready.reason == reason
    assert st.observed_generation == 3
    assert (
        st.ready
        == f"{sum(s in (AdapterState.LOADED, AdapterState.CACHED) for s in states)}/{len(states)}"
    )


def test_stale_pod_generation_is_not_ready() -> None:
    pods = [PodView("p0", report("a", AdapterState.LOADED), generation_current=False)]
    st = adapter_status(LoRAAdapterStatus(), 1, ACCEPTED, served_name="a", pods=pods)
    assert st.phase != "Ready"


@pytest.mark.parametrize(
    ("ready", "replicas", "phase"),
    [(0, 2, "Deploying"), (1, 2, "Degraded"), (2, 2, "Ready"), (0, 0, "Ready")],
)
def test_base_phase(ready: int, replicas: int, phase: str) -> None:
    plan = plan_base_model(BASE, [AdapterDemand("a", 8)])
    st = base_status(
        BaseModelStatus(),
        4,
        plan=plan,
        deployment={"status": {"readyReplicas": ready}},
        replicas=replicas,
    )
    assert st.phase == phase and st.ready == f"{ready}/{replicas}"
    ready_cond = get_condition(st.conditions, "Ready")
    assert ready_cond is not None and (ready_cond.status == "True") is (phase == "Ready")
    assert st.plan is not None and st.plan.max_lora_rank == 16  # rank 8 + one step of headroom


def test_plan_warnings_reach_the_planned_condition() -> None:
    """A plan vLLM starts with but that holds fewer sequences than expected: Planned stays
    True, with reason PlannedWithWarnings and the numbers in the message and in status."""
    busy = BaseModelSpec.model_validate(
        {**BASE.model_dump(by_alias=True), "maxModelLen": 32768, "memory": {"minKvSequences": 64}}
    )
    plan = plan_base_model(busy, [AdapterDemand("a", 8)])
    assert plan.feasible and plan.warnings
    st = base_status(BaseModelStatus(), 1, plan=plan, deployment=None, replicas=1)
    cond = get_condition(st.conditions, "Planned")
    assert cond is not None and cond.status == "True"
    assert cond.reason == "PlannedWithWarnings"
    assert "fewer than minKvSequences 64" in cond.message
    assert st.plan is not None and st.plan.warnings == list(plan.warnings)


def test_invalid_base_status_names_the_field() -> None:
    st = base_status(BaseModelStatus(), 1, invalid=InvalidSpec("spec.replicas", "must be >= 0"))
    c = get_condition(st.conditions, "Ready")
    assert st.phase == "Failed" and c is not None and "spec.replicas" in c.message


def test_admin_token_is_stable_and_object_specific() -> None:
    t = admin_token(b"k", "ns", "a", "uid1")
    assert t == admin_token(b"k", "ns", "a", "uid1") and len(t) == 64
    assert t != admin_token(b"k", "ns", "a", "uid2") != admin_token(b"other", "ns", "a", "uid1")


def test_ready_pods_filters_unready_and_terminating() -> None:
    def pod(
        name: str, ready: str, ip: str | None = "10.0.0.1", deleting: bool = False
    ) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": name}
        if deleting:
            meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        return {
            "metadata": meta,
            "spec": {
                "containers": [
                    {"name": "adapter-server", "ports": [{"name": "admin", "containerPort": 9999}]}
                ]
            },
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": ready}]},
        }

    pods = ready_pods(
        [
            pod("a", "True"),
            pod("b", "False"),
            pod("c", "True", ip=None),
            pod("d", "True", deleting=True),
        ]
    )
    assert (
        [p.name for p in pods] == ["a"]
        and pods[0].admin_port == 9999
        and pods[0].public_port == 8000
    )


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"model": {"source": "hf://a/b"}, "replicas": -1}, "spec.replicas"),
        (
            {
                "model": {"source": "hf://a/b"},
                "adapterVolumes": [{"claimName": "ok"}, {"claimName": "B A D"}],
            },
            "spec.adapterVolumes[1].claimName",
        ),
        ({"model": {}}, "spec.model.source"),
        ("text", "spec"),
    ],
)
def test_parse_spec_names_the_field(raw: Any, field: str) -> None:
    with pytest.raises(InvalidSpec) as exc:
        parse_spec(BaseModelSpec, raw)
    assert exc.value.field == field
