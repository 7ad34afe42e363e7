"""The server as its own process (real signals, real RSS), on loopback ports, for server tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from .helpers import TOKEN, free_port, manifest_doc


@dataclass
class ServerProcess:
    proc: asyncio.subprocess.Process
    url: str

    async def exited(self, within: float) -> int | None:
        """The exit code if the process ends within `within` seconds, else None."""
        try:
            return await asyncio.wait_for(self.proc.wait(), within)
        except TimeoutError:
            return None


@contextlib.asynccontextmanager
async def server_process(
    tmp_path: Path,
    vllm_url: str,
    pvc_root: Path,
    *extra: str,
    adapters: Any = (),
    manifest: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
) -> AsyncIterator[ServerProcess]:
    doc = manifest or manifest_doc(list(adapters))
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    (tmp_path / "token").write_text(TOKEN)
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "loraplex_server",
        *("--vllm-url", vllm_url, "--manifest", str(tmp_path / "manifest.json")),
        *("--cache-dir", str(tmp_path / "cache"), "--pvc-root", str(pvc_root)),
        *("--admin-token-file", str(tmp_path / "token"), "--host", "127.0.0.1"),
        *("--port", str(port), "--admin-host", "127.0.0.1"),
        *("--admin-port", str(free_port()), "--health-interval", "0.2"),
        *extra,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **(env or {})},
    )
    sp = ServerProcess(proc, f"http://127.0.0.1:{port}")
    try:
        async with aiohttp.ClientSession() as c:
            for _ in range(300):
                with contextlib.suppress(aiohttp.ClientError):
                    async with c.get(f"{sp.url}/readyz") as r:
                        if r.status == 200:
                            break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("server process did not become ready")
        yield sp
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
