"""`loraplex-server`: run the public and admin apps until SIGTERM, then drain and exit.

On SIGTERM the server keeps listening while it drains: /readyz fails (so the endpoint leaves
the Service), new inference requests get 503 with Retry-After, and in-flight ones (streams
too) may finish for up to --drain-timeout seconds before the listeners close.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from aiohttp import web

from loraplex_server.app import create_app, drain
from loraplex_server.settings import Settings, parse_args

log = logging.getLogger("loraplex_server")


async def serve(settings: Settings) -> None:
    apps = create_app(settings)
    # The drain below already waited for in-flight requests; cleanup then cuts what is left.
    public = web.AppRunner(apps.public, access_log=None, handle_signals=False, shutdown_timeout=1)
    adm = web.AppRunner(apps.admin, access_log=None, handle_signals=False)
    await public.setup()  # starts the shared Server: manifest, registry, watchers
    await adm.setup()
    try:
        await web.TCPSite(public, settings.host, settings.port).start()
        await web.TCPSite(adm, settings.admin_host, settings.admin_port).start()
        log.info(
            "listening on %s:%d (admin %s:%d), vLLM at %s",
            settings.host,
            settings.port,
            settings.admin_host,
            settings.admin_port,
            settings.vllm_url,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("draining for up to %.0fs", settings.drain_timeout)
        await drain(apps.server)
        log.info("shutting down")
    finally:
        await adm.cleanup()
        await public.cleanup()


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    try:
        asyncio.run(serve(settings))
    except (OSError, ValueError) as exc:
        log.error("cannot start: %s", exc)
        sys.exit(1)


if __name__ == "__main__":
    main()
