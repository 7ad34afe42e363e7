"""The Argo CD health checks in docs/argocd/*.lua give the documented verdicts.

Matrix: BaseModel x (no status, older generation, deploying, ready, ready but stale,
InsufficientGPUMemory, InvalidSpec, DeploymentUnavailable, scaled to zero) and LoRAAdapter x
(no status, pending, downloading, loading, ready, ready but stale, BaseModelNotFound,
RankExceedsMax, NameConflict, DownloadFailed, ChecksumMismatch, LoadFailed), each run in a
real Lua 5.1 (Argo CD's dialect) through `lupa`. Every sample object first passes its CRD's
status schema, so the checks read the field names the operator really writes. The Lua files
must also appear verbatim in docs/argocd-health.md.
"""

from __future__ import annotations

import copy
import textwrap
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

lupa = pytest.importorskip("lupa", reason="lupa (Lua for Python) is not installed")

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
CRDS = REPO / "crds"


def lua_runtime() -> Any:
    try:
        from lupa import lua51

        return lua51.LuaRuntime()
    except ImportError:  # a lupa build without the Lua 5.1 flavour
        return lupa.LuaRuntime()


def run_check(kind: str, obj: dict[str, Any]) -> dict[str, str]:
    script = (DOCS / "argocd" / f"{kind.lower()}-health.lua").read_text()
    lua = lua_runtime()
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute(script)
    return {"status": result["status"], "message": result["message"]}


def status_schema(kind: str) -> dict[str, Any]:
    crd = yaml.safe_load((CRDS / f"loraplex.io_{kind.lower()}s.yaml").read_text())
    status: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"][
        "status"
    ]
    return status


def cond(ctype: str, status: str, reason: str, message: str = "") -> dict[str, Any]:
    return {
        "type": ctype,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2026-01-01T00:00:00Z",
        "observedGeneration": 3,
    }


def obj(kind: str, status: dict[str, Any] | None, generation: int = 3) -> dict[str, Any]:
    o: dict[str, Any] = {
        "apiVersion": "loraplex.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": "x", "namespace": "ml", "generation": generation},
        "spec": {},
    }
    if status is not None:
        o["status"] = {"observedGeneration": 3, **status}
    return o


READY_BASE = {
    "phase": "Ready",
    "conditions": [
        cond("Planned", "True", "Planned"),
        cond("Progressing", "False", "Ready"),
        cond("Degraded", "False", "AsExpected"),
        cond("Ready", "True", "Ready", "2/2 replicas ready"),
    ],
}


def failed_base(reason: str, phase: str = "Failed") -> dict[str, Any]:
    return {
        "phase": phase,
        "conditions": [cond("Planned", "False", reason), cond("Ready", "False", reason, "why")],
    }


BASE_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "no-status": (obj("BaseModel", None), "Progressing"),
    "deploying": (
        obj(
            "BaseModel",
            {
                "phase": "Deploying",
                "conditions": [
                    cond("Planned", "True", "Planned"),
                    cond("Progressing", "True", "DeploymentProgressing"),
                    cond("Ready", "False", "DeploymentProgressing", "0/1 replicas ready"),
                ],
            },
        ),
        "Progressing",
    ),
    "ready": (obj("BaseModel", READY_BASE), "Healthy"),
    "ready-but-stale": (obj("BaseModel", READY_BASE, generation=4), "Progressing"),
    "insufficient-gpu-memory": (
        obj("BaseModel", failed_base("InsufficientGPUMemory")),
        "Degraded",
    ),
    "invalid-spec": (obj("BaseModel", failed_base("InvalidSpec")), "Degraded"),
    "deployment-unavailable": (
        obj("BaseModel", failed_base("DeploymentUnavailable", phase="Degraded")),
        "Degraded",
    ),
    "scaled-to-zero": (
        obj(
            "BaseModel",
            {"phase": "Ready", "conditions": [cond("Ready", "True", "ScaledToZero")]},
        ),
        "Healthy",
    ),
}


