"""What every loraplex pod needs on a GPU cluster, whatever it runs: a user and writable
caches for an image with no passwd entry, security contexts, placement on the right GPU
product, the rollout strategy and the stop sequence. Pure helpers for render.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from loraplex import naming
from loraplex.api.basemodel import BaseModelSpec
from loraplex.planner.catalog import GPU_PRODUCT_LABEL, gpu_product_label_values

# Where each library writes, from its source as installed here (vllm 0.32.0, torch 2.13.0,
# triton 3.7.1; flashinfer from its repository, jit/env.py):
# torch/_inductor/runtime/cache_dir_utils.py reads TORCHINDUCTOR_CACHE_DIR and otherwise calls
# getpass.getuser(), which raises without a passwd entry unless USER/LOGNAME are set (pytorch
# issue 140765); triton/knobs.py TRITON_HOME and TRITON_CACHE_DIR (default ~/.triton/cache);
# vllm/envs.py VLLM_CACHE_ROOT and VLLM_CONFIG_ROOT (default under XDG_CACHE_HOME /
# XDG_CONFIG_HOME, else ~); flashinfer/jit/env.py FLASHINFER_WORKSPACE_BASE (default ~, it adds
# .cache/flashinfer); torch/utils/cpp_extension.py TORCH_EXTENSIONS_DIR; numba/core/config.py
# NUMBA_CACHE_DIR; tiktoken/load.py TIKTOKEN_CACHE_DIR; huggingface_hub/constants.py HF_HOME;
# CUDA's JIT cache CUDA_CACHE_PATH (default ~/.nv/ComputeCache, NVIDIA's CUDA environment
# variables documentation). All of them go to the writable /tmp emptyDir.
SCRATCH = "/tmp"
USER_NAME = "loraplex"


def writable_env() -> dict[str, str]:
    cache, config = f"{SCRATCH}/.cache", f"{SCRATCH}/.config"
    return {
        "HOME": SCRATCH,
        "USER": USER_NAME,
        "LOGNAME": USER_NAME,
        "XDG_CACHE_HOME": cache,
        "XDG_CONFIG_HOME": config,
        "TORCHINDUCTOR_CACHE_DIR": f"{cache}/torchinductor",
        "TRITON_HOME": SCRATCH,
        "TRITON_CACHE_DIR": f"{cache}/triton",
        "VLLM_CACHE_ROOT": f"{cache}/vllm",
        "VLLM_CONFIG_ROOT": f"{config}/vllm",
        "FLASHINFER_WORKSPACE_BASE": SCRATCH,
        "TORCH_EXTENSIONS_DIR": f"{cache}/torch_extensions",
        "NUMBA_CACHE_DIR": f"{cache}/numba",
        "TIKTOKEN_CACHE_DIR": f"{cache}/tiktoken",
        "CUDA_CACHE_PATH": f"{SCRATCH}/.nv/ComputeCache",
        "HF_HOME": f"{cache}/huggingface",
    }


def env_list(fixed: dict[str, str], user: list[dict[str, Any]]) -> list[dict[str, Any]]:
    user_names = {e["name"] for e in user}
    env = [{"name": k, "value": v} for k, v in sorted(fixed.items()) if k not in user_names]
    return env + sorted(user, key=lambda e: e["name"])


def server_env() -> list[dict[str, Any]]:
    """The adapter-server is plain Python: a home, a user name, and the hub cache for adapter
    downloads beside the adapters (its root filesystem is read-only)."""
    return env_list(
        {
            "HOME": SCRATCH,
            "USER": USER_NAME,
            "LOGNAME": USER_NAME,
            "XDG_CACHE_HOME": f"{SCRATCH}/.cache",
            "HF_HOME": f"{naming.CACHE_DIR}/.hf",
        },
        [],
    )


def merge(derived: dict[str, Any], user: dict[str, Any] | None) -> dict[str, Any]:
    """`user` over `derived`, one level deep (requests/limits merge key by key)."""
    out: dict[str, Any] = json.loads(json.dumps(derived))
    for key, value in (user or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


GPU_TOLERATION_EFFECT = "NoSchedule"
POD_SECURITY_BASE = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
# vLLM's root stays writable: NVIDIA runtimes that inject the GPU through CDI hooks write
# into it (KServe hit this and turned readOnlyRootFilesystem off for GPU containers).
VLLM_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": False,
    "capabilities": {"drop": ["ALL"]},
}
SERVER_SECURITY = {**VLLM_SECURITY, "readOnlyRootFilesystem": True}
VLLM_HEALTH_PROBE = [
    "python3",
    "-c",
    "import urllib.request as u; "
    f"u.urlopen('http://127.0.0.1:{naming.VLLM_PORT}/health', timeout=5)",
]


def vllm_pre_stop(spec: BaseModelSpec) -> list[str]:
    """Keep vLLM up while the adapter-server drains: wait for the preStop delay, then until
    the adapter-server's port closes (it finishes in-flight streams first), within the grace
    period less 5 s for the final SIGTERM."""
    delay = spec.rollout.pre_stop_seconds
    bound = spec.rollout.termination_grace_period_seconds - 5
    return [
        "python3",
        "-c",
        "import socket, time\n"
        f"end = time.monotonic() + {bound}\n"
        f"time.sleep({delay})\n"
        "while time.monotonic() < end:\n"
        "    try:\n"
        f"        socket.create_connection(('127.0.0.1', {naming.PUBLIC_PORT}), 1).close()\n"
        "    except OSError:\n"
        "        break\n"
        "    time.sleep(1)\n",
    ]


def pod_security(spec: BaseModelSpec) -> dict[str, Any]:
    sec = spec.security_context
    return {
        **POD_SECURITY_BASE,
        "runAsUser": sec.run_as_user,
        "runAsGroup": sec.run_as_group,
        "fsGroup": sec.fs_group or sec.run_as_group,
    }


@dataclass(frozen=True)
class Placement:
    node_selector: dict[str, str]
    tolerations: list[dict[str, Any]]
    affinity: dict[str, Any] | None


def placement(spec: BaseModelSpec) -> Placement:
    """Where the pod may run: the user's choice, or the GPU product's GFD label.

    A product with one label value becomes a nodeSelector, several an affinity `In` term; a
    user nodeSelector or affinity replaces the derived one entirely (they know their labels).
    GPU nodes are usually tainted with the GPU resource name, so that taint is tolerated.
    """
    selector = dict(sorted(spec.node_selector.items()))
    affinity = spec.affinity
    values = gpu_product_label_values(spec.gpu.product) if spec.gpu.product else ()
    if not selector and not affinity and values:
        if len(values) == 1:
            selector = {GPU_PRODUCT_LABEL: values[0]}
        else:
            term = {"key": GPU_PRODUCT_LABEL, "operator": "In", "values": list(values)}
            affinity = {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [{"matchExpressions": [term]}]
                    }
                }
            }
    tolerations = list(spec.tolerations)
    key = spec.gpu.resource_name
    if not any(
        t.get("key") == key or (not t.get("key") and t.get("operator") == "Exists")
        for t in tolerations
    ):
        tolerations.append({"key": key, "operator": "Exists", "effect": GPU_TOLERATION_EFFECT})
    return Placement(selector, tolerations, affinity)


def strategy(spec: BaseModelSpec) -> dict[str, Any]:
    r = spec.rollout
    if r.strategy == "Recreate":
        return {"type": "Recreate"}
    return {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": r.max_surge, "maxUnavailable": r.max_unavailable},
    }


def image_pull_secrets(spec: BaseModelSpec) -> list[dict[str, str]]:
    return [{"name": s.name} for s in spec.image_pull_secrets]


def credentials(spec: BaseModelSpec) -> str | None:
    return spec.credentials.secret_ref.name if spec.credentials.secret_ref else None
