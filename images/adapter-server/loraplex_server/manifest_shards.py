"""The adapter manifest as Kubernetes stores it: a small index plus gzip shards.

Why: one ConfigMap holds at most 1 MiB, and a manifest costs about 300 bytes per adapter
(350 with sha256 and uid), so one BaseModel with more than ~3,000 adapters cannot keep its
manifest in one object. Gzip alone is not enough either: uids and digests do not compress,
so 10,000 adapters are still ~740 kB of gzip, ~990 kB once base64-encoded into `binaryData`.

The design:
- The manifest is serialised as compact JSON, gzip-compressed (mtime 0, so equal content gives
  equal bytes and an unchanged manifest writes nothing), and cut into shards of at most
  `SHARD_BYTES` (512 KiB; 683 KiB as base64, well under both the 1 MiB object limit and the
  API server's 3 MiB request limit). Shard `n` lives in ConfigMap `<base>-manifest-<n>` under
  the key `shard-<n>.gz`.
- The index lives where the manifest always did (`<base>-adapters`, key `manifest.json`): the
  generation, the adapter count, the sha256 of the whole JSON, and each shard's name, key,
  size and sha256. It is a few hundred bytes however many adapters there are.
- The pod mounts one *projected* volume: the index plus the fixed slots
  `<base>-manifest-0..MAX_SHARDS-1`, each `optional`. The slot list never depends on the
  adapter count, so adding adapters never changes the pod template (no rollout), and
  `MAX_SHARDS` x `SHARD_BYTES` (8 MiB of gzip, ~100,000 adapters) is the bound.
- Consistency: the operator writes the shards first and the index last. The kubelet refreshes
  each ConfigMap from its own watch, so a pod may briefly see a new index with an old shard,
  or the reverse. The reader therefore trusts nothing it cannot verify: every shard must match
  the size and sha256 the index names, and the joined JSON must match the index's sha256 and
  generation. A torn set raises `TornManifest`; a running server keeps what it serves and
  tries again on its next poll, a starting one waits for a consistent set. So a pod only ever
  applies a complete generation, never half of one.
- Old shards: when a manifest shrinks to fewer shards, the operator deletes the slots the new
  index no longer names (it knows them from the index it read). They are owned by the
  BaseModel, so garbage collection removes them all with it.

A plain manifest document (not an index) is still accepted wherever an index is, so a file
written by hand, by tests, or by an older operator keeps working.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import json
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from loraplex_server.manifest import AdapterManifest, _Wire, validate_against

INDEX_FORMAT = "loraplex.io/manifest-index/v1"
# The index ConfigMap's key (the file the server's --manifest names); shards sit beside it.
INDEX_KEY = "manifest.json"
SHARD_BYTES = 512 * 1024
MAX_SHARDS = 16


class TornManifest(Exception):
    """The mounted shards do not (yet) form the generation the index names."""


class ManifestTooLarge(ValueError):
    """Even compressed, the manifest needs more shards than a pod mounts."""


class ShardRef(_Wire):
    name: str = Field(description="The ConfigMap holding this shard.")
    key: str = Field(
        pattern=r"^shard-[0-9]{1,3}\.gz$",
        description="The binaryData key, also the file name beside the index in the pod.",
    )
    size: int = Field(ge=0, description="Bytes of gzip in this shard.")
    sha256: str


class ManifestIndex(_Wire):
    format: Literal["loraplex.io/manifest-index/v1"]
    generation: int = Field(ge=0)
    adapters: int = Field(ge=0, description="How many adapters the manifest declares.")
    sha256: str = Field(description="sha256 of the whole manifest JSON, before compression.")
    shards: list[ShardRef]


def shard_key(n: int) -> str:
    return f"shard-{n}.gz"


# The last manifest serialised and its bytes: a pass splits a manifest into shards and then
# pushes the same object to its pods (2.5 MB at 10,000 adapters, tens of ms each time).
_last_bytes: tuple[AdapterManifest, bytes] | None = None


def manifest_bytes(manifest: AdapterManifest) -> bytes:
    """The canonical JSON: compact and key-sorted, so equal manifests give equal bytes.
    (Manifests are frozen, so the same object always gives the same bytes.)"""
    global _last_bytes
    if _last_bytes is not None and _last_bytes[0] is manifest:
        return _last_bytes[1]
    doc = manifest.model_dump(by_alias=True, mode="json")
    raw = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    _last_bytes = (manifest, raw)
    return raw


def split(
    manifest: AdapterManifest,
    shard_name: Callable[[int], str],
    *,
    shard_bytes: int = SHARD_BYTES,
    max_shards: int = MAX_SHARDS,
) -> tuple[ManifestIndex, list[bytes]]:
    """The index and the shards' gzip bytes (shard n is `index.shards[n]`)."""
    raw = manifest_bytes(manifest)
    packed = gzip.compress(raw, compresslevel=6, mtime=0)
    chunks = [packed[i : i + shard_bytes] for i in range(0, len(packed), shard_bytes)] or [b""]
    if len(chunks) > max_shards:
        raise ManifestTooLarge(
            f"the manifest of {len(manifest.adapters)} adapters compresses to {len(packed)} "
            f"bytes, more than the {max_shards} shards of {shard_bytes} bytes a pod mounts; "
            "spread the adapters over more BaseModels"
        )
    refs = [
        ShardRef(
            name=shard_name(n),
            key=shard_key(n),
            size=len(c),
            sha256=hashlib.sha256(c).hexdigest(),
        )
        for n, c in enumerate(chunks)
    ]
    index = ManifestIndex(
        format=INDEX_FORMAT,
        generation=manifest.generation,
        adapters=len(manifest.adapters),
        sha256=hashlib.sha256(raw).hexdigest(),
        shards=refs,
    )
    return index, chunks


