"""Getting adapters onto disk, against loopback sources that misbehave on purpose.

Matrix: pvc copied into the cache / symlink escape / undeclared claim / symlinked file;
cache names with traversal; https tar.gz with right, wrong and no sha256; plain folder URL;
hostile archives (`..`, symlink); source 404 (no retry), 500 (retries, then failed), flaky
(retry succeeds), hanging, truncated, cancelled mid-download (nothing installed, no temp
left); cache reuse; s3 via moto; hf:// allow_patterns.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from loraplex_server import errors
from loraplex_server.fetch import TMP_PREFIX, Fetcher, cache_path, resolve_pvc
from loraplex_server.manifest import AdapterLimits, AdapterManifest, ManifestAdapter
from loraplex_server.metrics import Metrics
from loraplex_server.source_uri import parse_source_uri
from loraplex_server.verify import digest_dir

from .helpers import LOOPBACK_LIMITS, FileServer, make_settings, tar_bytes, wait_for

MANIFEST = AdapterManifest(
    generation=1,
    base_served_name="tiny",
    max_loras=2,
    max_lora_rank=8,
    max_cpu_loras=4,
    limits=AdapterLimits.model_validate(LOOPBACK_LIMITS),
)


def fetcher(tmp_path: Path, pvc_root: Path) -> Fetcher:
    settings = make_settings(tmp_path, "http://127.0.0.1:9", {}, pvc_root)
    f = Fetcher(settings, Metrics())
    f.clean_temp()
    return f


def spec(source: str, sha256: str | None = None, name: str = "x") -> ManifestAdapter:
    return ManifestAdapter(name=name, served_name=name, source=source, sha256=sha256)


def cache_entries(f: Fetcher) -> list[str]:
    return sorted(p.name for p in f.cache_dir.iterdir())


@pytest.fixture
def pvc_root(tiny_adapters: dict[str, Path]) -> Path:
    return tiny_adapters["ad0"].parent.parent


async def test_pvc_is_copied_then_verified(tmp_path: Path, pvc_root: Path) -> None:
    """vLLM loads a verified copy: what happens in the claim afterwards cannot reach it."""
    f = fetcher(tmp_path, pvc_root)
    path, info = await f.fetch(spec("pvc://adapters/ad0"), MANIFEST)
    assert path == f.cache_dir.resolve() / "x"
    assert info.rank == 8 and info.digest == digest_dir(pvc_root / "adapters" / "ad0")[0]
    assert cache_entries(f) == ["x"]
    assert f.cache_size() == info.size_bytes


def test_pvc_symlink_escape_and_undeclared_claim(tmp_path: Path, pvc_root: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    link = pvc_root / "adapters" / "escape"
    if not link.exists():
        os.symlink(outside, link)
    with pytest.raises(errors.AdapterError) as exc:
        resolve_pvc(pvc_root, parse_source_uri("pvc://adapters/escape"))
    assert exc.value.reason == errors.INVALID_SOURCE
    with pytest.raises(errors.AdapterError) as exc:
        resolve_pvc(pvc_root, parse_source_uri("pvc://other-claim/ad0"))
    assert exc.value.reason == errors.INVALID_SOURCE


async def test_pvc_symlinked_file_is_refused_and_claim_changes_do_not_reach_the_copy(
    tmp_path: Path, tiny_adapters: dict[str, Path]
) -> None:
    claim = tmp_path / "pvc" / "adapters"
    shutil.copytree(tiny_adapters["ad0"], claim / "a")
    outside = tmp_path / "node-secret"
    outside.write_text("s")
    f = fetcher(tmp_path, tmp_path / "pvc")
    path, info = await f.fetch(spec("pvc://adapters/a"), MANIFEST)
    # After the check, the claim changes: the copy vLLM loads does not.
    weights = claim / "a" / "adapter_model.safetensors"
    weights.unlink()
    weights.symlink_to(outside)
    assert digest_dir(path)[0] == info.digest
    assert not (path / "adapter_model.safetensors").is_symlink()
    with pytest.raises(errors.AdapterError, match="symlink") as exc:
        await f.fetch(spec("pvc://adapters/a", name="y"), MANIFEST)
    assert exc.value.reason == errors.UNSUPPORTED_ADAPTER
    assert cache_entries(f) == ["x"]


@pytest.mark.parametrize("name", ["../x", "/abs", "%2e%2e", "a/b", "..", "", "A"])
def test_cache_path_refuses_traversal(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError):
        cache_path(tmp_path, name)


@pytest.mark.parametrize("with_sha", [True, False], ids=["sha256", "no-sha256"])
async def test_https_archive_is_verified_and_installed(
    tmp_path: Path, pvc_root: Path, tiny_adapters: dict[str, Path], with_sha: bool
) -> None:
    blob = tar_bytes(tiny_adapters["ad1"])
    f = fetcher(tmp_path, pvc_root)
    async with FileServer(files={"/a/ad1.tar.gz": blob}) as srv:
        sha = hashlib.sha256(blob).hexdigest() if with_sha else None
        path, info = await f.fetch(spec(f"{srv.url}/a/ad1.tar.gz", sha), MANIFEST)
    assert path == f.cache_dir.resolve() / "x"
    assert info.digest == digest_dir(tiny_adapters["ad1"])[0]
    assert cache_entries(f) == ["x"]
    m = f.metrics.download_bytes.labels("x")._value.get()
    assert m == len(blob)


async def test_wrong_sha256_fails_and_installs_nothing(
    tmp_path: Path, pvc_root: Path, tiny_adapters: dict[str, Path]
) -> None:
    f = fetcher(tmp_path, pvc_root)
    async with FileServer(files={"/ad.tar.gz": tar_bytes(tiny_adapters["ad1"])}) as srv:
        with pytest.raises(errors.AdapterError) as exc:
            await f.fetch(spec(f"{srv.url}/ad.tar.gz", "0" * 64), MANIFEST)
        assert srv.hits["/ad.tar.gz"] == 1  # permanent: no retry
    assert exc.value.reason == errors.CHECKSUM_MISMATCH
    assert cache_entries(f) == []


async def test_folder_url_fetches_config_and_weights(
    tmp_path: Path, pvc_root: Path, tiny_adapters: dict[str, Path]
) -> None:
    src = tiny_adapters["ad2"]
    files = {f"/d/{p.name}": p.read_bytes() for p in src.iterdir() if p.is_file()}
    f = fetcher(tmp_path, pvc_root)
    async with FileServer(files=files) as srv:
        path, info = await f.fetch(spec(f"{srv.url}/d"), MANIFEST)
    assert (path / "adapter_model.safetensors").read_bytes() == (
        src / "adapter_model.safetensors"
    ).read_bytes()
    assert info.rank == 8


@pytest.mark.parametrize(
    ("extra", "symlink"),
    [({"../evil.txt": b"x"}, None), ({"/abs.txt": b"x"}, None), ({}, "/etc/passwd")],
    ids=["dotdot", "absolute", "symlink"],
)
async def test_hostile_archive_is_refused(
    tmp_path: Path,
    pvc_root: Path,
    tiny_adapters: dict[str, Path],
    extra: dict[str, bytes],
    symlink: str | None,
) -> None:
    f = fetcher(tmp_path, pvc_root)
    blob = tar_bytes(tiny_adapters["ad1"], extra=extra, symlink=symlink)
    async with FileServer(files={"/h.tar.gz": blob}) as srv:
        with pytest.raises(errors.AdapterError) as exc:
            await f.fetch(spec(f"{srv.url}/h.tar.gz"), MANIFEST)
    assert exc.value.reason == errors.UNSUPPORTED_ADAPTER
    assert cache_entries(f) == []
    assert not (tmp_path / "evil.txt").exists() and not (f.cache_dir / "evil.txt").exists()


@pytest.mark.parametrize(
    ("mode", "hits", "ok"),
    [
        ("404", 1, False),
        ("500", 3, False),
        ("hang", 3, False),
        ("truncate", 3, False),
        ("flaky", 2, True),
    ],
)
async def test_source_faults(
    tmp_path: Path,
    pvc_root: Path,
    tiny_adapters: dict[str, Path],
    mode: str,
    hits: int,
    ok: bool,
) -> None:
    f = fetcher(tmp_path, pvc_root)
    attempts: list[int] = []
    async with FileServer(
        files={"/f.tar.gz": tar_bytes(tiny_adapters["ad1"])}, modes={"/f.tar.gz": mode}
    ) as srv:
        job = f.fetch(spec(f"{srv.url}/f.tar.gz"), MANIFEST, attempts.append)
        if ok:
            await job
        else:
            with pytest.raises(errors.AdapterError) as exc:
                await job
            assert exc.value.reason == errors.DOWNLOAD_FAILED
        assert srv.hits["/f.tar.gz"] == hits
    assert attempts == list(range(1, hits + 1))
    # Half-downloaded files never reach the cache name vLLM is pointed at.
    assert cache_entries(f) == (["x"] if ok else [])


async def test_cancel_mid_download_leaves_nothing(
    tmp_path: Path, pvc_root: Path, tiny_adapters: dict[str, Path]
) -> None:
    f = fetcher(tmp_path, pvc_root)
    async with FileServer(
        files={"/c.tar.gz": tar_bytes(tiny_adapters["ad1"])}, modes={"/c.tar.gz": "hang"}
    ) as srv:
        task = asyncio.create_task(f.fetch(spec(f"{srv.url}/c.tar.gz"), MANIFEST))
        await wait_for(lambda: bool(srv.hits))
        await asyncio.sleep(0.1)
        assert any(p.name.startswith(TMP_PREFIX) for p in f.cache_dir.iterdir())
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert cache_entries(f) == []


def test_leftover_temp_dirs_are_cleaned(tmp_path: Path, pvc_root: Path) -> None:
    f = fetcher(tmp_path, pvc_root)
    (f.cache_dir / f"{TMP_PREFIX}x-dead").mkdir()
    (f.cache_dir / f"{TMP_PREFIX}x-dead" / "adapter_config.json").write_text("{}")
    f.clean_temp()
    assert cache_entries(f) == []


async def test_installed_adapter_is_reused(
    tmp_path: Path, pvc_root: Path, tiny_adapters: dict[str, Path]
) -> None:
    f = fetcher(tmp_path, pvc_root)
    async with FileServer(files={"/r.tar.gz": tar_bytes(tiny_adapters["ad1"])}) as srv:
        await f.fetch(spec(f"{srv.url}/r.tar.gz"), MANIFEST)
        await f.fetch(spec(f"{srv.url}/r.tar.gz"), MANIFEST)
        assert srv.hits["/r.tar.gz"] == 1
        await f.remove("x")
    assert cache_entries(f) == []


@pytest.fixture(scope="module")
def moto_s3() -> object:
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


async def test_s3_prefix(
    tmp_path: Path, pvc_root: Path, tiny_adapters: dict[str, Path], moto_s3: object
) -> None:
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="adapters")
    src = tiny_adapters["ad3"]
    for p in src.iterdir():
        s3.put_object(Bucket="adapters", Key=f"team/ad3/{p.name}", Body=p.read_bytes())
    f = fetcher(tmp_path, pvc_root)
    _, info = await f.fetch(spec("s3://adapters/team/ad3"), MANIFEST)
    assert info.digest == digest_dir(src)[0]
    with pytest.raises(errors.AdapterError) as exc:
        await f.fetch(spec("s3://adapters/team/missing", name="y"), MANIFEST)
    assert exc.value.reason == errors.DOWNLOAD_FAILED
    with pytest.raises(errors.AdapterError):
        await f.fetch(spec("s3://no-such-bucket/x", name="z"), MANIFEST)


async def test_hf_offline_fails_cleanly(tmp_path: Path, pvc_root: Path) -> None:
    """No Hub here (HF_HUB_OFFLINE=1): the hf path must end in DownloadFailed, not a crash."""
    f = fetcher(tmp_path, pvc_root)
    attempts: list[int] = []
    with pytest.raises(errors.AdapterError) as exc:
        await f.fetch(spec("hf://org/adapter", name="h"), MANIFEST, attempts.append)
    assert exc.value.reason == errors.DOWNLOAD_FAILED
    assert attempts == [1, 2, 3]
    assert cache_entries(f) == []


@pytest.mark.parametrize(
    ("source", "kept"),
    [
        ("hf://org/repo", ["adapter_config.json", "adapter_model.safetensors"]),
        ("hf://org/repo/sub", ["sub/adapter_config.json", "sub/adapter_model.safetensors"]),
    ],
    ids=["root", "subfolder"],
)
def test_hf_fetches_only_the_adapter_files(source: str, kept: list[str]) -> None:
    """Our allow_patterns through huggingface_hub's own filter (what snapshot_download uses)
    against a repository that holds much more than one adapter."""
    from huggingface_hub.utils import filter_repo_objects

    from loraplex_server.fetch import hf_patterns

    repo = [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "adapter_model.bin",
        "optimizer.pt",
        "model-00001-of-00030.safetensors",
        "sub/adapter_config.json",
        "sub/adapter_model.safetensors",
        "sub/checkpoint-500/adapter_model.safetensors",
        "other/adapter_config.json",
    ]
    patterns = hf_patterns(parse_source_uri(source))
    assert sorted(filter_repo_objects(repo, allow_patterns=patterns)) == kept


class StandInHub:
    """The Hub at huggingface_hub's boundary (no Hub is reachable here): a repo of files,
    snapshot_download's dry run (sizes) and download, filtered by huggingface_hub's own
    filter_repo_objects, and a record of every call."""

    def __init__(self, files: dict[str, bytes], sizes: dict[str, int] | None = None) -> None:
        self.files = files
        self.sizes = sizes or {}
        self.calls: list[dict[str, Any]] = []

    def __call__(self, **kw: Any) -> Any:
        from huggingface_hub.file_download import DryRunFileInfo
        from huggingface_hub.utils import filter_repo_objects

        self.calls.append(kw)
        names = list(filter_repo_objects(list(self.files), allow_patterns=kw["allow_patterns"]))
        if kw.get("dry_run"):
            return [
                DryRunFileInfo(
                    commit_hash="c0ffee",
                    file_size=self.sizes.get(n, len(self.files[n])),
                    filename=n,
                    local_path=str(Path(kw["local_dir"]) / n),
                    is_cached=False,
                    will_download=True,
                )
                for n in names
            ]
        for n in names:
            target = Path(kw["local_dir"]) / n
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.files[n])
        return kw["local_dir"]


def hub_repo(adapter: Path, prefix: str = "") -> dict[str, bytes]:
    files = {f"{prefix}{p.name}": p.read_bytes() for p in adapter.iterdir()}
    files["model-00001-of-00002.safetensors"] = b"\0" * 4096
    files["adapter_model.bin"] = b"\x80\x04K\x01."
    return files


async def test_hf_downloads_two_files_pinned_to_the_checked_commit(
    tmp_path: Path, pvc_root: Path, tiny_adapters: dict[str, Path], monkeypatch: Any
) -> None:
    import huggingface_hub

    hub = StandInHub(hub_repo(tiny_adapters["ad2"], "sub/"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    f = fetcher(tmp_path, pvc_root)
    path, info = await f.fetch(spec("hf://org/repo/sub"), MANIFEST)
    assert sorted(p.name for p in path.iterdir() if not p.name.startswith(".")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert info.rank == 8
    assert [c.get("dry_run", False) for c in hub.calls] == [True, False]
    assert hub.calls[1]["revision"] == "c0ffee"


async def test_hf_adapter_over_the_cap_is_refused_before_download(
    tmp_path: Path, pvc_root: Path, tiny_adapters: dict[str, Path], monkeypatch: Any
) -> None:
    import huggingface_hub

    hub = StandInHub(
        hub_repo(tiny_adapters["ad2"]), sizes={"adapter_model.safetensors": 3 * 1024**3}
    )
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    f = fetcher(tmp_path, pvc_root)
    with pytest.raises(errors.AdapterError) as exc:
        await f.fetch(spec("hf://org/repo"), MANIFEST)
    assert exc.value.reason == errors.ADAPTER_TOO_LARGE
    assert [c.get("dry_run", False) for c in hub.calls] == [True]  # nothing downloaded
    assert cache_entries(f) == [] and f.cache_size() == 0
