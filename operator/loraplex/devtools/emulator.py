"""An in-process Kubernetes API for tests, the demo and benchmarks (kmock's emulator).

kmock's `KubernetesEmulator` keeps objects in memory and serves list/watch/get/create/
merge-patch/delete over real HTTP. As its docs invite, we extend it with the metadata a real
API server assigns (uid, creationTimestamp, resourceVersion, names from generateName, and a
generation that moves only when the spec does), because the operator's `observedGeneration`
logic reads them. It refuses what a real API server refuses that we can run into (see
`apilimits`: object and body sizes, name and label lengths, immutable selectors). It still
does not do label selectors, garbage collection or schema
validation: the operator filters labels itself, and tests check ownerReferences and schemas
separately.
"""

from __future__ import annotations

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
import kmock
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


@dataclass(frozen=True)
class LoggedRequest:
    """What the emulator keeps of each API request (for RBAC checks and call counts)."""

    method: str
    group: str
    plural: str
    subresource: str | None
    name: str | None
    watch: bool
    user_agent: str

    @property
    def verb(self) -> str:
        """The RBAC verb this request needs."""
        if self.method == "GET":
            return "watch" if self.watch else ("get" if self.name else "list")
        return {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}[
            self.method
        ]


class Emulator(kmock.KubernetesEmulator):
    """kmock's emulator plus the metadata the API server stamps on objects.

    kmock keeps every request for assertions and scans them all on each new request, which
    makes long runs quadratic; we keep a compact log of our own and trim kmock's list.
    """

    _rv = itertools.count(1)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.log: list[LoggedRequest] = []

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # aiohttp caps bodies at 1 MiB, the API server at 3 MiB: lift aiohttp's cap so that
        # apilimits answers as the API server would (413 above 3 MiB, 422 for big objects).
        raw_request._client_max_size = 2 * apilimits.MAX_REQUEST_BYTES
        return await super().__call__(raw_request)

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
        if res is not None and res.plural:
            method = str(getattr(request.method, "value", request.method)).upper()
            self.log.append(
                LoggedRequest(
                    method=method,
                    group=str(res.group or ""),
                    plural=str(res.plural),
                    subresource=request.subresource,
                    name=request.name,
                    watch=str(request.params.get("watch", "")).lower() in ("true", "1"),
                    user_agent=str(request.headers.get("User-Agent", "")),
                )
            )
        refused = self._refusal(request)
        if refused is not None:
            return aiohttp.web.json_response(refused.status(), status=refused.code)
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


def write_kubeconfig(path: Path, url: str) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "emulator", "cluster": {"server": url}}],
        "users": [{"name": "emulator", "user": {"token": "emulator-token"}}],
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
