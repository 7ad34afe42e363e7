"""kopf handlers: thin shells that route every event to `Reconciler.reconcile_base`.

Handlers have explicit ids, return nothing (so nothing spills into status), and map errors
once: an unreachable API is a TemporaryError (kopf retries with a delay); an invalid spec
never raises, because the reconciler already wrote a condition that names the fix.

Two pieces sit beside the reconcile path: the login handler gives kopf the same refreshing
credentials our client uses, and an informer-style cache of LoRAAdapters (primed by one list
at startup, then fed by every event of the watch kopf already runs) lets a reconcile read its
adapters from memory instead of listing the whole namespace. (kopf's own `@kopf.index` does
the same job, but with it the first convergence of 200 adapters took 3x longer in
bench/operator_scale.py, so the cache is ours.) LoRAAdapters have only that event handler:
BaseModels are few, adapters may be 10,000, and kopf's per-object bookkeeping (finalizer,
annotations) would cost two API writes per adapter.
"""

from __future__ import annotations

import logging
from typing import Any, cast

import kopf

from loraplex import API_GROUP, API_VERSION, naming
from loraplex.errors import KubeError
from loraplex.kube import LORAADAPTERS
from loraplex.reconcile import Reconciler, base_of

log = logging.getLogger("loraplex.handlers")
BM = (API_GROUP, API_VERSION, "basemodels")
LORA = (API_GROUP, API_VERSION, "loraadapters")
OWNED = {"app.kubernetes.io/managed-by": naming.MANAGED_BY}
# kopf's finalizer (on BaseModels; on LoRAAdapters only from earlier operator builds, see
# `adapter_event`), and the id of the LoRAAdapter event handler (its log line is filtered).
FINALIZER = f"{API_GROUP}/finalizer"
ADAPTER_EVENTS = "adapter-events"

_state: dict[str, Reconciler] = {}


def install(reconciler: Reconciler) -> None:
    """Give the handlers their reconciler (set once, before kopf starts)."""
    _state["r"] = reconciler


def post_event(body: dict[str, Any], reason: str, message: str) -> None:
    """Post a Kubernetes Event on `body` through kopf's event poster (queued, non-blocking)."""
    kopf.event(kopf.Body(cast(kopf.RawBody, body)), type="Normal", reason=reason, message=message)


def _r() -> Reconciler:
    return _state["r"]


@kopf.on.login(id="loraplex-login")
async def login(**_: Any) -> kopf.ConnectionInfo:
    """kopf's credentials, from the source our client refreshes (token file, exec plugin)."""
    info: kopf.ConnectionInfo = await _r().kube.connection_info()
    return info


@kopf.on.startup(id="adapter-cache-prime")
async def prime_adapter_cache(**_: Any) -> None:
    """Fill the adapter cache with one list before kopf's watches start (and feed it).

    Without this, the first reconciles (started by the initial listing of BaseModels) could
    see only the adapters whose events had arrived so far, and briefly shrink a manifest.
    """
    r = _r()
    r.adapters.prime(await r.kube.list_all(LORAADAPTERS, r.namespaces))


async def _reconcile(namespace: str | None, name: str) -> None:
    if namespace is None:  # both kinds are namespaced; kopf's types allow None for cluster kinds
        return
    try:
        await _r().reconcile_base(namespace, name)
    except KubeError as exc:
        raise kopf.TemporaryError(f"Kubernetes API: {exc}", delay=5) from exc


@kopf.on.resume(*BM, id="basemodel-resume")
@kopf.on.create(*BM, id="basemodel-create")
@kopf.on.update(*BM, id="basemodel-update")
async def basemodel_changed(namespace: str | None, name: str, **kw: Any) -> None:
    await _reconcile(namespace, name)


@kopf.on.event(*BM, id="basemodel-deleted")
async def basemodel_event(
    event: kopf.RawEvent,
    namespace: str | None,
    name: str,
    **kw: Any,
) -> None:
    """A deleted BaseModel: its adapters learn `BaseModelNotFound` at once."""
    if event.get("type") == "DELETED":
        await _reconcile(namespace, name)


@kopf.timer(*BM, id="basemodel-sync", interval=10.0, initial_delay=2.0, idle=0)
async def basemodel_tick(namespace: str | None, name: str, **kw: Any) -> None:
    """Level-based safety net: corrects drift of owned objects and syncs pods' adapter state."""
    await _reconcile(namespace, name)


@kopf.on.event(*LORA, id=ADAPTER_EVENTS)
async def adapter_event(
    event: kopf.RawEvent, body: kopf.Body, namespace: str | None, name: str, **_: Any
) -> None:
    """Every LoRAAdapter event (the initial listing included): into the cache, and a reconcile
    of each BaseModel whose adapters it changed (a status-only change, such as our own
    write, changes none).

    Adapters get only event handlers, so kopf stores nothing on them: no finalizer, no
    annotations, no patch per adapter (at 10,000 adapters those were two of every three API
    calls, and most of the start-up time). Nothing is lost: reconciles are level-based, so a
    deleted adapter leaves the manifest on its DELETED event, or on the next pass of its
    BaseModel if the operator was down when it went. (kopf itself removes the finalizer that
    earlier builds put on adapters, once, at the first event of each.)
    """
    r = _r()
    kind = str(event.get("type") or "")
    obj = dict(body)
    for base in sorted(r.adapters.apply(kind, obj)):
        try:
            await _reconcile(namespace, base)
        except kopf.TemporaryError as exc:  # event handlers are not retried: the timer is
            log.warning("BaseModel %s/%s: %s (retried on its next tick)", namespace, base, exc)
    if kind == "DELETED" or namespace is None:
        r.forget_adapter(namespace or "", name)
        return
    if base_of(obj) is None:
        r.report_unplaced(namespace, obj)


@kopf.on.event("apps", "v1", "deployments", labels=OWNED, id="owned-deployment")
@kopf.on.event("", "v1", "services", labels=OWNED, id="owned-service")
@kopf.on.event("", "v1", "configmaps", labels=OWNED, id="owned-configmap")
@kopf.on.event("batch", "v1", "jobs", labels=OWNED, id="owned-job")
async def owned_changed(body: kopf.Body, event: kopf.RawEvent, **kw: Any) -> None:
    """An owned object changed or vanished (by hand, or its pods' readiness): converge now.
    Not for the version our own last write made (a create's ADDED included): the pass that
    wrote it has converged. At 100 BaseModels the ADDED events of the objects a first pass
    creates started three more passes each."""
    if event.get("type") in ("ADDED", "MODIFIED") and await _r().was_own_write(dict(body)):
        return
    labels = body.get("metadata", {}).get("labels", {}) or {}
    base = labels.get(naming.BASE_LABEL)
    ns = body.get("metadata", {}).get("namespace")
    if base and ns:
        await _reconcile(ns, base)
