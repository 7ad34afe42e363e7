"""The one module that talks to the Kubernetes API (besides kopf's own watching).

Built on lightkube's async client. Why lightkube, of the maintained async clients:
- it speaks server-side apply as a first-class call (PATCH application/apply-patch+yaml with
  fieldManager and force) and JSON patches (the `test` operation guards Secrets we do not
  own), and returns 409/422 as `ApiError` with the API's Status;
- it is small, untyped where we want it (generic resources are dicts, which is what the
  pure core renders) and needs no generated per-kind code, unlike kubernetes-asyncio whose
  typed models cost memory and a conversion per call;
- its transport is pluggable (`transport=`), which is where credentials and retries go: its
  own auth re-reads token files and re-runs exec plugins only after a 401, while we also
  refresh *before* an exec credential's `expirationTimestamp` and re-read rotated token files
  (kr8s likewise only re-authenticates on 401, and has no apply with a field manager).

`Credentials` is the single source of the bearer token for both clients in the process:
lightkube (through `_Transport`) and kopf (through the login handler in `loraplex.handlers`,
which returns `connection_info()`), so kopf's watches and our writes always agree on who we
are. Sources, as client-go resolves them: in-cluster token files (re-read when the kubelet
rotates them), kubeconfig `token`/`tokenFile`, and `exec:` plugins (re-run before expiry).
Every request answered 401 re-authenticates once and is retried; 429 and 5xx answers that
carry Retry-After are retried after that delay (bounded), as client-go does.
"""

from __future__ import annotations

import asyncio
import builtins
import datetime
import json
import logging
import os
import random
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import httpx2
from lightkube import AsyncClient
from lightkube.config.client_adapter import verify_cluster
from lightkube.config.kubeconfig import KubeConfig, SingleConfig
from lightkube.config.models import Cluster, User, UserExec
from lightkube.core.exceptions import ApiError
from lightkube.generic_resource import create_namespaced_resource
from lightkube.types import CascadeType, PatchType

from loraplex.errors import KubeError

log = logging.getLogger("loraplex.kube")
# httpx logs every request at INFO: at thousands of objects that is most of the log.
for _name in ("httpx", "httpx2"):
    logging.getLogger(_name).setLevel(logging.WARNING)
FIELD_MANAGER = "loraplex"


@dataclass(frozen=True)
class ResourceKind:
    """Where a kind lives in the REST API."""

    group: str
    version: str
    plural: str
    kind: str

    @cached_property
    def resource(self) -> Any:
        """lightkube's generic (dict-shaped) resource class for this kind."""
        return create_namespaced_resource(
            self.group, self.version, self.kind, self.plural, verbs=None
        )

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


DEPLOYMENTS = ResourceKind("apps", "v1", "deployments", "Deployment")
SERVICES = ResourceKind("", "v1", "services", "Service")
CONFIGMAPS = ResourceKind("", "v1", "configmaps", "ConfigMap")
SECRETS = ResourceKind("", "v1", "secrets", "Secret")
PODS = ResourceKind("", "v1", "pods", "Pod")
JOBS = ResourceKind("batch", "v1", "jobs", "Job")
PVCS = ResourceKind("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim")
PDBS = ResourceKind("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget")
NETWORKPOLICIES = ResourceKind("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy")
HPAS = ResourceKind("autoscaling", "v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler")
# Optional APIs (spec.routing / spec.autoscaling): their CRDs may be missing from a cluster.
INFERENCEPOOLS = ResourceKind(
    "inference.networking.k8s.io", "v1", "inferencepools", "InferencePool"
)
HTTPROUTES = ResourceKind("gateway.networking.k8s.io", "v1", "httproutes", "HTTPRoute")
SCALEDOBJECTS = ResourceKind("keda.sh", "v1alpha1", "scaledobjects", "ScaledObject")
BASEMODELS = ResourceKind("loraplex.io", "v1alpha1", "basemodels", "BaseModel")
LORAADAPTERS = ResourceKind("loraplex.io", "v1alpha1", "loraadapters", "LoRAAdapter")

