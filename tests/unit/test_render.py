"""Rendering: pure, deterministic, valid Kubernetes, and adapters never touch the pod template.

Matrix: examples render the same twice; every object passes kubernetes-validate (strict) for
1.30 and the newest schema shipped; vLLM args carry the planner's flags and the user's extras;
the adapter-server gets exactly DESIGN.md's flags; pvc/hf/absolute model sources; GPU limits;
pod security; adding an adapter changes only the ConfigMap; a spec change moves the hash.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from loraplex import naming
from loraplex.api.basemodel import BaseModelSpec
from loraplex.decide import decide
from loraplex.offline import load_documents, render_paths
from loraplex.planner import AdapterDemand, plan_base_model
from loraplex.render import (
    Images,
    Owner,
    build_deployment,
    model_location,
    plan_changes,
    render_all,
    replan_message,
    server_args,
)
from loraplex_server.manifest import AdapterManifest

ROOT = Path(__file__).resolve().parents[2]
OWNER = Owner("qwen-14b", "default", "1b4e28ba-2fa1-11d2-883f-0016d3cca427")
K8S_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]


def example_docs() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    docs = load_documents([ROOT / "examples"])
    base = next(d for d in docs if d["kind"] == "BaseModel")
    return base, [d for d in docs if d["kind"] == "LoRAAdapter"]


def objects(adapters: list[dict[str, Any]] | None = None, **spec: Any) -> list[dict[str, Any]]:
    base, example_adapters = example_docs()
    raw = {**base["spec"], **spec}
    d = decide(
        OWNER,
        raw,
        example_adapters if adapters is None else adapters,
        token="t" * 64,
        previous=None,
    )
    assert d.invalid is None and d.objects
    return d.objects


def by_kind(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    return next(o for o in objs if o["kind"] == kind)


def test_rendering_is_deterministic() -> None:
    assert objects() == objects()
    assert render_paths([ROOT / "examples"]) == render_paths([ROOT / "examples"])


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(
    "variant",
    [
        {},
        {
            "replicas": 3,
            "adapterCache": {"claimName": "cache"},
            "model": {"source": "pvc://models/qwen"},
            "nodeSelector": {"gpu": "l40s"},
            "tolerations": [{"key": "gpu", "operator": "Exists"}],
            "credentials": {"secretRef": {"name": "hf"}},
            "engine": {
                "env": [{"name": "A", "value": "1"}],
                "extraArgs": ["--enable-prefix-caching"],
                "resources": {"limits": {"memory": "64Gi"}},
            },
        },
    ],
    ids=["defaults", "everything-set"],
)
def test_objects_pass_kubernetes_schemas_strictly(version: str, variant: dict[str, Any]) -> None:
    for obj in objects(**variant):
        kubernetes_validate.validate(obj, version, strict=True)


def test_vllm_and_server_arguments() -> None:
    dep = by_kind(objects(engine={"extraArgs": ["--enable-prefix-caching"]}), "Deployment")
    containers = {c["name"]: c for c in dep["spec"]["template"]["spec"]["containers"]}
    args = containers["vllm"]["args"]
    assert args[:2] == ["--model", "Qwen/Qwen2.5-14B-Instruct"]
    for flag in (
        "--enable-lora",
        "--max-loras",
        "--max-lora-rank",
        "--max-cpu-loras",
        "--gpu-memory-utilization",
        "--max-model-len",
        "--tensor-parallel-size",
    ):
        assert flag in args, flag
    assert args[-1] == "--enable-prefix-caching", "user extras come last so they can override"
    assert containers["adapter-server"]["args"] == server_args()
    assert "--pvc-root" in server_args() and "--admin-token-file" in server_args()
    assert containers["vllm"]["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e.get("value") for e in containers["vllm"]["env"]}
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    read_only = {"vllm": False, "adapter-server": True}  # NVIDIA CDI hooks write vLLM's root
    for c in pod["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["readOnlyRootFilesystem"] is read_only[c["name"]]


@pytest.mark.parametrize(
    ("source", "model_arg", "has_volume"),
    [
        ("hf://Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B-Instruct", False),
        ("pvc://models/llama/8b", "/mnt/loraplex/model/models/llama/8b", True),
        ("/opt/models/tiny", "/opt/models/tiny", False),
    ],
    ids=["hf", "pvc", "absolute"],
)
def test_model_sources(source: str, model_arg: str, has_volume: bool) -> None:
    spec = BaseModelSpec.model_validate({"model": {"source": source}})
    loc = model_location(spec)
    assert loc.model_arg == model_arg
    assert bool(loc.volumes) is has_volume


def test_adapters_change_only_the_configmap() -> None:
    _, adapters = example_docs()
    one = objects(adapters[:1])
    two = objects(adapters)
    for kind in ("Deployment", "Service", "Secret"):
        assert by_kind(one, kind) == by_kind(two, kind), kind
    assert by_kind(one, "ConfigMap") != by_kind(two, "ConfigMap")


def test_spec_change_moves_the_hash_and_equal_specs_keep_it() -> None:
    def h(objs: list[dict[str, Any]]) -> str:
        return str(
            by_kind(objs, "Deployment")["spec"]["template"]["metadata"]["annotations"][
                naming.SPEC_HASH
            ]
        )

    assert h(objects()) == h(objects())
    assert h(objects()) != h(objects(maxModelLen=2048))


def test_manifest_generation_moves_only_on_change() -> None:
    base, adapters = example_docs()
    first = decide(OWNER, base["spec"], adapters, token="t", previous=None)
    assert first.manifest is not None and first.manifest.generation == 1
    again = decide(OWNER, base["spec"], adapters, token="t", previous=first.manifest)
    assert again.manifest is not None and again.manifest.generation == 1
    fewer = decide(OWNER, base["spec"], adapters[:1], token="t", previous=first.manifest)
    assert fewer.manifest is not None and fewer.manifest.generation == 2
    # A lost ConfigMap does not send generations backwards (status remembers the last one).
    lost = decide(OWNER, base["spec"], adapters, token="t", previous=None, previous_generation=7)
    assert lost.manifest is not None and lost.manifest.generation == 8


def test_offline_render_has_no_real_token_or_owner() -> None:
    objs = render_paths([ROOT / "examples"])
    secret = by_kind(objs, "Secret")
    assert secret["stringData"]["token"] == "derived-by-the-operator-at-run-time"
    assert all(o["metadata"]["ownerReferences"] == [] for o in objs)


def test_render_all_orders_secret_and_configmap_before_the_deployment() -> None:
    spec = BaseModelSpec.model_validate(
        {"model": {"source": "hf://Qwen/Qwen2.5-7B-Instruct"}, "gpu": {"product": "H100-80GB"}}
    )
    plan = plan_base_model(spec, [AdapterDemand("a", 8)])
    manifest = AdapterManifest(
        generation=1, base_served_name="b", max_loras=1, max_lora_rank=8, max_cpu_loras=1
    )
    kinds = [o["kind"] for o in render_all(OWNER, spec, plan, manifest, "t")]
    # shard(s) before the index that names them, both before the Deployment that mounts them
    assert kinds == ["Secret", "ConfigMap", "ConfigMap", "NetworkPolicy", "Deployment", "Service"]
    assert build_deployment(OWNER, spec, plan, __import__("loraplex.render").render.Images())


def test_replanned_message_says_why() -> None:
    """A rank above the headroom rolls the pods; the event names the flag and the reason."""
    spec = BaseModelSpec.model_validate(
        {"model": {"source": "hf://Qwen/Qwen2.5-14B-Instruct"}, "gpu": {"product": "L40S"}}
    )
    owner = Owner("qwen", "ns", "uid")
    before = plan_base_model(spec, [AdapterDemand("a", 16)])
    after = plan_base_model(
        spec, [AdapterDemand("a", 16), AdapterDemand("big", 64)], running_rank=32
    )
    old, new = (build_deployment(owner, spec, p, Images()) for p in (before, after))
    changes = plan_changes(old, new)
    assert "--max-lora-rank 32 -> 128" in changes
    message = replan_message(changes, after)
    assert "because maxLoraRank 128: one step above 64" in message
    # Within the headroom: same flags, no rollout, no event.
    within = plan_base_model(
        spec, [AdapterDemand("a", 16), AdapterDemand("b", 32)], running_rank=32
    )
    assert plan_changes(old, build_deployment(owner, spec, within, Images())) == []
