"""Generate the CRD YAML from the pydantic API models, so the schema has one source of truth.

Kubernetes wants a *structural* OpenAPI v3 schema: no `$ref`, no `title`, no `anyOf` with
null, no `additionalProperties: false` beside `properties`, and `exclusiveMinimum` as a
boolean. `to_structural` rewrites pydantic's JSON Schema into that shape; everything else
(descriptions, bounds, patterns, enums, CEL rules) passes through, so `kubectl explain` and
the API server's validation say what the models say.

Run as `python -m loraplex.crdgen DIR [DIR...]` (what `make crds` does).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from loraplex import API_GROUP, API_VERSION
from loraplex.api import BaseModelResource, LoRAAdapterResource

_DROP = {"title", "default", "$defs", "examples"}


def to_structural(schema: dict[str, Any], defs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Rewrite one pydantic JSON Schema node (recursively) into a structural CRD schema."""
    defs = schema.get("$defs", {}) if defs is None else defs
    if "$ref" in schema:
        target = defs[schema["$ref"].split("/")[-1]]
        merged = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        return to_structural(merged, defs)
    out: dict[str, Any] = {}
    any_of = schema.get("anyOf")
    if any_of is not None:
        non_null = [s for s in any_of if s.get("type") != "null"]
        if len(non_null) != 1:
            raise ValueError(f"cannot make a structural schema from anyOf {any_of}")
        inner = to_structural(non_null[0], defs)
        rest = {k: v for k, v in schema.items() if k != "anyOf"}
        out = {**inner, **to_structural(rest, defs)}
        if len(non_null) < len(any_of):
            out["nullable"] = True
        return out
    for key, value in schema.items():
        if key in _DROP or key == "anyOf":
            continue
        if key == "properties":
            out[key] = {name: to_structural(sub, defs) for name, sub in value.items()}
        elif key == "items":
            out[key] = to_structural(value, defs)
        elif key == "additionalProperties":
            if isinstance(value, dict):
                out[key] = to_structural(value, defs)
            # `false` (unknown fields) is enforced by pruning and kubectl's strict validation;
            # `true` is expressed as x-kubernetes-preserve-unknown-fields instead.
        elif key == "const":
            out["enum"] = [value]
        elif key == "exclusiveMinimum":
            out["minimum"] = value
            out["exclusiveMinimum"] = True
        elif key == "exclusiveMaximum":
            out["maximum"] = value
            out["exclusiveMaximum"] = True
        else:
            out[key] = value
    if schema.get("additionalProperties") is True or out.get(
        "x-kubernetes-preserve-unknown-fields"
    ):
        out["x-kubernetes-preserve-unknown-fields"] = True
        out.setdefault("type", "object")
    if "default" in schema and schema["default"] not in (None, [], {}) and "description" in out:
        out["description"] = f"{out['description']} Default: {schema['default']}."
    return out


def _column(name: str, path: str, kind: str = "string", **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": kind, "jsonPath": path, **extra}


_KINDS: dict[str, dict[str, Any]] = {
    "BaseModel": {
        "model": BaseModelResource,
        "plural": "basemodels",
        "short": ["bm"],
        "columns": [
            _column("Model", ".spec.model.source"),
            _column("GPUs", ".spec.gpu.count", "integer"),
            _column("Phase", ".status.phase"),
            _column("Ready", ".status.ready"),
            _column("Adapters", ".status.adaptersReady"),
            _column("MaxLoras", ".status.plan.maxLoras", "integer", priority=1),
            _column("MaxRank", ".status.plan.maxLoraRank", "integer", priority=1),
            _column("GPUUtil", ".status.plan.gpuMemoryUtilization", "number", priority=1),
            _column("Age", ".metadata.creationTimestamp", "date"),
        ],
    },
    "LoRAAdapter": {
        "model": LoRAAdapterResource,
        "plural": "loraadapters",
        "short": ["lora"],
        "columns": [
            _column("Base", ".spec.baseModel"),
            _column("Rank", ".status.rank", "integer"),
            _column("Phase", ".status.phase"),
            _column("Ready", ".status.ready"),
            _column("Served", ".status.servedName", priority=1),
            _column("Source", ".spec.source", priority=1),
            _column("Age", ".metadata.creationTimestamp", "date"),
        ],
    },
}


def build_crd(kind: str) -> dict[str, Any]:
    """The CustomResourceDefinition for one kind, as a dict ready for YAML."""
    info = _KINDS[kind]
    raw = info["model"].model_json_schema(by_alias=True, mode="validation")
    body = to_structural(raw)
    props = body["properties"]
    schema = {
        "type": "object",
        "description": raw.get("description", ""),
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": props["spec"],
            "status": props["status"],
        },
        "required": ["spec"],
    }
    schema["properties"]["status"].pop("nullable", None)
    plural = info["plural"]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{API_GROUP}"},
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": info["short"],
                "categories": ["loraplex"],
            },
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": info["columns"],
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


def render_crds() -> dict[str, str]:
    """File name -> YAML text for every CRD (what `make crds` writes and the tests compare)."""
    files = {}
    for kind, info in _KINDS.items():
        header = "# Generated by `make crds` from operator/loraplex/api; do not edit.\n"
        text = yaml.safe_dump(build_crd(kind), sort_keys=False, width=100)
        files[f"{API_GROUP}_{info['plural']}.yaml"] = header + text
    return files


def main(argv: list[str] | None = None) -> int:
    """Write the CRDs into each directory given."""
    dirs = (argv if argv is not None else sys.argv[1:]) or ["crds"]
    for d in dirs:
        Path(d).mkdir(parents=True, exist_ok=True)
        for name, text in render_crds().items():
            (Path(d) / name).write_text(text)
            print(Path(d) / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
