"""docs/troubleshooting.md has an entry for every status reason the code can write, and the
Argo CD health checks treat every failure reason as Degraded.

Matrix:
- reasons: the conditions' reasons named in DESIGN (BaseModel and LoRAAdapter), the operator's
  pod-failure reasons (`loraplex_server.errors.FAILURE_REASONS`, copied by the operator) and
  the adapter-server's reason constants (`loraplex_server.errors`)
  x "has a `### \\`Reason\\`` heading";
- every failure reason x "is in the LoRAAdapter Lua check's failure list";
- the doc's links to sibling docs resolve.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "troubleshooting.md"

BASEMODEL_REASONS = {
    "InsufficientGPUMemory",
    "InvalidSpec",
    "DeploymentProgressing",
    "DeploymentUnavailable",
    "ArchitectureUnknown",
    "ScaledToZero",
    "DownloadingWeights",
    "WeightsDownloadFailed",
    "ProgressDeadlineExceeded",
}
ADAPTER_REASONS = {
    "NoEffect",
    "AwaitingProof",
    "BaseModelMismatch",
    "BaseModelNotFound",
    "RankExceedsMax",
    "InvalidSource",
    "NameConflict",
    "IncompatibleBaseModel",
    "UnsupportedAdapter",
    "DownloadFailed",
    "ChecksumMismatch",
    "LoadFailed",
    "Loading",
    "Downloading",
    "NoReadyReplicas",
    "ManifestPending",
}


def code_failure_reasons() -> set[str]:
    from loraplex import status

    return set(status.FAILURE_REASONS)


def server_reasons() -> set[str]:
    from loraplex_server import errors

    return {
        value
        for name, value in vars(errors).items()
        if name.isupper() and isinstance(value, str) and re.fullmatch(r"[A-Z][A-Za-z]+", value)
    }


def headings() -> set[str]:
    return set(re.findall(r"^### `(\w+)`", DOC.read_text(), flags=re.M))


@pytest.mark.parametrize("reason", sorted(BASEMODEL_REASONS | ADAPTER_REASONS))
def test_reason_has_an_entry(reason: str) -> None:
    assert reason in headings()


def test_every_reason_the_code_writes_is_documented() -> None:
    written = code_failure_reasons() | server_reasons()
    assert written - headings() == set()


def test_lua_degrades_on_every_failure_reason() -> None:
    lua = (REPO / "docs" / "argocd" / "loraadapter-health.lua").read_text()
    listed = set(re.findall(r"^\s+(\w+) = true,", lua, flags=re.M))
    assert code_failure_reasons() | {"BaseModelNotFound", "NameConflict"} <= listed


def test_links_resolve() -> None:
    for target in re.findall(r"\]\(([\w./-]+\.md)\)", DOC.read_text()):
        assert (DOC.parent / target).is_file(), target
