#!/usr/bin/env bash
# End-to-end test on a real Kubernetes (kind): build both images, install the Helm chart,
# serve a small model with CPU vLLM, and check that
#   1. a LoRAAdapter becomes Ready (`kubectl wait --for=condition=Ready lora/...`),
#   2. a completion through the BaseModel's Service with "model": <adapter> succeeds and differs
#      from the base's,
#   3. hot add: a second adapter becomes Ready and serves WITHOUT a Deployment rollout,
#   4. (hf mode) the weights cache: a PVC and a loader Job download the model once, the
#      Deployment appears only after the Job has succeeded, and vLLM reads the PVC.
# The pod runs as the rendered uid (10001, no passwd entry in the image) with the rendered
# caches, probes and preStop hooks, as on a GPU cluster.
# Needs docker and kind (and network access to pull images and the model). It cannot run on
# machines without a container engine; see tests/kind/README.md.
#
#   make kind-e2e                          # or: bash tests/kind/e2e.sh
#   KEEP_CLUSTER=1 make kind-e2e           # leave the cluster up for debugging
#   E2E_MODEL=tiny make kind-e2e           # offline model: a tiny generated Qwen2 (fast)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"

CLUSTER="${CLUSTER:-loraplex-e2e}"
NAMESPACE="${NAMESPACE:-loraplex-e2e}"
SYSTEM_NAMESPACE="${SYSTEM_NAMESPACE:-loraplex-system}"
TAG="${TAG:-e2e}"
OPERATOR_IMAGE="loraplex/operator:${TAG}"
SERVER_IMAGE="loraplex/adapter-server:${TAG}"
# vLLM's official x86-64 CPU build (see docs.vllm.ai, "CPU" installation), at the release the
# rest of the tests run (operator/loraplex/versions.py, read the way the Makefile reads it).
VLLM_VERSION="$(sed -n 's/^VLLM_VERSION = "\(.*\)"/\1/p' operator/loraplex/versions.py)"
[ -n "$VLLM_VERSION" ] || { echo "e2e: no VLLM_VERSION in operator/loraplex/versions.py" >&2; exit 1; }
VLLM_CPU_IMAGE="${VLLM_CPU_IMAGE:-public.ecr.aws/q9t5s3a7/vllm-cpu-release-repo:v${VLLM_VERSION}}"
E2E_MODEL="${E2E_MODEL:-hf}"          # hf: Qwen2.5-0.5B-Instruct from Hugging Face; tiny: generated
HF_BASE="${HF_BASE:-Qwen/Qwen2.5-0.5B-Instruct}"
KIND_NODE_IMAGE="${KIND_NODE_IMAGE:-}"  # empty: kind's default node image
FAKE_GPU="loraplex.io/e2e-gpu"          # extended resource standing in for a GPU on the kind node
PY="${PY:-$REPO/.venv/bin/python}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/loraplex-e2e.XXXXXX")"
MODELS_DIR="$WORK/models"               # mounted into the kind node, served as a PVC
PF_PID=""

log() { printf '\n\033[1m>> %s\033[0m\n' "$*"; }
die() { printf 'e2e: %s\n' "$*" >&2; exit 1; }

# --- prerequisites ---------------------------------------------------------------------------
command -v docker >/dev/null 2>&1 || die "docker is required (this test cannot run without a container engine)"
docker info >/dev/null 2>&1 || die "docker is installed but the daemon is not reachable"
command -v kind >/dev/null 2>&1 || die "kind is required: https://kind.sigs.k8s.io/docs/user/quick-start/#installation"
command -v curl >/dev/null 2>&1 || die "curl is required"
[ -x "$PY" ] || die "$PY not found: run 'make setup' first"
# helm and kubectl: PATH first, else the ones `make setup` extracted into .venv/bin.
export PATH="$PATH:$REPO/.venv/bin"
command -v kubectl >/dev/null 2>&1 || die "kubectl not found (make setup extracts one into .venv/bin)"
command -v helm >/dev/null 2>&1 || die "helm not found (make setup extracts one into .venv/bin)"

