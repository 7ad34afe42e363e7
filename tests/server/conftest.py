"""The one real CPU vLLM + loraplex-server pair the `vllm` tests share (started once).

vLLM runs as the pod runs it (`--max-loras 2 --max-lora-rank 8 --max-cpu-loras 4`), and the
server as a separate process on loopback ports; tests drive it with the `openai` client and
the admin API. The pair is left healthy after every test, including the one that kills vLLM.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from loraplex.devtools.processes import Managed, start_server, start_vllm, wait_http

from .helpers import TOKEN, manifest_doc, pvc_adapter

PROMPT = "select name from"
MAX_TOKENS = 8


@dataclass
class Stack:
    vllm: Managed
    server: Managed
    admin: str
    model: Path
    pvc_root: Path
    root: Path
    vllm_port: int
    generation: int = 1
    adapters: list[dict[str, Any]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.server.url

    def push(self, adapters: list[dict[str, Any]]) -> dict[str, Any]:
        """PUT the next manifest generation to the admin port, as the operator does."""
        self.generation += 1
        self.adapters = adapters
        body = json.dumps(manifest_doc(adapters, self.generation)).encode()
        req = urllib.request.Request(
            f"{self.admin}/admin/manifest",
            data=body,
            method="PUT",
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            result: dict[str, Any] = json.loads(resp.read())
            return result

    def report(self) -> dict[str, dict[str, Any]]:
        with urllib.request.urlopen(f"{self.url}/v1/adapters", timeout=10) as resp:
            return {a["name"]: a for a in json.loads(resp.read())["adapters"]}

    def restart_vllm(self) -> None:
        self.vllm.stop()
        self.vllm = start_vllm(
            self.model, "tiny", port=self.vllm_port, log_path=self.root / "vllm.log"
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        wait_http(self.server, "/readyz", timeout)


INITIAL = [pvc_adapter("ad0", pinned=True)] + [pvc_adapter(f"ad{i}") for i in range(1, 6)]


@pytest.fixture(scope="session")
def stack(
    tiny_model: Path, tiny_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    from loraplex.devtools.processes import free_port

    root = tmp_path_factory.mktemp("stack")
    pvc_root = tiny_adapters["ad0"].parent.parent
    port = free_port()
    vllm = start_vllm(tiny_model, "tiny", port=port, log_path=root / "vllm.log")
    (root / "manifest.json").write_text(json.dumps(manifest_doc(INITIAL, 1)))
    (root / "token").write_text(TOKEN)
    try:
        server, admin = start_server(
            vllm_url=vllm.url,
            manifest=root / "manifest.json",
            cache_dir=root / "cache",
            pvc_root=pvc_root,
            admin_token_file=root / "token",
            log_path=root / "server.log",
            extra_args=[
                "--load-timeout",
                "30",
                "--download-attempts",
                "2",
                "--download-backoff",
                "0.2",
                "--download-read-timeout",
                "2",
            ],
        )
    except BaseException:
        vllm.stop()
        raise
    s = Stack(vllm, server, admin, tiny_model, pvc_root, root, port, adapters=list(INITIAL))
    try:
        s.wait_ready()
        yield s
    finally:
        server.stop()
        s.vllm.stop()


@pytest.fixture(scope="session")
def expected(stack: Stack, tiny_adapters: dict[str, Path]) -> dict[str, list[int]]:
    """Greedy tokens through the server for the base ("tiny") and every adapter.

    test_greedy_tokens_match_vllm_direct_and_reference checks these against vLLM direct and
    transformers+peft; the other tests check that rotation and concurrency do not change them.
    """
    import openai

    c = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=60)
    out: dict[str, list[int]] = {}
    for name in ["tiny", *tiny_adapters]:
        if name not in {a["servedName"] for a in stack.adapters} | {"tiny"}:
            continue
        r = c.completions.create(
            model=name,
            prompt=PROMPT,
            max_tokens=MAX_TOKENS,
            temperature=0,
            extra_body={"return_token_ids": True},
        )
        out[name] = r.choices[0].to_dict()["token_ids"]
    return out


def wait_until(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)
