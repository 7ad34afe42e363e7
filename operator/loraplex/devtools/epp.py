"""The endpoint picker's lora-affinity rule, applied to pods' real `/metrics`, for tests and
benchmarks that show adapter-affinity routing without a cluster.

The EPP itself (llm-d router, Go) is not run here; its published rule is restated, from
llm-d-router `pkg/epp/framework/plugins/scheduling/scorer/loraaffinity/lora_affinity.go`:
a pod scores 1.0 when the requested adapter is active (running) there, 0.8 when
running + waiting adapters < max_lora, 0.6 when the adapter is waiting there, else 0. The
highest score wins; equal scores are broken at random, as the EPP's max-score picker does.
What it reads is parsed the way its metrics extractor does (`vllm:lora_requests_info` labels,
comma-separated, trimmed; the series with the newest timestamp value wins).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

LORA_INFO = "vllm:lora_requests_info"


@dataclass(frozen=True)
class PodMetrics:
    """What the lora-affinity scorer and the queue scorer read from one pod."""

    max_lora: int = 0
    running: frozenset[str] = frozenset()
    waiting: frozenset[str] = frozenset()
    queue: float = 0.0


def _names(csv: str) -> frozenset[str]:
    return frozenset(n.strip() for n in csv.split(",") if n.strip())


def parse_pod_metrics(text: str) -> PodMetrics:
    newest: tuple[float, dict[str, str]] | None = None
    queue = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == LORA_INFO:
            for s in family.samples:
                if newest is None or s.value > newest[0]:
                    newest = (s.value, s.labels)
        elif family.name == "vllm:num_requests_waiting":
            queue = sum(s.value for s in family.samples)
    if newest is None:
        return PodMetrics(queue=queue)
    labels = newest[1]
    return PodMetrics(
        max_lora=int(labels.get("max_lora", "0") or 0),
        running=_names(labels.get("running_lora_adapters", "")),
        waiting=_names(labels.get("waiting_lora_adapters", "")),
        queue=queue,
    )


def lora_affinity_score(pod: PodMetrics, adapter: str) -> float:
    """The scorer's rule, case for case, in its order."""
    if adapter in pod.running:
        return 1.0
    if len(pod.running) + len(pod.waiting) < pod.max_lora:
        return 0.8
    if adapter in pod.waiting:
        return 0.6
    return 0.0


def pick(pods: Mapping[str, PodMetrics], adapter: str, rng: random.Random) -> str:
    """The pod with the highest lora-affinity score; ties at random."""
    scores = {name: lora_affinity_score(m, adapter) for name, m in pods.items()}
    best = max(scores.values())
    return rng.choice(sorted(n for n, s in scores.items() if s == best))


@dataclass
class Picker:
    """Scrapes every pod's `/metrics` each `period` seconds, as the EPP does, and picks."""

    pods: Sequence[str]  # base URLs
    period: float = 0.05
    seed: int = 1
    metrics: dict[str, PodMetrics] = field(default_factory=dict)
    _rng: random.Random = field(init=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self.metrics = {p: PodMetrics() for p in self.pods}

    async def scrape(self, session: aiohttp.ClientSession) -> None:
        async def one(pod: str) -> None:
            async with session.get(pod + "/metrics") as resp:
                self.metrics[pod] = parse_pod_metrics(await resp.text())

        await asyncio.gather(*(one(p) for p in self.pods))

    async def _loop(self, session: aiohttp.ClientSession) -> None:
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                await self.scrape(session)
            await asyncio.sleep(self.period)

    def start(self, session: aiohttp.ClientSession) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(session))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def pick(self, adapter: str) -> str:
        return pick(self.metrics, adapter, self._rng)
