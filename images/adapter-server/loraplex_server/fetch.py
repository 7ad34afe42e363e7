"""Getting an adapter's files into the cache: https/http, s3 and hf downloads, pvc copies.

Downloads go to a temp dir inside the cache dir, are verified there, and are renamed into
`cache/<name>/` only when complete, so a half-written adapter can never be loaded: vLLM is only
ever pointed at a renamed, verified directory. Transient failures are retried with exponential
backoff; permanent ones (404, checksum mismatch, bad adapter) fail at once with a reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

import aiohttp
from yarl import URL

from loraplex_server import errors
from loraplex_server.cache import CacheBudget, Quota, deadline_passed
from loraplex_server.download_slots import DownloadSlots
from loraplex_server.manifest import (
    ADAPTER_NAME_RE,
    AdapterLimits,
    AdapterManifest,
    ManifestAdapter,
)
from loraplex_server.metrics import Metrics
from loraplex_server.netguard import (
    BlockedAddress,
    GuardedResolver,
    IPNetwork,
    address_allowed,
    literal_address,
    parse_networks,
)
from loraplex_server.settings import Settings
from loraplex_server.source_uri import SourceError, SourceURI, parse_source_uri, sha256_problem
from loraplex_server.unpack import CHUNK, copy_regular_tree, extract_tar, safe_member
from loraplex_server.verify import (
    CONFIG_FILE,
    MARKER_FILE,
    SAFETENSORS_FILE,
    AdapterInfo,
    verify_dir,
)

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
MAX_BACKOFF = 30.0
MAX_REDIRECTS = 5
_REDIRECTS = (301, 302, 303, 307, 308)


def cache_path(cache_dir: Path, name: str) -> Path:
    """The one place an adapter may live in the cache; refuses anything that could escape it."""
    if not ADAPTER_NAME_RE.fullmatch(name):
        raise ValueError(f"adapter name {name!r} is not a DNS-1123 label")
    root = cache_dir.resolve()
    path = (root / name).resolve()
    if path.parent != root:
        raise ValueError(f"adapter name {name!r} resolves outside the cache")
    return path


def resolve_pvc(pvc_root: Path, src: SourceURI) -> Path:
    """`pvc://claim/path` -> `<pvc-root>/claim/path`, refusing anything that leaves the claim.

    Each claim's mount is its own root: the kubelet (or a local stand-in) decides where a
    claim really lives, while nothing inside a claim (`..`, symlinks) can reach outside it.
    """
    if not (pvc_root / src.authority).is_dir():
        raise errors.AdapterError(
            errors.INVALID_SOURCE,
            f"claim {src.authority!r} is not mounted; declare it in spec.adapterVolumes",
        )
    root = (pvc_root / src.authority).resolve()
    path = (root / src.path).resolve()
    if not path.is_relative_to(root):
        raise errors.AdapterError(
            errors.INVALID_SOURCE, f"{src.raw} resolves outside its claim {src.authority!r}"
        )
    if not path.is_dir():
        raise errors.AdapterError(errors.DOWNLOAD_FAILED, f"{src.raw}: no such directory")
    return path


def hf_patterns(src: SourceURI) -> list[str]:
    """Only the two files a PEFT adapter needs, never a whole repository."""
    prefix = f"{src.path}/" if src.path else ""
    return [f"{prefix}{CONFIG_FILE}", f"{prefix}{SAFETENSORS_FILE}"]


def _status_error(status: int, what: str, detail: str) -> Exception:
    message = f"the source answered HTTP {status} for {what}"
    if status >= 500 or status in (408, 429):
        return errors.TransientError(message, detail)
    return errors.AdapterError(errors.DOWNLOAD_FAILED, message, detail)


def _not_allowed(message: str, detail: str) -> errors.AdapterError:
    return errors.AdapterError(errors.SOURCE_NOT_ALLOWED, message, detail)


def check_url(url: URL, limits: AdapterLimits, allowed: list[IPNetwork]) -> None:
    """Refuse a URL (the source or a redirect) the BaseModel did not allow us to reach."""
    host = (url.host or "").lower()
    if url.scheme == "http":
        hostport = f"{host}:{url.port}" if url.explicit_port else host
        if host not in limits.plain_http_hosts and hostport not in limits.plain_http_hosts:
            raise _not_allowed(
                "plain http:// is refused: use https://, or list the host in the BaseModel's "
                "spec.adapterLimits.plainHttpHosts",
                f"plain http to {host}",
            )
    elif url.scheme != "https":
        raise _not_allowed("the source redirected to a scheme other than https", str(url.scheme))
    literal = literal_address(host)
    if literal is not None and not address_allowed(literal, allowed):
        raise _not_allowed(_PRIVATE_MESSAGE, f"{host} is not a public address")


_PRIVATE_MESSAGE = (
    "the source host is a loopback, link-local, private or cluster-internal address, which "
    "downloads may not reach; add its network to the BaseModel's "
    "spec.adapterLimits.privateNetworks if it is meant to be reached"
)


class Fetcher:
    """Turns a manifest entry into a verified directory in the cache, with retries and bounds."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.cache_dir = settings.cache_dir
        self.budget = CacheBudget(AdapterLimits().cache_bytes)
        self._installed: dict[str, int] = {}
        self.slots = DownloadSlots()
        # Removals get their own thread: eviction runs while worker threads of the default
        # pool may all be waiting for it (CacheBudget.take_sync), so it must not need one.
        self._remover = ThreadPoolExecutor(1, thread_name_prefix="cache-remove")

    def clean_temp(self) -> None:
        """Remove leftovers of unfinished downloads and count what the cache already holds.

        Blocking (it walks the cache): call it once at start, from a worker thread.
        """
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        for p in self.cache_dir.iterdir():
            if p.name.startswith((TMP_PREFIX, ".trash-")):
                shutil.rmtree(p, ignore_errors=True)
            elif p.is_dir() and not p.is_symlink() and ADAPTER_NAME_RE.fullmatch(p.name):
                size = _tree_size(p)
                self._installed[p.name] = size
                self.budget.add(size)
            else:
                with contextlib.suppress(OSError):
                    self.budget.add(p.lstat().st_size)

    def cache_size(self) -> int:
        """Bytes in the cache, from the running total (no walk)."""
        return self.budget.used

    def installed(self) -> dict[str, int]:
        """Adapter folders in the cache and their sizes, including ones no longer declared."""
        return dict(self._installed)

    async def remove(self, name: str) -> int:
        """Delete an adapter's cache folder (and only that); return the bytes it freed."""
        path = cache_path(self.cache_dir, name)
        freed = self._installed.pop(name, 0)
        if path.exists():
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._remover, shutil.rmtree, path, True)
        self.budget.release(freed)
        return freed

    async def fetch(
        self,
        spec: ManifestAdapter,
        manifest: AdapterManifest,
        on_attempt: Callable[[int], None] = lambda n: None,
    ) -> tuple[Path, AdapterInfo]:
        """Return a verified directory for `spec`, downloading (or copying) it when needed."""
        limits = manifest.limits
        self.budget.limit = limits.cache_bytes
        self.budget.bind()
        try:
            src = parse_source_uri(spec.source)
        except SourceError as exc:
            raise errors.AdapterError(errors.INVALID_SOURCE, str(exc)) from exc
        if spec.sha256 is not None and (problem := sha256_problem(src)) is not None:
            raise errors.AdapterError(errors.INVALID_SOURCE, problem)
        if src.scheme in ("http", "https"):
            check_url(URL(src.url(), encoded=True), limits, parse_networks(limits.private_networks))
        final = cache_path(self.cache_dir, spec.name)
        if src.scheme != "pvc":  # a claim's files may change in place: always copy them again
            cached = await asyncio.to_thread(self._reuse, final, spec, manifest)
            if cached is not None:
                return final, cached
        attempts = self.settings.download_attempts
        for attempt in range(1, attempts + 1):
            on_attempt(attempt)
            try:
                async with self.slots.slot(spec.name, limits.max_concurrent_downloads):
                    deadline = time.monotonic() + limits.download_timeout_seconds
                    try:
                        async with asyncio.timeout(limits.download_timeout_seconds):
                            return await self._download_once(src, spec, manifest, final, deadline)
                    except TimeoutError as exc:
                        raise deadline_passed(limits.download_timeout_seconds) from exc
            except errors.TransientError as exc:
                if attempt == attempts:
                    raise errors.AdapterError(
                        exc.reason, f"gave up after {attempts} attempts: {exc}", exc.detail
                    ) from exc
                delay = min(MAX_BACKOFF, self.settings.download_backoff * 2 ** (attempt - 1))
                log.warning(
                    "adapter %s: attempt %d failed (%s); retry in %.1fs",
                    spec.name,
                    attempt,
                    exc.detail,
                    delay,
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def _marker(self, spec: ManifestAdapter) -> dict[str, Any]:
        return {"source": spec.source, "revision": spec.revision, "sha256": spec.sha256}

    def _reuse(
        self, final: Path, spec: ManifestAdapter, manifest: AdapterManifest
    ) -> AdapterInfo | None:
        marker = final / MARKER_FILE
        try:
            if json.loads(marker.read_text()) != self._marker(spec):
                return None
            return verify_dir(final, spec, manifest)
        except (OSError, ValueError, errors.AdapterError):
            return None

    async def _download_once(
        self,
        src: SourceURI,
        spec: ManifestAdapter,
        manifest: AdapterManifest,
        final: Path,
        deadline: float,
    ) -> tuple[Path, AdapterInfo]:
        tmp = self.cache_dir / f"{TMP_PREFIX}{spec.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        limits = manifest.limits
        quotas = [Quota(limits, self.budget, deadline), Quota(limits, self.budget, deadline)]
        try:
            if src.scheme in ("http", "https"):
                root = await self._http(src, spec, tmp, limits, quotas)
            elif src.scheme == "s3":
                root = await asyncio.to_thread(self._s3, src, spec, tmp, quotas[0])
            elif src.scheme == "pvc":
                root = tmp / "adapter"
                pvc = resolve_pvc(self.settings.pvc_root, src)
                await asyncio.to_thread(copy_regular_tree, pvc, root, quotas[0])
            else:
                root = await asyncio.to_thread(self._hf, src, spec, tmp, quotas[0])
            info = await asyncio.to_thread(verify_dir, root, spec, manifest)
            await asyncio.to_thread(self._install, root, final, spec)
            self._installed[spec.name] = info.size_bytes
            self.budget.add(info.size_bytes)
            return final, info
        finally:
            await asyncio.to_thread(shutil.rmtree, tmp, True)
            for q in quotas:
                q.release()

    def _install(self, root: Path, final: Path, spec: ManifestAdapter) -> None:
        (root / MARKER_FILE).write_text(json.dumps(self._marker(spec)))
        trash = None
        if final.exists():
            trash = self.cache_dir / f".trash-{spec.name}-{uuid.uuid4().hex[:8]}"
            final.rename(trash)
            self.budget.release(self._installed.pop(spec.name, 0))
        root.rename(final)  # same filesystem: atomic
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)

    # -- http(s) ---------------------------------------------------------------------------

    async def _http(
        self,
        src: SourceURI,
        spec: ManifestAdapter,
        tmp: Path,
        limits: AdapterLimits,
        quotas: list[Quota],
    ) -> Path:
        allowed = parse_networks(limits.private_networks)
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=10, sock_read=self.settings.download_read_timeout
        )
        connector = aiohttp.TCPConnector(resolver=GuardedResolver(allowed), limit=4)
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False, trust_env=False
        ) as session:
            get = _Getter(session, limits, allowed, self.metrics, spec.name)
            if src.is_archive:
                archive = tmp / "download" / PurePosixPath(src.path).name
                digest = await get(src, None, archive, quotas[0])
                if spec.sha256 is not None and digest != spec.sha256:
                    raise errors.AdapterError(
                        errors.CHECKSUM_MISMATCH,
                        f"the archive's sha256 is {digest}, but spec.sha256 is {spec.sha256}",
                    )
                return await asyncio.to_thread(extract_tar, archive, tmp / "adapter", quotas[1])
            # A folder URL: fetch the two files a PEFT adapter needs.
            out = tmp / "adapter"
            for file in (CONFIG_FILE, SAFETENSORS_FILE):
                await get(src, file, out / file, quotas[0])
            return out

    # -- s3 --------------------------------------------------------------------------------

    def _s3(self, src: SourceURI, spec: ManifestAdapter, tmp: Path, quota: Quota) -> Path:
        """List first (count and total size are refused before any byte is written), then
        stream each object through the quota."""
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError

        client = boto3.client(
            "s3",
            endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None,
            config=Config(
                retries={"max_attempts": 1},
                connect_timeout=10,
                read_timeout=self.settings.download_read_timeout,
            ),
        )
        prefix = src.path.rstrip("/") + "/" if src.path else ""
        out = tmp / "adapter"
        try:
            pages = client.get_paginator("list_objects_v2").paginate(
                Bucket=src.authority, Prefix=prefix
            )
            objects: list[tuple[str, PurePosixPath]] = []
            total = 0
            for page in pages:
                for obj in page.get("Contents", []):
                    key = obj["Key"]
                    rel = safe_member(key[len(prefix) :])
                    if not rel.parts or key.endswith("/"):
                        continue
                    quota.add_file()
                    total += int(obj.get("Size", 0))
                    quota.expect(total)
                    objects.append((key, rel))
            for key, rel in objects:
                target = out / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                body = client.get_object(Bucket=src.authority, Key=key)["Body"]
                with target.open("wb") as f:
                    for chunk in body.iter_chunks(CHUNK):
                        quota.charge_sync(len(chunk))
                        f.write(chunk)
                        self.metrics.download_bytes.labels(spec.name).inc(len(chunk))
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            message = f"s3 answered {code or status}"
            if status >= 500 or code in ("SlowDown", "RequestTimeout", "InternalError"):
                raise errors.TransientError(message, str(exc)) from exc
            raise errors.AdapterError(errors.DOWNLOAD_FAILED, message, str(exc)) from exc
        except BotoCoreError as exc:
            raise errors.TransientError("could not reach s3", str(exc)) from exc
        if not objects:
            raise errors.AdapterError(errors.DOWNLOAD_FAILED, f"no objects under {src.raw}")
        return out

    # -- hf --------------------------------------------------------------------------------

    def _hf(self, src: SourceURI, spec: ManifestAdapter, tmp: Path, quota: Quota) -> Path:
        """The adapter's two files only; their sizes (a dry run asks the Hub) are checked
        and reserved before anything is written, and the download is pinned to the commit
        that was checked."""
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        local = tmp / "hf"
        patterns = hf_patterns(src)
        try:
            planned = snapshot_download(
                repo_id=src.authority,
                revision=spec.revision,
                local_dir=str(local),
                allow_patterns=patterns,
                dry_run=True,
            )
            announced = 0
            for file in planned:
                quota.add_file()
                announced += file.file_size or 0
                quota.expect(announced)
            quota.charge_sync(announced)
            snapshot_download(
                repo_id=src.authority,
                revision=planned[0].commit_hash if planned else spec.revision,
                local_dir=str(local),
                allow_patterns=patterns,
            )
        except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as exc:
            raise errors.AdapterError(
                errors.DOWNLOAD_FAILED,
                f"{src.raw}: the repository or revision does not exist or is gated",
                str(exc),
            ) from exc
        except (errors.AdapterError, errors.TransientError):
            raise
        except Exception as exc:  # network, offline mode, 5xx: all worth another try
            raise errors.TransientError(
                f"{src.raw}: the Hub could not be reached", f"{type(exc).__name__}: {exc}"
            ) from exc
        shutil.rmtree(local / ".cache", ignore_errors=True)
        root = local / src.path if src.path else local
        written = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        if written > announced:  # a size the Hub did not announce: count it now
            quota.charge_sync(written - announced)
        self.metrics.download_bytes.labels(spec.name).inc(written)
        return root


