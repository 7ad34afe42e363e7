"""The adapter manifest: the one document the operator writes and every pod's server reads.

It is defined here, in the server package, and imported by the operator, so the two sides can
never disagree about its shape. The JSON form uses camelCase keys like the Kubernetes objects
it is derived from; Python code uses snake_case attributes.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from loraplex_server.source_uri import checked_source

# vLLM accepts only these values for --max-lora-rank (vllm/config/lora.py).
ALLOWED_MAX_LORA_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)

# A Kubernetes object name (DNS-1123 subdomain, but without dots so it is also a safe single
# path component in the adapter cache).
ADAPTER_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
# What clients may send as OpenAI `model`: no slashes, no "..", printable and short.
SERVED_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
SHA256_RE = re.compile(r"^[a-f0-9]{64}$")
_HOST_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?(:[0-9]{1,5})?$")

GiB = 1024**3
# Defaults of every bound on what an adapter source can make a pod take. The BaseModel's
# spec.adapterLimits overrides them (same names); docs/security.md lists them.
DEFAULT_MAX_ADAPTER_BYTES = 2 * GiB
DEFAULT_MAX_ADAPTER_FILES = 1000
DEFAULT_CACHE_BYTES = 18 * GiB  # 90% of the default 20Gi emptyDir sizeLimit
DEFAULT_MAX_CONCURRENT_DOWNLOADS = 4
DEFAULT_DOWNLOAD_TIMEOUT_SECONDS = 900


class _Wire(BaseModel):
    """camelCase on the wire, snake_case in Python, and unknown keys refused."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


def check_served_name(value: str) -> str:
    """Served names become OpenAI model ids and cache file names, so they must be plain."""
    if not SERVED_NAME_RE.fullmatch(value) or ".." in value:
        raise ValueError(
            f"servedName {value!r} is not allowed: use 1-128 letters, digits, '.', '_', ':' or "
            "'-', starting with a letter or digit, with no '..' and no '/'"
        )
    return value


