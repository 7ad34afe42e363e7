"""Bounds on what one adapter source can make a pod take (issue 8, points 2, 5 and 8).

Matrix:
- tar bombs built at test time: a 4.6 MB tar.gz whose one member inflates to 1 GiB (refused
  at its header: not one byte written), a 310 kB tar.gz of 50,000 empty files (stops at
  maxAdapterFiles, default 1000);
- https: a Content-Length over the cap (refused before the body), a chunked body with no
  length (stopped at the cap), an origin dripping a byte every 0.3 s (per-attempt deadline,
  DownloadTimeout after the retries);
- s3 (moto): too many objects, too many bytes, both refused from the listing;
- concurrency: 12 adapters with maxConcurrentDownloads=3: the origin never serves more than 3;
- the cache budget on a running server: least-recently-used unpinned adapters leave the cache
  to make room and come back on request, pinned ones stay, CacheFull when only pinned ones
  are left, and other adapters keep serving; cache_size() is a running total, not a walk.
"""

from __future__ import annotations

import asyncio
import io
import os
import tarfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from loraplex_server import errors
from loraplex_server.cache import CacheBudget, Quota
from loraplex_server.fetch import Fetcher
from loraplex_server.manifest import AdapterLimits, AdapterManifest, ManifestAdapter
from loraplex_server.metrics import Metrics
from loraplex_server.unpack import extract_tar
from loraplex_server.verify import digest_dir

from .helpers import (
    LOOPBACK_LIMITS,
    FakeVLLM,
    Origin,
    make_settings,
    manifest_doc,
    pvc_adapter,
    run_server,
    serve_app,
    tar_bytes,
    wait_for,
)

GiB = 1 << 30
MiB = 1 << 20


def manifest(**limits: Any) -> AdapterManifest:
    return AdapterManifest(
        generation=1,
        base_served_name="tiny",
        max_loras=2,
        max_lora_rank=8,
        max_cpu_loras=4,
        limits=AdapterLimits.model_validate({**LOOPBACK_LIMITS, **limits}),
    )


def spec(source: str, name: str = "x") -> ManifestAdapter:
    return ManifestAdapter(name=name, served_name=name, source=source)


def fetcher(tmp_path: Path, pvc_root: Path, **kw: Any) -> Fetcher:
    f = Fetcher(make_settings(tmp_path, "http://127.0.0.1:9", {}, pvc_root, **kw), Metrics())
    f.clean_temp()
    return f


def files_under(root: Path) -> list[Path]:
    return [Path(d) / n for d, _, names in os.walk(root) for n in names]


@pytest.fixture
def pvc_root(tiny_adapters: dict[str, Path]) -> Path:
    return tiny_adapters["ad0"].parent.parent


class _Zeros(io.RawIOBase):
    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        k = min(len(b), self.left)
        b[:k] = bytes(k)
        self.left -= k
        return k


@pytest.fixture(scope="module")
def gib_bomb() -> bytes:
    """adapter/adapter_model.safetensors: 1 GiB of zeros, in a ~4.6 MB tar.gz."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tf:
        info = tarfile.TarInfo("adapter/adapter_config.json")
        info.size = 8
        tf.addfile(info, io.BytesIO(b'{"r": 8}'))
        info = tarfile.TarInfo("adapter/adapter_model.safetensors")
        info.size = GiB
        tf.addfile(info, io.BufferedReader(_Zeros(GiB), MiB))
    return buf.getvalue()


@pytest.fixture(scope="module")
def many_files_bomb() -> bytes:
    """50,000 empty members in a ~310 kB tar.gz."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for i in range(50_000):
            tf.addfile(tarfile.TarInfo(f"adapter/f{i}"), io.BytesIO(b""))
    return buf.getvalue()


def test_bombs_are_small_on_disk(gib_bomb: bytes, many_files_bomb: bytes) -> None:
    assert len(gib_bomb) < 8 * MiB and len(many_files_bomb) < 400_000
    with tarfile.open(fileobj=io.BytesIO(gib_bomb)) as tf:
        assert [m.size for m in (tf.next(), tf.next()) if m] == [8, GiB]


