"""The emulator refuses what a real kube-apiserver refuses, over real HTTP.

Matrix: ConfigMap data over 1 MiB (create, and a patch that grows one past it), Secret data
over 1 MiB, a request body over 3 MiB, a name over 253 characters, a label value over 63, a
Deployment selector change: each answered with the API server's code, reason and message;
the same objects just under each limit are accepted; the operator's own sharded manifest for
10,000 adapters is accepted.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest

from loraplex.devtools import apilimits
from loraplex.devtools.emulator import RunningEmulator
from loraplex.kube import CONFIGMAPS, DEPLOYMENTS, SECRETS, KubeClient, KubeError
from loraplex.render import Owner, build_manifest_configmaps
from tests.server.test_manifest_shards import big_manifest

MIB = 1024 * 1024
NS = "default"


def cm(name: str, **body: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, **body}


async def refused(call: Any) -> KubeError:
    with pytest.raises(KubeError) as info:
        await call
    return info.value


async def test_configmap_over_one_mib_is_refused(kube: KubeClient) -> None:
    err = await refused(kube.create(CONFIGMAPS, NS, cm("big", data={"k": "x" * (MIB + 1)})))
    assert err.status == 422
    assert 'ConfigMap "big" is invalid: []: Too long: must have at most 1048576 bytes' in str(err)
    await kube.create(CONFIGMAPS, NS, cm("fits", data={"k": "x" * (MIB - 10)}))
    # A patch is judged on the object it would leave behind.
    await kube.create(CONFIGMAPS, NS, cm("grows", data={"a": "x" * (MIB // 2)}))
    err = await refused(kube.patch(CONFIGMAPS, NS, "grows", {"data": {"b": "y" * (MIB // 2 + 1)}}))
    assert err.status == 422 and "Too long" in str(err)
    blob = base64.b64encode(b"\0" * (MIB + 1)).decode()
    err = await refused(kube.create(CONFIGMAPS, NS, cm("bin", binaryData={"b": blob})))
    assert err.status == 422


async def test_secret_over_one_mib_is_refused(kube: KubeClient) -> None:
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}}
    err = await refused(kube.create(SECRETS, NS, {**secret, "stringData": {"t": "x" * MIB}}))
    assert err.status == 422
    assert 'Secret "s" is invalid: data: Too long: must have at most 1048576 bytes' in str(err)


async def test_request_body_over_three_mib_is_refused(kube: KubeClient) -> None:
    # Many keys, each small: the body passes 3 MiB before any one value is long.
    err = await refused(
        kube.create(CONFIGMAPS, NS, cm("huge", data={f"k{i}": "x" * 1000 for i in range(3300)}))
    )
    assert err.status == 413
    assert "Request entity too large" in str(err)


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        pytest.param(cm("n" * 254), "must be no more than 253 characters", id="name-254"),
        pytest.param(
            {**cm("l"), "metadata": {"name": "l", "labels": {"team": "v" * 64}}},
            "metadata.labels: Invalid value",
            id="label-value-64",
        ),
    ],
)
async def test_names_and_label_values_over_their_lengths_are_refused(
    kube: KubeClient, obj: dict[str, Any], message: str
) -> None:
    err = await refused(kube.create(CONFIGMAPS, NS, obj))
    assert err.status == 422 and "is invalid" in str(err)
    full = apilimits.refusal("ConfigMap", 0, obj)  # the whole message (KubeError trims it)
    assert full is not None and message in full.message


async def test_names_and_labels_at_their_limits_are_accepted(kube: KubeClient) -> None:
    await kube.create(CONFIGMAPS, NS, cm("n" * 253))
    ok = {**cm("l"), "metadata": {"name": "l", "labels": {"team": "v" * 63}}}
    await kube.create(CONFIGMAPS, NS, ok)


async def test_deployment_selector_is_immutable(kube: KubeClient) -> None:
    labels = {"app": "a"}
    dep = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "d"},
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {"containers": []}},
        },
    }
    await kube.create(DEPLOYMENTS, NS, dep)
    await kube.patch(DEPLOYMENTS, NS, "d", {"spec": {"replicas": 3}})  # other fields change
    err = await refused(
        kube.patch(DEPLOYMENTS, NS, "d", {"spec": {"selector": {"matchLabels": {"app": "b"}}}})
    )
    assert err.status == 422
    assert 'Deployment.apps "d" is invalid: spec.selector' in str(err)
    assert "field is immutable" in str(err)


async def test_the_sharded_manifest_of_ten_thousand_adapters_is_accepted(
    kube: KubeClient, cluster: RunningEmulator
) -> None:
    objs = build_manifest_configmaps(Owner("qwen", NS, "uid-1"), big_manifest(10_000))
    for obj in objs:
        await kube.create(CONFIGMAPS, NS, obj)
    assert len(cluster.emulator.objects_of("v1/configmaps", NS)) == len(objs) >= 3
