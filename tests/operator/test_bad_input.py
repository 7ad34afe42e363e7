"""Malformed and hostile objects: each gets a condition naming the field, nothing crashes.

Matrix (one operator run, 36 bad objects beside good ones): BaseModels with wrong types,
unknown fields, out-of-range numbers, bad sources, traversal, huge strings, an infeasible plan;
LoRAAdapters with a missing base, duplicate or base-clashing servedNames, a rank over the
fixed maximum, unknown schemes, traversal, undeclared claims, bad names, credentials in URLs.
For each we also record whether the CRD schema/CEL would already refuse it at `kubectl apply`:
a real API server must refuse exactly those (naming the field) and the operator reports the
rest; the emulator does not validate, so there the operator sees them all and must cope.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import pytest

from loraplex.devtools.operator_proc import OperatorProcess
from loraplex.kube import KubeClient
from tests.operator.conftest import Cluster, eventually
from tests.operator.test_reconcile_e2e import adapter_names, condition, one
from tests.support.crd import cel_errors, schema_errors

pytestmark = [pytest.mark.operator, pytest.mark.timeout(240)]
NS = "default"
GOOD_MODEL = {"source": "hf://Qwen/Qwen2.5-7B-Instruct"}
GOOD_GPU = {"product": "H100-80GB"}


def bm(name: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": GOOD_MODEL, "gpu": GOOD_GPU}
    body.update(spec)
    return {
        "apiVersion": "loraplex.io/v1alpha1",
        "kind": "BaseModel",
        "metadata": {"name": name, "namespace": NS},
        "spec": body,
    }


def lora(name: str, base: str = "good", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"baseModel": base, "source": f"hf://org/{name}"}
    body.update(spec)
    return {
        "apiVersion": "loraplex.io/v1alpha1",
        "kind": "LoRAAdapter",
        "metadata": {"name": name, "namespace": NS},
        "spec": body,
    }


HUGE = "x" * 100_000
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
# (id, object, condition type, reason, text the message must contain, refused by schema/CEL?)
CASES: list[tuple[str, dict[str, Any], str, str, str, bool]] = [
    (
        "bm-replicas-negative",
        bm("bm-neg", replicas=-1),
        "Ready",
        "InvalidSpec",
        "spec.replicas",
        True,
    ),
    (
        "bm-replicas-string",
        bm("bm-str", replicas="two"),
        "Ready",
        "InvalidSpec",
        "spec.replicas",
        True,
    ),
    ("bm-unknown-field", bm("bm-unk", replicaz=2), "Ready", "InvalidSpec", "spec.replicaz", True),
    (
        "bm-rank-7",
        bm("bm-rank7", lora={"maxLoraRank": 7}),
        "Ready",
        "InvalidSpec",
        "spec.lora.maxLoraRank",
        True,
    ),
    (
        "bm-max-loras-0",
        bm("bm-loras0", lora={"maxLoras": 0}),
        "Ready",
        "InvalidSpec",
        "spec.lora.maxLoras",
        True,
    ),
    (
        "bm-cpu-below-gpu",
        bm("bm-cpu", lora={"maxLoras": 8, "maxCpuLoras": 2}),
        "Ready",
        "InvalidSpec",
        "maxCpuLoras",
        True,
    ),
    (
        "bm-ftp-source",
        bm("bm-ftp", model={"source": "ftp://host/m"}),
        "Ready",
        "InvalidSpec",
        "spec.model.source",
        True,
    ),
    (
        "bm-no-model",
        {**bm("bm-nomodel"), "spec": {"gpu": GOOD_GPU}},
        "Ready",
        "InvalidSpec",
        "spec.model",
        True,
    ),
    (
        "bm-gpu-count-0",
        bm("bm-gpu0", gpu={"count": 0, "product": "L4"}),
        "Ready",
        "InvalidSpec",
        "spec.gpu.count",
        True,
    ),
    (
        "bm-gpu-mem-negative",
        bm("bm-gpumem", gpu={"memoryGiB": -5}),
        "Ready",
        "InvalidSpec",
        "spec.gpu.memoryGiB",
        True,
    ),
    (
        "bm-util-1.5",
        bm("bm-util", memory={"gpuMemoryUtilization": 1.5}),
        "Ready",
        "InvalidSpec",
        "spec.memory.gpuMemoryUtilization",
        True,
    ),
    (
        "bm-huge-served-name",
        bm("bm-huge", model={**GOOD_MODEL, "servedName": HUGE}),
        "Ready",
        "InvalidSpec",
        "spec.model.servedName",
        True,
    ),
    (
        "bm-pvc-traversal",
        bm("bm-trav", model={"source": "pvc://claim/../../etc"}),
        "Ready",
        "InvalidSpec",
        "spec.model.source",
        False,
    ),
    (
        "bm-spec-not-object",
        {**bm("bm-specstr"), "spec": "serve it"},
        "Ready",
        "InvalidSpec",
        "spec",
        True,
    ),
    (
        "bm-claim-traversal",
        bm("bm-claim", adapterVolumes=[{"claimName": "../x"}]),
        "Ready",
        "InvalidSpec",
        "spec.adapterVolumes[0].claimName",
        True,
    ),
    (
        "bm-extra-args-string",
        bm("bm-args", engine={"extraArgs": "--foo"}),
        "Ready",
        "InvalidSpec",
        "spec.engine.extraArgs",
        True,
    ),
    (
        "bm-dtype",
        bm("bm-dtype", model={**GOOD_MODEL, "dtype": "int3"}),
        "Ready",
        "InvalidSpec",
        "spec.model.dtype",
        True,
    ),
    (
        "bm-max-model-len-0",
        bm("bm-len0", maxModelLen=0),
        "Ready",
        "InvalidSpec",
        "spec.maxModelLen",
        True,
    ),
    (
        "bm-infeasible",
        bm(
            "bm-70b",
            model={"source": "hf://meta-llama/Llama-3.1-70B-Instruct"},
            gpu={"product": "L4"},
        ),
        "Planned",
        "InsufficientGPUMemory",
        "GiB",
        False,
    ),
    (
        "lora-missing-base",
        lora("no-base", base="nope"),
        "Accepted",
        "BaseModelNotFound",
        "spec.baseModel",
        False,
    ),
    (
        "lora-duplicate-served",
        lora("dup-b", servedName="good-adapter"),
        "Accepted",
        "NameConflict",
        "spec.servedName",
        False,
    ),
    (
        "lora-served-is-base",
        lora("clash-base", servedName="good"),
        "Accepted",
        "NameConflict",
        "spec.servedName",
        False,
    ),
    (
        "lora-rank-over-fixed",
        lora("too-big", base="fixed16", rank=64),
        "Accepted",
        "RankExceedsMax",
        "spec.rank",
        False,
    ),
    (
        "lora-gopher",
        lora("gopher", source="gopher://h/x"),
        "Accepted",
        "InvalidSource",
        "spec.source",
        True,
    ),
    (
        "lora-hf-traversal",
        lora("hf-trav", source="hf://org/repo/../../x"),
        "Accepted",
        "InvalidSource",
        "spec.source",
        False,
    ),
    (
        "lora-undeclared-claim",
        lora("no-claim", source="pvc://secret-claim/a"),
        "Accepted",
        "InvalidSource",
        "spec.adapterVolumes",
        False,
    ),
    ("lora-bad-name", lora("Bad_Name"), "Accepted", "InvalidSpec", "metadata.name", False),
    (
        "lora-served-traversal",
        lora("served-trav", servedName="../etc"),
        "Accepted",
        "InvalidSpec",
        "spec.servedName",
        False,
    ),
    (
        "lora-sha-short",
        lora("sha-short", source="https://h/x.tgz", sha256="xyz"),
        "Accepted",
        "InvalidSpec",
        "spec.sha256",
        True,
    ),
    ("lora-rank-0", lora("rank-zero", rank=0), "Accepted", "InvalidSpec", "spec.rank", True),
    (
        "lora-rank-string",
        lora("rank-str", rank="high"),
        "Accepted",
        "InvalidSpec",
        "spec.rank",
        True,
    ),
    ("lora-unknown-field", lora("unknown-f", foo=1), "Accepted", "InvalidSpec", "spec.foo", True),
    (
        "lora-huge-source",
        lora("huge-src", source="hf://org/" + "a" * 5000),
        "Accepted",
        "InvalidSource",
        "spec.source",
        True,
    ),
    (
        "lora-no-base-field",
        {**lora("no-base-field"), "spec": {"source": "hf://org/x"}},
        "Accepted",
        "InvalidSpec",
        "spec.baseModel",
        True,
    ),
    (
        "lora-credentials-in-url",
        lora("creds", source="https://user:hunter2@h/x"),
        "Accepted",
        "InvalidSource",
        "spec.source",
        False,
    ),
    (
        "lora-absolute-path",
        lora("abs-path", source="/etc/passwd"),
        "Accepted",
        "InvalidSource",
        "spec.source",
        True,
    ),
]


def test_case_count() -> None:
    assert len(CASES) >= 30


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_schema_verdicts_are_as_documented(
    case: tuple[str, dict[str, Any], str, str, str, bool],
) -> None:
    _, obj, _, _, _, refused = case
    errors = schema_errors(obj["kind"], obj) + (
        cel_errors(obj["kind"], obj) if isinstance(obj.get("spec"), dict) else []
    )
    assert bool(errors) is refused, errors


async def test_operator_reports_every_bad_object_and_keeps_going(
    cluster: Cluster, kube: KubeClient, operator: OperatorProcess
) -> None:
    good = [
        bm("good"),
        bm("fixed16", lora={"maxLoraRank": 16}),
        lora("good-adapter"),
    ]
    for obj in good:
        await kube.apply(obj)
    # The existing adapter holds its servedName before the clashing one arrives.
    await eventually(
        lambda: adapter_names(cluster, "good") == ["good-adapter"], what="good adapter"
    )
    await asyncio.sleep(1.1)  # creationTimestamp has one-second resolution, as in Kubernetes
    refused: dict[str, str] = {}
    for case_id, obj, *_ in CASES:
        status, message = await cluster.create_strict(obj)
        if status in (400, 422):
            refused[case_id] = message
        else:
            assert status == 201, (case_id, status, message)
    # A real API server refuses exactly what the CRD's schema and CEL rules say, naming the
    # field; the emulator refuses nothing, so there the operator must report every case.
    # The server also refuses object names that are not DNS subdomains, before any schema.
    documented = (
        {c[0] for c in CASES if c[5] or not DNS_SUBDOMAIN.fullmatch(c[1]["metadata"]["name"])}
        if cluster.enforces
        else set()
    )
    assert set(refused) == documented
    for case_id, _, _, _, text, _ in CASES:
        if case_id in refused:
            assert text in refused[case_id], (case_id, refused[case_id])
    for case_id, obj, ctype, reason, text, _ in CASES:
        if case_id in refused:
            continue
        res = (
            "loraplex.io/v1alpha1/basemodels"
            if obj["kind"] == "BaseModel"
            else "loraplex.io/v1alpha1/loraadapters"
        )
        name = obj["metadata"]["name"]
        cond = await eventually(
            lambda r=res, n=name, t=ctype: condition(one(cluster, r, n), t),  # type: ignore[misc]
            what=f"{case_id}: a {ctype} condition",
            timeout=60,
        )
        assert cond["status"] == "False", (case_id, cond)
        assert cond["reason"] == reason, (case_id, cond)
        assert text in cond["message"], (case_id, cond["message"])
        assert len(cond["message"]) < 1000, case_id
    # Secrets never leak into status.
    dump = json.dumps(
        [o.get("status") for o in cluster.objects_of("loraplex.io/v1alpha1/loraadapters")]
    )
    assert "spec.source" in dump
    assert "hunter2" not in dump
    assert "hunter2" not in operator.log()
    # The good objects are unaffected.
    assert adapter_names(cluster, "good") == ["good-adapter"]
    assert one(cluster, "apps/v1/deployments", "fixed16") is not None
    assert one(cluster, "apps/v1/deployments", "bm-70b") is None, "no Deployment when infeasible"
    assert one(cluster, "apps/v1/deployments", "bm-neg") is None
    ok = await eventually(
        lambda: condition(
            one(cluster, "loraplex.io/v1alpha1/loraadapters", "good-adapter"), "Accepted"
        ),
        what="good adapter accepted",
    )
    assert ok["status"] == "True"
    assert operator.alive
    # Logs are structured (one JSON object per line) and name the object they are about.
    records = [json.loads(line) for line in operator.log().splitlines() if line.strip()]
    assert any(
        "default/bm-trav" in r["message"] and "spec.model.source" in r["message"] for r in records
    )
    assert any(r.get("object", {}).get("name") == "good" for r in records)