KIND_OF: dict[str, ResourceKind] = {
    k.kind: k
    for k in (
        DEPLOYMENTS,
        SERVICES,
        CONFIGMAPS,
        SECRETS,
        PODS,
        JOBS,
        PVCS,
        PDBS,
        NETWORKPOLICIES,
        HPAS,
        INFERENCEPOOLS,
        HTTPROUTES,
        SCALEDOBJECTS,
        BASEMODELS,
        LORAADAPTERS,
    )
}


# -- credentials ---------------------------------------------------------------------------


class Credentials:
    """A bearer token that may change while the process runs (static by default)."""

    def __init__(self, token: str | None = None) -> None:
        self._token = token

    async def token(self) -> str | None:
        """The token to send now, refreshed first when it is due."""
        return self._token

    async def refresh(self) -> str | None:
        """Re-authenticate now (after a 401, or for kopf's re-login) and return the token."""
        return self._token

    @property
    def expiration(self) -> datetime.datetime | None:
        """When the current token stops being valid, when the source says so."""
        return None


class TokenFile(Credentials):
    """A token file the kubelet (or anyone) rewrites: re-read whenever it changed.

    A stat per request is cheap next to the request; client-go instead re-reads every
    minute, which leaves a window after a rotation that this closes.
    """

    def __init__(self, path: str) -> None:
        super().__init__(None)
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None

    def _read(self) -> str | None:
        st = self.path.stat()
        self._stamp = (st.st_mtime_ns, st.st_size)
        self._token = self.path.read_text().strip() or None
        return self._token

    async def token(self) -> str | None:
        try:
            st = self.path.stat()
        except OSError as exc:
            raise KubeError(0, f"service account token file {self.path}: {exc}") from exc
        if self._token is None or self._stamp != (st.st_mtime_ns, st.st_size):
            return self._read()
        return self._token

    async def refresh(self) -> str | None:
        try:
            return self._read()
        except OSError as exc:
            raise KubeError(0, f"service account token file {self.path}: {exc}") from exc


class ExecPlugin(Credentials):
    """A kubeconfig `exec:` credential plugin (aws eks get-token, gke-gcloud-auth-plugin).

    Re-run when the token is within `margin` of its `expirationTimestamp` (a quarter of its
    lifetime at most, so short-lived test tokens refresh too), and after a 401.
    """

    def __init__(self, spec: UserExec, *, cwd: Path | None = None, margin: float = 60.0) -> None:
        super().__init__(None)
        self.spec = spec
        self.cwd = cwd
        self.margin = margin
        self._expires: datetime.datetime | None = None
        self._refresh_at: datetime.datetime | None = None
        self._lock = asyncio.Lock()

    @property
    def expiration(self) -> datetime.datetime | None:
        return self._refresh_at

    def _due(self) -> bool:
        if self._token is None:
            return True
        now = datetime.datetime.now(datetime.UTC)
        return self._refresh_at is not None and now >= self._refresh_at

    async def token(self) -> str | None:
        if self._due():
            async with self._lock:
                if self._due():
                    await self._run()
        return self._token

    async def refresh(self) -> str | None:
        async with self._lock:
            await self._run()
        return self._token

    async def _run(self) -> None:
        env = dict(os.environ)
        env.update({v.name: v.value for v in self.spec.env or []})
        env["KUBERNETES_EXEC_INFO"] = json.dumps(
            {
                "apiVersion": self.spec.apiVersion,
                "kind": "ExecCredential",
                "spec": {"interactive": False},
            }
        )
        command = self.spec.command
        if self.cwd is not None and ("/" in command and not command.startswith("/")):
            command = str(self.cwd / command)
        proc = await asyncio.create_subprocess_exec(
            command,
            *(self.spec.args or []),
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise KubeError(
                0,
                f"exec credential plugin {self.spec.command} exited {proc.returncode}: "
                f"{err.decode(errors='replace')[:300]}",
            )
        try:
            status = json.loads(out)["status"]
            token = status["token"]
        except (ValueError, KeyError, TypeError) as exc:
            raise KubeError(
                0, f"exec credential plugin {self.spec.command} printed no status.token"
            ) from exc
        self._token = str(token)
        self._expires = _parse_time(status.get("expirationTimestamp"))
        if self._expires is None:
            self._refresh_at = None
        else:
            now = datetime.datetime.now(datetime.UTC)
            lifetime = max((self._expires - now).total_seconds(), 0.0)
            ahead = min(self.margin, lifetime / 4)
            self._refresh_at = self._expires - datetime.timedelta(seconds=ahead)
        log.info("exec credential plugin %s ran; token valid until %s", command, self._expires)


def _parse_time(value: Any) -> datetime.datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)


