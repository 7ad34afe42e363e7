"""Every Kubernetes API call the operator makes, as RBAC rules: one list, three users.

The Helm chart's Role/ClusterRole is checked against this list by a test, and the operator
tests check that every request the operator really sends to the API stand-in is covered by
it. Secrets are write-only: the operator derives each BaseModel's admin token from its own
key, so it never needs to read Secrets across the cluster.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    """One PolicyRule: an API group, its resources, and the verbs used on them."""

    api_group: str
    resources: tuple[str, ...]
    verbs: tuple[str, ...]


READ = ("get", "list", "watch")

RULES: tuple[Rule, ...] = (
    # Our own kinds: kopf watches and patches them (finalizers on metadata, status separately).
    Rule("loraplex.io", ("basemodels", "loraadapters"), (*READ, "patch")),
    Rule("loraplex.io", ("basemodels/status", "loraadapters/status"), ("get", "patch")),
    # What a BaseModel owns.
    Rule("apps", ("deployments",), (*READ, "create", "patch", "delete")),
    Rule("", ("services", "configmaps"), (*READ, "create", "patch", "delete")),
    Rule("", ("secrets",), ("create", "patch")),
    # Pods are read to push manifests to, and poll adapter state from, each ready replica.
    Rule("", ("pods",), READ),
    # kopf posts events about the objects it handles.
    Rule("", ("events",), ("create",)),
    Rule("events.k8s.io", ("events",), ("create",)),
)

# Cluster-scoped extras kopf needs: CRD discovery and peering between operator replicas.
CLUSTER_RULES: tuple[Rule, ...] = (
    Rule("apiextensions.k8s.io", ("customresourcedefinitions",), READ),
    Rule("", ("namespaces",), READ),
    Rule("kopf.dev", ("clusterkopfpeerings",), (*READ, "patch")),
)
NAMESPACED_KOPF_RULES: tuple[Rule, ...] = (Rule("kopf.dev", ("kopfpeerings",), (*READ, "patch")),)


def covers(rules: tuple[Rule, ...], api_group: str, resource: str, verb: str) -> bool:
    """Whether `rules` allow `verb` on `resource` in `api_group`."""
    return any(
        r.api_group == api_group and resource in r.resources and verb in r.verbs for r in rules
    )
