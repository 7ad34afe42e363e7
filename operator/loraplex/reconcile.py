"""Reconciling one BaseModel and its adapters: gather, decide (pure core), apply, report.

Everything about a BaseModel is decided in one pass, level-based:
whichever event triggered it (a BaseModel or LoRAAdapter change, a drifted Deployment, a
timer tick), the pass reads the current state and converges to it. That makes restarts and
missed events harmless: the next pass does the same thing.

A pass has two halves under two per-object locks, taken hand over hand: the first reads,
decides, writes the owned objects and pushes a changed manifest to the pods known to be
behind; the second polls the pods and writes statuses. The next pass may publish while the
previous one still polls (at 10,000 adapters a poll is ten pages per pod, and a hot add
waited behind them), and reports still land in the order the passes published.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraplex import API_GROUP, naming
from loraplex.adapters import Candidate, Verdict, read_candidate
from loraplex.api.basemodel import AdapterCounts, BaseModelStatus, WeightsStatus
from loraplex.api.loraadapter import LoRAAdapterStatus
from loraplex.conditions import get_condition, set_condition
from loraplex.decide import decide
from loraplex.diff import drifted
from loraplex.errors import InvalidSpec, KubeError
from loraplex.kube import (
    BASEMODELS,
    CONFIGMAPS,
    DEPLOYMENTS,
    FIELD_MANAGER,
    JOBS,
    KIND_OF,
    LORAADAPTERS,
    NETWORKPOLICIES,
    PODS,
    PVCS,
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
    replan_message,
)
from loraplex.routing import API_OF_KIND, RoutingProblem
from loraplex.status import PodView, adapter_status, base_status
from loraplex.statuswriter import StatusWriter
from loraplex.weights import failure_message, job_succeeded, loader_state, weights_cache
from loraplex_server import manifest_shards
from loraplex_server.manifest import AdapterManifest, AdapterReport, AdaptersResponse

log = logging.getLogger("loraplex.reconcile")
# (object, reason, message): how the reconciler reports events without depending on kopf.
EventSink = Callable[[dict[str, Any], str, str], None]
# What a pass does after letting its BaseModel go: poll pods, write statuses.
Report = Callable[[], Awaitable[None]]


# The metadata a reconcile reads from a LoRAAdapter; the rest (managedFields, annotations such
# as an older operator's copy of the whole spec) is not kept in the cache.
_CACHED_META = (
    "name",
    "namespace",
    "uid",
    "creationTimestamp",
    "generation",
    "resourceVersion",
    "deletionTimestamp",
    "finalizers",
)


def slim(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a LoRAAdapter the reconciler reads: at 10,000 adapters a full object with
    its managedFields is most of the operator's memory."""
    meta = obj.get("metadata") or {}
    out: dict[str, Any] = {"metadata": {k: meta[k] for k in _CACHED_META if k in meta}}
    for key in ("apiVersion", "kind", "spec", "status"):
        if key in obj:
            out[key] = obj[key]
    return out


def _essence(obj: Mapping[str, Any] | None) -> Any:
    """What a reconcile of the adapter's BaseModel depends on: its spec and whether it is
    going. A status-only change (our own writes) is not worth a pass."""
    if obj is None:
        return None
    return obj.get("spec"), (obj.get("metadata") or {}).get("deletionTimestamp")


class AdapterCache:
    """LoRAAdapters by (namespace, spec.baseModel), kept from watch events (an informer).

    `primed` turns true after the startup list; until then (or when no watch feeds it, as in
    unit use) the reconciler lists adapters from the API instead.
    """

    def __init__(self) -> None:
        self.primed = False
        self._by_base: defaultdict[tuple[str, str], dict[str, dict[str, Any]]] = defaultdict(dict)
        self._base_of: dict[tuple[str, str], tuple[str, str]] = {}

    def prime(self, adapters: Iterable[Mapping[str, Any]]) -> None:
        for obj in adapters:
            self.apply("ADDED", obj)
        self.primed = True

    def apply(self, event_type: str, obj: Mapping[str, Any]) -> set[str]:
        """Take one event in; returns the BaseModels whose reconcile it changes (the old and
        the new `spec.baseModel`), empty when only status or bookkeeping moved."""
        meta = obj.get("metadata") or {}
        ns, name = meta.get("namespace"), meta.get("name")
        if not isinstance(ns, str) or not isinstance(name, str):
            return set()
        before = None
        old = self._base_of.pop((ns, name), None)
        if old is not None:
            before = self._by_base[old].pop(name, None)
            if not self._by_base[old]:
                del self._by_base[old]
        base = base_of(dict(obj))
        after = None
        if event_type != "DELETED" and base is not None:
            after = slim(obj)
            self._by_base[(ns, base)][name] = after
            self._base_of[(ns, name)] = (ns, base)
        if old == (ns, base) and _essence(before) == _essence(after):
            return set()
        return {b for b in (old[1] if old else None, base) if b is not None}

    def of(self, ns: str, base: str) -> list[dict[str, Any]]:
        return list(self._by_base.get((ns, base), {}).values())

    def __len__(self) -> int:
        return len(self._base_of)


