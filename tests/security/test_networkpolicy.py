"""Each BaseModel's NetworkPolicy: admin port from the operator's pods only, public port as set.

Matrix: the default policy selects exactly the pods the Deployment runs, admits the admin port
from the operator's namespace AND labels (one peer, both selectors, so a pod with the labels in
another namespace is not admitted), the public port from anywhere, and nothing for vLLM's port;
publicFrom peers become selectors; enabled=false renders none; a peer with neither selector is
refused (pydantic and the CRD's CEL rule); `loraplex render` takes the operator's namespace and
labels as flags; every variant passes kubernetes-validate strictly.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from loraplex import naming
from loraplex.cli import main
from loraplex.decide import decide
from loraplex.diff import drifted
from loraplex.offline import load_documents
from loraplex.render import OperatorPods, Owner, parse_labels
from tests.support.crd import cel_errors, schema_errors

pytestmark = pytest.mark.security
ROOT = Path(__file__).resolve().parents[2]
OWNER = Owner("qwen-14b", "team-a", "1b4e28ba-2fa1-11d2-883f-0016d3cca427")
OPERATOR = OperatorPods("ops", (("app", "loraplex-op"), ("release", "lp")))


def example() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    docs = load_documents([ROOT / "examples"])
    base = next(d for d in docs if d["kind"] == "BaseModel")
    return base, [d for d in docs if d["kind"] == "LoRAAdapter"]


def render(**spec: Any) -> list[dict[str, Any]]:
    base, adapters = example()
    d = decide(
        OWNER, {**base["spec"], **spec}, adapters, token="t" * 64, previous=None, operator=OPERATOR
    )
    assert d.invalid is None, d.invalid
    return d.objects


def policy(objs: list[dict[str, Any]]) -> dict[str, Any]:
    [np] = [o for o in objs if o["kind"] == "NetworkPolicy"]
    return np


def rule_for(np: dict[str, Any], port: int) -> dict[str, Any]:
    [rule] = [r for r in np["spec"]["ingress"] if r["ports"] == [{"port": port, "protocol": "TCP"}]]
    return rule


def test_default_policy_guards_the_admin_port() -> None:
    objs = render()
    np = policy(objs)
    dep = next(o for o in objs if o["kind"] == "Deployment")
    assert np["metadata"]["name"] == naming.networkpolicy_name("qwen-14b")
    assert np["metadata"]["ownerReferences"][0]["uid"] == OWNER.uid
    assert np["metadata"]["labels"]["app.kubernetes.io/managed-by"] == naming.MANAGED_BY
    # It selects exactly the Deployment's pods.
    assert np["spec"]["podSelector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    assert np["spec"]["policyTypes"] == ["Ingress"]
    ports = sorted(p["port"] for r in np["spec"]["ingress"] for p in r["ports"])
    assert ports == [naming.PUBLIC_PORT, naming.ADMIN_PORT]  # vLLM's 8001: no rule, no access
    admin = rule_for(np, naming.ADMIN_PORT)
    # One peer holding both selectors = namespace AND labels (two peers would mean OR).
    assert admin["from"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ops"}},
            "podSelector": {"matchLabels": {"app": "loraplex-op", "release": "lp"}},
        }
    ]
    assert "from" not in rule_for(np, naming.PUBLIC_PORT)  # anyone


def test_public_from_becomes_peers() -> None:
    np = policy(
        render(
            networkPolicy={
                "publicFrom": [
                    {"namespaceLabels": {"kubernetes.io/metadata.name": "gateway"}},
                    {"podLabels": {"app": "chat-ui"}},
                    {"namespaceLabels": {"team": "b"}, "podLabels": {"role": "client"}},
                ]
            }
        )
    )
    operator_peer = rule_for(np, naming.ADMIN_PORT)["from"][0]
    assert rule_for(np, naming.PUBLIC_PORT)["from"] == [
        operator_peer,  # it polls GET /v1/adapters on the public port
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}}},
        {"podSelector": {"matchLabels": {"app": "chat-ui"}}},
        {
            "namespaceSelector": {"matchLabels": {"team": "b"}},
            "podSelector": {"matchLabels": {"role": "client"}},
        },
    ]
    assert rule_for(np, naming.ADMIN_PORT)["from"][0]["podSelector"]["matchLabels"]["app"] == (
        "loraplex-op"
    )


def test_opening_the_public_port_again_is_seen_as_drift() -> None:
    """Removing publicFrom only drops a `from`; the spec hash makes that a difference the
    operator's drift check (subset comparison) sees, so the cluster is patched."""
    restricted = policy(render(networkPolicy={"publicFrom": [{"podLabels": {"a": "b"}}]}))
    opened = policy(render())
    assert not drifted(restricted, restricted)
    assert drifted(opened, restricted)
    assert drifted(restricted, opened)
    bare = copy.deepcopy(opened)
    del bare["metadata"]["annotations"]
    assert not drifted(bare, restricted), "without the hash the change would go unseen"


