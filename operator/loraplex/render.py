"""Pure rendering of everything a BaseModel owns: Deployment, Service, ConfigMap, Secret,
(unless turned off) a NetworkPolicy, and when asked for, the weights PVC and its loader Job,
and a PodDisruptionBudget.

Bulky static YAML lives in jinja2 templates (StrictUndefined, every value through `tojson`);
this module decides the values. Equal inputs give byte-equal output: args and env are in a
fixed order, and the pod template carries a hash of itself so that only real changes roll
pods. Adapters live only in the ConfigMap, so adding one never changes the pod template.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import jinja2
import yaml

from loraplex import API_GROUP, API_VERSION, naming, pod, weights_loader
from loraplex.api.basemodel import BaseModelSpec
from loraplex.planner import Plan, vllm_flags
from loraplex.planner.footprint import Footprint
from loraplex.routing import ALL_APIS, Capabilities, build_routing_objects
from loraplex.sizing import PROBE_PERIOD_SECONDS, SCRATCH_LIMIT, PodSizing, pod_sizing
from loraplex.versions import DEFAULT_ENGINE_IMAGE
from loraplex.weights import WEIGHTS_MOUNT, WeightsCache, weights_cache
from loraplex_server import manifest_shards
from loraplex_server.manifest import AdapterManifest
from loraplex_server.source_uri import parse_source_uri

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("loraplex", "templates"),
    undefined=jinja2.StrictUndefined,
    autoescape=False,
    keep_trailing_newline=True,
)

DEFAULT_SERVER_IMAGE = "ghcr.io/loraplex/adapter-server:0.1.0"
VLLM_COMMAND = ["python3", "-m", "vllm.entrypoints.openai.api_server"]


@dataclass(frozen=True)
class Owner:
    """The BaseModel object the rendered objects belong to."""

    name: str
    namespace: str
    uid: str

    def refs(self) -> list[dict[str, Any]]:
        """ownerReferences; none when rendering offline (no uid yet: the API would refuse it)."""
        if not self.uid:
            return []
        return [
            {
                "apiVersion": f"{API_GROUP}/{API_VERSION}",
                "kind": "BaseModel",
                "name": self.name,
                "uid": self.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]


@dataclass(frozen=True)
class Images:
    """Default images for BaseModels that do not name their own (set by the operator/chart)."""

    engine: str = DEFAULT_ENGINE_IMAGE
    server: str = DEFAULT_SERVER_IMAGE


DEFAULT_IMAGES = Images()


@dataclass(frozen=True)
class OperatorPods:
    """Where the operator's own pods run, so each BaseModel's NetworkPolicy admits them (and
    only them) to the admin port. The chart passes its release namespace and pod labels."""

    namespace: str = "loraplex-system"
    labels: tuple[tuple[str, str], ...] = (
        ("app.kubernetes.io/name", "loraplex"),
        ("app.kubernetes.io/component", "operator"),
    )


DEFAULT_OPERATOR_PODS = OperatorPods()


def parse_labels(text: str) -> tuple[tuple[str, str], ...]:
    """`k=v,k2=v2` (the --operator-pod-labels flag) as sorted pairs; ValueError names the bad
    item."""
    pairs = []
    for item in filter(None, (i.strip() for i in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{item!r} is not key=value")
        pairs.append((key, value))
    if not pairs:
        raise ValueError("at least one key=value label is needed")
    return tuple(sorted(pairs))


@dataclass(frozen=True)
class ModelLocation:
    """How vLLM finds the base weights: the --model value plus any volume it needs."""

    model_arg: str
    revision: str | None
    volumes: tuple[dict[str, Any], ...] = ()
    mounts: tuple[dict[str, Any], ...] = ()
    extra_args: tuple[str, ...] = ()


def model_location(spec: BaseModelSpec, cache: WeightsCache | None = None) -> ModelLocation:
    """Map spec.model.source to what vLLM is started with.

    hf:// without a cache downloads into the `weights` emptyDir (HF_HOME points there); with a
    cache, every source reads the loader Job's folder on the PVC, read-only.
    """
    source = spec.model.source
    if cache is not None:
        return ModelLocation(
            cache.model_path,
            None,
            volumes=(
                {
                    "name": "weights",
                    "persistentVolumeClaim": {"claimName": cache.claim_name, "readOnly": True},
                },
            ),
            mounts=({"name": "weights", "mountPath": WEIGHTS_MOUNT, "readOnly": True},),
        )
    if source.startswith("/"):
        return ModelLocation(source, None)
    uri = parse_source_uri(source)
    if uri.scheme == "hf":
        repo = uri.authority if not uri.path else f"{uri.authority}/{uri.path}"
        return ModelLocation(
            repo,
            spec.model.revision,
            mounts=({"name": "weights", "mountPath": WEIGHTS_MOUNT},),
        )
    if uri.scheme == "pvc":
        mount = f"{naming.MODEL_ROOT}/{uri.authority}"
        return ModelLocation(
            str(PurePosixPath(mount) / uri.path) if uri.path else mount,
            None,
            volumes=(
                {
                    "name": "model",
                    "persistentVolumeClaim": {"claimName": uri.authority, "readOnly": True},
                },
            ),
            mounts=({"name": "model", "mountPath": mount, "readOnly": True},),
        )
    # s3:// weights are streamed straight into GPU memory by vLLM's Run:ai model streamer
    # (https:// is refused by the spec: no vLLM loader reads a plain URL).
    return ModelLocation(source, None, extra_args=("--load-format", "runai_streamer"))


def served_name(name: str, spec: BaseModelSpec) -> str:
    return spec.model.served_name or name


def vllm_args(name: str, spec: BaseModelSpec, plan: Plan) -> list[str]:
    """vLLM's arguments: fixed wiring, then the planner's flags, then the user's extras."""
    loc = model_location(spec, weights_cache(name, spec))
    args = [
        "--model",
        loc.model_arg,
        "--served-model-name",
        served_name(name, spec),
        "--host",
        "127.0.0.1",
        "--port",
        str(naming.VLLM_PORT),
        "--enable-lora",
    ]
    if loc.revision:
        args += ["--revision", loc.revision]
    args += list(loc.extra_args)
    args += vllm_flags(plan)
    args += list(spec.engine.extra_args)
    return args


