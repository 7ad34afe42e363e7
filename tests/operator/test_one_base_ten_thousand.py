"""One BaseModel with 10,000 LoRAAdapters, inside the limits a real kube-apiserver enforces.

Matrix (issue 14, point 2): the operator's reconcile of a BaseModel with 10,000 adapters
stores its manifest as an index and gzip shards, every object under the API server's 1 MiB,
with no request refused (the emulator refuses what the API server refuses; with
`--kube=real` the real kube-apiserver does); the stored manifest joins back to all 10,000;
the BaseModel's status holds counts, not lists (`kubectl get bm` columns are short scalars);
a 10,001st adapter applied later is in the stored manifest after one more pass.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from loraplex import naming
from loraplex.kube import BASEMODELS, CONFIGMAPS, LORAADAPTERS, PODS, KubeClient
from loraplex.metrics import REGISTRY
from loraplex.podsync import PodSync, PodTarget
from loraplex.reconcile import Reconciler
from loraplex_server import manifest_shards
from loraplex_server.manifest import (
    AdapterManifest,
    AdapterReport,
    AdaptersResponse,
    AdapterState,
)
from tests.operator.conftest import Cluster, EmulatedCluster

pytestmark = [pytest.mark.operator, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parents[2]
NS = "default"
BASE = "big"
N = 10_000
CONFIGMAP_LIMIT = 1024 * 1024


def basemodel() -> dict[str, Any]:
    return {
        "apiVersion": "loraplex.io/v1alpha1",
        "kind": "BaseModel",
        "metadata": {"name": BASE, "namespace": NS},
        "spec": {"model": {"source": "hf://Qwen/Qwen2.5-7B-Instruct"}, "gpu": {"product": "L40S"}},
    }


def adapter(i: int) -> dict[str, Any]:
    """An https archive with its digest: the least compressible kind of manifest entry."""
    return {
        "apiVersion": "loraplex.io/v1alpha1",
        "kind": "LoRAAdapter",
        "metadata": {"name": f"tenant-{i:05d}", "namespace": NS},
        "spec": {
            "baseModel": BASE,
            "source": f"https://adapters.example.com/tenants/tenant-{i:05d}/v3.tar.gz",
            "sha256": hashlib.sha256(f"tenant-{i}".encode()).hexdigest(),
            "rank": 8,
        },
    }


async def create_all(cluster: Cluster, kube: KubeClient, objs: list[dict[str, Any]]) -> None:
    if isinstance(cluster, EmulatedCluster):  # as if applied earlier: no 10,000 POSTs to wait for
        for obj in objs:
            plural = "basemodels" if obj["kind"] == "BaseModel" else "loraadapters"
            cluster.running.emulator.preload(f"loraplex.io/v1alpha1/{plural}", obj)
        return
    sem = asyncio.Semaphore(32)

    async def one(obj: dict[str, Any]) -> None:
        async with sem:
            await kube.create(BASEMODELS if obj["kind"] == "BaseModel" else LORAADAPTERS, NS, obj)

    await asyncio.gather(*(one(o) for o in objs))


@pytest.fixture
async def reconciler(cluster: Cluster) -> AsyncIterator[Reconciler]:
    client = KubeClient(cluster.connection(), user_agent="loraplex-operator/test")
    rec = Reconciler(client, PodSync(), token_key=b"k" * 32, sync_pods=False)
    yield rec
    await rec.statuses.close()
    await client.close()


def stored(cluster: Cluster) -> tuple[list[dict[str, Any]], Any]:
    """Our ConfigMaps for BASE and the manifest they hold."""
    cms = [
        c
        for c in cluster.objects_of("v1/configmaps", NS)
        if (c["metadata"].get("labels") or {}).get(naming.BASE_LABEL) == BASE
    ]
    by_name = {c["metadata"]["name"]: c for c in cms}
    return cms, manifest_shards.from_configmaps(by_name[naming.configmap_name(BASE)], by_name)


def printer_columns(obj: dict[str, Any]) -> dict[str, Any]:
    """What `kubectl get bm` shows: each additionalPrinterColumn's jsonPath resolved."""
    crd = yaml.safe_load((ROOT / "crds" / "loraplex.io_basemodels.yaml").read_text())
    out = {}
    for col in crd["spec"]["versions"][0]["additionalPrinterColumns"]:
        node: Any = obj
        for part in col["jsonPath"].lstrip(".").split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out[col["name"]] = node
    return out


