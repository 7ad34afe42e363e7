"""`loraplex render`: what the operator would apply, computed without a cluster."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from loraplex import API_GROUP
from loraplex.decide import decide
from loraplex.reconcile import base_of
from loraplex.render import DEFAULT_IMAGES, DEFAULT_OPERATOR_PODS, Images, OperatorPods, Owner

# The real token is derived by the operator from its key; it is never printed.
TOKEN_PLACEHOLDER = "derived-by-the-operator-at-run-time"


def load_documents(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Every YAML document in the files (directories: their *.yaml / *.yml, sorted)."""
    docs: list[dict[str, Any]] = []
    for path in paths:
        files = sorted([*path.glob("*.yaml"), *path.glob("*.yml")]) if path.is_dir() else [path]
        for f in files:
            for doc in yaml.safe_load_all(f.read_text()):
                if isinstance(doc, dict):
                    docs.append(doc)
    return docs


def render_paths(
    paths: Iterable[Path],
    *,
    images: Images = DEFAULT_IMAGES,
    operator: OperatorPods = DEFAULT_OPERATOR_PODS,
) -> list[dict[str, Any]]:
    """The objects for every BaseModel in `paths`, with its adapters from the same files."""
    docs = load_documents(paths)
    group = f"{API_GROUP}/"
    bases = [
        d
        for d in docs
        if d.get("kind") == "BaseModel" and str(d.get("apiVersion", "")).startswith(group)
    ]
    adapters = [d for d in docs if d.get("kind") == "LoRAAdapter"]
    for a in adapters:
        a.setdefault("metadata", {}).setdefault("namespace", "default")
    out: list[dict[str, Any]] = []
    for bm in bases:
        meta = bm.get("metadata", {})
        name, ns = meta.get("name", ""), meta.get("namespace", "default")
        mine = [a for a in adapters if base_of(a) == name and a["metadata"]["namespace"] == ns]
        owner = Owner(name, ns, meta.get("uid", ""))
        decision = decide(
            owner,
            bm.get("spec"),
            mine,
            token=TOKEN_PLACEHOLDER,
            previous=None,
            images=images,
            operator=operator,
        )
        if decision.invalid is not None:
            raise ValueError(f"BaseModel {ns}/{name}: {decision.invalid}")
        if decision.plan is not None and not decision.plan.feasible:
            raise ValueError(f"BaseModel {ns}/{name}: {decision.plan.message}")
        refused = {n: v for n, v in decision.verdicts.items() if not v.accepted}
        for n, v in sorted(refused.items()):
            print(f"# LoRAAdapter {ns}/{n} not accepted ({v.reason}): {v.message}", file=sys.stderr)
        out.extend(decision.objects)
    return out
