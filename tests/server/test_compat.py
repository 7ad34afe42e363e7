"""Adapter vs base checks before load (issue 16.1): `compat.check_compat` via `verify_dir`.

| case | outcome |
|---|---|
| a PEFT adapter made for the tiny base | accepted |
| a target module the base lacks (config and weights) | IncompatibleBaseModel naming it |
| lora_A / lora_B with another model size's features | IncompatibleBaseModel with numbers |
| modules_to_save | UnsupportedAdapter |
| a header too large, not safetensors, no LoRA tensors | UnsupportedAdapter |
| base modules unknown (no shape) | not checked |
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from loraplex_server import errors
from loraplex_server.compat import MAX_HEADER_BYTES, check_compat
from loraplex_server.manifest import AdapterManifest, ManifestAdapter
from loraplex_server.verify import verify_dir

from .adapters_fixtures import base_modules_of, rewrite

SPEC = ManifestAdapter(name="a", served_name="a", source="pvc://c/a")


def manifest(base_modules: dict[str, tuple[int, int]] | None) -> AdapterManifest:
    return AdapterManifest(
        generation=1,
        base_served_name="tiny",
        max_loras=1,
        max_lora_rank=8,
        max_cpu_loras=1,
        base_modules=base_modules,
    )


@pytest.fixture
def modules(tiny_model: Path) -> dict[str, tuple[int, int]]:
    return base_modules_of(tiny_model)


def test_a_matching_adapter_passes(
    tiny_adapters: dict[str, Path], modules: dict[str, tuple[int, int]]
) -> None:
    assert set(modules) >= {"q_proj", "k_proj", "v_proj", "o_proj"}
    info = verify_dir(tiny_adapters["ad0"], SPEC, manifest(modules))
    assert info.target_modules == ["k_proj", "o_proj", "q_proj", "v_proj"]


def test_a_module_the_base_lacks_is_named(
    tiny_adapters: dict[str, Path], modules: dict[str, tuple[int, int]], tmp_path: Path
) -> None:
    bad = rewrite(tiny_adapters["ad0"], tmp_path / "bad", rename="query_key_value")
    with pytest.raises(errors.AdapterError) as exc:
        verify_dir(bad, SPEC, manifest(modules))
    assert exc.value.reason == errors.INCOMPATIBLE_BASE_MODEL
    assert "'query_key_value'" in exc.value.message and "q_proj" in exc.value.message
    # The weights alone give it away too, when the config uses a regex.
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["target_modules"] = ".*(query_key_value|k_proj|v_proj|o_proj)"
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(errors.AdapterError, match="weights target module 'query_key_value'"):
        verify_dir(bad, SPEC, manifest(modules))


def test_another_model_size_is_named(
    tiny_adapters: dict[str, Path], modules: dict[str, tuple[int, int]]
) -> None:
    bigger = {k: (i * 2, o) for k, (i, o) in modules.items()}
    with pytest.raises(errors.AdapterError) as exc:
        verify_dir(tiny_adapters["ad0"], SPEC, manifest(bigger))
    assert exc.value.reason == errors.INCOMPATIBLE_BASE_MODEL
    assert "input features" in exc.value.message
    wider = {k: (i, o * 2) for k, (i, o) in modules.items()}
    with pytest.raises(errors.AdapterError, match="output features"):
        verify_dir(tiny_adapters["ad0"], SPEC, manifest(wider))


def test_modules_to_save_is_unsupported(
    tiny_adapters: dict[str, Path], modules: dict[str, tuple[int, int]], tmp_path: Path
) -> None:
    copy = tmp_path / "a"
    shutil.copytree(tiny_adapters["ad0"], copy)
    cfg = json.loads((copy / "adapter_config.json").read_text())
    cfg["modules_to_save"] = ["lm_head"]
    (copy / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(errors.AdapterError) as exc:
        verify_dir(copy, SPEC, manifest(modules))
    assert exc.value.reason == errors.UNSUPPORTED_ADAPTER
    assert "modules_to_save" in exc.value.message


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}", "over the"),
        (struct.pack("<Q", 5) + b"notjs", "not a safetensors file"),
        (struct.pack("<Q", 2) + b"{}", "no LoRA tensors"),
        (b"abc", "truncated"),
    ],
    ids=["huge-header", "not-json", "no-lora-tensors", "truncated"],
)
def test_bad_weight_files_are_unsupported(
    payload: bytes, match: str, modules: dict[str, tuple[int, int]], tmp_path: Path
) -> None:
    (tmp_path / "adapter_model.safetensors").write_bytes(payload)
    with pytest.raises(errors.AdapterError, match=match) as exc:
        check_compat(tmp_path, {"r": 8, "target_modules": ["q_proj"]}, modules)
    assert exc.value.reason == errors.UNSUPPORTED_ADAPTER


def test_unknown_base_is_not_checked(tiny_adapters: dict[str, Path], tmp_path: Path) -> None:
    bad = rewrite(tiny_adapters["ad0"], tmp_path / "bad", rename="query_key_value")
    assert verify_dir(bad, SPEC, manifest(None)).rank == 8
