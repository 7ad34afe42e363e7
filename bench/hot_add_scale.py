"""Hot add of the 10,001st adapter: `kubectl apply` to the first completion through the pod.

One BaseModel with N (default 10,000) LoRAAdapters already applied, the operator running and
settled, and one pod: the real adapter-server process in front of the compiled vLLM stand-in
(`shared/bench/sse`, adapter slots and loads simulated), its manifest mounted as the projected
volume (index + gzip shards, kept current the way the kubelet does, every second) and its Pod
object published so the operator pushes manifests to its admin port. Then a new LoRAAdapter is
applied and the clock runs until `POST /v1/completions` with that adapter's name answers 200
through the server (requests every 20 ms). Repeated `--adds` times (the 10,001st, 10,002nd,
...); the API limits the emulator enforces (1 MiB objects, 3 MiB bodies) are on throughout.

    flock /tmp/loraplex-heavy.lock python -m bench.hot_add_scale --adapters 10000 [--in-process]

`--in-process` runs the operator's reconciler in this process instead of the kopf operator
process, fed as kopf's watch feeds it (the adapter cache primed from the stored objects, the new
adapter's ADDED event, then its BaseModel's pass): everything from the apply to the completion
except the watch event's delivery. At 10,000 preloaded adapters the kopf process spends its
first many minutes on per-adapter start-up (finalizers, annotations) against the emulator in
this process (both on two shared cores), which is the operator-scale work, not the hot add.

Prints one JSON object: time to converge, to settle, and per add: apply -> manifest published
(index names it), apply -> first completion.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from loraplex import naming
from loraplex.demo.chain import _shape_of as shape_of
from loraplex.devtools import ssebench
from loraplex.devtools.emulator import RunningEmulator, running_emulator
from loraplex.devtools.kubelet import LocalPod, publish_pod, sync_volumes
from loraplex.devtools.operator_proc import OperatorProcess
from loraplex.devtools.processes import start_server
from loraplex.devtools.tinymodel import make_adapter, make_model
from loraplex.errors import KubeError
from loraplex.kube import DEPLOYMENTS, LORAADAPTERS, SECRETS, Connection, KubeClient
from loraplex_server import manifest_shards

NS = "default"
BASE = "tiny"
CLAIM = "team-adapters"


def basemodel(model: Path) -> dict[str, Any]:
    """The BaseModel, declaring the tiny model's architecture (as the demo does), so adapters
    are checked against the shapes the stand-in serves."""
    return {
        "apiVersion": "loraplex.io/v1alpha1",
        "kind": "BaseModel",
        "metadata": {"name": BASE, "namespace": NS},
        "spec": {
            "model": {"source": "hf://Qwen/Qwen2.5-7B-Instruct", "architecture": shape_of(model)},
            "gpu": {"product": "H100-80GB"},
            "adapterVolumes": [{"claimName": CLAIM}],
            # The stand-in returns no logprobs to probe with (real vLLM does): names and
            # shapes are still checked against the declared architecture.
            "adapterChecks": {"probe": False},
        },
    }


def lora(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "loraplex.io/v1alpha1",
        "kind": "LoRAAdapter",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"baseModel": BASE, "source": f"pvc://{CLAIM}/a", "rank": 8},
    }


def declared(cluster: RunningEmulator) -> int:
    """How many adapters the stored index names (-1 before there is one). Reading the index
    only, looked up by key: joining 10,000 adapters' shards, or copying every ConfigMap (as
    an earlier version did, every 10 ms), takes the emulator's event loop (this process)
    away from the operator it serves."""
    c = cluster.emulator.raw_object("v1/configmaps", NS, naming.configmap_name(BASE))
    if c is None:
        return -1
    doc = manifest_shards.parse((c.get("data") or {}).get(naming.MANIFEST_KEY, "{}"))
    return doc.adapters if isinstance(doc, manifest_shards.ManifestIndex) else -1


async def until(what: str, check: Any, timeout: float, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        await asyncio.sleep(every)
    raise TimeoutError(what)


async def kubelet(kube: KubeClient, pod: LocalPod) -> None:
    """The projected manifest volume, refreshed every second as a kubelet would."""
    while True:
        with contextlib.suppress(KubeError):
            await sync_volumes(kube, NS, pod)
        await asyncio.sleep(1.0)


async def in_thread(coro: Any) -> Any:
    """Run `coro` on its own event loop in a thread: the clock must not wait for this loop,
    which also runs the emulator (and, in-process, the reconciler)."""
    return await asyncio.to_thread(asyncio.run, coro)


async def pod_settled(url: str, adapters: int, timeout: float = 900) -> None:
    """Until the server has fetched every adapter (its per-state gauge), so the operator's
    passes that follow write every status once and the hot add meets a quiet pod."""
    pattern = re.compile(r'^loraplex_server_adapters\{state="(\w+)"\} (\S+)$', re.M)
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            async with s.get(f"{url}/metrics") as r:
                text = await r.text()
            done = sum(
                float(m.group(2))
                for m in pattern.finditer(text)
                if m.group(1) in ("cached", "loaded", "failed")
            )
            if done >= adapters:
                return
            await asyncio.sleep(1)
    raise TimeoutError("the pod did not fetch every adapter")


def show_logs(root: Path) -> None:
    """The tails of the server's and the stand-in's logs, for a run that failed."""
    for log in ("server.log", "upstream.log"):
        with contextlib.suppress(OSError):
            print(f"--- {log}", *(root / log).read_text().splitlines()[-15:], sep="\n")


def copy_logs(logs: list[Path], folder: Path) -> None:
    """Keep the run's logs: a pass slower than half a second logs its phases there."""
    folder.mkdir(parents=True, exist_ok=True)
    for kept in logs:
        with contextlib.suppress(OSError):
            shutil.copy(kept, folder / kept.name)


