"""Adapters that fail in the ways issue 16 names, made from a good one at test time."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from loraplex.planner.architecture import shape_from_config
from loraplex.planner.modules import lora_modules


def base_modules_of(model: Path) -> dict[str, tuple[int, int]]:
    """The manifest's baseModules for a local model, as the operator computes them."""
    return lora_modules(shape_from_config(json.loads((model / "config.json").read_text())))


def rewrite(src: Path, dst: Path, *, zero_b: bool = False, rename: str | None = None) -> Path:
    """A copy of adapter `src` with lora_B zeroed (an untrained adapter) or q_proj renamed."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = dst / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    out = {}
    for key, t in tensors.items():
        if zero_b and ".lora_B." in key:
            t = t * 0
        if rename and ".q_proj." in key:
            key = key.replace(".q_proj.", f".{rename}.")
        out[key] = t.contiguous()
    save_file(out, str(weights))
    if rename:
        cfg_path = dst / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["target_modules"] = [rename if m == "q_proj" else m for m in cfg["target_modules"]]
        cfg_path.write_text(json.dumps(cfg))
    return dst