async def test_inflating_member_is_refused_at_its_header(tmp_path: Path, gib_bomb: bytes) -> None:
    """Nothing of the 1 GiB member is written: the quota refuses it from the tar header."""
    archive = tmp_path / "bomb.tar.gz"
    archive.write_bytes(gib_bomb)
    budget = CacheBudget(10 * GiB)
    budget.bind()
    quota = Quota(AdapterLimits(max_adapter_bytes=512 * MiB), budget, time.monotonic() + 60)
    with pytest.raises(errors.AdapterError) as exc:
        await asyncio.to_thread(extract_tar, archive, tmp_path / "out", quota)
    assert exc.value.reason == errors.ADAPTER_TOO_LARGE
    assert "spec.adapterLimits.maxAdapterSize" in exc.value.message
    assert quota.bytes == 8  # the config only
    assert [p.name for p in files_under(tmp_path / "out")] == ["adapter_config.json"]


async def test_many_member_archive_stops_at_the_file_cap(
    tmp_path: Path, many_files_bomb: bytes
) -> None:
    archive = tmp_path / "many.tar.gz"
    archive.write_bytes(many_files_bomb)
    budget = CacheBudget(GiB)
    budget.bind()
    quota = Quota(AdapterLimits(), budget, time.monotonic() + 60)
    with pytest.raises(errors.AdapterError) as exc:
        await asyncio.to_thread(extract_tar, archive, tmp_path / "out", quota)
    assert exc.value.reason == errors.ADAPTER_TOO_LARGE
    assert "spec.adapterLimits.maxAdapterFiles" in exc.value.message
    assert quota.files == 1001
    assert len(files_under(tmp_path / "out")) < 1001


@pytest.mark.parametrize(
    ("bomb", "limits", "words"),
    [
        ("gib", {"maxAdapterBytes": 512 * MiB}, "maxAdapterSize"),
        ("many", {}, "maxAdapterFiles"),
    ],
    ids=["1GiB-member", "50000-members"],
)
async def test_bombs_over_https_fail_the_adapter_and_leave_nothing(
    tmp_path: Path,
    pvc_root: Path,
    gib_bomb: bytes,
    many_files_bomb: bytes,
    bomb: str,
    limits: dict[str, Any],
    words: str,
) -> None:
    blob = gib_bomb if bomb == "gib" else many_files_bomb
    f = fetcher(tmp_path, pvc_root)
    async with Origin(routes={"/b.tar.gz": blob}) as origin:
        with pytest.raises(errors.AdapterError) as exc:
            await f.fetch(spec(f"{origin.url}/b.tar.gz"), manifest(**limits))
    assert exc.value.reason == errors.ADAPTER_TOO_LARGE and words in exc.value.message
    assert origin.seen == ["/b.tar.gz"]  # refused for good: no retry
    assert list(f.cache_dir.iterdir()) == [] and f.cache_size() == 0


async def test_announced_length_over_the_cap_is_refused_before_the_body(
    tmp_path: Path, pvc_root: Path
) -> None:
    f = fetcher(tmp_path, pvc_root)
    async with Origin(routes={"/big.tar.gz": ("drip", 600 * MiB)}, drip_every=1.0) as origin:
        t0 = time.monotonic()
        with pytest.raises(errors.AdapterError) as exc:
            await f.fetch(spec(f"{origin.url}/big.tar.gz"), manifest(maxAdapterBytes=MiB))
        assert time.monotonic() - t0 < 2.0
    assert exc.value.reason == errors.ADAPTER_TOO_LARGE
    assert f.metrics.download_bytes.labels("x")._value.get() == 0


async def test_stream_without_length_stops_at_the_cap(tmp_path: Path, pvc_root: Path) -> None:
    f = fetcher(tmp_path, pvc_root)
    async with Origin(routes={"/endless.tar.gz": ("stream", -1)}) as origin:
        with pytest.raises(errors.AdapterError) as exc:
            await f.fetch(spec(f"{origin.url}/endless.tar.gz"), manifest(maxAdapterBytes=MiB))
    assert exc.value.reason == errors.ADAPTER_TOO_LARGE
    written = f.metrics.download_bytes.labels("x")._value.get()
    assert written <= MiB  # every byte written was charged first
    assert origin.sent < 64 * MiB  # and the connection was dropped soon after
    assert list(f.cache_dir.iterdir()) == []


