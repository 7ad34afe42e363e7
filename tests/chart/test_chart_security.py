"""What the chart enforces beyond RBAC: the Secrets admission policy and the NetworkPolicies.

The ValidatingAdmissionPolicy's CEL is evaluated with cel-python the way the API server does
(matchConditions, then variables, then every validation) on AdmissionRequests:
- the operator's ServiceAccount creating a labelled Secret, patching (UPDATE) a labelled one,
  deleting a labelled one: allowed;
- it creating an unlabelled Secret, patching an unlabelled one (with or without adding the
  label), removing the label, setting it to another value, deleting an unlabelled one: denied;
- another user, or a ServiceAccount of the same name in another namespace: not matched.
Also: the policy matches exactly Secrets CREATE/UPDATE/DELETE and is bound with Deny; it can
be turned off; in namespaced mode (watchNamespaces) no cluster-wide rule names Secrets (or
any namespaced kind we write); the operator's NetworkPolicy selects the operator pod and
admits only the metrics port; image digests pin every image the chart runs or passes on.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import celpy
import pytest

from loraplex import naming

from .conftest import RELEASE_NAMESPACE, Render

pytestmark = [pytest.mark.chart, pytest.mark.security]

SA_USER = f"system:serviceaccount:{RELEASE_NAMESPACE}:lp-loraplex"
LABEL = {"app.kubernetes.io/managed-by": naming.MANAGED_BY}


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


@dataclass(frozen=True)
class Verdict:
    matched: bool
    denied: list[str]  # messages of failed validations

    @property
    def allowed(self) -> bool:
        return not self.denied


def admit(policy: dict[str, Any], request: dict[str, Any]) -> Verdict:
    """Evaluate `policy` on one AdmissionRequest as the API server would (CEL via celpy)."""
    spec = policy["spec"]
    for rule in spec["matchConstraints"]["resourceRules"]:
        kind = request["resource"]
        if not (
            kind["group"] in rule["apiGroups"]
            and kind["version"] in rule["apiVersions"]
            and kind["resource"] in rule["resources"]
            and request["operation"] in rule["operations"]
        ):
            return Verdict(False, [])
    env = celpy.Environment()

    def run(expression: str, activation: dict[str, Any]) -> bool:
        return bool(env.program(env.compile(expression)).evaluate(activation))

    activation: dict[str, Any] = {
        "request": celpy.json_to_cel(request),
        "object": celpy.json_to_cel(request.get("object")),
        "oldObject": celpy.json_to_cel(request.get("oldObject")),
    }
    if not all(run(c["expression"], activation) for c in spec.get("matchConditions", [])):
        return Verdict(False, [])
    variables = {}
    for var in spec.get("variables", []):
        variables[var["name"]] = run(var["expression"], activation)
    activation["variables"] = celpy.json_to_cel(variables)
    return Verdict(
        True, [v["message"] for v in spec["validations"] if not run(v["expression"], activation)]
    )


def secret(labels: dict[str, str] | None, data: str = "c2VjcmV0") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "s", "namespace": "team-a"}
    if labels is not None:
        meta["labels"] = labels
    return {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "data": {"token": data}}


def request(
    op: str,
    new: dict[str, Any] | None,
    old: dict[str, Any] | None = None,
    user: str = SA_USER,
) -> dict[str, Any]:
    return {
        "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
        "kind": {"group": "", "version": "v1", "kind": "Secret"},
        "resource": {"group": "", "version": "v1", "resource": "secrets"},
        "namespace": "team-a",
        "name": "s",
        "operation": op,
        "userInfo": {"username": user, "groups": ["system:serviceaccounts"]},
        "object": new,
        "oldObject": old,
    }


OTHER_LABEL = {"app.kubernetes.io/managed-by": "Helm"}
CASES: dict[str, tuple[dict[str, Any], str]] = {
    # name: (request, expected: "allowed" | "denied" | "unmatched")
    "create-labelled": (request("CREATE", secret(LABEL)), "allowed"),
    "patch-labelled": (request("UPDATE", secret(LABEL, "bmV3"), secret(LABEL)), "allowed"),
    "delete-labelled": (request("DELETE", None, secret(LABEL)), "allowed"),
    "create-unlabelled": (request("CREATE", secret(None)), "denied"),
    "create-other-value": (request("CREATE", secret(OTHER_LABEL)), "denied"),
    "patch-unlabelled": (request("UPDATE", secret(None, "bmV3"), secret(None)), "denied"),
    "patch-foreign-adding-label": (request("UPDATE", secret(LABEL), secret({})), "denied"),
    "remove-label": (request("UPDATE", secret({}), secret(LABEL)), "denied"),
    "remove-all-labels": (request("UPDATE", secret(None), secret(LABEL)), "denied"),
    "relabel": (request("UPDATE", secret(OTHER_LABEL), secret(LABEL)), "denied"),
    "delete-unlabelled": (request("DELETE", None, secret(OTHER_LABEL)), "denied"),
    "other-user-unlabelled": (
        request("UPDATE", secret(None), secret(None), user="jane@example.com"),
        "unmatched",
    ),
    "same-sa-name-other-namespace": (
        request("CREATE", secret(None), user="system:serviceaccount:other:lp-loraplex"),
        "unmatched",
    ),
}


@pytest.fixture
def policy(render: Render) -> dict[str, Any]:
    [vap] = by_kind(render(), "ValidatingAdmissionPolicy")
    return vap


@pytest.mark.parametrize(("req", "expected"), CASES.values(), ids=CASES.keys())
def test_secrets_policy_verdicts(
    policy: dict[str, Any], req: dict[str, Any], expected: str
) -> None:
    verdict = admit(policy, req)
    got = "unmatched" if not verdict.matched else "allowed" if verdict.allowed else "denied"
    assert got == expected, verdict.denied
    if got == "denied":
        assert all("app.kubernetes.io/managed-by=loraplex" in m for m in verdict.denied)


def test_evaluator_notices_a_broken_policy(policy: dict[str, Any]) -> None:
    """The harness can fail: a policy that only checks the new object lets label-adding through."""
    weak = copy.deepcopy(policy)
    weak["spec"]["validations"] = weak["spec"]["validations"][:1]
    req, _ = CASES["patch-foreign-adding-label"]
    assert admit(weak, req).allowed


def test_policy_scope_and_binding(render: Render) -> None:
    objs = render()
    [vap] = by_kind(objs, "ValidatingAdmissionPolicy")
    [binding] = by_kind(objs, "ValidatingAdmissionPolicyBinding")
    assert vap["apiVersion"] == binding["apiVersion"] == "admissionregistration.k8s.io/v1"
    assert vap["spec"]["failurePolicy"] == "Fail"
    assert vap["spec"]["matchConstraints"]["resourceRules"] == [
        {
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "operations": ["CREATE", "UPDATE", "DELETE"],
            "resources": ["secrets"],
        }
    ]
    assert binding["spec"] == {"policyName": vap["metadata"]["name"], "validationActions": ["Deny"]}
    [sa] = by_kind(objs, "ServiceAccount")
    assert sa["metadata"]["name"] == SA_USER.rsplit(":", 1)[1]


def test_policy_follows_a_custom_service_account(render: Render) -> None:
    objs = render({"serviceAccount": {"create": False, "name": "ops-bot"}})
    [vap] = by_kind(objs, "ValidatingAdmissionPolicy")
    user = f"system:serviceaccount:{RELEASE_NAMESPACE}:ops-bot"
    assert not admit(vap, request("CREATE", secret(None), user=user)).allowed
    assert not admit(vap, request("CREATE", secret(None))).matched


def test_policy_can_be_turned_off(render: Render) -> None:
    kinds = {o["kind"] for o in render({"secretsAdmissionPolicy": {"enabled": False}})}
    assert not kinds & {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}


def test_namespaced_mode_grants_nothing_namespaced_cluster_wide(render: Render) -> None:
    objs = render({"watchNamespaces": ["team-a", "team-b"]})
    for role in by_kind(objs, "ClusterRole"):
        for rule in role["rules"]:
            assert "secrets" not in rule["resources"], rule
            assert not set(rule["resources"]) & {
                "deployments",
                "services",
                "configmaps",
                "networkpolicies",
                "pods",
            }, rule
    secret_grants = {
        (r["metadata"]["namespace"], verb)
        for r in by_kind(objs, "Role")
        for rule in r["rules"]
        if "secrets" in rule["resources"]
        for verb in rule["verbs"]
    }
    assert secret_grants == {
        (ns, verb) for ns in ("team-a", "team-b") for verb in ("create", "patch")
    }
    # The admission policy still applies in namespaced mode.
    assert by_kind(objs, "ValidatingAdmissionPolicy")


def test_operator_networkpolicy(render: Render) -> None:
    objs = render()
    [np] = by_kind(objs, "NetworkPolicy")
    [dep] = by_kind(objs, "Deployment")
    assert np["metadata"]["namespace"] == RELEASE_NAMESPACE
    assert np["spec"]["podSelector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    assert np["spec"]["policyTypes"] == ["Ingress"]
    assert np["spec"]["ingress"] == [{"ports": [{"port": 8080, "protocol": "TCP"}]}]
    peers = [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]
    [np] = by_kind(
        render(
            {"networkPolicy": {"enabled": True, "metricsFrom": peers}, "metrics": {"port": 9090}}
        ),
        "NetworkPolicy",
    )
    assert np["spec"]["ingress"] == [{"ports": [{"port": 9090, "protocol": "TCP"}], "from": peers}]
    assert not by_kind(render({"networkPolicy": {"enabled": False}}), "NetworkPolicy")


def test_operator_pod_labels_flag_matches_the_pod(render: Render) -> None:
    """The labels the operator puts in BaseModel policies are really on its pods."""
    from loraplex.cli import build_parser

    [dep] = by_kind(render(), "Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    args = build_parser().parse_args(c["args"])
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert args.operator_namespace == RELEASE_NAMESPACE
    assert dict(args.operator_pod_labels).items() <= pod_labels.items()


DIGEST = "sha256:" + "ab" * 32


def test_digests_pin_every_image(render: Render) -> None:
    objs = render(
        {
            "image": {"repository": "ghcr.io/x/operator", "tag": "1.0.0", "digest": DIGEST},
            "engineImage": {"repository": "vllm/vllm-openai", "tag": "v0.32.0", "digest": DIGEST},
            "serverImage": {"repository": "ghcr.io/x/adapter-server", "tag": "", "digest": DIGEST},
        }
    )
    [dep] = by_kind(objs, "Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == f"ghcr.io/x/operator:1.0.0@{DIGEST}"
    assert f"--engine-image=vllm/vllm-openai:v0.32.0@{DIGEST}" in c["args"]
    assert f"--server-image=ghcr.io/x/adapter-server:0.1.0@{DIGEST}" in c["args"]
