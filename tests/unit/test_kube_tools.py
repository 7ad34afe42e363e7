"""tools/kube pins one Kubernetes release consistently.

Matrix: every staging module is replaced by the `v0.<minor>.<patch>` matching the
`k8s.io/kubernetes` requirement, and (when the release's go.mod is in the Go module cache) the
replaced set is exactly the release's staging list; the release is one kubectl in the venv
supports (one minor either side) and one kubernetes-validate has schemas for.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from kubernetes_validate import utils as kubernetes_validate_utils

from tests.support.apiserver import GO_MOD, kube_version

REPLACE = re.compile(r"^\s*(k8s\.io/[\w.-]+) => (k8s\.io/[\w.-]+) (v\S+)\s*$", re.M)


def replaces() -> dict[str, str]:
    out = {}
    for src, dst, version in REPLACE.findall(GO_MOD.read_text()):
        assert src == dst, f"{src} replaced by another module {dst}"
        out[src] = version
    return out


def test_staging_modules_follow_the_release() -> None:
    version = kube_version()
    staging = "v0." + version.removeprefix("v1.")
    found = replaces()
    assert len(found) >= 25, "the staging replace block is missing"
    assert {v for v in found.values()} == {staging}
    for module in ("k8s.io/api", "k8s.io/apiserver", "k8s.io/client-go", "k8s.io/kubectl"):
        assert module in found


def test_replaces_are_exactly_the_release_staging_list() -> None:
    upstream = (
        Path.home() / "go/pkg/mod/cache/download/k8s.io/kubernetes/@v" / f"{kube_version()}.mod"
    )
    if not upstream.is_file():
        pytest.skip(f"{upstream} not in the Go module cache (make kube-bins fetches it)")
    staging = set(re.findall(r"^\s*(k8s\.io/[\w.-]+) => \./staging/", upstream.read_text(), re.M))
    assert set(replaces()) == staging


def test_release_fits_kubectl_and_the_schemas() -> None:
    minor = int(kube_version().split(".")[1])
    kubectl = Path(sys.executable).parent / "kubectl"
    out = subprocess.run(
        [str(kubectl), "version", "--client", "-o", "json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    kubectl_minor = int(re.search(r'"minor":\s*"(\d+)', out).group(1))  # type: ignore[union-attr]
    assert abs(kubectl_minor - minor) <= 1, "kubectl supports one minor version either side"
    assert f"1.{minor}.0" in kubernetes_validate_utils.all_versions()
