"""Reconciling one BaseModel and its adapters: gather, decide (pure core), apply, report.

Everything about a BaseModel is decided in one pass under a per-object lock, level-based:
whichever event triggered it (a BaseModel or LoRAAdapter change, a drifted Deployment, a
timer tick), the pass reads the current state and converges to it. That makes restarts and
missed events harmless: the next pass does the same thing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraplex import naming
from loraplex.adapters import Verdict
from loraplex.api.basemodel import AdapterCounts, BaseModelStatus
from loraplex.api.loraadapter import LoRAAdapterStatus
from loraplex.decide import decide
from loraplex.diff import drifted
from loraplex.errors import InvalidSpec
from loraplex.kube import (
    BASEMODELS,
    CONFIGMAPS,
    DEPLOYMENTS,
    KIND_OF,
    LORAADAPTERS,
    NETWORKPOLICIES,
    PODS,
    SECRETS,
    KubeClient,
)
from loraplex.metrics import ADAPTERS, RECONCILE_SECONDS, RECONCILES
from loraplex.planner import Plan
from loraplex.podsync import PodSync, PodTarget, admin_token, ready_pods
from loraplex.render import (
    DEFAULT_IMAGES,
    DEFAULT_OPERATOR_PODS,
    Images,
    OperatorPods,
    Owner,
    plan_changes,
)
from loraplex.status import PodView, adapter_status, base_status
from loraplex_server import manifest_shards
from loraplex_server.manifest import AdapterManifest, AdaptersResponse

log = logging.getLogger("loraplex.reconcile")
# (object, reason, message): how the reconciler reports events without depending on kopf.
EventSink = Callable[[dict[str, Any], str, str], None]


def base_of(adapter: dict[str, Any]) -> str | None:
    spec = adapter.get("spec")
    value = spec.get("baseModel") if isinstance(spec, dict) else None
    return value if isinstance(value, str) and value else None


def read_local_config(raw_spec: Any) -> dict[str, Any] | None:
    """config.json of a base model at a local path, when this process can see it.

    Reads the raw spec (before validation) so the one validation pass stays in `decide`.
    """
    model = raw_spec.get("model") if isinstance(raw_spec, dict) else None
    source = model.get("source") if isinstance(model, dict) else None
    if not isinstance(source, str) or not source.startswith("/") or ".." in source:
        return None
    path = Path(source) / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _status_model(model: Any, raw: Any) -> Any:
    try:
        return model.model_validate(raw or {})
    except ValueError:
        return model()


@dataclass
class Outcome:
    """What one reconcile decided, for logs, metrics and tests."""

    result: str = "ok"
    manifest: AdapterManifest | None = None
    plan: Plan | None = None
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    writes: list[str] = field(default_factory=list)


class Reconciler:
    """Owns the API client, the pod seam and per-BaseModel locks."""

    def __init__(
        self,
        kube: KubeClient,
        pods: PodSync,
        *,
        token_key: bytes,
        images: Images = DEFAULT_IMAGES,
        operator_pods: OperatorPods = DEFAULT_OPERATOR_PODS,
        sync_pods: bool = True,
        on_event: EventSink | None = None,
    ) -> None:
        self.kube = kube
        self.pods = pods
        self.token_key = token_key
        self.images = images
        self.operator_pods = operator_pods
        self.sync_pods = sync_pods
        self.on_event = on_event or (lambda body, reason, message: None)
        self._locks: defaultdict[tuple[str, str], asyncio.Lock] = defaultdict(asyncio.Lock)
        self._phases: dict[tuple[str, str], str] = {}
        self._queued: dict[tuple[str, str], bool] = {}

    async def reconcile_base(self, namespace: str, name: str) -> Outcome:
        """Converge one BaseModel and every LoRAAdapter that names it."""
        key = (namespace, name)
        if self._queued.get(key):
            # A pass is already queued behind the running one and has not read anything yet:
            # it will see whatever triggered us, so bursts of events cost one pass, not many.
            return Outcome(result="coalesced")
        start = time.monotonic()
        self._queued[key] = True
        async with self._locks[key]:
            self._queued[key] = False
            try:
                outcome = await self._reconcile(namespace, name)
            except Exception:
                RECONCILES.labels("BaseModel", "error").inc()
                raise
            finally:
                RECONCILE_SECONDS.labels("BaseModel").observe(time.monotonic() - start)
        RECONCILES.labels("BaseModel", outcome.result).inc()
        return outcome

    async def _reconcile(self, ns: str, name: str) -> Outcome:
        bm = await self.kube.get(BASEMODELS, ns, name)
        all_adapters = await self.kube.list(LORAADAPTERS, ns)
        mine = [a for a in all_adapters if base_of(a) == name]
        live = [a for a in mine if not a.get("metadata", {}).get("deletionTimestamp")]
        if bm is None or bm.get("metadata", {}).get("deletionTimestamp"):
            missing = Verdict(
                False,
                "BaseModelNotFound",
                f"spec.baseModel: BaseModel {name!r} does not exist in namespace {ns!r}; "
                "create it or point spec.baseModel at an existing one",
            )
            await self._write_adapters(
                ns, live, {a["metadata"]["name"]: missing for a in live}, {}, None
            )
            return Outcome(result="missing")
        meta = bm.get("metadata", {})
        gen = meta.get("generation")
        old = _status_model(BaseModelStatus, bm.get("status"))
        owner = Owner(name, ns, str(meta.get("uid", "")))
        token = admin_token(self.token_key, ns, name, owner.uid)
        stored, stored_shards = await self._stored_manifest(ns, name)
        decision = decide(
            owner,
            bm.get("spec"),
            live,
            token=token,
            previous=stored,
            previous_generation=old.manifest_generation,
            images=self.images,
            operator=self.operator_pods,
            config_json=read_local_config(bm.get("spec")),
        )
        if decision.invalid is not None or decision.spec is None:
            exc = decision.invalid or InvalidSpec("spec", "missing")
            log.warning("BaseModel %s/%s invalid: %s", ns, name, exc)
            await self._write_base(ns, name, bm, base_status(old, gen, invalid=exc))
            bad = Verdict(
                False,
                "IncompatibleBaseModel",
                f"BaseModel {name!r} is invalid ({exc}); fix it first",
            )
            await self._write_adapters(
                ns, live, {a["metadata"]["name"]: bad for a in live}, {}, None
            )
            return Outcome(result="invalid")
        spec = decision.spec
        plan, verdicts, manifest = decision.plan, decision.verdicts, decision.manifest
        assert plan is not None
        outcome = Outcome(plan=plan, verdicts=verdicts, manifest=manifest)
        if manifest is None:
            log.warning("BaseModel %s/%s infeasible: %s", ns, name, plan.message)
            await self._write_base(ns, name, bm, base_status(old, gen, plan=plan))
            await self._write_adapters(ns, live, verdicts, {}, None)
            outcome.result = "infeasible"
            return outcome
        for obj in decision.objects:
            if await self._ensure(obj, owner_body=bm):
                outcome.writes.append(f"{obj['kind']}/{obj['metadata']['name']}")
        published = {o["metadata"]["name"] for o in decision.objects if o["kind"] == "ConfigMap"}
        for stale in [s for s in stored_shards if s not in published]:
            if await self._retire_shard(owner, stale):
                outcome.writes.append(f"-ConfigMap/{stale}")
        if not spec.network_policy.enabled and await self._retire_networkpolicy(owner):
            outcome.writes.append(f"-NetworkPolicy/{naming.networkpolicy_name(name)}")
        deployment = await self.kube.get(DEPLOYMENTS, ns, naming.deployment_name(name))
        reports: dict[str, AdaptersResponse | None] = {}
        if self.sync_pods:
            targets = ready_pods(await self.kube.list(PODS, ns, naming.selector_labels(name)))
            reports = await self.pods.sync(targets, manifest, token) if targets else {}
        adapter_phases = await self._write_adapters(ns, live, verdicts, reports, manifest)
        counts = AdapterCounts(
            declared=len(live), ready=sum(1 for p in adapter_phases.values() if p == "Ready")
        )
        status = base_status(
            old,
            gen,
            plan=plan,
            deployment=deployment,
            replicas=spec.replicas,
            adapters=counts,
            endpoint=naming.endpoint(name, ns),
            manifest_generation=manifest.generation,
        )
        await self._write_base(ns, name, bm, status)
        return outcome

    async def _ensure(self, obj: dict[str, Any], *, owner_body: dict[str, Any]) -> bool:
        """Create or correct one owned object; True when something was written."""
        kind = KIND_OF[obj["kind"]]
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        if kind is SECRETS:  # write-only for us: never read back, so patch blindly
            if await self.kube.patch(kind, ns, name, obj) is None:
                await self.kube.create(kind, ns, obj)
            return True
        observed = await self.kube.get(kind, ns, name)
        if observed is None:
            await self.kube.create(kind, ns, obj)
            log.info("created %s %s/%s", obj["kind"], ns, name)
            return True
        if drifted(obj, observed):
            changes = plan_changes(observed, obj) if kind is DEPLOYMENTS else []
            if changes:
                self.on_event(
                    owner_body,
                    "Replanned",
                    "vLLM flags changed, rolling the pods: "
                    + ", ".join(changes)
                    + " (set spec.lora.* explicitly to keep them fixed)",
                )
            await self.kube.patch(kind, ns, name, obj)
            log.info("corrected %s %s/%s", obj["kind"], ns, name)
            return True
        return False

    async def _stored_manifest(
        self, ns: str, name: str
    ) -> tuple[AdapterManifest | None, list[str]]:
        """The manifest published last (None if absent or torn) and the shards it names.

        Costs the index GET plus one GET per shard (two for 10,000 adapters)."""
        index_cm = await self.kube.get(CONFIGMAPS, ns, naming.configmap_name(name))
        if index_cm is None:
            return None, []
        refs = manifest_shards.shard_names(index_cm)
        shards = {}
        for ref in refs:
            cm = await self.kube.get(CONFIGMAPS, ns, ref)
            if cm is not None:
                shards[ref] = cm
        try:
            return manifest_shards.from_configmaps(index_cm, shards), refs
        except (manifest_shards.TornManifest, ValueError) as exc:
            log.warning("stored manifest of %s/%s unreadable (%s); republishing", ns, name, exc)
            return None, refs

    async def _retire_shard(self, owner: Owner, name: str) -> bool:
        """Delete a manifest shard the new index no longer names (only one we own), so a
        manifest that shrank leaves nothing behind."""
        observed = await self.kube.get(CONFIGMAPS, owner.namespace, name)
        refs = (observed or {}).get("metadata", {}).get("ownerReferences") or []
        if not any(r.get("controller") and r.get("uid") == owner.uid for r in refs):
            return False
        await self.kube.delete(CONFIGMAPS, owner.namespace, name)
        log.info("deleted unreferenced manifest shard ConfigMap %s/%s", owner.namespace, name)
        return True

    async def _retire_networkpolicy(self, owner: Owner) -> bool:
        """spec.networkPolicy.enabled turned off: delete the policy we made earlier (only one
        whose controller is this BaseModel), so the switch takes effect without a hand edit."""
        name = naming.networkpolicy_name(owner.name)
        observed = await self.kube.get(NETWORKPOLICIES, owner.namespace, name)
        refs = (observed or {}).get("metadata", {}).get("ownerReferences") or []
        if not any(r.get("controller") and r.get("uid") == owner.uid for r in refs):
            return False
        await self.kube.delete(NETWORKPOLICIES, owner.namespace, name)
        log.info(
            "deleted NetworkPolicy %s/%s (spec.networkPolicy.enabled is false)",
            owner.namespace,
            name,
        )
        return True

    async def _write_base(
        self, ns: str, name: str, bm: dict[str, Any], status: BaseModelStatus
    ) -> None:
        new = status.dump()
        if new != (bm.get("status") or {}):
            await self.kube.patch(BASEMODELS, ns, name, {"status": new}, sub="status")

    async def _write_adapters(
        self,
        ns: str,
        adapters: list[dict[str, Any]],
        verdicts: dict[str, Verdict],
        reports: dict[str, AdaptersResponse | None],
        manifest: AdapterManifest | None,
    ) -> dict[str, str]:
        """Write each adapter's status (only when it changed); returns name -> phase."""
        phases: dict[str, str] = {}
        for obj in adapters:
            meta = obj["metadata"]
            aname = meta["name"]
            old = _status_model(LoRAAdapterStatus, obj.get("status"))
            verdict = verdicts[aname]
            views = []
            for pod, rep in sorted(reports.items()):
                if rep is None:
                    views.append(PodView(pod, None, False))
                    continue
                found = next((a for a in rep.adapters if a.name == aname), None)
                current = manifest is not None and rep.generation >= manifest.generation
                views.append(PodView(pod, found, current))
            spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
            served = spec.get("servedName") or aname if isinstance(spec, dict) else aname
            new = adapter_status(
                old,
                meta.get("generation"),
                verdict,
                served_name=served if isinstance(served, str) else aname,
                pods=views,
            )
            phases[aname] = new.phase
            self._phases[(ns, aname)] = new.phase
            dumped = new.dump()
            if dumped != (obj.get("status") or {}):
                await self.kube.patch(LORAADAPTERS, ns, aname, {"status": dumped}, sub="status")
        self._update_phase_gauge()
        return phases

    def forget_adapter(self, ns: str, name: str) -> None:
        self._phases.pop((ns, name), None)
        self._update_phase_gauge()

    def _update_phase_gauge(self) -> None:
        counts: dict[str, int] = defaultdict(int)
        for phase in self._phases.values():
            counts[phase] += 1
        for phase in ("Pending", "Downloading", "Loading", "Ready", "Failed"):
            ADAPTERS.labels(phase).set(counts.get(phase, 0))


__all__ = ["Outcome", "PodTarget", "Reconciler", "base_of", "read_local_config"]
