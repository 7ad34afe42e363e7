"""An in-process Kubernetes API for tests, the demo and benchmarks (kmock's emulator).

kmock's `KubernetesEmulator` keeps objects in memory and serves list/watch/get/create/
merge-patch/delete over real HTTP. As its docs invite, we extend it with the metadata a real
API server assigns (uid, creationTimestamp, resourceVersion, names from generateName, and a
generation that moves only when the spec does), because the operator's `observedGeneration`
logic reads them, and with the API semantics a long-running operator meets on a real server:

- an authentication gate (`require_tokens`): only the current bearer tokens pass, the rest get
  401, so credential rotation can be tested;
- optimistic concurrency: a write carrying a stale `metadata.resourceVersion` gets 409;
- server-side apply (PATCH application/apply-patch+yaml, `fieldManager`, `force`), with field
  ownership kept in `metadata.managedFields` (fieldsV1), conflicts (409) for fields another
  manager owns, and merge patches/creates recorded as `Update` managers. Simplified: lists
  are atomic (a real server merges keyed lists such as containers by name);
- JSON patch (RFC 6902) including `test`, atomic, 422 when a test fails;
- owner-reference garbage collection (background cascade) when an owner is deleted;
- injected faults (`inject`): 429/5xx answers with Retry-After;
- watch expiry (`expire_watches`): open watches get a 410 Gone ERROR event and watches that
  resume from an older resourceVersion get 410 at once, so clients must relist.

It refuses what a real API server refuses that we can run into (see `apilimits`: object and
body sizes, name and label lengths, immutable selectors). It still does not do label selectors
or schema validation: the operator filters labels
itself, and tests check schemas separately.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import itertools
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp.web
import jsonpatch
import kmock
import yaml
from kmock._internal import enums

from loraplex.devtools import apilimits

RESOURCES: dict[str, dict[str, Any]] = {
    "loraplex.io/v1alpha1/basemodels": {
        "kind": "BaseModel",
        "shortnames": {"bm"},
        "categories": {"loraplex"},
        "subresources": {"status"},
    },
    "loraplex.io/v1alpha1/loraadapters": {
        "kind": "LoRAAdapter",
        "shortnames": {"lora"},
        "categories": {"loraplex"},
        "subresources": {"status"},
    },
    "apps/v1/deployments": {"kind": "Deployment", "subresources": {"status"}},
    "v1/services": {"kind": "Service"},
    "v1/configmaps": {"kind": "ConfigMap"},
    "v1/secrets": {"kind": "Secret"},
    "networking.k8s.io/v1/networkpolicies": {"kind": "NetworkPolicy"},
    "v1/pods": {"kind": "Pod", "subresources": {"status"}},
    "batch/v1/jobs": {"kind": "Job", "subresources": {"status"}},
    "v1/persistentvolumeclaims": {"kind": "PersistentVolumeClaim"},
    "policy/v1/poddisruptionbudgets": {"kind": "PodDisruptionBudget"},
    "autoscaling/v2/horizontalpodautoscalers": {"kind": "HorizontalPodAutoscaler"},
    # Optional CRDs (spec.routing, spec.autoscaling), as if installed; a test removes one to
    # see the operator name a missing CRD.
    "inference.networking.k8s.io/v1/inferencepools": {"kind": "InferencePool"},
    "gateway.networking.k8s.io/v1/httproutes": {"kind": "HTTPRoute"},
    "keda.sh/v1alpha1/scaledobjects": {"kind": "ScaledObject"},
    "v1/events": {"kind": "Event"},
    "events.k8s.io/v1/events": {"kind": "Event"},
}
# Cluster-scoped kinds kopf looks for at start (CRD discovery, namespaces, peering).
CLUSTER_RESOURCES: dict[str, dict[str, Any]] = {
    "apiextensions.k8s.io/v1/customresourcedefinitions": {"kind": "CustomResourceDefinition"},
    "v1/namespaces": {"kind": "Namespace"},
    "kopf.dev/v1/clusterkopfpeerings": {"kind": "ClusterKopfPeering"},
}
KIND_BY_PLURAL = {key.rsplit("/", 1)[1]: info["kind"] for key, info in RESOURCES.items()}
VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}


@dataclass
class LoggedRequest:
    """What the emulator keeps of each API request (for RBAC checks and call counts)."""

    method: str
    group: str
    plural: str
    subresource: str | None
    name: str | None
    watch: bool
    user_agent: str
    status: int = 0
    response_bytes: int = 0

    @property
    def verb(self) -> str:
        """The RBAC verb this request needs."""
        if self.method == "GET":
            return "watch" if self.watch else ("get" if self.name else "list")
        return {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}[
            self.method
        ]


@dataclass
class Fault:
    """Answer the next `times` matching requests with `status` and a Retry-After header."""

    method: str
    plural: str
    status: int
    retry_after: float | None = 1
    times: int = 1
    served: int = 0


def _status(code: int, reason: str, message: str) -> aiohttp.web.Response:
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "reason": reason,
        "message": message,
        "code": code,
    }
    return aiohttp.web.Response(
        body=json.dumps(body).encode(), status=code, headers={"Content-Type": "application/json"}
    )


# Paths (as tuples) that are the server's, not any manager's.
_UNOWNED_META = {"resourceVersion", "uid", "creationTimestamp", "generation", "managedFields"}


def _leaves(obj: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Leaf fields of an object as path -> value (lists are atomic leaves)."""
    out: dict[tuple[str, ...], Any] = {}
    if isinstance(obj, dict) and obj:
        for k, v in obj.items():
            if not prefix and k in ("apiVersion", "kind", "status"):
                continue
            if prefix == ("metadata",) and k in ("name", "namespace", *_UNOWNED_META):
                continue
            out.update(_leaves(v, (*prefix, k)))
    elif prefix:
        out[prefix] = obj
    return out


