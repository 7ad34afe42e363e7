"""Run one container of a rendered pod under the pod's own rules, with bubblewrap (`bwrap`).

A container runtime gives each container a uid, a root filesystem (read-only when the
container says `readOnlyRootFilesystem`), the pod's volumes at their mount paths and an
environment made of exactly what was rendered. Local processes get none of that, so a pod
spec that writes outside its volumes, or needs a passwd entry for its uid (torch's
`getpass.getuser()` in the CUDA vLLM image, issue 9), passes every local test and then fails
on a cluster. `bwrap` builds the same rules for an ordinary process, without images or a
daemon:

- the host's root, read-only (there is no image here: the host's files play the image's);
- `/etc/passwd` and `/etc/group` replaced by an image-like pair that lacks the pod's uid/gid,
  as in the CUDA image, so a process that looks its user up fails here as it would there;
- each volume bound at its mount path, read-only where Kubernetes makes it so;
- the uid/gid from the securityContext (a user namespace maps it to the caller);
- its own pid and uts namespaces (a pod's containers do not see the host's processes), the
  host's network (the pod's containers share one loopback; here that is the host's).

A mount point must exist in the read-only root. For a mount path whose parent folders do not
exist on the host (`/etc/loraplex/manifest`), the deepest folder that does exist is rebuilt as
a tmpfs holding read-only binds of the host's entries, the mount point is made in it, and the
tmpfs is made read-only again once everything is mounted. Nothing on the host is created.

`bwrap` only sees its own environment: the runner starts it with exactly the container's
environment (`--setenv` would put Secret values in the host's process list).

`python -m loraplex.devtools.bubblewrap ensure` (a step of `make setup`) installs Debian's
`bubblewrap` when it is missing and this is root with apt-get, and otherwise says what to do.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

INSTALL_HINT = (
    "install bubblewrap (Debian/Ubuntu: `sudo apt-get install -y bubblewrap`; Fedora: "
    "`sudo dnf install bubblewrap`; macOS has none: use Linux or a Linux VM) so the local pod "
    "runner can enforce the pod's uid, read-only root, volumes and environment"
)

# Entries of / that bwrap mounts itself (--proc, --dev) and so are never bound from the host.
_OWN_MOUNTS = ("/proc", "/dev")

# Like the passwd of the Ubuntu base under the CUDA vLLM image: system accounts only.
_PASSWD = [
    ("root", 0, 0, "/root", "/bin/bash"),
    ("daemon", 1, 1, "/usr/sbin", "/usr/sbin/nologin"),
    ("bin", 2, 2, "/bin", "/usr/sbin/nologin"),
    ("sys", 3, 3, "/dev", "/usr/sbin/nologin"),
    ("nobody", 65534, 65534, "/nonexistent", "/usr/sbin/nologin"),
]
_GROUPS = [("root", 0), ("daemon", 1), ("bin", 2), ("sys", 3), ("nogroup", 65534)]


class BubblewrapMissing(RuntimeError):
    """bwrap is not installed or cannot create a sandbox here."""


@dataclass(frozen=True)
class Mount:
    """A host folder (or file) bound at `target` inside the sandbox."""

    source: Path
    target: str
    read_only: bool


@dataclass(frozen=True)
class Sandbox:
    """The rules for one container, everything `command()` needs."""

    uid: int
    gid: int
    read_only_root: bool
    mounts: Sequence[Mount]
    # Fresh tmpfs folders for a writable root (see `kubelet`): where a non-root uid can write
    # in an image, and nothing of the host's.
    scratch: Sequence[str] = ()
    # Host paths the substitutions need (the venv, the local model) laid back read-only on top
    # of any volume that covers them.
    host_paths: Sequence[Path] = ()
    etc_dir: Path | None = None  # holds the passwd/group pair; `write_etc` fills it
    hostname: str = "pod"
    workdir: str = "/"
    drop_all_caps: bool = True
    extra: Sequence[str] = field(default_factory=tuple)


def find() -> str | None:
    return shutil.which("bwrap")


def problem() -> str | None:
    """Why a sandbox cannot be made here (None when it can): missing bwrap, no user namespaces."""
    exe = find()
    if exe is None:
        return "bubblewrap (`bwrap`) is not installed: " + INSTALL_HINT
    probe = [exe, "--ro-bind", "/", "/", "--unshare-user", "--uid", "1000", "--", "/bin/true"]
    try:
        run = subprocess.run(probe, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{exe} could not run ({exc}): " + INSTALL_HINT
    if run.returncode != 0:
        return (
            f"{exe} cannot create a sandbox here ({run.stderr.strip()}); user namespaces may be "
            "disabled (sysctl kernel.unprivileged_userns_clone=1, or run as root)"
        )
    return None


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def write_etc(folder: Path, uid: int, gid: int) -> None:
    """An image-like passwd/group without the pod's uid/gid (root stays when the pod is root)."""
    folder.mkdir(parents=True, exist_ok=True)
    users = [u for u in _PASSWD if u[1] != uid or uid == 0]
    groups = [g for g in _GROUPS if g[1] != gid or gid == 0]
    (folder / "passwd").write_text(
        "".join(f"{n}:x:{u}:{g}:{n}:{home}:{sh}\n" for n, u, g, home, sh in users)
    )
    (folder / "group").write_text("".join(f"{n}:x:{g}:\n" for n, g in groups))


