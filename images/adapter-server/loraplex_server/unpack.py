"""Writing an adapter's files into the cache from an archive or a claim, within a quota.

Both walk untrusted trees (a tar from anywhere, a folder on a shared claim), so both write
regular files and folders only, refuse every link and device, and charge every byte to the
attempt's Quota before writing it.
"""

from __future__ import annotations

import os
import stat
import tarfile
import zlib
from pathlib import Path, PurePosixPath
from typing import IO

from loraplex_server import errors
from loraplex_server.cache import Quota

CHUNK = 1 << 16


def safe_member(name: str) -> PurePosixPath:
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or "\\" in name or "\x00" in name:
        raise errors.AdapterError(
            errors.UNSUPPORTED_ADAPTER, f"archive member {name!r} would escape the adapter folder"
        )
    return PurePosixPath(*[x for x in p.parts if x != "."])


def _copy_stream(src: IO[bytes], target: Path, quota: Quota) -> None:
    with target.open("wb") as out:
        while chunk := src.read(CHUNK):
            quota.charge_sync(len(chunk))
            out.write(chunk)


def extract_tar(archive: Path, dest: Path, quota: Quota) -> Path:
    """Extract regular files and folders only; return the folder holding adapter_config.json.

    Members are read one by one and each is checked (count, header size) before anything of
    it is written, so a bomb stops at the first member over a limit, without inflating it.
    """
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive) as tf:
            for m in tf:
                quota.add_file()
                rel = safe_member(m.name)
                if not rel.parts:
                    continue
                if m.isdir():
                    (dest / rel).mkdir(parents=True, exist_ok=True)
                elif m.isfile():
                    quota.expect(m.size)
                    target = dest / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    src = tf.extractfile(m)
                    if src is None:
                        continue
                    with src:
                        _copy_stream(src, target, quota)
                else:
                    raise errors.AdapterError(
                        errors.UNSUPPORTED_ADAPTER,
                        f"archive member {m.name!r} is a link or device; only files are allowed",
                    )
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise errors.AdapterError(
            errors.UNSUPPORTED_ADAPTER, "the archive is not a readable tar archive", str(exc)
        ) from exc
    if (dest / "adapter_config.json").is_file():
        return dest
    subdirs = [p for p in dest.iterdir() if p.is_dir()]
    if len(subdirs) == 1 and (subdirs[0] / "adapter_config.json").is_file():
        return subdirs[0]
    raise errors.AdapterError(
        errors.UNSUPPORTED_ADAPTER, "archive holds no adapter_config.json at its top level"
    )


def copy_regular_tree(src: Path, dest: Path, quota: Quota) -> None:
    """Copy a pvc adapter folder into the cache; refuse anything but regular files and folders.

    vLLM then loads the verified copy, so nothing done to the claim after the check (a file
    swapped for a symlink, new weights) reaches vLLM; symlinks are refused outright, since
    inside a claim they may point anywhere on the node's view of the pod.
    """
    for dirpath, dirnames, filenames in os.walk(src):
        here = Path(dirpath)
        rel_dir = here.relative_to(src)
        (dest / rel_dir).mkdir(parents=True, exist_ok=True)
        for n in [*dirnames, *filenames]:
            st = os.lstat(here / n)
            if stat.S_ISDIR(st.st_mode):
                quota.add_file()
                continue
            if not stat.S_ISREG(st.st_mode):
                raise errors.AdapterError(
                    errors.UNSUPPORTED_ADAPTER,
                    f"{(rel_dir / n).as_posix()} is a symlink or special file; an adapter folder "
                    "may hold only regular files",
                )
            quota.add_file()
            quota.expect(st.st_size)
            fd = os.open(here / n, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    raise errors.AdapterError(
                        errors.UNSUPPORTED_ADAPTER, f"{n} changed into a special file"
                    )
                _copy_stream(f, dest / rel_dir / n, quota)
