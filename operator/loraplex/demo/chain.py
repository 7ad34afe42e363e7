"""The demo chain, shared by `make demo` and the end-to-end test.

API stand-in (kmock emulator, in this process) -> `loraplex operator` (a real process) ->
apply examples/ -> the rendered pod run as local processes (CPU vLLM with a tiny generated
model, and loraplex-server, with exactly the rendered arguments apart from the printed
substitutions) -> requests with the official `openai` client -> hot add, delete -> tables.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import yaml

from loraplex import naming
from loraplex.demo.tables import table
from loraplex.devtools.emulator import RunningEmulator, running_emulator
from loraplex.devtools.kubelet import (
    LocalPod,
    fetch_refs,
    plan_local_pod,
    publish_pod,
    referenced,
    start_containers,
    stop_containers,
    sync_volumes,
)
from loraplex.devtools.operator_proc import OperatorProcess
from loraplex.devtools.tinymodel import make_adapter, make_model
from loraplex.kube import BASEMODELS, DEPLOYMENTS, LORAADAPTERS, Connection, KubeClient

ROOT = Path(__file__).resolve().parents[3]
NS = "default"
BASE = "qwen-14b"
CLAIM = "team-adapters"
PROMPT = "select name from"


@dataclass
class ChainResult:
    """What the chain observed, for the demo's summary and the test's assertions."""

    substitutions: list[str] = field(default_factory=list)
    vllm_argv: list[str] = field(default_factory=list)
    server_argv: list[str] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    hot_added_output: str = ""
    deleted_error: str = ""
    tables: str = ""
    vllm_pids: tuple[int, int] = (0, 0)
    sandboxed: bool = False
    rules: list[str] = field(default_factory=list)
    # What the running vLLM process looked like from the host (/proc), while it served.
    vllm_proc: dict[str, Any] = field(default_factory=dict)
    vllm_env: dict[str, str] = field(default_factory=dict)  # what the runner gave vLLM
    rendered_env: dict[str, list[str]] = field(default_factory=dict)  # names, per container
    # The rendered securityContexts: "pod" and one per container name.
    rendered_security: dict[str, dict[str, Any]] = field(default_factory=dict)
    statuses: dict[str, Any] = field(default_factory=dict)


ARCHITECTURE_SUBSTITUTION = (
    "BaseModel spec.model.architecture: the tiny model's shape, so the plan and the pods' "
    "adapter checks (module names and sizes) judge the adapters against the model that runs"
)


def _shape_of(model: Path) -> dict[str, Any]:
    """spec.model.architecture for the tiny model that stands in for the example's."""
    cfg = json.loads((model / "config.json").read_text())
    keys = (
        "model_type",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "tie_word_embeddings",
    )
    camel = {
        k: "".join(w.capitalize() if i else w for i, w in enumerate(k.split("_"))) for k in keys
    }
    return {camel[k]: cfg[k] for k in keys if cfg.get(k) is not None}


def _examples() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for name in ("basemodel.yaml", "adapter.yaml"):
        docs += [d for d in yaml.safe_load_all((ROOT / "examples" / name).read_text()) if d]
    return docs


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status)
    except OSError:
        return 0