# How often a write is retried after a 409 on a stale resourceVersion before giving up.
CONFLICT_RETRIES = 3
# Fields we render but yield to another field manager that took them over: an HPA (or
# `kubectl scale`) owns replicas once it has set them; every other field of ours is drift.
YIELDED_FIELDS: tuple[tuple[str, ...], ...] = (("spec", "replicas"),)
OUR_MANAGERS = frozenset({FIELD_MANAGER, "loraplex-operator"})
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"


class OwnershipConflict(Exception):
    """An object we would write exists but is not ours (no managed-by label or no controller
    ownerReference to this BaseModel): we write nothing to it."""

    def __init__(self, kind: str, name: str, why: str) -> None:
        super().__init__(f"{kind} {name!r} exists and is not owned by this BaseModel ({why})")
        self.kind = kind
        self.name = name


def owned_by(obj: Mapping[str, Any], uid: str) -> str | None:
    """None when `obj` is ours to write (label and controller ownerReference), else why not."""
    meta = obj.get("metadata") or {}
    if (meta.get("labels") or {}).get(MANAGED_BY_LABEL) != naming.MANAGED_BY:
        return f"no {MANAGED_BY_LABEL}={naming.MANAGED_BY} label"
    refs = meta.get("ownerReferences") or []
    if not any(r.get("controller") and r.get("uid") == uid for r in refs):
        return "no controller ownerReference to this BaseModel"
    return None


def owned_by_others(observed: Mapping[str, Any], path: tuple[str, ...]) -> bool:
    """Whether a field manager other than loraplex owns `path` (per metadata.managedFields)."""
    for entry in (observed.get("metadata") or {}).get("managedFields") or []:
        if entry.get("manager") in OUR_MANAGERS:
            continue
        node: Any = entry.get("fieldsV1") or {}
        for part in path:
            node = node.get(f"f:{part}") if isinstance(node, dict) else None
        if node is not None:
            return True
    return False


def yield_to_others(desired: dict[str, Any], observed: Mapping[str, Any]) -> dict[str, Any]:
    """`desired` without the fields another manager has taken over (see YIELDED_FIELDS)."""
    out: dict[str, Any] = json.loads(json.dumps(desired))
    for path in YIELDED_FIELDS:
        if owned_by_others(observed, path):
            parent: Any = out
            for part in path[:-1]:
                parent = parent.get(part) if isinstance(parent, dict) else None
            if isinstance(parent, dict):
                parent.pop(path[-1], None)
    return out


def secret_patch(obj: Mapping[str, Any], uid: str) -> list[dict[str, Any]]:
    """A JSON patch that writes the Secret's data only if it is ours, without reading it.

    The `test` operations make the API server refuse the whole patch (422) when the label or
    the controller ownerReference is not ours, so a foreign Secret is never changed or read.
    """
    label = MANAGED_BY_LABEL.replace("~", "~0").replace("/", "~1")
    ops: list[dict[str, Any]] = [
        {"op": "test", "path": f"/metadata/labels/{label}", "value": naming.MANAGED_BY},
        {"op": "test", "path": "/metadata/ownerReferences/0/uid", "value": uid},
        {"op": "test", "path": "/metadata/ownerReferences/0/controller", "value": True},
    ]
    for key, value in sorted((obj.get("stringData") or {}).items()):
        encoded = base64.b64encode(str(value).encode()).decode()
        ops.append({"op": "add", "path": f"/data/{key}", "value": encoded})
    return ops


def _report_routing(
    status: BaseModelStatus, gen: int | None, spec: Any, problem: RoutingProblem | None
) -> None:
    """`RoutingReady`: whether spec.routing/spec.autoscaling objects could be applied. A
    missing CRD is named; the Deployment and Service keep serving through the plain Service."""
    if problem is not None:
        status.conditions = set_condition(
            status.conditions,
            "RoutingReady",
            "False",
            "CRDNotInstalled",
            str(problem),
            generation=gen,
        )
    elif spec.routing.inference_pool.enabled or spec.autoscaling.enabled:
        status.conditions = set_condition(
            status.conditions,
            "RoutingReady",
            "True",
            "Applied",
            "routing and autoscaling objects applied",
            generation=gen,
        )


