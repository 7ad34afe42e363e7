"""Checking objects against the committed CRDs the way the API server would.

`schema_errors` runs the openAPIV3Schema (jsonschema, with `nullable` and int-or-string
understood); `cel_errors` evaluates every `x-kubernetes-validations` rule with cel-python,
including transition rules (`oldSelf`) when an old object is given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]
FIXTURE_CRDS = ROOT / "tests" / "fixtures" / "crds"
CRD_FILES = {
    "BaseModel": ROOT / "crds" / "loraplex.io_basemodels.yaml",
    "LoRAAdapter": ROOT / "crds" / "loraplex.io_loraadapters.yaml",
    # Other projects' CRDs our objects must satisfy (their sources: each file's header).
    "InferencePool": FIXTURE_CRDS / "inference.networking.k8s.io_inferencepools.yaml",
    "HTTPRoute": FIXTURE_CRDS / "gateway.networking.k8s.io_httproutes.yaml",
    "ScaledObject": FIXTURE_CRDS / "keda.sh_scaledobjects.yaml",
}


def crd_schema(kind: str) -> dict[str, Any]:
    crd = yaml.safe_load(CRD_FILES[kind].read_text())
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def _to_jsonschema(node: Any) -> Any:
    """OpenAPI v3 (Kubernetes flavour) -> JSON Schema: nullable, int-or-string, booleans."""
    if isinstance(node, list):
        return [_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _to_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes")}
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if out.pop("nullable", False) and "type" in out:
        out["type"] = (
            [out["type"], "null"] if isinstance(out["type"], str) else [*out["type"], "null"]
        )
    if out.get("exclusiveMinimum") is True:
        out["exclusiveMinimum"] = out.pop("minimum")
    if out.get("exclusiveMaximum") is True:
        out["exclusiveMaximum"] = out.pop("maximum")
    if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        # The API server prunes unknown fields and kubectl's strict validation refuses them.
        out["additionalProperties"] = False
    return out


def schema_errors(kind: str, obj: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(_to_jsonschema(crd_schema(kind)))
    return [
        f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
        for e in validator.iter_errors(obj)
    ]


def _walk_rules(
    schema: dict[str, Any], value: Any, old: Any, path: str, out: list[tuple[str, str, Any, Any]]
) -> None:
    for rule in schema.get("x-kubernetes-validations", []):
        out.append((path, rule["rule"], value, old))
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key in value:
                old_sub = old.get(key) if isinstance(old, dict) else None
                _walk_rules(sub, value[key], old_sub, f"{path}.{key}", out)
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            _walk_rules(schema["items"], item, None, f"{path}[{i}]", out)


def cel_errors(kind: str, obj: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    """Messages of every CEL rule that `obj` breaks (transition rules need `old`)."""
    env = celpy.Environment()
    checks: list[tuple[str, str, Any, Any]] = []
    _walk_rules(crd_schema(kind), obj, old, "", checks)
    errors = []
    for path, rule, value, old_value in checks:
        if "oldSelf" in rule and old_value is None:
            continue  # transition rules apply to updates only
        activation = {"self": celpy.json_to_cel(value)}
        if old_value is not None:
            activation["oldSelf"] = celpy.json_to_cel(old_value)
        result = env.program(env.compile(rule)).evaluate(activation)
        if not bool(result):
            errors.append(f"{path}: {rule}")
    return errors
