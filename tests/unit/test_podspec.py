"""The pod as a GPU cluster runs it, asserted on the rendered objects (issue 9).

Matrix (BaseModels, each rendered and validated strictly against the Kubernetes schemas):
| case              | what it pins                                                          |
|-------------------|-----------------------------------------------------------------------|
| gated-hf          | credentials in vLLM (envFrom), HF download into a sized weights volume |
| s3                | runai streamer, credentials, no weights volume, small ephemeral request|
| tp2-h100-70b      | 2 GPUs, shm/CPU/memory scale with TP, H100 label values via affinity In|
| l4                | one label value -> nodeSelector                                       |
| cache-created     | PVC sized from the model + loader Job + Deployment reads it read-only  |
| cache-existing    | the user's PVC: no PVC object, Job and pod mount the claim             |
| user-selector     | a user nodeSelector (or affinity) replaces the derived one             |
| everything-set    | SA, runtime/priority class, pull secrets, pod labels/annotations, uid  |
Plus: USER/LOGNAME and every cache env var land on writable mounts in both containers;
vLLM's root writable, the adapter-server's read-only, both overridable; surge strategy and
Recreate; PDB only with replicas > 1; startup/progress bounds grow with the model; https://
and a cache on a local source are refused naming the field and the fix; the loader program
fills a folder from S3 (moto) atomically and idempotently, run as the Job runs it.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from loraplex.decide import decide
from loraplex.errors import InvalidSpec
from loraplex.offline import render_paths
from loraplex.render import Owner, loader_script
from loraplex.validation import parse_spec
from loraplex.weights_loader import MARKER

ROOT = Path(__file__).resolve().parents[2]
OWNER = Owner("base", "ml", "6b1e1f0a-2fa1-11d2-883f-0016d3cca427")
K8S_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
CREDS = {"secretRef": {"name": "model-creds"}}


@dataclass(frozen=True)
class Case:
    id: str
    spec: dict[str, Any]
    adapters: list[dict[str, Any]] = field(default_factory=list)


CASES = [
    Case(
        "gated-hf",
        {
            "model": {"source": "hf://meta-llama/Llama-3.1-8B-Instruct"},
            "gpu": {"product": "L40S"},
            "credentials": CREDS,
        },
    ),
    Case(
        "s3",
        {
            "model": {"source": "s3://models/qwen2.5-7b-instruct"},
            "gpu": {"product": "A100-80GB"},
            "credentials": CREDS,
        },
    ),
    Case(
        "tp2-h100-70b",
        {
            "model": {"source": "hf://meta-llama/Llama-3.1-70B-Instruct"},
            "gpu": {"product": "H100-80GB", "count": 2},
            "replicas": 2,
            "credentials": CREDS,
        },
    ),
    Case("l4", {"model": {"source": "hf://Qwen/Qwen2.5-1.5B-Instruct"}, "gpu": {"product": "L4"}}),
    Case(
        "cache-created",
        {
            "model": {"source": "hf://Qwen/Qwen2.5-14B-Instruct", "revision": "v1"},
            "gpu": {"product": "L40S"},
            "replicas": 3,
            "credentials": CREDS,
            "weightsCache": {"storageClassName": "efs", "accessModes": ["ReadWriteMany"]},
        },
    ),
    Case(
        "cache-existing",
        {
            "model": {"source": "s3://models/qwen2.5-7b-instruct"},
            "gpu": {"product": "L40S"},
            "serviceAccountName": "model-reader",
            "weightsCache": {"claimName": "shared-weights"},
        },
    ),
    Case(
        "user-selector",
        {
            "model": {"source": "hf://Qwen/Qwen2.5-7B-Instruct"},
            "gpu": {"product": "H100-80GB"},
            "nodeSelector": {"pool": "gpu-h100"},
            "tolerations": [
                {"key": "pool", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}
            ],
        },
    ),
    Case(
        "everything-set",
        {
            "model": {"source": "hf://Qwen/Qwen2.5-7B-Instruct"},
            "gpu": {"product": "L40S"},
            "serviceAccountName": "vllm",
            "runtimeClassName": "nvidia",
            "priorityClassName": "inference",
            "imagePullSecrets": [{"name": "regcred"}],
            "podLabels": {"team": "ml", "app.kubernetes.io/name": "hijack"},
            "podAnnotations": {"prometheus.io/scrape": "true"},
            "securityContext": {"runAsUser": 20000, "runAsGroup": 20001},
            "rollout": {"strategy": "Recreate", "terminationGracePeriodSeconds": 300},
            "engine": {
                "securityContext": {"readOnlyRootFilesystem": True, "runAsNonRoot": True},
                "resources": {"requests": {"memory": "64Gi"}, "limits": {"memory": "80Gi"}},
                "shmSize": "16Gi",
            },
            "server": {"securityContext": {"readOnlyRootFilesystem": False}},
        },
    ),
]


def render(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    d = decide(OWNER, spec, [], token="t" * 64, previous=None)
    assert d.invalid is None and d.plan is not None, d.invalid
    assert d.plan.feasible, d.plan.message
    return {o["kind"]: o for o in d.objects}


def case(id_: str) -> dict[str, dict[str, Any]]:
    return render(next(c for c in CASES if c.id == id_).spec)


def pod_of(objs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = objs["Deployment"]["spec"]["template"]["spec"]
    return spec


def containers(objs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in pod_of(objs)["containers"]}


def env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def flags(container: dict[str, Any]) -> dict[str, str]:
    return dict(itertools.pairwise(container["args"]))


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_every_object_passes_kubernetes_schemas_strictly(c: Case, version: str) -> None:
    for obj in render(c.spec).values():
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_user_and_caches_are_writable_in_both_containers(c: Case) -> None:
    """The CUDA image has no passwd entry for our uid: USER/LOGNAME stand in for it (torch's
    getpass.getuser()), and every cache path must be on a volume the container may write."""
    objs = render(c.spec)
    pod = pod_of(objs)
    emptydirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    for name, cont in containers(objs).items():
        e = env(cont)
        assert e["USER"] == e["LOGNAME"] == "loraplex", name
        writable = [
            m["mountPath"]
            for m in cont["volumeMounts"]
            if not m.get("readOnly") and m["name"] in emptydirs
        ]
        paths = {k: v for k, v in e.items() if v.startswith("/")}
        assert "HOME" in paths and "HF_HOME" in paths and "XDG_CACHE_HOME" in paths
        for key, path in paths.items():
            assert any(path == w or path.startswith(w + "/") for w in writable), (name, key, path)
    vllm_env = env(containers(objs)["vllm"])
    for key in (
        "TORCHINDUCTOR_CACHE_DIR",
        "TRITON_CACHE_DIR",
        "VLLM_CACHE_ROOT",
        "FLASHINFER_WORKSPACE_BASE",
        "CUDA_CACHE_PATH",
    ):
        assert key in vllm_env, key
    for vol in pod["volumes"]:
        if "emptyDir" in vol:
            assert vol["emptyDir"].get("sizeLimit"), f"unbounded emptyDir {vol['name']}"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_production_example_renders_valid_objects(version: str) -> None:
    objs = render_paths([ROOT / "examples" / "production"])
    kinds = [o["kind"] for o in objs]
    assert kinds == [
        "Secret",
        "ConfigMap",  # the manifest's shard, then its index
        "ConfigMap",
        "NetworkPolicy",
        "PersistentVolumeClaim",
        "Job",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
    ]
    for obj in objs:
        kubernetes_validate.validate(obj, version, strict=True)


def test_security_defaults_and_overrides() -> None:
    objs = case("gated-hf")
    pod, cs = pod_of(objs), containers(objs)
    assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["runAsGroup"] == 10001
    assert pod["securityContext"]["fsGroup"] == 10001
    assert cs["vllm"]["securityContext"]["readOnlyRootFilesystem"] is False  # NVIDIA CDI hooks
    assert cs["adapter-server"]["securityContext"]["readOnlyRootFilesystem"] is True
    objs = case("everything-set")
    pod, cs = pod_of(objs), containers(objs)
    assert pod["securityContext"]["runAsUser"] == 20000
    assert pod["securityContext"]["runAsGroup"] == pod["securityContext"]["fsGroup"] == 20001
    assert cs["vllm"]["securityContext"] == {"readOnlyRootFilesystem": True, "runAsNonRoot": True}
    assert cs["adapter-server"]["securityContext"] == {"readOnlyRootFilesystem": False}


@pytest.mark.parametrize("id_", ["gated-hf", "s3", "tp2-h100-70b"])
def test_credentials_reach_vllm_and_the_adapter_server(id_: str) -> None:
    for name, cont in containers(case(id_)).items():
        assert cont["envFrom"] == [{"secretRef": {"name": "model-creds"}}], name


def test_no_credentials_no_env_from() -> None:
    assert all("envFrom" not in c for c in containers(case("l4")).values())


def test_hf_downloads_into_a_sized_weights_volume() -> None:
    objs = case("gated-hf")
    vllm = containers(objs)["vllm"]
    vols = {v["name"]: v for v in pod_of(objs)["volumes"]}
    # Llama-3.1-8B: 8.03 B parameters in bfloat16 = 14.96 GiB; x1.2 + 2 GiB -> 20Gi.
    assert vols["weights"]["emptyDir"] == {"sizeLimit": "20Gi"}
    assert env(vllm)["HF_HOME"] == "/mnt/loraplex/weights/hf"
    # The pod asks the scheduler for that disk plus 2 GiB of scratch.
    assert vllm["resources"]["requests"]["ephemeral-storage"] == "22Gi"


def test_s3_streams_with_credentials_and_no_disk() -> None:
    objs = case("s3")
    vllm = containers(objs)["vllm"]
    f = flags(vllm)
    assert f["--model"] == "s3://models/qwen2.5-7b-instruct"
    assert f["--load-format"] == "runai_streamer"
    assert "weights" not in {v["name"] for v in pod_of(objs)["volumes"]}
    assert vllm["resources"]["requests"]["ephemeral-storage"] == "2Gi"


def test_two_gpu_tensor_parallel_scales_the_pod() -> None:
    objs = case("tp2-h100-70b")
    vllm = containers(objs)["vllm"]
    res = vllm["resources"]
    assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == 2
    assert flags(vllm)["--tensor-parallel-size"] == "2"
    assert res["requests"]["cpu"] == "4"  # API server + engine core + 2 workers
    assert "memory" not in res["limits"] and "cpu" not in res["limits"]
    one_gpu = containers(case("gated-hf"))["vllm"]["resources"]["requests"]
    assert int(res["requests"]["memory"][:-2]) > int(one_gpu["memory"][:-2])
    dshm = next(v for v in pod_of(objs)["volumes"] if v["name"] == "dshm")
    assert dshm["emptyDir"] == {"medium": "Memory", "sizeLimit": "3Gi"}
    assert objs["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    assert (
        objs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]
        == (objs["Deployment"]["spec"]["selector"]["matchLabels"])
    )


def test_h100_selects_every_h100_label_value() -> None:
    pod = pod_of(case("tp2-h100-70b"))
    assert pod["nodeSelector"] == {}
    [term] = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert term["matchExpressions"] == [
        {
            "key": "nvidia.com/gpu.product",
            "operator": "In",
            "values": ["NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-PCIe"],
        }
    ]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]


def test_l4_and_l40s_select_their_own_nodes() -> None:
    assert pod_of(case("l4"))["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L4"}
    assert pod_of(case("gated-hf"))["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L40S"}
    assert "affinity" not in pod_of(case("l4"))


def test_user_node_selector_or_affinity_replace_the_derived_one() -> None:
    pod = pod_of(case("user-selector"))
    assert pod["nodeSelector"] == {"pool": "gpu-h100"}
    assert "affinity" not in pod
    keys = [t["key"] for t in pod["tolerations"]]
    assert keys == ["pool", "nvidia.com/gpu"], "the user's tolerations, plus the GPU taint's"
    affinity = {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}}
    pod = pod_of(
        render(
            {
                "model": {"source": "hf://Qwen/Qwen2.5-7B-Instruct"},
                "gpu": {"product": "L4"},
                "affinity": affinity,
            }
        )
    )
    assert pod["nodeSelector"] == {} and pod["affinity"] == affinity
    # An unknown product (memory given by hand) selects nothing.
    pod = pod_of(
        render({"model": {"source": "hf://Qwen/Qwen2.5-7B-Instruct"}, "gpu": {"memoryGiB": 48}})
    )
    assert pod["nodeSelector"] == {} and "affinity" not in pod


def test_pod_fields_from_the_spec() -> None:
    objs = case("everything-set")
    pod = pod_of(objs)
    assert pod["serviceAccountName"] == "vllm"
    assert pod["automountServiceAccountToken"] is False  # IRSA/Workload Identity inject their own
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["priorityClassName"] == "inference"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    meta = objs["Deployment"]["spec"]["template"]["metadata"]
    assert meta["labels"]["team"] == "ml"
    assert meta["labels"]["app.kubernetes.io/name"] == "loraplex-vllm", "ours win"
    assert meta["annotations"]["prometheus.io/scrape"] == "true"
    assert objs["Deployment"]["spec"]["strategy"] == {"type": "Recreate"}
    assert pod["terminationGracePeriodSeconds"] == 300
    vllm = containers(objs)["vllm"]
    assert vllm["resources"]["requests"]["memory"] == "64Gi", "the user's request wins"
    assert vllm["resources"]["limits"]["memory"] == "80Gi"
    assert vllm["resources"]["requests"]["cpu"] == "2", "derived values the user left alone stay"
    dshm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert dshm["emptyDir"]["sizeLimit"] == "16Gi"


def test_default_rollout_is_surge_with_a_drain() -> None:
    objs = case("gated-hf")
    dep = objs["Deployment"]
    assert dep["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    assert "PodDisruptionBudget" not in objs, "one replica: a PDB would block node drains"
    pod = pod_of(objs)
    grace = pod["terminationGracePeriodSeconds"]
    cs = containers(objs)
    assert cs["adapter-server"]["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "10"]
    vllm_pre_stop = cs["vllm"]["lifecycle"]["preStop"]["exec"]["command"]
    assert vllm_pre_stop[:2] == ["python3", "-c"]
    assert f"time.monotonic() + {grace - 5}" in vllm_pre_stop[2], "bounded by the grace period"
    compile(vllm_pre_stop[2], "preStop", "exec")


def test_pre_stop_must_leave_time_for_the_drain() -> None:
    with pytest.raises(InvalidSpec, match="preStopSeconds"):
        parse_spec_from(
            {
                "model": {"source": "hf://a/b"},
                "rollout": {"preStopSeconds": 60, "terminationGracePeriodSeconds": 60},
            }
        )
    with pytest.raises(InvalidSpec, match="cannot both be 0"):
        parse_spec_from({"model": {"source": "hf://a/b"}, "rollout": {"maxSurge": 0}})


def test_probes_allow_the_model_load_time() -> None:
    small, large = case("l4"), case("tp2-h100-70b")

    def startup_budget(objs: dict[str, dict[str, Any]], name: str) -> int:
        probe = containers(objs)[name]["startupProbe"]
        return int(probe["periodSeconds"] * probe["failureThreshold"])

    for name in ("vllm", "adapter-server"):
        # 1.5B bf16 = 3.1 GB -> 600 s + 62 s; 70B = 141 GB -> 600 s + 2822 s.
        assert 600 <= startup_budget(small, name) < 700
        assert 3400 <= startup_budget(large, name) < 3500
    for objs in (small, large):
        deadline = objs["Deployment"]["spec"]["progressDeadlineSeconds"]
        assert deadline >= startup_budget(objs, "vllm") + 600
    vllm = containers(large)["vllm"]
    assert vllm["livenessProbe"]["exec"]["command"] == vllm["startupProbe"]["exec"]["command"]
    assert vllm["readinessProbe"]["exec"]["command"] == vllm["startupProbe"]["exec"]["command"]
    assert "127.0.0.1:8001/health" in vllm["livenessProbe"]["exec"]["command"][2]
    server = containers(large)["adapter-server"]
    assert server["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert server["livenessProbe"]["httpGet"]["path"] == "/healthz"
    fixed = render(
        {
            "model": {"source": "hf://Qwen/Qwen2.5-1.5B-Instruct"},
            "rollout": {"startupSeconds": 7200, "progressDeadlineSeconds": 9000},
        }
    )
    assert startup_budget(fixed, "vllm") == 7200
    assert fixed["Deployment"]["spec"]["progressDeadlineSeconds"] == 9000


def test_created_cache_pvc_job_and_read_only_mount() -> None:
    objs = case("cache-created")
    pvc, job = objs["PersistentVolumeClaim"], objs["Job"]
    assert pvc["metadata"]["name"] == "base-weights"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["storageClassName"] == "efs"
    # Qwen2.5-14B: 14.8 B parameters in bfloat16 = 27.5 GiB; x1.2 + 2 GiB -> 36Gi.
    assert pvc["spec"]["resources"]["requests"]["storage"] == "36Gi"
    [loader] = job["spec"]["template"]["spec"]["containers"]
    assert loader["command"][:2] == ["python3", "-c"] and loader["command"][2] == loader_script()
    source, revision, folder = loader["args"]
    assert (source, revision) == ("hf://Qwen/Qwen2.5-14B-Instruct", "v1")
    assert loader["envFrom"] == [{"secretRef": {"name": "model-creds"}}]
    assert job["spec"]["activeDeadlineSeconds"] > 1800
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    # The loader runs where the GPU pods run (a ReadWriteOnce volume binds to its zone).
    assert job["spec"]["template"]["spec"]["nodeSelector"] == pod_of(objs)["nodeSelector"]
    vllm = containers(objs)["vllm"]
    assert flags(vllm)["--model"] == folder
    assert "--revision" not in flags(vllm)
    weights = next(v for v in pod_of(objs)["volumes"] if v["name"] == "weights")
    assert weights["persistentVolumeClaim"] == {"claimName": "base-weights", "readOnly": True}
    mount = next(m for m in vllm["volumeMounts"] if m["name"] == "weights")
    assert mount["readOnly"] is True
    assert vllm["resources"]["requests"]["ephemeral-storage"] == "2Gi", "no download in the pod"
    # Apply order: the PVC and Job before the Deployment that waits for them.
    kinds = list(objs)
    assert kinds.index("Job") < kinds.index("Deployment")
    assert kinds.index("PersistentVolumeClaim") < kinds.index("Job")


def test_existing_cache_claim_and_service_account() -> None:
    objs = case("cache-existing")
    assert "PersistentVolumeClaim" not in objs
    job_pod = objs["Job"]["spec"]["template"]["spec"]
    assert job_pod["serviceAccountName"] == pod_of(objs)["serviceAccountName"] == "model-reader"
    assert job_pod["volumes"][0]["persistentVolumeClaim"] == {"claimName": "shared-weights"}
    assert flags(containers(objs)["vllm"])["--model"].startswith("/mnt/loraplex/weights/s3/")
    assert "--load-format" not in flags(containers(objs)["vllm"]), "a local folder now"


def test_a_new_revision_gets_a_new_folder_and_job() -> None:
    spec = next(c for c in CASES if c.id == "cache-created").spec
    a, b = render(spec), render({**spec, "model": {**spec["model"], "revision": "v2"}})
    assert a["Job"]["metadata"]["name"] != b["Job"]["metadata"]["name"]
    assert (
        a["Job"]["spec"]["template"]["spec"]["containers"][0]["args"][2]
        != (b["Job"]["spec"]["template"]["spec"]["containers"][0]["args"][2])
    )
    assert len(a["Job"]["metadata"]["name"]) <= 63


def parse_spec_from(raw: dict[str, Any]) -> Any:
    from loraplex.api.basemodel import BaseModelSpec

    return parse_spec(BaseModelSpec, raw)


@pytest.mark.parametrize(
    ("raw", "field_", "fix"),
    [
        ({"model": {"source": "https://example.com/llama.tar"}}, "spec.model.source", "pvc://"),
        (
            {"model": {"source": "pvc://models/llama"}, "weightsCache": {}},
            "spec",
            "remove spec.weightsCache",
        ),
    ],
    ids=["https-source", "cache-of-a-local-source"],
)
def test_refused_specs_name_the_field_and_the_fix(
    raw: dict[str, Any], field_: str, fix: str
) -> None:
    d = decide(OWNER, raw, [], token="t", previous=None)
    assert d.invalid is not None and not d.objects
    assert d.invalid.field == field_
    assert fix in d.invalid.message


# --- the loader Job's program ----------------------------------------------------------------


@pytest.fixture
def s3_bucket() -> Iterator[dict[str, str]]:
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    client.create_bucket(Bucket="models")
    for key, body in {
        "qwen/config.json": b'{"model_type": "qwen2"}',
        "qwen/model-00001.safetensors": b"x" * 1000,
        "qwen/tokenizer/tokenizer.json": b"{}",
        "qwen-other/config.json": b"not mine",
    }.items():
        client.put_object(Bucket="models", Key=key, Body=body)
    yield env
    server.stop()


def run_loader(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """As the Job runs it: `python3 -c <script> SOURCE REVISION FOLDER`."""
    return subprocess.run(
        [sys.executable, "-c", loader_script(), *args],
        env={"PATH": os.environ["PATH"], "HOME": "/nonexistent", **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_loader_fills_the_folder_from_s3_once(s3_bucket: dict[str, str], tmp_path: Path) -> None:
    folder = tmp_path / "s3" / "models_qwen-default-abc"
    done = run_loader(["s3://models/qwen", "", str(folder)], s3_bucket)
    assert done.returncode == 0, done.stderr
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == [MARKER, "config.json", "model-00001.safetensors", "tokenizer/tokenizer.json"]
    assert not (tmp_path / "s3" / "models_qwen-default-abc.partial").exists()
    again = run_loader(["s3://models/qwen", "", str(folder)], {})  # no credentials needed now
    assert again.returncode == 0 and "already cached" in again.stdout


def test_loader_failure_is_a_message_and_leaves_no_folder(
    s3_bucket: dict[str, str], tmp_path: Path
) -> None:
    folder = tmp_path / "w"
    failed = run_loader(["s3://models/nothing-here", "", str(folder)], s3_bucket)
    assert failed.returncode == 1
    assert "FileNotFoundError: no objects under s3://models/nothing-here" in failed.stderr
    assert not folder.exists()
    denied = run_loader(
        ["s3://models/qwen", "", str(folder)],
        {**s3_bucket, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"},
    )
    assert denied.returncode == 1 and not folder.exists()


# --- status from the loader Job, pure ------------------------------------------------------


def test_loader_state_and_failure_message() -> None:
    from loraplex.api.basemodel import BaseModelSpec
    from loraplex.weights import failure_message, loader_state, weights_cache

    spec = BaseModelSpec.model_validate(
        {"model": {"source": "s3://bucket/model"}, "weightsCache": {}}
    )
    cache = weights_cache("base", spec)
    assert cache is not None
    assert loader_state(cache, None, 10).phase == "Pending"
    running = {"status": {"active": 1, "failed": 1, "startTime": "t0"}}
    st = loader_state(cache, running, 3 * 1024**3)
    assert st.phase == "Downloading" and st.attempts == 1
    assert "3.0 GiB" in st.message and "started t0" in st.message
    done = {"status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    assert loader_state(cache, done, None).phase == "Ready"
    failed = {
        "status": {
            "failed": 5,
            "conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}],
        }
    }
    st = loader_state(cache, failed, None)
    assert st.phase == "Failed" and "DeadlineExceeded" in st.message
    assert f"kubectl delete job {cache.job_name}" in st.message

    def pod(job: str, when: str, message: str, code: int = 1) -> dict[str, Any]:
        term = {"exitCode": code, "finishedAt": when, "message": message}
        return {
            "metadata": {"labels": {"batch.kubernetes.io/job-name": job}},
            "status": {"containerStatuses": [{"state": {"terminated": term}}]},
        }

    pods = [
        pod(cache.job_name, "2026-01-01T00:01:00Z", "first"),
        pod(cache.job_name, "2026-01-01T00:09:00Z", "last"),
        pod("other-job", "2026-01-01T00:10:00Z", "not ours"),
        pod(cache.job_name, "2026-01-01T00:11:00Z", "succeeded", code=0),
    ]
    assert failure_message(pods, cache.job_name) == "last"
    assert failure_message([], cache.job_name) is None


def test_base_status_while_downloading_and_on_a_stalled_rollout() -> None:
    from loraplex.api.basemodel import BaseModelSpec, BaseModelStatus, WeightsStatus
    from loraplex.planner import plan_base_model
    from loraplex.status import base_status

    spec = BaseModelSpec.model_validate(
        {"model": {"source": "hf://Qwen/Qwen2.5-7B-Instruct"}, "gpu": {"product": "L40S"}}
    )
    plan = plan_base_model(spec, [])
    downloading = WeightsStatus(phase="Downloading", message="loader Job x downloading")

    def conds(st: BaseModelStatus) -> dict[str, tuple[str, str]]:
        return {c.type: (c.status, c.reason) for c in st.conditions}

    fresh = base_status(BaseModelStatus(), 1, plan=plan, replicas=1, weights=downloading)
    assert fresh.phase == "Downloading"
    assert conds(fresh)["Progressing"] == ("True", "DownloadingWeights")
    assert conds(fresh)["Ready"] == ("False", "DownloadingWeights")
    # A new revision downloading while the old one serves: still Ready.
    serving = {"status": {"readyReplicas": 1}}
    st = base_status(
        BaseModelStatus(), 2, plan=plan, replicas=1, deployment=serving, weights=downloading
    )
    assert st.phase == "Ready" and conds(st)["Ready"] == ("True", "Ready")
    assert conds(st)["Progressing"] == ("True", "DownloadingWeights")
    failed = WeightsStatus(phase="Failed", message="GatedRepoError")
    st = base_status(BaseModelStatus(), 1, plan=plan, replicas=1, weights=failed)
    assert st.phase == "Failed" and conds(st)["Ready"] == ("False", "WeightsDownloadFailed")
    stalled = {
        "status": {
            "conditions": [
                {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}
            ]
        }
    }
    st = base_status(BaseModelStatus(), 1, plan=plan, replicas=1, deployment=stalled)
    assert conds(st)["Ready"] == ("False", "ProgressDeadlineExceeded")
    assert conds(st)["Progressing"][0] == "False"
    assert "spec.rollout.progressDeadlineSeconds" in st.conditions[-1].message


# --- vLLM's own parser on the rendered arguments ----------------------------------------------


@pytest.mark.vllm
@pytest.mark.parametrize("id_", ["gated-hf", "s3", "tp2-h100-70b", "cache-created"])
def test_vllm_parses_the_rendered_arguments(id_: str) -> None:
    """`vllm serve`'s parser (the pinned release) accepts exactly what the pod runs with."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    vllm = containers(case(id_))["vllm"]
    parser = make_arg_parser(FlexibleArgumentParser())  # type: ignore[no-untyped-call]
    args = parser.parse_args(vllm["args"])
    validate_parsed_serve_args(args)
    assert args.model == flags(vllm)["--model"]
    assert args.tensor_parallel_size == int(flags(vllm)["--tensor-parallel-size"])
    if id_ == "s3":
        assert args.load_format == "runai_streamer"


