"""CRDs: generated from the models, structural, and their CEL rules do what they say.

Matrix: committed YAML == generated; no $ref/anyOf/title/additionalProperties:false anywhere;
printer columns and names; CEL rules on good and bad objects (maxLoraRank set, maxCpuLoras >=
maxLoras, source scheme, baseModel immutable); examples pass schema + CEL + pydantic.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from loraplex.api import BaseModelSpec, LoRAAdapterSpec
from loraplex.crdgen import render_crds
from tests.support.crd import CRD_FILES, ROOT, cel_errors, crd_schema, schema_errors


def test_committed_crds_match_the_models() -> None:
    for name, text in render_crds().items():
        committed = (ROOT / "crds" / name).read_text()
        assert committed == text, f"crds/{name} is stale: run `make crds`"


def _schemas(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every schema node (root, property values, items), with its path."""
    found = [(path, node)]
    for key, sub in (node.get("properties") or {}).items():
        found += _schemas(sub, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        found += _schemas(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        found += _schemas(node["additionalProperties"], f"{path}{{}}")
    return found


@pytest.mark.parametrize("kind", ["BaseModel", "LoRAAdapter"])
def test_schema_is_structural(kind: str) -> None:
    for path, node in _schemas(crd_schema(kind)):
        for bad in ("$ref", "anyOf", "oneOf", "allOf", "title", "$defs", "const", "default"):
            assert bad not in node, f"{kind}{path} has {bad}"
        assert node.get("additionalProperties") is not False, f"{kind}{path}"
        if not node.get("x-kubernetes-int-or-string"):
            assert node.get("type"), f"{kind}{path} has no type"
        if "properties" in node:
            assert node["type"] == "object", f"{kind}{path}"
        for rule in node.get("x-kubernetes-validations", []):
            assert rule.get("message"), f"{kind}{path}: every CEL rule says what to fix"


@pytest.mark.parametrize(
    ("kind", "short", "columns"),
    [
        ("BaseModel", "bm", {"Model", "Phase", "Ready", "Adapters", "Age"}),
        ("LoRAAdapter", "lora", {"Base", "Rank", "Phase", "Ready", "Age"}),
    ],
)
def test_names_and_printer_columns(kind: str, short: str, columns: set[str]) -> None:
    crd = yaml.safe_load(CRD_FILES[kind].read_text())
    assert crd["spec"]["names"]["shortNames"] == [short]
    assert crd["spec"]["names"]["categories"] == ["loraplex"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert columns <= {c["name"] for c in version["additionalPrinterColumns"]}


def _examples() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def test_examples_are_valid() -> None:
    docs = _examples()
    kinds = [d["kind"] for d in docs]
    assert kinds.count("BaseModel") >= 1 and kinds.count("LoRAAdapter") >= 2
    assert any(d["spec"].get("pinned") for d in docs if d["kind"] == "LoRAAdapter")
    for doc in docs:
        assert schema_errors(doc["kind"], doc) == [], doc["metadata"]["name"]
        assert cel_errors(doc["kind"], doc) == [], doc["metadata"]["name"]
        model = BaseModelSpec if doc["kind"] == "BaseModel" else LoRAAdapterSpec
        model.model_validate(doc["spec"])


def _bm(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"model": {"source": "hf://Qwen/Qwen2.5-7B-Instruct"}}
    base.update(spec)
    return {
        "apiVersion": "loraplex.io/v1alpha1",
        "kind": "BaseModel",
        "metadata": {"name": "b"},
        "spec": base,
    }


def _lora(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"baseModel": "b", "source": "hf://org/adapter"}
    base.update(spec)
    return {
        "apiVersion": "loraplex.io/v1alpha1",
        "kind": "LoRAAdapter",
        "metadata": {"name": "a"},
        "spec": base,
    }


CEL_CASES = [
    ("rank-auto-ok", "BaseModel", _bm(lora={"maxLoraRank": "auto"}), True),
    ("rank-16-ok", "BaseModel", _bm(lora={"maxLoraRank": 16}), True),
    ("rank-320-ok", "BaseModel", _bm(lora={"maxLoraRank": 320}), True),
    ("rank-7-bad", "BaseModel", _bm(lora={"maxLoraRank": 7}), False),
    ("rank-word-bad", "BaseModel", _bm(lora={"maxLoraRank": "big"}), False),
    ("loras-zero-bad", "BaseModel", _bm(lora={"maxLoras": 0}), False),
    ("cpu-below-gpu-bad", "BaseModel", _bm(lora={"maxLoras": 4, "maxCpuLoras": 2}), False),
    ("cpu-equal-ok", "BaseModel", _bm(lora={"maxLoras": 4, "maxCpuLoras": 4}), True),
    ("cpu-auto-ok", "BaseModel", _bm(lora={"maxLoras": 4, "maxCpuLoras": "auto"}), True),
    ("model-ftp-bad", "BaseModel", _bm(model={"source": "ftp://x/y"}), False),
    ("model-abs-path-ok", "BaseModel", _bm(model={"source": "/models/llama"}), True),
    ("adapter-s3-ok", "LoRAAdapter", _lora(source="s3://bucket/a"), True),
    ("adapter-pvc-ok", "LoRAAdapter", _lora(source="pvc://claim/a"), True),
    ("adapter-gopher-bad", "LoRAAdapter", _lora(source="gopher://x/a"), False),
    ("adapter-bare-path-bad", "LoRAAdapter", _lora(source="/etc/passwd"), False),
]


@pytest.mark.parametrize(
    ("kind", "obj", "ok"), [c[1:] for c in CEL_CASES], ids=[c[0] for c in CEL_CASES]
)
def test_cel_rules(kind: str, obj: dict[str, Any], ok: bool) -> None:
    errors = cel_errors(kind, obj) + schema_errors(kind, obj)
    assert (errors == []) is ok, errors


def test_base_model_of_an_adapter_is_immutable() -> None:
    old = _lora()
    same = copy.deepcopy(old)
    moved = _lora(baseModel="other")
    assert cel_errors("LoRAAdapter", same, old) == []
    assert any("oldSelf" in e for e in cel_errors("LoRAAdapter", moved, old))


def test_schema_refuses_unknown_fields_and_wrong_types() -> None:
    assert schema_errors("BaseModel", _bm(replicaz=2))
    assert schema_errors("BaseModel", _bm(replicas="two"))
    assert schema_errors("BaseModel", _bm(replicas=-1))
    assert schema_errors("LoRAAdapter", _lora(rank=0))
    assert schema_errors("LoRAAdapter", _lora(sha256="abc"))


def test_generator_writes_files(tmp_path: Path) -> None:
    from loraplex.crdgen import main

    assert main([str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(render_crds())