async def _wait(what: str, probe: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(0.25)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


class Chain:
    """One run of the chain; `run()` does everything and always cleans up."""

    def __init__(
        self,
        workdir: Path,
        say: Callable[[str], None],
        *,
        remap_ports: bool = True,
        sandbox: bool | None = None,
    ):
        self.workdir = workdir
        self.sandbox = sandbox
        self.say = say
        self.remap_ports = remap_ports
        self.result = ChainResult()
        self.claims = {CLAIM: workdir / "pvc" / CLAIM}
        self.pod: LocalPod | None = None

    def _step(self, text: str) -> float:
        self.say(f"\n==> {text}")
        return time.monotonic()

    def _done(self, key: str, start: float) -> None:
        self.result.timings[key] = round(time.monotonic() - start, 2)
        self.say(f"    ({self.result.timings[key]:.1f}s)")

    async def run(self) -> ChainResult:
        t = self._step("Generating a tiny model and LoRA adapters (stand-ins for real weights)")
        model = make_model(self.workdir / "models" / "tiny-llama")
        adapters = self.claims[CLAIM]
        make_adapter(model, adapters / "sql-expert", rank=16, seed=11)
        make_adapter(model, adapters / "support-bot" / "v3", rank=8, seed=12)
        make_adapter(model, adapters / "chat-helper", rank=8, seed=13)
        self._done("generate_models", t)
        async with running_emulator(self.workdir) as cluster:
            op = OperatorProcess(cluster.kubeconfig, self.workdir)
            kube = KubeClient(Connection(server=cluster.url), user_agent="loraplex-demo")
            kubelet: asyncio.Task[None] | None = None
            try:
                self.say(f"    Kubernetes API stand-in at {cluster.url}")
                op.start()
                self.say(
                    f"    operator running (pid {op.proc.pid if op.proc else '?'}), "
                    f"log: {op.log_path}"
                )
                pod = await self._deploy(cluster, kube, model)
                kubelet = asyncio.create_task(self._kubelet(kube, pod))
                await self._serve(cluster, kube, pod)
            finally:
                if kubelet is not None:
                    kubelet.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await kubelet
                if self.pod is not None:
                    await asyncio.to_thread(stop_containers, self.pod)
                await kube.close()
                await asyncio.to_thread(op.stop)
        return self.result

    async def _deploy(self, cluster: RunningEmulator, kube: KubeClient, model: Path) -> LocalPod:
        t = self._step("kubectl apply -f examples/  (BaseModel qwen-14b, LoRAAdapters)")
        await asyncio.sleep(1.5)  # the operator starts watching
        apply_start = time.monotonic()
        for doc in _examples():
            if doc["kind"] == "BaseModel":
                doc["spec"]["model"]["architecture"] = _shape_of(model)
            await kube.apply(doc)
        dep = await _wait(
            "the operator's Deployment",
            lambda: kube.get(DEPLOYMENTS, NS, naming.deployment_name(BASE)),
            60,
        )
        wanted = referenced(dep)  # a kubelet waits for the pod's ConfigMaps and Secrets
        refs = await _wait(
            "the pod's ConfigMaps and Secrets",
            lambda: _all_refs(kube, dep, wanted),
            60,
        )
        self._done("apply_to_deployment", t)
        pod = plan_local_pod(
            dep,
            root=self.workdir / "pod",
            model_dir=model,
            claims=self.claims,
            refs=refs,
            remap_ports=self.remap_ports,
            sandbox=self.sandbox,
        )
        self.result.substitutions = [*pod.substitutions, ARCHITECTURE_SUBSTITUTION]
        self.result.sandboxed = pod.sandboxed
        self.result.rules = pod.rules()
        self.result.vllm_env = pod.env["vllm"]
        template = dep["spec"]["template"]["spec"]
        self.result.rendered_env = {
            c["name"]: [e["name"] for e in c.get("env") or []] for c in template["containers"]
        }
        self.result.rendered_security = {
            "pod": template.get("securityContext") or {},
            **{c["name"]: c.get("securityContext") or {} for c in template["containers"]},
        }
        self.result.vllm_argv = pod.argv["vllm"]
        self.result.server_argv = pod.argv["adapter-server"]
        self.say(
            "    rendered vLLM container, run locally as:\n      " + " ".join(pod.argv["vllm"])
        )
        self.say(
            "    rendered adapter-server container, run locally as:\n      "
            + " ".join(pod.argv["adapter-server"])
        )
        self.say("    the pod's rules, enforced with bubblewrap:" if pod.sandboxed else "")
        for line in pod.rules():
            self.say(f"      - {line}")
        self.say("    substitutions (everything else is exactly as rendered):")
        for s in self.result.substitutions:
            self.say(f"      - {s}")
        t = self._step("Starting the pod's containers: vLLM (CPU) then loraplex-server")
        self.pod = pod  # visible to run()'s cleanup even if interrupted while starting
        await start_containers(pod)
        self.result.vllm_pids = (pod.procs["vllm"].pid, 0)
        self.result.vllm_proc = inspect_process(pod.procs["vllm"].pid)
        self._done("containers_started", t)
        await _wait(
            "/readyz (vLLM up, pinned adapter loaded)",
            lambda: _get(pod.url(naming.PUBLIC_PORT) + "/readyz") == 200,
            120,
        )
        self.result.timings["cold_start_apply_to_ready"] = round(time.monotonic() - apply_start, 2)
        return pod

    async def _kubelet(self, kube: KubeClient, pod: LocalPod) -> None:
        """Keep mounted files and the Pod's readiness current, as a kubelet would."""
        while True:
            with contextlib.suppress(Exception):
                await sync_volumes(kube, NS, pod)
                ready = _get(pod.url(naming.PUBLIC_PORT) + "/readyz") == 200
                await publish_pod(kube, NS, BASE, pod, ready=ready)
            await asyncio.sleep(1.0)

    async def _serve(self, cluster: RunningEmulator, kube: KubeClient, pod: LocalPod) -> None:
        client = openai.AsyncOpenAI(
            base_url=pod.url(naming.PUBLIC_PORT) + "/v1", api_key="none", max_retries=0, timeout=120
        )
        t = self._step("Waiting for the operator to report the adapters Ready")
        await _wait(
            "adapters Ready in status",
            lambda: self._all_ready(kube, ["sql-expert", "support-bot"]),
            120,
        )
        self._done("adapters_ready", t)

        t = self._step("Completions with the official openai client (greedy, 12 tokens)")
        for name in (BASE, "sql-expert", "support-bot"):
            start = time.monotonic()
            r = await client.completions.create(
                model=name, prompt=PROMPT, max_tokens=12, temperature=0
            )
            self.result.outputs[name] = r.choices[0].text
            self.say(f"    {name:12s} -> {r.choices[0].text!r}  ({time.monotonic() - start:.2f}s)")
        self.result.timings["first_completion_after_apply"] = round(
            self.result.timings["cold_start_apply_to_ready"], 2
        )
        self._done("completions", t)

        t = self._step("Hot add: kubectl apply a new LoRAAdapter (chat-helper); no restart")
        vllm_pid = pod.procs["vllm"].pid
        await kube.apply(
            {
                "apiVersion": "loraplex.io/v1alpha1",
                "kind": "LoRAAdapter",
                "metadata": {"name": "chat-helper", "namespace": NS},
                "spec": {"baseModel": BASE, "source": f"pvc://{CLAIM}/chat-helper", "rank": 8},
            }
        )
        start = time.monotonic()
        while True:
            try:
                r = await client.completions.create(
                    model="chat-helper", prompt=PROMPT, max_tokens=12, temperature=0
                )
                break
            except openai.NotFoundError:
                if time.monotonic() - start > 60:
                    raise
                await asyncio.sleep(0.1)
        self.result.timings["hot_add_apply_to_first_completion"] = round(
            time.monotonic() - start, 2
        )
        self.result.hot_added_output = r.choices[0].text
        self.result.vllm_pids = (vllm_pid, pod.procs["vllm"].pid)
        self.say(f"    chat-helper  -> {r.choices[0].text!r}")
        took = self.result.timings["hot_add_apply_to_first_completion"]
        same = vllm_pid == pod.procs["vllm"].pid
        self.say(
            f"    apply -> first completion: {took:.2f}s; vLLM pid {vllm_pid} unchanged: {same}"
        )
        self._done("hot_add", t)

        t = self._step("Delete: kubectl delete lora support-bot, then ask for it")
        await kube.delete(LORAADAPTERS, NS, "support-bot")
        # Like `kubectl delete`, wait until the object is gone (the operator's finalizer first
        # takes the adapter off every pod, then lets it go).
        await _wait("support-bot deleted", lambda: self._gone(kube, "support-bot"), 60)
        start = time.monotonic()
        while True:
            try:
                await client.completions.create(model="support-bot", prompt=PROMPT, max_tokens=4)
            except openai.NotFoundError as exc:
                self.result.deleted_error = str(exc)
                break
            if time.monotonic() - start > 60:
                raise TimeoutError("support-bot still served 60s after delete")
            await asyncio.sleep(0.2)
        self.say(f"    404: {self.result.deleted_error[:160]}")
        self._done("delete", t)

        await _wait(
            "chat-helper Ready in status", lambda: self._all_ready(kube, ["chat-helper"]), 60
        )
        t = self._step("kubectl get bm,lora  (status as the operator wrote it)")
        bms = await kube.list(BASEMODELS, NS)
        loras = await kube.list(LORAADAPTERS, NS)
        self.result.statuses = {o["metadata"]["name"]: o.get("status") for o in bms + loras}
        self.result.tables = (
            table("BaseModel", bms, wide=True) + "\n\n" + table("LoRAAdapter", loras)
        )
        self.say(self.result.tables)
        self._done("tables", t)
        await client.close()

    async def _gone(self, kube: KubeClient, name: str) -> bool:
        return await kube.get(LORAADAPTERS, NS, name) is None

    async def _all_ready(self, kube: KubeClient, names: list[str]) -> bool:
        for n in names:
            obj = await kube.get(LORAADAPTERS, NS, n)
            if obj is None or (obj.get("status") or {}).get("phase") != "Ready":
                return False
        return True


async def _all_refs(kube: KubeClient, dep: dict[str, Any], wanted: set[tuple[str, str]]) -> Any:
    refs = await fetch_refs(kube, NS, dep)
    return refs if set(refs) >= wanted else None


def inspect_process(pid: int) -> dict[str, Any]:
    """The innermost process under `pid` (the container's main process inside bwrap), seen
    from the host: its command, environment, uid map and root mount, for the test to check."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    inner = pid
    while True:
        try:
            kids = (children.read_text() if children.exists() else "").split()
        except OSError:
            kids = []
        argv0 = Path(f"/proc/{inner}/cmdline").read_bytes().split(b"\0")[0]
        if not kids or Path(argv0.decode()).name != "bwrap":
            break
        inner = int(kids[0])
        children = Path(f"/proc/{inner}/task/{inner}/children")
    proc = Path(f"/proc/{inner}")
    environ = proc.joinpath("environ").read_bytes().split(b"\0")
    mounts = proc.joinpath("mountinfo").read_text().splitlines()
    root = [m.split()[5] for m in mounts if m.split()[4] == "/"][-1:] or [""]
    return {
        "pid": inner,
        "cmdline": proc.joinpath("cmdline").read_bytes().split(b"\0")[:-1],
        "env": dict(e.decode().split("=", 1) for e in environ if b"=" in e),
        "uid_map": proc.joinpath("uid_map").read_text().split(),
        "root_mount_options": root[0],
    }


async def run_chain(
    workdir: Path,
    say: Callable[[str], None] = print,
    *,
    remap_ports: bool = True,
    sandbox: bool | None = None,
) -> ChainResult:
    """Run the chain in `workdir` (created if needed) and return what it observed.

    `sandbox`: see `plan_local_pod` (None: bubblewrap when it works, loud fallback otherwise).
    """
    await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    return await Chain(workdir, say, remap_ports=remap_ports, sandbox=sandbox).run()
