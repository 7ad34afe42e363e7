"""Which of a BaseModel's adapters are accepted, and the manifest that carries them to pods.

Pure functions: the handlers gather the objects, these decide. Every refusal has a machine
reason (the `Accepted` condition's reason) and a message that names the field and the fix.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from loraplex.api.basemodel import BaseModelSpec
from loraplex.api.loraadapter import LoRAAdapterSpec
from loraplex.errors import InvalidSpec
from loraplex.validation import parse_spec
from loraplex_server.manifest import (
    DEFAULT_CACHE_BYTES,
    AdapterChecks,
    AdapterLimits,
    AdapterManifest,
    ManifestAdapter,
)
from loraplex_server.source_uri import parse_source_uri, sha256_problem

_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
_FACTORS: dict[str | None, int] = {
    None: 1,
    **{s: 1024 ** (i + 1) for i, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))},
    **{s: 1000 ** (i + 1) for i, s in enumerate(("k", "M", "G", "T", "P", "E"))},
}
CACHE_SHARE = Decimal("0.9")  # of the cache volume's sizeLimit: headroom for temp files


@dataclass(frozen=True)
class Verdict:
    """Whether an adapter is accepted onto its base, and if not, why."""

    accepted: bool
    reason: str
    message: str


ACCEPTED = Verdict(True, "Accepted", "The adapter is valid and is in its BaseModel's manifest.")


@dataclass(frozen=True)
class Candidate:
    """A LoRAAdapter object reduced to what the decisions need."""

    name: str
    uid: str
    created: str
    spec: LoRAAdapterSpec | None
    error: Verdict | None
    # The adapter's manifest entry, built (and so validated) once when it is read.
    entry: ManifestAdapter | None = None

    @property
    def served_name(self) -> str:
        assert self.spec is not None
        return self.spec.served_name or self.name


def read_candidate(obj: Mapping[str, Any]) -> Candidate:
    """Parse one LoRAAdapter; a spec that does not parse becomes a refusal, not an exception."""
    meta = obj.get("metadata", {})
    name = str(meta.get("name", ""))
    base = Candidate(
        name, str(meta.get("uid", "")), str(meta.get("creationTimestamp", "")), None, None
    )
    try:
        spec = parse_spec(LoRAAdapterSpec, obj.get("spec"))
    except InvalidSpec as exc:
        reason = "InvalidSource" if exc.field == "spec.source" else "InvalidSpec"
        return Candidate(base.name, base.uid, base.created, None, Verdict(False, reason, str(exc)))
    try:
        entry = ManifestAdapter(
            name=name,
            served_name=spec.served_name or name,
            source=spec.source,
            revision=spec.revision,
            sha256=spec.sha256,
            pinned=spec.pinned,
            uid=base.uid,
            rank=spec.rank,
        )
    except ValueError as exc:
        msg = str(exc).split("\n")[-1].strip() if "\n" in str(exc) else str(exc)
        return Candidate(
            name,
            base.uid,
            base.created,
            None,
            Verdict(False, "InvalidSpec", f"metadata.name/spec.servedName: {msg}"),
        )
    return Candidate(name, base.uid, base.created, spec, None, entry)


def judge(
    base_name: str, base: BaseModelSpec, candidates: Sequence[Candidate]
) -> dict[str, Verdict]:
    """Decide acceptance for every adapter of one base (before the memory plan).

    servedName conflicts go to the oldest adapter (then by name), so adding a clashing adapter
    never takes a name away from one that is already serving.
    """
    verdicts: dict[str, Verdict] = {}
    claims = {v.claim_name for v in base.adapter_volumes}
    base_served = base.model.served_name or base_name
    owners: dict[str, str] = {}
    for cand in sorted(candidates, key=lambda c: (c.created, c.name)):
        if cand.error is not None or cand.spec is None:
            verdicts[cand.name] = cand.error or Verdict(False, "InvalidSpec", "spec is missing")
            continue
        src = parse_source_uri(cand.spec.source)
        if (refused := source_verdict(base_name, base, cand.spec)) is not None:
            verdicts[cand.name] = refused
            continue
        if src.scheme == "pvc" and src.authority not in claims:
            verdicts[cand.name] = Verdict(
                False,
                "InvalidSource",
                f"spec.source: claim {src.authority!r} is not in BaseModel {base_name!r} "
                f"spec.adapterVolumes ({', '.join(sorted(claims)) or 'none'}); add "
                f"`- claimName: {src.authority}` there",
            )
            continue
        served = cand.served_name
        if served == base_served:
            verdicts[cand.name] = Verdict(
                False,
                "NameConflict",
                f"spec.servedName: {served!r} is the base model's served name; choose another",
            )
            continue
        if served in owners:
            verdicts[cand.name] = Verdict(
                False,
                "NameConflict",
                f"spec.servedName: {served!r} is already served by LoRAAdapter "
                f"{owners[served]!r} on this base; choose a unique servedName",
            )
            continue
        owners[served] = cand.name
        verdicts[cand.name] = ACCEPTED
    return verdicts


def parse_quantity(value: str) -> int | None:
    """Bytes of a Kubernetes quantity such as 20Gi or 500M; None when it is not one."""
    m = _QUANTITY.fullmatch(value.strip())
    if m is None:
        return None
    try:
        return int(Decimal(m.group(1)) * _FACTORS[m.group(2)])
    except InvalidOperation:
        return None


def manifest_limits(spec: BaseModelSpec) -> AdapterLimits:
    """spec.adapterLimits with every default filled in, as pods read it from the manifest."""
    lim = spec.adapter_limits
    cache = parse_quantity(lim.cache_size) if lim.cache_size else None
    if cache is None:
        volume = parse_quantity(spec.adapter_cache.size_limit)
        cache = int(volume * CACHE_SHARE) if volume else DEFAULT_CACHE_BYTES
    given: dict[str, Any] = {
        "max_adapter_bytes": parse_quantity(lim.max_adapter_size) if lim.max_adapter_size else None,
        "max_adapter_files": lim.max_adapter_files,
        "max_concurrent_downloads": lim.max_concurrent_downloads,
        "download_timeout_seconds": lim.download_timeout_seconds,
    }
    return AdapterLimits(
        cache_bytes=max(1, cache),
        plain_http_hosts=lim.plain_http_hosts,
        private_networks=lim.private_networks,
        **{k: v for k, v in given.items() if v is not None},
    )


def source_verdict(base_name: str, base: BaseModelSpec, spec: LoRAAdapterSpec) -> Verdict | None:
    """Refusals a pod would make anyway, given early with the field to change."""
    src = parse_source_uri(spec.source)
    if src.scheme == "http":
        host = src.authority.split(":", 1)[0]
        allowed = base.adapter_limits.plain_http_hosts
        if src.authority not in allowed and host not in allowed:
            return Verdict(
                False,
                "SourceNotAllowed",
                f"spec.source: plain http:// is refused; use https://, or add {host!r} to "
                f"BaseModel {base_name!r} spec.adapterLimits.plainHttpHosts",
            )
    if spec.sha256 is not None and (problem := sha256_problem(src)) is not None:
        return Verdict(False, "InvalidSource", problem)
    return None


def rank_verdict(name: str, rank: int | None, max_rank: int) -> Verdict:
    return Verdict(
        False,
        "RankExceedsMax",
        f"spec.rank: {rank} is above the BaseModel's maxLoraRank {max_rank}; raise "
        "spec.lora.maxLoraRank on the BaseModel (or set it to auto), or use a lower-rank adapter",
    )


def build_manifest(
    *,
    generation: int,
    base_served_name: str,
    base_model: str,
    max_loras: int,
    max_lora_rank: int,
    max_cpu_loras: int,
    accepted: Iterable[Candidate],
    limits: AdapterLimits | None = None,
    base_modules: dict[str, tuple[int, int]] | None = None,
    checks: AdapterChecks | None = None,
) -> AdapterManifest:
    """The manifest for the accepted adapters, sorted by name so equal inputs give equal JSON."""
    adapters = [cand.entry for cand in sorted(accepted, key=lambda c: c.name) if cand.entry]
    return AdapterManifest(
        generation=generation,
        base_served_name=base_served_name,
        base_model=base_model,
        max_loras=max_loras,
        max_lora_rank=max_lora_rank,
        max_cpu_loras=max_cpu_loras,
        limits=limits or AdapterLimits(),
        adapters=adapters,
        base_modules=base_modules,
        checks=checks or AdapterChecks(),
    )


def same_content(a: AdapterManifest, b: AdapterManifest | None) -> bool:
    """Whether two manifests differ in anything but their generation."""
    if b is None:
        return False
    return a.model_copy(update={"generation": 0}) == b.model_copy(update={"generation": 0})
