"""The operator as a real process over time: rotating credentials, expiring watches, and two
replicas of which only one may write.

Credentials (issue 10.1): an auth gate in front of the API stand-in admits only the current
token; tokens rotate every few seconds, in-cluster style (the token file rewritten) and EKS/GKE
style (a kubeconfig `exec:` plugin printing an ExecCredential with a short expiry). After two
rotations and a forced watch expiry (410 Gone, so kopf must relist and re-login), a newly
applied LoRAAdapter still reaches the manifest and gets a status.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from loraplex import naming
from loraplex.devtools.emulator import RunningEmulator, write_kubeconfig
from loraplex.devtools.operator_proc import OperatorProcess
from loraplex.kube import LORAADAPTERS, Connection, KubeClient
from loraplex_server import manifest_shards
from tests.operator.conftest import eventually
from tests.operator.test_api_semantics import bm, exec_user, write_exec_plugin


@pytest.fixture
def kube_backend() -> str:
    """Always the emulator: token rotation needs the emulator's auth gate (a real server's
    tokens live at least 10 minutes) and the takeover test reads the emulator's request log."""
    return "emulator"


pytestmark = [pytest.mark.operator, pytest.mark.timeout(180)]
NS = "default"
ADMIN = "test-admin-token"  # the test's own client; the operator only ever gets rotating ones
ROTATE_EVERY = 3.0


def adapter(name: str, base: str) -> dict[str, Any]:
    return {
        "apiVersion": "loraplex.io/v1alpha1",
        "kind": "LoRAAdapter",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"baseModel": base, "source": f"hf://org/{name}", "rank": 8},
    }


def manifest_names(cluster: RunningEmulator, base: str) -> list[str]:
    cms = {cm["metadata"]["name"]: cm for cm in cluster.emulator.objects_of("v1/configmaps", NS)}
    index = cms.get(naming.configmap_name(base))
    if index is None:
        return []
    try:
        manifest = manifest_shards.from_configmaps(index, cms)
    except manifest_shards.TornManifest:
        return []  # caught between the shard and index writes: look again
    return sorted(a.name for a in manifest.adapters)


async def stop(*procs: OperatorProcess) -> None:
    for p in procs:
        await asyncio.to_thread(p.stop)


@pytest.mark.parametrize("style", ["token-file", "exec-plugin"])
async def test_operator_converges_across_token_rotations(
    cluster: RunningEmulator, tmp_path: Path, style: str
) -> None:
    emu = cluster.emulator
    secret = tmp_path / ("token" if style == "token-file" else "exec-token")
    secret.write_text("rot-1")
    if style == "token-file":
        user: dict[str, Any] = {"tokenFile": str(secret)}
    else:
        script, secret, runs = write_exec_plugin(tmp_path, lifetime=ROTATE_EVERY + 1)
        secret.write_text("rot-1")
        user = exec_user(script)
    emu.require_tokens(ADMIN, "rot-1")
    kubeconfig = write_kubeconfig(tmp_path / "op-kubeconfig", cluster.url, user)
    kube = KubeClient(Connection(server=cluster.url, token=ADMIN), user_agent="loraplex-tests")
    op = OperatorProcess(kubeconfig, tmp_path).start()
    try:
        await kube.apply(bm("rot"))
        await kube.apply(adapter("first", "rot"))
        await eventually(lambda: manifest_names(cluster, "rot") == ["first"], what="first")
        for n in (2, 3):  # two rotations; the previous token is refused at once
            await asyncio.sleep(ROTATE_EVERY)
            emu.require_tokens(ADMIN, f"rot-{n}")
            secret.write_text(f"rot-{n}")
        # Open watches end with 410 Gone: kopf must relist, with the new token.
        mark = len(emu.log)
        await emu.expire_watches("loraplex.io/v1alpha1/loraadapters")
        await asyncio.sleep(1.0)
        await kube.apply(adapter("second", "rot"))
        await eventually(
            lambda: manifest_names(cluster, "rot") == ["first", "second"],
            timeout=60,
            what="the adapter applied after two rotations in the manifest",
        )

        async def has_status() -> bool:
            obj = await kube.get(LORAADAPTERS, NS, "second")
            return bool(((obj or {}).get("status") or {}).get("phase"))

        await eventually(has_status, timeout=30, what="a status on the new adapter")
        # Both kopf (watches, its own patches) and loraplex's client moved to the last token
        # (after 401s, or before them where the exec credential's expiry said so).
        assert {("kopf", "rot-3"), ("loraplex-operator", "rot-3")} <= emu.authenticated
        assert "loraadapters" in emu.expired_watches
        relists = [
            r
            for r in emu.log[mark:]
            if r.plural == "loraadapters" and r.verb == "list" and r.status == 200
        ]
        assert relists, "kopf did not relist LoRAAdapters after 410 Gone"
        assert "Re-authentication has finished" in op.log()
        if style == "exec-plugin":
            # Once at start; then again for a token the server accepts (rotations that happen
            # while the operator is idle need no run of their own).
            assert runs.read_text().count("run") >= 2
    finally:
        await kube.close()
        await stop(op)
    assert "Traceback" not in op.log() or "TemporaryError" in op.log(), op.log()[-3000:]


