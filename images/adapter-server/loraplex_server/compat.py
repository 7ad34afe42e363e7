"""Does an adapter fit this base model? Checked from its files, before vLLM sees it.

vLLM loads a LoRA whose module names it does not know without an error and then serves the
base model's output unchanged (vLLM issue 34186); a LoRA with the right names but another
model's shapes fails deep inside the load with a 500. Both are decided here from the
safetensors header (names and shapes only, no tensor is read) against the base model's
LoRA-capable modules, which the operator puts in the manifest (`baseModules`).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex_server import errors

SAFETENSORS_FILE = "adapter_model.safetensors"
# A LoRA adapter's header lists a few hundred tensors: kilobytes. Anything near this is not
# an adapter, and reading it would be an easy way to make the server allocate.
MAX_HEADER_BYTES = 16 * 1024 * 1024
_LORA_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
    r"(?:\.[^.]+)?(?:\.weight)?$"
)
_EMBEDDINGS = ("embed_tokens", "lm_head")


@dataclass(frozen=True)
class LoraTensor:
    module: str  # full module path, e.g. base_model.model.model.layers.0.self_attn.q_proj
    part: str  # lora_A, lora_B, lora_embedding_A, lora_embedding_B
    shape: tuple[int, ...]

    @property
    def suffix(self) -> str:
        return self.module.rsplit(".", 1)[-1]


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (format: u64 little-endian length, then JSON)."""
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise errors.AdapterError(errors.UNSUPPORTED_ADAPTER, f"{path.name} is truncated")
        (length,) = struct.unpack("<Q", raw)
        if length > MAX_HEADER_BYTES:
            raise errors.AdapterError(
                errors.UNSUPPORTED_ADAPTER,
                f"{path.name} header is {length} bytes, over the {MAX_HEADER_BYTES} a LoRA "
                "adapter needs",
            )
        body = f.read(length)
    try:
        header = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise errors.AdapterError(
            errors.UNSUPPORTED_ADAPTER, f"{path.name} is not a safetensors file: {exc}"
        ) from exc
    if not isinstance(header, dict):
        raise errors.AdapterError(errors.UNSUPPORTED_ADAPTER, f"{path.name} header is not a map")
    return header


def lora_tensors(header: Mapping[str, Any]) -> list[LoraTensor]:
    out = []
    for key, meta in header.items():
        m = _LORA_KEY.match(key)
        if m is None or not isinstance(meta, dict):
            continue
        shape = meta.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
            raise errors.AdapterError(errors.UNSUPPORTED_ADAPTER, f"tensor {key} has no shape")
        out.append(LoraTensor(m.group("module"), m.group("part"), tuple(shape)))
    return out


def _modules_list(base_modules: Mapping[str, tuple[int, int]]) -> str:
    return ", ".join(sorted(base_modules))


def check_targets(cfg: Mapping[str, Any], base_modules: Mapping[str, tuple[int, int]]) -> None:
    """adapter_config.json's target_modules and modules_to_save against the base."""
    to_save = cfg.get("modules_to_save")
    if to_save:
        raise errors.AdapterError(
            errors.UNSUPPORTED_ADAPTER,
            f"modules_to_save {to_save!r} is not supported by vLLM's runtime LoRA: retrain "
            "without modules_to_save or merge those modules into the base",
        )
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        return  # "all-linear" or a regex over full names: the weights say what it matched
    for target in targets:
        if not isinstance(target, str):
            continue
        name = target.rsplit(".", 1)[-1]
        if name not in base_modules:
            raise errors.AdapterError(
                errors.INCOMPATIBLE_BASE_MODEL,
                f"target module {target!r} does not exist in this base model; its LoRA "
                f"modules are: {_modules_list(base_modules)} (vLLM would load the adapter "
                "and silently serve the base model's output)",
            )


def check_weights(tensors: list[LoraTensor], base_modules: Mapping[str, tuple[int, int]]) -> None:
    """Every LoRA tensor names a base module and has that module's in/out features."""
    if not tensors:
        raise errors.AdapterError(
            errors.UNSUPPORTED_ADAPTER, f"{SAFETENSORS_FILE} holds no LoRA tensors (lora_A/B)"
        )
    for t in sorted(tensors, key=lambda t: (t.module, t.part)):
        if t.suffix not in base_modules:
            raise errors.AdapterError(
                errors.INCOMPATIBLE_BASE_MODEL,
                f"the weights target module {t.suffix!r} ({t.module}), which this base model "
                f"does not have; its LoRA modules are: {_modules_list(base_modules)}",
            )
        if t.suffix in _EMBEDDINGS or len(t.shape) != 2:
            continue
        want_in, want_out = base_modules[t.suffix]
        if t.part == "lora_A" and t.shape[1] != want_in:
            raise errors.AdapterError(
                errors.INCOMPATIBLE_BASE_MODEL,
                f"{t.module}.lora_A has {t.shape[1]} input features; this base model's "
                f"{t.suffix} has {want_in}: the adapter was trained on another model size",
            )
        if t.part == "lora_B" and t.shape[0] != want_out:
            raise errors.AdapterError(
                errors.INCOMPATIBLE_BASE_MODEL,
                f"{t.module}.lora_B has {t.shape[0]} output features; this base model's "
                f"{t.suffix} has {want_out}: the adapter was trained on another model size",
            )


def check_compat(
    root: Path, cfg: Mapping[str, Any], base_modules: Mapping[str, tuple[int, int]] | None
) -> None:
    """All of the above; a no-op when the operator could not tell the base's modules."""
    if base_modules is None:
        return
    check_targets(cfg, base_modules)
    weights = root / SAFETENSORS_FILE
    if weights.is_file():
        check_weights(lora_tensors(read_safetensors_header(weights)), base_modules)
