"""Ready means proven, against real CPU vLLM (issue 16).

One manifest declares a good adapter, an untrained one (lora_B all zero), one whose target
module does not exist in the base, and the shared stack's adapters beside them. Shown:
the bad-module adapter is refused before any load (IncompatibleBaseModel), the untrained one
is loaded, probed and refused (NoEffect, with both numbers), the good one is proven with the
probe's figures, the others keep serving, equal files are never probed twice while new
files are, and the probe's cost on the hot-add path (apply -> first completion).
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from .adapters_fixtures import base_modules_of, rewrite
from .conftest import INITIAL, Stack, wait_until
from .helpers import TOKEN, manifest_doc, pvc_adapter

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]


def push(stack: Stack, adapters: list[dict[str, Any]], **kw: Any) -> None:
    stack.generation += 1
    stack.adapters = adapters
    body = json.dumps(manifest_doc(adapters, stack.generation, **kw)).encode()
    req = urllib.request.Request(
        f"{stack.admin}/admin/manifest",
        data=body,
        method="PUT",
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    urllib.request.urlopen(req, timeout=10).close()


def complete(stack: Stack, model: str) -> int:
    body = json.dumps({"model": model, "prompt": "select", "max_tokens": 2}).encode()
    req = urllib.request.Request(
        f"{stack.url}/v1/completions", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def probes(stack: Stack) -> float:
    with urllib.request.urlopen(f"{stack.url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("loraplex_server_adapter_probes_total{")
    )


@pytest.fixture
def claim(stack: Stack, tiny_adapters: dict[str, Path]) -> Path:
    root = stack.pvc_root / "adapters"
    if not (root / "zero-b").exists():
        rewrite(tiny_adapters["ad7"], root / "zero-b", zero_b=True)
        rewrite(tiny_adapters["ad5"], root / "bad-target", rename="query_key_value")
        shutil.copytree(tiny_adapters["ad6"], root / "ad6-copy")
    return root


def test_only_adapters_that_change_outputs_become_ready(stack: Stack, claim: Path) -> None:
    modules = base_modules_of(stack.model)
    checks: dict[str, Any] = {"probe": True}
    adapters = [
        pvc_adapter("ad0", pinned=True),
        pvc_adapter("ad1"),
        pvc_adapter("ad6"),
        pvc_adapter("zero-b"),
        pvc_adapter("bad-target"),
    ]
    try:
        push(stack, adapters, max_cpu_loras=4, baseModules=modules, checks=checks)
        wait_until(
            lambda: all(a["state"] == "failed" or a.get("proof") for a in stack.report().values()),
            timeout=120,
        )
        rep = stack.report()
        bad = rep["bad-target"]
        assert (bad["state"], bad["reason"]) == ("failed", "IncompatibleBaseModel")
        assert "query_key_value" in bad["message"] and bad["loadSeconds"] is None
        zero = rep["zero-b"]
        assert (zero["state"], zero["reason"]) == ("failed", "NoEffect")
        assert "tolerance 0.001" in zero["message"]
        assert zero["proof"]["effect"] is False and zero["proof"]["maxLogprobDelta"] == 0
        good = rep["ad6"]["proof"]
        assert good["effect"] is True
        assert good["maxLogprobDelta"] is None or good["maxLogprobDelta"] > 0.001
        assert 0 < good["seconds"] < 10
        # The good ones keep serving beside the refused ones.
        assert [complete(stack, m) for m in ("ad0", "ad1", "ad6", "tiny")] == [200] * 4
        assert complete(stack, "zero-b") == 503

        # Equal files under another name: the digest's proof is reused, no new probe.
        before = probes(stack)
        push(
            stack,
            [*adapters, pvc_adapter("ad6-copy")],
            max_cpu_loras=4,
            baseModules=modules,
            checks=checks,
        )
        wait_until(lambda: stack.report()["ad6-copy"].get("proof") is not None, timeout=60)
        assert stack.report()["ad6-copy"]["proof"]["digest"] == rep["ad6"]["digest"]
        assert probes(stack) == before
    finally:
        push(stack, list(INITIAL))
        stack.wait_ready()


def hot_add_seconds(stack: Stack, name: str, probe: bool) -> float:
    adapters = [*INITIAL[:2], pvc_adapter(name)]
    t0 = time.perf_counter()
    push(stack, adapters, max_cpu_loras=4, checks={"probe": probe})
    wait_until(lambda: complete(stack, name) == 200, timeout=60)
    return time.perf_counter() - t0


def test_probe_cost_on_the_hot_add_path(stack: Stack) -> None:
    try:
        without = hot_add_seconds(stack, "ad3", probe=False)
        with_probe = hot_add_seconds(stack, "ad4", probe=True)
        proof = stack.report()["ad4"]["proof"]
        print(
            f"\nhot add apply->first completion: without probe {without:.3f}s, with probe "
            f"{with_probe:.3f}s (probe itself {proof['seconds']:.3f}s)"
        )
        assert proof["effect"] is True
        # The probe is two short greedy requests: on CPU vLLM well under two seconds.
        assert proof["seconds"] < 2.0
        assert with_probe - without < 3.0
    finally:
        push(stack, list(INITIAL))
        stack.wait_ready()