def join(
    index: ManifestIndex,
    read: Callable[[ShardRef], bytes | None],
    held: AdapterManifest | None = None,
) -> AdapterManifest:
    """The manifest the index names, from shards `read` returns; `TornManifest` if they
    are missing or belong to another generation. With `held` (what a pod serves), adapters
    unchanged since are not validated again (`validate_against`)."""
    parts: list[bytes] = []
    for ref in index.shards:
        data = read(ref)
        if data is None:
            raise TornManifest(f"shard {ref.key} ({ref.name}) is missing")
        if len(data) != ref.size or hashlib.sha256(data).hexdigest() != ref.sha256:
            raise TornManifest(
                f"shard {ref.key} ({ref.name}) does not match generation {index.generation}"
            )
        parts.append(data)
    try:
        raw = gzip.decompress(b"".join(parts))
    except (OSError, EOFError, zlib.error) as exc:
        raise TornManifest(f"shards do not decompress: {exc}") from exc
    if hashlib.sha256(raw).hexdigest() != index.sha256:
        raise TornManifest(f"joined shards do not match generation {index.generation}")
    if held is None:
        manifest = AdapterManifest.model_validate_json(raw)
    else:
        manifest = validate_against(json.loads(raw), held)
    if manifest.generation != index.generation or len(manifest.adapters) != index.adapters:
        raise TornManifest(f"joined shards do not hold generation {index.generation}")
    return manifest


def index_generation(raw: bytes) -> int | None:
    """The generation `raw` names if it is an index (a few hundred bytes: cheap to look at
    before any shard is read), else None."""
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("format") != INDEX_FORMAT:
        return None
    generation = doc.get("generation")
    return generation if isinstance(generation, int) else None


def parse(raw: bytes | str) -> ManifestIndex | AdapterManifest:
    """An index or, for compatibility, a plain manifest document."""
    doc = json.loads(raw)
    if isinstance(doc, dict) and doc.get("format") == INDEX_FORMAT:
        return ManifestIndex.model_validate(doc)
    return AdapterManifest.model_validate(doc)


def read_mounted(path: Path, held: AdapterManifest | None = None) -> tuple[str, AdapterManifest]:
    """The manifest behind the mounted `path` (an index whose shards sit beside it, or a plain
    manifest) and the sha256 of the file at `path`, for change detection; `held` as in
    `join`."""
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    doc = parse(raw)
    if isinstance(doc, AdapterManifest):
        return digest, doc

    def read(ref: ShardRef) -> bytes | None:
        try:
            return (path.parent / ref.key).read_bytes()
        except FileNotFoundError:
            return None

    return digest, join(doc, read, held)


def from_configmaps(
    index_cm: Mapping[str, Any], shard_cms: Mapping[str, Mapping[str, Any]]
) -> AdapterManifest:
    """The manifest as stored in the cluster: the index ConfigMap (its `data[index_key]`) and
    the shard ConfigMaps by name. For the operator (what it published last), the emulated
    kubelet, tests and benchmarks; raises `TornManifest` or ValueError."""
    raw = (index_cm.get("data") or {}).get(INDEX_KEY)
    if not isinstance(raw, str):
        raise ValueError(f"the index ConfigMap has no {INDEX_KEY}")
    doc = parse(raw)
    if isinstance(doc, AdapterManifest):
        return doc

    def read(ref: ShardRef) -> bytes | None:
        value = (shard_cms.get(ref.name, {}).get("binaryData") or {}).get(ref.key)
        if not isinstance(value, str):
            return None
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error:
            return None

    return join(doc, read)


def shard_names(index_cm: Mapping[str, Any] | None) -> list[str]:
    """The shard ConfigMaps a stored index names (none for a plain or unreadable one)."""
    raw = ((index_cm or {}).get("data") or {}).get(INDEX_KEY)
    try:
        doc = parse(raw) if isinstance(raw, str) else None
    except ValueError:
        return []
    return [r.name for r in doc.shards] if isinstance(doc, ManifestIndex) else []
