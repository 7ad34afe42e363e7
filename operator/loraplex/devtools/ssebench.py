"""The compiled GPU-paced stand-in for vLLM (`shared/bench/sse`): build it once, run it.

Why a compiled stand-in: a Python one would cost as much CPU as the proxy it measures, and
it lets three "pods" with adapter slots and load delays fit on two cores. Its source is the
team's shared benchmark kit (Go, standard library only), found beside the checkout as
`../shared/bench/sse` (where CI puts shared/) or at `$LORAPLEX_SSE_SRC`; binaries go to
`.cache/sse/` in the checkout (ignored by git) and are rebuilt when the source changes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from loraplex.devtools.processes import Managed, free_port, spawn, wait_http

ROOT = Path(__file__).resolve().parents[3]


class StandInUnavailable(RuntimeError):
    """The stand-in's source or a Go toolchain is missing; the message says what to do."""


def source_dir() -> Path:
    env = os.environ.get("LORAPLEX_SSE_SRC")
    src = Path(env) if env else ROOT.parent / "shared" / "bench" / "sse"
    if not (src / "upstream.go").is_file():
        raise StandInUnavailable(
            f"no stand-in source at {src}: put shared/ beside the checkout or set LORAPLEX_SSE_SRC"
        )
    return src


def build() -> Path:
    """The folder holding `upstream` and `loadgen`, built if missing or stale."""
    src = source_dir()
    digest = hashlib.sha256(
        b"".join((src / f).read_bytes() for f in ("upstream.go", "loadgen.go"))
    ).hexdigest()[:12]
    out = ROOT / ".cache" / "sse" / digest
    if (out / "upstream").is_file() and (out / "loadgen").is_file():
        return out
    go = shutil.which("go") or "/usr/local/go/bin/go"
    if not Path(go).exists():
        raise StandInUnavailable("building the stand-in needs Go (apt-get install golang-go)")
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GOFLAGS": "-mod=mod", "GO111MODULE": "on"}
    for prog in ("upstream", "loadgen"):
        subprocess.run(
            [go, "build", "-o", str(out / prog), f"{prog}.go"],
            cwd=src,
            env=env,
            check=True,
            capture_output=True,
        )
    return out


def start_upstream(
    log_path: Path,
    *,
    base: str = "base",
    itl_ms: float = 0,
    slots: int = 0,
    swap_ms: float = 0,
    load_ms: float = 0,
    cpu: int | None = None,
) -> Managed:
    """One stand-in 'vLLM' on a free loopback port, waited for; `cpu` pins it to a core."""
    port = free_port()
    argv = [
        str(build() / "upstream"),
        "-addr",
        f"127.0.0.1:{port}",
        "-base",
        base,
        "-itl",
        f"{itl_ms}ms",
        "-slots",
        str(slots),
        "-swap",
        f"{swap_ms}ms",
        "-load",
        f"{load_ms}ms",
    ]
    if cpu is not None:
        argv = ["taskset", "-c", str(cpu), *argv]
    proc = spawn("upstream", argv, log_path, {}, f"http://127.0.0.1:{port}")
    wait_http(proc, "/health", 20)
    return proc
