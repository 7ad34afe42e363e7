"""The one module that calls vLLM's own API: health and runtime LoRA load/unload.

vLLM 0.32 answers a second load of a name with 400 "has already been loaded" and an unload of
an unknown name with 404 "cannot be found"; both mean the state we asked for already holds,
so they count as success. Anything else from vLLM on load is the adapter's fault (500 with the
engine's message) and becomes a `LoadFailed`; no answer at all means vLLM is down.
"""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp

from loraplex_server import errors


class VLLMClient:
    def __init__(self, base_url: str, session: aiohttp.ClientSession) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = session

    async def healthy(self, seconds: float = 1.0) -> bool:
        try:
            async with self.session.get(
                f"{self.base_url}/health", timeout=aiohttp.ClientTimeout(total=seconds)
            ) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError, ConnectionError):
            return False

    async def _post(self, path: str, body: dict[str, object], seconds: float) -> tuple[int, str]:
        try:
            async with self.session.post(
                f"{self.base_url}{path}",
                json=body,
                timeout=aiohttp.ClientTimeout(total=seconds),
            ) as resp:
                return resp.status, await resp.text()
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
            raise errors.VLLMUnavailable(f"vLLM {path}: {type(exc).__name__}: {exc}") from exc

    async def load(self, lora_name: str, path: Path, seconds: float = 120.0) -> None:
        status, text = await self._post(
            "/v1/load_lora_adapter", {"lora_name": lora_name, "lora_path": str(path)}, seconds
        )
        if status == 200 or (status == 400 and "already been loaded" in text):
            return
        if status in (502, 503, 504):
            raise errors.VLLMUnavailable(f"vLLM load answered {status}")
        raise errors.AdapterError(errors.LOAD_FAILED, f"vLLM refused the adapter: {_msg(text)}")

    async def unload(self, lora_name: str, seconds: float = 30.0) -> None:
        status, text = await self._post(
            "/v1/unload_lora_adapter", {"lora_name": lora_name}, seconds
        )
        if status in (200, 404):
            return
        raise errors.VLLMUnavailable(f"vLLM unload answered {status}: {_msg(text)}")


def _msg(text: str) -> str:
    try:
        body = json.loads(text)
        return str(body.get("error", {}).get("message") or body.get("message") or text)[:500]
    except (ValueError, AttributeError):
        return text[:500]
