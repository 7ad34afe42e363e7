"""spec.adapterLimits: from the BaseModel to the manifest the pods read, and early refusals.

Matrix: quantities (binary, decimal, fractional, junk); manifest_limits defaults (cache budget
90% of the emptyDir sizeLimit, server defaults elsewhere) and overrides; bad hosts, CIDRs and
quantities refused by the model with the field named; judge() refuses plain http unless the
host is listed (SourceNotAllowed) and sha256 on folder URLs, s3:// and hf:// (InvalidSource);
a LoRAAdapter status copies every new pod reason; the CRD schema carries the group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from pydantic import ValidationError

from loraplex.adapters import judge, manifest_limits, parse_quantity, read_candidate
from loraplex.api.basemodel import BaseModelSpec
from loraplex.api.loraadapter import LoRAAdapterStatus
from loraplex.status import PodView, adapter_status
from loraplex_server import errors
from loraplex_server.manifest import (
    DEFAULT_MAX_ADAPTER_BYTES,
    AdapterManifest,
    AdapterReport,
    AdapterState,
)

GiB = 1 << 30


def base(**spec: Any) -> BaseModelSpec:
    return BaseModelSpec.model_validate({"model": {"source": "hf://org/base"}, **spec})


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("20Gi", 20 * GiB),
        ("512Mi", 512 << 20),
        ("1.5Gi", 3 * GiB // 2),
        ("2G", 2_000_000_000),
        ("1000", 1000),
        ("20 GB", None),
        ("-1Gi", None),
        ("", None),
    ],
)
def test_parse_quantity(text: str, value: int | None) -> None:
    assert parse_quantity(text) == value


def test_defaults_follow_the_cache_volume() -> None:
    lim = manifest_limits(base())
    assert lim.cache_bytes == int(20 * GiB * 0.9)  # 90% of the default 20Gi sizeLimit
    assert lim.max_adapter_bytes == DEFAULT_MAX_ADAPTER_BYTES
    assert lim.plain_http_hosts == [] and lim.private_networks == []
    assert manifest_limits(base(adapterCache={"sizeLimit": "10Gi"})).cache_bytes == 9 * GiB


def test_overrides_reach_the_manifest_json() -> None:
    spec = base(
        adapterLimits={
            "maxAdapterSize": "4Gi",
            "maxAdapterFiles": 50,
            "cacheSize": "100Gi",
            "maxConcurrentDownloads": 2,
            "downloadTimeoutSeconds": 60,
            "plainHttpHosts": ["Mirror.NS.svc:8080"],
            "privateNetworks": ["10.0.12.7/24"],
        }
    )
    lim = manifest_limits(spec)
    doc = AdapterManifest(
        generation=1,
        base_served_name="b",
        max_loras=1,
        max_lora_rank=8,
        max_cpu_loras=1,
        limits=lim,
    ).model_dump(by_alias=True, mode="json")
    assert doc["limits"] == {
        "maxAdapterBytes": 4 * GiB,
        "maxAdapterFiles": 50,
        "cacheBytes": 100 * GiB,
        "maxConcurrentDownloads": 2,
        "downloadTimeoutSeconds": 60,
        "plainHttpHosts": ["mirror.ns.svc:8080"],
        "privateNetworks": ["10.0.12.0/24"],
    }


@pytest.mark.parametrize(
    ("limits", "field"),
    [
        ({"maxAdapterSize": "lots"}, "maxAdapterSize"),
        ({"maxAdapterFiles": 1}, "maxAdapterFiles"),
        ({"plainHttpHosts": ["http://x"]}, "plainHttpHosts"),
        ({"privateNetworks": ["10.0.0.0/33"]}, "privateNetworks"),
        ({"maxConcurrentDownloads": 0}, "maxConcurrentDownloads"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_bad_limits_are_refused(limits: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        base(adapterLimits=limits)


@dataclass(frozen=True)
class SourceCase:
    id: str
    spec: dict[str, Any]
    reason: str
    limits: dict[str, Any] | None = None


SOURCE_CASES = [
    SourceCase("https", {"source": "https://files.example/a.tar.gz"}, "Accepted"),
    SourceCase("http-refused", {"source": "http://mirror.example/a.tar.gz"}, "SourceNotAllowed"),
    SourceCase(
        "http-listed",
        {"source": "http://mirror.example/a.tar.gz"},
        "Accepted",
        {"plainHttpHosts": ["mirror.example"]},
    ),
    SourceCase(
        "sha-archive",
        {"source": "https://files.example/a.tgz", "sha256": "a" * 64},
        "Accepted",
    ),
    SourceCase(
        "sha-folder", {"source": "https://files.example/a/", "sha256": "a" * 64}, "InvalidSource"
    ),
    SourceCase("sha-s3", {"source": "s3://bucket/a", "sha256": "a" * 64}, "InvalidSource"),
    SourceCase("sha-hf", {"source": "hf://org/a", "sha256": "a" * 64}, "InvalidSource"),
]


@pytest.mark.parametrize("case", SOURCE_CASES, ids=[c.id for c in SOURCE_CASES])
def test_judge_refuses_sources_a_pod_would_refuse(case: SourceCase) -> None:
    obj = {
        "metadata": {"name": "a", "uid": "u", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"baseModel": "b", **case.spec},
    }
    spec = base(adapterLimits=case.limits or {})
    verdict = judge("b", spec, [read_candidate(obj)])["a"]
    assert verdict.reason == case.reason, verdict.message
    if case.reason == "SourceNotAllowed":
        assert "spec.adapterLimits.plainHttpHosts" in verdict.message


@pytest.mark.parametrize(
    "reason",
    [
        errors.ADAPTER_TOO_LARGE,
        errors.CACHE_FULL,
        errors.SOURCE_NOT_ALLOWED,
        errors.DOWNLOAD_TIMEOUT,
    ],
)
def test_new_pod_reasons_reach_the_lora_adapter_status(reason: str) -> None:
    from loraplex.adapters import ACCEPTED

    report = AdapterReport(
        name="a", served_name="a", state=AdapterState.FAILED, reason=reason, message="m"
    )
    st = adapter_status(
        LoRAAdapterStatus(),
        1,
        ACCEPTED,
        served_name="a",
        pods=[PodView("p", report, True)],
    )
    ready = next(c for c in st.conditions if c.type == "Ready")
    assert (ready.status, ready.reason) == ("False", reason)


def test_crd_has_the_limits_group() -> None:
    from pathlib import Path

    import yaml

    repo = Path(__file__).resolve().parents[2]
    crd = yaml.safe_load((repo / "crds" / "loraplex.io_basemodels.yaml").read_text())
    props = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    group = props["properties"]["adapterLimits"]["properties"]
    assert set(group) == {
        "maxAdapterSize",
        "maxAdapterFiles",
        "cacheSize",
        "maxConcurrentDownloads",
        "downloadTimeoutSeconds",
        "plainHttpHosts",
        "privateNetworks",
    }


def test_an_adapter_removed_from_the_cache_still_counts_as_ready() -> None:
    from loraplex.adapters import ACCEPTED

    report = AdapterReport(name="a", served_name="a", state=AdapterState.UNCACHED)
    st = adapter_status(
        LoRAAdapterStatus(), 1, ACCEPTED, served_name="a", pods=[PodView("p", report, True)]
    )
    assert st.phase == "Ready"
