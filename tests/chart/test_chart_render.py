"""The chart lints, renders valid Kubernetes objects, and refuses bad values.

Matrix:
- lint: `helm lint` and `helm lint --strict`, no warnings or errors.
- value sets (default, watchNamespaces, serviceMonitor on, replicaCount 2, custom images and
  resources and placement, everything at once) x Kubernetes versions (1.30, the newest
  kubernetes-validate ships): every object, CRDs included, passes strict schema validation;
  kinds it has no schema for are checked against their own CRD (kopf peering) or structurally
  (ServiceMonitor).
- the rendered command parses with the real `loraplex` CLI parser, for every value set, and
  the chart's defaults and choices are the CLI's;
- what each value set must change: operator flags, peering objects, security, probes, Secret.
- bad values (negative replicas, unknown log level, numeric tag, bad namespace, low port,
  unknown key, missing service account name) fail `helm template` naming the value.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from loraplex.render import DEFAULT_SERVER_IMAGE
from loraplex.versions import DEFAULT_ENGINE_IMAGE

from .conftest import CHART, RELEASE, RELEASE_NAMESPACE, Helm, Render

pytestmark = pytest.mark.chart

FULLNAME = "lp-loraplex"
K8S_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]

VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "watch-namespaces": {"watchNamespaces": ["team-a", "team-b"]},
    "monitors": {
        "metrics": {
            "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
            "podMonitor": {"enabled": True, "labels": {"release": "prom"}},
        }
    },
    "two-replicas": {"replicaCount": 2},
    "custom": {
        "image": {"repository": "registry.example/ops/loraplex", "tag": "1.2.3"},
        "engineImage": {"repository": "registry.example/vllm", "tag": "v0.32.0-cu128"},
        "serverImage": {"repository": "registry.example/adapter-server", "tag": "1.2.3"},
        "imagePullSecrets": [{"name": "regcred"}],
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops"}],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["x"]}]}
                    ]
                }
            }
        },
        "logLevel": "debug",
        "podAnnotations": {"example.com/a": "b"},
        "extraArgs": ["--token-key-file=/etc/loraplex/key"],
        "priorityClassName": "system-cluster-critical",
    },
    "everything": {
        "replicaCount": 2,
        "watchNamespaces": ["ml"],
        "metrics": {
            "serviceMonitor": {"enabled": True},
            "podMonitor": {"enabled": True},
            "port": 9090,
        },
        "tokenKey": {"existingSecret": "my-key", "secretKey": "k"},
        "peering": {"name": "shared"},
        "serviceAccount": {"create": True, "name": "ops"},
    },
}


def kinds(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = kinds(objs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def container(objs: list[dict[str, Any]]) -> dict[str, Any]:
    containers = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    result: dict[str, Any] = containers[0]
    return result


def peering_schema() -> dict[str, dict[str, Any]]:
    """kind -> openAPIV3Schema of kopf's peering CRDs, as shipped in the subchart."""
    path = CHART / "charts" / "kopf-peering" / "crds" / "kopf-peering.yaml"
    return {
        crd["spec"]["names"]["kind"]: crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for crd in yaml.safe_load_all(path.read_text())
    }