def credentials_for(user: User | None, *, base_dir: Path | None = None) -> Credentials:
    """The credential source a kubeconfig user (or the in-cluster account) describes."""
    if user is None:
        return Credentials()
    if user.token_file:
        path = Path(user.token_file)
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        return TokenFile(str(path))
    if user.token:
        return Credentials(user.token)
    if user.exec is not None:
        return ExecPlugin(user.exec, cwd=base_dir)
    return Credentials()


# -- connection ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Connection:
    """How to reach the API server: a lightkube config plus our credential source."""

    server: str
    token: str | None = None
    config: SingleConfig | None = None
    credentials: Credentials | None = None
    namespace: str = "default"

    def single_config(self) -> SingleConfig:
        if self.config is not None:
            return self.config
        cfg = KubeConfig.from_one(cluster=Cluster(server=self.server), user=User()).get()
        assert cfg is not None
        return cfg

    def creds(self) -> Credentials:
        return self.credentials or Credentials(self.token)

    def ssl_context(self) -> ssl.SSLContext | bool:
        cfg = self.single_config()
        if not cfg.cluster.server.startswith("https"):
            return False
        assert cfg.user is not None
        return verify_cluster(cfg.cluster, cfg.user, cfg.abs_file)


def _status_message(response: httpx2.Response) -> str | None:
    """The API's metav1.Status message, when the error body is one (it names the field)."""
    try:
        body = response.json()
    except (ValueError, httpx2.ResponseNotRead):
        return None
    message = body.get("message") if isinstance(body, dict) else None
    return message if isinstance(message, str) and message else None


def discover_connection() -> Connection:
    """Find the cluster as kubectl does: in-cluster first, then KUBECONFIG/~/.kube/config."""
    config = KubeConfig.from_env().get()
    if config is None:
        raise KubeError(0, "no Kubernetes configuration (in-cluster, KUBECONFIG or ~/.kube)")
    return _connection(config)


def connection_from_kubeconfig(path: Path) -> Connection:
    """The current context of one kubeconfig file (tests and tools that hold several)."""
    config = KubeConfig.from_file(path).get()
    if config is None:
        raise KubeError(0, f"{path}: no current context")
    return _connection(config)


def _connection(config: SingleConfig) -> Connection:
    fname = getattr(config, "fname", None)
    base = Path(fname).parent if fname else None
    return Connection(
        server=config.cluster.server.rstrip("/"),
        config=config,
        credentials=credentials_for(config.user, base_dir=base),
        namespace=config.namespace or "default",
    )


# -- transport: auth and retries -------------------------------------------------------------

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class _Transport(httpx2.AsyncBaseTransport):
    """Sets the current bearer token; one re-authentication on 401; Retry-After backoff."""

    def __init__(
        self,
        inner: httpx2.AsyncBaseTransport,
        credentials: Credentials,
        *,
        user_agent: str,
        max_retries: int = 6,
        max_delay: float = 30.0,
    ) -> None:
        self.inner = inner
        self.credentials = credentials
        self.user_agent = user_agent
        self.max_retries = max_retries
        self.max_delay = max_delay

    async def _send(self, request: httpx2.Request, token: str | None) -> httpx2.Response:
        request.headers["User-Agent"] = self.user_agent
        if token:
            request.headers["Authorization"] = f"Bearer {token}"
        return await self.inner.handle_async_request(request)

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        resp = await self._send(request, await self.credentials.token())
        if resp.status_code == 401:
            await resp.aclose()
            log.info("API answered 401: re-authenticating once")
            resp = await self._send(request, await self.credentials.refresh())
        for attempt in range(self.max_retries):
            delay = self._retry_delay(resp, attempt)
            if delay is None:
                break
            await resp.aclose()
            log.info("API answered %s: retrying in %.1fs", resp.status_code, delay)
            await asyncio.sleep(delay)
            resp = await self._send(request, await self.credentials.token())
        return resp

    def _retry_delay(self, resp: httpx2.Response, attempt: int) -> float | None:
        """client-go's rule: retry 429 and 5xx only when the server says when (Retry-After)."""
        if resp.status_code not in RETRY_STATUSES:
            return None
        header = resp.headers.get("Retry-After")
        if header is None:
            return None
        try:
            seconds = float(header)
        except ValueError:
            seconds = 1.0
        # Jitter so replicas told the same delay do not come back in lockstep.
        return min(max(seconds, 0.0) * (1 + random.random() * 0.2) + 0.05 * attempt, self.max_delay)

    async def aclose(self) -> None:
        await self.inner.aclose()


