"""kopf handlers: thin shells that route every event to `Reconciler.reconcile_base`.

Handlers have explicit ids, return nothing (so nothing spills into status), and map errors
once: an unreachable API is a TemporaryError (kopf retries with a delay); an invalid spec
never raises, because the reconciler already wrote a condition that names the fix.

Two pieces sit beside the reconcile path: the login handler gives kopf the same refreshing
credentials our client uses, and an informer-style cache of LoRAAdapters (primed by one list
at startup, then fed by every event of the watch kopf already runs) lets a reconcile read its
adapters from memory instead of listing the whole namespace. (kopf's own `@kopf.index` does
the same job, but with it the first convergence of 200 adapters took 3x longer in
bench/operator_scale.py, so the cache is ours.)
"""

from __future__ import annotations

import logging
from typing import Any, cast

import kopf

from loraplex import API_GROUP, API_VERSION, naming
from loraplex.adapters import read_candidate
from loraplex.api.loraadapter import LoRAAdapterStatus
from loraplex.errors import KubeError
from loraplex.kube import LORAADAPTERS
from loraplex.reconcile import Reconciler, base_of
from loraplex.status import adapter_status

log = logging.getLogger("loraplex.handlers")
BM = (API_GROUP, API_VERSION, "basemodels")
LORA = (API_GROUP, API_VERSION, "loraadapters")
OWNED = {"app.kubernetes.io/managed-by": naming.MANAGED_BY}

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


@kopf.on.event(*LORA, id="adapter-cache")
async def adapter_cache(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
    """Every LoRAAdapter event kopf's watch delivers (the initial listing included)."""
    _r().adapters.apply(str(event.get("type") or ""), dict(body))


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


@kopf.on.resume(*LORA, id="adapter-resume")
@kopf.on.create(*LORA, id="adapter-create")
@kopf.on.update(*LORA, id="adapter-update")
async def adapter_changed(
    body: kopf.Body,
    namespace: str | None,
    name: str,
    **kw: Any,
) -> None:
    base = base_of(dict(body))
    if base is not None:
        await _reconcile(namespace, base)
        return
    # No usable spec.baseModel: nothing to reconcile it under, so say why on the adapter itself.
    cand = read_candidate(dict(body))
    verdict = cand.error
    if verdict is None:  # pragma: no cover - baseModel is required by the model
        return
    old = LoRAAdapterStatus.model_validate({})
    status = adapter_status(
        old, body.get("metadata", {}).get("generation"), verdict, served_name=None, pods=[]
    )
    try:
        if namespace is not None:
            await _r().kube.patch(
                LORAADAPTERS, namespace, name, {"status": status.dump()}, sub="status"
            )
    except KubeError as exc:
        raise kopf.TemporaryError(str(exc), delay=5) from exc


@kopf.on.delete(*LORA, id="adapter-delete")
async def adapter_deleted(
    body: kopf.Body,
    namespace: str | None,
    name: str,
    **kw: Any,
) -> None:
    """Before the adapter goes, take it out of the manifest (and so off every pod)."""
    base = base_of(dict(body))
    if base is not None:
        await _reconcile(namespace, base)
    _r().forget_adapter(namespace or "", name)


@kopf.on.event("apps", "v1", "deployments", labels=OWNED, id="owned-deployment")
@kopf.on.event("", "v1", "services", labels=OWNED, id="owned-service")
@kopf.on.event("", "v1", "configmaps", labels=OWNED, id="owned-configmap")
@kopf.on.event("batch", "v1", "jobs", labels=OWNED, id="owned-job")
async def owned_changed(body: kopf.Body, **kw: Any) -> None:
    """An owned object changed or vanished (by hand, or its pods' readiness): converge now."""
    labels = body.get("metadata", {}).get("labels", {}) or {}
    base = labels.get(naming.BASE_LABEL)
    ns = body.get("metadata", {}).get("namespace")
    if base and ns:
        await _reconcile(ns, base)