def adapter(phase: str, *conditions: dict[str, Any]) -> dict[str, Any]:
    return {"phase": phase, "conditions": list(conditions), "ready": "0/1"}


ACCEPTED = cond("Accepted", "True", "Accepted")


def rejected(reason: str) -> dict[str, Any]:
    return adapter(
        "Failed", cond("Accepted", "False", reason, "why"), cond("Ready", "False", reason, "why")
    )


def failed_on_pod(reason: str) -> dict[str, Any]:
    return adapter("Failed", ACCEPTED, cond("Ready", "False", reason, "why"))


ADAPTER_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "no-status": (obj("LoRAAdapter", None), "Progressing"),
    "pending": (
        obj("LoRAAdapter", adapter("Pending", ACCEPTED, cond("Ready", "False", "NoReadyReplicas"))),
        "Progressing",
    ),
    "downloading": (
        obj("LoRAAdapter", adapter("Downloading", ACCEPTED, cond("Ready", "False", "Downloading"))),
        "Progressing",
    ),
    "loading": (
        obj("LoRAAdapter", adapter("Loading", ACCEPTED, cond("Ready", "False", "Loading"))),
        "Progressing",
    ),
    "ready": (
        obj("LoRAAdapter", adapter("Ready", ACCEPTED, cond("Ready", "True", "Ready"))),
        "Healthy",
    ),
    "ready-but-stale": (
        obj(
            "LoRAAdapter",
            adapter("Ready", ACCEPTED, cond("Ready", "True", "Ready")),
            generation=5,
        ),
        "Progressing",
    ),
    "base-model-not-found": (obj("LoRAAdapter", rejected("BaseModelNotFound")), "Degraded"),
    "rank-exceeds-max": (obj("LoRAAdapter", rejected("RankExceedsMax")), "Degraded"),
    "name-conflict": (obj("LoRAAdapter", rejected("NameConflict")), "Degraded"),
    "download-failed": (obj("LoRAAdapter", failed_on_pod("DownloadFailed")), "Degraded"),
    "checksum-mismatch": (obj("LoRAAdapter", failed_on_pod("ChecksumMismatch")), "Degraded"),
    "load-failed": (obj("LoRAAdapter", failed_on_pod("LoadFailed")), "Degraded"),
}


@pytest.mark.parametrize(("sample", "expected"), BASE_CASES.values(), ids=BASE_CASES.keys())
def test_basemodel_health(sample: dict[str, Any], expected: str) -> None:
    if "status" in sample:
        jsonschema.validate(sample["status"], status_schema("BaseModel"))
    result = run_check("BaseModel", sample)
    assert result["status"] == expected, result
    assert result["message"]


@pytest.mark.parametrize(("sample", "expected"), ADAPTER_CASES.values(), ids=ADAPTER_CASES.keys())
def test_loraadapter_health(sample: dict[str, Any], expected: str) -> None:
    if "status" in sample:
        jsonschema.validate(sample["status"], status_schema("LoRAAdapter"))
    result = run_check("LoRAAdapter", sample)
    assert result["status"] == expected, result
    assert result["message"]


def test_degraded_message_carries_reason_and_message() -> None:
    result = run_check("LoRAAdapter", obj("LoRAAdapter", rejected("RankExceedsMax")))
    assert result["message"] == "RankExceedsMax: why"


def test_checks_do_not_mutate_their_input() -> None:
    sample = obj("BaseModel", READY_BASE)
    before = copy.deepcopy(sample)
    run_check("BaseModel", sample)
    assert sample == before


@pytest.mark.parametrize("kind", ["basemodel", "loraadapter"])
def test_doc_embeds_the_lua_verbatim(kind: str) -> None:
    doc = (DOCS / "argocd-health.md").read_text()
    lua = (DOCS / "argocd" / f"{kind}-health.lua").read_text()
    assert textwrap.indent(lua, "    ").rstrip() in doc, f"docs/argocd-health.md: {kind} drifted"