async def test_ten_thousand_adapters_on_one_base_model_within_api_limits(
    cluster: Cluster, kube: KubeClient, reconciler: Reconciler
) -> None:
    await create_all(cluster, kube, [basemodel(), *(adapter(i) for i in range(N))])
    outcome = await reconciler.reconcile_base(NS, BASE)
    assert outcome.result == "ok" and not outcome.conflicts, outcome
    assert outcome.manifest is not None and len(outcome.manifest.adapters) == N

    cms, manifest = stored(cluster)
    assert len(manifest.adapters) == N
    # As one ConfigMap (before) the manifest could not be stored: more than 1 MiB of JSON.
    assert len(manifest_shards.manifest_bytes(manifest)) > CONFIGMAP_LIMIT
    assert len(cms) >= 3  # the index and two shards
    for cm in cms:
        body = {k: cm.get(k) for k in ("data", "binaryData") if cm.get(k)}
        assert len(json.dumps(body)) < 0.85 * CONFIGMAP_LIMIT, cm["metadata"]["name"]
    if isinstance(cluster, EmulatedCluster):  # the emulator refused nothing the server would
        # (404s are reads of what does not exist yet, and the Secret's guarded patch before
        # its create.)
        refused = [
            (r.method, r.plural, r.name, r.status)
            for r in cluster.running.emulator.log
            if (r.status or 0) >= 400 and r.status != 404
        ]
        assert refused == []

    bm = await kube.get(BASEMODELS, NS, BASE)
    assert bm is not None
    status = bm["status"]
    assert status["adapters"]["declared"] == N
    text = json.dumps(status)
    assert len(text) < 8192, len(text)  # counts, conditions and the plan: no per-adapter list
    assert "tenant-0" not in text
    columns = printer_columns(bm)
    assert columns["Adapters"] == f"0/{N}"
    for name, value in columns.items():
        assert value is None or isinstance(value, str | int | float), (name, value)

    # The 10,001st: one more pass stores it (the operator's watch starts that pass at once).
    await kube.create(LORAADAPTERS, NS, adapter(N))
    mark = len(cluster.running.emulator.log) if isinstance(cluster, EmulatedCluster) else 0
    start = time.monotonic()
    outcome = await reconciler.reconcile_base(NS, BASE)
    took = time.monotonic() - start
    assert outcome.result == "ok" and outcome.manifest is not None
    _, manifest = stored(cluster)
    assert len(manifest.adapters) == N + 1
    assert any(a.name == f"tenant-{N:05d}" for a in manifest.adapters)
    if isinstance(cluster, EmulatedCluster):  # each megabyte-sized ConfigMap is read once
        reads = [
            r.name
            for r in cluster.running.emulator.log[mark:]
            if r.method == "GET" and r.plural == "configmaps"
        ]
        assert len(reads) == len(set(reads)) and len(reads) >= 3, reads
    print(f"reconcile pass storing the 10,001st adapter: {took:.2f}s")


