"""Fixtures shared by every test tier.

Models and adapters are generated once per session into a temp dir (no weights are
committed). Tests never reach the internet: the Hub is switched to offline mode here, before
anything imports huggingface_hub.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.support.apiserver import ControlPlane

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")

# name -> seed; distinct seeds give adapters whose greedy outputs differ from each other.
TINY_ADAPTER_SEEDS = {f"ad{i}": 100 + i for i in range(8)}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Llama-style model (head_dim 64, so CPU vLLM serves it) with its tokenizer."""
    from loraplex.devtools.tinymodel import make_model

    return make_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_adapters(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Eight rank-8 PEFT adapters for `tiny_model`, laid out as a PVC claim `adapters/<name>`.

    The parent of the claim folder works as a `--pvc-root`: `pvc://adapters/ad0` etc.
    """
    from loraplex.devtools.tinymodel import make_adapter

    claim = tmp_path_factory.mktemp("pvc") / "adapters"
    return {
        name: make_adapter(tiny_model, claim / name, seed=seed)
        for name, seed in TINY_ADAPTER_SEEDS.items()
    }


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--kube",
        choices=("auto", "real", "emulator"),
        default="auto",
        help="Kubernetes API for the operator tier: a real kube-apiserver built by `make "
        "kube-bins` (real), the kmock emulator (emulator), or real when built (auto)",
    )


@pytest.fixture(scope="session")
def kube_backend(request: pytest.FixtureRequest) -> str:
    """'real' or 'emulator': which Kubernetes API the operator tier runs against."""
    from tests.support.apiserver import binaries_built, binaries_dir

    choice = str(request.config.getoption("--kube"))
    if choice == "auto":
        return "real" if binaries_built() else "emulator"
    if choice == "real" and not binaries_built():
        pytest.fail(f"--kube=real but no Kubernetes binaries in {binaries_dir()}: make kube-bins")
    return choice


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """One real control plane per session (etcd, kube-apiserver, kube-controller-manager,
    kube-scheduler) with our CRDs and the chart's RBAC installed; tests reset namespaces."""
    from tests.support.apiserver import binaries_built, binaries_dir, control_plane

    if not binaries_built():
        pytest.fail(f"no Kubernetes binaries in {binaries_dir()}: run `make kube-bins`")
    with control_plane(tmp_path_factory.mktemp("kube"), with_scheduler=True) as cp:
        yield cp
