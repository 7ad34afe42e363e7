"""Running the operator: kopf's loop, our reconciler, and the /metrics + /healthz server."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import kopf
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from loraplex import API_GROUP, handlers
from loraplex.kube import KubeClient, discover_connection
from loraplex.metrics import REGISTRY
from loraplex.podsync import PodSync
from loraplex.reconcile import Reconciler
from loraplex.render import DEFAULT_IMAGES, DEFAULT_OPERATOR_PODS, Images, OperatorPods

log = logging.getLogger("loraplex.operator")


@dataclass(frozen=True)
class OperatorOptions:
    """Everything `loraplex operator` takes on its command line."""

    namespaces: tuple[str, ...] = ()
    metrics_port: int = 8080
    metrics_host: str = "0.0.0.0"
    peering: str | None = None
    peering_lifetime: int = 60
    token_key: bytes = field(default=b"", repr=False)
    images: Images = DEFAULT_IMAGES
    operator_pods: OperatorPods = DEFAULT_OPERATOR_PODS
    log_json: bool = True
    verbose: bool = False


def load_token_key(path: str | None) -> bytes:
    """The key admin tokens are derived from: a file, $LORAPLEX_TOKEN_KEY, or a random one.

    A random key works, but tokens change when the operator restarts (pods then follow the
    updated Secret); the Helm chart therefore always provides a stable key.
    """
    if path:
        return Path(path).read_bytes().strip()
    env = os.environ.get("LORAPLEX_TOKEN_KEY")
    if env:
        return env.encode()
    log.warning("no --token-key-file or LORAPLEX_TOKEN_KEY: using a random key for this run")
    return secrets.token_bytes(32)


async def _metrics_app(opts: OperatorOptions, stop: asyncio.Event) -> web.AppRunner:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"ok": not stop.is_set()}, status=503 if stop.is_set() else 200)

    app = web.Application()
    app.add_routes([web.get("/metrics", metrics), web.get("/healthz", healthz)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, opts.metrics_host, opts.metrics_port).start()
    return runner


_peering: dict[str, int] = {"lifetime": 60}
FINALIZER = handlers.FINALIZER


class _QuietAdapterEvents(logging.Filter):
    """Drop kopf's "Handler 'adapter-events' succeeded." line: it comes once per LoRAAdapter
    event (10,000 at a start with 10,000 adapters) and says nothing the reconciler's own
    logs do not; failures are still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(f"Handler '{handlers.ADAPTER_EVENTS}' succeeded")


@kopf.on.startup()
def _settings(settings: kopf.OperatorSettings, **_: object) -> None:
    """Keep kopf's bookkeeping in annotations, never in our status, and post fewer events.

    Peering: kopf pauses *every* replica when two share a priority, so with the chart's two
    replicas none would work; each process takes a random priority instead, the highest is
    active, and a standby takes over once the active one has been silent for `lifetime`.
    """
    settings.peering.priority = random.randint(1, 2**31 - 1)
    settings.peering.lifetime = _peering["lifetime"]
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=API_GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60


async def run_operator(opts: OperatorOptions, stop: asyncio.Event | None = None) -> None:
    """Run until `stop` is set (or the process is signalled)."""
    kopf.configure(
        verbose=opts.verbose,
        log_format=kopf.LogFormat.JSON if opts.log_json else kopf.LogFormat.FULL,
        log_refkey="object",
    )
    logging.getLogger("kopf.objects").addFilter(_QuietAdapterEvents())
    stop = stop or asyncio.Event()
    _peering["lifetime"] = opts.peering_lifetime
    # The pid in the User-Agent tells replicas' requests apart (in audit logs and tests).
    kube = KubeClient(discover_connection(), user_agent=f"loraplex-operator/{os.getpid()}")
    pods = PodSync()
    reconciler = Reconciler(
        kube,
        pods,
        token_key=opts.token_key,
        images=opts.images,
        operator_pods=opts.operator_pods,
        on_event=handlers.post_event,
    )
    reconciler.namespaces = opts.namespaces
    handlers.install(reconciler)
    runner = await _metrics_app(opts, stop)
    stop_flag: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def relay() -> None:
        await stop.wait()
        if not stop_flag.done():
            stop_flag.set_result(None)

    relay_task = asyncio.create_task(relay())
    try:
        await kopf.operator(
            clusterwide=not opts.namespaces,
            namespaces=list(opts.namespaces),
            standalone=opts.peering is None,
            peering_name=opts.peering,
            stop_flag=stop_flag,
        )
    finally:
        stop.set()
        relay_task.cancel()
        await runner.cleanup()
        await reconciler.statuses.close()
        await kube.close()
        await pods.close()
