"""The weights loader Job's program: download hf:// or s3:// base weights into a cache folder.

It runs as `python3 -c <this file> SOURCE REVISION FOLDER` in the vLLM image (which ships
huggingface_hub, and boto3 with the Run:ai streamer), so it imports only the standard library
and those two. It is idempotent: a finished folder has a marker and is left alone; a retry
resumes the partial folder; the folder appears under its final name only when complete (a
rename), so a pod never sees half a model. A failure's reason goes to the termination
message, where the operator reads it for the BaseModel's status.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path

MARKER = ".loraplex-complete"
TERMINATION_LOG = Path("/dev/termination-log")
# Llama repos carry the original PyTorch checkpoint beside the safetensors: vLLM never reads it.
HF_IGNORE = ["original/*", "*.pth"]


def _s3(source: str, into: Path) -> int:
    import boto3  # in the vLLM image (runai-model-streamer[s3]); credentials from the env/IRSA

    bucket, _, prefix = source.removeprefix("s3://").partition("/")
    prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
    client = boto3.client("s3")
    count = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            key = obj.get("Key", "")
            rel = key[len(prefix) :]
            if not rel or rel.endswith("/"):
                continue
            if any(part in ("", ".", "..") for part in rel.split("/")):
                raise ValueError(f"refusing object key {key!r}: not a plain relative path")
            target = into / rel
            if target.is_file() and target.stat().st_size == obj.get("Size"):
                count += 1  # kept from an earlier attempt
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, key, str(target))
            count += 1
    if count == 0:
        raise FileNotFoundError(f"no objects under {source}")
    return count


def _hf(source: str, revision: str, into: Path) -> None:
    from huggingface_hub import snapshot_download  # in the vLLM image; HF_TOKEN from the env

    snapshot_download(
        source.removeprefix("hf://"),
        revision=revision or None,
        local_dir=str(into),
        ignore_patterns=HF_IGNORE,
    )


def load(source: str, revision: str, folder: Path) -> str:
    """Fill `folder` with the weights at `source`; returns what was done."""
    if (folder / MARKER).is_file():
        return f"already cached: {folder}"
    partial = folder.with_name(folder.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    if source.startswith("hf://"):
        _hf(source, revision, partial)
    elif source.startswith("s3://"):
        _s3(source, partial)
    else:
        raise ValueError(f"the loader reads hf:// and s3:// sources, not {source!r}")
    (partial / MARKER).write_text(json.dumps({"source": source, "revision": revision}))
    if folder.exists():
        shutil.rmtree(folder)
    partial.rename(folder)
    return f"cached {source} in {folder}"


def main(argv: list[str]) -> int:
    source, revision, folder = argv
    try:
        print(load(source, revision, Path(folder)), flush=True)
    except Exception as exc:  # every failure becomes a reason in the BaseModel's status
        message = f"{type(exc).__name__}: {exc}"[:1024]
        print(message, file=sys.stderr, flush=True)
        with contextlib.suppress(OSError):
            TERMINATION_LOG.write_text(message)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
