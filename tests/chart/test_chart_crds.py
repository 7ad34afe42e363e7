"""The chart ships exactly the CRDs `make crds` generates into the repo's crds/.

Matrix: both BaseModel and LoRAAdapter files present in both dirs; the two dirs hold the
same file names; each pair is byte-identical; each is a v1 CRD of group loraplex.io.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from .conftest import CHART, REPO

pytestmark = pytest.mark.chart

TOP = REPO / "crds"
IN_CHART = CHART / "crds"
EXPECTED = {"loraplex.io_basemodels.yaml", "loraplex.io_loraadapters.yaml"}
HOW_TO_FIX = "run `make crds` (it writes both crds/ and charts/loraplex/crds/)"


def names(directory: Path) -> set[str]:
    return {p.name for p in directory.glob("*.yaml")} if directory.is_dir() else set()


def test_same_files_in_both_dirs() -> None:
    assert names(TOP) >= EXPECTED, f"crds/ is missing {EXPECTED - names(TOP)}; {HOW_TO_FIX}"
    assert names(IN_CHART) == names(TOP), HOW_TO_FIX


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_chart_crd_is_byte_identical(name: str) -> None:
    chart_file = IN_CHART / name
    assert chart_file.is_file(), f"{chart_file} is missing; {HOW_TO_FIX}"
    assert chart_file.read_bytes() == (TOP / name).read_bytes(), f"{name} drifted; {HOW_TO_FIX}"
    crd = yaml.safe_load(chart_file.read_text())
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["spec"]["group"] == "loraplex.io"
