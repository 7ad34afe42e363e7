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
