"""A real Kubernetes control plane on loopback for the test tiers.

`make kube-bins` builds etcd, kube-apiserver, kube-controller-manager and kube-scheduler from
the Kubernetes release pinned in tools/kube/go.mod into .cache/kube/<version>/bin. This module
starts them on free 127.0.0.1 ports with a fresh PKI (a CA, the API server's serving
certificate, an admin client certificate in system:masters, and the service-account signing
key), installs our CRDs and the Helm chart's RBAC, and writes two kubeconfigs: the admin's,
and the operator's, which carries a real service-account token from the TokenRequest API, so
the server enforces the chart's RBAC on every call the operator makes.

The API server writes an audit log of the operator's requests (Metadata level, only its
service account), which is how tests see exactly which calls it made.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from loraplex.kube import Connection, connection_from_kubeconfig

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "loraplex"
CRDS = REPO / "crds"
GO_MOD = REPO / "tools" / "kube" / "go.mod"
# The chart is rendered as `helm install lp charts/loraplex -n loraplex-system` would.
RELEASE = "lp"
OPERATOR_NAMESPACE = "loraplex-system"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")


def kube_version() -> str:
    """The Kubernetes release tools/kube builds (the `k8s.io/kubernetes` requirement)."""
    m = re.search(r"^\s*k8s\.io/kubernetes (v\d+\.\d+\.\d+)\s*$", GO_MOD.read_text(), re.M)
    if m is None:
        raise RuntimeError(f"no k8s.io/kubernetes requirement in {GO_MOD}")
    return m.group(1)


def binaries_dir() -> Path:
    """Where `make kube-bins` puts the binaries ($LORAPLEX_KUBE_BIN overrides)."""
    env = os.environ.get("LORAPLEX_KUBE_BIN")
    return Path(env) if env else REPO / ".cache" / "kube" / kube_version() / "bin"


def binaries_built() -> bool:
    d = binaries_dir()
    return (d / ".built").is_file() and all((d / b).is_file() for b in BINARIES)


def venv_tool(name: str) -> Path:
    """helm and kubectl from the venv (make setup extracts the official binaries there)."""
    path = Path(sys.executable).parent / name
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: run `make setup`")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- PKI ------------------------------------------------------------------------------------


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _write_key(key: rsa.RSAPrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


def _cert(
    subject: x509.Name,
    key: rsa.RSAPrivateKey,
    issuer: tuple[x509.Certificate, rsa.RSAPrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        usage = x509.ExtendedKeyUsageOID.SERVER_AUTH if server else None
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([usage or x509.ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.DNSName("kubernetes.default.svc"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
    signer = issuer[1] if issuer else key
    return builder.sign(signer, hashes.SHA256())


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@dataclass(frozen=True)
class Pki:
    """Files the control plane and its clients need, all generated for this run."""

    ca_cert: Path
    ca_key: Path
    serving_cert: Path
    serving_key: Path
    admin_cert: Path
    admin_key: Path
    sa_key: Path
    sa_pub: Path

    @classmethod
    def generate(cls, d: Path) -> Pki:
        d.mkdir(parents=True, exist_ok=True)
        ca_key = _key()
        ca = _cert(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "loraplex-test-ca")]),
            ca_key,
            None,
            ca=True,
        )
        serving_key = _key()
        serving = _cert(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]),
            serving_key,
            (ca, ca_key),
            server=True,
        )
        admin_key = _key()
        admin = _cert(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "loraplex-test-admin"),
                ]
            ),
            admin_key,
            (ca, ca_key),
        )
        sa_key = _key()
        sa_pub = d / "sa.pub"
        sa_pub.write_bytes(
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        return cls(
            ca_cert=_write_cert(ca, d / "ca.crt"),
            ca_key=_write_key(ca_key, d / "ca.key"),
            serving_cert=_write_cert(serving, d / "apiserver.crt"),
            serving_key=_write_key(serving_key, d / "apiserver.key"),
            admin_cert=_write_cert(admin, d / "admin.crt"),
            admin_key=_write_key(admin_key, d / "admin.key"),
            sa_key=_write_key(sa_key, d / "sa.key"),
            sa_pub=sa_pub,
        )


# --- processes ------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 30) -> str:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return "\n".join(lines[-n:])

    def stop(self, grace: float = 10.0) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(grace)
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)


def _spawn(name: str, argv: list[str], logdir: Path) -> Proc:
    log = logdir / f"{name}.log"
    with log.open("ab") as out:
        popen = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return Proc(name, popen, log)


def kubeconfig(server: str, ca: Path, user: dict[str, str], namespace: str = "default") -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "test", "cluster": {"server": server, "certificate-authority": str(ca)}}
            ],
            "users": [{"name": "user", "user": user}],
            "contexts": [
                {
                    "name": "test",
                    "context": {"cluster": "test", "user": "user", "namespace": namespace},
                }
            ],
            "current-context": "test",
        },
        indent=1,
    )


AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    # ResponseStarted is where a watch shows up (it completes only when the watch ends).
    "omitStages": ["RequestReceived"],
    "rules": [
        {"level": "Metadata", "userGroups": [f"system:serviceaccounts:{OPERATOR_NAMESPACE}"]},
        {"level": "None"},
    ],
}


@dataclass(frozen=True)
class ApiCall:
    """One request the operator made, as the API server's audit log records it."""

    group: str
    resource: str  # with its subresource: "basemodels/status"
    verb: str
    code: int
    uri: str


