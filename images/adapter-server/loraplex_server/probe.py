"""Proving that a loaded adapter changes the model's output.

An untrained PEFT adapter (B = 0) or one whose modules vLLM ignored loads fine and then
serves exactly the base model's answers. After a load, one short greedy request with top
logprobs goes through the adapter and (once per vLLM start) through the base, on a fixed
prompt; if every compared logprob is within the tolerance the adapter has no effect. The
result is kept per adapter digest, so reloading the same files never probes again and new
files always do. Cost: two requests of `PROBE_TOKENS` tokens, bounded by `seconds`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import aiohttp

from loraplex_server import errors
from loraplex_server.manifest import ProbeResult

PROBE_PROMPT = "The following is a short answer to a simple question:"
PROBE_TOKENS = 4
TOP_LOGPROBS = 5

Positions = list[dict[str, float]]  # per generated token: token -> logprob (top-k)


def max_delta(adapter: Sequence[Mapping[str, float]], base: Sequence[Mapping[str, float]]) -> float:
    """Largest |adapter - base| over tokens both ranked; inf when the rankings diverge."""
    worst = 0.0
    for a, b in zip(adapter, base, strict=False):
        if set(a) != set(b):
            return math.inf
        for token, lp in a.items():
            worst = max(worst, abs(lp - b[token]))
    if len(adapter) != len(base):
        return math.inf
    return worst


@dataclass
class Prober:
    """Runs probes against vLLM; keeps the base's answer for the life of the vLLM process."""

    base_url: str
    session: aiohttp.ClientSession
    seconds: float = 120.0  # a cold CPU vLLM's first LoRA batch can take tens of seconds
    _base: tuple[str, Positions] | None = None

    def forget_base(self) -> None:
        """vLLM restarted (possibly another build): ask the base again next time."""
        self._base = None

    async def _top(self, model: str) -> Positions:
        body = {
            "model": model,
            "prompt": PROBE_PROMPT,
            "max_tokens": PROBE_TOKENS,
            "temperature": 0,
            "logprobs": TOP_LOGPROBS,
        }
        try:
            async with self.session.post(
                f"{self.base_url.rstrip('/')}/v1/completions",
                json=body,
                timeout=aiohttp.ClientTimeout(total=self.seconds),
            ) as resp:
                text = await resp.text()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
            raise errors.VLLMUnavailable(f"probe: {type(exc).__name__}") from exc
        if status != 200:
            if status >= 500:
                raise errors.VLLMUnavailable(f"probe answered {status}")
            raise errors.AdapterError(
                errors.LOAD_FAILED,
                f"the adapter was loaded but a request through it failed ({status})",
            )
        try:
            top = json.loads(text)["choices"][0]["logprobs"]["top_logprobs"]
            return [{str(k): float(v) for k, v in pos.items()} for pos in top]
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise errors.AdapterError(
                errors.LOAD_FAILED, "vLLM's answer to the probe had no logprobs"
            ) from exc

    async def probe(
        self, served_name: str, base: str, digest: str, tolerance: float
    ) -> ProbeResult:
        t0 = time.monotonic()
        if self._base is None or self._base[0] != base:
            self._base = (base, await self._top(base))
        mine = await self._top(served_name)
        delta = max_delta(mine, self._base[1])
        return ProbeResult(
            digest=digest,
            proven_at=datetime.now(UTC),
            seconds=round(time.monotonic() - t0, 4),
            max_logprob_delta=None if math.isinf(delta) else round(delta, 6),
            tolerance=tolerance,
            effect=delta > tolerance,
        )