def test_disabled_renders_no_policy() -> None:
    assert not [o for o in render(networkPolicy={"enabled": False}) if o["kind"] == "NetworkPolicy"]


@pytest.mark.parametrize("version", ["1.30.0", kubernetes_validate.latest_version()])
@pytest.mark.parametrize(
    "spec",
    [{}, {"networkPolicy": {"publicFrom": [{"namespaceLabels": {"a": "b"}, "podLabels": {}}]}}],
    ids=["default", "peers"],
)
def test_policy_passes_kubernetes_schemas(version: str, spec: dict[str, Any]) -> None:
    kubernetes_validate.validate(policy(render(**spec)), version, strict=True)


def test_peer_without_selectors_is_refused() -> None:
    base, adapters = example()
    raw = {**base["spec"], "networkPolicy": {"publicFrom": [{}]}}
    d = decide(OWNER, raw, adapters, token="t", previous=None)
    assert d.invalid is not None and not d.objects
    assert "spec.networkPolicy.publicFrom[0]" in str(d.invalid)
    assert "namespaceLabels, podLabels or both" in str(d.invalid)


def test_crd_refuses_a_peer_without_selectors() -> None:
    good = {"model": {"source": "hf://a/b"}, "networkPolicy": {"publicFrom": [{"podLabels": {}}]}}
    bad = {"model": {"source": "hf://a/b"}, "networkPolicy": {"publicFrom": [{}]}}
    obj = {"apiVersion": "loraplex.io/v1alpha1", "kind": "BaseModel", "metadata": {"name": "x"}}
    assert not schema_errors("BaseModel", {**obj, "spec": good})
    assert not cel_errors("BaseModel", {**obj, "spec": good})
    assert cel_errors("BaseModel", {**obj, "spec": bad}) == [
        ".spec.networkPolicy.publicFrom[0]: has(self.namespaceLabels) || has(self.podLabels)"
    ]


def test_render_cli_takes_the_operator_pods(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--operator-namespace", "ops", "--operator-pod-labels", "b=2,a=1"]
    assert main(["render", "-f", str(ROOT / "examples"), *args]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    np = next(d for d in docs if d["kind"] == "NetworkPolicy")
    assert rule_for(np, naming.ADMIN_PORT)["from"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ops"}},
            "podSelector": {"matchLabels": {"a": "1", "b": "2"}},
        }
    ]


@pytest.mark.parametrize("text", ["", "a", "=b", "a=1,,=2"])
def test_bad_label_flags_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_labels(text)


def test_operator_namespace_defaults_to_pod_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    from loraplex.cli import build_parser

    monkeypatch.setenv("POD_NAMESPACE", "where-i-run")
    args = build_parser().parse_args(["operator"])
    assert args.operator_namespace == "where-i-run"
    assert dict(args.operator_pod_labels) == dict(OperatorPods().labels)
    monkeypatch.delenv("POD_NAMESPACE")
    assert build_parser().parse_args(["operator"]).operator_namespace == "loraplex-system"