DEFAULT_SERVER_WORKERS = 2  # one core relays ~25k SSE events/s: about one busy GPU's output
SERVER_CPU_PER_WORKER_M = 500  # request half a core per worker; relaying is bursty


def server_workers(spec: BaseModelSpec) -> int:
    """The adapter-server's worker processes: its CPU limit rounded up when the spec sets one
    (what the server itself would read from its cgroup), else DEFAULT_SERVER_WORKERS."""
    limits = (spec.server.resources or {}).get("limits") or {}
    cpu = str(limits.get("cpu") or "")
    try:
        cores = int(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
    except ValueError:
        return DEFAULT_SERVER_WORKERS
    return max(1, min(16, math.ceil(cores)))


def server_resources(workers: int) -> dict[str, Any]:
    return {
        "requests": {"cpu": f"{workers * SERVER_CPU_PER_WORKER_M}m", "memory": "256Mi"},
        "limits": {"memory": "1Gi"},
    }


def server_args(workers: int = DEFAULT_SERVER_WORKERS) -> list[str]:
    """The adapter-server's flags, exactly as DESIGN.md's Commands section gives them."""
    return [
        "--vllm-url",
        f"http://127.0.0.1:{naming.VLLM_PORT}",
        "--manifest",
        f"{naming.MANIFEST_DIR}/{naming.MANIFEST_KEY}",
        "--cache-dir",
        naming.CACHE_DIR,
        "--port",
        str(naming.PUBLIC_PORT),
        "--admin-port",
        str(naming.ADMIN_PORT),
        "--admin-token-file",
        f"{naming.ADMIN_DIR}/{naming.TOKEN_KEY}",
        "--pvc-root",
        naming.PVC_ROOT,
        "--workers",
        str(workers),
    ]


def _vllm_env(spec: BaseModelSpec, loc: ModelLocation) -> list[dict[str, Any]]:
    fixed = {
        **pod.writable_env(),
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        "VLLM_NO_USAGE_STATS": "1",
    }
    if any(m["name"] == "weights" and not m.get("readOnly") for m in loc.mounts):
        # hf:// without a cache: the download goes to the sized `weights` emptyDir.
        fixed["HF_HOME"] = f"{WEIGHTS_MOUNT}/hf"
    return pod.env_list(fixed, [e.dump() for e in spec.engine.env])


def _vllm_resources(spec: BaseModelSpec, sizing: PodSizing) -> dict[str, Any]:
    """Requests from the plan; no CPU limit (throttling stalls the engine's scheduling loop)
    and no memory limit (weight loading peaks above the steady state; an OOM kill there is a
    restart loop), only the GPU limit, which the device plugin needs."""
    derived = {
        "requests": {
            "cpu": sizing.cpu_request,
            "memory": sizing.memory_request,
            "ephemeral-storage": sizing.ephemeral_request,
        },
    }
    res = pod.merge(derived, spec.engine.resources)
    res.setdefault("limits", {})[spec.gpu.resource_name] = spec.gpu.count
    res.setdefault("requests", {})[spec.gpu.resource_name] = spec.gpu.count
    return res


def _volumes(
    spec: BaseModelSpec, name: str, loc: ModelLocation, sizing: PodSizing
) -> list[dict[str, Any]]:
    cache: dict[str, Any]
    if spec.adapter_cache.claim_name:
        cache = {
            "name": "adapter-cache",
            "persistentVolumeClaim": {"claimName": spec.adapter_cache.claim_name},
        }
    else:
        cache = {"name": "adapter-cache", "emptyDir": {"sizeLimit": spec.adapter_cache.size_limit}}
    vols = [
        cache,
        manifest_volume(name),
        {
            "name": "admin-token",
            "secret": {"secretName": naming.secret_name(name), "defaultMode": 0o440},
        },
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": sizing.shm_size}},
        {"name": "tmp", "emptyDir": {"sizeLimit": SCRATCH_LIMIT}},
    ]
    for vol in spec.adapter_volumes:
        vols.append(
            {
                "name": f"pvc-{vol.claim_name}"[:63].rstrip("-."),
                "persistentVolumeClaim": {"claimName": vol.claim_name, "readOnly": True},
            }
        )
    if loc.mounts and not loc.volumes:  # hf:// without a cache: a sized emptyDir
        vols.append({"name": "weights", "emptyDir": {"sizeLimit": sizing.weights_volume}})
    return vols + list(loc.volumes)


def _adapter_mounts(spec: BaseModelSpec) -> list[dict[str, Any]]:
    """Adapter PVCs, read-only, at the same path in both containers (vLLM reads in place)."""
    return [
        {
            "name": f"pvc-{v.claim_name}"[:63].rstrip("-."),
            "mountPath": f"{naming.PVC_ROOT}/{v.claim_name}",
            "readOnly": True,
        }
        for v in spec.adapter_volumes
    ]


def spec_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# libyaml's loader where PyYAML was built with it: the pure-Python one was a tenth of the
# operator's CPU at 100 BaseModels (every pass renders every owned object).
_YAML_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _render(template: str, **values: Any) -> dict[str, Any]:
    text = _ENV.get_template(template).render(**values)
    out: dict[str, Any] = yaml.load(text, _YAML_LOADER)
    return out


def sizing_for(
    name: str, spec: BaseModelSpec, plan: Plan, footprint: Footprint | None
) -> PodSizing:
    cache = weights_cache(name, spec)
    in_pod = cache is None and spec.model.source.startswith("hf://")
    return pod_sizing(spec, plan, footprint or Footprint(None, None), downloads_in_pod=in_pod)


def build_deployment(
    owner: Owner,
    spec: BaseModelSpec,
    plan: Plan,
    images: Images,
    footprint: Footprint | None = None,
) -> dict[str, Any]:
    """The Deployment: vLLM on localhost plus the adapter-server in front of it."""
    loc = model_location(spec, weights_cache(owner.name, spec))
    sizing = sizing_for(owner.name, spec, plan, footprint)
    place = pod.placement(spec)
    cache_mount = {"name": "adapter-cache", "mountPath": naming.CACHE_DIR}
    deployment = _render(
        "deployment.yaml.j2",
        name=naming.deployment_name(owner.name),
        namespace=owner.namespace,
        labels=naming.labels(owner.name),
        selector=naming.selector_labels(owner.name),
        owner_refs=owner.refs(),
        replicas=spec.replicas,
        progress_deadline_seconds=sizing.progress_deadline_seconds,
        strategy=pod.strategy(spec),
        pod_labels={**spec.pod_labels, **naming.labels(owner.name)},
        pod_annotations=dict(sorted(spec.pod_annotations.items())),
        service_account_name=spec.service_account_name,
        termination_grace_period_seconds=spec.rollout.termination_grace_period_seconds,
        pod_security=pod.pod_security(spec),
        runtime_class_name=spec.runtime_class_name,
        priority_class_name=spec.priority_class_name,
        image_pull_secrets=pod.image_pull_secrets(spec),
        node_selector=place.node_selector,
        tolerations=place.tolerations,
        affinity=place.affinity,
        engine_image=spec.engine.image or images.engine,
        vllm_command=VLLM_COMMAND,
        vllm_args=vllm_args(owner.name, spec, plan),
        vllm_env=_vllm_env(spec, loc),
        vllm_resources=_vllm_resources(spec, sizing),
        vllm_probe=pod.VLLM_HEALTH_PROBE,
        probe_period=PROBE_PERIOD_SECONDS,
        startup_failures=sizing.startup_failure_threshold,
        vllm_pre_stop=pod.vllm_pre_stop(spec),
        vllm_security=spec.engine.security_context or pod.VLLM_SECURITY,
        vllm_mounts=[
            {**cache_mount, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "tmp", "mountPath": pod.SCRATCH},
            *_adapter_mounts(spec),
            *loc.mounts,
        ],
        server_image=spec.server.image or images.server,
        server_args=server_args(server_workers(spec)),
        server_env=pod.server_env(),
        server_pre_stop=["sleep", str(spec.rollout.pre_stop_seconds)],
        credentials_secret=pod.credentials(spec),
        public_port=naming.PUBLIC_PORT,
        admin_port=naming.ADMIN_PORT,
        server_resources=spec.server.resources or server_resources(server_workers(spec)),
        server_security=spec.server.security_context or pod.SERVER_SECURITY,
        server_mounts=[
            cache_mount,
            {"name": "manifest", "mountPath": naming.MANIFEST_DIR, "readOnly": True},
            {"name": "admin-token", "mountPath": naming.ADMIN_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": pod.SCRATCH},
            *_adapter_mounts(spec),
        ],
        volumes=_volumes(spec, owner.name, loc, sizing),
    )
    template = deployment["spec"]["template"]
    template["metadata"]["annotations"][naming.SPEC_HASH] = spec_hash(template["spec"])
    if spec.autoscaling.enabled:
        # The autoscaler owns replicas: leaving the field out of what we apply means we never
        # fight it (a create starts at the API default, 1; KEDA may take it to 0).
        del deployment["spec"]["replicas"]
    return deployment


def build_weights_claim(
    owner: Owner, spec: BaseModelSpec, cache: WeightsCache, sizing: PodSizing
) -> dict[str, Any]:
    """The PVC the operator creates for the weights (only when weightsCache names none)."""
    assert spec.weights_cache is not None
    return _render(
        "pvc.yaml.j2",
        name=cache.claim_name,
        namespace=owner.namespace,
        labels=naming.labels(owner.name),
        owner_refs=owner.refs(),
        access_modes=spec.weights_cache.access_modes,
        storage_class_name=spec.weights_cache.storage_class_name,
        size=spec.weights_cache.size or sizing.weights_volume,
    )


def loader_script() -> str:
    """The loader Job's program: loraplex.weights_loader's source, run with `python3 -c`."""
    return Path(weights_loader.__file__).read_text()


def build_loader_job(
    owner: Owner,
    spec: BaseModelSpec,
    cache: WeightsCache,
    sizing: PodSizing,
    images: Images,
) -> dict[str, Any]:
    """The Job that fills the cache folder once; its name changes with the source/revision."""
    assert spec.weights_cache is not None
    place = pod.placement(spec)
    return _render(
        "job.yaml.j2",
        name=cache.job_name,
        namespace=owner.namespace,
        labels=naming.loader_labels(owner.name),
        annotations={f"{API_GROUP}/expected-bytes": str(sizing.checkpoint_bytes)},
        owner_refs=owner.refs(),
        active_deadline_seconds=sizing.loader_deadline_seconds,
        service_account_name=spec.service_account_name,
        pod_security=pod.pod_security(spec),
        priority_class_name=spec.priority_class_name,
        image_pull_secrets=pod.image_pull_secrets(spec),
        node_selector=place.node_selector,
        tolerations=place.tolerations,
        affinity=place.affinity,
        image=spec.weights_cache.loader_image or spec.engine.image or images.engine,
        script=loader_script(),
        args=[spec.model.source, spec.model.revision or "", cache.model_path],
        credentials_secret=pod.credentials(spec),
        env=pod.env_list({**pod.writable_env(), "HF_HUB_DISABLE_TELEMETRY": "1"}, []),
        mounts=[
            {"name": "weights", "mountPath": WEIGHTS_MOUNT},
            {"name": "tmp", "mountPath": pod.SCRATCH},
        ],
        volumes=[
            {"name": "weights", "persistentVolumeClaim": {"claimName": cache.claim_name}},
            {"name": "tmp", "emptyDir": {"sizeLimit": SCRATCH_LIMIT}},
        ],
    )


def build_pdb(owner: Owner) -> dict[str, Any]:
    return _render(
        "pdb.yaml.j2",
        name=naming.pdb_name(owner.name),
        namespace=owner.namespace,
        labels=naming.labels(owner.name),
        owner_refs=owner.refs(),
        selector=naming.selector_labels(owner.name),
    )


PLANNED_FLAGS = (
    "--max-loras",
    "--max-lora-rank",
    "--max-cpu-loras",
    "--gpu-memory-utilization",
    "--tensor-parallel-size",
    "--max-model-len",
    "--dtype",
)


def _vllm_flag_values(deployment: dict[str, Any] | None) -> dict[str, str]:
    containers = (
        (deployment or {}).get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
    )
    args: list[str] = next((c.get("args", []) for c in containers if c.get("name") == "vllm"), [])
    return {a: args[i + 1] for i, a in enumerate(args[:-1]) if a in PLANNED_FLAGS}


def plan_changes(observed: dict[str, Any] | None, desired: dict[str, Any]) -> list[str]:
    """The planned vLLM flags that differ between a running Deployment and the desired one,
    as `--flag old -> new`; these are what make a rollout, so users are told about them."""
    if observed is None:
        return []
    old, new = _vllm_flag_values(observed), _vllm_flag_values(desired)
    return [
        f"{f} {old.get(f)} -> {new[f]}" for f in PLANNED_FLAGS if f in new and old.get(f) != new[f]
    ]


def replan_message(changes: list[str], plan: Plan | None) -> str:
    """The Replanned event: which flags change, and the plan's reason for each new value."""
    why = []
    for change in changes:
        reason = plan.reason_for(change.split()[0]) if plan is not None else None
        if reason and reason not in why:
            why.append(reason)
    message = "vLLM flags changed, rolling the pods: " + ", ".join(changes)
    if why:
        message += "; because " + "; ".join(why)
    return message + " (set spec.lora.* explicitly to keep them fixed)"


def build_service(owner: Owner) -> dict[str, Any]:
    return _render(
        "service.yaml.j2",
        name=naming.service_name(owner.name),
        namespace=owner.namespace,
        labels=naming.labels(owner.name),
        selector=naming.selector_labels(owner.name),
        owner_refs=owner.refs(),
        public_port=naming.PUBLIC_PORT,
    )


def build_networkpolicy(
    owner: Owner, spec: BaseModelSpec, operator: OperatorPods
) -> dict[str, Any] | None:
    """Admin port: the operator's pods only. Public port: anyone, or spec.networkPolicy's
    peers. None when spec.networkPolicy.enabled is false."""
    if not spec.network_policy.enabled:
        return None
    operator_peer = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": operator.namespace}},
        "podSelector": {"matchLabels": dict(operator.labels)},
    }
    public_from = []
    for peer in spec.network_policy.public_from:
        rule: dict[str, Any] = {}
        if peer.namespace_labels is not None:
            rule["namespaceSelector"] = {"matchLabels": dict(sorted(peer.namespace_labels.items()))}
        if peer.pod_labels is not None:
            rule["podSelector"] = {"matchLabels": dict(sorted(peer.pod_labels.items()))}
        public_from.append(rule)
    if public_from:  # the operator polls each pod's GET /v1/adapters on the public port too
        public_from.insert(0, operator_peer)
    policy = _render(
        "networkpolicy.yaml.j2",
        name=naming.networkpolicy_name(owner.name),
        namespace=owner.namespace,
        labels=naming.labels(owner.name),
        selector=naming.selector_labels(owner.name),
        owner_refs=owner.refs(),
        admin_port=naming.ADMIN_PORT,
        public_port=naming.PUBLIC_PORT,
        operator_peer=operator_peer,
        public_from=public_from,
    )
    # Drift is "observed lacks something we set", so dropping publicFrom (a rule losing its
    # `from`) would go unseen; the hash of the whole spec makes every change a visible one.
    policy["metadata"]["annotations"][naming.SPEC_HASH] = spec_hash(policy["spec"])
    return policy


def manifest_volume(base: str) -> dict[str, Any]:
    """The index and every shard slot in one projected volume. The slot list is fixed (not
    the shards in use), so the pod template never changes with the adapters."""
    shards = [
        {"configMap": {"name": naming.manifest_shard_name(base, n), "optional": True}}
        for n in range(manifest_shards.MAX_SHARDS)
    ]
    sources = [{"configMap": {"name": naming.configmap_name(base)}}, *shards]
    return {"name": "manifest", "projected": {"sources": sources}}


def build_manifest_configmaps(owner: Owner, manifest: AdapterManifest) -> list[dict[str, Any]]:
    """The shard ConfigMaps, then the index ConfigMap: apply in this order, so a complete
    generation is stored before the index names it (see loraplex_server.manifest_shards).

    Raises `ManifestTooLarge` when even the compressed manifest has no room in the slots.
    """
    index, chunks = manifest_shards.split(
        manifest, lambda n: naming.manifest_shard_name(owner.name, n)
    )
    generation = {f"{API_GROUP}/manifest-generation": str(manifest.generation)}
    shards = [
        _render(
            "configmap.yaml.j2",
            name=ref.name,
            namespace=owner.namespace,
            labels=naming.labels(owner.name),
            annotations=generation,
            owner_refs=owner.refs(),
            data=None,
            binary_data={ref.key: base64.b64encode(chunk).decode()},
        )
        for ref, chunk in zip(index.shards, chunks, strict=True)
    ]
    doc = index.model_dump(by_alias=True, mode="json")
    index_cm = _render(
        "configmap.yaml.j2",
        name=naming.configmap_name(owner.name),
        namespace=owner.namespace,
        labels=naming.labels(owner.name),
        annotations=generation,
        owner_refs=owner.refs(),
        data={naming.MANIFEST_KEY: json.dumps(doc, indent=2, sort_keys=True)},
        binary_data=None,
    )
    return [*shards, index_cm]


def build_secret(owner: Owner, token: str) -> dict[str, Any]:
    return _render(
        "secret.yaml.j2",
        name=naming.secret_name(owner.name),
        namespace=owner.namespace,
        labels=naming.labels(owner.name),
        owner_refs=owner.refs(),
        string_data={naming.TOKEN_KEY: token},
    )


def render_all(
    owner: Owner,
    spec: BaseModelSpec,
    plan: Plan,
    manifest: AdapterManifest,
    token: str,
    images: Images = DEFAULT_IMAGES,
    operator: OperatorPods = DEFAULT_OPERATOR_PODS,
    footprint: Footprint | None = None,
) -> list[dict[str, Any]]:
    """Every object the operator applies for one BaseModel, in apply order: the NetworkPolicy
    before the Deployment, so no pod starts unguarded; the weights PVC and loader Job before
    the Deployment, which the operator holds back until the Job has succeeded (see
    loraplex.weights)."""
    policy = build_networkpolicy(owner, spec, operator)
    objs = [build_secret(owner, token), *build_manifest_configmaps(owner, manifest)]
    objs += [policy] if policy else []
    cache = weights_cache(owner.name, spec)
    if cache is not None:
        sizing = sizing_for(owner.name, spec, plan, footprint)
        if cache.create_claim:
            objs.append(build_weights_claim(owner, spec, cache, sizing))
        objs.append(build_loader_job(owner, spec, cache, sizing, images))
    objs += [build_deployment(owner, spec, plan, images, footprint), build_service(owner)]
    if spec.replicas > 1 or (spec.autoscaling.enabled and spec.autoscaling.max_replicas > 1):
        objs.append(build_pdb(owner))
    return objs


def render_routing(
    owner: Owner, spec: BaseModelSpec, caps: Capabilities = ALL_APIS
) -> list[dict[str, Any]]:
    """InferencePool, HTTPRoute and the autoscaler, as spec.routing/autoscaling ask.

    Raises `RoutingProblem` when one needs an API the cluster lacks.
    """
    return build_routing_objects(
        owner.name, owner.namespace, spec.routing, spec.autoscaling, owner.refs(), caps
    )
