"""Run `loraplex operator` as a real process against a cluster (or the emulator).

Tests, the demo and benchmarks start the operator exactly as the container does, so a
restart is a real restart and its memory is a real process's memory.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class OperatorProcess:
    """`python -m loraplex.cli operator ...` with its log in a file."""

    def __init__(
        self,
        kubeconfig: Path,
        workdir: Path,
        *,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
    ):
        self.kubeconfig = kubeconfig
        self.env = env or {}
        self.workdir = workdir
        self.metrics_port = free_port()
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "operator.log"
        self.key_file = workdir / "token-key"
        if not self.key_file.exists():
            self.key_file.write_text("test-operator-key-0123456789abcdef")

    def start(self) -> OperatorProcess:
        """Start it; if its metrics port was taken meanwhile (a race with other processes on
        this machine), start again on another port."""
        for _ in range(5):
            self._spawn()
            deadline = time.monotonic() + 3
            while self.alive and time.monotonic() < deadline:
                if self._serving():
                    return self
                time.sleep(0.1)
            if self.alive:
                return self
            if "address already in use" not in self.log():
                raise RuntimeError(f"operator exited at start:\n{self.log()[-3000:]}")
            self.metrics_port = free_port()
        raise RuntimeError("operator could not bind a metrics port")

    def _serving(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.metrics_port)) == 0

    def _spawn(self) -> None:
        env = {**os.environ, **self.env, "KUBECONFIG": str(self.kubeconfig)}
        cmd = [
            sys.executable,
            "-m",
            "loraplex.cli",
            "operator",
            "--metrics-port",
            str(self.metrics_port),
            "--token-key-file",
            str(self.key_file),
            *self.extra_args,
        ]
        log = self.log_path.open("ab")  # appended: a restart keeps the earlier run's log
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_bytes(self) -> int:
        if not self.alive or self.proc is None:
            return 0
        rss: int = psutil.Process(self.proc.pid).memory_info().rss
        return rss

    def cpu_seconds(self) -> float:
        """User + system CPU the process has used so far (0 when it is not running)."""
        if not self.alive or self.proc is None:
            return 0.0
        times = psutil.Process(self.proc.pid).cpu_times()
        return float(times.user + times.system)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            deadline = time.monotonic() + timeout
            while self.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
