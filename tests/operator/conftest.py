"""Fixtures for the operator tier: the kmock API stand-in and a real operator process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from loraplex.devtools.emulator import RunningEmulator, running_emulator
from loraplex.devtools.operator_proc import OperatorProcess
from loraplex.kube import Connection, KubeClient

T = TypeVar("T")


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[RunningEmulator]:
    async with running_emulator(tmp_path) as emu:
        yield emu


@pytest.fixture
async def kube(cluster: RunningEmulator) -> AsyncIterator[KubeClient]:
    client = KubeClient(Connection(server=cluster.url), user_agent="loraplex-tests")
    yield client
    await client.close()


@pytest.fixture
async def operator(cluster: RunningEmulator, tmp_path: Path) -> AsyncIterator[OperatorProcess]:
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
    """What the Job controller writes when the loader's pod exits 0 (nothing runs Jobs here)."""
    from loraplex.kube import JOBS

    await kube.patch(
        JOBS,
        namespace,
        job,
        {
            "status": {
                "active": 0,
                "succeeded": 1,
                "startTime": "2026-01-01T00:00:00Z",
                "completionTime": "2026-01-01T00:10:00Z",
                "conditions": [{"type": "Complete", "status": "True"}],
            }
        },
        sub="status",
    )