async def test_dripping_origin_hits_the_per_attempt_deadline(
    tmp_path: Path, pvc_root: Path, tiny_adapters: dict[str, Path]
) -> None:
    """One byte every 0.3 s never trips the 1 s read timeout; the deadline ends each attempt."""
    f = fetcher(tmp_path, pvc_root, download_read_timeout=1.0, download_attempts=2)
    attempts: list[int] = []
    async with Origin(routes={"/slow.tar.gz": ("drip", 10_000)}, drip_every=0.3) as origin:
        t0 = time.monotonic()
        with pytest.raises(errors.AdapterError) as exc:
            await f.fetch(
                spec(f"{origin.url}/slow.tar.gz"),
                manifest(downloadTimeoutSeconds=1.5),
                attempts.append,
            )
        took = time.monotonic() - t0
    assert exc.value.reason == errors.DOWNLOAD_TIMEOUT
    assert "spec.adapterLimits.downloadTimeoutSeconds" in exc.value.message
    assert attempts == [1, 2] and 3.0 <= took < 6.0
    assert list(f.cache_dir.iterdir()) == []


async def test_concurrent_downloads_are_capped(
    tmp_path: Path, pvc_root: Path, tiny_adapters: dict[str, Path]
) -> None:
    blob = tar_bytes(tiny_adapters["ad1"])
    names = [f"a{i}" for i in range(12)]
    f = fetcher(tmp_path, pvc_root)
    m = manifest(maxConcurrentDownloads=3)
    async with Origin(routes={f"/{n}.tar.gz": ("slow", blob) for n in names}) as origin:
        await asyncio.gather(*(f.fetch(spec(f"{origin.url}/{n}.tar.gz", n), m) for n in names))
    assert origin.max_active == 3
    assert sorted(p.name for p in f.cache_dir.iterdir()) == sorted(names)


@pytest.fixture(scope="module")
def moto_s3() -> Any:
    from moto.server import ThreadedMotoServer

    from .helpers import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.mark.parametrize(
    ("limits", "words"),
    [({"maxAdapterFiles": 3}, "maxAdapterFiles"), ({"maxAdapterBytes": 1000}, "maxAdapterSize")],
    ids=["files", "bytes"],
)
async def test_s3_prefix_is_refused_from_its_listing(
    tmp_path: Path,
    pvc_root: Path,
    tiny_adapters: dict[str, Path],
    moto_s3: Any,
    limits: dict[str, Any],
    words: str,
) -> None:
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="limits")
    for i in range(5):
        s3.put_object(Bucket="limits", Key=f"p/extra{i}.json", Body=b"x" * 400)
    f = fetcher(tmp_path, pvc_root)
    with pytest.raises(errors.AdapterError) as exc:
        await f.fetch(spec("s3://limits/p"), manifest(**limits))
    assert exc.value.reason == errors.ADAPTER_TOO_LARGE and words in exc.value.message
    assert f.metrics.download_bytes.labels("x")._value.get() == 0  # no object was read


async def test_cache_size_is_a_running_total(
    tmp_path: Path, pvc_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = fetcher(tmp_path, pvc_root)
    _, a = await f.fetch(spec("pvc://adapters/ad1", "a"), manifest())
    _, b = await f.fetch(spec("pvc://adapters/ad2", "b"), manifest())
    on_disk = sum(p.stat().st_size for p in files_under(f.cache_dir))

    def no_walk(*args: Any) -> Any:
        raise AssertionError("cache_size() walked the cache")

    monkeypatch.setattr(os, "walk", no_walk)
    # The marker files are ours and small; the total counts the adapters' own bytes.
    assert a.size_bytes + b.size_bytes == f.cache_size() <= on_disk
    monkeypatch.undo()
    assert await f.remove("a") == a.size_bytes
    assert f.cache_size() == b.size_bytes
    restarted = fetcher(tmp_path, pvc_root)  # a restart counts what the volume holds, once
    assert restarted.cache_size() == sum(p.stat().st_size for p in files_under(f.cache_dir))


async def completion(url: str, model: str) -> int:
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{url}/v1/completions", json={"model": model, "prompt": "hi"}) as r,
    ):
        return r.status


