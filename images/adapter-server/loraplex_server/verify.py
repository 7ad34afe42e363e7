"""Checks an adapter directory before it may be installed or loaded.

vLLM would reject most of these adapters too, but only at load time and with a 500; checking
here gives the operator a precise reason (`RankExceedsMax`, `UnsupportedAdapter`, ...) and keeps
bad files out of the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraplex_server import errors
from loraplex_server.compat import check_compat
from loraplex_server.manifest import AdapterManifest, ManifestAdapter
from loraplex_server.source_uri import parse_source_uri

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
MARKER_FILE = ".loraplex-source.json"  # our own record in the cache; not part of the digest
MAX_CONFIG_BYTES = 1024 * 1024  # real adapter_config.json files are a few kB
# Files torch would unpickle (vLLM falls back to adapter_model.bin, new_embeddings.bin, .pt):
# unpickling runs code, so an adapter carrying any of them is refused.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


@dataclass(frozen=True)
class AdapterInfo:
    """What the server learned from an adapter's files."""

    rank: int
    target_modules: list[str] = field(default_factory=list)
    base_model: str = ""
    size_bytes: int = 0
    digest: str = ""
    warnings: tuple[str, ...] = ()


def _files(root: Path) -> list[Path]:
    """Every file under `root`; anything that is not a regular file or folder is refused."""
    out = []
    for dirpath, dirs, names in os.walk(root):
        for n in [*dirs, *names]:
            p = Path(dirpath) / n
            mode = p.lstat().st_mode
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                raise errors.AdapterError(
                    errors.UNSUPPORTED_ADAPTER,
                    f"{p.relative_to(root).as_posix()} is a symlink or special file; an adapter "
                    "may hold only regular files",
                )
            if n != MARKER_FILE:
                out.append(p)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def digest_dir(root: Path) -> tuple[str, int]:
    """sha256 over relative paths and contents, so equal adapters get equal digests anywhere."""
    h = hashlib.sha256()
    size = 0
    for p in _files(root):
        rel = p.relative_to(root).as_posix().encode()
        h.update(len(rel).to_bytes(4, "big") + rel)
        with p.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                size += len(chunk)
    return "sha256:" + h.hexdigest(), size


