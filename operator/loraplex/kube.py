"""The one module that talks to the Kubernetes API (besides kopf's own watching).

A small async REST client: get, list, create, merge-patch, delete, and `apply` (create, or
merge-patch when it exists). It finds the cluster the way kubectl does (KUBECONFIG,
~/.kube/config, or in-cluster), reusing the `kubernetes` package's config loaders, and
speaks plain HTTP/JSON through aiohttp so no call blocks kopf's event loop.

Label selectors are applied on the client side as well as sent to the server: the
Kubernetes API stand-in used in tests ignores them, and the real API server honours them.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from loraplex.errors import KubeError


@dataclass(frozen=True)
class ResourceKind:
    """Where a kind lives in the REST API."""

    group: str
    version: str
    plural: str

    def path(self, namespace: str | None, name: str | None = None, sub: str | None = None) -> str:
        base = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        if namespace is not None:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name is not None:
            base += f"/{name}"
        if sub is not None:
            base += f"/{sub}"
        return base


DEPLOYMENTS = ResourceKind("apps", "v1", "deployments")
SERVICES = ResourceKind("", "v1", "services")
CONFIGMAPS = ResourceKind("", "v1", "configmaps")
SECRETS = ResourceKind("", "v1", "secrets")
PODS = ResourceKind("", "v1", "pods")
JOBS = ResourceKind("batch", "v1", "jobs")
PVCS = ResourceKind("", "v1", "persistentvolumeclaims")
PDBS = ResourceKind("policy", "v1", "poddisruptionbudgets")
NETWORKPOLICIES = ResourceKind("networking.k8s.io", "v1", "networkpolicies")
BASEMODELS = ResourceKind("loraplex.io", "v1alpha1", "basemodels")
LORAADAPTERS = ResourceKind("loraplex.io", "v1alpha1", "loraadapters")

KIND_OF: dict[str, ResourceKind] = {
    "Deployment": DEPLOYMENTS,
    "Service": SERVICES,
    "ConfigMap": CONFIGMAPS,
    "Secret": SECRETS,
    "Pod": PODS,
    "Job": JOBS,
    "PersistentVolumeClaim": PVCS,
    "PodDisruptionBudget": PDBS,
    "NetworkPolicy": NETWORKPOLICIES,
    "BaseModel": BASEMODELS,
    "LoRAAdapter": LORAADAPTERS,
}


@dataclass(frozen=True)
class Connection:
    """How to reach the API server."""

    server: str
    token: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify: bool = True


def discover_connection() -> Connection:
    """Find the cluster as kubectl does: in-cluster first, then KUBECONFIG/~/.kube/config."""
    from kubernetes import client, config  # imported lazily: heavy, and only for discovery

    cfg = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
    token = None
    auth = cfg.api_key.get("authorization") or cfg.api_key.get("BearerToken")
    if auth:
        token = auth.removeprefix("Bearer ").strip()
    return Connection(
        server=cfg.host.rstrip("/"),
        token=token,
        ca_file=cfg.ssl_ca_cert,
        cert_file=cfg.cert_file,
        key_file=cfg.key_file,
        verify=bool(cfg.verify_ssl),
    )


def matches_labels(obj: Mapping[str, Any], selector: Mapping[str, str]) -> bool:
    """Equality-based label selection, done locally."""
    labels = obj.get("metadata", {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


class KubeClient:
    """An async client for the handful of calls the operator makes (see loraplex.rbac)."""

    def __init__(
        self,
        connection: Connection,
        *,
        timeout: float = 30.0,
        user_agent: str = "loraplex-operator",
    ) -> None:
        self._conn = connection
        self._user_agent = user_agent
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    def _ssl(self) -> ssl.SSLContext | bool:
        if not self._conn.server.startswith("https"):
            return False
        if not self._conn.verify:
            return False
        ctx = ssl.create_default_context(cafile=self._conn.ca_file)
        if self._conn.cert_file and self._conn.key_file:
            ctx.load_cert_chain(self._conn.cert_file, self._conn.key_file)
        return ctx

    async def _sess(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"Accept": "application/json", "User-Agent": self._user_agent}
            if self._conn.token:
                headers["Authorization"] = f"Bearer {self._conn.token}"
            self._session = aiohttp.ClientSession(
                headers=headers,
                timeout=self._timeout,
                connector=aiohttp.TCPConnector(ssl=self._ssl(), limit=32),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
    ) -> dict[str, Any] | None:
        """One request; returns the JSON body, None on 404, raises KubeError otherwise."""
        sess = await self._sess()
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if data is not None else {}
        try:
            async with sess.request(
                method, self._conn.server + path, data=data, headers=headers, params=params
            ) as resp:
                text = await resp.text()
                if resp.status == 404:
                    return None
                if resp.status >= 400:
                    try:
                        message = json.loads(text).get("message", text)
                    except ValueError:
                        message = text
                    raise KubeError(resp.status, f"{method} {path}: {message}"[:500])
                return json.loads(text) if text else {}
        except aiohttp.ClientError as exc:
            raise KubeError(0, f"{method} {path}: {exc}") from exc

    async def get(self, kind: ResourceKind, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._call("GET", kind.path(namespace, name))

    async def list(
        self, kind: ResourceKind, namespace: str, labels: Mapping[str, str] | None = None
    ) -> list[dict[str, Any]]:
        params = (
            {"labelSelector": ",".join(f"{k}={v}" for k, v in labels.items())} if labels else None
        )
        body = await self._call("GET", kind.path(namespace), params=params)
        items = (body or {}).get("items", [])
        return [i for i in items if not labels or matches_labels(i, labels)]

    async def create(
        self, kind: ResourceKind, namespace: str, obj: Mapping[str, Any]
    ) -> dict[str, Any]:
        return await self._call("POST", kind.path(namespace), obj) or {}

    async def patch(
        self,
        kind: ResourceKind,
        namespace: str,
        name: str,
        patch: Mapping[str, Any],
        *,
        sub: str | None = None,
    ) -> dict[str, Any] | None:
        """JSON merge patch (RFC 7386): lists are replaced whole, null deletes a key."""
        return await self._call(
            "PATCH",
            kind.path(namespace, name, sub),
            patch,
            content_type="application/merge-patch+json",
        )

    async def delete(self, kind: ResourceKind, namespace: str, name: str) -> None:
        await self._call("DELETE", kind.path(namespace, name))

    async def apply(self, obj: Mapping[str, Any]) -> str:
        """Create the object, or merge-patch it to the desired state; returns what was done."""
        kind = KIND_OF[obj["kind"]]
        ns = obj["metadata"]["namespace"]
        try:
            await self.create(kind, ns, obj)
            return "created"
        except KubeError as exc:
            if exc.status != 409:
                raise
        await self.patch(kind, ns, obj["metadata"]["name"], obj)
        return "patched"