@dataclass
class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager (+ kube-scheduler) on loopback."""

    workdir: Path
    with_scheduler: bool = False
    procs: list[Proc] = field(default_factory=list)
    url: str = ""
    pki: Pki | None = None
    admin_kubeconfig: Path = Path()
    audit_log: Path = Path()
    operator_sa: str = ""
    _session: requests.Session | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> ControlPlane:
        bins = binaries_dir()
        if not binaries_built():
            raise RuntimeError(f"Kubernetes binaries missing in {bins}: run `make kube-bins`")
        self.workdir.mkdir(parents=True, exist_ok=True)
        logs = self.workdir / "logs"
        logs.mkdir(exist_ok=True)
        self.pki = pki = Pki.generate(self.workdir / "pki")
        etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        self.procs.append(
            _spawn(
                "etcd",
                [
                    str(bins / "etcd"),
                    "--data-dir",
                    str(self.workdir / "etcd"),
                    "--listen-client-urls",
                    etcd_url,
                    "--advertise-client-urls",
                    etcd_url,
                    "--listen-peer-urls",
                    f"http://127.0.0.1:{peer_port}",
                    "--initial-advertise-peer-urls",
                    f"http://127.0.0.1:{peer_port}",
                    "--initial-cluster",
                    f"default=http://127.0.0.1:{peer_port}",
                    # Test data: durability is not needed, and fsync on a shared disk is slow.
                    "--unsafe-no-fsync",
                    "--log-level",
                    "warn",
                ],
                logs,
            )
        )
        self._wait(lambda: _http_ok(f"{etcd_url}/health"), "etcd health", 60)

        policy = self.workdir / "audit-policy.yaml"
        policy.write_text(yaml.safe_dump(AUDIT_POLICY))
        self.audit_log = self.workdir / "audit.log"
        self.url = f"https://127.0.0.1:{api_port}"
        self.procs.append(
            _spawn(
                "kube-apiserver",
                [
                    str(bins / "kube-apiserver"),
                    "--etcd-servers",
                    etcd_url,
                    "--bind-address",
                    "127.0.0.1",
                    "--advertise-address",
                    "127.0.0.1",
                    "--secure-port",
                    str(api_port),
                    "--tls-cert-file",
                    str(pki.serving_cert),
                    "--tls-private-key-file",
                    str(pki.serving_key),
                    "--client-ca-file",
                    str(pki.ca_cert),
                    "--service-account-issuer",
                    "https://kubernetes.default.svc.cluster.local",
                    "--service-account-key-file",
                    str(pki.sa_pub),
                    "--service-account-signing-key-file",
                    str(pki.sa_key),
                    "--authorization-mode",
                    "RBAC",
                    "--service-cluster-ip-range",
                    "10.96.0.0/24",
                    # The `kubernetes` Service's endpoints would be 127.0.0.1, which Endpoints
                    # validation refuses; nothing here routes to it.
                    "--endpoint-reconciler-type",
                    "none",
                    "--allow-privileged",
                    "--audit-policy-file",
                    str(policy),
                    "--audit-log-path",
                    str(self.audit_log),
                    "--audit-log-format",
                    "json",
                    "--audit-log-mode",
                    "blocking",
                    "--profiling=false",
                    "--v",
                    "1",
                ],
                logs,
            )
        )
        admin = {"client-certificate": str(pki.admin_cert), "client-key": str(pki.admin_key)}
        self.admin_kubeconfig = self.workdir / "admin.kubeconfig"
        self.admin_kubeconfig.write_text(kubeconfig(self.url, pki.ca_cert, admin))
        self._wait(self._ready, "kube-apiserver /readyz", 180)

        self.procs.append(
            _spawn(
                "kube-controller-manager",
                [
                    str(bins / "kube-controller-manager"),
                    "--kubeconfig",
                    str(self.admin_kubeconfig),
                    "--leader-elect=false",
                    "--secure-port",
                    "0",
                    "--root-ca-file",
                    str(pki.ca_cert),
                    "--service-account-private-key-file",
                    str(pki.sa_key),
                    # The default controllers: garbage collector, deployment, replicaset,
                    # namespace, serviceaccount, ...; the cloud ones idle without a provider.
                    "--concurrent-gc-syncs",
                    "5",
                    "--v",
                    "1",
                ],
                logs,
            )
        )
        if self.with_scheduler:
            self.procs.append(
                _spawn(
                    "kube-scheduler",
                    [
                        str(bins / "kube-scheduler"),
                        "--kubeconfig",
                        str(self.admin_kubeconfig),
                        "--leader-elect=false",
                        "--secure-port",
                        "0",
                    ],
                    logs,
                )
            )
        # The serviceaccount controller creates `default` in each namespace; pods need it.
        self._wait(
            lambda: self.get("v1/serviceaccounts", "default", "default") is not None,
            "kube-controller-manager (default ServiceAccount)",
            120,
        )
        self.install()
        return self

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()
        if self._session is not None:
            self._session.close()

    def _check_alive(self) -> None:
        for proc in self.procs:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.tail()}")

    def _wait(self, probe: Any, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            with contextlib.suppress(requests.RequestException, OSError):
                if probe():
                    return
            time.sleep(0.25)
        tails = "\n".join(f"--- {p.name}\n{p.tail()}" for p in self.procs)
        raise RuntimeError(f"timed out after {timeout}s waiting for {what}\n{tails}")

    def _ready(self) -> bool:
        return bool(self.session().get(f"{self.url}/readyz", timeout=5).status_code == 200)

    # -- what tests get ------------------------------------------------------------------------

    def install(self) -> None:
        """Our CRDs (until Established), the operator's namespace, service account and RBAC."""
        self.kubectl("apply", "-f", str(CRDS))
        # The optional APIs spec.routing/spec.autoscaling use (their projects' own CRDs).
        self.kubectl("apply", "-f", str(REPO / "tests" / "fixtures" / "crds"))
        self.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")
        self.kubectl("create", "namespace", OPERATOR_NAMESPACE)
        rendered = subprocess.run(
            [
                str(venv_tool("helm")),
                "template",
                RELEASE,
                str(CHART),
                "--namespace",
                OPERATOR_NAMESPACE,
                "--show-only",
                "templates/serviceaccount.yaml",
                "--show-only",
                "templates/rbac.yaml",
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
            env={"HOME": str(self.workdir), "PATH": "/usr/bin:/bin"},
        ).stdout
        docs = [d for d in yaml.safe_load_all(rendered) if d]
        self.operator_sa = next(d for d in docs if d["kind"] == "ServiceAccount")["metadata"][
            "name"
        ]
        self.kubectl("apply", "-f", "-", stdin=rendered)

    def kubectl(
        self,
        *args: str,
        stdin: str | None = None,
        kubeconfig: Path | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """The real kubectl (the venv's v1.35), as the admin unless another kubeconfig is given."""
        result = subprocess.run(
            [str(venv_tool("kubectl")), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={
                "KUBECONFIG": str(kubeconfig or self.admin_kubeconfig),
                "HOME": str(self.workdir),
                "PATH": "/usr/bin:/bin",
            },
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed:\n{result.stderr}")
        return result

    def operator_token(self, duration: str = "1h") -> str:
        """A TokenRequest token for the chart's service account: RBAC applies, and it expires."""
        out = self.kubectl(
            "create", "token", self.operator_sa, "-n", OPERATOR_NAMESPACE, "--duration", duration
        )
        return out.stdout.strip()

    def operator_kubeconfig(self, path: Path, duration: str = "1h") -> Path:
        assert self.pki is not None
        path.write_text(
            kubeconfig(self.url, self.pki.ca_cert, {"token": self.operator_token(duration)})
        )
        return path

    @property
    def operator_user(self) -> str:
        return f"system:serviceaccount:{OPERATOR_NAMESPACE}:{self.operator_sa}"

    def admin_connection(self) -> Connection:
        assert self.pki is not None
        return connection_from_kubeconfig(self.admin_kubeconfig)

    def session(self) -> requests.Session:
        """A blocking admin HTTP session: the control plane runs in other processes, so tests
        may read through it from inside the event loop without starving anything."""
        if self._session is None:
            assert self.pki is not None
            s = requests.Session()
            s.trust_env = False  # REQUESTS_CA_BUNDLE would replace our CA; no proxy on loopback
            s.verify = str(self.pki.ca_cert)
            s.cert = (str(self.pki.admin_cert), str(self.pki.admin_key))
            s.headers["User-Agent"] = "loraplex-tests"
            self._session = s
        return self._session

    @staticmethod
    def path(resource: str, namespace: str | None, name: str | None = None) -> str:
        """'apps/v1/deployments' or 'v1/pods' -> its REST path."""
        parts = resource.split("/")
        base = f"/api/{parts[0]}" if len(parts) == 2 else f"/apis/{parts[0]}/{parts[1]}"
        if namespace is not None:
            base += f"/namespaces/{namespace}"
        base += f"/{parts[-1]}"
        return base + (f"/{name}" if name else "")

    def objects_of(self, resource: str, namespace: str | None = None) -> list[dict[str, Any]]:
        for _ in range(50):
            resp = self.session().get(self.url + self.path(resource, namespace), timeout=30)
            # 429: the API server's priority and fairness (or a CRD whose storage is still
            # being set up) asks us to come back: do so, as kubectl does.
            if resp.status_code != 429:
                break
            time.sleep(min(float(resp.headers.get("Retry-After", "1") or 1), 2.0))
        resp.raise_for_status()
        items: list[dict[str, Any]] = resp.json()["items"]
        return items

    def get(self, resource: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        resp = self.session().get(self.url + self.path(resource, namespace, name), timeout=30)
        if resp.status_code == 404:
            return None
        resp.raise_for_status()
        obj: dict[str, Any] = resp.json()
        return obj

    def create_strict(self, resource: str, obj: dict[str, Any]) -> tuple[int, str]:
        """Create as `kubectl create` does (fieldValidation=Strict: unknown fields refused,
        not pruned); returns the HTTP status and the server's message."""
        ns = obj.get("metadata", {}).get("namespace")
        resp = self.session().post(
            self.url + self.path(resource, ns),
            params={"fieldValidation": "Strict"},
            data=json.dumps(obj),
            headers={"Content-Type": "application/json"},
            timeout=30,
        )
        try:
            message = str(resp.json().get("message", ""))
        except ValueError:
            message = resp.text
        return resp.status_code, message

    def audit_offset(self) -> int:
        return self.audit_log.stat().st_size if self.audit_log.exists() else 0

    def audit_events(self, since: int = 0, user: str | None = None) -> list[dict[str, Any]]:
        """The audit events after byte `since`, of `user` if given. The server is still
        writing the log, so a last line without its newline is not an event yet."""
        events = []
        with self.audit_log.open() as f:
            f.seek(since)
            for line in f:
                if not line.endswith("\n"):
                    break
                ev = json.loads(line)
                if user is None or ev.get("user", {}).get("username") == user:
                    events.append(ev)
        return events

    def operator_calls(self, since: int = 0) -> list[ApiCall]:
        """Every request the operator's service account made after byte `since` of the log."""
        calls: dict[str, ApiCall] = {}
        for ev in self.audit_events(since, self.operator_user):
            ref = ev.get("objectRef") or {}
            resource = ref.get("resource", "")
            if ref.get("subresource"):
                resource += "/" + ref["subresource"]
            calls[ev["auditID"]] = ApiCall(
                group=ref.get("apiGroup", ""),
                resource=resource,
                verb=ev["verb"],
                code=int((ev.get("responseStatus") or {}).get("code", 0)),
                uri=ev["requestURI"],
            )
        return list(calls.values())

    def reset_namespace(self, namespace: str = "default") -> None:
        """Empty a namespace between tests: our objects (finalizers dropped first, as no
        operator runs now), what they own, and events. The `kubernetes` Service stays."""
        for res in ("loraplex.io/v1alpha1/basemodels", "loraplex.io/v1alpha1/loraadapters"):
            for obj in self.objects_of(res, namespace):
                if obj["metadata"].get("finalizers"):
                    self.session().patch(
                        self.url + self.path(res, namespace, obj["metadata"]["name"]),
                        data=json.dumps({"metadata": {"finalizers": None}}),
                        headers={"Content-Type": "application/merge-patch+json"},
                        timeout=30,
                    )
        self.kubectl(
            "delete",
            "-n",
            namespace,
            "basemodels,loraadapters,deployments,replicasets,pods,configmaps,secrets,events,"
            "networkpolicies,horizontalpodautoscalers,jobs,persistentvolumeclaims,poddisruptionbudgets,"
            "inferencepools,httproutes,scaledobjects",
            "--all",
            "--wait=false",
            "--ignore-not-found",
        )
        self.kubectl(
            "delete",
            "-n",
            namespace,
            "services",
            "--field-selector",
            "metadata.name!=kubernetes",
            "--wait=false",
            "--ignore-not-found",
        )

        def empty() -> bool:
            return not any(
                self.objects_of(r, namespace)
                for r in (
                    "loraplex.io/v1alpha1/basemodels",
                    "loraplex.io/v1alpha1/loraadapters",
                    "apps/v1/deployments",
                )
            )

        self._wait(empty, f"namespace {namespace} emptied", 60)


def _http_ok(url: str) -> bool:
    return bool(requests.get(url, timeout=2).status_code == 200)


@contextlib.contextmanager
def control_plane(workdir: Path, *, with_scheduler: bool = False) -> Iterator[ControlPlane]:
    """Start a control plane; always stop every process, and keep logs on failure."""
    cp = ControlPlane(workdir, with_scheduler=with_scheduler)
    try:
        yield cp.start()
    finally:
        cp.stop()
        with contextlib.suppress(OSError):
            shutil.rmtree(workdir / "etcd")
