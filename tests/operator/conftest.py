"""Fixtures for the operator tier: a Kubernetes API (real or emulated) and a real operator.

`cluster` is a real kube-apiserver (tests/support/apiserver.py, one per session, namespace
`default` emptied after each test) when `make kube-bins` has built it, else the kmock
emulator; `--kube=real|emulator` chooses. Both look the same to a test: `objects_of` reads
what the API holds, `operator_calls` is every request the operator made (the real server's
audit log, or the emulator's request log), `kubeconfig` is the operator's, and `enforces`
says whether the API refuses what the CRD schema, CEL and RBAC refuse (only the real one).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest

from loraplex.devtools.emulator import RunningEmulator, running_emulator
from loraplex.devtools.operator_proc import OperatorProcess
from loraplex.errors import KubeError
from loraplex.kube import KIND_OF, Connection, KubeClient
from tests.support.apiserver import ApiCall, ControlPlane

T = TypeVar("T")
TEST_AGENT = "loraplex-tests"
RESOURCE_OF = {
    kind: "/".join(p for p in (k.group, k.version, k.plural) if p) for kind, k in KIND_OF.items()
}


class Cluster(Protocol):
    kubeconfig: Path
    enforces: bool

    def objects_of(self, resource: str, namespace: str | None = None) -> list[dict[str, Any]]: ...

    def operator_calls(self) -> list[ApiCall]: ...

    def connection(self) -> Connection: ...

    async def create_strict(self, obj: dict[str, Any]) -> tuple[int, str]: ...


@dataclass
class EmulatedCluster:
    """The kmock emulator: no schema, CEL, RBAC or garbage collection."""

    running: RunningEmulator
    enforces: bool = False

    def __getattr__(self, name: str) -> Any:
        """Tests of what only the emulator models (an auth gate, forced 410s, Retry-After,
        its request log) reach the RunningEmulator's own attributes through this."""
        return getattr(self.running, name)

    @property
    def kubeconfig(self) -> Path:
        return self.running.kubeconfig

    def objects_of(self, resource: str, namespace: str | None = None) -> list[dict[str, Any]]:
        return self.running.emulator.objects_of(resource, namespace)

    def operator_calls(self) -> list[ApiCall]:
        return [
            ApiCall(
                group=r.group,
                resource=r.plural + (f"/{r.subresource}" if r.subresource else ""),
                verb=r.verb,
                code=0,
                uri="",
            )
            for r in self.running.requests(exclude_agent=TEST_AGENT)
        ]

    def connection(self) -> Connection:
        return Connection(server=self.running.url)

    async def create_strict(self, obj: dict[str, Any]) -> tuple[int, str]:
        """Create; the emulator accepts anything that is JSON."""
        client = KubeClient(self.connection(), user_agent=TEST_AGENT)
        try:
            await client.create(KIND_OF[obj["kind"]], obj["metadata"]["namespace"], obj)
        except KubeError as exc:
            return exc.status, str(exc)
        finally:
            await client.close()
        return 201, ""


@dataclass
class RealCluster:
    """A real kube-apiserver; the operator authenticates as the chart's service account."""

    plane: ControlPlane
    kubeconfig: Path
    audit_from: int
    enforces: bool = True

    def objects_of(self, resource: str, namespace: str | None = None) -> list[dict[str, Any]]:
        return self.plane.objects_of(resource, namespace)

    def operator_calls(self) -> list[ApiCall]:
        return self.plane.operator_calls(self.audit_from)

    def connection(self) -> Connection:
        return self.plane.admin_connection()

    async def create_strict(self, obj: dict[str, Any]) -> tuple[int, str]:
        """Create as `kubectl create` does: schema, CEL and unknown fields checked."""
        resource = RESOURCE_OF[obj["kind"]]
        return await asyncio.to_thread(self.plane.create_strict, resource, obj)


@pytest.fixture
async def cluster(
    request: pytest.FixtureRequest, kube_backend: str, tmp_path: Path
) -> AsyncIterator[Cluster]:
    if kube_backend == "emulator":
        async with running_emulator(tmp_path) as emu:
            yield EmulatedCluster(emu)
        return
    plane: ControlPlane = request.getfixturevalue("control_plane")
    kubeconfig = plane.operator_kubeconfig(tmp_path / "operator.kubeconfig")
    yield RealCluster(plane, kubeconfig, plane.audit_offset())
    await asyncio.to_thread(plane.reset_namespace, "default")


@pytest.fixture
async def kube(cluster: Cluster) -> AsyncIterator[KubeClient]:
    """The test's own client (the admin on a real server)."""
    client = KubeClient(cluster.connection(), user_agent=TEST_AGENT)
    yield client
    await client.close()


@pytest.fixture
async def operator(cluster: Cluster, tmp_path: Path) -> AsyncIterator[OperatorProcess]:
    proc = OperatorProcess(cluster.kubeconfig, tmp_path).start()
    yield proc
    # Stop in a thread so the emulator (on this loop) keeps answering while kopf shuts down.
    code = await asyncio.to_thread(proc.stop)
    log = proc.log()
    assert "Traceback" not in log or "TemporaryError" in log, log[-4000:]
    assert code in (0, -15, None), f"operator exited with {code}:\n{log[-4000:]}"


async def eventually(
    probe: Callable[[], Awaitable[T | None]] | Callable[[], T | None],
    *,
    timeout: float = 30.0,
    what: str = "condition",
) -> T:
    """Poll `probe` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        result = probe()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        last = result
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def cached_basemodel(name: str = "cached", replicas: int = 2) -> dict[str, Any]:
    """A BaseModel whose hf:// weights go through the weights cache (PVC + loader Job)."""
    return {
        "apiVersion": "loraplex.io/v1alpha1",
        "kind": "BaseModel",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "model": {"source": "hf://Qwen/Qwen2.5-7B-Instruct", "revision": "main"},
            "gpu": {"count": 1, "product": "L40S"},
            "replicas": replicas,
            "credentials": {"secretRef": {"name": "hf-token"}},
            "weightsCache": {"storageClassName": "fast"},
        },
    }


async def finish_loader_job(kube: KubeClient, namespace: str, job: str) -> None:
    """What the Job controller writes when the loader's pod exits 0 (no node runs the pod
    here). Against a real API server its Job controller has already set startTime, which may
    not change afterwards: the completion keeps it (the emulator has none, so one is set)."""
    from datetime import UTC, datetime

    from loraplex.kube import JOBS

    current = await kube.get(JOBS, namespace, job)
    started = ((current or {}).get("status") or {}).get("startTime") or "2026-01-01T00:00:00Z"
    done = max(started, datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    await kube.patch(
        JOBS,
        namespace,
        job,
        {
            "status": {
                "active": 0,
                "succeeded": 1,
                "startTime": started,
                "completionTime": done,
                # A real API server refuses Complete without SuccessCriteriaMet (1.33+).
                "conditions": [
                    {"type": "SuccessCriteriaMet", "status": "True", "lastTransitionTime": done},
                    {"type": "Complete", "status": "True", "lastTransitionTime": done},
                ],
            }
        },
        sub="status",
    )