async def adapters(url: str) -> dict[str, dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/v1/adapters") as r:
        return {a["name"]: a for a in (await r.json())["adapters"]}


async def test_cache_budget_evicts_lru_unpinned_and_refetches(
    tmp_path: Path, pvc_root: Path, tiny_adapters: dict[str, Path]
) -> None:
    """A budget for 3.5 adapters and 4 declared: pinned ad0 and the loaded adapter stay; the
    least recently used of the others leaves the cache, and is fetched again on request."""
    size = digest_dir(tiny_adapters["ad1"])[1]
    fake = FakeVLLM()
    ads = [pvc_adapter("ad0", pinned=True)] + [pvc_adapter(f"ad{i}") for i in (1, 2, 3)]
    limits = {**LOOPBACK_LIMITS, "cacheBytes": int(size * 3.5), "maxConcurrentDownloads": 1}
    # maxCpuLoras 2: the pinned ad0 plus one; loading another unloads the last one used.
    doc = manifest_doc(ads, max_loras=1, max_cpu_loras=2, limits=limits)
    async with serve_app(fake.app()) as vurl:
        s = make_settings(tmp_path, vurl, doc, pvc_root)
        async with run_server(s) as srv:
            reg = srv.server.registry
            await wait_for(lambda: reg.entries["ad0"].state.value == "loaded")
            await wait_for(
                lambda: all(e.fetch_task and e.fetch_task.done() for e in reg.entries.values())
            )
            assert len(list(s.cache_dir.iterdir())) == 3  # one of ad1..ad3 made room
            for name in ("ad1", "ad2", "ad3"):
                assert await completion(srv.url, name) == 200
                assert srv.server.fetcher.cache_size() <= size * 3.5
            states = {n: e["state"] for n, e in (await adapters(srv.url)).items()}
            # ad3 loaded, ad2 unloaded from vLLM but cached, ad1 (used longest ago) out.
            assert states == {"ad0": "loaded", "ad1": "uncached", "ad2": "evicted", "ad3": "loaded"}
            assert sorted(p.name for p in s.cache_dir.iterdir()) == ["ad0", "ad2", "ad3"]
            assert await completion(srv.url, "ad1") == 200  # fetched again on request
            assert sorted(p.name for p in s.cache_dir.iterdir()) == ["ad0", "ad1", "ad3"]


async def test_cache_full_of_pinned_adapters_fails_only_the_newcomer(
    tmp_path: Path, pvc_root: Path, tiny_adapters: dict[str, Path]
) -> None:
    size = digest_dir(tiny_adapters["ad1"])[1]
    fake = FakeVLLM()
    ads = [pvc_adapter(f"ad{i}", pinned=True) for i in range(3)]
    limits = {**LOOPBACK_LIMITS, "cacheBytes": int(size * 2.5), "maxConcurrentDownloads": 1}
    doc = manifest_doc(ads, max_loras=3, limits=limits)
    async with serve_app(fake.app()) as vurl:
        s = make_settings(tmp_path, vurl, doc, pvc_root)
        async with run_server(s) as srv:
            reg = srv.server.registry
            await wait_for(
                lambda: all(e.state.value in ("loaded", "failed") for e in reg.entries.values())
            )
            rep = await adapters(srv.url)
            failed = [n for n, e in rep.items() if e["state"] == "failed"]
            assert len(failed) == 1
            assert rep[failed[0]]["reason"] == "CacheFull"
            assert "spec.adapterLimits.cacheSize" in rep[failed[0]]["message"]
            served = [n for n in rep if n not in failed]
            for n in served:
                assert await completion(srv.url, n) == 200


async def test_eviction_asked_from_every_worker_thread_completes(
    tmp_path: Path, pvc_root: Path
) -> None:
    """Tar, s3 and pvc copies charge the budget from worker threads; when every thread of the
    default pool waits for eviction at once, eviction must still run (no deadlock)."""
    f = fetcher(tmp_path, pvc_root)
    threads = min(32, (os.cpu_count() or 1) + 4) + 1  # one more than the default pool
    infos = [
        (await f.fetch(spec("pvc://adapters/ad1", f"a{i}"), manifest()))[1] for i in range(threads)
    ]
    size = infos[0].size_bytes
    f.budget.limit = f.budget.used

    async def evict(need: int) -> int:
        freed = 0
        for name in sorted(f.installed()):
            if freed >= need:
                break
            freed += await f.remove(name)
        return freed

    f.budget.evictor = evict
    takes = [asyncio.to_thread(f.budget.take_sync, size) for _ in range(threads)]
    await asyncio.wait_for(asyncio.gather(*takes), 20)
    assert f.installed() == {} and f.budget.used == threads * size