def _exists(path: str) -> bool:
    return os.path.lexists(path)


def _is_under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _mount_parent(target: str, mounted: Sequence[str]) -> str | None:
    """The folder to rebuild as a tmpfs so `target` can be made, or None if none is needed.

    None when the target exists on the host, or lies under something bwrap or an earlier
    mount provides (a volume, /dev, /proc), where bwrap can make the mount point itself.
    """
    if _exists(target) or any(_is_under(target, m) and target != m for m in mounted):
        return None
    path = PurePosixPath(target)
    for parent in path.parents:
        if _exists(str(parent)):
            return str(parent)
    return "/"


def _rebuild(folder: str) -> list[str]:
    """Replace `folder` by a tmpfs holding read-only binds of the host's entries in it."""
    args = [] if folder == "/" else ["--tmpfs", folder]
    for name in sorted(os.listdir(folder)):
        entry = os.path.join(folder, name)
        if entry in _OWN_MOUNTS:
            continue
        if os.path.islink(entry):
            args += ["--symlink", os.readlink(entry), entry]
        else:
            args += ["--ro-bind", entry, entry]
    return args


def command(box: Sandbox, argv: Sequence[str], bwrap: str = "bwrap") -> list[str]:
    """The bwrap command line that runs `argv` under `box`'s rules."""
    targets = [m.target for m in box.mounts] + list(box.scratch)
    if box.etc_dir is not None:
        targets += ["/etc/passwd", "/etc/group"]
    # Folders to rebuild, parents first, so a mount point below one can be made in it.
    rebuilt: list[str] = []
    earlier: list[str] = list(_OWN_MOUNTS)
    for t in targets:
        parent = _mount_parent(t, earlier)
        if parent is not None and parent not in rebuilt:
            rebuilt.append(parent)
        earlier.append(t)
    rebuilt.sort(key=lambda p: (p != "/", p.count("/"), p))

    args = [bwrap, "--die-with-parent", "--unshare-user", "--unshare-pid", "--unshare-uts"]
    args += ["--hostname", box.hostname, "--uid", str(box.uid), "--gid", str(box.gid)]
    if box.drop_all_caps:
        args += ["--cap-drop", "ALL"]
    if "/" not in rebuilt:
        args += ["--ro-bind", "/", "/"]
    for folder in rebuilt:
        args += _rebuild(folder)
    args += ["--proc", "/proc", "--dev", "/dev"]
    if box.etc_dir is not None:
        args += ["--ro-bind", str(box.etc_dir / "passwd"), "/etc/passwd"]
        args += ["--ro-bind", str(box.etc_dir / "group"), "/etc/group"]
    for folder in box.scratch:
        args += ["--tmpfs", folder]
    for m in sorted(box.mounts, key=lambda m: m.target.count("/")):
        args += ["--ro-bind" if m.read_only else "--bind", str(m.source), m.target]
    covering = [m.target for m in box.mounts] + list(box.scratch)
    for host in box.host_paths:
        if host.exists() and any(_is_under(str(host), c) for c in covering):
            args += ["--ro-bind", str(host), str(host)]
    for folder in rebuilt:
        args += ["--remount-ro", folder]
    args += ["--chdir", box.workdir, *box.extra, "--", *argv]
    return args


def ensure() -> int:
    """`make setup`'s step: bwrap present and working, installed with apt-get when allowed."""
    why = problem()
    if why is None:
        print(f"bubblewrap: {find()} works; the local pod runner enforces the pod's rules")
        return 0
    can_install = os.geteuid() == 0 and shutil.which("apt-get") is not None and find() is None
    if can_install:
        print("bubblewrap: missing; installing Debian's bubblewrap with apt-get")
        for step in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "bubblewrap"],
        ):
            subprocess.run(step, check=False)
        why = problem()
        if why is None:
            print(f"bubblewrap: installed at {find()}")
            return 0
    print(f"bubblewrap: {why}", file=sys.stderr)
    if in_ci():
        print("bubblewrap: CI=true, so this is an error (the pod's rules must be enforced)")
        return 1
    print(
        "bubblewrap: WARNING: without it `make demo` and the e2e tests run the pod as plain "
        "processes, which do not enforce the pod's uid, read-only root or environment",
        file=sys.stderr,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args != ["ensure"]:
        print("usage: python -m loraplex.devtools.bubblewrap ensure", file=sys.stderr)
        return 2
    return ensure()


if __name__ == "__main__":
    sys.exit(main())
