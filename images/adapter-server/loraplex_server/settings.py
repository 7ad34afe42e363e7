"""Command-line settings of the in-pod server.

The operator renders only the required flags; everything else has a default that suits a pod,
and tests shorten the timings so faults show up in seconds rather than minutes.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    """Everything the server reads from its command line, already parsed and typed."""

    vllm_url: str
    manifest: Path
    cache_dir: Path
    pvc_root: Path
    admin_token_file: Path
    host: str = "0.0.0.0"
    port: int = 8000
    admin_host: str = "0.0.0.0"
    admin_port: int = 8090
    load_timeout: float = 60.0
    max_body_bytes: int = 8 * 1024 * 1024
    health_interval: float = 0.5
    manifest_interval: float = 1.0
    # How long a starting pod waits for the kubelet to mount a consistent set of manifest
    # shards (it refreshes each ConfigMap on its own sync, about a minute at worst).
    manifest_wait: float = 180.0
    download_attempts: int = 5
    download_backoff: float = 1.0
    download_read_timeout: float = 60.0
    log_level: str = "INFO"


def parse_args(argv: list[str] | None = None) -> Settings:
    """Parse argv into Settings; flags mirror the names the operator renders."""
    p = argparse.ArgumentParser(
        prog="loraplex-server",
        description="Serve many LoRA adapters on one vLLM: proxy, load, evict, report.",
    )
    p.add_argument("--vllm-url", required=True, help="vLLM's base URL on localhost")
    p.add_argument("--manifest", required=True, type=Path, help="mounted adapter manifest")
    p.add_argument("--cache-dir", required=True, type=Path, help="where adapters are installed")
    p.add_argument("--pvc-root", required=True, type=Path, help="where adapter PVCs are mounted")
    p.add_argument("--admin-token-file", required=True, type=Path, help="bearer token file")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--admin-host", default="0.0.0.0")
    p.add_argument("--admin-port", type=int, default=8090)
    p.add_argument(
        "--load-timeout",
        type=float,
        default=60.0,
        help="seconds a request waits for its adapter before 503",
    )
    p.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024)
    p.add_argument("--health-interval", type=float, default=0.5)
    p.add_argument("--manifest-interval", type=float, default=1.0)
    p.add_argument(
        "--manifest-wait",
        type=float,
        default=180.0,
        help="seconds a starting server waits for a consistent set of manifest shards",
    )
    p.add_argument("--download-attempts", type=int, default=5)
    p.add_argument(
        "--download-backoff",
        type=float,
        default=1.0,
        help="first retry delay in seconds; doubles each attempt",
    )
    p.add_argument(
        "--download-read-timeout",
        type=float,
        default=60.0,
        help="seconds without a byte before a download counts as hung",
    )
    p.add_argument("--log-level", default="INFO")
    a = p.parse_args(argv)
    return Settings(
        vllm_url=a.vllm_url.rstrip("/"),
        manifest=a.manifest,
        cache_dir=a.cache_dir,
        pvc_root=a.pvc_root,
        admin_token_file=a.admin_token_file,
        host=a.host,
        port=a.port,
        admin_host=a.admin_host,
        admin_port=a.admin_port,
        load_timeout=a.load_timeout,
        max_body_bytes=a.max_body_bytes,
        health_interval=a.health_interval,
        manifest_interval=a.manifest_interval,
        manifest_wait=a.manifest_wait,
        download_attempts=max(1, a.download_attempts),
        download_backoff=a.download_backoff,
        download_read_timeout=a.download_read_timeout,
        log_level=a.log_level.upper(),
    )
