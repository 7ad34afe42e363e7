"""`loraplex-server`: run the public and admin apps until SIGTERM, then drain and exit.

On SIGTERM the server keeps listening while it drains: /readyz fails (so the endpoint leaves
the Service), new inference requests get 503 with Retry-After, and in-flight ones (streams
too) may finish for up to --drain-timeout seconds before the listeners close.

With --workers N > 1 this process is the owner (see `workers`): it starts N-1 follower
processes on the same public port (SO_REUSEPORT), passes SIGTERM on to them, and waits for
them to drain before it exits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Coroutine
from typing import Any

from loraplex_server.settings import Settings, parse_args

log = logging.getLogger("loraplex_server")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # metrics.MULTIPROC_ENV, without importing it yet


def _run(coro: Coroutine[Any, Any, None]) -> None:
    """asyncio.run on uvloop where installed (the image has it): a cheaper loop per event."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - dev checkouts without the server extra
        asyncio.run(coro)
        return
    uvloop.run(coro)


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def serve(settings: Settings, followers: list[subprocess.Popen[bytes]]) -> None:
    from aiohttp import web

    from loraplex_server.app import create_app, drain
    from loraplex_server.front import PublicSite

    apps = create_app(settings)
    # The drain below already waited for in-flight requests; cleanup then cuts what is left.
    public = web.AppRunner(apps.public, access_log=None, handle_signals=False, shutdown_timeout=1)
    adm = web.AppRunner(apps.admin, access_log=None, handle_signals=False)
    await public.setup()  # starts the shared Server: manifest, registry, watchers
    await adm.setup()
    try:
        reuse = settings.workers > 1
        await PublicSite(public, settings.host, settings.port, reuse_port=reuse).start()
        await web.TCPSite(adm, settings.admin_host, settings.admin_port).start()
        log.info(
            "listening on %s:%d (admin %s:%d, %d workers), vLLM at %s",
            settings.host,
            settings.port,
            settings.admin_host,
            settings.admin_port,
            settings.workers,
            settings.vllm_url,
        )
        await _until_signal()
        log.info("draining for up to %.0fs", settings.drain_timeout)
        for f in followers:
            f.send_signal(signal.SIGTERM)
        await drain(apps.server)
        # followers may still need the owner for holds until they have drained
        await asyncio.gather(*(asyncio.to_thread(f.wait) for f in followers))
        log.info("shutting down")
    finally:
        for f in followers:
            if f.poll() is None:
                f.kill()
        await adm.cleanup()
        await public.cleanup()


async def serve_follower(settings: Settings) -> None:
    from aiohttp import web

    from loraplex_server.app import drain, public_app
    from loraplex_server.front import PublicSite
    from loraplex_server.workers import Follower

    follower = Follower(settings)
    runner = web.AppRunner(
        public_app(follower), access_log=None, handle_signals=False, shutdown_timeout=1
    )
    await runner.setup()
    try:
        # Join the shared port only once the owner's state is known: a request this worker
        # took earlier could only be answered 503.
        await follower.wait_for_owner()
        await PublicSite(runner, settings.host, settings.port, reuse_port=True).start()
        await _until_signal()
        await drain(follower)
    finally:
        await runner.cleanup()


def start_followers(settings: Settings, argv: list[str]) -> list[subprocess.Popen[bytes]]:
    """Set up shared metrics and start N-1 followers, before prometheus_client is imported."""
    if settings.workers <= 1:
        return []
    path = tempfile.mkdtemp(prefix="loraplex-metrics-")
    os.environ[MULTIPROC_ENV] = path  # read by prometheus_client when first imported
    cmd = [sys.executable, "-m", "loraplex_server", *argv, "--role", "follower"]
    return [subprocess.Popen(cmd) for _ in range(settings.workers - 1)]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    settings = parse_args(argv)
    logging.basicConfig(
        level=settings.log_level,
        format=f"%(asctime)s %(levelname)s %(name)s[{settings.role}]: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if settings.role == "follower":
        _run(serve_follower(settings))
        return
    followers: list[subprocess.Popen[bytes]] = []
    try:
        followers = start_followers(settings, argv)
        _run(serve(settings, followers))
    except (OSError, ValueError) as exc:
        log.error("cannot start: %s", exc)
        sys.exit(1)
    finally:
        for f in followers:
            if f.poll() is None:
                f.kill()
        if path := os.environ.get(MULTIPROC_ENV):
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