def matches_labels(obj: Mapping[str, Any], selector: Mapping[str, str]) -> bool:
    """Equality-based label selection, done locally."""
    labels = obj.get("metadata", {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


def _plain(obj: Any) -> dict[str, Any]:
    if obj is None:
        return {}
    if hasattr(obj, "to_dict"):
        return dict(obj.to_dict())
    return dict(obj)


class KubeClient:
    """The calls the operator makes (see loraplex.rbac), as dicts, over lightkube."""

    def __init__(
        self,
        connection: Connection,
        *,
        timeout: float = 30.0,
        user_agent: str = "loraplex-operator",
        field_manager: str = FIELD_MANAGER,
    ) -> None:
        self.connection = connection
        self.credentials = connection.creds()
        self.field_manager = field_manager
        inner = httpx2.AsyncHTTPTransport(verify=connection.ssl_context(), retries=0)
        self._transport = _Transport(inner, self.credentials, user_agent=user_agent)
        # lightkube gets the cluster without the user: authentication is the transport's
        # alone (lightkube's own ExecAuth would run the plugin a second time).
        self._client = AsyncClient(
            connection.single_config()._replace(user=User()),
            namespace=connection.namespace,
            timeout=httpx2.Timeout(timeout),
            lazy=False,
            field_manager=field_manager,
            trust_env=False,
            transport=self._transport,
        )

    async def close(self) -> None:
        await self._client.close()

    async def connection_info(self) -> Any:
        """kopf's ConnectionInfo with a freshly obtained token, for kopf's login handler.

        kopf calls its login handlers at start, after any 401 and when the `expiration` we
        give has passed; each call re-reads the token file or re-runs the exec plugin, so
        kopf's watches and this client authenticate from one source.
        """
        import kopf  # the operator's runtime; kube.py itself is also used without kopf

        cfg = self.connection.single_config()
        user = cfg.user or User()
        token = await self.credentials.refresh()
        return kopf.ConnectionInfo(
            server=cfg.cluster.server,
            ca_path=cfg.abs_file(cfg.cluster.certificate_auth)
            if cfg.cluster.certificate_auth
            else None,
            ca_data=cfg.cluster.certificate_auth_data,
            insecure=cfg.cluster.insecure or None,
            token=token,
            scheme="Bearer" if token else None,
            certificate_path=cfg.abs_file(user.client_cert) if user.client_cert else None,
            certificate_data=user.client_cert_data,
            private_key_path=cfg.abs_file(user.client_key) if user.client_key else None,
            private_key_data=user.client_key_data,
            default_namespace=self.connection.namespace,
            expiration=self.credentials.expiration,
        )

    async def _do(self, what: str, coro: Any) -> Any:
        try:
            return await coro
        except ApiError as exc:
            raise KubeError(
                exc.status.code or 0, f"{what[:120]}: {exc.status.message}"[:500]
            ) from exc
        except httpx2.HTTPStatusError as exc:
            message = _status_message(exc.response) or str(exc)
            raise KubeError(exc.response.status_code, f"{what[:120]}: {message}"[:500]) from exc
        except (httpx2.HTTPError, OSError) as exc:
            raise KubeError(0, f"{what}: {exc}"[:500]) from exc

    async def get(self, kind: ResourceKind, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            obj = await self._do(
                f"GET {kind.plural}/{name}",
                self._client.get(kind.resource, name, namespace=namespace),
            )
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise
        return _plain(obj)

    async def list(
        self, kind: ResourceKind, namespace: str, labels: Mapping[str, str] | None = None
    ) -> list[dict[str, Any]]:
        async def collect() -> list[dict[str, Any]]:
            return [
                _plain(o)
                async for o in self._client.list(
                    kind.resource, namespace=namespace, labels=dict(labels or {})
                )
            ]

        items = await self._do(f"LIST {kind.plural}", collect())
        # The API stand-in used in tests ignores selectors; a real server honours them.
        return [i for i in items if not labels or matches_labels(i, labels)]

    async def list_all(
        self, kind: ResourceKind, namespaces: Sequence[str] = ()
    ) -> builtins.list[dict[str, Any]]:
        """Every object of `kind` in `namespaces` (empty: across the cluster)."""
        out: builtins.list[dict[str, Any]] = []
        for ns in namespaces or ("*",):  # lightkube's "*" is the all-namespaces list

            async def collect(ns: str = ns) -> builtins.list[dict[str, Any]]:
                return [_plain(o) async for o in self._client.list(kind.resource, namespace=ns)]

            out += await self._do(f"LIST {kind.plural}", collect())
        return out

    async def create(
        self, kind: ResourceKind, namespace: str, obj: Mapping[str, Any]
    ) -> dict[str, Any]:
        body = dict(obj)
        body["metadata"] = {**(obj.get("metadata") or {}), "namespace": namespace}
        res = kind.resource(body)
        return _plain(
            await self._do(
                f"POST {kind.plural}/{body['metadata'].get('name')}", self._client.create(res)
            )
        )

    async def patch(
        self,
        kind: ResourceKind,
        namespace: str,
        name: str,
        patch: Mapping[str, Any],
        *,
        sub: str | None = None,
    ) -> dict[str, Any] | None:
        """JSON merge patch (RFC 7386): lists are replaced whole, null deletes a key.

        Returns None when the object does not exist.
        """
        res = kind.resource.Status if sub == "status" else kind.resource
        try:
            obj = await self._do(
                f"PATCH {kind.plural}/{name}{'/' + sub if sub else ''}",
                self._client.patch(
                    res, name, dict(patch), namespace=namespace, patch_type=PatchType.MERGE
                ),
            )
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise
        return _plain(obj)

    async def json_patch(
        self, kind: ResourceKind, namespace: str, name: str, ops: Sequence[Mapping[str, Any]]
    ) -> dict[str, Any] | None:
        """RFC 6902 JSON patch: applied whole or not at all, so a failing `test` writes nothing.

        Returns None when the object does not exist; a failed test raises KubeError 422.
        """
        try:
            obj = await self._do(
                f"PATCH {kind.plural}/{name}",
                self._client.patch(
                    kind.resource,
                    name,
                    [dict(op) for op in ops],
                    namespace=namespace,
                    patch_type=PatchType.JSON,
                ),
            )
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise
        return _plain(obj)

    async def server_side_apply(
        self, obj: Mapping[str, Any], *, force: bool = True
    ) -> dict[str, Any]:
        """Server-side apply under our field manager: only the fields in `obj` become ours.

        Fields other managers set (an HPA's replicas, annotations from Argo CD or kubectl) are
        left alone. A `metadata.resourceVersion` in `obj` makes it conditional (409 if stale).
        """
        kind = KIND_OF[obj["kind"]]
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        return _plain(
            await self._do(
                f"APPLY {kind.plural}/{name}",
                self._client.patch(
                    kind.resource,
                    name,
                    dict(obj),
                    namespace=ns,
                    patch_type=PatchType.APPLY,
                    field_manager=self.field_manager,
                    force=force,
                ),
            )
        )

    async def delete(self, kind: ResourceKind, namespace: str, name: str) -> None:
        """Delete with its dependents, in the background (as kubectl does): a Job's pods go
        with it, where the API's default for Jobs would orphan them."""
        try:
            await self._do(
                f"DELETE {kind.plural}/{name}",
                self._client.delete(
                    kind.resource, name, namespace=namespace, cascade=CascadeType.BACKGROUND
                ),
            )
        except KubeError as exc:
            if exc.status != 404:
                raise

    async def apply(self, obj: Mapping[str, Any]) -> str:
        """Create the object, or merge-patch it to the desired state (as a user's
        `kubectl apply` would, for tests and the demo); returns what was done."""
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