async def test_an_apply_does_not_wait_behind_the_status_writes_of_the_pass_before(
    cluster: Cluster, kube: KubeClient
) -> None:
    """A pass hands adapter statuses to their own writer and returns: the pass for the next
    apply (which publishes the manifest) runs while thousands of status PATCHes are still
    queued, instead of after them (they held the BaseModel's lock for minutes at 10,000)."""
    n = 2000
    await create_all(cluster, kube, [basemodel(), *(adapter(i) for i in range(n))])
    client = KubeClient(cluster.connection(), user_agent="loraplex-operator/test")
    rec = Reconciler(
        client, PodSync(), token_key=b"k" * 32, sync_pods=False, status_writes_in_flight=1
    )
    try:
        outcome = await rec.reconcile_base(NS, BASE)
        assert outcome.result == "ok"
        assert rec.statuses.pending() > n // 2  # one write in flight at a time: most still queued
        await kube.create(LORAADAPTERS, NS, adapter(n))
        outcome = await rec.reconcile_base(NS, BASE)
        assert outcome.manifest is not None and len(outcome.manifest.adapters) == n + 1
        _, manifest = stored(cluster)
        assert any(a.name == f"tenant-{n:05d}" for a in manifest.adapters)
        assert rec.statuses.pending() > n // 2  # published while the writes still wait
        await asyncio.wait_for(rec.statuses.flush(), 300)
        adapters = await kube.list(LORAADAPTERS, NS)
        assert len(adapters) == n + 1
        assert all((a.get("status") or {}).get("phase") for a in adapters)
    finally:
        await rec.statuses.close()
        await client.close()


class ReportingPods(PodSync):
    """The pod seam answering as a pod that holds every adapter of the manifest (the reports
    are the server's own response models; what is under test is what the reconciler writes
    from them)."""

    state = AdapterState.CACHED

    async def sync(
        self, pods: Sequence[PodTarget], manifest: AdapterManifest, token: str
    ) -> dict[str, AdaptersResponse | None]:
        adapters = [
            AdapterReport(name=a.name, served_name=a.served_name, state=self.state)
            for a in manifest.adapters
        ]
        report = AdaptersResponse(
            generation=manifest.generation,
            base_served_name=manifest.base_served_name,
            vllm_healthy=True,
            adapters=adapters,
        )
        return {p.name: report for p in pods}


