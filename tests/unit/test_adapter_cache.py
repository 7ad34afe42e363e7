"""The operator's LoRAAdapter cache: which events are worth a reconcile, and what it keeps."""

from __future__ import annotations

import copy
from typing import Any

from loraplex.reconcile import AdapterCache


def adapter(name: str = "a", base: str = "b1", **extra: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "loraplex.io/v1alpha1",
        "kind": "LoRAAdapter",
        "metadata": {
            "name": name,
            "namespace": "ns",
            "uid": "u-1",
            "generation": 1,
            "resourceVersion": "10",
            "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}],
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "x" * 1000},
        },
        "spec": {"baseModel": base, "source": "hf://org/a", "rank": 8},
    }
    obj.update(extra)
    return obj


def test_new_changed_moved_and_deleted_adapters_name_their_basemodels() -> None:
    cache = AdapterCache()
    assert cache.apply("ADDED", adapter()) == {"b1"}
    changed = adapter()
    changed["spec"]["rank"] = 16
    assert cache.apply("MODIFIED", changed) == {"b1"}
    assert cache.apply("MODIFIED", adapter(base="b2")) == {"b1", "b2"}, "old and new base"
    going = adapter(base="b2")
    going["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert cache.apply("MODIFIED", going) == {"b2"}
    assert cache.apply("DELETED", going) == {"b2"}
    assert cache.of("ns", "b2") == [] and len(cache) == 0


def test_status_only_changes_and_relists_are_not_worth_a_pass() -> None:
    """Our own status write comes back as a MODIFIED event; kopf's initial listing repeats
    what the startup list primed. Neither changes a manifest, so neither costs a pass."""
    cache = AdapterCache()
    cache.prime([adapter()])
    assert cache.apply("", adapter()) == set(), "the initial listing after the prime"
    written = adapter(status={"phase": "Pending"})
    written["metadata"]["resourceVersion"] = "11"
    assert cache.apply("MODIFIED", written) == set()
    assert cache.of("ns", "b1")[0]["status"] == {"phase": "Pending"}, "status still kept"
    assert cache.of("ns", "b1")[0]["metadata"]["resourceVersion"] == "11"


def test_the_cache_keeps_only_what_a_reconcile_reads() -> None:
    original = adapter(status={"phase": "Ready"})
    kept = copy.deepcopy(original)
    cache = AdapterCache()
    cache.apply("ADDED", original)
    (cached,) = cache.of("ns", "b1")
    assert "managedFields" not in cached["metadata"]
    assert "annotations" not in cached["metadata"]
    for key in ("name", "namespace", "uid", "generation", "resourceVersion"):
        assert cached["metadata"][key] == kept["metadata"][key]
    assert cached["spec"] == kept["spec"] and cached["status"] == kept["status"]
    assert original == kept, "the event's object is not changed"


def test_an_adapter_without_a_basemodel_is_not_cached() -> None:
    cache = AdapterCache()
    cache.apply("ADDED", adapter())
    orphan = adapter()
    del orphan["spec"]["baseModel"]
    assert cache.apply("MODIFIED", orphan) == {"b1"}, "its old BaseModel lets it go"
    assert cache.apply("MODIFIED", orphan) == set()
    assert len(cache) == 0
