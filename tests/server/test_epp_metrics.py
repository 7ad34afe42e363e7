"""The metric families the endpoint picker reads (issue 13.2), built by `epp_metrics.merge`.

| case | checks |
|---|---|
| vLLM text present | all vLLM families but two pass unchanged; prometheus_client parses it |
| lora_requests_info | ours: loaded = running, loading for a request = waiting, max_lora |
| num_requests_waiting | vLLM's queue plus the requests we hold while an adapter loads |
| vLLM unreachable | the two families are still exported |
| cost | a merge of a realistic exposition stays well under the EPP's 50 ms scrape period |
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from loraplex_server.epp_metrics import LoraState, merge

STATE = LoraState(max_lora=4, running=("sql", "chat"), waiting=("legal",), held_requests=3)


def vllm_exposition(waiting: float = 2, lora_running: str = "sql") -> str:
    """What vLLM's prometheus_client registry writes (same library, same text format)."""
    r = CollectorRegistry()
    labels = {"engine": "0", "model_name": "base"}
    Gauge("vllm:num_requests_running", "Running.", list(labels), registry=r).labels(**labels).set(5)
    Gauge("vllm:num_requests_waiting", "Waiting.", list(labels), registry=r).labels(**labels).set(
        waiting
    )
    Gauge("vllm:kv_cache_usage_perc", "KV usage.", list(labels), registry=r).labels(**labels).set(
        0.42
    )
    info = ["max_lora", "running_lora_adapters", "waiting_lora_adapters"]
    Gauge("vllm:lora_requests_info", "LoRA.", info, registry=r).labels(
        max_lora="2", running_lora_adapters=lora_running, waiting_lora_adapters=""
    ).set(1.7e9)
    Counter("vllm:prompt_tokens", "Prompt tokens.", list(labels), registry=r).labels(**labels).inc(
        1234
    )
    h = Histogram("vllm:time_to_first_token_seconds", "TTFT.", list(labels), registry=r)
    h.labels(**labels).observe(0.05)
    return generate_latest(r).decode()


def families(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        assert fam.name not in out, f"family {fam.name} exported twice"
        out[fam.name] = [(s.labels, s.value) for s in fam.samples]
    return out


def test_lora_info_is_ours_and_lists_loaded_adapters_as_running() -> None:
    fams = families(merge(vllm_exposition(), STATE, now=1.8e9))
    ((labels, value),) = fams["vllm:lora_requests_info"]
    assert labels == {
        "max_lora": "4",
        "running_lora_adapters": "sql,chat",
        "waiting_lora_adapters": "legal",
    }
    assert value == 1.8e9  # a timestamp: the EPP keeps the newest series


def test_waiting_counts_requests_held_for_a_load() -> None:
    fams = families(merge(vllm_exposition(waiting=2), STATE, now=1.0))
    ((labels, value),) = fams["vllm:num_requests_waiting"]
    assert value == 2 + 3
    assert labels == {"engine": "0", "model_name": "base"}


def test_other_vllm_families_pass_through_unchanged() -> None:
    text = vllm_exposition()
    original = families(text)
    merged = families(merge(text, STATE, now=1.0))
    for name, samples in original.items():
        if name in ("vllm:lora_requests_info", "vllm:num_requests_waiting"):
            continue
        assert merged[name] == samples, name
    assert merged["vllm:kv_cache_usage_perc"] == [({"engine": "0", "model_name": "base"}, 0.42)]


def test_vllm_unreachable_still_exports_adapters_and_queue() -> None:
    fams = families(merge(None, STATE, now=1.0))
    assert fams["vllm:num_requests_waiting"] == [({}, 3.0)]
    assert fams["vllm:lora_requests_info"][0][0]["running_lora_adapters"] == "sql,chat"


def test_nothing_held_leaves_vllm_waiting_as_is() -> None:
    idle = LoraState(max_lora=2, running=(), waiting=(), held_requests=0)
    fams = families(merge(vllm_exposition(waiting=7), idle, now=1.0))
    assert fams["vllm:num_requests_waiting"][0][1] == 7
    assert fams["vllm:lora_requests_info"][0][0]["running_lora_adapters"] == ""


def test_merge_is_cheap_enough_for_a_50ms_scrape() -> None:
    # A large exposition: vLLM's families plus many histogram series, about 200 kB.
    big = vllm_exposition() + "".join(f"vllm:filler_{i} {i}\n" for i in range(8000))
    t0 = time.perf_counter()
    for _ in range(50):
        merge(big, STATE, now=1.0)
    per_scrape = (time.perf_counter() - t0) / 50
    assert per_scrape < 0.002, f"{per_scrape * 1e3:.2f} ms per scrape"
