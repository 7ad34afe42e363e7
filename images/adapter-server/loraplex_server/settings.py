"""Command-line settings of the in-pod server.

The operator renders only the required flags; everything else has a default that suits a pod,
and tests shorten the timings so faults show up in seconds rather than minutes.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def default_workers(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """One worker per core of the container's CPU limit (cgroup v2 `cpu.max`), rounded up;
    without a limit, the cores this process may run on. At most 16: past that the one owner
    process that loads adapters, not relaying, is what would need scaling."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            return max(1, min(16, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, min(16, len(os.sched_getaffinity(0))))


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
    max_waiting: int = 256
    max_waiting_per_adapter: int = 64
    max_waiting_bytes: int = 64 * 1024 * 1024
    drain_timeout: float = 25.0
    vllm_dead_after: float = 60.0
    workers: int = 1
    role: str = "owner"
    health_interval: float = 0.5
    manifest_interval: float = 1.0
    # How long a starting pod waits for the kubelet to mount a consistent set of manifest
    # shards (it refreshes each ConfigMap on its own sync, about a minute at worst).
    manifest_wait: float = 180.0
    # Adapters with metric series of their own (metrics.AdapterSeries), and how long one must
    # be idle before a newcomer takes its slot.
    max_adapter_series: int = 200
    adapter_series_idle: float = 300.0
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
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=8 * 1024 * 1024,
        help="largest request body accepted on either port (413 beyond)",
    )
    p.add_argument(
        "--max-waiting",
        type=int,
        default=256,
        help="requests that may wait for adapters to load, in total (503 beyond)",
    )
    p.add_argument(
        "--max-waiting-per-adapter",
        type=int,
        default=64,
        help="requests that may wait for one adapter to load (503 beyond)",
    )
    p.add_argument(
        "--max-waiting-bytes",
        type=int,
        default=64 * 1024 * 1024,
        help="request-body bytes that waiting requests may hold in total (503 beyond)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=25.0,
        help="on SIGTERM, seconds to let in-flight requests finish before exiting",
    )
    p.add_argument(
        "--vllm-dead-after",
        type=float,
        default=60.0,
        help="/healthz fails once vLLM, having answered before, has not for this many seconds",
    )
    p.add_argument("--health-interval", type=float, default=0.5)
    p.add_argument("--manifest-interval", type=float, default=1.0)
    p.add_argument(
        "--manifest-wait",
        type=float,
        default=180.0,
        help="seconds a starting server waits for a consistent set of manifest shards",
    )
    p.add_argument(
        "--max-adapter-series",
        type=int,
        default=200,
        help="adapters with metric series of their own; the rest count under adapter=other",
    )
    p.add_argument(
        "--adapter-series-idle",
        type=float,
        default=300.0,
        help="seconds an adapter's series must be unused before another adapter takes it",
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
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes serving the public port (SO_REUSEPORT); default: the container's CPU "
        "limit, from cgroup cpu.max. One of them owns adapter loads and the admin port.",
    )
    p.add_argument("--role", choices=["owner", "follower"], default="owner", help=argparse.SUPPRESS)
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
        max_waiting=a.max_waiting,
        max_waiting_per_adapter=a.max_waiting_per_adapter,
        max_waiting_bytes=a.max_waiting_bytes,
        drain_timeout=a.drain_timeout,
        vllm_dead_after=a.vllm_dead_after,
        workers=max(1, a.workers if a.workers is not None else default_workers()),
        role=a.role,
        health_interval=a.health_interval,
        manifest_interval=a.manifest_interval,
        manifest_wait=a.manifest_wait,
        max_adapter_series=max(0, a.max_adapter_series),
        adapter_series_idle=max(0.0, a.adapter_series_idle),
        download_attempts=max(1, a.download_attempts),
        download_backoff=a.download_backoff,
        download_read_timeout=a.download_read_timeout,
        log_level=a.log_level.upper(),
    )