def _get_path(obj: Any, path: tuple[str, ...]) -> Any:
    for p in path:
        if not isinstance(obj, dict) or p not in obj:
            return _MISSING
        obj = obj[p]
    return obj


_MISSING = object()


def _fields_v1(paths: set[tuple[str, ...]]) -> dict[str, Any]:
    """The fieldsV1 form of a set of paths: {"f:spec": {"f:replicas": {}}}."""
    root: dict[str, Any] = {}
    for path in sorted(paths):
        node = root
        for p in path:
            node = node.setdefault(f"f:{p}", {})
    return root


def _merge_diff(old: Any, new: Any) -> Any:
    """The RFC 7386 merge patch that turns `old` into `new`."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    out: dict[str, Any] = {k: None for k in old if k not in new}
    for k, v in new.items():
        if k not in old:
            out[k] = v
        elif old[k] != v:
            out[k] = _merge_diff(old[k], v)
    return out


def _manager(request: Any, default: str = "unknown") -> str:
    manager = request.params.get("fieldManager")
    if manager:
        return str(manager)
    agent = str(request.headers.get("User-Agent", "")) or default
    return agent.split("/")[0].split(" ")[0] or default


class Emulator(kmock.KubernetesEmulator):
    """kmock's emulator plus the metadata the API server stamps on objects.

    kmock keeps every request for assertions and scans them all on each new request, which
    makes long runs quadratic; we keep a compact log of our own and trim kmock's list.
    """

    _rv = itertools.count(1)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.log: list[LoggedRequest] = []
        # Authentication: None lets everything in; a set admits only these bearer tokens.
        self.tokens: set[str] | None = None
        self.rejected: list[str] = []  # User-Agents answered 401
        self.authenticated: set[tuple[str, str]] = set()  # (User-Agent product, token) let in
        self.faults: list[Fault] = []
        self.expired_watches: list[str] = []  # plurals answered 410
        self.collected: list[str] = []  # kind/name removed by garbage collection
        self._compacted_rv = 0
        self._serial = asyncio.Lock()
        # Field ownership: object key -> manager -> (operation, owned paths).
        self._owners: dict[Any, dict[str, tuple[str, set[tuple[str, ...]]]]] = {}

    def require_tokens(self, *tokens: str) -> None:
        """Accept only these bearer tokens from now on (a rotation replaces the set)."""
        self.tokens = set(tokens)

    def inject(self, fault: Fault) -> Fault:
        self.faults.append(fault)
        return fault

    async def expire_watches(self, resource: str) -> None:
        """End every open watch of `resource` with 410 Gone and refuse older resourceVersions."""
        res = kmock.resource(resource)
        self._compacted_rv = next(self._rv)
        gone = {
            "type": "ERROR",
            "object": {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Failure",
                "reason": "Expired",
                "message": "too old resource version",
                "code": 410,
            },
        }
        await self._buses[res].put(gone)

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # aiohttp caps bodies at 1 MiB, the API server at 3 MiB: lift aiohttp's cap so that
        # apilimits answers as the API server would (413 above 3 MiB, 422 for big objects).
        raw_request._client_max_size = 2 * apilimits.MAX_REQUEST_BYTES
        if str(raw_request.query.get("watch", "")).lower() in ("true", "1"):
            return await super().__call__(raw_request)
        # One request at a time (watches aside, they stream for minutes): kmock routes each
        # request by scanning every request not yet routed, so thousands of concurrent ones
        # (an operator starting on 10,000 objects) cost the square of their number. Handling
        # is CPU work on this one event loop anyway, so serving them in turn costs nothing.
        async with self._serial:
            return await super().__call__(raw_request)

    def _KubernetesEmulator__get_obj(  # overrides kmock's name-mangled method
        self, request: Any, strict: bool
    ) -> Any:
        """One object by its key: a dict lookup, where kmock scans every stored object (which
        made each GET/PATCH cost O(objects), a 10,000-object run quadratic)."""
        if strict and request.name is not None and request.resource is not None:
            # kmock's resource hashes (group, version, plural), which is what it compares.
            return self._objects._objects.get((request.resource, request.namespace, request.name))
        return kmock.KubernetesEmulator._KubernetesEmulator__get_obj(  # type: ignore[attr-defined]
            self, request, strict
        )

    def _forget_routed(self) -> None:
        """Drop requests kmock has already routed to a reaction.

        kmock finds a request's reaction by scanning every stored request, so its cost grows
        with the run. A request is routed once it is in some reaction's list; until then it
        must stay (it may be waiting for the emulator's lock), afterwards only assertions on
        kmock's own views would need it, and we keep `self.log` for those.
        """
        routed: set[int] = set()
        for payload in self._payloads:
            routed.update(id(r) for r in payload._requests)
            payload._requests.clear()
        if routed:
            self._requests[:] = [r for r in self._requests if id(r) not in routed]

    async def _handle(self, request: Any) -> aiohttp.web.StreamResponse:
        self._forget_routed()
        res = request.resource
        entry: LoggedRequest | None = None
        if res is not None and res.plural:
            method = str(getattr(request.method, "value", request.method)).upper()
            entry = LoggedRequest(
                method=method,
                group=str(res.group or ""),
                plural=str(res.plural),
                subresource=request.subresource,
                name=request.name,
                watch=str(request.params.get("watch", "")).lower() in ("true", "1"),
                user_agent=str(request.headers.get("User-Agent", "")),
            )
            self.log.append(entry)  # now: a watch's response ends only when the stream does
        try:
            resp = await self._handle_checked(request)
        except Exception as exc:  # kmock's errors (404, 409) become responses further up
            if entry is not None:
                entry.status = int(getattr(exc, "status", 500))
            raise
        finally:
            if entry is None or not entry.watch:
                # Answered: out of kmock's list (a request we answered ourselves, a 401 or a
                # refused write, never reaches a reaction, so `_forget_routed` keeps it).
                self._requests[:] = [r for r in self._requests if r is not request]
        if entry is not None:
            body = resp.body if isinstance(resp, aiohttp.web.Response) else None
            entry.status = resp.status
            entry.response_bytes = len(body) if isinstance(body, bytes | bytearray) else 0
        return resp

    async def _handle_checked(self, request: Any) -> aiohttp.web.StreamResponse:
        """Authentication, injected faults and the write semantics kmock leaves out."""
        refused = self._refusal(request)
        if refused is not None:
            return aiohttp.web.json_response(refused.status(), status=refused.code)
        if self.tokens is not None:
            auth = str(request.headers.get("Authorization", ""))
            token = auth.removeprefix("Bearer ").strip()
            agent = str(request.headers.get("User-Agent", ""))
            if token not in self.tokens:
                self.rejected.append(agent)
                return _status(401, "Unauthorized", "Unauthorized")
            self.authenticated.add((agent.split("/")[0], token))
        method = str(getattr(request.method, "value", request.method)).upper()
        res = request.resource
        if res is not None and res.plural and res.version:
            # As a real API server: a resource no installed API or CRD serves is a 404.
            path = "/".join(
                p for p in (str(res.group or ""), str(res.version), str(res.plural)) if p
            )
            if path not in self.resources:
                return _status(404, "NotFound", "the server could not find the requested resource")
        for fault in self.faults:
            if (
                fault.served < fault.times
                and fault.method == method
                and res is not None
                and fault.plural == str(res.plural)
            ):
                fault.served += 1
                refusal = _status(fault.status, "TooManyRequests", "injected fault, try again")
                if fault.retry_after is not None:
                    refusal.headers["Retry-After"] = str(int(fault.retry_after))
                return refusal
        if (
            res is not None
            and str(res.plural) == "secrets"
            and isinstance(request.data, dict)
            and isinstance(request.data.get("stringData"), dict)
        ):
            # As the API server does: stringData is write-only, stored base64 in data.
            string_data = request.data.pop("stringData")
            data = request.data.setdefault("data", {})
            for k, v in string_data.items():
                data[k] = base64.b64encode(str(v).encode()).decode()
        if res is not None and request.action == enums.action.UPDATE and request.name:
            denied = await self._rewrite_write(request)
            if denied is not None:
                return denied
        elif (
            res is not None
            and request.action == enums.action.CREATE
            and isinstance(request.data, dict)
        ):
            self._record_update(request, request.data, create=True)
        resp = await self._handle_semantics(request)
        removing = (enums.action.DELETE, enums.action.UPDATE)
        if res is not None and request.name and request.action in removing:
            key = (request.resource, request.namespace, request.name)
            if key in self._objects and self._objects[key].deleted:
                await self._collect_garbage()
        return resp

    async def _rewrite_write(self, request: Any) -> aiohttp.web.StreamResponse | None:
        """Turn apply and JSON patches into the merge patch kmock applies; check preconditions.

        Returns an error response when the write must be refused.
        """
        ctype = str(request.headers.get("Content-Type", "")).split(";")[0].strip()
        key = (request.resource, request.namespace, request.name)
        current = self._current(request)
        if ctype == "application/apply-patch+yaml":
            data = request.data if isinstance(request.data, dict) else yaml.safe_load(request.text)
            if not isinstance(data, dict):
                return _status(400, "BadRequest", "apply body is not an object")
            return await self._apply(request, key, current, data)
        if ctype == "application/json-patch+json":
            if current is None:
                return _status(404, "NotFound", f"{request.name} not found")
            try:
                result = jsonpatch.apply_patch(current, request.data or [])
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                return _status(422, "Invalid", f"the JSON patch was not applied: {exc}")
            object.__setattr__(request, "data", _merge_diff(current, result))
            self._record_update(request, request.data)
            return None
        if isinstance(request.data, dict) and current is not None:
            stale = self._stale(request.data, current)
            if stale is not None:
                return stale
            if not request.subresource:
                self._record_update(request, request.data)
        return None

    def _stale(self, data: dict[str, Any], current: dict[str, Any]) -> aiohttp.web.Response | None:
        wanted = (data.get("metadata") or {}).get("resourceVersion")
        have = (current.get("metadata") or {}).get("resourceVersion")
        if wanted and wanted != have:
            return _status(
                409,
                "Conflict",
                "Operation cannot be fulfilled: the object has been modified; "
                "please apply your changes to the latest version and try again",
            )
        return None

    async def _apply(
        self, request: Any, key: Any, current: dict[str, Any] | None, data: dict[str, Any]
    ) -> aiohttp.web.StreamResponse | None:
        manager = request.params.get("fieldManager")
        if not manager:
            return _status(422, "Invalid", "fieldManager is required for apply patches")
        force = str(request.params.get("force", "")).lower() == "true"
        applied = _leaves(data)
        if current is None:
            meta = data.setdefault("metadata", {})
            meta.setdefault("name", request.name)
            meta.setdefault("namespace", request.namespace)
            self._owners[key] = {manager: ("Apply", set(applied))}
            meta["managedFields"] = self._managed_fields(key, data)
            object.__setattr__(request, "action", enums.action.CREATE)
            return None
        stale = self._stale(data, current)
        if stale is not None:
            return stale
        owners = self._owners.setdefault(key, {})
        conflicts = [
            (other, path)
            for other, (_, paths) in owners.items()
            if other != manager
            for path in applied
            if path in paths and _get_path(current, path) != applied[path]
        ]
        if conflicts and not force:
            names = ", ".join(f"{'.'.join(p)} (owned by {m})" for m, p in conflicts[:5])
            return _status(409, "Conflict", f"Apply failed with conflicts: {names}")
        for other, (op, paths) in list(owners.items()):
            if other != manager:
                owners[other] = (op, paths - set(applied))
        _, previous = owners.get(manager, ("Apply", set()))
        others = set().union(*(p for m, (_, p) in owners.items() if m != manager))
        result = json.loads(json.dumps(current))
        for path in previous - set(applied) - others:  # fields this manager stopped applying
            parent = _get_path(result, path[:-1])
            if isinstance(parent, dict):
                parent.pop(path[-1], None)
        for path, value in applied.items():
            node = result
            for p in path[:-1]:
                if not isinstance(node.get(p), dict):
                    node[p] = {}
                node = node[p]
            node[path[-1]] = value
        owners[manager] = ("Apply", set(applied))
        result.setdefault("metadata", {})["managedFields"] = self._managed_fields(key, result)
        object.__setattr__(request, "data", _merge_diff(current, result))
        return None

    def _record_update(self, request: Any, data: dict[str, Any], *, create: bool = False) -> None:
        """A create or merge patch: its fields become the writer's (operation Update)."""
        meta = data.get("metadata") or {}
        key = (
            request.resource,
            request.namespace or meta.get("namespace"),
            request.name or meta.get("name"),
        )
        manager = _manager(request)
        touched = {p for p, v in _leaves(data).items() if v is not None}
        owners = self._owners.setdefault(key, {})
        if create:
            owners.clear()
        for other, (op, paths) in list(owners.items()):
            if other != manager:
                owners[other] = (op, paths - touched)
        op, mine = owners.get(manager, ("Update", set()))
        owners[manager] = (op, mine | touched)
        if not touched and not create:
            return
        data.setdefault("metadata", {})["managedFields"] = self._managed_fields(key, None)

    def _managed_fields(self, key: Any, obj: dict[str, Any] | None) -> list[dict[str, Any]]:
        api_version = f"{key[0].group}/{key[0].version}" if key[0].group else str(key[0].version)
        return [
            {
                "manager": manager,
                "operation": op,
                "apiVersion": api_version,
                "fieldsType": "FieldsV1",
                "fieldsV1": _fields_v1(paths),
            }
            for manager, (op, paths) in sorted(self._owners.get(key, {}).items())
            if paths
        ]

    async def _collect_garbage(self) -> None:
        """Background cascading deletion: objects whose owners are all gone go too."""
        while True:
            async with self._lock:
                live_uids = {
                    obj.raw.get("metadata", {}).get("uid")
                    for _, obj in self._objects.items()
                    if not obj.deleted
                }
                orphans = []
                for key, obj in list(self._objects.items()):
                    if obj.deleted:
                        continue
                    refs = obj.raw.get("metadata", {}).get("ownerReferences") or []
                    if refs and not any(r.get("uid") in live_uids for r in refs):
                        orphans.append((key, obj))
                for key, obj in orphans:
                    raw = obj.raw
                    obj.delete()
                    self._owners.pop(key, None)
                    self.collected.append(f"{raw.get('kind')}/{raw['metadata'].get('name')}")
                    await self._buses[key[0]].put({"type": "DELETED", "object": raw})
            if not orphans:
                return

    async def _serve_watch(self, request: Any) -> Any:
        since = str(request.params.get("resourceVersion") or "")
        if since.isdigit() and int(since) < self._compacted_rv:
            self.expired_watches.append(str(request.resource.plural))
            yield b""
            yield {
                "type": "ERROR",
                "object": {"kind": "Status", "code": 410, "reason": "Expired", "status": "Failure"},
            }
            return
        async for item in super()._serve_watch(request):
            if isinstance(item, dict) and item.get("type") == "ERROR":
                self.expired_watches.append(str(request.resource.plural))
                yield item
                return
            yield item

    async def _handle_semantics(self, request: Any) -> aiohttp.web.StreamResponse:
        data = request.data
        if request.resource is not None and isinstance(data, dict):
            meta = (
                data.setdefault("metadata", {})
                if request.action in (enums.action.CREATE, enums.action.UPDATE)
                else None
            )
            if meta is not None:
                meta["resourceVersion"] = str(next(self._rv))
            if request.action == enums.action.CREATE and meta is not None:
                if not meta.get("name") and meta.get("generateName"):
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                meta.setdefault("uid", str(uuid.uuid4()))
                meta["creationTimestamp"] = datetime.datetime.now(datetime.UTC).strftime(
                    "%Y-%m-%dT%H:%M:%SZ"
                )
                meta["generation"] = 1
                meta.pop("deletionTimestamp", None)
            elif (
                request.action == enums.action.UPDATE
                and meta is not None
                and not request.subresource
                and "spec" in data
            ):
                current = self._current(request)
                if current is not None and current.get("spec") != _merged(
                    current.get("spec"), data["spec"]
                ):
                    meta["generation"] = int(current.get("metadata", {}).get("generation", 1)) + 1
            if request.subresource == "status" and request.action == enums.action.UPDATE:
                # The status subresource ignores everything but status, as the API server does.
                for key in list(data):
                    if key not in ("status", "metadata"):
                        data.pop(key)
                data["metadata"] = {"resourceVersion": data["metadata"]["resourceVersion"]}
        return await super()._handle(request)

    def _refusal(self, request: Any) -> apilimits.Refusal | None:
        """What a real API server would refuse about this write (see apilimits)."""
        if request.action not in (enums.action.CREATE, enums.action.UPDATE):
            return None
        kind = KIND_BY_PLURAL.get(str(getattr(request.resource, "plural", "") or ""), "")
        data = request.data if isinstance(request.data, dict) else None
        if request.subresource or data is None:
            return apilimits.refusal(kind, len(request.body), None)
        before = self._current(request) if request.action == enums.action.UPDATE else None
        after = _merged(before, data) if before is not None else data
        return apilimits.refusal(kind, len(request.body), after, before)

    def _current(self, request: Any) -> dict[str, Any] | None:
        key = (request.resource, request.namespace, request.name)
        if key in self._objects and not self._objects[key].deleted:
            raw: dict[str, Any] = self._objects[key].raw
            return raw
        return None

    def preload(self, resource: str, obj: dict[str, Any]) -> None:
        """Store an object directly (as if created long ago), bypassing HTTP: for bulk setups."""
        meta = obj.setdefault("metadata", {})
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", "2026-01-01T00:00:00Z")
        meta.setdefault("generation", 1)
        meta["resourceVersion"] = str(next(self._rv))
        self._objects[kmock.resource(resource), meta.get("namespace"), meta["name"]] = obj

    def raw_objects(self, resource: str) -> list[dict[str, Any]]:
        """The stored objects themselves, not copies (read them, never change them): for
        benchmarks polling thousands of objects, where `objects_of`'s copies cost seconds."""
        res = kmock.resource(resource)
        return [
            obj.raw
            for (r, _, _), obj in list(self._objects.items())
            if r == res and not obj.deleted
        ]

    def raw_object(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        """One stored object itself (read it, never change it), by key: for a benchmark that
        polls one object every 10 ms while 10,000 others are stored."""
        key = (kmock.resource(resource), namespace, name)
        if key not in self._objects or self._objects[key].deleted:
            return None
        raw: dict[str, Any] = self._objects[key].raw
        return raw

    def objects_of(self, resource: str, namespace: str | None = None) -> list[dict[str, Any]]:
        """Live objects of one resource (e.g. 'apps/v1/deployments'), for assertions."""
        res = kmock.resource(resource)
        out = []
        for (r, ns, _), obj in list(self._objects.items()):
            if r == res and not obj.deleted and (namespace is None or ns == namespace):
                out.append(json.loads(json.dumps(obj.raw)))
        return out


def _merged(base: Any, patch: Any) -> Any:
    """RFC 7386 merge, to tell whether a patch really changes the spec."""
    if not isinstance(patch, dict):
        return patch
    out = dict(base) if isinstance(base, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merged(out.get(k), v)
    return out


@dataclass
class RunningEmulator:
    """A started emulator with its URL, and a kubeconfig pointing at it."""

    emulator: Emulator
    url: str
    kubeconfig: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def requests(self, exclude_agent: str | None = None) -> list[LoggedRequest]:
        """Every resource request received so far, optionally without one client's."""
        return [
            r
            for r in self.emulator.log
            if exclude_agent is None or exclude_agent not in r.user_agent
        ]


def write_kubeconfig(path: Path, url: str, user: dict[str, Any] | None = None) -> Path:
    """A kubeconfig for the emulator; `user` as in kubeconfig (token, tokenFile or exec)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "emulator", "cluster": {"server": url}}],
        "users": [{"name": "emulator", "user": user or {"token": "emulator-token"}}],
        "contexts": [
            {
                "name": "emulator",
                "context": {"cluster": "emulator", "user": "emulator", "namespace": "default"},
            }
        ],
        "current-context": "emulator",
    }
    path.write_text(json.dumps(config))
    return path


@asynccontextmanager
async def running_emulator(
    workdir: Path, port: int | None = None
) -> AsyncIterator[RunningEmulator]:
    """Start the emulator on 127.0.0.1 with loraplex's and the built-in resources declared."""
    async with Emulator() as emu, kmock.Server(emu, port=port) as server:
        for key, info in RESOURCES.items():
            emu.resources[key] = kmock.ResourceInfo(namespaced=True, verbs=VERBS, **info)
        for key, info in CLUSTER_RESOURCES.items():
            emu.resources[key] = kmock.ResourceInfo(namespaced=False, verbs=VERBS, **info)
        url = str(server.url).rstrip("/")
        yield RunningEmulator(emu, url, write_kubeconfig(workdir / "kubeconfig", url))