def check_service_monitor(sm: dict[str, Any], objs: list[dict[str, Any]]) -> None:
    """ServiceMonitor has no schema in kubernetes-validate: check what Prometheus uses."""
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(sm) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(sm["spec"]) <= {"endpoints", "selector", "namespaceSelector", "jobLabel"}
    service = one(objs, "Service")
    labels = service["metadata"]["labels"]
    for key, value in sm["spec"]["selector"]["matchLabels"].items():
        assert labels.get(key) == value, f"ServiceMonitor selector {key} misses the Service"
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [service["metadata"]["namespace"]]}
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in sm["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
        assert endpoint["port"] in port_names
        assert endpoint["path"] == "/metrics"


def check_pod_monitor(pm: dict[str, Any], watched: list[str]) -> None:
    """PodMonitor: selects the pods the operator renders, on the adapter-server's port."""
    from loraplex import naming

    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(pm) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(pm["spec"]) == {"namespaceSelector", "selector", "podMetricsEndpoints"}
    pod_labels = naming.labels("some-base")
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pm["spec"]["namespaceSelector"] == (
        {"matchNames": watched} if watched else {"any": True}
    )
    [endpoint] = pm["spec"]["podMetricsEndpoints"]
    assert set(endpoint) <= {"port", "path", "interval", "relabelings"}
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    # Prometheus' name for the pod label naming.BASE_LABEL.
    source = "__meta_kubernetes_pod_label_" + naming.BASE_LABEL.replace(".", "_").replace("/", "_")
    assert endpoint["relabelings"] == [{"sourceLabels": [source], "targetLabel": "basemodel"}]


@pytest.mark.parametrize("strict", [False, True], ids=["lint", "lint-strict"])
def test_helm_lint_is_clean(helm: Helm, strict: bool) -> None:
    result = helm.run("lint", str(CHART), *(["--strict"] if strict else []))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[ERROR]" not in result.stdout and "[WARNING]" not in result.stdout, result.stdout


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_rendered_objects_are_valid(render: Render, values: dict[str, Any], version: str) -> None:
    objs = render(values, "--include-crds", "--kube-version", version)
    peering = peering_schema()
    seen = set()
    for obj in objs:
        kind = obj["kind"]
        seen.add(kind)
        if kind in peering:
            assert obj["apiVersion"] == "kopf.dev/v1"
            jsonschema.validate(obj, peering[kind])
        elif kind == "ServiceMonitor":
            check_service_monitor(obj, objs)
        elif kind == "PodMonitor":
            check_pod_monitor(obj, values.get("watchNamespaces", []))
        else:
            kubernetes_validate.validate(obj, version, strict=True)
    assert {"Deployment", "ServiceAccount", "Service", "CustomResourceDefinition"} <= seen


def test_crds_are_included(render: Render) -> None:
    names = {
        o["metadata"]["name"]
        for o in kinds(render({}, "--include-crds"), "CustomResourceDefinition")
    }
    assert names == {
        "basemodels.loraplex.io",
        "loraadapters.loraplex.io",
        "kopfpeerings.kopf.dev",
        "clusterkopfpeerings.kopf.dev",
    }


def test_default_operator_command(render: Render) -> None:
    c = container(render())
    assert c["command"] == ["loraplex"]
    assert c["args"] == [
        "operator",
        f"--peering={FULLNAME}",
        "--metrics-port=8080",
        "--log-level=info",
        "--log-format=json",
        f"--engine-image={DEFAULT_ENGINE_IMAGE}",
        f"--server-image={DEFAULT_SERVER_IMAGE}",
        f"--operator-namespace={RELEASE_NAMESPACE}",
        "--operator-pod-labels=app.kubernetes.io/component=operator,"
        f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/name=loraplex",
        "--token-key-file=/etc/loraplex/token-key/key",
    ]
    assert c["image"] == "ghcr.io/loraplex/operator:0.1.0"


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_command_parses_with_the_operator_cli(render: Render, values: dict[str, Any]) -> None:
    from loraplex.cli import build_parser

    c = container(render(values))
    assert c["command"] == ["loraplex"]
    args = build_parser().parse_args(c["args"])
    assert args.command == "operator"
    assert (args.namespace or []) == values.get("watchNamespaces", [])
    assert args.metrics_port == values.get("metrics", {}).get("port", 8080)
    assert args.peering


def test_log_choices_match_the_cli() -> None:
    from loraplex.cli import build_parser

    schema = yaml.safe_load((CHART / "values.schema.json").read_text())["properties"]
    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    operator = sub.choices["operator"]
    choices = {a.dest: list(a.choices) for a in operator._actions if a.choices}
    assert schema["logLevel"]["enum"] == choices["log_level"]
    assert schema["logFormat"]["enum"] == choices["log_format"]


def test_custom_values_reach_the_pod(render: Render) -> None:
    objs = render(VALUE_SETS["custom"])
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    c = container(objs)
    assert c["image"] == "registry.example/ops/loraplex:1.2.3"
    assert "--engine-image=registry.example/vllm:v0.32.0-cu128" in c["args"]
    assert "--server-image=registry.example/adapter-server:1.2.3" in c["args"]
    assert "--log-level=debug" in c["args"]
    assert c["args"][-1] == "--token-key-file=/etc/loraplex/key"
    # Helm merges maps: the default CPU limit stays unless set (or set to null).
    custom = VALUE_SETS["custom"]["resources"]
    assert c["resources"] == {**custom, "limits": {"cpu": "1", **custom["limits"]}}
    for key in ("nodeSelector", "tolerations", "affinity", "imagePullSecrets"):
        assert pod[key] == VALUE_SETS["custom"][key]
    assert pod["priorityClassName"] == "system-cluster-critical"


def test_all_namespaces_use_one_cluster_peering(render: Render) -> None:
    objs = render({"replicaCount": 2})
    assert one(objs, "Deployment")["spec"]["replicas"] == 2
    c = container(objs)
    assert not [a for a in c["args"] if a.startswith("--namespace")]
    peering = one(objs, "ClusterKopfPeering")
    assert f"--peering={peering['metadata']['name']}" in c["args"]
    assert not kinds(objs, "KopfPeering")


def test_watched_namespaces_each_get_flag_and_peering(render: Render) -> None:
    objs = render({"watchNamespaces": ["team-a", "team-b"], "peering": {"name": "shared"}})
    c = container(objs)
    assert [a for a in c["args"] if a.startswith("--namespace")] == [
        "--namespace=team-a",
        "--namespace=team-b",
    ]
    assert "--peering=shared" in c["args"]
    peerings = kinds(objs, "KopfPeering")
    assert {(p["metadata"]["namespace"], p["metadata"]["name"]) for p in peerings} == {
        ("team-a", "shared"),
        ("team-b", "shared"),
    }
    assert not kinds(objs, "ClusterKopfPeering")


def test_pod_security(render: Render) -> None:
    objs = render()
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container(objs)["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsNonRoot"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod.get("hostNetwork") is not True


def test_probes_and_metrics_service(render: Render) -> None:
    objs = render({"metrics": {"port": 9090}})
    c = container(objs)
    assert "--metrics-port=9090" in c["args"]
    port = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in (c["livenessProbe"], c["readinessProbe"]):
        assert probe["httpGet"]["path"] == "/healthz"
        assert port[probe["httpGet"]["port"]] == 9090
    service = one(objs, "Service")
    assert service["spec"]["ports"][0]["port"] == 9090
    pod_labels = one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert not kinds(objs, "ServiceMonitor")
    assert not kinds(objs, "PodMonitor")


def token_key_file(objs: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The --token-key-file path and the Secret volume that provides it (never an env var)."""
    c = container(objs)
    assert not [e for e in c["env"] if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]]
    [path] = [a.split("=", 1)[1] for a in c["args"] if a.startswith("--token-key-file=")]
    [mount] = [m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    assert mount["readOnly"] is True
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return path.removeprefix(mount["mountPath"] + "/"), volume["secret"]


def test_token_key_comes_from_chart_secret(render: Render) -> None:
    objs = render()
    key, ref = token_key_file(objs)
    assert ref["items"] == [{"key": key, "path": key}]
    secret = one(objs, "Secret")
    assert secret["metadata"]["name"] == ref["secretName"]
    assert secret["metadata"]["namespace"] == RELEASE_NAMESPACE
    assert len(secret["data"][key]) >= 64
    # Kept on uninstall, so a reinstall does not invalidate the tokens pods hold.
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_existing_token_secret_is_used_not_created(render: Render) -> None:
    objs = render({"tokenKey": {"existingSecret": "my-key", "secretKey": "k"}})
    assert not kinds(objs, "Secret")
    key, ref = token_key_file(objs)
    assert (key, ref["secretName"], ref["items"]) == ("k", "my-key", [{"key": "k", "path": "k"}])


BAD_VALUES: dict[str, tuple[dict[str, Any], str]] = {
    "negative-replicas": ({"replicaCount": -1}, "/replicaCount"),
    "unknown-log-level": ({"logLevel": "loud"}, "/logLevel"),
    "numeric-tag": ({"image": {"repository": "x", "tag": 5}}, "/image/tag"),
    "bad-namespace": ({"watchNamespaces": ["Team_A"]}, "/watchNamespaces/0"),
    "duplicate-namespace": ({"watchNamespaces": ["a", "a"]}, "/watchNamespaces"),
    "privileged-port": ({"metrics": {"port": 80}}, "/metrics/port"),
    "typo-key": ({"replicas": 2}, "replicas"),
    "no-engine-tag": ({"engineImage": {"repository": "x", "tag": ""}}, "/engineImage/tag"),
    "tag-as-digest": (
        {"image": {"repository": "x", "tag": "", "digest": "latest"}},
        "/image/digest",
    ),
    "sa-without-name": (
        {"serviceAccount": {"create": False, "name": ""}},
        "serviceAccount.name is required",
    ),
}


@pytest.mark.parametrize(("values", "message"), BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_bad_values_fail_clearly(
    template_error: Callable[[dict[str, Any]], str], values: dict[str, Any], message: str
) -> None:
    assert message in template_error(values)


def test_values_schema_is_valid_json_schema() -> None:
    schema = yaml.safe_load((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(yaml.safe_load((CHART / "values.yaml").read_text()), schema)


def test_readme_documents_every_value() -> None:
    """Every leaf of values.yaml appears in the README's table."""
    readme = (CHART / "README.md").read_text()

    def leaves(node: Any, prefix: str = "") -> list[str]:
        if isinstance(node, dict) and node:
            return [leaf for k, v in node.items() for leaf in leaves(v, f"{prefix}{k}.")]
        return [prefix.rstrip(".")]

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    # Objects passed to the pod whole are documented by one row.
    pass_through = {"resources", "podSecurityContext"}
    missing = [
        leaf
        for leaf in leaves(values)
        if f"`{leaf}`" not in readme and leaf.split(".")[0] not in pass_through
    ]
    missing += [f"{key}" for key in pass_through if f"`{key}`" not in readme]
    assert not missing, f"values missing from charts/loraplex/README.md: {missing}"
