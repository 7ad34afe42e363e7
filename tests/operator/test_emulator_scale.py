"""The emulator stays linear at 10,000 objects: what its speed-ups must not change.

kmock found an object by scanning every stored object and routed a request by scanning every
request not yet routed; the `Emulator` looks objects up by key and serves non-watch requests
one at a time, forgetting each once answered. These tests pin the behaviour that must survive
that: the right object among look-alikes, 404s, refusals, many concurrent requests, and a
watch that keeps streaming while they are served.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from loraplex.kube import CONFIGMAPS, LORAADAPTERS, KubeClient, KubeError
from tests.operator.conftest import Cluster

NS = "default"


@pytest.fixture
def kube_backend() -> str:
    """The emulator's own machinery is under test."""
    return "emulator"


def adapter(name: str, ns: str = NS) -> dict[str, Any]:
    return {
        "apiVersion": "loraplex.io/v1alpha1",
        "kind": "LoRAAdapter",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"baseModel": "b", "source": f"hf://org/{name}"},
    }


async def test_objects_are_found_by_key_among_look_alikes(
    cluster: Cluster, kube: KubeClient
) -> None:
    emu = cluster.emulator
    for i in range(2000):
        emu.preload("loraplex.io/v1alpha1/loraadapters", adapter(f"a-{i}"))
    emu.preload("loraplex.io/v1alpha1/loraadapters", adapter("a-7", ns="other"))
    emu.preload(
        "v1/configmaps", {"metadata": {"name": "a-7", "namespace": NS}, "data": {"k": "cm"}}
    )
    got = await kube.get(LORAADAPTERS, NS, "a-7")
    assert got is not None and got["metadata"]["namespace"] == NS
    assert got["spec"]["source"] == "hf://org/a-7"
    other = await kube.get(LORAADAPTERS, "other", "a-7")
    assert other is not None and other["metadata"]["namespace"] == "other"
    cm = await kube.get(CONFIGMAPS, NS, "a-7")
    assert cm is not None and cm["data"] == {"k": "cm"}
    assert await kube.get(LORAADAPTERS, NS, "a-2000") is None
    patched = await kube.patch(LORAADAPTERS, NS, "a-1999", {"spec": {"rank": 16}})
    assert patched["spec"]["rank"] == 16
    assert (await kube.get(LORAADAPTERS, NS, "a-1998") or {})["spec"].get("rank") is None


async def test_answered_requests_are_forgotten_refused_ones_too(
    cluster: Cluster, kube: KubeClient
) -> None:
    """kmock's list of requests holds only what is still open (watches): a request the
    emulator refused itself (409 on a stale resourceVersion) never reaches kmock's routing,
    and used to stay in that list for good, making every later request slower."""
    emu = cluster.emulator
    created = await kube.create(LORAADAPTERS, NS, adapter("x"))
    stale = {"metadata": {"resourceVersion": "1" + created["metadata"]["resourceVersion"]}}
    with pytest.raises(KubeError) as info:
        await kube.patch(LORAADAPTERS, NS, "x", stale)
    assert info.value.status == 409
    assert await kube.get(LORAADAPTERS, NS, "missing") is None
    await kube.get(LORAADAPTERS, NS, "x")
    assert emu._requests == []


async def test_concurrent_requests_are_all_served_while_a_watch_streams(
    cluster: Cluster, kube: KubeClient
) -> None:
    url = f"{cluster.url}/apis/loraplex.io/v1alpha1/namespaces/{NS}/loraadapters?watch=true"
    seen: list[str] = []
    async with aiohttp.ClientSession() as http, http.get(url) as watch:

        async def follow() -> None:
            async for line in watch.content:
                if line.strip():
                    seen.append(line.decode())

        follower = asyncio.create_task(follow())
        await asyncio.gather(
            *(kube.create(LORAADAPTERS, NS, adapter(f"c-{i}")) for i in range(300))
        )
        results = await asyncio.gather(*(kube.get(LORAADAPTERS, NS, f"c-{i}") for i in range(300)))
        assert all(r is not None for r in results)
        for _ in range(100):
            if len(seen) >= 300:
                break
            await asyncio.sleep(0.05)
        follower.cancel()
    assert len(seen) >= 300, "the watch streamed every ADDED while the writes were served"