def ready_pod() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"{BASE}-0", "namespace": NS, "labels": naming.selector_labels(BASE)},
        "spec": {"containers": [{"name": "adapter-server", "image": "x"}]},
        "status": {
            "phase": "Running",
            "podIP": "127.0.0.1",
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


async def test_statuses_are_written_once_while_pods_report_the_same(
    cluster: Cluster, kube: KubeClient
) -> None:
    """With a ready pod reporting, a pass that changes nothing writes no adapter status, also
    while the cache still shows the copies from before our writes (kopf's watch lags behind
    them). A pod's freshness flag once took the place of the adapter's current status in the
    comparison, so every pass rewrote every adapter: at 10,000, the operator never settled."""
    n = 50
    await create_all(cluster, kube, [basemodel(), *(adapter(i) for i in range(n))])
    pod = ready_pod()
    await kube.create(PODS, NS, pod)  # status is the kubelet's: set through its subresource
    await kube.patch(PODS, NS, pod["metadata"]["name"], {"status": pod["status"]}, sub="status")
    client = KubeClient(cluster.connection(), user_agent="loraplex-operator/test")
    pods = ReportingPods()
    rec = Reconciler(client, pods, token_key=b"k" * 32)
    try:
        rec.adapters.prime(await kube.list(LORAADAPTERS, NS))  # the cache, then never fed
        await rec.reconcile_base(NS, BASE)
        await asyncio.wait_for(rec.statuses.flush(), 60)
        written = REGISTRY.get_sample_value(
            "loraplex_operator_status_writes_total", {"result": "ok"}
        )
        adapters = await kube.list(LORAADAPTERS, NS)
        # (Loading, AwaitingProof: probes are on by default and this pod proves nothing.)
        assert all(a["status"]["pods"][0]["state"] == "cached" for a in adapters)
        for _ in range(2):
            await rec.reconcile_base(NS, BASE)
            assert rec.statuses.pending() == 0
        await asyncio.wait_for(rec.statuses.flush(), 60)
        after = REGISTRY.get_sample_value("loraplex_operator_status_writes_total", {"result": "ok"})
        assert after == written
        # Unchanged adapters are not decided again; a changed report is (every adapter).
        pods.state = AdapterState.LOADING
        await rec.reconcile_base(NS, BASE)
        assert rec.statuses.pending() == n
        await asyncio.wait_for(rec.statuses.flush(), 60)
        adapters = await kube.list(LORAADAPTERS, NS)
        assert all(a["status"]["pods"][0]["state"] == "loading" for a in adapters)
        # The watch event of our own manifest write starts no pass; a hand edit does.
        index = await kube.get(CONFIGMAPS, NS, naming.configmap_name(BASE))
        assert index is not None and rec.is_own_write(index)
        edited = await kube.patch(
            CONFIGMAPS, NS, naming.configmap_name(BASE), {"metadata": {"labels": {"x": "y"}}}
        )
        assert edited is not None and not rec.is_own_write(edited)
        # The watch may deliver a write's event before the pass that wrote it has read the
        # response: the event is judged after that pass lets the BaseModel go.
        publishing = rec._locks[(NS, BASE)]
        await publishing.acquire()
        judged = asyncio.create_task(rec.was_own_write(edited))
        await asyncio.sleep(0.05)
        assert not judged.done()
        rec._remember_write(edited)  # what the pass does once the write's response is read
        publishing.release()
        assert await asyncio.wait_for(judged, 5)
    finally:
        await rec.statuses.close()
        await client.close()


class HeldPods(ReportingPods):
    """ReportingPods whose polls wait for the test to let them answer, recording the
    generation each `sync` was asked about."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.polled: list[int] = []

    async def sync(
        self, pods: Sequence[PodTarget], manifest: AdapterManifest, token: str
    ) -> dict[str, AdaptersResponse | None]:
        self.polled.append(manifest.generation)
        await self.gate.wait()
        return await super().sync(pods, manifest, token)


async def test_the_next_pass_publishes_while_the_one_before_polls_its_pods(
    cluster: Cluster, kube: KubeClient
) -> None:
    """A pass lets its BaseModel go before it polls pods (ten pages per pod at 10,000
    adapters): an apply's pass publishes its manifest meanwhile, and its own poll and status
    report wait for the earlier pass's, so reports land in the order passes published."""
    n = 20
    await create_all(cluster, kube, [basemodel(), *(adapter(i) for i in range(n))])
    pod = ready_pod()
    await kube.create(PODS, NS, pod)
    await kube.patch(PODS, NS, pod["metadata"]["name"], {"status": pod["status"]}, sub="status")
    client = KubeClient(cluster.connection(), user_agent="loraplex-operator/test")
    pods = HeldPods()
    rec = Reconciler(client, pods, token_key=b"k" * 32)
    try:
        first = asyncio.create_task(rec.reconcile_base(NS, BASE))
        await _until(lambda: pods.polled == [1])
        await kube.create(LORAADAPTERS, NS, adapter(n))
        second = asyncio.create_task(rec.reconcile_base(NS, BASE))
        # Published while the first pass is still held in its poll.
        await _until(lambda: len(stored(cluster)[1].adapters) == n + 1)
        assert not first.done() and pods.polled == [1]  # the second waits to poll after it
        pods.gate.set()
        one, two = await asyncio.wait_for(asyncio.gather(first, second), 60)
        assert (one.result, two.result) == ("ok", "ok") and pods.polled == [1, 2]
        await asyncio.wait_for(rec.statuses.flush(), 60)
        bm = await kube.get(BASEMODELS, NS, BASE)
        assert bm is not None and bm["status"]["manifestGeneration"] == 2
        added = await kube.get(LORAADAPTERS, NS, f"tenant-{n:05d}")
        assert added is not None and added["status"]["pods"][0]["state"] == "cached"
    finally:
        await rec.statuses.close()
        await client.close()


async def _until(check: Any, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)
