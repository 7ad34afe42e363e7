"""adapter_config.json checks and the cache digest.

Matrix: rank within/above maxLoraRank, declared rank mismatch, DoRA, bias, non-LoRA peft
types, base model match/mismatch/uncheckable, missing config or weights; digest equal for equal
files wherever they live, different when one byte changes.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from loraplex_server import errors
from loraplex_server.manifest import AdapterChecks, AdapterManifest, ManifestAdapter
from loraplex_server.verify import check_config, digest_dir, verify_dir

SPEC = ManifestAdapter(name="a", served_name="a", source="pvc://c/a")


def manifest(base_model: str = "") -> AdapterManifest:
    return AdapterManifest(
        generation=1,
        base_served_name="b",
        base_model=base_model,
        max_loras=1,
        max_lora_rank=8,
        max_cpu_loras=1,
    )


CASES: list[tuple[str, dict[str, Any], str, ManifestAdapter, str | None]] = [
    ("ok", {"r": 8, "target_modules": ["q_proj"]}, "", SPEC, None),
    ("rank-too-big", {"r": 16}, "", SPEC, errors.RANK_EXCEEDS_MAX),
    (
        "rank-declared-differs",
        {"r": 4},
        "",
        SPEC.model_copy(update={"rank": 8}),
        errors.RANK_MISMATCH,
    ),
    ("dora", {"r": 8, "use_dora": True}, "", SPEC, errors.UNSUPPORTED_ADAPTER),
    ("bias", {"r": 8, "bias": "all"}, "", SPEC, errors.UNSUPPORTED_ADAPTER),
    ("not-lora", {"r": 8, "peft_type": "IA3"}, "", SPEC, errors.UNSUPPORTED_ADAPTER),
    ("no-rank", {"target_modules": ["q_proj"]}, "", SPEC, errors.UNSUPPORTED_ADAPTER),
    (
        "base-matches",
        {"r": 8, "base_model_name_or_path": "Org/Model"},
        "hf://org/model",
        SPEC,
        None,
    ),
    (
        "base-differs-is-a-warning",
        {"r": 8, "base_model_name_or_path": "org/other"},
        "hf://org/model",
        SPEC,
        None,
    ),
    (
        "base-local-path-uncheckable",
        {"r": 8, "base_model_name_or_path": "/models/x"},
        "hf://org/model",
        SPEC,
        None,
    ),
    ("rank-pattern-ok", {"r": 8, "rank_pattern": {"q_proj": 4}}, "", SPEC, None),
    ("rank-pattern-too-big", {"r": 8, "rank_pattern": {"q_proj": 64}}, "", SPEC, "RankExceedsMax"),
    ("rank-pattern-not-int", {"r": 8, "rank_pattern": {"q": 2.5}}, "", SPEC, "RankExceedsMax"),
    ("rank-pattern-zero", {"r": 8, "rank_pattern": {"q": 0}}, "", SPEC, "UnsupportedAdapter"),
    ("rank-pattern-not-dict", {"r": 8, "rank_pattern": [8]}, "", SPEC, "UnsupportedAdapter"),
    ("alpha-pattern-ok", {"r": 8, "alpha_pattern": {"q": 32.0}}, "", SPEC, None),
    ("alpha-pattern-bad", {"r": 8, "alpha_pattern": {"q": "x"}}, "", SPEC, "UnsupportedAdapter"),
]


@pytest.mark.parametrize(
    ("cfg", "base", "spec", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_check_config(
    cfg: dict[str, Any], base: str, spec: ManifestAdapter, reason: str | None
) -> None:
    if reason is None:
        info = check_config(cfg, spec, manifest(base))
        assert info.rank == cfg["r"]
    else:
        with pytest.raises(errors.AdapterError) as exc:
            check_config(cfg, spec, manifest(base))
        assert exc.value.reason == reason


def test_base_mismatch_warns_unless_strict() -> None:
    cfg = {"r": 8, "base_model_name_or_path": "org/other"}
    info = check_config(cfg, SPEC, manifest("hf://org/model"))
    assert info.warnings and "BaseModelMismatch" in info.warnings[0]
    strict = manifest("hf://org/model").model_copy(
        update={"checks": AdapterChecks(strict_base_model=True)}
    )
    with pytest.raises(errors.AdapterError) as exc:
        check_config(cfg, SPEC, strict)
    assert exc.value.reason == errors.INCOMPATIBLE_BASE_MODEL
    assert "strictBaseModel" in exc.value.message


def test_missing_files_are_unsupported(tmp_path: Path) -> None:
    with pytest.raises(errors.AdapterError, match=r"adapter_config\.json is missing"):
        verify_dir(tmp_path, SPEC, manifest())
    (tmp_path / "adapter_config.json").write_text('{"r": 8}')
    with pytest.raises(errors.AdapterError, match="only safetensors adapters"):
        verify_dir(tmp_path, SPEC, manifest())
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(errors.AdapterError, match="not valid JSON"):
        verify_dir(tmp_path, SPEC, manifest())


def adapter_folder(root: Path, tiny_adapters: dict[str, Path]) -> Path:
    shutil.copytree(tiny_adapters["ad0"], root)
    return root


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ("adapter_model.bin", "pickled"),
        ("new_embeddings.bin", "pickled"),
        ("extra/weights.PT", "pickled"),
        ("training_args.pkl", "pickled"),
    ],
)
def test_pickled_files_are_refused(
    tmp_path: Path, tiny_adapters: dict[str, Path], extra: str, words: str
) -> None:
    root = adapter_folder(tmp_path / "a", tiny_adapters)
    assert verify_dir(root, SPEC, manifest()).rank == 8
    (root / extra).parent.mkdir(exist_ok=True)
    (root / extra).write_bytes(b"\x80\x04K\x01.")  # pickle of the int 1
    with pytest.raises(errors.AdapterError, match=words) as exc:
        verify_dir(root, SPEC, manifest())
    assert exc.value.reason == errors.UNSUPPORTED_ADAPTER


def test_bin_only_adapter_is_refused(tmp_path: Path, tiny_adapters: dict[str, Path]) -> None:
    root = adapter_folder(tmp_path / "a", tiny_adapters)
    (root / "adapter_model.safetensors").rename(root / "adapter_model.bin")
    with pytest.raises(errors.AdapterError) as exc:
        verify_dir(root, SPEC, manifest())
    assert exc.value.reason == errors.UNSUPPORTED_ADAPTER


@pytest.mark.parametrize("target", ["file", "dir"])
def test_symlinks_are_refused(tmp_path: Path, tiny_adapters: dict[str, Path], target: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("s")
    root = adapter_folder(tmp_path / "a", tiny_adapters)
    if target == "file":
        (root / "notes.txt").symlink_to(outside / "secret")
    else:
        (root / "more").symlink_to(outside)
    with pytest.raises(errors.AdapterError, match="symlink") as exc:
        verify_dir(root, SPEC, manifest())
    assert exc.value.reason == errors.UNSUPPORTED_ADAPTER


def test_huge_config_is_refused_unread(tmp_path: Path) -> None:
    cfg = tmp_path / "adapter_config.json"
    with cfg.open("wb") as f:
        f.truncate(300 * 1024 * 1024)  # sparse: 300 MB on paper, nothing on disk
    with pytest.raises(errors.AdapterError, match="larger than") as exc:
        verify_dir(tmp_path, SPEC, manifest())
    assert exc.value.reason == errors.UNSUPPORTED_ADAPTER


def test_digest_is_stable_and_content_sensitive(
    tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    src = tiny_adapters["ad0"]
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    d1, size = digest_dir(src)
    assert digest_dir(copy) == (d1, size)
    assert size == sum(p.stat().st_size for p in src.iterdir())
    assert digest_dir(tiny_adapters["ad1"])[0] != d1
    (copy / "README.md").write_text("x")
    assert digest_dir(copy)[0] != d1
