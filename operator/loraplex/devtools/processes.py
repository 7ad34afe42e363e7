"""Start and stop CPU vLLM and loraplex-server as separate processes, as a pod runs them.

Used by the server tests, the demo and the benchmarks. Each child gets its own process group so
stopping it also stops vLLM's engine-core child; stop is SIGTERM, then SIGKILL after a grace.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

# What CPU vLLM on this machine needs beyond a pod's env, each with the reason (the local pod
# runner prints them as substitutions).
VLLM_CPU_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": ("1", "no GPU: 1 GiB of CPU KV cache"),
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": ("True", "runtime adapter loading, as the pod renders"),
    "HF_HUB_OFFLINE": ("1", "no network here; the model is a local folder"),
    "TRANSFORMERS_OFFLINE": ("1", "no network here; the model is a local folder"),
    "VLLM_NO_USAGE_STATS": ("1", "no usage reports, as the pod renders"),
}
VLLM_ENV = {key: value for key, (value, _why) in VLLM_CPU_ENV.items()} | {"DO_NOT_TRACK": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Managed:
    """A child process in its own group, with its output in a log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    url: str

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole group (vLLM forks an engine core that must die with it)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    def stop(self, grace: float = 15.0) -> None:
        if self.alive():
            self.kill(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(grace)
        self.kill(signal.SIGKILL)  # stragglers in the group, even if the leader has exited
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def spawn(
    name: str,
    argv: Sequence[str],
    log_path: Path,
    env: dict[str, str],
    url: str,
    *,
    inherit_env: bool = True,
) -> Managed:
    """Start `argv` in its own process group; `inherit_env=False` gives it exactly `env`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out: IO[bytes] = log_path.open("ab")
    try:
        popen = subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **env} if inherit_env else dict(env),
            start_new_session=True,
        )
    finally:
        out.close()
    return Managed(name, popen, log_path, url)


def wait_http(proc: Managed, path: str, timeout: float, ok: tuple[int, ...] = (200,)) -> None:
    """Poll `proc.url + path` until it answers one of `ok`; fail fast if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.tail()}")
        try:
            with urllib.request.urlopen(proc.url + path, timeout=2) as resp:
                if resp.status in ok:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code in ok:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{proc.name} not answering {path} after {timeout}s:\n{proc.tail()}")


def start_vllm(
    model: Path,
    served_name: str,
    *,
    port: int | None = None,
    max_loras: int = 2,
    max_lora_rank: int = 8,
    max_cpu_loras: int = 4,
    max_model_len: int = 256,
    extra_args: Sequence[str] = (),
    log_path: Path,
    wait: float | None = 240.0,
) -> Managed:
    """Start CPU vLLM the way the pod does; wait for /health unless `wait` is None."""
    port = port or free_port()
    argv = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--served-model-name",
        served_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--enable-lora",
        "--max-loras",
        str(max_loras),
        "--max-lora-rank",
        str(max_lora_rank),
        "--max-cpu-loras",
        str(max_cpu_loras),
        "--dtype",
        "bfloat16",
        "--max-model-len",
        str(max_model_len),
        *extra_args,
    ]
    proc = spawn("vllm", argv, log_path, VLLM_ENV, f"http://127.0.0.1:{port}")
    if wait is not None:
        try:
            wait_http(proc, "/health", wait)
        except BaseException:
            proc.stop()
            raise
    return proc


def start_server(
    *,
    vllm_url: str,
    manifest: Path,
    cache_dir: Path,
    pvc_root: Path,
    admin_token_file: Path,
    port: int | None = None,
    admin_port: int | None = None,
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    log_path: Path,
    wait: float | None = 30.0,
) -> tuple[Managed, str]:
    """Start loraplex-server; return it and its admin URL once /healthz answers."""
    port = port or free_port()
    admin_port = admin_port or free_port()
    argv = [
        sys.executable,
        "-m",
        "loraplex_server",
        "--vllm-url",
        vllm_url,
        "--manifest",
        str(manifest),
        "--cache-dir",
        str(cache_dir),
        "--port",
        str(port),
        "--admin-port",
        str(admin_port),
        "--admin-token-file",
        str(admin_token_file),
        "--pvc-root",
        str(pvc_root),
        "--host",
        "127.0.0.1",
        "--admin-host",
        "127.0.0.1",
        *extra_args,
    ]
    proc = spawn(
        "loraplex-server",
        argv,
        log_path,
        {"HF_HUB_OFFLINE": "1", **(env or {})},
        f"http://127.0.0.1:{port}",
    )
    if wait is not None:
        try:
            wait_http(proc, "/healthz", wait)
        except BaseException:
            proc.stop()
            raise
    return proc, f"http://127.0.0.1:{admin_port}"
