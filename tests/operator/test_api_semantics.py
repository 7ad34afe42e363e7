"""The API semantics a long-running operator meets on a real server, against the stand-in.

Client level (loraplex.kube over lightkube): credentials that refresh (token file rewritten,
exec plugin re-run before its expirationTimestamp and after a 401), Retry-After backoff,
409 on a stale resourceVersion, server-side apply field ownership, guarded JSON patches.
Reconciler level (in process, no kopf): 409 answered by re-reading, fields an HPA or Argo CD
own left alone, no adoption of foreign objects (OwnedObjectConflict), owner-reference GC.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from loraplex import naming
from loraplex.devtools.emulator import Fault, RunningEmulator, write_kubeconfig
from loraplex.errors import KubeError
from loraplex.kube import (
    BASEMODELS,
    CONFIGMAPS,
    DEPLOYMENTS,
    NETWORKPOLICIES,
    SECRETS,
    SERVICES,
    Connection,
    ExecPlugin,
    KubeClient,
    TokenFile,
    discover_connection,
)
from loraplex.podsync import PodSync
from loraplex.reconcile import Reconciler


@pytest.fixture
def kube_backend() -> str:
    """Always the emulator: these tests drive what the emulator models on purpose (an auth
    gate, Retry-After, 409s, managedFields) and read its request log; the real-server tier
    checks the same client against real semantics in test_reconcile_e2e and
    test_real_apiserver."""
    return "emulator"


pytestmark = [pytest.mark.operator, pytest.mark.timeout(120)]
ROOT = Path(__file__).resolve().parents[2]
NS = "default"


def write_exec_plugin(tmp: Path, lifetime: float) -> tuple[Path, Path, Path]:
    """A credential plugin like `aws eks get-token`: prints an ExecCredential whose token is
    the content of `source` and which expires `lifetime` seconds from now; logs each run."""
    source, runs = tmp / "exec-token", tmp / "exec-runs"
    script = tmp / "get-token.py"
    script.write_text(
        f"#!{sys.executable}\n"
        "import datetime, json, pathlib\n"
        f"pathlib.Path({str(runs)!r}).open('a').write('run\\n')\n"
        f"token = pathlib.Path({str(source)!r}).read_text().strip()\n"
        "exp = datetime.datetime.now(datetime.UTC) + "
        f"datetime.timedelta(seconds={lifetime})\n"
        "print(json.dumps({'apiVersion': 'client.authentication.k8s.io/v1beta1',\n"
        "  'kind': 'ExecCredential', 'status': {'token': token,\n"
        "  'expirationTimestamp': exp.strftime('%Y-%m-%dT%H:%M:%SZ')}}))\n"
    )
    script.chmod(0o755)
    return script, source, runs


def exec_user(script: Path) -> dict[str, Any]:
    return {
        "exec": {
            "apiVersion": "client.authentication.k8s.io/v1beta1",
            "command": str(script),
            "args": [],
            "interactionMode": "Never",
        }
    }


def client_for(kubeconfig: Path, monkeypatch: pytest.MonkeyPatch) -> KubeClient:
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    # No in-cluster account here: discovery must fall through to KUBECONFIG, as kubectl does.
    return KubeClient(discover_connection(), user_agent="loraplex-tests")


def other_manager(cluster: RunningEmulator, manager: str) -> KubeClient:
    """A client writing as another field manager (an HPA, Argo CD, kubectl)."""
    return KubeClient(
        Connection(server=cluster.url), user_agent=f"{manager}/v1", field_manager=manager
    )


def bm(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "basemodel.yaml").read_text())
    doc["metadata"]["name"] = name
    doc["spec"].pop("adapterVolumes", None)
    return doc


async def test_token_file_rewritten_is_reread(
    cluster: RunningEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = tmp_path / "token"
    token.write_text("tok-1")
    cfg = write_kubeconfig(tmp_path / "kc", cluster.url, {"tokenFile": str(token)})
    client = client_for(cfg, monkeypatch)
    assert isinstance(client.credentials, TokenFile)
    cluster.emulator.require_tokens("tok-1")
    try:
        assert await client.get(BASEMODELS, NS, "none") is None
        for n in (2, 3):  # two rotations, the old token refused at once
            cluster.emulator.require_tokens(f"tok-{n}")
            token.write_text(f"tok-{n}")
            assert await client.get(BASEMODELS, NS, "none") is None
        # Server rotated before the file (a kubelet lagging): the 401 is retried once after
        # re-reading, so as soon as the file catches up the next call passes.
        cluster.emulator.require_tokens("tok-4")
        with pytest.raises(KubeError) as err:
            await client.get(BASEMODELS, NS, "none")
        assert err.value.status == 401
        token.write_text("tok-4")
        assert await client.get(BASEMODELS, NS, "none") is None
    finally:
        await client.close()


async def test_exec_plugin_reruns_before_expiry_and_after_401(
    cluster: RunningEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script, source, runs = write_exec_plugin(tmp_path, lifetime=5.0)
    source.write_text("exec-1")
    cfg = write_kubeconfig(tmp_path / "kc", cluster.url, exec_user(script))
    client = client_for(cfg, monkeypatch)
    assert isinstance(client.credentials, ExecPlugin)
    cluster.emulator.require_tokens("exec-1")
    try:
        assert await client.get(BASEMODELS, NS, "none") is None
        assert await client.get(BASEMODELS, NS, "none") is None
        assert runs.read_text().count("run") == 1  # cached while valid
        # Before its expirationTimestamp the plugin runs again, with no 401 seen.
        source.write_text("exec-2")
        cluster.emulator.require_tokens("exec-1", "exec-2")
        await asyncio.sleep(4.0)  # past expiry minus the margin (a quarter of the lifetime here)
        rejected = len(cluster.emulator.rejected)
        assert await client.get(BASEMODELS, NS, "none") is None
        assert runs.read_text().count("run") == 2
        assert len(cluster.emulator.rejected) == rejected
        # Revoked early (server-side rotation): one 401, re-run, retried, passes.
        source.write_text("exec-3")
        cluster.emulator.require_tokens("exec-3")
        assert await client.get(BASEMODELS, NS, "none") is None
        assert runs.read_text().count("run") == 3
        assert len(cluster.emulator.rejected) == rejected + 1
        info = await client.connection_info()  # what kopf's login handler returns
        assert info.token == "exec-3" and info.expiration is not None
        assert info.expiration > datetime.datetime.now(datetime.UTC)
    finally:
        await client.close()


async def test_retry_after_is_honoured(cluster: RunningEmulator, kube: KubeClient) -> None:
    await kube.create(BASEMODELS, NS, bm("rate"))
    fault = cluster.emulator.inject(Fault("PATCH", "basemodels", 429, retry_after=1, times=2))
    start = time.monotonic()
    await kube.patch(BASEMODELS, NS, "rate", {"metadata": {"labels": {"x": "1"}}})
    assert time.monotonic() - start >= 2.0  # two Retry-After: 1 waits
    assert fault.served == 2
    patches = [r for r in cluster.requests() if r.method == "PATCH"]
    assert [r.status for r in patches] == [429, 429, 200]
    # A 503 with Retry-After is retried the same way; without it, the error surfaces.
    cluster.emulator.inject(Fault("GET", "basemodels", 503, retry_after=0, times=1))
    assert await kube.get(BASEMODELS, NS, "rate") is not None
    cluster.emulator.inject(Fault("GET", "basemodels", 500, retry_after=None, times=1))
    with pytest.raises(KubeError) as err:
        await kube.get(BASEMODELS, NS, "rate")
    assert err.value.status == 500


async def test_stale_resource_version_is_a_conflict(kube: KubeClient) -> None:
    cm = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "c", "namespace": NS},
        "data": {"a": "1"},
    }
    created = await kube.create(CONFIGMAPS, NS, cm)
    stale = created["metadata"]["resourceVersion"]
    await kube.patch(CONFIGMAPS, NS, "c", {"data": {"a": "2"}})
    with pytest.raises(KubeError) as err:
        await kube.server_side_apply(
            {**cm, "metadata": {**cm["metadata"], "resourceVersion": stale}, "data": {"a": "3"}}
        )
    assert err.value.status == 409
    current = await kube.get(CONFIGMAPS, NS, "c")
    assert current is not None and current["data"] == {"a": "2"}


async def test_server_side_apply_keeps_other_managers_fields(
    cluster: RunningEmulator, kube: KubeClient
) -> None:
    dep = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "d", "namespace": NS, "labels": {"a": "1"}},
        "spec": {"replicas": 1, "template": {"spec": {"containers": [{"name": "c"}]}}},
    }
    await kube.server_side_apply(dep)
    hpa = other_manager(cluster, "kube-controller-manager")
    argo = other_manager(cluster, "argocd-controller")
    try:
        await hpa.patch(DEPLOYMENTS, NS, "d", {"spec": {"replicas": 4}})
        await argo.patch(DEPLOYMENTS, NS, "d", {"metadata": {"annotations": {"argo": "x"}}})
        # Applying without replicas leaves the HPA's value and Argo's annotation alone.
        no_replicas = json.loads(json.dumps(dep))
        del no_replicas["spec"]["replicas"]
        no_replicas["metadata"]["labels"]["a"] = "2"
        out = await kube.server_side_apply(no_replicas)
        assert out["spec"]["replicas"] == 4
        assert out["metadata"]["annotations"] == {"argo": "x"}
        assert out["metadata"]["labels"] == {"a": "2"}
        managers = {m["manager"]: m["fieldsV1"] for m in out["metadata"]["managedFields"]}
        assert "f:replicas" in managers["kube-controller-manager"]["f:spec"]
        # Without force, taking a field another manager owns is a conflict.
        with pytest.raises(KubeError) as err:
            await kube.server_side_apply(dep, force=False)
        assert err.value.status == 409
    finally:
        await hpa.close()
        await argo.close()


async def test_failed_json_patch_test_writes_nothing(kube: KubeClient) -> None:
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "s", "namespace": NS, "labels": {"owner": "helm"}},
        "data": {"token": base64.b64encode(b"theirs").decode()},
    }
    await kube.create(SECRETS, NS, secret)
    ops = [
        {"op": "test", "path": "/metadata/labels/owner", "value": "loraplex"},
        {"op": "add", "path": "/data/token", "value": base64.b64encode(b"ours").decode()},
    ]
    with pytest.raises(KubeError) as err:
        await kube.json_patch(SECRETS, NS, "s", ops)
    assert err.value.status == 422
    ops[0]["value"] = "helm"
    out = await kube.json_patch(SECRETS, NS, "s", ops)
    assert out is not None and base64.b64decode(out["data"]["token"]) == b"ours"
    assert await kube.json_patch(SECRETS, NS, "missing", ops) is None


# -- the reconciler (in process) -------------------------------------------------------------


@pytest.fixture
async def reconciler(cluster: RunningEmulator) -> AsyncIterator[Reconciler]:
    client = KubeClient(Connection(server=cluster.url), user_agent="loraplex-operator/test")
    rec = Reconciler(client, PodSync(), token_key=b"k" * 32, sync_pods=False)
    yield rec
    await rec.statuses.close()
    await client.close()


def status_condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    conds = ((obj or {}).get("status") or {}).get("conditions") or []
    return next((c for c in conds if c["type"] == type_), None)


async def test_conflict_on_write_is_reread_and_retried(
    cluster: RunningEmulator, kube: KubeClient, reconciler: Reconciler
) -> None:
    await kube.create(BASEMODELS, NS, bm("b"))
    await reconciler.reconcile_base(NS, "b")
    # Someone edits our Deployment (drift), and our first write loses a race (409).
    await kube.patch(DEPLOYMENTS, NS, "b", {"metadata": {"labels": {naming.BASE_LABEL: "x"}}})
    fault = cluster.emulator.inject(Fault("PATCH", "deployments", 409, retry_after=None))
    before = len(cluster.requests())
    outcome = await reconciler.reconcile_base(NS, "b")
    assert "Deployment/b" in outcome.writes and fault.served == 1
    dep_calls = [
        (r.method, r.status) for r in cluster.requests()[before:] if r.plural == "deployments"
    ]
    # read, stale write refused, re-read, write (then the status read of the Deployment)
    assert dep_calls[:4] == [("GET", 200), ("PATCH", 409), ("GET", 200), ("PATCH", 200)]
    dep = await kube.get(DEPLOYMENTS, NS, "b")
    assert dep is not None and dep["metadata"]["labels"][naming.BASE_LABEL] == "b"


async def test_hpa_replicas_and_foreign_annotations_are_left_alone(
    cluster: RunningEmulator, kube: KubeClient, reconciler: Reconciler
) -> None:
    await kube.create(BASEMODELS, NS, bm("h"))
    await reconciler.reconcile_base(NS, "h")
    hpa = other_manager(cluster, "kube-controller-manager")
    argo = other_manager(cluster, "argocd-controller")
    editor = other_manager(cluster, "kubectl-edit")
    try:
        await hpa.patch(DEPLOYMENTS, NS, "h", {"spec": {"replicas": 5}})
        await argo.patch(DEPLOYMENTS, NS, "h", {"metadata": {"annotations": {"argo/x": "1"}}})
        await argo.patch(SERVICES, NS, "h", {"metadata": {"annotations": {"argo/x": "1"}}})
        # A hand edit of a field that is ours is drift, and is corrected.
        dep = await kube.get(DEPLOYMENTS, NS, "h")
        assert dep is not None
        containers = dep["spec"]["template"]["spec"]["containers"]
        image = containers[0]["image"]
        containers[0]["image"] = "evil:latest"
        await editor.patch(
            DEPLOYMENTS, NS, "h", {"spec": {"template": {"spec": {"containers": containers}}}}
        )
        outcome = await reconciler.reconcile_base(NS, "h")
        assert "Deployment/h" in outcome.writes
        dep = await kube.get(DEPLOYMENTS, NS, "h")
        assert dep is not None
        assert dep["spec"]["replicas"] == 5
        assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == image
        assert dep["metadata"]["annotations"]["argo/x"] == "1"
        svc = await kube.get(SERVICES, NS, "h")
        assert svc is not None and svc["metadata"]["annotations"]["argo/x"] == "1"
        # And nothing more is written while nothing of ours drifts (no fight with the HPA).
        outcome = await reconciler.reconcile_base(NS, "h")
        assert outcome.writes == ["Secret/h-admin"]  # the guarded, read-free Secret patch
    finally:
        for c in (hpa, argo, editor):
            await c.close()


def foreign_objects(name: str) -> list[tuple[Any, dict[str, Any]]]:
    helm = {"app.kubernetes.io/managed-by": "Helm", "app": name}
    meta = {"namespace": NS, "labels": helm}
    return [
        (
            DEPLOYMENTS,
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": naming.deployment_name(name), **meta},
                "spec": {
                    "replicas": 2,
                    "selector": {"matchLabels": {"app": name}},
                    "template": {
                        "metadata": {"labels": {"app": name}},
                        "spec": {"containers": [{"name": "web", "image": "nginx"}]},
                    },
                },
            },
        ),
        (
            SERVICES,
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": naming.service_name(name), **meta},
                "spec": {"selector": {"app": name}, "ports": [{"port": 80}]},
            },
        ),
        (
            SECRETS,
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": naming.secret_name(name), **meta},
                "data": {"token": base64.b64encode(b"helm-owned-secret").decode()},
            },
        ),
    ]


async def test_foreign_objects_are_never_adopted(
    cluster: RunningEmulator, kube: KubeClient, reconciler: Reconciler
) -> None:
    name = "web"
    for kind, obj in foreign_objects(name):
        await kube.create(kind, NS, obj)
    before = {
        kind.plural: await kube.get(kind, NS, obj["metadata"]["name"])
        for kind, obj in foreign_objects(name)
    }
    await kube.create(BASEMODELS, NS, bm(name))
    outcome = await reconciler.reconcile_base(NS, name)
    assert len(outcome.conflicts) == 3
    for kind, obj in foreign_objects(name):
        assert await kube.get(kind, NS, obj["metadata"]["name"]) == before[kind.plural]
    # The Secret was never read by the reconciler: its only Secret call is the guarded patch.
    calls = [
        (r.method, r.status)
        for r in cluster.requests(exclude_agent="loraplex-tests")
        if r.plural == "secrets"
    ]
    assert calls == [("PATCH", 422)]
    status_obj = await kube.get(BASEMODELS, NS, name)
    cond = status_condition(status_obj, "OwnedObjectConflict")
    assert cond is not None and cond["status"] == "True"
    for what in ("Deployment 'web'", "Service 'web'", "Secret 'web-admin'"):
        assert what in cond["message"]
    ready = status_condition(status_obj, "Ready")
    assert ready is not None and ready["status"] == "False"
    # The ConfigMap did not exist: it was created (and is ours).
    assert await kube.get(CONFIGMAPS, NS, naming.configmap_name(name)) is not None


async def test_deleting_a_basemodel_collects_what_it_owns(
    cluster: RunningEmulator, kube: KubeClient, reconciler: Reconciler
) -> None:
    await kube.create(BASEMODELS, NS, bm("gc"))
    for kind, obj in foreign_objects("other"):
        await kube.create(kind, NS, obj)
    await reconciler.reconcile_base(NS, "gc")
    owned = [
        (DEPLOYMENTS, "gc"),
        (SERVICES, "gc"),
        (CONFIGMAPS, naming.configmap_name("gc")),
        (CONFIGMAPS, naming.manifest_shard_name("gc", 0)),
        (SECRETS, naming.secret_name("gc")),
        (NETWORKPOLICIES, naming.networkpolicy_name("gc")),
    ]
    for kind, n in owned:
        assert await kube.get(kind, NS, n) is not None
    await kube.delete(BASEMODELS, NS, "gc")
    for kind, n in owned:
        assert await kube.get(kind, NS, n) is None, f"{kind.kind} {n} not collected"
    assert sorted(cluster.emulator.collected) == sorted(f"{k.kind}/{n}" for k, n in owned)
    for kind, obj in foreign_objects("other"):
        assert await kube.get(kind, NS, obj["metadata"]["name"]) is not None