def _object_key(obj: Mapping[str, Any]) -> tuple[str, str, str]:
    meta = obj.get("metadata") or {}
    return str(obj.get("kind")), str(meta.get("namespace")), str(meta.get("name"))


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
    conflicts: list[str] = field(default_factory=list)
    routing_problem: RoutingProblem | None = None


@dataclass
class AdapterMemo:
    """What the reconciler keeps of one LoRAAdapter between passes (forgotten with it).

    At 10,000 adapters a pass that parsed every spec and decided every status again spent
    most of its time doing so; these let an unchanged adapter cost a lookup."""

    # (uid, generation, its spec as read): a spec changes only with its generation (status
    # has its own subresource), so most passes parse none.
    read: tuple[str, Any, Candidate] | None = None
    # (the inputs of its last decision, the status it was decided from): the same inputs and
    # status give the same decision, so it is not made again.
    decided: tuple[Any, Any] | None = None
    phase: str | None = None  # as last decided, for the per-phase gauge


SLOW_PASS = 0.5  # seconds: a pass slower than this logs where its time went


class Laps:
    """Seconds spent in each phase of a pass, so a slow pass says where its time went (a hot
    add at 10,000 adapters is a race against one second: the phases are what to cut)."""

    def __init__(self) -> None:
        self.start = self._mark = time.monotonic()
        self.laps: list[tuple[str, float]] = []

    def lap(self, phase: str) -> None:
        now = time.monotonic()
        self.laps.append((phase, now - self._mark))
        self._mark = now

    @property
    def total(self) -> float:
        return self._mark - self.start

    def __str__(self) -> str:
        parts = ", ".join(f"{phase} {seconds:.3f}" for phase, seconds in self.laps)
        return f"{self.total:.3f} s ({parts})"


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
        status_writes_in_flight: int = 8,
    ) -> None:
        self.kube = kube
        self.pods = pods
        self.token_key = token_key
        self.images = images
        self.operator_pods = operator_pods
        self.sync_pods = sync_pods
        self.on_event = on_event or (lambda body, reason, message: None)
        # LoRAAdapters from the watch kopf already runs (handlers feed it); the namespaces the
        # operator watches (empty: all), for priming it.
        self.adapters = AdapterCache()
        self.namespaces: tuple[str, ...] = ()
        # Per BaseModel: one pass reads, decides and publishes at a time; its pod polls and
        # status reports come after, under the second lock, in the same order.
        self._locks: defaultdict[tuple[str, str], asyncio.Lock] = defaultdict(asyncio.Lock)
        self._report_locks: defaultdict[tuple[str, str], asyncio.Lock] = defaultdict(asyncio.Lock)
        self._memo: dict[tuple[str, str], AdapterMemo] = {}  # (ns, adapter) -> its memo
        # Adapter statuses are written by their own task per BaseModel, never inside a pass.
        self.statuses = StatusWriter(self._patch_adapter_status, in_flight=status_writes_in_flight)
        self._queued: dict[tuple[str, str], bool] = {}
        # (ns, BaseModel) -> (resourceVersions of the index and its shards, the manifest they
        # hold): joining 10,000 adapters' shards again each pass was a third of a hot add.
        self._stored: dict[tuple[str, str], tuple[tuple[str, ...], AdapterManifest]] = {}
        # (ns, pod) -> (its last report, that report by adapter name).
        self._by_name: dict[tuple[str, str], tuple[AdaptersResponse, dict[str, AdapterReport]]] = {}
        # (ns, loader Job) whose older loader Jobs were deleted once it succeeded.
        self._loaders_retired: set[tuple[str, str]] = set()
        # (kind, ns, name) of owned objects -> the resourceVersion our last write produced.
        self._own_writes: dict[tuple[str, str, str], str] = {}

    async def reconcile_base(self, namespace: str, name: str) -> Outcome:
        """Converge one BaseModel and every LoRAAdapter that names it."""
        key = (namespace, name)
        if self._queued.get(key):
            # A pass is already queued behind the running one and has not read anything yet:
            # it will see whatever triggered us, so bursts of events cost one pass, not many.
            return Outcome(result="coalesced")
        start = time.monotonic()
        self._queued[key] = True
        laps = Laps()
        reporting = self._report_locks[key]
        try:
            async with self._locks[key]:
                self._queued[key] = False
                outcome, report = await self._converge(namespace, name, laps)
                # Hand over: the next pass may publish while this one polls pods and reports
                # (a hot add waits for no poll), and reports still land in pass order.
                await reporting.acquire()
            try:
                laps.lap("handover")
                await report()
            finally:
                reporting.release()
        except Exception:
            RECONCILES.labels("BaseModel", "error").inc()
            raise
        finally:
            RECONCILE_SECONDS.labels("BaseModel").observe(time.monotonic() - start)
        level = logging.INFO if laps.total > SLOW_PASS else logging.DEBUG
        log.log(level, "BaseModel %s/%s: pass %s took %s", namespace, name, outcome.result, laps)
        RECONCILES.labels("BaseModel", outcome.result).inc()
        return outcome

    async def _converge(self, ns: str, name: str, laps: Laps) -> tuple[Outcome, Report]:
        """Read, decide and publish (owned objects, pushes to pods known behind); returns
        what is left to do once the BaseModel is let go: poll pods and write statuses."""
        bm = await self.kube.get(BASEMODELS, ns, name)
        mine = await self._adapters(ns, name)
        log.debug("reconciling BaseModel %s/%s with %d adapters", ns, name, len(mine))
        live = [a for a in mine if not a.get("metadata", {}).get("deletionTimestamp")]
        if bm is None or bm.get("metadata", {}).get("deletionTimestamp"):
            self._stored.pop((ns, name), None)
            missing = Verdict(
                False,
                "BaseModelNotFound",
                f"spec.baseModel: BaseModel {name!r} does not exist in namespace {ns!r}; "
                "create it or point spec.baseModel at an existing one",
            )

            async def report_missing() -> None:
                self._report_adapters(
                    ns, name, live, {a["metadata"]["name"]: missing for a in live}, {}, None
                )

            return Outcome(result="missing"), report_missing
        meta = bm.get("metadata", {})
        gen = meta.get("generation")
        old = _status_model(BaseModelStatus, bm.get("status"))
        owner = Owner(name, ns, str(meta.get("uid", "")))
        token = admin_token(self.token_key, ns, name, owner.uid)
        stored, stored_shards, read_back = await self._stored_manifest(ns, name)
        laps.lap("read")
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
            read=self._read_candidate,
        )
        laps.lap("decide")
        if decision.invalid is not None or decision.spec is None:
            exc = decision.invalid or InvalidSpec("spec", "missing")
            log.warning("BaseModel %s/%s invalid: %s", ns, name, exc)
            bad = Verdict(
                False,
                "IncompatibleBaseModel",
                f"BaseModel {name!r} is invalid ({exc}); fix it first",
            )

            async def report_invalid() -> None:
                await self._write_base(ns, name, bm, base_status(old, gen, invalid=exc))
                self._report_adapters(
                    ns, name, live, {a["metadata"]["name"]: bad for a in live}, {}, None
                )

            return Outcome(result="invalid"), report_invalid
        spec = decision.spec
        plan, verdicts, manifest = decision.plan, decision.verdicts, decision.manifest
        assert plan is not None
        outcome = Outcome(plan=plan, verdicts=verdicts, manifest=manifest)
        if manifest is None:
            log.warning("BaseModel %s/%s infeasible: %s", ns, name, plan.message)

            async def report_infeasible() -> None:
                await self._write_base(ns, name, bm, base_status(old, gen, plan=plan))
                self._report_adapters(ns, name, live, verdicts, {}, None)

            outcome.result = "infeasible"
            return outcome, report_infeasible
        weights: WeightsStatus | None = None
        index_name = naming.configmap_name(name)
        shard_names = {
            o["metadata"]["name"]
            for o in decision.objects
            if o["kind"] == "ConfigMap" and o["metadata"]["name"] != index_name
        }
        shard_conflict = False
        for obj in decision.objects:
            try:
                if obj["kind"] == "Job":
                    weights = await self._ensure_loader(ns, name, spec, obj, outcome, owner.uid)
                    continue
                if obj["kind"] == "Deployment" and weights is not None and weights.phase != "Ready":
                    # Held back until the weights are cached: a pod started now would find an
                    # empty folder. A running Deployment keeps serving its current weights.
                    continue
                if shard_conflict and obj["metadata"]["name"] == index_name:
                    # Never name a generation whose shards were not all stored: pods would
                    # wait on a torn set. They keep the index (and generation) they have.
                    continue
                observed = read_back.pop(obj["metadata"]["name"], None)
                if obj["kind"] != "ConfigMap":
                    observed = None
                if await self._ensure(
                    obj, owner_body=bm, uid=owner.uid, plan=plan, observed=observed
                ):
                    outcome.writes.append(f"{obj['kind']}/{obj['metadata']['name']}")
            except OwnershipConflict as exc:
                log.warning("BaseModel %s/%s: %s", ns, name, exc)
                outcome.conflicts.append(str(exc))
                shard_conflict = shard_conflict or obj["metadata"]["name"] in shard_names
            except KubeError as exc:
                api = API_OF_KIND.get((obj["apiVersion"], obj["kind"]))
                if api is None or exc.status != 404:
                    raise
                # The CRD is not installed: name it; everything else keeps being applied.
                outcome.routing_problem = RoutingProblem(
                    api, f"{obj['kind']} {obj['metadata']['name']}", "install it, or turn it off"
                )
        if decision.routing_problem is not None and outcome.routing_problem is None:
            outcome.routing_problem = decision.routing_problem
        if not shard_conflict:
            for stale in [s for s in stored_shards if s not in shard_names]:
                if await self._retire_shard(owner, stale):
                    outcome.writes.append(f"-ConfigMap/{stale}")
        if not spec.network_policy.enabled and await self._retire_networkpolicy(owner):
            outcome.writes.append(f"-NetworkPolicy/{naming.networkpolicy_name(name)}")
        laps.lap("store")
        deployment = await self.kube.get(DEPLOYMENTS, ns, naming.deployment_name(name))
        targets: list[PodTarget] = []
        if self.sync_pods:
            targets = ready_pods(await self.kube.list(PODS, ns, naming.selector_labels(name)))
            await self.pods.push_behind(targets, manifest, token)
        laps.lap("push")

        async def report() -> None:
            reports = await self.pods.sync(targets, manifest, token) if targets else {}
            laps.lap("pods")
            adapter_phases = self._report_adapters(ns, name, live, verdicts, reports, manifest)
            laps.lap("report")
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
                weights=weights,
            )
            self._report_conflicts(status, gen, outcome.conflicts)
            _report_routing(status, gen, spec, outcome.routing_problem)
            await self._write_base(ns, name, bm, status)
            laps.lap("status")

        return outcome, report

    async def _ensure_loader(
        self, ns: str, name: str, spec: Any, job: dict[str, Any], outcome: Outcome, uid: str
    ) -> WeightsStatus:
        """Create the loader Job once (it is never patched: its name follows its content) and
        report the weights' state from it."""
        cache = weights_cache(name, spec)
        assert cache is not None  # a Job is rendered only for a cache
        observed = await self.kube.get(JOBS, ns, cache.job_name)
        if observed is None:
            await self.kube.create(JOBS, ns, job)
            outcome.writes.append(f"Job/{cache.job_name}")
            log.info("created Job %s/%s", ns, cache.job_name)
        annotations = job["metadata"].get("annotations") or {}
        expected = int(annotations.get(f"{API_GROUP}/expected-bytes", 0)) or None
        why = None
        if observed is not None and (observed.get("status") or {}).get("failed"):
            pods = await self.kube.list(PODS, ns, naming.loader_labels(name))
            why = failure_message(pods, cache.job_name)
        if job_succeeded(observed) and (ns, cache.job_name) not in self._loaders_retired:
            await self._retire_loaders(ns, name, uid, keep=cache.job_name, outcome=outcome)
        return loader_state(cache, observed, expected, why)

    async def _retire_loaders(
        self, ns: str, name: str, uid: str, *, keep: str, outcome: Outcome
    ) -> None:
        """Delete this BaseModel's older loader Jobs (and their pods) once the current one has
        succeeded: a Job is named after its content, so each change of the model, revision or
        cache left one behind for good. Only Jobs whose controller is this BaseModel; once per
        Job succeeded (a list is not worth paying on every pass)."""
        for old in await self.kube.list(JOBS, ns, naming.loader_labels(name)):
            meta = old.get("metadata") or {}
            if meta.get("name") == keep or owned_by(old, uid) is not None:
                continue
            await self.kube.delete(JOBS, ns, meta["name"])
            outcome.writes.append(f"-Job/{meta['name']}")
            log.info("deleted loader Job %s/%s (superseded by %s)", ns, meta["name"], keep)
        if len(self._loaders_retired) >= 4096:
            self._loaders_retired.clear()
        self._loaders_retired.add((ns, keep))

    async def _adapters(self, ns: str, name: str) -> list[dict[str, Any]]:
        """This BaseModel's LoRAAdapters: from the watch-fed cache when running under kopf (no
        API request), else one list of the namespace."""
        if self.adapters.primed:
            return self.adapters.of(ns, name)
        return [a for a in await self.kube.list(LORAADAPTERS, ns) if base_of(a) == name]

    @staticmethod
    def _report_conflicts(status: BaseModelStatus, gen: int | None, conflicts: list[str]) -> None:
        """`OwnedObjectConflict` names the objects we refused to adopt; Ready is False then."""
        if conflicts:
            message = "; ".join(conflicts) + (
                ": rename the BaseModel or remove the other object; loraplex never adopts "
                "objects it did not create"
            )
            status.phase = "Failed"
            for type_ in ("OwnedObjectConflict", "Ready"):
                status.conditions = set_condition(
                    status.conditions,
                    type_,
                    "True" if type_ == "OwnedObjectConflict" else "False",
                    "OwnedObjectConflict",
                    message,
                    generation=gen,
                )
        elif get_condition(status.conditions, "OwnedObjectConflict") is not None:
            status.conditions = set_condition(
                status.conditions,
                "OwnedObjectConflict",
                "False",
                "NoConflict",
                "every owned object is this BaseModel's",
                generation=gen,
            )

    async def _ensure(
        self,
        obj: dict[str, Any],
        *,
        owner_body: dict[str, Any],
        uid: str,
        plan: Plan | None = None,
        observed: dict[str, Any] | None = None,
    ) -> bool:
        """Create or correct one owned object; True when something was written.

        `observed` is the object as this pass already read it (the manifest's ConfigMaps, a
        megabyte each at 10,000 adapters), used for the first look instead of another GET.

        Creates only what does not exist (POST, so a concurrent creator makes us re-read, not
        adopt), corrects only objects that are ours (`owned_by`), by server-side apply under
        our field manager with the observed resourceVersion as a precondition: a 409 means
        someone wrote in between, so we re-read and decide again. Raises OwnershipConflict.
        """
        kind = KIND_OF[obj["kind"]]
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        if kind is SECRETS:
            return await self._ensure_secret(obj, uid)
        for _ in range(CONFLICT_RETRIES):
            if observed is None:
                observed = await self.kube.get(kind, ns, name)
            if observed is None:
                try:
                    made = await self.kube.create(kind, ns, obj)
                except KubeError as exc:
                    if exc.status == 409:  # created meanwhile: look at it again
                        observed = None
                        continue
                    raise
                self._remember_write(made)
                log.info("created %s %s/%s", obj["kind"], ns, name)
                return True
            why = owned_by(observed, uid)
            if why is not None:
                raise OwnershipConflict(obj["kind"], name, why)
            if kind is PVCS:  # its spec is immutable once bound: created once, never corrected
                return False
            desired = yield_to_others(obj, observed)
            if not drifted(desired, observed):
                return False
            changes = plan_changes(observed, desired) if kind is DEPLOYMENTS else []
            desired["metadata"]["resourceVersion"] = observed["metadata"].get("resourceVersion")
            try:
                self._remember_write(await self.kube.server_side_apply(desired))
            except KubeError as exc:
                if exc.status == 409:
                    log.info("%s %s/%s changed while we wrote it; re-reading", kind.kind, ns, name)
                    observed = None
                    continue
                raise
            await self._replace_leftovers(kind, desired)
            if changes:
                self.on_event(owner_body, "Replanned", replan_message(changes, plan))
            log.info("corrected %s %s/%s", obj["kind"], ns, name)
            return True
        raise KubeError(409, f"{kind.kind} {ns}/{name}: still conflicting after retries")

    async def _replace_leftovers(self, kind: Any, desired: dict[str, Any]) -> None:
        """Server-side apply keeps list entries another manager added (say, a container put in
        by hand): they are not ours to remove by apply. The spec we render is ours whole, so
        when apply leaves it drifted, a merge patch replaces its lists outright; fields yielded
        to other managers (replicas under an HPA) are not in `desired` and stay theirs."""
        if "spec" not in desired:  # a ConfigMap: its data has no lists of others' entries
            return
        ns, name = desired["metadata"]["namespace"], desired["metadata"]["name"]
        after = await self.kube.get(kind, ns, name)
        if after is not None and "spec" in desired and drifted(desired, after):
            await self.kube.patch(kind, ns, name, {"spec": desired["spec"]})

    async def _ensure_secret(self, obj: dict[str, Any], uid: str) -> bool:
        """Secrets are write-only for us: a guarded JSON patch, or a create if none exists."""
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        for _ in range(CONFLICT_RETRIES):
            try:
                if await self.kube.json_patch(SECRETS, ns, name, secret_patch(obj, uid)) is None:
                    await self.kube.create(SECRETS, ns, obj)
                return True
            except KubeError as exc:
                if exc.status == 422:  # a `test` failed: the Secret is someone else's
                    raise OwnershipConflict(
                        "Secret", name, "its label or controller ownerReference is not ours"
                    ) from exc
                if exc.status != 409:  # 409: created meanwhile, patch it (guarded) instead
                    raise
        raise KubeError(409, f"Secret {ns}/{name}: still conflicting after retries")

    async def _stored_manifest(
        self, ns: str, name: str
    ) -> tuple[AdapterManifest | None, list[str], dict[str, dict[str, Any]]]:
        """The manifest published last (None if absent or torn), the shards it names, and
        the ConfigMaps read (by name, for `_ensure` to compare with instead of reading again).

        Costs the index GET plus one GET per shard (two for 10,000 adapters)."""
        index_name = naming.configmap_name(name)
        index_cm = await self.kube.get(CONFIGMAPS, ns, index_name)
        if index_cm is None:
            self._stored.pop((ns, name), None)
            return None, [], {}
        refs = manifest_shards.shard_names(index_cm)
        shards = {}
        for ref in refs:
            cm = await self.kube.get(CONFIGMAPS, ns, ref)
            if cm is not None:
                shards[ref] = cm
        # Any change to the index or a shard changes its resourceVersion: equal versions are
        # the same bytes, already joined and checked.
        versions = tuple(
            str(obj.get("metadata", {}).get("resourceVersion") or "")
            for obj in (index_cm, *(shards.get(ref, {}) for ref in refs))
        )
        read = {index_name: index_cm, **shards}
        known = self._stored.get((ns, name))
        if known is not None and known[0] == versions and all(versions):
            return known[1], refs, read
        try:
            manifest = manifest_shards.from_configmaps(index_cm, shards)
        except (manifest_shards.TornManifest, ValueError) as exc:
            log.warning("stored manifest of %s/%s unreadable (%s); republishing", ns, name, exc)
            self._stored.pop((ns, name), None)
            return None, refs, read
        self._stored[(ns, name)] = (versions, manifest)
        return manifest, refs, read

    async def _retire_shard(self, owner: Owner, name: str) -> bool:
        """Delete a manifest shard the new index no longer names (only one we own), so a
        manifest that shrank leaves nothing behind."""
        observed = await self.kube.get(CONFIGMAPS, owner.namespace, name)
        if observed is None or owned_by(observed, owner.uid) is not None:
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

    def _report_adapters(
        self,
        ns: str,
        base: str,
        adapters: list[dict[str, Any]],
        verdicts: dict[str, Verdict],
        reports: dict[str, AdaptersResponse | None],
        manifest: AdapterManifest | None,
    ) -> dict[str, str]:
        """Decide each adapter's status and hand those that changed to the status writer;
        returns name -> phase."""
        phases: dict[str, str] = {}
        # Each pod's report by adapter name, built once: a search per adapter is quadratic
        # (10,000 adapters: 100 million comparisons per pod per pass).
        by_name = {
            pod: self._indexed(ns, pod, rep) for pod, rep in reports.items() if rep is not None
        }
        changed = 0
        probe = manifest is not None and manifest.checks.probe
        pods = sorted(reports.items())
        for obj in adapters:
            meta = obj["metadata"]
            aname = meta["name"]
            current = self.statuses.known(ns, base, meta, obj.get("status"))
            verdict = verdicts[aname]
            views = []
            for pod, rep in pods:
                if rep is None:
                    views.append(PodView(pod, None, False))
                    continue
                found = by_name[pod].get(aname)
                fresh = manifest is not None and rep.generation >= manifest.generation
                views.append(PodView(pod, found, fresh))
            spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
            served = spec.get("servedName") or aname if isinstance(spec, dict) else aname
            served = served if isinstance(served, str) else aname
            inputs = (meta.get("generation"), verdict, served, probe, tuple(views))
            memo = self._memo.setdefault((ns, aname), AdapterMemo())
            last = memo.decided
            if last is not None and last[0] == inputs and last[1] is current and memo.phase:
                # Same inputs, same status decided from: the same decision (a pass over
                # 10,000 unchanged adapters spent half its time re-deciding them).
                phases[aname] = memo.phase
                continue
            new = adapter_status(
                _status_model(LoRAAdapterStatus, current),
                meta.get("generation"),
                verdict,
                served_name=served,
                pods=views,
                probe_required=probe,
            )
            dumped = new.dump()
            phases[aname] = memo.phase = new.phase
            if self.statuses.submit(ns, base, meta, current, dumped):
                changed += 1
                memo.decided = None
            else:
                memo.decided = (inputs, current)
        self._update_phase_gauge()
        if changed:
            log.info(
                "BaseModel %s/%s: %d adapter statuses to write (manifest generation %s; pods "
                "at %s)",
                ns,
                base,
                changed,
                manifest.generation if manifest else None,
                {pod: rep.generation if rep else None for pod, rep in reports.items()},
            )
        return phases

    def _indexed(self, ns: str, pod: str, rep: AdaptersResponse) -> dict[str, AdapterReport]:
        """A pod's report by adapter name, built once per report (an unchanged pod's poll
        returns the report object it returned before)."""
        known = self._by_name.get((ns, pod))
        if known is not None and known[0] is rep:
            return known[1]
        if len(self._by_name) >= 4096:  # pods come and go: forgetting costs one rebuild
            self._by_name.clear()
        index = {a.name: a for a in rep.adapters}
        self._by_name[(ns, pod)] = (rep, index)
        return index

    def report_unplaced(self, ns: str, obj: dict[str, Any]) -> None:
        """An adapter with no usable spec.baseModel: nothing to reconcile it under, so say why
        on the adapter itself (once: its own write comes back as an event)."""
        verdict = read_candidate(obj).error
        if verdict is None:  # pragma: no cover - baseModel is required by the model
            return
        meta = obj.get("metadata") or {}
        current = self.statuses.known(ns, "", meta, obj.get("status"))
        new = adapter_status(
            _status_model(LoRAAdapterStatus, current),
            meta.get("generation"),
            verdict,
            served_name=None,
            pods=[],
        )
        self.statuses.submit(ns, "", meta, current, new.dump())

    def _remember_write(self, obj: Mapping[str, Any]) -> None:
        self._own_writes[_object_key(obj)] = str(obj.get("metadata", {}).get("resourceVersion"))

    def is_own_write(self, obj: Mapping[str, Any]) -> bool:
        """Whether `obj` is exactly the version our last write of it produced: its watch
        event needs no pass (the pass that wrote it already converged). At 10,000 adapters a
        pass takes a second or two, and the pass our own manifest writes started was what a
        hot add waited behind."""
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        return bool(rv) and self._own_writes.get(_object_key(obj)) == rv

    async def was_own_write(self, obj: Mapping[str, Any]) -> bool:
        """`is_own_write`, judged once the BaseModel's publishing pass (if one runs) has let
        go: the watch can deliver a write's event before that pass has read the write's
        response, and such an event used to start a whole pass of its own."""
        meta = obj.get("metadata") or {}
        base = (meta.get("labels") or {}).get(naming.BASE_LABEL)
        lock = self._locks.get((str(meta.get("namespace", "")), str(base)))
        if lock is not None and lock.locked():
            async with lock:
                pass
        return self.is_own_write(obj)

    def _read_candidate(self, obj: Mapping[str, Any]) -> Candidate:
        meta = obj.get("metadata") or {}
        key = (str(meta.get("namespace", "")), str(meta.get("name", "")))
        uid, gen = meta.get("uid"), meta.get("generation")
        memo = self._memo.setdefault(key, AdapterMemo())
        if memo.read is not None and uid and gen is not None and memo.read[:2] == (uid, gen):
            return memo.read[2]
        cand = read_candidate(obj)
        if uid and gen is not None:
            memo.read = (str(uid), gen, cand)
        return cand

    async def _patch_adapter_status(self, ns: str, name: str, status: dict[str, Any]) -> str | None:
        """The resourceVersion the write produced; None when the adapter is gone."""
        obj = await self.kube.patch(LORAADAPTERS, ns, name, {"status": status}, sub="status")
        return None if obj is None else str(obj.get("metadata", {}).get("resourceVersion", ""))

    def forget_adapter(self, ns: str, name: str) -> None:
        self._memo.pop((ns, name), None)
        self.statuses.forget(ns, name)
        self._update_phase_gauge()

    def _update_phase_gauge(self) -> None:
        counts: dict[str, int] = defaultdict(int)
        for memo in self._memo.values():
            if memo.phase is not None:
                counts[memo.phase] += 1
        for phase in ("Pending", "Downloading", "Loading", "Ready", "Failed"):
            ADAPTERS.labels(phase).set(counts.get(phase, 0))


__all__ = ["Outcome", "PodTarget", "Reconciler", "base_of", "read_local_config"]