def read_config(root: Path) -> dict[str, Any]:
    cfg_path = root / CONFIG_FILE
    if not cfg_path.is_file() or cfg_path.is_symlink():
        raise errors.AdapterError(
            errors.UNSUPPORTED_ADAPTER, f"{CONFIG_FILE} is missing: not a PEFT LoRA adapter"
        )
    if cfg_path.stat().st_size > MAX_CONFIG_BYTES:
        raise errors.AdapterError(
            errors.UNSUPPORTED_ADAPTER,
            f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes; real ones are a few kB",
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except RecursionError:
        raise errors.AdapterError(
            errors.UNSUPPORTED_ADAPTER, f"{CONFIG_FILE} is nested too deeply"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise errors.AdapterError(
            errors.UNSUPPORTED_ADAPTER, f"{CONFIG_FILE} is not valid JSON: {exc}"
        ) from exc
    if not isinstance(cfg, dict):
        raise errors.AdapterError(errors.UNSUPPORTED_ADAPTER, f"{CONFIG_FILE} is not an object")
    return cfg


def _repo_id(value: str) -> str | None:
    """`org/name` when the value names a Hub repo, else None (local paths cannot be compared)."""
    if value.startswith("hf://"):
        try:
            return parse_source_uri(value).authority.lower()
        except ValueError:
            return None
    if value.startswith(("/", ".", "~")) or value.count("/") != 1:
        return None
    return value.lower()


def _check_patterns(cfg: dict[str, Any], max_rank: int) -> None:
    """Per-module ranks (rank_pattern) are ranks too, and vLLM sizes its slots by the largest."""
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = cfg.get(key) or {}
        if not isinstance(pattern, dict):
            raise errors.AdapterError(errors.UNSUPPORTED_ADAPTER, f"{key} is not an object")
        for module, value in pattern.items():
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not number or value <= 0:
                raise errors.AdapterError(
                    errors.UNSUPPORTED_ADAPTER,
                    f"{key}[{str(module)[:64]!r}] is {str(value)[:32]!r}, not a positive number",
                )
            if key == "rank_pattern" and (not isinstance(value, int) or value > max_rank):
                raise errors.AdapterError(
                    errors.RANK_EXCEEDS_MAX,
                    f"rank_pattern gives {str(module)[:64]!r} rank {value}, above the base "
                    f"model's maxLoraRank {max_rank}",
                )


def check_config(
    cfg: dict[str, Any], spec: ManifestAdapter, manifest: AdapterManifest
) -> AdapterInfo:
    """Apply the manifest's limits to a parsed adapter_config.json."""
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise errors.AdapterError(
            errors.UNSUPPORTED_ADAPTER, f"peft_type {peft_type} is not supported; only LORA is"
        )
    rank = cfg.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise errors.AdapterError(
            errors.UNSUPPORTED_ADAPTER, f"adapter_config.json has no positive integer r: {rank!r}"
        )
    if rank > manifest.max_lora_rank:
        raise errors.AdapterError(
            errors.RANK_EXCEEDS_MAX,
            f"adapter rank {rank} exceeds the base model's maxLoraRank {manifest.max_lora_rank}",
        )
    _check_patterns(cfg, manifest.max_lora_rank)
    if spec.rank is not None and spec.rank != rank:
        raise errors.AdapterError(
            errors.RANK_MISMATCH, f"spec.rank is {spec.rank} but adapter_config.json says r={rank}"
        )
    if cfg.get("use_dora"):
        raise errors.AdapterError(errors.UNSUPPORTED_ADAPTER, "DoRA adapters are not supported")
    bias = cfg.get("bias", "none")
    if bias not in (None, "none"):
        raise errors.AdapterError(
            errors.UNSUPPORTED_ADAPTER, f"bias={bias!r} is not supported; vLLM needs bias='none'"
        )
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise errors.AdapterError(errors.UNSUPPORTED_ADAPTER, "target_modules is malformed")
    base = str(cfg.get("base_model_name_or_path") or "")
    want, have = _repo_id(manifest.base_model), _repo_id(base)
    warnings: tuple[str, ...] = ()
    if want and have and want != have:
        # Fine-tunes of a fine-tune, renamed mirrors and re-uploads name other repos with the
        # same weights shape: the module and shape checks and the probe decide, unless the
        # BaseModel asks for the names to match too.
        msg = f"adapter was trained on {base!r} but this base model is {manifest.base_model!r}"
        if manifest.checks.strict_base_model:
            raise errors.AdapterError(
                errors.INCOMPATIBLE_BASE_MODEL,
                msg + " (spec.adapterChecks.strictBaseModel is true)",
            )
        warnings = (f"BaseModelMismatch: {msg}",)
    return AdapterInfo(
        rank=rank, target_modules=sorted(targets), base_model=base, warnings=warnings
    )


def verify_dir(root: Path, spec: ManifestAdapter, manifest: AdapterManifest) -> AdapterInfo:
    """Full check of an adapter directory; returns what the report shows about it."""
    cfg = read_config(root)
    info = check_config(cfg, spec, manifest)
    files = _files(root)
    pickled = [p.name for p in files if p.name.lower().endswith(PICKLE_SUFFIXES)]
    if pickled:
        raise errors.AdapterError(
            errors.UNSUPPORTED_ADAPTER,
            f"{pickled[0]} is a pickled file, which runs code when loaded; only safetensors "
            f"adapters are accepted (convert it to {SAFETENSORS_FILE})",
        )
    if not (root / SAFETENSORS_FILE).is_file():
        raise errors.AdapterError(
            errors.UNSUPPORTED_ADAPTER,
            f"no {SAFETENSORS_FILE}: only safetensors adapters are accepted",
        )
    check_compat(root, cfg, manifest.base_modules)
    digest, size = digest_dir(root)
    return AdapterInfo(info.rank, info.target_modules, info.base_model, size, digest, info.warnings)
