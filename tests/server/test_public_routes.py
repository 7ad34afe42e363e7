"""The public port reaches only its named routes, however a path is spelled (issue 8, point 1).

Matrix: TRICKS (dot segments plain and percent-encoded, encoded slashes, backslashes, doubled
slashes, NUL and other bytes, case, matrix parameters, absolute-form targets, vLLM's admin and
root routes, wrong methods on inference routes) sent as raw HTTP/1.1 request lines, so no
client library normalizes them first, to the real server in front of a stand-in for vLLM that
records every request it receives. Each must be refused (400/404/405) and nothing but the
server's own health polls may reach the stand-in; in the vllm tier, real vLLM's adapter list
and sleep state are the same before and after the corpus. CONTROLS: the allowed routes arrive at
exactly their constant path, with the query dropped.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from loraplex_server.proxy import INFERENCE_ROUTES, PUBLIC_ROUTES

from .conftest import Stack
from .helpers import free_port, make_settings, manifest_doc, pvc_adapter, run_server

pytestmark = pytest.mark.timeout(120)


@dataclass
class Recorder:
    """A stand-in for vLLM that answers everything and remembers every request line."""

    seen: list[tuple[str, str]] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        await request.read()
        self.seen.append((request.method, request.raw_path))
        if request.raw_path == "/v1/models":
            return web.json_response({"object": "list", "data": [{"id": "tiny"}]})
        usage = {"prompt_tokens": 1, "completion_tokens": 1}
        return web.json_response({"recorded": True, "usage": usage})

    def reached(self) -> list[tuple[str, str]]:
        """Everything except the server's own health polls."""
        return [s for s in self.seen if s != ("GET", "/health")]


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    rec = Recorder()
    runner = web.ServerRunner(web.Server(rec.handle))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    rec.url = f"http://127.0.0.1:{port}"
    try:
        yield rec
    finally:
        await runner.cleanup()