def is_active(op: OperatorProcess) -> bool:
    """Whether kopf's peering last let this replica work (its log's latest verdict)."""
    log = op.log()
    return log.rfind("Resuming operations after the pause") > log.rfind(
        "Pausing operations in favour of"
    )


def writers(cluster: RunningEmulator, since: int = 0, until: int | None = None) -> set[str]:
    """User-Agents (one per operator pid) that wrote through loraplex's client."""
    return {
        r.user_agent
        for r in cluster.emulator.log[since:until]
        if r.user_agent.startswith("loraplex-operator/") and r.method in ("POST", "PATCH")
    }


async def test_two_replicas_one_writes_and_the_other_takes_over(
    cluster: RunningEmulator, tmp_path: Path
) -> None:
    lifetime = 6
    cluster.emulator.preload(
        "kopf.dev/v1/clusterkopfpeerings",
        {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "lp"}},
    )
    args = ["--peering", "lp", "--peering-lifetime", str(lifetime)]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ops = [
        OperatorProcess(cluster.kubeconfig, tmp_path / d, extra_args=args).start()
        for d in ("a", "b")
    ]
    kube = KubeClient(Connection(server=cluster.url), user_agent="loraplex-tests")
    try:
        # Both start paused until peering has been seen; the higher priority resumes (and a
        # lower one that resumed first pauses in its favour).
        await eventually(
            lambda: len([o for o in ops if is_active(o)]) == 1, what="one replica active"
        )
        await asyncio.sleep(3)
        working = [o for o in ops if is_active(o)]
        assert len(working) == 1
        active = working[0]
        standby = next(o for o in ops if o is not active)
        await kube.apply(bm("ha"))
        await kube.apply(adapter("one", "ha"))
        await eventually(lambda: manifest_names(cluster, "ha") == ["one"], what="one")
        await asyncio.sleep(2 * lifetime / 3)  # a few keepalives and timer ticks
        assert active.proc is not None and standby.proc is not None
        assert writers(cluster) == {f"loraplex-operator/{active.proc.pid}"}
        # The active replica dies without a word (no peering goodbye).
        mark = len(cluster.emulator.log)
        os.kill(active.proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        await kube.apply(adapter("two", "ha"))
        await eventually(
            lambda: manifest_names(cluster, "ha") == ["one", "two"],
            timeout=lifetime + 30,
            what="the standby to take over and add the new adapter",
        )
        takeover = time.monotonic() - killed
        assert takeover < lifetime + 20, takeover
        assert is_active(standby)
        assert writers(cluster, mark) == {f"loraplex-operator/{standby.proc.pid}"}

        async def both_ready() -> bool:
            objs = [await kube.get(LORAADAPTERS, NS, n) for n in ("one", "two")]
            return all(((o or {}).get("status") or {}).get("phase") for o in objs)

        await eventually(both_ready, what="statuses on both adapters (no lost write)")
        # One Deployment, one Service: nothing was created twice.
        deps = [
            d
            for d in cluster.emulator.objects_of("apps/v1/deployments", NS)
            if d["metadata"]["name"] == "ha"
        ]
        assert len(deps) == 1
        print(f"takeover after SIGKILL of the active replica: {takeover:.1f}s")
    finally:
        await kube.close()
        await stop(*ops)
