"""Names and labels of the objects a BaseModel owns: one place, so nothing drifts apart."""

from __future__ import annotations

from loraplex import API_GROUP

MANAGED_BY = "loraplex"
BASE_LABEL = f"{API_GROUP}/basemodel"
SPEC_HASH = f"{API_GROUP}/spec-hash"
MANIFEST_KEY = "manifest.json"
TOKEN_KEY = "token"

# Paths inside the pod; the adapter-server's flags and vLLM's mounts agree on these.
CACHE_DIR = "/var/cache/loraplex"
MANIFEST_DIR = "/etc/loraplex/manifest"
ADMIN_DIR = "/etc/loraplex/admin"
PVC_ROOT = "/mnt/loraplex/pvc"
MODEL_ROOT = "/mnt/loraplex/model"
VLLM_PORT = 8001
PUBLIC_PORT = 8000
ADMIN_PORT = 8090


def deployment_name(base: str) -> str:
    return base


def service_name(base: str) -> str:
    return base


def configmap_name(base: str) -> str:
    return f"{base}-adapters"


def manifest_shard_name(base: str, n: int) -> str:
    """ConfigMap slot `n` of the sharded manifest (see loraplex_server.manifest_shards)."""
    return f"{base}-manifest-{n}"


def secret_name(base: str) -> str:
    return f"{base}-admin"


def weights_claim_name(base: str) -> str:
    return f"{base}-weights"


def pdb_name(base: str) -> str:
    return base


def networkpolicy_name(base: str) -> str:
    return base


def selector_labels(base: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "loraplex-vllm", BASE_LABEL: base}


def labels(base: str) -> dict[str, str]:
    return {**selector_labels(base), "app.kubernetes.io/managed-by": MANAGED_BY}


def loader_labels(base: str) -> dict[str, str]:
    """The weights loader Job and its pod: never matched by the Deployment's, Service's or
    PDB's selector (a loader pod must not receive traffic or manifests)."""
    return {
        "app.kubernetes.io/name": "loraplex-weights-loader",
        BASE_LABEL: base,
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }


def endpoint(base: str, namespace: str) -> str:
    return f"http://{service_name(base)}.{namespace}.svc:{PUBLIC_PORT}/v1"
