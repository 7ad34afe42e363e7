"""The chart's RBAC is exactly `loraplex.rbac`: nothing missing, nothing extra, no Secret reads.

Matrix:
- files/rbac.yaml is what tests/chart/sync_rbac.py renders from loraplex.rbac today.
- all namespaces: one ClusterRole == RULES + CLUSTER_RULES; no Roles.
- watchNamespaces [a, b]: a Role in each == RULES + NAMESPACED_KOPF_RULES; the ClusterRole ==
  CLUSTER_RULES without cluster peering; every binding names the chart's ServiceAccount.
- both modes and rbac.create=false: no rule reads Secrets, no wildcards.
- the comparison itself notices a missing, an extra and a widened rule (so it can fail).
"""

from __future__ import annotations

from typing import Any

import pytest

from loraplex import rbac

from . import sync_rbac
from .conftest import RELEASE_NAMESPACE, Render

pytestmark = pytest.mark.chart

Grant = tuple[str, str, str]  # (apiGroup, resource, verb)


def grants(rules: list[dict[str, Any]]) -> list[Grant]:
    """Flatten PolicyRules into sorted (group, resource, verb) triples, duplicates kept."""
    out: list[Grant] = []
    for rule in rules:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule  # no resourceNames etc.
        out += [
            (g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]
        ]
    return sorted(out)


def expected(*lists: tuple[rbac.Rule, ...]) -> list[Grant]:
    return sorted(
        (rule.api_group, res, verb)
        for rules in lists
        for rule in rules
        for res in rule.resources
        for verb in rule.verbs
    )


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def assert_no_secret_reads(objs: list[dict[str, Any]]) -> None:
    for role in by_kind(objs, "Role") + by_kind(objs, "ClusterRole"):
        for group, resource, verb in grants(role["rules"]):
            assert "*" not in (group, resource, verb), f"wildcard in {role['metadata']['name']}"
            if group == "" and resource == "secrets":
                assert verb in {"create", "patch"}, f"{verb} on secrets"


def assert_bound_to_chart_sa(binding: dict[str, Any], role: dict[str, Any], sa: str) -> None:
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": role["kind"],
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa, "namespace": RELEASE_NAMESPACE}
    ]


def test_rules_file_is_generated_from_loraplex_rbac() -> None:
    assert sync_rbac.RBAC_FILE.read_text() == sync_rbac.render(), (
        "charts/loraplex/files/rbac.yaml is stale: run `python tests/chart/sync_rbac.py`"
    )


def test_all_namespaces_cluster_role_is_exact(render: Render) -> None:
    objs = render()
    assert not by_kind(objs, "Role") and not by_kind(objs, "RoleBinding")
    [role] = by_kind(objs, "ClusterRole")
    [binding] = by_kind(objs, "ClusterRoleBinding")
    assert grants(role["rules"]) == expected(rbac.RULES, rbac.CLUSTER_RULES)
    [sa] = by_kind(objs, "ServiceAccount")
    assert_bound_to_chart_sa(binding, role, sa["metadata"]["name"])
    deployment = by_kind(objs, "Deployment")[0]
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    assert_no_secret_reads(objs)


def test_watched_namespaces_roles_are_exact(render: Render) -> None:
    objs = render({"watchNamespaces": ["a", "b"]})
    roles = by_kind(objs, "Role")
    bindings = {b["metadata"]["namespace"]: b for b in by_kind(objs, "RoleBinding")}
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["a", "b"]
    assert sorted(bindings) == ["a", "b"]
    [sa] = by_kind(objs, "ServiceAccount")
    for role in roles:
        assert grants(role["rules"]) == expected(rbac.RULES, rbac.NAMESPACED_KOPF_RULES)
        assert_bound_to_chart_sa(
            bindings[role["metadata"]["namespace"]], role, sa["metadata"]["name"]
        )
    [cluster_role] = by_kind(objs, "ClusterRole")
    cluster_only = tuple(r for r in rbac.CLUSTER_RULES if r.api_group != "kopf.dev")
    assert grants(cluster_role["rules"]) == expected(cluster_only)
    # The namespaced mode must not leak any namespaced rule cluster-wide.
    assert not set(grants(cluster_role["rules"])) & set(expected(rbac.RULES))
    [binding] = by_kind(objs, "ClusterRoleBinding")
    assert_bound_to_chart_sa(binding, cluster_role, sa["metadata"]["name"])
    assert_no_secret_reads(objs)


def test_rbac_can_be_turned_off(render: Render) -> None:
    objs = render({"rbac": {"create": False}})
    kinds = {o["kind"] for o in objs}
    assert not kinds & {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}


def test_python_rules_never_read_secrets() -> None:
    for rules in (rbac.RULES, rbac.CLUSTER_RULES, rbac.NAMESPACED_KOPF_RULES):
        for verb in ("get", "list", "watch"):
            assert not rbac.covers(rules, "", "secrets", verb)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda rules: rules[1:],
        lambda rules: [*rules, {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}],
        lambda rules: [
            {**rules[0], "verbs": [*rules[0]["verbs"], "delete"]},
            *rules[1:],
        ],
    ],
    ids=["missing", "extra", "widened"],
)
def test_comparison_catches_drift(render: Render, mutate: Any) -> None:
    [role] = by_kind(render(), "ClusterRole")
    assert grants(mutate(role["rules"])) != expected(rbac.RULES, rbac.CLUSTER_RULES)


def test_secret_read_check_catches_a_read() -> None:
    role = {
        "kind": "ClusterRole",
        "metadata": {"name": "x"},
        "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}],
    }
    with pytest.raises(AssertionError, match="get on secrets"):
        assert_no_secret_reads([role])
