"""The sharded manifest: split, join, and what a reader must refuse.

Matrix: 10,000 adapters split into shards and an index that each fit a ConfigMap with
headroom (as rendered objects, serialised the way the API server receives them) and join back
to the same manifest; equal content gives equal bytes; a torn set (index of one generation,
shard of another; a missing shard; a corrupt shard) raises TornManifest; a plain manifest is
still read; a manifest too large even compressed is refused with the bound named; a shard key
that would leave the mounted folder is refused.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from loraplex import naming
from loraplex.render import Owner, build_manifest_configmaps
from loraplex_server import manifest_shards as ms
from loraplex_server.manifest import AdapterManifest, ManifestAdapter, validate_against

CONFIGMAP_LIMIT = 1024 * 1024  # the API server's cap on a ConfigMap's data
OWNER = Owner("qwen", "default", "uid-1")


def big_manifest(n: int, generation: int = 1) -> AdapterManifest:
    """`n` s3 adapters with the fields that do not compress (uid, sha256) all set."""
    adapters = [
        ManifestAdapter(
            name=f"customer-{i:05d}",
            served_name=f"customer-{i:05d}",
            source=f"s3://adapters-bucket/tenants/customer-{i:05d}/v3",
            sha256=hashlib.sha256(f"w{i}".encode()).hexdigest(),
            uid=hashlib.md5(f"u{i}".encode()).hexdigest(),
            rank=16,
        )
        for i in range(n)
    ]
    return AdapterManifest(
        generation=generation,
        base_served_name="qwen",
        max_loras=4,
        max_lora_rank=16,
        max_cpu_loras=64,
        adapters=adapters,
    )


@pytest.fixture(scope="module")
def ten_k() -> AdapterManifest:
    return big_manifest(10_000)


def shard_name(n: int) -> str:
    return naming.manifest_shard_name("qwen", n)


def test_ten_thousand_adapters_fit_configmaps_with_headroom(ten_k: AdapterManifest) -> None:
    plain = len(ms.manifest_bytes(ten_k))
    assert plain > CONFIGMAP_LIMIT * 2  # one ConfigMap could not hold it
    objs = build_manifest_configmaps(OWNER, ten_k)
    *shards, index = objs
    assert index["metadata"]["name"] == naming.configmap_name("qwen")
    assert len(shards) >= 2
    for obj in objs:
        body = len(json.dumps(obj))  # what the API server receives, base64 included
        assert body < 0.85 * CONFIGMAP_LIMIT, (obj["metadata"]["name"], body)
    assert len(json.dumps(index)) < 4096  # the index stays small at any adapter count
    joined = ms.from_configmaps(index, {o["metadata"]["name"]: o for o in shards})
    assert joined == ten_k


def test_split_is_deterministic_and_join_round_trips(ten_k: AdapterManifest) -> None:
    index, chunks = ms.split(ten_k, shard_name)
    again, chunks2 = ms.split(ten_k, shard_name)
    assert (index, chunks) == (again, chunks2)  # an unchanged manifest writes nothing
    assert [r.size for r in index.shards] == [len(c) for c in chunks]
    assert all(len(c) <= ms.SHARD_BYTES for c in chunks)
    assert index.adapters == 10_000 and index.generation == 1
    by_key = {r.key: c for r, c in zip(index.shards, chunks, strict=True)}
    assert ms.join(index, lambda r: by_key[r.key]) == ten_k


def _stored(m: AdapterManifest) -> tuple[ms.ManifestIndex, dict[str, bytes]]:
    index, chunks = ms.split(m, shard_name, shard_bytes=64 * 1024)
    return index, {r.key: c for r, c in zip(index.shards, chunks, strict=True)}


def test_torn_sets_are_detected(ten_k: AdapterManifest) -> None:
    old_index, old = _stored(ten_k)
    newer = big_manifest(10_001, generation=2)
    new_index, new = _stored(newer)
    assert len(new_index.shards) > 2
    # New index, one changed shard not refreshed yet (the kubelet syncs each ConfigMap on
    # its own). Shards whose bytes did not change are interchangeable, and that is fine.
    stale = next(k for k in old if old[k] != new[k])
    mixed = {**new, stale: old[stale]}
    with pytest.raises(ms.TornManifest, match=stale):
        ms.join(new_index, lambda r: mixed[r.key])
    # Old index, shards already new.
    with pytest.raises(ms.TornManifest):
        ms.join(old_index, lambda r: new.get(r.key))
    # A shard missing altogether.
    with pytest.raises(ms.TornManifest, match="missing"):
        ms.join(new_index, lambda r: None if r.key == "shard-2.gz" else new[r.key])
    # Digests that agree with corrupt bytes (a forged index) still fail to decompress or match.
    bad = new_index.model_copy(
        update={
            "shards": [
                r.model_copy(update={"size": 3, "sha256": hashlib.sha256(b"bad").hexdigest()})
                for r in new_index.shards
            ]
        }
    )
    with pytest.raises(ms.TornManifest):
        ms.join(bad, lambda r: b"bad")


def test_read_mounted_reads_an_index_with_shards_beside_it_or_a_plain_manifest(
    tmp_path: Path, ten_k: AdapterManifest
) -> None:
    index, chunks = _stored(ten_k)
    for key, data in chunks.items():
        (tmp_path / key).write_bytes(data)
    (tmp_path / "manifest.json").write_text(index.model_dump_json(by_alias=True))
    digest, read = ms.read_mounted(tmp_path / "manifest.json")
    assert read == ten_k and len(digest) == 64
    small = big_manifest(3)
    plain = tmp_path / "plain.json"
    plain.write_text(small.model_dump_json(by_alias=True))
    assert ms.read_mounted(plain)[1] == small
    (tmp_path / "shard-0.gz").unlink()
    with pytest.raises(ms.TornManifest):
        ms.read_mounted(tmp_path / "manifest.json")


def test_too_large_even_compressed_names_the_bound() -> None:
    with pytest.raises(ms.ManifestTooLarge, match="2 shards of 4096 bytes"):
        ms.split(big_manifest(500), shard_name, shard_bytes=4096, max_shards=2)


@pytest.mark.parametrize("key", ["../token", "shard-0.gz/../../x", "manifest.json", "shard-a.gz"])
def test_a_shard_key_outside_the_pattern_is_refused(key: str) -> None:
    with pytest.raises(ValidationError):
        ms.ShardRef(name="x", key=key, size=0, sha256="0" * 64)


def test_from_configmaps_refuses_bad_base64(ten_k: AdapterManifest) -> None:
    *shards, index = build_manifest_configmaps(OWNER, big_manifest(5))
    shards[0]["binaryData"]["shard-0.gz"] = "!!" + base64.b64encode(b"x").decode()
    with pytest.raises(ms.TornManifest):
        ms.from_configmaps(index, {o["metadata"]["name"]: o for o in shards})


def test_a_push_validates_only_the_adapters_that_changed() -> None:
    """`validate_against` keeps the held entry for an adapter whose JSON is what it dumps as
    (a push of 10,000 with one new validated all 10,000 on the hot add's path) and gives the
    same manifest as a full validation, refusals included."""
    held = big_manifest(300, generation=1)
    doc = json.loads(ms.manifest_bytes(big_manifest(301, generation=2)))
    doc["adapters"][7]["rank"] = 8  # changed
    del doc["adapters"][9]["pinned"]  # same content, written without a default
    got = validate_against(doc, held)
    assert got == AdapterManifest.model_validate(doc)
    same = [i for i, a in enumerate(got.adapters[:300]) if a is held.adapters[i]]
    assert same == [i for i in range(300) if i not in (7, 9)]
    assert got.adapters[7].rank == 8 and got.adapters[300].name == "customer-00300"
    bad = json.loads(json.dumps(doc))
    bad["adapters"][3]["colour"] = "red"  # an unknown key is refused, not passed through
    bad["adapters"][5]["name"] = bad["adapters"][4]["name"]  # and names stay unique
    with pytest.raises(ValidationError) as caught:
        validate_against(bad, held)
    text = str(caught.value)
    assert "adapters.3.colour" in text and "adapter names must be unique" not in text
    bad["adapters"][3].pop("colour")
    with pytest.raises(ValidationError, match="adapter names must be unique"):
        validate_against(bad, held)
