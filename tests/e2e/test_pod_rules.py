"""The local pod runner enforces the rendered pod's own rules (bubblewrap), shown with probes.

Each test takes the Deployment `loraplex render -f examples/` produces, swaps one container's
command for a small Python probe (everything else as rendered: securityContext, volumes,
mounts, env), starts it the way `make demo` and the e2e chain do (`plan_local_pod` +
`start_container`), and reads what the probe saw. Fast (no vLLM), so the fast tier runs it.

| rule                         | test                                                      |
|------------------------------|-----------------------------------------------------------|
| rendered uid/gid, no passwd  | test_rendered_uid_has_no_passwd_entry, ..._run_as_user_*  |
| getpass through USER/LOGNAME | test_getuser_needs_user_or_logname_in_the_rendered_env    |
| read-only root, volumes only | test_read_only_root_and_volumes, test_write_outside_*     |
| writable root: scratch only  | test_writable_root_is_scratch_not_the_host                |
| exactly the rendered env     | test_env_is_exactly_the_rendered_env                      |
| kubelet refusals             | test_missing_secret_ref_*, test_run_as_non_root_*         |
| shared, fresh emptyDirs      | test_empty_dir_is_fresh_and_shared_between_containers     |
| projected manifest volume    | test_projected_manifest_volume_*                          |
| bwrap missing: CI fails      | test_missing_bwrap_*                                      |

Without a working bwrap these tests skip outside CI and fail in CI (`CI=true`).
"""

from __future__ import annotations

import base64
import copy
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from loraplex import naming
from loraplex.devtools import bubblewrap
from loraplex.devtools.kubelet import (
    LocalPod,
    PodRuleError,
    plan_local_pod,
    start_container,
    volume_files,
    write_volume,
)
from loraplex.offline import render_paths
from loraplex_server import manifest_shards

ROOT = Path(__file__).resolve().parents[2]

# The probe prints one JSON object: what the container sees of its identity, files and env.
PROBE = r"""
import errno, getpass, json, os, pwd, sys
out = {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups()}
try:
    out["passwd"] = pwd.getpwuid(os.getuid()).pw_name
except KeyError:
    out["passwd"] = None
try:
    out["getuser"] = getpass.getuser()
except (KeyError, OSError) as exc:
    out["getuser"] = "error: " + type(exc).__name__
out["writes"] = {}
for path in json.loads(sys.argv[1]):
    try:
        with open(path, "w") as f:
            f.write("x")
        out["writes"][path] = "ok"
    except OSError as exc:
        out["writes"][path] = errno.errorcode[exc.errno]
raw = open("/proc/self/environ", "rb").read().split(b"\0")
out["environ"] = dict(e.decode().split("=", 1) for e in raw if e)
out["files"] = {p: sorted(os.listdir(p)) for p in json.loads(sys.argv[2]) if os.path.isdir(p)}
out["modes"] = {p: oct(os.stat(p).st_mode & 0o777) for p in json.loads(sys.argv[3])}
print(json.dumps(out))
"""


@pytest.fixture(autouse=True)
def _bwrap_required() -> None:
    why = bubblewrap.problem()
    if why is not None:
        if bubblewrap.in_ci():
            pytest.fail(f"CI=true and bubblewrap cannot run: {why}")
        pytest.skip(why)


@pytest.fixture
def rendered() -> tuple[dict[str, Any], dict[tuple[str, str], dict[str, Any]]]:
    objects = render_paths([ROOT / "examples"])
    dep = next(o for o in objects if o["kind"] == "Deployment")
    refs = {
        (o["kind"], o["metadata"]["name"]): o
        for o in objects
        if o["kind"] in ("ConfigMap", "Secret")
    }
    return dep, refs


