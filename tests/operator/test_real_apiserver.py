"""What only a real API server shows: kubectl and printer columns, garbage collection, the
status subresource, RBAC refusals, and service-account tokens.

Matrix (against kube-apiserver + kube-controller-manager from `make kube-bins`):
- `kubectl apply -f examples/` then `kubectl get bm,lora` with the real kubectl: the CRDs'
  printer columns show the operator's status (phase, plan, adapters).
- ownerReferences: the Deployment's ReplicaSet and Pods exist (controller-manager), and
  deleting the BaseModel collects Deployment, ReplicaSet, Pods, Service, ConfigMap, Secret.
- status subresource: spec written through /status and status written through the object
  are dropped by the server; the operator's status survives and tracks the generation.
- RBAC: the chart's ClusterRole minus one rule -> the server refuses that call (403 in the
  audit log) and the object is not made; the token is a bound, expiring TokenRequest JWT.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from loraplex.devtools.operator_proc import OperatorProcess
from loraplex.kube import BASEMODELS, KubeClient
from tests.operator.conftest import Cluster, RealCluster, eventually
from tests.operator.test_reconcile_e2e import NS, adapter_names, condition, examples, one
from tests.support.apiserver import OPERATOR_NAMESPACE, ControlPlane, kubeconfig

pytestmark = [pytest.mark.operator, pytest.mark.timeout(240)]
ROOT = Path(__file__).resolve().parents[2]
BM = "loraplex.io/v1alpha1/basemodels"
LORA = "loraplex.io/v1alpha1/loraadapters"


@pytest.fixture
def real(cluster: Cluster) -> RealCluster:
    if not isinstance(cluster, RealCluster):
        pytest.skip("needs the real API server (make kube-bins; --kube=real)")
    return cluster


def table(text: str) -> list[dict[str, str]]:
    """`kubectl get` output -> rows keyed by column header (columns are space-aligned)."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    header = lines[0]
    starts = [i for i, ch in enumerate(header) if ch != " " and (i == 0 or header[i - 1] == " ")]
    bounds = [*starts[1:], None]
    names = [header[s:e].strip() for s, e in zip(starts, bounds, strict=True)]
    return [
        {n: ln[s:e].strip() for n, s, e in zip(names, starts, bounds, strict=True)}
        for ln in lines[1:]
    ]


async def test_kubectl_apply_examples_and_printer_columns(
    real: RealCluster, operator: OperatorProcess
) -> None:
    plane = real.plane
    applied = plane.kubectl("apply", "-f", str(ROOT / "examples"))
    assert "basemodel.loraplex.io/qwen-14b created" in applied.stdout
    assert "loraadapter.loraplex.io/sql-expert created" in applied.stdout
    await eventually(
        lambda: (one(real, BM, "qwen-14b") or {}).get("status", {}).get("plan"),
        what="BaseModel planned",
    )
    await eventually(
        lambda: condition(one(real, LORA, "support-bot"), "Accepted"), what="adapter accepted"
    )
    bms = table(plane.kubectl("get", "bm", "-n", NS).stdout)
    assert [r["NAME"] for r in bms] == ["qwen-14b"]
    row = bms[0]
    assert list(row) == ["NAME", "MODEL", "GPUS", "PHASE", "READY", "ADAPTERS", "AGE"]
    assert row["MODEL"] == "hf://Qwen/Qwen2.5-14B-Instruct"
    assert row["GPUS"] == "1"
    assert row["PHASE"] == "Deploying"
    assert row["READY"] == "0/1"
    assert row["ADAPTERS"] == "0/2"
    # The plan's columns have priority 1: `-o wide` only.
    wide = table(plane.kubectl("get", "bm", "-n", NS, "-o", "wide").stdout)[0]
    assert wide["MAXRANK"] == "32"  # adapters of rank 16 and 8, one step of headroom
    assert int(wide["MAXLORAS"]) >= 1
    assert 0.9 < float(wide["GPUUTIL"]) < 0.99
    loras = {r["NAME"]: r for r in table(plane.kubectl("get", "lora", "-n", NS).stdout)}
    assert set(loras) == {"sql-expert", "support-bot"}
    assert loras["sql-expert"]["BASE"] == "qwen-14b"
    assert loras["sql-expert"]["RANK"] == "", "the rank a pod reported; no pod runs here"
    assert loras["sql-expert"]["PHASE"] == "Pending"
    wide_loras = table(plane.kubectl("get", "lora", "-n", NS, "-o", "wide").stdout)
    by_name = {r["NAME"]: r for r in wide_loras}
    assert by_name["support-bot"]["SOURCE"] == "pvc://team-adapters/support-bot/v3"
    assert by_name["sql-expert"]["SERVED"] == "sql-expert"
    # Both kinds at once, by short names and by the CRDs' category.
    both = plane.kubectl("get", "bm,lora", "-n", NS).stdout
    assert "basemodel.loraplex.io/qwen-14b" in both
    assert "loraadapter.loraplex.io/support-bot" in both
    category = plane.kubectl("get", "loraplex", "-n", NS, "-o", "name").stdout.split()
    assert sorted(category) == [
        "basemodel.loraplex.io/qwen-14b",
        "loraadapter.loraplex.io/sql-expert",
        "loraadapter.loraplex.io/support-bot",
    ]
    # kubectl explain reads the field descriptions from the served schema.
    explain = plane.kubectl("explain", "basemodel.spec.lora.maxLoraRank").stdout
    assert "maxLoraRank" in explain