cleanup() {
  local rc=$?
  [ -n "$PF_PID" ] && kill "$PF_PID" 2>/dev/null || true
  if [ "$rc" -ne 0 ]; then
    log "FAILED (exit $rc): state for debugging"
    kubectl get bm,lora,deploy,jobs,pvc,pods -A -o wide 2>/dev/null || true
    kubectl -n "$NAMESPACE" describe bm 2>/dev/null | tail -40 || true
    kubectl -n "$NAMESPACE" get lora -o yaml 2>/dev/null | sed -n '/^  status:/,/^- /p' | head -80 || true
    kubectl -n "$SYSTEM_NAMESPACE" logs deploy/loraplex --tail=80 2>/dev/null || true
    kubectl -n "$NAMESPACE" logs -l app.kubernetes.io/name=loraplex-vllm --all-containers --tail=60 2>/dev/null || true
  fi
  if [ "${KEEP_CLUSTER:-0}" = "1" ]; then
    log "KEEP_CLUSTER=1: cluster '$CLUSTER' left running (kind delete cluster --name $CLUSTER)"
  else
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
  fi
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT INT TERM

# --- model and adapters, on the host ----------------------------------------------------------
log "generating adapters ($E2E_MODEL mode) in $MODELS_DIR"
mkdir -p "$MODELS_DIR"
chmod 0755 "$WORK" "$MODELS_DIR"
E2E_MODEL="$E2E_MODEL" HF_BASE="$HF_BASE" MODELS_DIR="$MODELS_DIR" "$PY" - <<'PYEOF'
"""Adapters with random weights (so outputs visibly change), shaped for the base model."""
import json
import os
from pathlib import Path

from loraplex.devtools import tinymodel

models = Path(os.environ["MODELS_DIR"])
if os.environ["E2E_MODEL"] == "tiny":
    base = tinymodel.make_model(models / "base", arch="qwen2")
    for name, seed in (("sql", 1), ("support", 2)):
        tinymodel.make_adapter(base, models / "adapters" / name, rank=8, seed=seed)
        cfg = models / "adapters" / name / "adapter_config.json"
        data = json.loads(cfg.read_text())
        data["base_model_name_or_path"] = ""  # a local path means nothing inside the pod
        cfg.write_text(json.dumps(data, indent=2))
else:
    # Only config.json is downloaded; the base's weights are random here (never saved), and
    # the adapters' shapes match the real model the pod downloads.
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    repo = os.environ["HF_BASE"]
    config = AutoConfig.from_pretrained(repo)
    for name, seed in (("sql", 1), ("support", 2)):
        out = models / "adapters" / name
        if (out / "adapter_config.json").exists():
            continue
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
        lora = LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, task_type="CAUSAL_LM",
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        peft_model = get_peft_model(model, lora)
        with torch.no_grad():
            for pname, param in peft_model.named_parameters():
                if "lora_" in pname:
                    param.mul_(4.0)
        peft_model.save_pretrained(str(out), safe_serialization=True)
        cfg = out / "adapter_config.json"
        data = json.loads(cfg.read_text())
        data["base_model_name_or_path"] = repo
        cfg.write_text(json.dumps(data, indent=2))
        del model, peft_model
print("adapters:", sorted(p.name for p in (models / "adapters").iterdir()))
PYEOF
chmod -R a+rX "$MODELS_DIR"
if [ "$E2E_MODEL" = "tiny" ]; then
  BASE_SOURCE="pvc://e2e-models/base"
  MAX_MODEL_LEN=256
  WEIGHTS_CACHE="null"                  # a pvc:// model is already local: no cache
else
  BASE_SOURCE="hf://$HF_BASE"
  MAX_MODEL_LEN=1024
  WEIGHTS_CACHE="{}"                    # a PVC from kind's default (local-path) class + a loader Job
fi

# --- cluster ----------------------------------------------------------------------------------
log "creating kind cluster '$CLUSTER'"
kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
cat >"$WORK/kind.yaml" <<KINDEOF
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
  - role: control-plane
    extraMounts:
      - hostPath: $MODELS_DIR
        containerPath: /e2e-models
        readOnly: true
KINDEOF
kind create cluster --name "$CLUSTER" --config "$WORK/kind.yaml" --wait 120s \
  ${KIND_NODE_IMAGE:+--image "$KIND_NODE_IMAGE"}
kubectl config use-context "kind-$CLUSTER" >/dev/null
NODE="$(kubectl get nodes -o jsonpath='{.items[0].metadata.name}')"

# kind nodes have no GPUs. Advertise a made-up extended resource (Kubernetes' documented way:
# patch the node's status capacity) and point the BaseModel's spec.gpu.resourceName at it.
kubectl patch node "$NODE" --subresource=status --type=json \
  -p "[{\"op\":\"add\",\"path\":\"/status/capacity/${FAKE_GPU//\//~1}\",\"value\":\"1\"}]"

log "building and loading images"
docker build -q -f images/operator/Dockerfile -t "$OPERATOR_IMAGE" .
docker build -q -f images/adapter-server/Dockerfile -t "$SERVER_IMAGE" .
kind load docker-image --name "$CLUSTER" "$OPERATOR_IMAGE" "$SERVER_IMAGE"
if [ "${E2E_PRELOAD_VLLM:-0}" = "1" ]; then
  docker pull "$VLLM_CPU_IMAGE"
  kind load docker-image --name "$CLUSTER" "$VLLM_CPU_IMAGE"
fi

log "installing the chart"
kubectl create namespace "$NAMESPACE"
helm install loraplex charts/loraplex --namespace "$SYSTEM_NAMESPACE" --create-namespace \
  --set image.repository=loraplex/operator --set image.tag="$TAG" \
  --set serverImage.repository=loraplex/adapter-server --set serverImage.tag="$TAG" \
  --set engineImage.repository="${VLLM_CPU_IMAGE%:*}" --set engineImage.tag="${VLLM_CPU_IMAGE##*:}" \
  --set logLevel=debug --set logFormat=text \
  --wait --timeout 5m
kubectl -n "$SYSTEM_NAMESPACE" rollout status deploy/loraplex --timeout=3m

log "model volume, BaseModel and first adapter"
kubectl apply -f - <<YAMLEOF
apiVersion: v1
kind: PersistentVolume
metadata:
  name: e2e-models
spec:
  capacity: {storage: 10Gi}
  accessModes: [ReadOnlyMany]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: ""
  hostPath: {path: /e2e-models, type: Directory}
  claimRef: {namespace: $NAMESPACE, name: e2e-models}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: e2e-models
  namespace: $NAMESPACE
spec:
  accessModes: [ReadOnlyMany]
  storageClassName: ""
  volumeName: e2e-models
  resources: {requests: {storage: 10Gi}}
---
apiVersion: loraplex.io/v1alpha1
kind: BaseModel
metadata:
  name: base
  namespace: $NAMESPACE
spec:
  model:
    source: $BASE_SOURCE
    dtype: bfloat16
  gpu:
    count: 1
    memoryGiB: 16
    resourceName: $FAKE_GPU
  replicas: 1
  maxModelLen: $MAX_MODEL_LEN
  # Fixed LoRA limits: with "auto" the planner sizes them from the adapters present, so
  # adding one may change vLLM's flags (a rollout) and the hot-add check below would not hold.
  lora:
    maxLoras: 2
    maxLoraRank: 8
    maxCpuLoras: 4
  weightsCache: $WEIGHTS_CACHE
  engine:
    env:
      - {name: VLLM_CPU_KVCACHE_SPACE, value: "1"}
    # Over the plan-derived requests (sized for GPU nodes), so the pod fits a laptop's kind node.
    resources:
      requests: {cpu: "1", memory: 3Gi}
  # One kind node: no spare capacity for a surge pod during a rollout.
  rollout:
    strategy: Recreate
  adapterVolumes:
    - claimName: e2e-models
---
apiVersion: loraplex.io/v1alpha1
kind: LoRAAdapter
metadata:
  name: sql-expert
  namespace: $NAMESPACE
spec:
  baseModel: base
  source: pvc://e2e-models/adapters/sql
  rank: 8
  pinned: true
YAMLEOF

log "waiting for the BaseModel (vLLM on CPU: pulling the image and loading take minutes)"
kubectl -n "$NAMESPACE" wait --for=condition=Planned bm/base --timeout=2m
if [ "$E2E_MODEL" != "tiny" ]; then
  log "weights cache: the loader Job fills the PVC before the Deployment exists"
  kubectl -n "$NAMESPACE" wait --for=jsonpath='{.status.weights.job}' bm/base --timeout=2m >/dev/null 2>&1 || true
  JOB="$(kubectl -n "$NAMESPACE" get bm base -o jsonpath='{.status.weights.job}')"
  [ -n "$JOB" ] || die "no loader Job in status.weights"
  kubectl -n "$NAMESPACE" get pvc base-weights >/dev/null || die "the weights PVC was not created"
  if ! kubectl -n "$NAMESPACE" get job "$JOB" -o jsonpath='{.status.succeeded}' | grep -q 1; then
    kubectl -n "$NAMESPACE" get deploy base >/dev/null 2>&1 \
      && die "the Deployment exists before the loader Job succeeded"
  fi
  kubectl -n "$NAMESPACE" wait --for=condition=Complete "job/$JOB" --timeout=20m
  [ "$(kubectl -n "$NAMESPACE" get bm base -o jsonpath='{.status.weights.phase}')" = "Ready" ] \
    || kubectl -n "$NAMESPACE" wait --for=jsonpath='{.status.weights.phase}'=Ready bm/base --timeout=1m
  kubectl -n "$NAMESPACE" get deploy base -o jsonpath='{.spec.template.spec.containers[0].args}' \
    | grep -q '/mnt/loraplex/weights/' || die "vLLM does not read the cached weights"
fi
kubectl -n "$NAMESPACE" wait --for=condition=Ready bm/base --timeout=25m
kubectl -n "$NAMESPACE" wait --for=condition=Ready lora/sql-expert --timeout=5m
kubectl -n "$NAMESPACE" get bm,lora -o wide
[ "$(kubectl -n "$NAMESPACE" get pods -l loraplex.io/basemodel=base,app.kubernetes.io/name=loraplex-vllm \
  -o jsonpath='{.items[0].spec.securityContext.runAsUser}')" = "10001" ] || die "the pod does not run as uid 10001"

log "completions through the Service"
kubectl -n "$NAMESPACE" port-forward svc/base 18000:8000 >"$WORK/port-forward.log" 2>&1 &
PF_PID=$!
for _ in $(seq 1 30); do
  curl -fsS http://127.0.0.1:18000/v1/models >/dev/null 2>&1 && break
  sleep 1
done
complete() {  # complete MODEL -> prints the completion text; fails on any HTTP error
  curl -fsS http://127.0.0.1:18000/v1/completions -H 'Content-Type: application/json' \
    -d "{\"model\": \"$1\", \"prompt\": \"select name from\", \"max_tokens\": 8, \"temperature\": 0}" \
    | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["choices"][0]["text"])'
}
BASE_TEXT="$(complete base)"
SQL_TEXT="$(complete sql-expert)"
printf 'base:       %q\nsql-expert: %q\n' "$BASE_TEXT" "$SQL_TEXT"
[ "$BASE_TEXT" != "$SQL_TEXT" ] || die "the adapter did not change the output"
code="$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:18000/v1/completions \
  -H 'Content-Type: application/json' -d '{"model": "no-such-adapter", "prompt": "x", "max_tokens": 1}')"
