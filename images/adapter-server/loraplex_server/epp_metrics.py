"""What the endpoint picker (EPP) reads from a pod's `/metrics`, built from what we know.

The Gateway API Inference Extension's EPP (llm-d router) scrapes each pod of an
InferencePool at its target port, which is our public port, every ~50 ms. Its metric
protocol (llm-d-router docs/plugin-metric-protocol.md) wants vLLM's families:
`vllm:num_requests_waiting`, `vllm:num_requests_running`, `vllm:kv_cache_usage_perc`, and
`vllm:lora_requests_info{max_lora, running_lora_adapters, waiting_lora_adapters}` whose
value is a timestamp (the EPP keeps the newest series). Its `lora-affinity-scorer` gives a
pod 1.0 when the adapter is running there, 0.8 when running+waiting < max_lora, 0.6 when
the adapter is waiting there, else 0.

vLLM's own families pass through unchanged except two, which only we can tell right:
- `vllm:lora_requests_info`: vLLM lists only adapters with requests in flight, so a loaded
  but idle adapter looks cold and the EPP would send its next request elsewhere (a needless
  load). Ours lists every adapter loaded in vLLM as running, adapters being loaded for a
  waiting request as waiting, and `max_lora` = how many we keep resident (maxCpuLoras).
- `vllm:num_requests_waiting`: vLLM does not see the requests we hold while their adapter
  loads; they are added, so queue-based scorers and autoscalers see the real queue.

Cheap on purpose: vLLM's text is spliced with `str.find` over whole family blocks (C
speed), never parsed line by line in Python.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp

from loraplex_server.manifest import AdapterState
from loraplex_server.registry import Registry

LORA_INFO = "vllm:lora_requests_info"
WAITING = "vllm:num_requests_waiting"
RUNNING = "vllm:num_requests_running"
KV_USAGE = "vllm:kv_cache_usage_perc"

# vLLM's gauges that the EPP and our Grafana panels read through this port, with the labels
# vLLM gives them (vllm/v1/metrics/loggers.py); a real-vLLM test checks they still come
# through, and the dashboard test checks panels against this list.
VLLM_GAUGES: dict[str, frozenset[str]] = {
    WAITING: frozenset({"model_name", "engine"}),
    RUNNING: frozenset({"model_name", "engine"}),
    KV_USAGE: frozenset({"model_name", "engine"}),
}


@dataclass(frozen=True)
class LoraState:
    """This pod's adapters as the EPP should see them."""

    max_lora: int = 0
    running: tuple[str, ...] = ()
    waiting: tuple[str, ...] = ()
    held_requests: int = 0

    def to_json(self) -> dict[str, Any]:
        """For the owner's status, which worker processes copy (they hold no registry)."""
        return {
            "maxLora": self.max_lora,
            "running": list(self.running),
            "waiting": list(self.waiting),
            "held": self.held_requests,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LoraState:
        return cls(
            max_lora=int(d.get("maxLora", 0)),
            running=tuple(d.get("running", ())),
            waiting=tuple(d.get("waiting", ())),
            held_requests=int(d.get("held", 0)),
        )


def _block(text: str, family: str) -> tuple[int, int] | None:
    """[start, end) of a family's lines in prometheus_client's text format, if present.

    prometheus_client (vLLM's exporter) opens every family with a `# HELP` line, so a block
    runs from its HELP line to the next one.
    """
    start = text.find(f"# HELP {family} ")
    if start < 0 or (start > 0 and text[start - 1] != "\n"):
        return None
    stop = text.find("\n# HELP ", start)
    return start, len(text) if stop < 0 else stop + 1


def _without(text: str, family: str) -> str:
    span = _block(text, family)
    return text if span is None else text[: span[0]] + text[span[1] :]


def _add_to_first_sample(block: str, family: str, extra: int) -> str:
    """Add `extra` to the first sample of a gauge block (vLLM has one per engine)."""
    lines = block.split("\n")
    for i, line in enumerate(lines):
        if line.startswith(family) and not line.startswith(family + "_"):
            name, _, value = line.rpartition(" ")
            try:
                lines[i] = f"{name} {float(value) + extra}"
            except ValueError:
                return block
            return "\n".join(lines)
    return block


def _label(values: Iterable[str]) -> str:
    # Served names match [A-Za-z0-9._:-]: no quote, backslash, comma or newline to escape.
    return ",".join(values)


def lora_info_block(state: LoraState, now: float) -> str:
    return (
        f"# HELP {LORA_INFO} Running and waiting LoRA adapters (loraplex: loaded = running).\n"
        f"# TYPE {LORA_INFO} gauge\n"
        f'{LORA_INFO}{{max_lora="{state.max_lora}",'
        f'running_lora_adapters="{_label(state.running)}",'
        f'waiting_lora_adapters="{_label(state.waiting)}"}} {now}\n'
    )


def merge(vllm_text: str | None, state: LoraState, now: float) -> str:
    """vLLM's exposition with our LoRA info and our held requests spliced in.

    With vLLM unreachable (None) the two families are still exported, so the EPP sees the
    pod's adapters and queue rather than an empty scrape.
    """
    text = vllm_text or ""
    if text and not text.endswith("\n"):
        text += "\n"
    text = _without(text, LORA_INFO)
    span = _block(text, WAITING)
    if span is None:
        text += (
            f"# HELP {WAITING} Requests waiting (held by loraplex while an adapter loads).\n"
            f"# TYPE {WAITING} gauge\n{WAITING} {float(state.held_requests)}\n"
        )
    elif state.held_requests:
        start, stop = span
        block = _add_to_first_sample(text[start:stop], WAITING, state.held_requests)
        text = text[:start] + block + text[stop:]
    return text + lora_info_block(state, now)


def lora_state(registry: Registry) -> LoraState:
    """Loaded adapters are running; adapters that requests wait on are waiting."""
    running: list[str] = []
    waiting: list[str] = []
    held = 0
    for e in registry.entries.values():
        if e.state == AdapterState.LOADED:
            running.append(e.spec.served_name)
        elif e.inflight > 0:
            waiting.append(e.spec.served_name)
            held += e.inflight
    return LoraState(
        max_lora=registry.manifest.max_cpu_loras,
        running=tuple(sorted(running)),
        waiting=tuple(sorted(waiting)),
        held_requests=held,
    )


class VLLMMetrics:
    """vLLM's `/metrics` text, fetched at most once per `max_age` seconds (single flight).

    The EPP scrapes every pod every ~50 ms; without this each scrape would cost vLLM's API
    server a full render of its registry.
    """

    def __init__(self, session: aiohttp.ClientSession, url: str, max_age: float = 0.1) -> None:
        self._session = session
        self._url = url.rstrip("/") + "/metrics"
        self._max_age = max_age
        self._text: str | None = None
        self._at = -1e9
        self._lock = asyncio.Lock()

    async def get(self) -> str | None:
        if time.monotonic() - self._at < self._max_age:
            return self._text
        async with self._lock:
            if time.monotonic() - self._at < self._max_age:
                return self._text
            try:
                async with self._session.get(
                    self._url, timeout=aiohttp.ClientTimeout(total=2)
                ) as resp:
                    self._text = await resp.text() if resp.status == 200 else None
            except (aiohttp.ClientError, TimeoutError):
                self._text = None
            self._at = time.monotonic()
            return self._text
