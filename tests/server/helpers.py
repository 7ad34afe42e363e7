"""Loopback stand-ins used by the server tests: a fake vLLM and a faulty file server.

The fake vLLM implements just the endpoints the server calls, with vLLM 0.32's answers
("already been loaded" 400, unknown-name 404), and records every load so tests can count them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from loraplex_server.app import create_app
from loraplex_server.front import PublicSite
from loraplex_server.server import Server
from loraplex_server.settings import Settings

TOKEN = "t0ken-for-tests"
# The stand-in origins listen on loopback over plain http, which a pod refuses by default;
# tests opt in the way a BaseModel would (spec.adapterLimits), and test_netguard checks the
# refusal without this.
LOOPBACK_LIMITS: dict[str, Any] = {
    "plainHttpHosts": ["127.0.0.1"],
    "privateNetworks": ["127.0.0.0/8"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def serve_app(app: web.Application, *, public: bool = False) -> AsyncIterator[str]:
    """`app` on a free loopback port; `public`: behind `front.PublicSite`, as the server runs."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    site = PublicSite if public else web.TCPSite
    await site(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@dataclass
class FakeVLLM:
    base: str = "tiny"
    healthy: bool = True
    loaded: dict[str, str] = field(default_factory=dict)
    load_calls: list[str] = field(default_factory=list)
    unload_calls: list[str] = field(default_factory=list)
    load_delay: float = 0.0
    unload_delay: float = 0.0
    refuse: set[str] = field(default_factory=set)
    chunk_delay: float = 0.0
    seen_bodies: list[dict[str, Any]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_post("/v1/load_lora_adapter", self.load)
        app.router.add_post("/v1/unload_lora_adapter", self.unload)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.healthy else 503)

    async def load(self, request: web.Request) -> web.Response:
        body = await request.json()
        name = body["lora_name"]
        self.load_calls.append(name)
        await asyncio.sleep(self.load_delay)
        if name in self.refuse:
            return web.json_response({"error": {"message": "bad weights", "code": 500}}, status=500)
        if name in self.loaded:
            return web.json_response(
                {"error": {"message": f"The lora adapter '{name}' has already been loaded."}},
                status=400,
            )
        self.loaded[name] = body["lora_path"]
        return web.Response(text="Success")

    async def unload(self, request: web.Request) -> web.Response:
        name = (await request.json())["lora_name"]
        self.unload_calls.append(name)
        await asyncio.sleep(self.unload_delay)
        if self.loaded.pop(name, None) is None:
            return web.json_response({"error": {"message": "cannot be found"}}, status=404)
        return web.Response(text="Success")

    async def models(self, request: web.Request) -> web.Response:
        data = [{"id": self.base, "object": "model", "max_model_len": 256}]
        data += [{"id": n, "object": "model", "parent": self.base} for n in self.loaded]
        return web.json_response({"object": "list", "data": data})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.seen_bodies.append(body)
        model = body.get("model")
        if model != self.base and model not in self.loaded:
            return web.json_response({"error": {"message": f"{model} does not exist"}}, status=404)
        usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        if not body.get("stream"):
            await asyncio.sleep(self.chunk_delay)
            return web.json_response(
                {"model": model, "choices": [{"text": f"{model}!"}], "usage": usage}
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for piece in ("a", "b"):
            await asyncio.sleep(self.chunk_delay)
            chunk = {"model": model, "choices": [{"text": piece}]}
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        final = {"model": model, "choices": [], "usage": usage}
        await resp.write(b"data: " + json.dumps(final).encode() + b"\n\ndata: [DONE]\n\n")
        return resp


def manifest_doc(
    adapters: list[dict[str, Any]],
    generation: int = 1,
    max_loras: int = 2,
    max_cpu_loras: int | None = None,
    limits: dict[str, Any] | None = None,
    probe: bool = False,
    **kw: Any,
) -> dict[str, Any]:
    """A manifest; `max_cpu_loras` (the server's cap on resident adapters) defaults to
    `max_loras` so eviction is exercised with few adapters; `limits` to LOOPBACK_LIMITS.
    Probes are off unless asked: tests of loads and evictions count every load, and
    test_vllm_probe.py covers probing."""
    return {
        "generation": generation,
        "baseServedName": "tiny",
        "maxLoras": max_loras,
        "maxLoraRank": 8,
        "maxCpuLoras": max_cpu_loras or max_loras,
        "limits": LOOPBACK_LIMITS if limits is None else limits,
        "adapters": adapters,
        "checks": {"probe": probe},
        **kw,
    }


def pvc_adapter(name: str, *, pinned: bool = False, served: str | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "servedName": served or name,
        "source": f"pvc://adapters/{name}",
        "pinned": pinned,
    }


def make_settings(
    tmp: Path, vllm_url: str, manifest: dict[str, Any], pvc_root: Path, **kw: Any
) -> Settings:
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    (tmp / "token").write_text(TOKEN + "\n")
    defaults: dict[str, Any] = dict(
        load_timeout=10.0,
        health_interval=0.2,
        manifest_interval=0.2,
        download_attempts=3,
        download_backoff=0.05,
        download_read_timeout=1.0,
        max_body_bytes=64 * 1024,
    )
    defaults.update(kw)
    return Settings(
        vllm_url=vllm_url,
        manifest=tmp / "manifest.json",
        cache_dir=tmp / "cache",
        pvc_root=pvc_root,
        admin_token_file=tmp / "token",
        **defaults,
    )


@dataclass
class Running:
    url: str
    admin: str
    server: Server

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}"}


@contextlib.asynccontextmanager
async def run_server(settings: Settings) -> AsyncIterator[Running]:
    """The real server in this process, on loopback ports: fast to start, easy to inspect."""
    apps = create_app(settings)
    async with serve_app(apps.public, public=True) as url, serve_app(apps.admin) as admin:
        yield Running(url, admin, apps.server)


async def wait_for(predicate: Any, within: float = 10.0, step: float = 0.05) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(step)


@dataclass
class FileServer:
    """A loopback HTTP file server that can fail on purpose, per path.

    Modes: "ok", "404", "500", "hang" (headers, then silence), "truncate" (half the promised
    body, then close), "flaky" (500 on the first hit, then ok). Written on raw asyncio streams
    so a truncated body really is one.
    """

    files: dict[str, bytes] = field(default_factory=dict)
    modes: dict[str, str] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=dict)
    url: str = ""
    _server: asyncio.Server | None = None

    async def __aenter__(self) -> FileServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._writers:
            task.cancel()

    _writers: list[asyncio.Task[Any]] = field(default_factory=list)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._writers.append(task)
        try:
            line = await reader.readline()
            path = line.split()[1].decode()
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass
            n = self.hits[path] = self.hits.get(path, 0) + 1
            mode = self.modes.get(path, "ok")
            data = self.files.get(path)
            if mode == "flaky" and n == 1:
                mode = "500"
            if mode == "500":
                writer.write(b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            elif data is None or mode == "404":
                writer.write(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
            else:
                head = (
                    f"HTTP/1.1 200 OK\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n"
                )
                writer.write(head.encode())
                if mode == "hang":
                    writer.write(data[:10])
                    await writer.drain()
                    await asyncio.sleep(3600)
                elif mode == "truncate":
                    writer.write(data[: len(data) // 2])
                else:
                    writer.write(data)
            await writer.drain()
        except (asyncio.CancelledError, ConnectionError):
            pass
        finally:
            writer.close()


def tar_bytes(
    src: Path,
    arcname: str = "adapter",
    extra: dict[str, bytes] | None = None,
    symlink: str | None = None,
) -> bytes:
    """A tar.gz of an adapter folder, optionally with hostile extra members."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.add(src, arcname=arcname)
        for name, blob in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
        if symlink is not None:
            info = tarfile.TarInfo(f"{arcname}/link")
            info.type = tarfile.SYMTYPE
            info.linkname = symlink
            tf.addfile(info)
    return buf.getvalue()


@dataclass
class Origin:
    """A loopback adapter origin built on aiohttp, for the bounds and forgery tests.

    `routes` maps a path to bytes (served with a Content-Length) or to a behaviour:
    ("stream", n) sends n bytes chunked without a length (n=-1: forever); ("drip", n) promises
    n bytes and sends one every `drip_every` seconds; ("redirect", url) answers 302; ("status",
    code) answers with that status; ("slow",
    blob) waits `slow_for` seconds, then serves. It records the raw path and query of every
    request, how many were served at once at most, and how many body bytes it sent.
    """

    routes: dict[str, Any] = field(default_factory=dict)
    host: str = "127.0.0.1"
    drip_every: float = 0.3
    slow_for: float = 0.3
    seen: list[str] = field(default_factory=list)
    sent: int = 0
    active: int = 0
    max_active: int = 0
    url: str = ""
    _runner: web.AppRunner | None = None

    async def __aenter__(self) -> Origin:
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://{self.host}:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(request.raw_path)
        route = self.routes.get(request.raw_path.split("?", 1)[0])
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            return await self._answer(request, route)
        finally:
            self.active -= 1

    async def _answer(self, request: web.Request, route: Any) -> web.StreamResponse:
        if route is None:
            return web.Response(status=404)
        if isinstance(route, bytes):
            self.sent += len(route)
            return web.Response(body=route)
        kind, arg = route
        if kind == "redirect":
            raise web.HTTPFound(arg)
        if kind == "status":
            return web.Response(status=arg)
        if kind == "slow":
            await asyncio.sleep(self.slow_for)
            self.sent += len(arg)
            return web.Response(body=arg)
        resp = web.StreamResponse()
        if kind == "drip":
            resp.content_length = arg
        else:
            resp.enable_chunked_encoding()
        await resp.prepare(request)
        chunk = b"\0" * (1 if kind == "drip" else 1 << 16)
        done = 0
        while arg < 0 or done < arg:
            piece = chunk if arg < 0 else chunk[: arg - done]
            await resp.write(piece)
            done += len(piece)
            self.sent += len(piece)
            if kind == "drip":
                await asyncio.sleep(self.drip_every)
        await resp.write_eof()
        return resp
