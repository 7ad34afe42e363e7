"""The endpoint picker's view of a pod in front of real CPU vLLM (issue 13.2).

One scrape of the adapter-server's `/metrics` carries vLLM's own families (names, types and
labels as vLLM exports them, so the EPP and Grafana read them unchanged), loraplex's
families, and our `vllm:lora_requests_info`, while adapters load, serve and are evicted.
"""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from loraplex_server.epp_metrics import VLLM_GAUGES

from .conftest import INITIAL, Stack, wait_until

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(300)]


def scrape(stack: Stack) -> dict[str, tuple[str, list[tuple[dict[str, str], float]]]]:
    with urllib.request.urlopen(f"{stack.url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, tuple[str, list[tuple[dict[str, str], float]]]] = {}
    for fam in text_string_to_metric_families(text):
        assert fam.name not in out, f"{fam.name} exported twice"
        out[fam.name] = (fam.type, [(s.labels, s.value) for s in fam.samples])
    return out


def complete(stack: Stack, model: str) -> None:
    import openai

    c = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=60)
    c.completions.create(model=model, prompt="select", max_tokens=2, temperature=0)


def running(stack: Stack) -> set[str]:
    ((labels, _),) = scrape(stack)["vllm:lora_requests_info"][1]
    return {n for n in labels["running_lora_adapters"].split(",") if n}


def test_vllm_families_pass_through_with_their_labels(stack: Stack) -> None:
    complete(stack, "tiny")
    fams = scrape(stack)
    for name, labels in VLLM_GAUGES.items():
        kind, samples = fams[name]
        assert kind == "gauge", name
        assert samples and all(set(lb) == labels for lb, _ in samples), (name, samples)
    # Counters and histograms of vLLM's come through too (a few of many).
    assert fams["vllm:prompt_tokens"][0] == "counter"
    assert fams["vllm:time_to_first_token_seconds"][0] == "histogram"
    assert "loraplex_server_requests" in fams


def test_lora_info_follows_loads_and_evictions(stack: Stack) -> None:
    stack.push(list(INITIAL))  # the shared stack, as conftest starts it: ad0 pinned, cap 2
    stack.wait_ready()
    manifest_max = 2
    complete(stack, "ad1")
    now = running(stack)
    assert "ad1" in now and "ad0" in now  # ad0 is pinned, preloaded
    ((labels, value),) = scrape(stack)["vllm:lora_requests_info"][1]
    assert int(labels["max_lora"]) == manifest_max
    assert value > 1.7e9  # a timestamp, newest wins at the EPP
    for name in ("ad2", "ad3"):
        complete(stack, name)
    wait_until(lambda: running(stack) == {"ad0", "ad3"})
    now = running(stack)
    # Only maxCpuLoras stay loaded: ad1 was evicted for ad2/ad3 and is no longer running.
    assert now == {"ad0", "ad3"}, now
    assert len(now) <= manifest_max