async def raw_request(base: str, method: str, target: str, body: bytes = b"") -> int:
    """Send one request line exactly as written and return the status (0: connection closed)."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        head = (
            f"{method} {target} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode("latin-1") + body)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 10)
        await reader.read()
    finally:
        writer.close()
    parts = line.split()
    return int(parts[1]) if len(parts) > 1 else 0


@dataclass(frozen=True)
class Trick:
    id: str
    method: str
    target: str


ADMIN_BODY = json.dumps({"name": "good", "src": "/tmp", "lora_name": "x", "lora_path": "/tmp"})
_ROOT_ROUTES = (
    "adapters",
    "adapters/good",
    "sleep",
    "wake_up",
    "is_sleeping",
    "reset_prefix_cache",
    "reset_mm_cache",
    "collective_rpc",
    "scale_elastic_ep",
    "is_scaling_elastic_ep",
    "invocations",
    "ping",
    "health",
    "version",
    "server_info",
    "tokenize",
    "detokenize",
    "pooling",
    "classify",
    "score",
    "rerank",
    "load",
    "start_profile",
    "stop_profile",
)
TRICKS: list[Trick] = [
    # vLLM's root routes, directly and through every spelling of "up one level"
    *[Trick(f"root-{r}", "POST", f"/{r}") for r in _ROOT_ROUTES],
    Trick("dotdot-adapters", "POST", "/v1/../adapters"),
    Trick("dotdot-delete-adapter", "DELETE", "/v1/../adapters/good"),
    Trick("dotdot-sleep", "POST", "/v1/../sleep"),
    Trick("dot-dotdot-is-sleeping", "GET", "/v1/./../is_sleeping"),
    Trick("enc-dotdot-reset", "POST", "/v1/%2e%2e/reset_prefix_cache"),
    Trick("enc-DOTDOT-reset", "POST", "/v1/%2E%2E/reset_prefix_cache"),
    Trick("half-enc-dotdot", "POST", "/v1/.%2e/sleep"),
    Trick("enc-slash", "POST", "/v1/..%2fsleep"),
    Trick("enc-slash-upper", "POST", "/v1/..%2Fsleep"),
    Trick("enc-slash-prefix", "POST", "/v1%2f..%2fsleep"),
    Trick("double-enc", "POST", "/v1/%252e%252e/sleep"),
    Trick("backslash", "POST", "/v1\\..\\sleep"),
    Trick("enc-backslash", "POST", "/v1/..%5csleep"),
    Trick("completions-then-up", "POST", "/v1/completions/../../sleep"),
    Trick("completions-dotdot-admin", "POST", "/v1/completions/../load_lora_adapter"),
    Trick("models-up", "GET", "/v1/models/../../is_sleeping"),
    Trick("adapters-up", "GET", "/v1/adapters/../../adapters"),
    Trick("trailing-dot", "POST", "/v1/completions/."),
    Trick("trailing-slash", "POST", "/v1/completions/"),
    Trick("double-slash", "POST", "/v1//completions"),
    Trick("leading-double-slash", "POST", "//v1/completions"),
    Trick("enc-v1", "POST", "/%76%31/completions"),
    Trick("enc-letter", "POST", "/v1/c%6fmpletions"),
    Trick("upper-case", "POST", "/v1/COMPLETIONS"),
    Trick("matrix-param", "POST", "/v1/completions;x=1"),
    Trick("nul", "POST", "/v1/completions%00"),
    Trick("enc-space", "POST", "/v1/completions%20"),
    Trick("unicode-dot", "POST", "/v1/%c0%ae%c0%ae/sleep"),
    Trick("absolute-form-self", "POST", "http://127.0.0.1/v1/../sleep"),
    Trick("absolute-form-inference", "POST", "http://127.0.0.1/v1/completions"),
    Trick("asterisk", "OPTIONS", "*"),
    Trick("relative", "POST", "v1/completions"),
    # vLLM's own runtime LoRA routes and other OpenAI routes we do not expose
    Trick("load-lora", "POST", "/v1/load_lora_adapter"),
    Trick("unload-lora", "POST", "/v1/unload_lora_adapter"),
    Trick("load-lora-dot", "POST", "/v1/./load_lora_adapter"),
    Trick("responses", "POST", "/v1/responses"),
    Trick("responses-get", "GET", "/v1/responses/resp_1"),
    Trick("audio", "POST", "/v1/audio/transcriptions"),
    Trick("v1-score", "POST", "/v1/score"),
    Trick("v1-rerank", "POST", "/v1/rerank"),
    Trick("models-card", "GET", "/v1/models/tiny"),
    # right path, wrong method
    *[
        Trick(f"{m.lower()}{p.replace('/', '-')}", m, p)
        for p in INFERENCE_ROUTES
        for m in ("GET", "PUT", "DELETE", "PATCH")
    ],
    Trick("head-completions", "HEAD", "/v1/completions"),
    Trick("options-completions", "OPTIONS", "/v1/completions"),
    Trick("trace-completions", "TRACE", "/v1/completions"),
    Trick("post-models", "POST", "/v1/models"),
    Trick("delete-models", "DELETE", "/v1/models"),
]


def test_corpus_is_large_and_distinct() -> None:
    assert len(TRICKS) >= 40
    assert len({t.id for t in TRICKS}) == len(TRICKS)
    assert len({(t.method, t.target) for t in TRICKS}) == len(TRICKS)


@pytest.fixture
def pvc_root(tiny_adapters: dict[str, Path]) -> Path:
    return tiny_adapters["ad0"].parent.parent


async def test_no_trick_reaches_vllm(tmp_path: Path, pvc_root: Path, recorder: Recorder) -> None:
    s = make_settings(tmp_path, recorder.url, manifest_doc([pvc_adapter("ad0")]), pvc_root)
    async with run_server(s) as srv:
        statuses = {
            t.id: await raw_request(srv.url, t.method, t.target, ADMIN_BODY.encode())
            for t in TRICKS
        }
        bad = {i: st for i, st in statuses.items() if st not in (400, 404, 405)}
        assert bad == {}, bad
        assert recorder.reached() == []
        assert srv.server.registry.entries["ad0"].state.value != "loaded"


@dataclass(frozen=True)
class Control:
    id: str
    method: str
    target: str
    arrives: tuple[str, str]


CONTROLS = [
    *[Control(p.strip("/").replace("/", "-"), "POST", p, ("POST", p)) for p in INFERENCE_ROUTES],
    Control("query-dropped", "POST", "/v1/completions?x=/../../sleep", ("POST", "/v1/completions")),
    Control("models", "GET", "/v1/models", ("GET", "/v1/models")),
]


@pytest.mark.parametrize("c", CONTROLS, ids=[c.id for c in CONTROLS])
async def test_allowed_routes_arrive_at_their_constant(
    tmp_path: Path, pvc_root: Path, recorder: Recorder, c: Control
) -> None:
    s = make_settings(tmp_path, recorder.url, manifest_doc([]), pvc_root)
    body = json.dumps({"model": "tiny", "prompt": "x"}).encode()
    async with run_server(s) as srv:
        assert await raw_request(srv.url, c.method, c.target, body) == 200
    assert recorder.reached() == [c.arrives]


def test_public_routes_are_only_ours_and_inference() -> None:
    """Guards the allowlist itself: adding a route here must be a deliberate edit."""
    assert PUBLIC_ROUTES == {
        "/healthz": "GET",
        "/readyz": "GET",
        "/metrics": "GET",
        "/v1/models": "GET",
        "/v1/adapters": "GET",
        "/v1/completions": "POST",
        "/v1/chat/completions": "POST",
        "/v1/embeddings": "POST",
    }


@pytest.mark.vllm
@pytest.mark.timeout(600)
def test_real_vllm_state_unchanged_after_corpus(stack: Stack) -> None:
    """The same corpus in front of real CPU vLLM: its adapter list and sleep state hold."""

    def vllm_state() -> tuple[list[str], tuple[int, str]]:
        with urllib.request.urlopen(f"{stack.vllm.url}/v1/models", timeout=10) as r:
            models = sorted(m["id"] for m in json.loads(r.read())["data"])
        try:
            with urllib.request.urlopen(f"{stack.vllm.url}/is_sleeping", timeout=10) as r:
                sleep = (r.status, r.read().decode())
        except urllib.error.HTTPError as exc:  # the route exists only in vLLM's dev mode
            sleep = (exc.code, "")
        return models, sleep

    before = vllm_state()

    async def corpus() -> dict[str, int]:
        return {
            t.id: await raw_request(stack.url, t.method, t.target, ADMIN_BODY.encode())
            for t in TRICKS
        }

    statuses = asyncio.run(corpus())
    assert {i: st for i, st in statuses.items() if st not in (400, 404, 405)} == {}
    after = vllm_state()
    assert after == before
    assert "good" not in after[0]
    if before[1][0] == 200:
        assert json.loads(before[1][1]).get("is_sleeping") is False