def _container(dep: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def _probe_pod(
    dep: dict[str, Any],
    tmp_path: Path,
    *,
    keep: tuple[str, ...] = ("adapter-server",),
    refs: dict[tuple[str, str], dict[str, Any]] | None = None,
    writes: tuple[str, ...] = (),
    dirs: tuple[str, ...] = (),
    modes: tuple[str, ...] = (),
) -> LocalPod:
    """`dep` with the kept containers' commands replaced by the probe (renamed `probe-NAME`,
    so the runner applies no vLLM/server substitutions to them)."""
    dep = copy.deepcopy(dep)
    spec = dep["spec"]["template"]["spec"]
    spec["containers"] = [c for c in spec["containers"] if c["name"] in keep]
    for c in spec["containers"]:
        c["name"] = f"probe-{c['name']}"
        c["command"] = ["python3", "-c", PROBE]
        c["args"] = [json.dumps(list(writes)), json.dumps(list(dirs)), json.dumps(list(modes))]
    return plan_local_pod(
        dep,
        root=tmp_path / "pod",
        model_dir=tmp_path / "model",
        claims={"team-adapters": tmp_path / "claim"},
        refs=refs or {},
        sandbox=True,
    )


def _run(pod: LocalPod, name: str) -> tuple[int, str]:
    proc = start_container(pod, name)
    code = proc.popen.wait(60)
    return code, proc.log_path.read_text()


def _seen(pod: LocalPod, name: str = "probe-adapter-server") -> dict[str, Any]:
    code, out = _run(pod, name)
    assert code == 0, out
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def test_rendered_uid_has_no_passwd_entry(rendered: Any, tmp_path: Path) -> None:
    dep, refs = rendered
    sc = dep["spec"]["template"]["spec"]["securityContext"]
    seen = _seen(_probe_pod(dep, tmp_path, refs=refs))
    assert (seen["uid"], seen["gid"]) == (sc["runAsUser"], sc["runAsGroup"])
    assert seen["passwd"] is None  # as in the CUDA vLLM image: no entry for the pod's uid
    assert sc["runAsUser"] != os.getuid()  # the uid really changed


@pytest.mark.parametrize(
    ("pod_level", "container_level", "expected"),
    [((10001, 10001), None, (10001, 10001)), ((10001, 10001), (2000, 3000), (2000, 3000))],
    ids=["pod-securityContext", "container-overrides-pod"],
)
def test_run_as_user_follows_the_rendered_security_context(
    rendered: Any,
    tmp_path: Path,
    pod_level: tuple[int, int],
    container_level: tuple[int, int] | None,
    expected: tuple[int, int],
) -> None:
    dep, refs = copy.deepcopy(rendered)
    sc = dep["spec"]["template"]["spec"]["securityContext"]
    sc["runAsUser"], sc["runAsGroup"] = pod_level
    if container_level:
        csc = _container(dep, "adapter-server")["securityContext"]
        csc["runAsUser"], csc["runAsGroup"] = container_level
    seen = _seen(_probe_pod(dep, tmp_path, refs=refs))
    assert (seen["uid"], seen["gid"]) == expected
    assert seen["passwd"] is None


def test_getuser_needs_user_or_logname_in_the_rendered_env(rendered: Any, tmp_path: Path) -> None:
    """torch's cache code calls getpass.getuser() (issue 9 point 2): without a passwd entry it
    works only through USER/LOGNAME, so those must come from the rendered env, not the host."""
    dep, refs = copy.deepcopy(rendered)
    c = _container(dep, "adapter-server")
    c["env"] = [e for e in c.get("env", []) if e["name"] not in ("USER", "LOGNAME")]
    without = _seen(_probe_pod(dep, tmp_path / "a", refs=refs))
    assert without["getuser"].startswith("error"), without["getuser"]
    c["env"].append({"name": "USER", "value": "loraplex"})
    with_user = _seen(_probe_pod(dep, tmp_path / "b", refs=refs))
    assert with_user["getuser"] == "loraplex"


def test_read_only_root_and_volumes(rendered: Any, tmp_path: Path) -> None:
    dep, refs = rendered
    c = _container(dep, "adapter-server")
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    writable = [m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")]
    read_only = [m["mountPath"] for m in c["volumeMounts"] if m.get("readOnly")]
    outside = ["/x", "/etc/x", "/usr/x", "/var/tmp/x", str(ROOT / "x")]
    hidden = str(tmp_path / "x")  # the host's /tmp is behind the pod's /tmp emptyDir
    writes = [f"{p}/probe" for p in writable + read_only] + outside + [hidden]
    secret_file = "/etc/loraplex/admin/token"
    pod = _probe_pod(dep, tmp_path, refs=refs, writes=tuple(writes), modes=(secret_file,))
    seen = _seen(pod)
    for path in writable:
        assert seen["writes"][f"{path}/probe"] == "ok", path
    for path in read_only + outside:
        want = "EROFS"
        got = seen["writes"].get(f"{path}/probe", seen["writes"].get(path))
        assert got == want, (path, got)
    assert seen["writes"][hidden] == "ENOENT"
    secret = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if "secret" in v)
    assert seen["modes"][secret_file] == oct(secret["secret"]["defaultMode"])
    assert not (tmp_path / "x").exists() and not (ROOT / "x").exists()
    assert not Path("/etc/loraplex").exists()  # mount points were made inside, not on the host


def test_write_outside_volumes_fails_the_container(rendered: Any, tmp_path: Path) -> None:
    """A container that writes where its pod gives it no volume exits with an error here, as it
    would on a cluster with readOnlyRootFilesystem."""
    dep, refs = copy.deepcopy(rendered)
    pod = _probe_pod(dep, tmp_path, refs=refs)
    name = "probe-adapter-server"
    pod.argv[name] = [pod.argv[name][0], "-c", "open('/var/lib/loraplex-state', 'w').write('1')"]
    code, out = _run(pod, name)
    assert code != 0
    assert "Read-only file system" in out, out
    assert not Path("/var/lib/loraplex-state").exists()


def test_writable_root_is_scratch_not_the_host(rendered: Any, tmp_path: Path) -> None:
    dep, refs = copy.deepcopy(rendered)
    _container(dep, "adapter-server")["securityContext"]["readOnlyRootFilesystem"] = False
    pod = _probe_pod(dep, tmp_path, refs=refs, writes=("/var/tmp/probe", "/etc/probe"))
    seen = _seen(pod)
    assert seen["writes"] == {"/var/tmp/probe": "ok", "/etc/probe": "EROFS"}
    assert not Path("/var/tmp/probe").exists()  # a private tmpfs, not the host's /var/tmp
    assert any("writable root" in s for s in pod.substitutions)


def test_env_is_exactly_the_rendered_env(
    rendered: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORAPLEX_LEAK_CANARY", "host-only")
    dep, refs = copy.deepcopy(rendered)
    secret = next(k for k in refs if k[0] == "Secret")[1]
    cm = next(k for k in refs if k[0] == "ConfigMap" and k[1].endswith("-adapters"))[1]
    refs[("ConfigMap", "extra")] = {"data": {"A": "1", "B": "2"}}
    c = _container(dep, "adapter-server")
    c["envFrom"] = [{"configMapRef": {"name": "extra"}, "prefix": "X_"}]
    c["env"] = [
        *c.get("env", []),
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": secret, "key": "token"}}},
        {
            "name": "MANIFEST",
            "valueFrom": {"configMapKeyRef": {"name": cm, "key": "manifest.json"}},
        },
        {
            "name": "GONE",
            "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k", "optional": True}},
        },
        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "WHERE", "value": "$(POD)/$(UNDEFINED)/$$(POD)"},
    ]
    pod = _probe_pod(dep, tmp_path, refs=refs)
    seen = _seen(pod)
    env = seen["environ"]
    token = refs[("Secret", secret)]["stringData"]["token"]
    expected = {e["name"] for e in c["env"]} - {"GONE"} | {"X_A", "X_B"}
    # Only PATH (the image's ENV, printed as a substitution) and PWD (bubblewrap's) are added.
    assert set(env) == expected | {"PATH", "PWD"}, env
    assert env["TOKEN"] == token and env["X_A"] == "1"
    assert env["MANIFEST"] == refs[("ConfigMap", cm)]["data"]["manifest.json"]
    assert env["WHERE"] == f"{env['POD']}/$(UNDEFINED)/$(POD)"
    assert "LORAPLEX_LEAK_CANARY" not in env
    assert any(s.startswith("all containers: PATH=") for s in pod.substitutions)
    assert token not in " ".join(pod.command("probe-adapter-server"))  # no secret in argv


