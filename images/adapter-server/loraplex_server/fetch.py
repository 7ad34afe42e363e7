"""Getting an adapter's files onto local disk: pvc in place, https/http, s3 and hf downloads.

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
import tarfile
import uuid
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import aiohttp

from loraplex_server import errors
from loraplex_server.manifest import ADAPTER_NAME_RE, AdapterManifest, ManifestAdapter
from loraplex_server.metrics import Metrics
from loraplex_server.settings import Settings
from loraplex_server.source_uri import SourceError, SourceURI, parse_source_uri
from loraplex_server.verify import MARKER_FILE, WEIGHT_FILES, AdapterInfo, verify_dir

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
TMP_PREFIX = ".tmp-"
MAX_BACKOFF = 30.0


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


def _safe_member(name: str) -> PurePosixPath:
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or "\\" in name or "\x00" in name:
        raise errors.AdapterError(
            errors.UNSUPPORTED_ADAPTER, f"archive member {name!r} would escape the adapter folder"
        )
    return PurePosixPath(*[x for x in p.parts if x != "."])


def extract_tar(archive: Path, dest: Path) -> Path:
    """Extract regular files and folders only; return the folder holding adapter_config.json."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive) as tf:
            for m in tf.getmembers():
                rel = _safe_member(m.name)
                if not rel.parts:
                    continue
                if m.isdir():
                    (dest / rel).mkdir(parents=True, exist_ok=True)
                elif m.isfile():
                    target = dest / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    src = tf.extractfile(m)
                    if src is None:
                        continue
                    with src, target.open("wb") as out:
                        shutil.copyfileobj(src, out)
                else:
                    raise errors.AdapterError(
                        errors.UNSUPPORTED_ADAPTER,
                        f"archive member {m.name!r} is a link or device; only files are allowed",
                    )
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise errors.AdapterError(
            errors.UNSUPPORTED_ADAPTER, f"not a readable tar archive: {exc}"
        ) from exc
    if (dest / "adapter_config.json").is_file():
        return dest
    subdirs = [p for p in dest.iterdir() if p.is_dir()]
    if len(subdirs) == 1 and (subdirs[0] / "adapter_config.json").is_file():
        return subdirs[0]
    raise errors.AdapterError(
        errors.UNSUPPORTED_ADAPTER, "archive holds no adapter_config.json at its top level"
    )


def shown(url: str) -> str:
    """A URL fit for logs and status: query strings may carry signatures, so they go."""
    return url.split("?", 1)[0].split("#", 1)[0]


def _status_error(status: int, url: str) -> Exception:
    url = shown(url)
    if status >= 500 or status in (408, 429):
        return errors.TransientError(f"HTTP {status} from {url}")
    return errors.AdapterError(errors.DOWNLOAD_FAILED, f"HTTP {status} from {url}")