class _Getter:
    """Streams one http(s) file through the guards: scheme, addresses, redirects, quota."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        limits: AdapterLimits,
        allowed: list[IPNetwork],
        metrics: Metrics,
        name: str,
    ) -> None:
        self.session = session
        self.limits = limits
        self.allowed = allowed
        self.metrics = metrics
        self.name = name

    async def __call__(self, src: SourceURI, file: str | None, dest: Path, quota: Quota) -> str:
        """Download to `dest`; return its sha256. Short bodies count as transient."""
        what = file or "the archive"
        shown = src.shown(file)
        url = URL(src.url(file), encoded=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            for _ in range(MAX_REDIRECTS + 1):
                check_url(url, self.limits, self.allowed)
                async with self.session.get(url, allow_redirects=False) as resp:
                    if resp.status in _REDIRECTS and "Location" in resp.headers:
                        # Every hop is checked again (scheme, then addresses at connect).
                        url = resp.url.join(URL(resp.headers["Location"]))
                        continue
                    if resp.status != 200:
                        raise _status_error(resp.status, what, f"HTTP {resp.status} from {shown}")
                    return await self._save(resp, dest, quota, what, shown)
            raise errors.AdapterError(
                errors.DOWNLOAD_FAILED,
                f"the source redirected more than {MAX_REDIRECTS} times",
                shown,
            )
        except BlockedAddress as exc:
            raise _not_allowed(_PRIVATE_MESSAGE, f"{shown}: {exc}") from exc
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
            if isinstance(exc, TimeoutError):
                problem = "stopped sending"
            elif isinstance(exc, aiohttp.ClientPayloadError):
                problem = "ended the body early"
            else:
                problem = "could not be reached"
            raise errors.TransientError(
                f"{what}: the source {problem}",
                f"{shown}: {type(exc).__name__}: {exc}",
            ) from exc

    async def _save(
        self, resp: aiohttp.ClientResponse, dest: Path, quota: Quota, what: str, shown: str
    ) -> str:
        expected = resp.content_length
        if expected is not None:
            quota.expect(expected)  # refuse before writing a byte
        quota.add_file()
        h = hashlib.sha256()
        got = 0
        with dest.open("wb") as f:
            async for chunk in resp.content.iter_chunked(CHUNK):
                await quota.charge(len(chunk))
                f.write(chunk)
                h.update(chunk)
                got += len(chunk)
                self.metrics.download_bytes.labels(self.name).inc(len(chunk))
        if expected is not None and got != expected:
            raise errors.TransientError(
                f"{what}: the body ended after {got} of {expected} bytes",
                f"{shown}: short body",
            )
        return h.hexdigest()


def _tree_size(root: Path) -> int:
    total = 0
    for dirpath, _d, names in os.walk(root):
        for n in names:
            with contextlib.suppress(OSError):
                total += (Path(dirpath) / n).lstat().st_size
    return total
