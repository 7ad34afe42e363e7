"""Run a rendered pod as local processes: what a kubelet would do, on a laptop.

Given the Deployment the operator rendered, this gives each container what a kubelet and a
container runtime would: the pod's volumes (ConfigMaps and Secrets written as files, emptyDirs
as fresh folders, PVCs as folders standing in for the claims), the environment exactly as
rendered (Secret and ConfigMap references resolved, `$(VAR)` expanded), and, under bubblewrap
(`loraplex.devtools.bubblewrap`), the pod's own rules: the rendered uid/gid with no passwd
entry, a read-only root where the container says so, and only the volumes writable. It
substitutes only what a machine with no GPU and no images must: the model (a tiny generated
one), the GPU memory flag, the context length, the interpreter and the image's PATH, CPU-only
vLLM settings, and ports that are already taken. Every substitution is recorded so the demo
can print it. It also plays the parts of the Deployment controller and kubelet in the API
stand-in: a Pod object with the pod's IP and readiness, and the Deployment's ready count.

Without bubblewrap (and outside CI, where that is an error) the containers run as plain
processes, loudly: mount paths are then symlinks under the pod's folder and absolute pod paths
in arguments and env are rewritten to them.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import logging
import re
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from loraplex import naming
from loraplex.devtools import bubblewrap
from loraplex.devtools.bubblewrap import Mount, Sandbox
from loraplex.devtools.processes import VLLM_CPU_ENV, Managed, free_port, spawn, wait_http
from loraplex.kube import CONFIGMAPS, DEPLOYMENTS, PODS, SECRETS, KubeClient

log = logging.getLogger(__name__)

# (kind, name) -> the object, for the ConfigMaps and Secrets the pod refers to.
Refs = Mapping[tuple[str, str], dict[str, Any]]

# PATH of the official images (python and vllm-openai alike), with this venv's bin in front:
# the image's own ENV, which a runtime adds to the rendered env.
_IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


class PodRuleError(RuntimeError):
    """The pod cannot start, for the reason a kubelet would give (CreateContainerConfigError)."""


@dataclass
class LocalPod:
    """The local form of a rendered pod: argv, env and rules per container, and what changed."""

    root: Path
    volumes: dict[str, Path]
    argv: dict[str, list[str]]
    env: dict[str, dict[str, str]]
    ports: dict[int, int]
    substitutions: list[str] = field(default_factory=list)
    procs: dict[str, Managed] = field(default_factory=dict)
    # Per container: its bubblewrap rules, or None when it runs as a plain process.
    sandboxes: dict[str, Sandbox | None] = field(default_factory=dict)
    # Per volume name: the ConfigMap/Secret volume source it is filled from.
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def sandboxed(self) -> bool:
        return bool(self.sandboxes) and all(b is not None for b in self.sandboxes.values())

    def url(self, container_port: int) -> str:
        return f"http://127.0.0.1:{self.ports.get(container_port, container_port)}"

    def command(self, container: str) -> list[str]:
        """What is actually started: the container's argv, under bwrap when sandboxed."""
        box = self.sandboxes.get(container)
        argv = self.argv[container]
        return argv if box is None else bubblewrap.command(box, argv, bubblewrap.find() or "bwrap")

    def rules(self) -> list[str]:
        """One line per container saying what is enforced, for the demo to print."""
        lines = []
        for name, box in self.sandboxes.items():
            if box is None:
                lines.append(f"{name}: plain process (no bubblewrap): NO pod rules enforced")
                continue
            rw = [m.target for m in box.mounts if not m.read_only] + list(box.scratch)
            ro = [m.target for m in box.mounts if m.read_only]
            root = "read-only root" if box.read_only_root else "writable root as tmpfs scratch"
            who = "root" if box.uid == 0 else "no passwd entry"
            lines.append(
                f"{name}: uid {box.uid} gid {box.gid} ({who}), {root}, "
                f"writable: {' '.join(sorted(rw)) or '-'}; read-only: {' '.join(sorted(ro)) or '-'}"
            )
        return lines


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


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: defined names are replaced, `$$` escapes, others stay."""

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR.sub(one, value)


def _ref_value(kind: str, ref: dict[str, Any], refs: Refs, where: str) -> str | None:
    obj = refs.get((kind, ref["name"]))
    data = _data(kind, obj) if obj is not None else None
    if data is None or ref["key"] not in data:
        if ref.get("optional"):
            return None
        what = "not found" if data is None else f"has no key {ref['key']!r}"
        raise PodRuleError(f"CreateContainerConfigError: {where}: {kind} {ref['name']} {what}")
    return data[ref["key"]]


def _data(kind: str, obj: dict[str, Any]) -> dict[str, str]:
    """A ConfigMap's or Secret's values as text (a Secret's `data` is base64)."""
    if kind == "ConfigMap":
        return dict(obj.get("data") or {})
    out = dict(obj.get("stringData") or {})
    for key, value in (obj.get("data") or {}).items():
        out.setdefault(key, base64.b64decode(value).decode())
    return out


def _files(kind: str, obj: dict[str, Any]) -> dict[str, bytes]:
    """A ConfigMap's or Secret's keys as file contents: text values and, for a ConfigMap,
    its `binaryData` (base64 in the API, raw bytes in the volume)."""
    out = {k: v.encode() for k, v in _data(kind, obj).items()}
    if kind == "ConfigMap":
        for key, value in (obj.get("binaryData") or {}).items():
            out[key] = base64.b64decode(value)
    return out


def _field(path: str, fields: Mapping[str, str], where: str) -> str:
    if path not in fields:
        raise PodRuleError(f"{where}: fieldRef {path!r} is not supported by the local pod runner")
    return fields[path]


def container_env(c: dict[str, Any], refs: Refs, fields: Mapping[str, str]) -> dict[str, str]:
    """A container's environment exactly as a kubelet builds it: envFrom, then env, in order."""
    env: dict[str, str] = {}
    name = c["name"]
    for i, src in enumerate(c.get("envFrom") or []):
        for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            if key not in src:
                continue
            ref = src[key]
            obj = refs.get((kind, ref["name"]))
            if obj is None:
                if ref.get("optional"):
                    continue
                raise PodRuleError(
                    f"CreateContainerConfigError: containers[{name}].envFrom[{i}]: "
                    f"{kind} {ref['name']} not found"
                )
            for k, v in _data(kind, obj).items():
                env[src.get("prefix", "") + k] = v
    for e in c.get("env") or []:
        where = f"containers[{name}].env[{e['name']}]"
        frm = e.get("valueFrom")
        if frm is None:
            env[e["name"]] = expand(e.get("value", ""), env)
            continue
        value: str | None
        if "secretKeyRef" in frm:
            value = _ref_value("Secret", frm["secretKeyRef"], refs, where)
        elif "configMapKeyRef" in frm:
            value = _ref_value("ConfigMap", frm["configMapKeyRef"], refs, where)
        elif "fieldRef" in frm:
            value = _field(frm["fieldRef"]["fieldPath"], fields, where)
        else:
            raise PodRuleError(f"{where}: valueFrom {sorted(frm)} is not supported locally")
        if value is not None:
            env[e["name"]] = value
    return env


# A volume source's (kind, key in the volume, key naming the object).
_VOLUME_KINDS = (("ConfigMap", "configMap", "name"), ("Secret", "secret", "secretName"))


def _volume_refs(vol: Mapping[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(kind, object name, source) for each ConfigMap/Secret a volume is filled from: one for
    a `configMap`/`secret` volume, one per source of a `projected` volume, in its order."""
    sources = [vol] if "projected" not in vol else (vol["projected"].get("sources") or [])
    out = []
    for src in sources:
        for kind, key, ref in _VOLUME_KINDS:
            if key in src:
                out.append((kind, src[key][ref], src[key]))
    return out


def referenced(deployment: dict[str, Any], *, optional: bool = False) -> set[tuple[str, str]]:
    """Every (kind, name) of ConfigMap/Secret the pod reads, in volumes and env; the ones
    marked `optional` only when asked (a kubelet starts the pod without them)."""
    pod = deployment["spec"]["template"]["spec"]
    out: set[tuple[str, str]] = set()
    for vol in pod.get("volumes") or []:
        for kind, name, src in _volume_refs(vol):
            if optional or not src.get("optional"):
                out.add((kind, name))
    for c in pod["containers"]:
        for src in c.get("envFrom") or []:
            for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                if key in src and (optional or not src[key].get("optional")):
                    out.add((kind, src[key]["name"]))
        for e in c.get("env") or []:
            frm = e.get("valueFrom") or {}
            for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                if key in frm and (optional or not frm[key].get("optional")):
                    out.add((kind, frm[key]["name"]))
    return out


async def fetch_refs(kube: KubeClient, namespace: str, deployment: dict[str, Any]) -> Refs:
    """The ConfigMaps and Secrets the pod refers to, optional ones included, as they are now
    (missing ones left out)."""
    apis = {"ConfigMap": CONFIGMAPS, "Secret": SECRETS}
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for kind, name in sorted(referenced(deployment, optional=True)):
        obj = await kube.get(apis[kind], namespace, name)
        if obj is not None:
            out[(kind, name)] = obj
    return out


def volume_files(vol: Mapping[str, Any], refs: Refs) -> dict[str, tuple[bytes, int]]:
    """The files (path -> content, mode) a kubelet puts in a ConfigMap, Secret or projected
    volume: each source's keys (or its `items`), later sources over earlier ones. A missing
    object contributes nothing (the kubelet would wait for a required one; the caller checks
    `referenced` first)."""
    files: dict[str, tuple[bytes, int]] = {}
    default = (vol.get("projected") or {}).get("defaultMode", 0o644)
    for kind, name, src in _volume_refs(vol):
        obj = refs.get((kind, name))
        data = _files(kind, obj) if obj is not None else {}
        items = src.get("items") or [{"key": k, "path": k} for k in sorted(data)]
        mode = src.get("defaultMode", default)
        for item in items:
            if item["key"] in data:
                files[item["path"]] = (data[item["key"]], item.get("mode", mode))
    return files


def write_volume(folder: Path, files: Mapping[str, tuple[bytes, int]]) -> None:
    """Make `folder` show exactly `files`, the way the kubelet's atomic writer keeps a
    ConfigMap, Secret or projected volume: the payload goes into a fresh hidden folder, the
    `..data` symlink is renamed onto it (one atomic step, so a reader never sees half a
    payload), and each top-level name is a symlink through `..data`. Files whose key (or whole
    optional object) is gone disappear with the old payload."""
    data = folder / "..data"
    if data.is_dir() and _payload(data) == {p: v for p, (v, _) in files.items()}:
        return
    fresh = folder / f"..{time.time_ns()}"
    for path, (value, mode) in files.items():
        target = fresh / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(value)
        target.chmod(mode)
    fresh.mkdir(parents=True, exist_ok=True)
    old = data.resolve() if data.is_symlink() else None
    link = folder / "..data_tmp"
    link.unlink(missing_ok=True)
    link.symlink_to(fresh.name, target_is_directory=True)
    link.replace(data)
    tops = {PurePosixPath(p).parts[0] for p in files}
    for top in tops:
        entry = folder / top
        if not entry.is_symlink():
            entry.symlink_to(f"..data/{top}")
    for entry in folder.iterdir():
        if not entry.name.startswith("..") and entry.name not in tops:
            entry.unlink() if entry.is_symlink() or entry.is_file() else shutil.rmtree(entry)
    if old is not None and old.parent == folder.resolve():
        shutil.rmtree(old, ignore_errors=True)


def _payload(data: Path) -> dict[str, bytes]:
    return {str(p.relative_to(data)): p.read_bytes() for p in data.rglob("*") if p.is_file()}


def _user(pod: dict[str, Any], c: dict[str, Any], subs: list[str]) -> tuple[int, int]:
    """The uid/gid the runtime would use; refuses runAsNonRoot with root, as the kubelet does."""
    psc, csc = pod.get("securityContext") or {}, c.get("securityContext") or {}
    uid = csc.get("runAsUser", psc.get("runAsUser"))
    gid = csc.get("runAsGroup", psc.get("runAsGroup"))
    non_root = csc.get("runAsNonRoot", psc.get("runAsNonRoot", False))
    if uid is None:
        subs.append(f"{c['name']}: no runAsUser rendered; the image's user is taken as root (0)")
        uid = 0
    if non_root and uid == 0:
        raise PodRuleError(
            f"CreateContainerConfigError: containers[{c['name']}]: runAsNonRoot is true but the "
            "container would run as uid 0: set securityContext.runAsUser to a non-zero uid"
        )
    return int(uid), int(gid if gid is not None else 0)


def _read_only(vol: dict[str, Any], mount: dict[str, Any]) -> bool:
    kinds = ("configMap", "secret", "downwardAPI", "projected")
    pvc_ro = (vol.get("persistentVolumeClaim") or {}).get("readOnly", False)
    return bool(mount.get("readOnly")) or pvc_ro or any(k in vol for k in kinds)


def _sandbox(
    pod_spec: dict[str, Any],
    c: dict[str, Any],
    volumes: dict[str, Path],
    root: Path,
    host_paths: list[Path],
    hostname: str,
    subs: list[str],
) -> Sandbox:
    uid, gid = _user(pod_spec, c, subs)
    specs = {v["name"]: v for v in pod_spec.get("volumes") or []}
    mounts = []
    for m in c.get("volumeMounts") or []:
        if m["name"] not in specs:
            raise PodRuleError(f"containers[{c['name']}].volumeMounts: no volume {m['name']!r}")
        source = volumes[m["name"]] / m.get("subPath", "")
        mounts.append(Mount(source, m["mountPath"], _read_only(specs[m["name"]], m)))
    csc = c.get("securityContext") or {}
    read_only_root = bool(csc.get("readOnlyRootFilesystem", False))
    scratch: list[str] = []
    if not read_only_root:
        covered = {m.target for m in mounts}
        scratch = [d for d in ("/tmp", "/var/tmp") if d not in covered]
        subs.append(
            f"{c['name']}: writable root -> the host's root read-only plus fresh "
            f"{' '.join(scratch) or 'nothing'} (a non-root uid can write only there in an "
            "image; bubblewrap 0.8 has no overlay to give a private copy of the host)"
        )
    etc = root / "etc" / c["name"]
    bubblewrap.write_etc(etc, uid, gid)
    drop = (csc.get("capabilities") or {}).get("drop") or []
    return Sandbox(
        uid=uid,
        gid=gid,
        read_only_root=read_only_root,
        mounts=mounts,
        scratch=scratch,
        host_paths=host_paths,
        etc_dir=etc,
        hostname=hostname,
        workdir=c.get("workingDir", "/"),
        drop_all_caps="ALL" in drop or uid != 0,
    )


def _decide_sandbox(sandbox: bool | None) -> bool:
    """bwrap when it works; in CI its absence is an error; elsewhere a loud fallback."""
    if sandbox is False:
        return False
    why = bubblewrap.problem()
    if why is None:
        return True
    if sandbox is True or bubblewrap.in_ci():
        raise bubblewrap.BubblewrapMissing(
            f"the local pod runner must enforce the pod's rules here: {why}"
        )
    log.warning("RUNNING THE POD AS PLAIN PROCESSES, ITS RULES NOT ENFORCED: %s", why)
    print(
        f"WARNING: {why}\nWARNING: the pod runs as plain processes: uid, read-only root, "
        "volumes and environment are NOT enforced",
        file=sys.stderr,
    )
    return False


def _plan_volumes(
    pod: dict[str, Any], root: Path, claims: dict[str, Path], refs: Refs
) -> tuple[dict[str, Path], dict[str, dict[str, Any]]]:
    """A host folder per volume (emptyDirs fresh and open to any uid, as the kubelet makes
    them; ConfigMap, Secret and projected volumes filled), and those volumes, to keep in sync."""
    volumes: dict[str, Path] = {}
    sources: dict[str, dict[str, Any]] = {}
    for vol in pod.get("volumes") or []:
        name = vol["name"]
        if "persistentVolumeClaim" in vol:
            claim = vol["persistentVolumeClaim"]["claimName"]
            volumes[name] = claims.get(claim, root / "pvc" / claim)
        else:
            volumes[name] = root / "volumes" / name
            shutil.rmtree(volumes[name], ignore_errors=True)
        volumes[name].mkdir(parents=True, exist_ok=True)
        if "emptyDir" in vol:
            volumes[name].chmod(0o777)
        if _volume_refs(vol):
            sources[name] = vol
            write_volume(volumes[name], volume_files(vol, refs))
    return volumes, sources


def plan_local_pod(
    deployment: dict[str, Any],
    *,
    root: Path,
    model_dir: Path,
    claims: dict[str, Path],
    refs: Refs | None = None,
    max_model_len: int = 256,
    remap_ports: bool = True,
    sandbox: bool | None = None,
) -> LocalPod:
    """Decide argv, env, folders and rules for each container of `deployment`'s pod template.

    `sandbox`: True requires bubblewrap, False runs plain processes, None (default) uses
    bubblewrap when it works and otherwise falls back loudly (an error when CI=true).
    """
    boxed = _decide_sandbox(sandbox)
    refs = refs or {}
    pod = deployment["spec"]["template"]["spec"]
    meta = deployment["metadata"]
    subs: list[str] = []
    if not boxed:
        subs.append("WARNING: plain processes (no bubblewrap): the pod's rules are NOT enforced")
    volumes, sources = _plan_volumes(pod, root, claims, refs)
    ports: dict[int, int] = {}
    for port in (naming.PUBLIC_PORT, naming.ADMIN_PORT, naming.VLLM_PORT):
        ports[port] = free_port() if remap_ports else port
        if ports[port] != port:
            subs.append(f"port {port} -> {ports[port]} (a free port on this machine)")

    pod_name = f"{meta['name']}-local-0"
    fields = {
        "metadata.name": pod_name,
        "metadata.namespace": meta.get("namespace", "default"),
        "status.podIP": "127.0.0.1",
        "spec.nodeName": "localhost",
        "spec.serviceAccountName": pod.get("serviceAccountName", "default"),
    }
    local = _plain_paths(pod, volumes, root) if not boxed else (lambda v: v)
    server_src = _server_source()
    venv_bin = Path(sys.executable).parent
    host_paths = [model_dir, Path(sys.prefix), Path(sys.prefix).resolve(), server_src]

    result = LocalPod(root, volumes, {}, {}, ports, substitutions=subs, sources=sources)
    subs.append(
        f"all containers: PATH={venv_bin}:{_IMAGE_PATH} (the image's own ENV; here this venv)"
    )
    if boxed:
        subs.append("all containers: env PWD (bubblewrap sets it to the working dir, / by default)")
    for c in pod["containers"]:
        name = c["name"]
        args = [local(a) for a in c.get("args") or []]
        cenv = {k: local(v) for k, v in container_env(c, refs, fields).items()}
        cenv.setdefault("PATH", f"{venv_bin}:{_IMAGE_PATH}")
        cmd = [sys.executable if x in ("python3", "python") else x for x in c.get("command") or []]
        if name == "vllm":
            model = _flag(args, "--model")
            v = "vllm"
            _set_flag(args, "--model", str(model_dir), subs, f"tiny CPU model for {model}", v)
            _set_flag(args, "--gpu-memory-utilization", None, subs, "no GPU: CPU KV space", v)
            _set_flag(args, "--max-model-len", str(max_model_len), subs, "CPU KV cache 1 GiB", v)
            _set_flag(args, "--port", str(ports[naming.VLLM_PORT]), subs, "port", v)
            subs.append(f"vllm: image {c['image']} -> this machine's vllm-cpu ({cmd[0]})")
            for key, (value, why) in VLLM_CPU_ENV.items():
                if cenv.get(key) != value:
                    cenv[key] = value
                    subs.append(f"vllm: env {key}={value} ({why})")
            argv = cmd + args
        elif name == "adapter-server":
            a = "adapter-server"
            vllm_url = f"http://127.0.0.1:{ports[naming.VLLM_PORT]}"
            _set_flag(args, "--vllm-url", vllm_url, subs, "port", a)
            _set_flag(args, "--port", str(ports[naming.PUBLIC_PORT]), subs, "port", a)
            _set_flag(args, "--admin-port", str(ports[naming.ADMIN_PORT]), subs, "port", a)
            argv = [sys.executable, "-m", "loraplex_server", *args]
            argv += ["--host", "127.0.0.1", "--admin-host", "127.0.0.1"]
            subs.append(
                f"adapter-server: image {c['image']} -> {sys.executable} -m loraplex_server"
            )
            subs.append("adapter-server: listens on 127.0.0.1 only (added --host/--admin-host)")
            cenv["PYTHONPATH"] = str(server_src)
            subs.append(f"adapter-server: env PYTHONPATH={server_src} (the image installs it)")
        else:
            argv = cmd + args
        result.argv[name] = [expand(x, cenv) for x in argv]
        result.env[name] = cenv
        result.sandboxes[name] = (
            _sandbox(pod, c, volumes, root, host_paths, pod_name, subs) if boxed else None
        )
    return result


def _server_source() -> Path:
    """The folder holding `loraplex_server` as this interpreter finds it (the image's install)."""
    spec = importlib.util.find_spec("loraplex_server")
    if spec is None or spec.origin is None:
        raise PodRuleError("loraplex_server is not importable here: pip install -e '.[server]'")
    return Path(spec.origin).resolve().parents[1]


def _plain_paths(pod: dict[str, Any], volumes: dict[str, Path], root: Path) -> Any:
    """Without a sandbox: one folder tree with each mount path as a symlink, and a rewriter."""
    fs = root / "fs"
    mount_paths: set[str] = set()
    for c in pod["containers"]:
        for m in c.get("volumeMounts") or []:
            link = fs / m["mountPath"].lstrip("/")
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.is_symlink():
                link.symlink_to(volumes[m["name"]], target_is_directory=True)
            mount_paths.add(m["mountPath"])

    def local(value: str) -> str:
        inside = any(value == mp or value.startswith(mp + "/") for mp in mount_paths)
        above = any(mp.startswith(value.rstrip("/") + "/") for mp in mount_paths)
        return str(fs / value.lstrip("/")) if value.startswith("/") and (inside or above) else value

    return local


async def sync_volumes(kube: KubeClient, namespace: str, pod: LocalPod) -> None:
    """Keep ConfigMap, Secret and projected volumes' files current, as the kubelet does.

    Each object is read on its own (a kubelet reads each from its own watch, so a projected
    volume can hold objects from different moments: its reader must cope). While a required
    object is missing the volume keeps what it has, as the kubelet does."""
    apis = {"ConfigMap": CONFIGMAPS, "Secret": SECRETS}
    for name, vol in pod.sources.items():
        refs: dict[tuple[str, str], dict[str, Any]] = {}
        missing = False
        for kind, obj_name, src in _volume_refs(vol):
            obj = await kube.get(apis[kind], namespace, obj_name)
            if obj is not None:
                refs[(kind, obj_name)] = obj
            missing = missing or (obj is None and not src.get("optional"))
        if not missing:
            write_volume(pod.volumes[name], volume_files(vol, refs))


async def wait_healthy(proc: Managed, path: str, timeout: float) -> None:
    """Like `wait_http`, but awaitable, so Ctrl-C (task cancellation) stops the wait at once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            await asyncio.to_thread(wait_http, proc, path, 1.0)
            return
        except TimeoutError:
            continue
    raise TimeoutError(f"{proc.name} not healthy after {timeout}s:\n{proc.tail()}")


def start_container(pod: LocalPod, name: str, url: str = "") -> Managed:
    """Start one container (under its sandbox when there is one) with exactly its env."""
    proc = spawn(
        name,
        pod.command(name),
        pod.root / "logs" / f"{name}.log",
        pod.env[name],
        url,
        inherit_env=False,
    )
    pod.procs[name] = proc
    return proc


async def start_containers(pod: LocalPod, *, vllm_timeout: float = 300.0) -> None:
    """Start vLLM, wait for its health, then the adapter-server (the pod's start order).

    Each process is recorded in `pod.procs` as soon as it exists, so a caller interrupted
    mid-start can still stop everything with `stop_containers`.
    """
    vllm = start_container(pod, "vllm", pod.url(naming.VLLM_PORT))
    await wait_healthy(vllm, "/health", vllm_timeout)
    server = start_container(pod, "adapter-server", pod.url(naming.PUBLIC_PORT))
    await wait_healthy(server, "/healthz", 60)


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