class Fetcher:
    """Turns a manifest entry into a verified local directory, with retries."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.cache_dir = settings.cache_dir

    def clean_temp(self) -> None:
        """Remove leftovers of downloads a previous process did not finish."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        for p in self.cache_dir.iterdir():
            if p.name.startswith((TMP_PREFIX, ".trash-")):
                shutil.rmtree(p, ignore_errors=True)

    def cache_size(self) -> int:
        total = 0
        for dirpath, _d, names in os.walk(self.cache_dir):
            for n in names:
                with contextlib.suppress(OSError):
                    total += (Path(dirpath) / n).stat().st_size
        return total

    async def remove(self, name: str) -> None:
        """Delete an adapter's cache folder (and only that)."""
        path = cache_path(self.cache_dir, name)
        if path.exists():
            await asyncio.to_thread(shutil.rmtree, path, True)

    async def fetch(
        self,
        spec: ManifestAdapter,
        manifest: AdapterManifest,
        on_attempt: Callable[[int], None] = lambda n: None,
    ) -> tuple[Path, AdapterInfo]:
        """Return a verified directory for `spec`, downloading it when needed."""
        try:
            src = parse_source_uri(spec.source)
        except SourceError as exc:
            raise errors.AdapterError(errors.INVALID_SOURCE, str(exc)) from exc
        if src.scheme == "pvc":
            on_attempt(1)
            path = resolve_pvc(self.settings.pvc_root, src)
            info = await asyncio.to_thread(verify_dir, path, spec, manifest)
            return path, info
        final = cache_path(self.cache_dir, spec.name)
        cached = await asyncio.to_thread(self._reuse, final, spec, manifest)
        if cached is not None:
            return final, cached
        attempts = self.settings.download_attempts
        for attempt in range(1, attempts + 1):
            on_attempt(attempt)
            try:
                return await self._download_once(src, spec, manifest, final)
            except errors.TransientError as exc:
                if attempt == attempts:
                    raise errors.AdapterError(
                        errors.DOWNLOAD_FAILED, f"gave up after {attempts} attempts: {exc}"
                    ) from exc
                delay = min(MAX_BACKOFF, self.settings.download_backoff * 2 ** (attempt - 1))
                log.warning(
                    "adapter %s: attempt %d failed (%s); retry in %.1fs",
                    spec.name,
                    attempt,
                    exc,
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
        self, src: SourceURI, spec: ManifestAdapter, manifest: AdapterManifest, final: Path
    ) -> tuple[Path, AdapterInfo]:
        tmp = self.cache_dir / f"{TMP_PREFIX}{spec.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            if src.scheme in ("http", "https"):
                root = await self._http(src, spec, tmp)
            elif src.scheme == "s3":
                root = await asyncio.to_thread(self._s3, src, spec, tmp)
            else:
                root = await asyncio.to_thread(self._hf, src, spec, tmp)
            info = await asyncio.to_thread(verify_dir, root, spec, manifest)
            await asyncio.to_thread(self._install, root, final, spec)
            return final, info
        finally:
            await asyncio.to_thread(shutil.rmtree, tmp, True)

    def _install(self, root: Path, final: Path, spec: ManifestAdapter) -> None:
        (root / MARKER_FILE).write_text(json.dumps(self._marker(spec)))
        trash = None
        if final.exists():
            trash = self.cache_dir / f".trash-{spec.name}-{uuid.uuid4().hex[:8]}"
            final.rename(trash)
        root.rename(final)  # same filesystem: atomic
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)

    # -- http(s) ---------------------------------------------------------------------------

    async def _http(self, src: SourceURI, spec: ManifestAdapter, tmp: Path) -> Path:
        base = f"{src.scheme}://{src.authority}/{src.path}"
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=10, sock_read=self.settings.download_read_timeout
        )
        async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
            if base.endswith(ARCHIVE_SUFFIXES):
                archive = tmp / "download" / PurePosixPath(src.path).name
                digest = await self._get(session, base, archive, spec.name)
                self._check_sha(spec, digest, base)
                return await asyncio.to_thread(extract_tar, archive, tmp / "adapter")
            # A folder URL: fetch the two files a PEFT adapter needs.
            out = tmp / "adapter"
            await self._get(
                session,
                base.rstrip("/") + "/adapter_config.json",
                out / "adapter_config.json",
                spec.name,
            )
            for i, weights in enumerate(WEIGHT_FILES):
                try:
                    digest = await self._get(
                        session, f"{base.rstrip('/')}/{weights}", out / weights, spec.name
                    )
                except errors.AdapterError:
                    if i == len(WEIGHT_FILES) - 1:
                        raise
                    continue
                self._check_sha(spec, digest, base)
                break
            return out

    @staticmethod
    def _check_sha(spec: ManifestAdapter, digest: str, url: str) -> None:
        if spec.sha256 is not None and digest != spec.sha256:
            raise errors.AdapterError(
                errors.CHECKSUM_MISMATCH,
                f"sha256 of {shown(url)} is {digest}, but spec.sha256 is {spec.sha256}",
            )

    async def _get(self, session: aiohttp.ClientSession, url: str, dest: Path, name: str) -> str:
        """Stream one URL to `dest`; return its sha256. Short bodies count as transient."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        got = 0
        try:
            async with session.get(url) as resp:
                if resp.status != 200:
                    raise _status_error(resp.status, url)
                with dest.open("wb") as f:
                    async for chunk in resp.content.iter_chunked(1 << 16):
                        f.write(chunk)
                        h.update(chunk)
                        got += len(chunk)
                        self.metrics.download_bytes.labels(name).inc(len(chunk))
                expected = resp.content_length
                if expected is not None and got != expected:
                    raise errors.TransientError(
                        f"{shown(url)}: body ended after {got} of {expected} bytes"
                    )
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
            # aiohttp's messages can repeat the full URL; keep only the exception type then.
            raise errors.TransientError(f"{shown(url)}: {type(exc).__name__}") from exc
        return h.hexdigest()

    # -- s3 --------------------------------------------------------------------------------

    def _s3(self, src: SourceURI, spec: ManifestAdapter, tmp: Path) -> Path:
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
        count = 0
        try:
            pages = client.get_paginator("list_objects_v2").paginate(
                Bucket=src.authority, Prefix=prefix
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    key = obj["Key"]
                    rel = _safe_member(key[len(prefix) :])
                    if not rel.parts or key.endswith("/"):
                        continue
                    target = out / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    client.download_file(src.authority, key, str(target))
                    count += 1
                    self.metrics.download_bytes.labels(spec.name).inc(target.stat().st_size)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if status >= 500 or code in ("SlowDown", "RequestTimeout", "InternalError"):
                raise errors.TransientError(f"s3 {code or status}: {exc}") from exc
            raise errors.AdapterError(errors.DOWNLOAD_FAILED, f"s3 {code}: {exc}") from exc
        except BotoCoreError as exc:
            raise errors.TransientError(f"s3: {exc}") from exc
        if count == 0:
            raise errors.AdapterError(errors.DOWNLOAD_FAILED, f"no objects under {src.raw}")
        return out

    # -- hf --------------------------------------------------------------------------------

    def _hf(self, src: SourceURI, spec: ManifestAdapter, tmp: Path) -> Path:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        local = tmp / "hf"
        try:
            snapshot_download(
                repo_id=src.authority,
                revision=spec.revision,
                local_dir=str(local),
                allow_patterns=[f"{src.path}/*"] if src.path else None,
            )
        except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as exc:
            raise errors.AdapterError(errors.DOWNLOAD_FAILED, f"{src.raw}: {exc}") from exc
        except Exception as exc:  # network, offline mode, 5xx: all worth another try
            raise errors.TransientError(f"{src.raw}: {type(exc).__name__}: {exc}") from exc
        shutil.rmtree(local / ".cache", ignore_errors=True)
        root = local / src.path if src.path else local
        for dirpath, _d, names in os.walk(root):
            for n in names:
                self.metrics.download_bytes.labels(spec.name).inc(
                    (Path(dirpath) / n).stat().st_size
                )
        return root