async def stop_pod(tasks: list[asyncio.Task[None]], server: Any) -> None:
    """Stop the bench's kubelet task(s) and the adapter-server (if it started)."""
    for t in tasks:
        t.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await t
    if server is not None:
        await asyncio.to_thread(server.stop)


async def first_completion(url: str, model: str, timeout: float = 60) -> int:
    """POST until 200; returns the number of attempts."""
    body = {"model": model, "prompt": "hello", "max_tokens": 4}
    deadline = time.monotonic() + timeout
    attempts, last = 0, b""
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            attempts += 1
            async with s.post(f"{url}/v1/completions", json=body) as r:
                last = await r.read()
                if r.status == 200:
                    return attempts
            await asyncio.sleep(0.02)
    raise TimeoutError(f"{model} not served within {timeout}s: {last[:300]!r}")


async def run(
    adapters: int, adds: int, timeout: float, keep_logs: Path | None = None
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="loraplex-hot-add-") as tmp:
        root = Path(tmp)
        model = await asyncio.to_thread(make_model, root / "tiny")
        await asyncio.to_thread(make_adapter, model, root / "pvc" / CLAIM / "a")
        stand_in = await asyncio.to_thread(
            ssebench.start_upstream, root / "upstream.log", base=BASE, slots=8, load_ms=20
        )
        async with running_emulator(root) as cluster:
            cluster.emulator.preload("loraplex.io/v1alpha1/basemodels", basemodel(model))
            for i in range(adapters):
                cluster.emulator.preload("loraplex.io/v1alpha1/loraadapters", lora(f"a-{i:05d}"))
            op = OperatorProcess(cluster.kubeconfig, root).start()
            kube = KubeClient(Connection(server=cluster.url), user_agent="loraplex-bench")
            server = None
            tasks: list[asyncio.Task[None]] = []
            try:
                start = time.monotonic()
                await until(
                    "manifest of every adapter", lambda: declared(cluster) == adapters, timeout
                )
                converged = time.monotonic() - start
                dep = secret = None
                for _ in range(120):
                    with contextlib.suppress(KubeError):  # busy: the operator's start-up
                        dep = await kube.get(DEPLOYMENTS, NS, naming.deployment_name(BASE))
                        secret = await kube.get(SECRETS, NS, naming.secret_name(BASE))
                        if dep is not None and secret is not None:
                            break
                    await asyncio.sleep(0.5)
                assert dep is not None and secret is not None, "no Deployment or Secret"
                token = base64.b64decode(secret["data"]["token"]).decode()
                (root / "token").write_text(token)
                mount = root / "pod" / "manifest"
                mount.mkdir(parents=True)
                vol = next(
                    v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "manifest"
                )
                volumes = LocalPod(root / "pod", {"manifest": mount}, {}, {}, {})
                volumes.sources = {"manifest": vol}
                tasks.append(asyncio.create_task(kubelet(kube, volumes)))
                await until("mounted manifest", lambda: (mount / "manifest.json").exists(), 30)
                server, admin_url = await asyncio.to_thread(
                    start_server,
                    vllm_url=stand_in.url,
                    manifest=mount / naming.MANIFEST_KEY,
                    cache_dir=root / "cache",
                    pvc_root=root / "pvc",
                    admin_token_file=root / "token",
                    log_path=root / "server.log",
                    wait=120.0,
                )
                public_port = int(server.url.rsplit(":", 1)[1])
                admin_port = int(admin_url.rsplit(":", 1)[1])
                pod = LocalPod(
                    root / "pod",
                    {},
                    {},
                    {},
                    {naming.PUBLIC_PORT: public_port, naming.ADMIN_PORT: admin_port},
                )
                for _ in range(10):
                    with contextlib.suppress(KubeError):
                        await publish_pod(kube, NS, BASE, pod, ready=True)
                        break
                    await asyncio.sleep(1)
                await pod_settled(server.url, adapters)
                # Settled: the operator has written every adapter's status (it only writes
                # one when the pod reports the adapter), and nothing for 3 s.
                while time.monotonic() - start < timeout:
                    mark = len(cluster.emulator.log)
                    await asyncio.sleep(3)
                    if not any(
                        r.plural == "loraadapters" and r.method == "PATCH"
                        for r in cluster.emulator.log[mark:]
                    ):
                        break
                settled = time.monotonic() - start
                results = []
                for k in range(adds):
                    name = f"hot-{adapters + k + 1}"
                    t0 = time.monotonic()
                    await kube.apply(lora(name))
                    served = asyncio.create_task(in_thread(first_completion(server.url, name)))
                    want = adapters + k + 1
                    await until("published", lambda w=want: declared(cluster) >= w, 60, every=0.01)
                    t_published = time.monotonic() - t0
                    attempts = await served
                    t_served = time.monotonic() - t0
                    results.append(
                        {
                            "adapter": name,
                            "apply_to_published_s": round(t_published, 3),
                            "apply_to_first_completion_s": round(t_served, 3),
                            "attempts": attempts,
                        }
                    )
                    await asyncio.sleep(2)
            except BaseException:
                show_logs(root)
                raise
            finally:
                await stop_pod(tasks, server)
                await kube.close()
                await asyncio.to_thread(op.stop)
                stand_in.stop()
                if keep_logs is not None:
                    logs = [op.log_path, root / "server.log"]
                    await asyncio.to_thread(copy_logs, logs, keep_logs)
    served_times = [r["apply_to_first_completion_s"] for r in results]
    return {
        "adapters": adapters,
        "converged_s": round(converged, 1),
        "settled_s": round(settled, 1),
        "adds": results,
        "median_apply_to_first_completion_s": statistics.median(served_times),
        "max_apply_to_first_completion_s": max(served_times),
    }