SYSTEM_PYTHON = Path("/usr/bin/python3")  # runnable by any uid, unlike a venv under /root


@pytest.mark.skipif(
    os.geteuid() != 0 or not SYSTEM_PYTHON.exists(), reason="needs root to run as another uid"
)
@pytest.mark.parametrize("container", ["vllm", "adapter-server"])
def test_rendered_uid_without_passwd_entry_gets_a_user_name(container: str) -> None:
    """torch's cache code calls getpass.getuser(); as a uid with no passwd entry (the CUDA
    image's case) that raises unless USER/LOGNAME are in the environment, as rendered."""
    objs = case("gated-hf")
    uid = pod_of(objs)["securityContext"]["runAsUser"]
    rendered = env(containers(objs)[container])
    script = "import getpass; print(getpass.getuser())"

    def as_uid(environ: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(SYSTEM_PYTHON), "-c", script],
            user=uid,
            group=uid,
            env={"PATH": "/usr/bin:/bin", **environ},
            cwd="/",
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    import pwd

    with pytest.raises(KeyError):
        pwd.getpwuid(uid)
    bare = {k: v for k, v in rendered.items() if k not in ("USER", "LOGNAME")}
    assert "uid not found" in as_uid(bare).stderr, "without USER/LOGNAME it must fail"
    ok = as_uid(rendered)
    assert ok.returncode == 0 and ok.stdout.strip() == "loraplex", ok.stderr