async def test_owner_references_are_garbage_collected(
    real: RealCluster, kube: KubeClient, operator: OperatorProcess
) -> None:
    for doc in examples():
        await kube.apply(doc)
    dep = await eventually(lambda: one(real, "apps/v1/deployments", "qwen-14b"), what="Deployment")
    # kube-controller-manager turns the Deployment into a ReplicaSet and its Pod.
    rs = await eventually(
        lambda: next(iter(real.objects_of("apps/v1/replicasets", NS)), None), what="ReplicaSet"
    )
    assert rs["metadata"]["ownerReferences"][0]["uid"] == dep["metadata"]["uid"]
    pod = await eventually(lambda: next(iter(real.objects_of("v1/pods", NS)), None), what="Pod")
    assert pod["metadata"]["ownerReferences"][0]["uid"] == rs["metadata"]["uid"]
    owned = [
        ("apps/v1/deployments", "qwen-14b"),
        ("v1/services", "qwen-14b"),
        ("v1/configmaps", "qwen-14b-adapters"),
        ("v1/secrets", "qwen-14b-admin"),
    ]
    for res, name in owned:
        await eventually(lambda r=res, n=name: one(real, r, n), what=f"{res} {name}")  # type: ignore[misc]

    await kube.delete(BASEMODELS, NS, "qwen-14b")

    def collected() -> bool:
        return (
            all(one(real, r, n) is None for r, n in owned)
            and not real.objects_of("apps/v1/replicasets", NS)
            and not real.objects_of("v1/pods", NS)
        )

    await eventually(collected, what="owned objects garbage-collected", timeout=60)
    assert one(real, BM, "qwen-14b") is None, "the operator released its finalizer"


async def test_status_goes_through_the_status_subresource(
    real: RealCluster, kube: KubeClient, operator: OperatorProcess
) -> None:
    for doc in examples():
        await kube.apply(doc)
    bm = await eventually(
        lambda: (o := one(real, BM, "qwen-14b")) and (o.get("status") or {}).get("plan") and o,
        what="status.plan",
    )
    gen = bm["metadata"]["generation"]
    assert bm["status"]["observedGeneration"] == gen
    session, url = real.plane.session(), real.plane.url
    path = url + ControlPlane.path(BM, NS, "qwen-14b")
    merge = {"Content-Type": "application/merge-patch+json"}
    # Status written through the object is dropped, and does not move the generation.
    r = session.patch(path, data=json.dumps({"status": {"phase": "Hacked"}}), headers=merge)
    assert r.status_code == 200
    assert r.json()["status"]["phase"] != "Hacked"
    assert r.json()["metadata"]["generation"] == gen
    # Spec written through /status is dropped.
    r = session.patch(path + "/status", data=json.dumps({"spec": {"replicas": 7}}), headers=merge)
    assert r.status_code == 200
    assert r.json()["spec"]["replicas"] == 1
    # A real spec change moves the generation; the operator's status follows it.
    await kube.patch(BASEMODELS, NS, "qwen-14b", {"spec": {"maxModelLen": 4096}})
    bm = await eventually(
        lambda: (
            (o := one(real, BM, "qwen-14b"))
            and o["metadata"]["generation"] == gen + 1
            and o["status"].get("observedGeneration") == gen + 1
            and o
        ),
        what="observedGeneration follows the new generation",
    )
    assert bm["status"]["phase"] == "Deploying"
    calls = real.operator_calls()
    status_writes = {c.resource for c in calls if c.verb == "patch" and "/status" in c.resource}
    assert status_writes == {"basemodels/status", "loraadapters/status"}