async def run_in_process(adapters: int, adds: int) -> dict[str, Any]:
    from loraplex.podsync import PodSync
    from loraplex.reconcile import Reconciler

    with tempfile.TemporaryDirectory(prefix="loraplex-hot-add-") as tmp:
        root = Path(tmp)
        model = await asyncio.to_thread(make_model, root / "tiny")
        await asyncio.to_thread(make_adapter, model, root / "pvc" / CLAIM / "a")
        stand_in = await asyncio.to_thread(
            ssebench.start_upstream, root / "upstream.log", base=BASE, slots=8, load_ms=20
        )
        async with running_emulator(root) as cluster:
            emu = cluster.emulator
            emu.preload("loraplex.io/v1alpha1/basemodels", basemodel(model))
            for i in range(adapters):
                emu.preload("loraplex.io/v1alpha1/loraadapters", lora(f"a-{i:05d}"))
            kube = KubeClient(Connection(server=cluster.url), user_agent="loraplex-bench")
            op_kube = KubeClient(Connection(server=cluster.url), user_agent="loraplex-operator/b")
            pods = PodSync(timeout=30)
            rec = Reconciler(op_kube, pods, token_key=b"k" * 32)
            rec.adapters.prime(emu.objects_of("loraplex.io/v1alpha1/loraadapters"))
            server = None
            tasks: list[asyncio.Task[None]] = []
            try:
                start = time.monotonic()
                await rec.reconcile_base(NS, BASE)  # objects, manifest, 10,000 statuses
                await rec.statuses.flush()
                converged = time.monotonic() - start
                dep = await kube.get(DEPLOYMENTS, NS, naming.deployment_name(BASE))
                secret = await kube.get(SECRETS, NS, naming.secret_name(BASE))
                assert dep is not None and secret is not None
                (root / "token").write_text(base64.b64decode(secret["data"]["token"]).decode())
                mount = root / "pod" / "manifest"
                mount.mkdir(parents=True)
                vol = next(
                    v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "manifest"
                )
                volumes = LocalPod(root / "pod", {"manifest": mount}, {}, {}, {})
                volumes.sources = {"manifest": vol}
                await sync_volumes(kube, NS, volumes)
                tasks.append(asyncio.create_task(kubelet(kube, volumes)))
                server, admin_url = await asyncio.to_thread(
                    start_server,
                    vllm_url=stand_in.url,
                    manifest=mount / naming.MANIFEST_KEY,
                    cache_dir=root / "cache",
                    pvc_root=root / "pvc",
                    admin_token_file=root / "token",
                    log_path=root / "server.log",
                    wait=300.0,
                )
                ports = {
                    naming.PUBLIC_PORT: int(server.url.rsplit(":", 1)[1]),
                    naming.ADMIN_PORT: int(admin_url.rsplit(":", 1)[1]),
                }
                await publish_pod(
                    kube, NS, BASE, LocalPod(root / "pod", {}, {}, {}, ports), ready=True
                )
                await pod_settled(server.url, adapters)

                def watched() -> None:  # what kopf's watch delivers after status writes
                    rec.adapters.prime(emu.objects_of("loraplex.io/v1alpha1/loraadapters"))

                watched()
                await rec.reconcile_base(NS, BASE)  # polls the pod, writes Ready statuses
                await rec.statuses.flush()
                watched()
                await rec.reconcile_base(NS, BASE)  # settled: nothing left to write
                await rec.statuses.flush()
                watched()
                settled = time.monotonic() - start
                results = []
                for k in range(adds):
                    name = f"hot-{adapters + k + 1}"
                    t0 = time.monotonic()
                    created = await kube.create(LORAADAPTERS, NS, lora(name))
                    served = asyncio.create_task(in_thread(first_completion(server.url, name)))
                    rec.adapters.apply("ADDED", created)  # kopf's watch event
                    outcome = await rec.reconcile_base(NS, BASE)
                    t_pass = time.monotonic() - t0
                    assert outcome.manifest is not None
                    assert any(a.name == name for a in outcome.manifest.adapters)
                    attempts = await served
                    t_served = time.monotonic() - t0
                    results.append(
                        {
                            "adapter": name,
                            "apply_to_pass_done_s": round(t_pass, 3),
                            "apply_to_first_completion_s": round(t_served, 3),
                            "attempts": attempts,
                        }
                    )
                    await asyncio.sleep(2)
                    watched()
            except BaseException:
                show_logs(root)
                raise
            finally:
                await stop_pod(tasks, server)
                await rec.statuses.close()
                await kube.close()
                await op_kube.close()
                await pods.close()
                stand_in.stop()
    served_times = [r["apply_to_first_completion_s"] for r in results]
    return {
        "mode": "in-process reconciler",
        "adapters": adapters,
        "first_pass_s": round(converged, 1),
        "settled_s": round(settled, 1),
        "adds": results,
        "median_apply_to_first_completion_s": statistics.median(served_times),
        "max_apply_to_first_completion_s": max(served_times),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, default=10_000)
    ap.add_argument("--adds", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--in-process", action="store_true", help="the reconciler without kopf")
    ap.add_argument(
        "--keep-logs", type=Path, help="copy the operator's and server's logs to this folder"
    )
    a = ap.parse_args()
    if a.in_process:
        print(json.dumps(asyncio.run(run_in_process(a.adapters, a.adds)), indent=2))
    else:
        print(json.dumps(asyncio.run(run(a.adapters, a.adds, a.timeout, a.keep_logs)), indent=2))


if __name__ == "__main__":
    main()