def test_missing_secret_ref_is_a_create_container_config_error(
    rendered: Any, tmp_path: Path
) -> None:
    dep, refs = copy.deepcopy(rendered)
    c = _container(dep, "adapter-server")
    c["env"] = [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k"}}}]
    with pytest.raises(PodRuleError, match=r"CreateContainerConfigError.*env\[T\].*absent"):
        _probe_pod(dep, tmp_path, refs=refs)


def test_run_as_non_root_refuses_uid_zero(rendered: Any, tmp_path: Path) -> None:
    dep, refs = copy.deepcopy(rendered)
    dep["spec"]["template"]["spec"]["securityContext"]["runAsUser"] = 0
    with pytest.raises(PodRuleError, match="runAsNonRoot"):
        _probe_pod(dep, tmp_path, refs=refs)


def test_empty_dir_is_fresh_and_shared_between_containers(rendered: Any, tmp_path: Path) -> None:
    dep, refs = rendered
    stale = tmp_path / "pod" / "volumes" / "tmp" / "stale"
    stale.parent.mkdir(parents=True)
    stale.write_text("from an earlier pod")
    pod = _probe_pod(
        dep,
        tmp_path,
        refs=refs,
        keep=("vllm", "adapter-server"),
        writes=("/tmp/shared",),
        dirs=("/tmp",),
    )
    first = _seen(pod, "probe-vllm")
    assert first["files"]["/tmp"] == ["shared"]  # fresh: the earlier pod's file is gone
    pod.argv["probe-adapter-server"][3] = "[]"  # the second container only looks
    second = _seen(pod, "probe-adapter-server")
    assert second["writes"] == {}
    assert "shared" in second["files"]["/tmp"]  # the same emptyDir, seen by both containers
    assert stat.S_IMODE(pod.volumes["tmp"].stat().st_mode) == 0o777


def test_missing_bwrap_fails_in_ci_and_falls_back_loudly_elsewhere(
    rendered: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dep, refs = rendered
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap (and no apt-get) on this PATH
    monkeypatch.setenv("CI", "true")
    with pytest.raises(bubblewrap.BubblewrapMissing, match="apt-get install -y bubblewrap"):
        plan_local_pod(dep, root=tmp_path / "a", model_dir=tmp_path, claims={}, refs=refs)
    assert bubblewrap.ensure() == 1
    monkeypatch.delenv("CI")
    pod = plan_local_pod(dep, root=tmp_path / "b", model_dir=tmp_path, claims={}, refs=refs)
    assert not pod.sandboxed
    assert pod.substitutions[0].startswith("WARNING: plain processes")
    assert "NOT enforced" in capsys.readouterr().err
    assert bubblewrap.ensure() == 0  # outside CI `make setup` goes on, having said what to do


def test_mount_points_are_made_inside_the_sandbox_not_on_the_host(tmp_path: Path) -> None:
    box = bubblewrap.Sandbox(
        uid=1000,
        gid=1000,
        read_only_root=True,
        mounts=[bubblewrap.Mount(tmp_path, "/etc/loraplex/manifest", True)],
    )
    argv = bubblewrap.command(box, ["/bin/true"])
    assert argv[argv.index("--tmpfs") + 1] == "/etc"  # rebuilt: /etc/loraplex is not on the host
    assert argv[argv.index("/etc/hostname") - 1 : argv.index("/etc/hostname") + 2] == [
        "--ro-bind",
        "/etc/hostname",
        "/etc/hostname",
    ]
    assert argv[argv.index("--remount-ro") + 1] == "/etc"
    assert argv.index("--remount-ro") > argv.index("/etc/loraplex/manifest")


# Reads the mounted manifest the way the adapter-server does, inside the sandbox.
READ_MANIFEST = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from loraplex_server import manifest_shards
folder = Path(sys.argv[2])
out = {"files": sorted(f for f in os.listdir(folder) if not f.startswith(".."))}
try:
    _, m = manifest_shards.read_mounted(folder / "manifest.json")
    out["generation"], out["adapters"] = m.generation, len(m.adapters)
except manifest_shards.TornManifest as exc:
    out["torn"] = str(exc)
try:
    open(folder / "probe", "w")
    out["write"] = "ok"
except OSError as exc:
    out["write"] = exc.strerror
print(json.dumps(out))
"""


def _manifest_refs(
    refs: dict[tuple[str, str], dict[str, Any]], generation: int, shard_bytes: int
) -> dict[tuple[str, str], dict[str, Any]]:
    """`refs` with the example manifest republished as `generation`, cut into shards of
    `shard_bytes` (the shard ConfigMaps it no longer uses are gone, as the operator deletes
    them)."""
    index_name = naming.configmap_name("qwen-14b")
    old = manifest_shards.from_configmaps(
        refs[("ConfigMap", index_name)],
        {name: o for (kind, name), o in refs.items() if kind == "ConfigMap"},
    )
    manifest = old.model_copy(update={"generation": generation})
    index, chunks = manifest_shards.split(
        manifest, lambda n: naming.manifest_shard_name("qwen-14b", n), shard_bytes=shard_bytes
    )
    out = {k: v for k, v in refs.items() if k[0] != "ConfigMap"}
    for ref, chunk in zip(index.shards, chunks, strict=True):
        out[("ConfigMap", ref.name)] = {
            "metadata": {"name": ref.name},
            "binaryData": {ref.key: base64.b64encode(chunk).decode()},
        }
    out[("ConfigMap", index_name)] = {
        "metadata": {"name": index_name},
        "data": {naming.MANIFEST_KEY: index.model_dump_json(by_alias=True)},
    }
    return out


def test_projected_manifest_volume_is_the_index_and_its_shards_read_only(
    rendered: Any, tmp_path: Path
) -> None:
    """The manifest volume is projected (index + optional shard slots): the pod sees the index
    and exactly the shards that exist, read-only; a new generation in more shards, and a later
    one in fewer, replace the files whole (the slots no longer stored disappear)."""
    dep, refs = copy.deepcopy(rendered)
    vol = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "manifest")
    slots = vol["projected"]["sources"][1:]
    assert len(slots) == manifest_shards.MAX_SHARDS and all(
        s["configMap"]["optional"] for s in slots
    )
    pod = _probe_pod(dep, tmp_path, refs=refs)
    name = "probe-adapter-server"
    server_src = str(Path(manifest_shards.__file__).resolve().parents[1])

    def seen() -> dict[str, Any]:
        pod.argv[name] = [pod.argv[name][0], "-c", READ_MANIFEST, server_src, naming.MANIFEST_DIR]
        return _seen(pod, name)

    first = seen()
    assert first["files"] == ["manifest.json", "shard-0.gz"]
    assert first["write"] == "Read-only file system"
    gen = first["generation"]
    assert first["adapters"] >= 2

    three = _manifest_refs(refs, gen + 1, shard_bytes=200)
    write_volume(pod.volumes["manifest"], volume_files(vol, three))
    second = seen()
    shards = sorted(k for k in second["files"] if k.startswith("shard-"))
    assert len(shards) >= 2, second
    assert (second["generation"], second["adapters"]) == (gen + 1, first["adapters"])

    one = _manifest_refs(refs, gen + 2, shard_bytes=manifest_shards.SHARD_BYTES)
    write_volume(pod.volumes["manifest"], volume_files(vol, one))
    third = seen()
    assert third["files"] == ["manifest.json", "shard-0.gz"]
    assert third["generation"] == gen + 2


def test_projected_manifest_volume_torn_set_is_refused_by_the_reader(
    rendered: Any, tmp_path: Path
) -> None:
    """Objects of a projected volume come from different moments (each from its own watch):
    a new index beside an old shard is seen as torn, never read as a manifest."""
    dep, refs = copy.deepcopy(rendered)
    vol = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "manifest")
    pod = _probe_pod(dep, tmp_path, refs=refs)
    newer = _manifest_refs(refs, 99, shard_bytes=manifest_shards.SHARD_BYTES)
    index_name = naming.configmap_name("qwen-14b")
    torn = {**refs, ("ConfigMap", index_name): newer[("ConfigMap", index_name)]}
    write_volume(pod.volumes["manifest"], volume_files(vol, torn))
    name = "probe-adapter-server"
    server_src = str(Path(manifest_shards.__file__).resolve().parents[1])
    pod.argv[name] = [pod.argv[name][0], "-c", READ_MANIFEST, server_src, naming.MANIFEST_DIR]
    assert "does not match generation 99" in _seen(pod, name)["torn"]
