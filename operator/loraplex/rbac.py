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
    # Our own kinds: kopf watches them and patches BaseModels' metadata (its finalizer and
    # annotations); on LoRAAdapters it only removes the finalizer earlier builds put there.
    # The reconciler reads BaseModels one by one and lists adapters. Status is separate.
    Rule("loraplex.io", ("basemodels",), (*READ, "patch")),
    Rule("loraplex.io", ("loraadapters",), ("list", "watch", "patch")),
    Rule("loraplex.io", ("basemodels/status", "loraadapters/status"), ("patch",)),
    # What a BaseModel owns: watched for drift, created, corrected. Never deleted by us:
    # ownerReferences let Kubernetes collect them with their BaseModel.
    Rule("apps", ("deployments",), (*READ, "create", "patch")),
    Rule("", ("services",), (*READ, "create", "patch")),
    # ConfigMaps: the manifest index and its shards; a shard the index no longer names (the
    # manifest shrank) is deleted, only when this BaseModel is its controller.
    Rule("", ("configmaps",), (*READ, "create", "patch", "delete")),
    Rule("", ("secrets",), ("create", "patch")),
    Rule("policy", ("poddisruptionbudgets",), ("get", "create", "patch")),
    # The weights cache: its PVC and loader Job are created once and never patched (a Job's
    # template is immutable; its name changes with the weights it loads). Jobs are watched so
    # the Deployment follows a finished download at once; a superseded loader Job (this
    # BaseModel's only) is deleted once its successor succeeded.
    Rule("", ("persistentvolumeclaims",), ("get", "create")),
    Rule("batch", ("jobs",), (*READ, "create", "delete")),
    # The pods' NetworkPolicy: read back for drift on the timer (no watch), created, corrected,
    # and deleted when spec.networkPolicy.enabled turns false (only one this BaseModel owns).
    Rule("networking.k8s.io", ("networkpolicies",), ("get", "create", "patch", "delete")),
    # spec.routing and spec.autoscaling: created and corrected like the rest (the HPA's or
    # KEDA's own writes to the Deployment's replicas are theirs: server-side apply yields).
    Rule("autoscaling", ("horizontalpodautoscalers",), ("get", "create", "patch")),
    Rule("inference.networking.k8s.io", ("inferencepools",), ("get", "create", "patch")),
    Rule("gateway.networking.k8s.io", ("httproutes",), ("get", "create", "patch")),
    Rule("keda.sh", ("scaledobjects",), ("get", "create", "patch")),
    # Pods are listed to push manifests to, and poll adapter state from, each ready replica.
    Rule("", ("pods",), ("list",)),
    # Events (kopf's poster, e.g. `Replanned`).
    Rule("", ("events",), ("create",)),
)

# Cluster-scoped: kopf discovers CRDs at start and watches for new ones.
CLUSTER_RULES: tuple[Rule, ...] = (
    Rule("apiextensions.k8s.io", ("customresourcedefinitions",), ("list", "watch")),
    # Peering, so that only one of several operator replicas is active (with --peering).
    Rule("kopf.dev", ("clusterkopfpeerings",), (*READ, "patch")),
)
NAMESPACED_KOPF_RULES: tuple[Rule, ...] = (Rule("kopf.dev", ("kopfpeerings",), (*READ, "patch")),)
PEERING_GROUP = "kopf.dev"


def expand(rules: tuple[Rule, ...]) -> set[tuple[str, str, str]]:
    """Every (api group, resource, verb) the rules allow."""
    return {(r.api_group, res, v) for r in rules for res in r.resources for v in r.verbs}


def covers(rules: tuple[Rule, ...], api_group: str, resource: str, verb: str) -> bool:
    """Whether `rules` allow `verb` on `resource` in `api_group`."""
    return any(
        r.api_group == api_group and resource in r.resources and verb in r.verbs for r in rules
    )