def _jwt_claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    claims: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return claims


async def test_operator_token_is_a_bound_expiring_service_account_token(real: RealCluster) -> None:
    config = yaml.safe_load(real.kubeconfig.read_text())
    claims = _jwt_claims(config["users"][0]["user"]["token"])
    assert claims["sub"] == real.plane.operator_user
    assert claims["exp"] - claims["iat"] == 3600
    assert claims["exp"] > time.time()
    # The server authenticates it as the service account, with only the chart's rights.
    who = real.plane.kubectl("auth", "whoami", "-o", "json", kubeconfig=real.kubeconfig)
    assert json.loads(who.stdout)["status"]["userInfo"]["username"] == real.plane.operator_user
    can = real.plane.kubectl(
        "auth", "can-i", "get", "secrets", "-n", NS, kubeconfig=real.kubeconfig, check=False
    )
    assert can.stdout.strip() == "no", "secrets are write-only for the operator"


async def test_a_missing_rbac_rule_is_refused_by_the_server(
    real: RealCluster, kube: KubeClient, tmp_path: Path
) -> None:
    """The chart's ClusterRole without `create services`: that call fails with 403, so a rule
    missing from loraplex.rbac can no longer pass the operator tier unnoticed."""
    plane = real.plane
    role = yaml.safe_load(plane.kubectl("get", "clusterrole", "lp-loraplex", "-o", "yaml").stdout)
    rules = []
    for rule in role["rules"]:
        if "services" in rule.get("resources", []):
            rules.append({**rule, "resources": ["configmaps"]})
            rules.append(
                {**rule, "resources": ["services"], "verbs": ["get", "list", "watch", "patch"]}
            )
        else:
            rules.append(rule)
    name = "lp-loraplex-no-service-create"
    docs = [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": OPERATOR_NAMESPACE},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": name},
            "rules": rules,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": name},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": name,
            },
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": OPERATOR_NAMESPACE}],
        },
    ]
    plane.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(docs))
    assert plane.pki is not None
    token = plane.kubectl("create", "token", name, "-n", OPERATOR_NAMESPACE).stdout.strip()
    config = tmp_path / "limited.kubeconfig"
    config.write_text(kubeconfig(plane.url, plane.pki.ca_cert, {"token": token}))
    since = plane.audit_offset()
    proc = OperatorProcess(config, tmp_path).start()
    try:
        for doc in examples():
            await kube.apply(doc)
        await eventually(lambda: one(real, "apps/v1/deployments", "qwen-14b"), what="Deployment")
        user = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{name}"

        def refused() -> list[str]:
            return [
                e["requestURI"]
                for e in plane.audit_events(since, user)
                if e.get("responseStatus", {}).get("code") == 403
            ]

        uris = await eventually(refused, what="a 403 in the audit log")
        assert all("/services" in u for u in uris), uris
        assert one(real, "v1/services", "qwen-14b") is None
    finally:
        proc.stop()
        plane.kubectl("delete", "clusterrolebinding,clusterrole", name, "--ignore-not-found")
        plane.kubectl("delete", "serviceaccount", name, "-n", OPERATOR_NAMESPACE)
    assert adapter_names(real, "qwen-14b") == ["sql-expert", "support-bot"]