[ "$code" = "404" ] || die "an undeclared adapter should get 404, got $code"

log "hot add: a second adapter, no rollout"
DEPLOY_GEN="$(kubectl -n "$NAMESPACE" get deploy base -o jsonpath='{.metadata.generation}')"
POD_BEFORE="$(kubectl -n "$NAMESPACE" get pods -l loraplex.io/basemodel=base -o jsonpath='{.items[*].metadata.uid}')"
kubectl apply -f - <<YAMLEOF
apiVersion: loraplex.io/v1alpha1
kind: LoRAAdapter
metadata:
  name: support-bot
  namespace: $NAMESPACE
spec:
  baseModel: base
  source: pvc://e2e-models/adapters/support
  rank: 8
YAMLEOF
kubectl -n "$NAMESPACE" wait --for=condition=Ready lora/support-bot --timeout=3m
SUPPORT_TEXT="$(complete support-bot)"
printf 'support-bot: %q\n' "$SUPPORT_TEXT"
[ "$(kubectl -n "$NAMESPACE" get deploy base -o jsonpath='{.metadata.generation}')" = "$DEPLOY_GEN" ] \
  || die "adding an adapter changed the Deployment (a rollout)"
[ "$(kubectl -n "$NAMESPACE" get pods -l loraplex.io/basemodel=base -o jsonpath='{.items[*].metadata.uid}')" = "$POD_BEFORE" ] \
  || die "adding an adapter replaced the pod"

log "removing an adapter"
kubectl -n "$NAMESPACE" delete lora support-bot --wait --timeout=2m
for _ in $(seq 1 30); do
  code="$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:18000/v1/completions \
    -H 'Content-Type: application/json' -d '{"model": "support-bot", "prompt": "x", "max_tokens": 1}')"
  [ "$code" = "404" ] && break
  sleep 2
done
[ "$code" = "404" ] || die "a deleted adapter still serves (HTTP $code)"

log "PASSED"
