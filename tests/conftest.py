"""Fixtures shared by every test tier.

Models and adapters are generated once per session into a temp dir (no weights are
committed). Tests never reach the internet: the Hub is switched to offline mode here, before
anything imports huggingface_hub.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