class AdapterLimits(_Wire):
    """What one adapter source may make a pod take, and which origins it may reach.

    Carried in the manifest (not in server flags) so a BaseModel can change a limit without
    a rollout; the BaseModel's spec.adapterLimits fills it.
    """

    max_adapter_bytes: int = Field(default=DEFAULT_MAX_ADAPTER_BYTES, ge=1)
    max_adapter_files: int = Field(default=DEFAULT_MAX_ADAPTER_FILES, ge=2)
    cache_bytes: int = Field(default=DEFAULT_CACHE_BYTES, ge=1)
    max_concurrent_downloads: int = Field(default=DEFAULT_MAX_CONCURRENT_DOWNLOADS, ge=1)
    download_timeout_seconds: float = Field(default=DEFAULT_DOWNLOAD_TIMEOUT_SECONDS, gt=0)
    plain_http_hosts: list[str] = Field(default_factory=list)
    private_networks: list[str] = Field(default_factory=list)

    @field_validator("plain_http_hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        return [check_host(h) for h in value]

    @field_validator("private_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        return [check_network(n) for n in value]


def check_host(value: str) -> str:
    """A host name or IP, optionally with a port, as it appears in a URL's authority."""
    if not _HOST_RE.fullmatch(value.lower()):
        raise ValueError(f"{value!r} is not a host name (like files.example.com or 10.0.0.5:8080)")
    return value.lower()


def check_network(value: str) -> str:
    """A CIDR such as 10.1.2.0/24 or fd00::/8."""
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a CIDR (like 10.1.2.0/24)") from exc


class ManifestAdapter(_Wire):
    """One declared adapter as a pod should serve it."""

    name: str = Field(description="LoRAAdapter metadata.name; also the adapter's cache folder.")
    served_name: str = Field(description="The OpenAI `model` value that selects this adapter.")
    source: str = Field(description="hf://, s3://, https://, or pvc://claim/path.")
    revision: str | None = None
    sha256: str | None = None
    pinned: bool = False
    uid: str = ""
    rank: int | None = Field(default=None, ge=1, description="Rank declared in the spec.")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not ADAPTER_NAME_RE.fullmatch(value):
            raise ValueError(
                f"adapter name {value!r} must be a DNS-1123 label (lowercase letters, digits, '-')"
            )
        return value

    @field_validator("served_name")
    @classmethod
    def _served_name(cls, value: str) -> str:
        return check_served_name(value)

    @field_validator("sha256")
    @classmethod
    def _sha256(cls, value: str | None) -> str | None:
        if value is not None and not SHA256_RE.fullmatch(value):
            raise ValueError("sha256 must be 64 lowercase hex characters")
        return value

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        return checked_source(value)


class AdapterChecks(_Wire):
    """How strictly a pod proves an adapter before calling it ready (BaseModel spec.adapterChecks).

    An adapter whose module names do not match the base loads in vLLM without error and then
    silently serves the base model's output (vLLM issue 34186); so does an untrained adapter
    whose B matrices are zero. Checking names and shapes before the load, and probing the
    output after it, turns both into a failed adapter with a reason instead of a wrong answer.
    """

    strict_base_model: bool = Field(
        default=False,
        description="Refuse an adapter whose base_model_name_or_path names another model "
        "(default: a warning).",
    )
    probe: bool = Field(default=True, description="Probe every new adapter digest after load.")
    no_effect: Literal["Refuse", "Allow"] = Field(
        default="Refuse", description="What to do with an adapter that does not change outputs."
    )
    probe_tolerance: float = Field(
        default=1e-3,
        ge=0,
        le=1,
        description="Largest top-logprob difference from the base still counted as no effect.",
    )


class AdapterManifest(_Wire):
    """Everything a pod needs to know to serve its adapters; newer generations win."""

    generation: int = Field(ge=0, description="Monotonic; a pod ignores older manifests.")
    base_served_name: str = Field(description="The served name of the base model.")
    base_model: str = Field(default="", description="The base model source, for base checks.")
    max_loras: int = Field(ge=1, description="GPU slots: adapters loaded at once.")
    max_lora_rank: int = Field(description="The largest rank vLLM was started with.")
    max_cpu_loras: int = Field(ge=1)
    limits: AdapterLimits = Field(default_factory=AdapterLimits)
    adapters: list[ManifestAdapter] = Field(default_factory=list)
    base_modules: dict[str, tuple[int, int]] | None = Field(
        default=None,
        description="The base model's LoRA-capable modules, name -> (in, out) features, "
        "unsharded; null when the operator does not know the model's shape.",
    )
    checks: AdapterChecks = Field(default_factory=AdapterChecks)

    @field_validator("max_lora_rank")
    @classmethod
    def _rank(cls, value: int) -> int:
        if value not in ALLOWED_MAX_LORA_RANKS:
            raise ValueError(f"maxLoraRank must be one of {list(ALLOWED_MAX_LORA_RANKS)}")
        return value

    @field_validator("base_served_name")
    @classmethod
    def _base_name(cls, value: str) -> str:
        return check_served_name(value)

    @model_validator(mode="after")
    def _unique(self) -> AdapterManifest:
        names = [a.name for a in self.adapters]
        served = [a.served_name for a in self.adapters] + [self.base_served_name]
        if len(set(names)) != len(names):
            raise ValueError("adapter names must be unique")
        if len(set(served)) != len(served):
            raise ValueError("servedName values must be unique and differ from the base's")
        if self.max_cpu_loras < self.max_loras:
            raise ValueError("maxCpuLoras must be >= maxLoras")
        return self


def validate_against(doc: Any, current: AdapterManifest) -> AdapterManifest:
    """`AdapterManifest.model_validate(doc)`, keeping `current`'s entry (validated, frozen) for
    each adapter whose JSON is exactly what that entry dumps as.

    Why: a push of 10,000 adapters with one new one validated all 10,000 again, 0.13 s of the
    pod's event loop on the hot add's path; a dump and a dict comparison are a seventh of
    that and hold no extra memory. Anything that differs in any way (a changed field, an
    omitted default, an unknown key) is validated as before, so the result is the same."""
    if not isinstance(doc, dict) or not isinstance(doc.get("adapters"), list):
        return AdapterManifest.model_validate(doc)
    held = {a.name: a for a in current.adapters}
    adapters: list[Any] = []
    for raw in doc["adapters"]:
        old = held.get(str(raw.get("name"))) if isinstance(raw, dict) else None
        same = old is not None and old.model_dump(by_alias=True, mode="json") == raw
        adapters.append(old if same else raw)
    return AdapterManifest.model_validate({**doc, "adapters": adapters})


class AdapterState(StrEnum):
    """Where one adapter is in its life on one pod."""

    DECLARED = "declared"
    DOWNLOADING = "downloading"
    CACHED = "cached"
    LOADING = "loading"
    LOADED = "loaded"
    EVICTED = "evicted"
    UNCACHED = "uncached"  # checked before, files removed to make room; fetched on demand
    FAILED = "failed"


class ProbeResult(_Wire):
    """One probe: the adapter's greedy top logprobs against the base's, on a fixed prompt."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True
    )

    digest: str
    proven_at: datetime
    seconds: float = Field(description="Wall time of the probe (two short requests).")
    max_logprob_delta: float | None = Field(
        default=None, description="Largest difference from the base; null: outputs diverged."
    )
    tolerance: float
    effect: bool = Field(description="Whether the adapter changed the output beyond tolerance.")


class AdapterReport(_Wire):
    """One adapter's state on one pod, as `GET /v1/adapters` returns it."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True
    )

    name: str
    served_name: str
    state: AdapterState
    pinned: bool = False
    rank: int | None = None
    target_modules: list[str] = Field(default_factory=list)
    size_bytes: int | None = None
    digest: str | None = None
    last_used: datetime | None = None
    load_seconds: float | None = None
    attempts: int = 0
    reason: str | None = Field(default=None, description="Machine reason when failed.")
    message: str | None = Field(default=None, description="Human message when failed.")
    warnings: list[str] = Field(
        default_factory=list, description="Accepted, but worth a look (e.g. another base)."
    )
    proof: ProbeResult | None = Field(
        default=None, description="This pod's probe of the current files, when done."
    )


class AdaptersResponse(_Wire):
    """The body of `GET /v1/adapters`: what one pod holds, and for which manifest."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True
    )

    generation: int
    base_served_name: str
    vllm_healthy: bool
    adapters: list[AdapterReport] = Field(default_factory=list)
    continue_: str | None = Field(
        default=None,
        alias="continue",
        description="Set when a `limit` cut the list: pass it as `?continue=` for the next page.",
    )
