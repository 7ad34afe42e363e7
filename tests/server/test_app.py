"""The server's HTTP behaviour against a fake vLLM (in this process, loopback only).

Matrix: routing (base, adapter, `lora_name`, undeclared 404, streaming relay, usage metrics),
single-flight loads, LRU eviction within the resident cap, pinned never evicted, in-flight never
evicted, load timeout -> 503 Retry-After, failed adapters (rank, vLLM refusal), vLLM death and
return (/readyz within 2 s, reload), manifest by file and by admin PUT (newer only), removal
(unload, cache deleted, PVC untouched), bad input on both ports, secrets not logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from loraplex_server.manifest import AdaptersResponse
from loraplex_server.metrics import METRIC_NAMES

from .helpers import (
    TOKEN,
    FakeVLLM,
    FileServer,
    make_settings,
    manifest_doc,
    pvc_adapter,
    run_server,
    serve_app,
    tar_bytes,
    wait_for,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def pvc_root(tiny_adapters: dict[str, Path]) -> Path:
    return tiny_adapters["ad0"].parent.parent


async def post(url: str, body: Any, **kw: Any) -> tuple[int, Any, dict[str, str]]:
    async with aiohttp.ClientSession() as s:
        data = body if isinstance(body, bytes | str) else json.dumps(body)
        headers = {"Content-Type": "application/json", **kw.pop("headers", {})}
        async with s.post(url, data=data, headers=headers, **kw) as r:
            text = await r.text()
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = text
            return r.status, parsed, dict(r.headers)


async def get(url: str, **kw: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.get(url, **kw) as r:
        text = await r.text()
        try:
            return r.status, json.loads(text)
        except ValueError:
            return r.status, text


async def report(url: str) -> dict[str, dict[str, Any]]:
    _, body = await get(f"{url}/v1/adapters")
    AdaptersResponse.model_validate(body)  # what the operator parses
    return {a["name"]: a for a in body["adapters"]}


def completion(model: str, **kw: Any) -> dict[str, Any]:
    return {"model": model, "prompt": "hi", "max_tokens": 2, **kw}


async def test_routes_base_adapter_lora_name_and_unknown(tmp_path: Path, pvc_root: Path) -> None:
    fake = FakeVLLM()
    async with serve_app(fake.app()) as vurl:
        s = make_settings(tmp_path, vurl, manifest_doc([pvc_adapter("ad0")]), pvc_root)
        async with run_server(s) as srv:
            st, body, _ = await post(f"{srv.url}/v1/completions", completion("tiny"))
            assert (st, body["model"]) == (200, "tiny")
            st, body, _ = await post(f"{srv.url}/v1/completions", completion("ad0", extra=[1]))
            assert (st, body["model"]) == (200, "ad0")
            assert fake.seen_bodies[-1] == completion("ad0", extra=[1])  # untouched
            st, body, _ = await post(
                f"{srv.url}/v1/completions", {"lora_name": "ad0", **completion("tiny")}
            )
            assert (st, body["model"]) == (200, "ad0")
            assert "lora_name" not in fake.seen_bodies[-1]
            st, body, _ = await post(f"{srv.url}/v1/completions", completion("nope"))
            assert st == 404
            assert body["error"]["code"] == "model_not_found"
            assert body["error"]["param"] == "model"
            assert "tiny, ad0" in body["error"]["message"]
            st, models = await get(f"{srv.url}/v1/models")
            assert [m["id"] for m in models["data"]] == ["tiny", "ad0"]
            assert models["data"][1]["parent"] == "tiny"
            metrics = (await get(f"{srv.url}/metrics"))[1]
            assert 'loraplex_server_prompt_tokens_total{adapter="ad0"} 6.0' in metrics
            assert 'loraplex_server_requests_total{adapter="unknown",code="404"} 1.0' in metrics
            for name in METRIC_NAMES:
                assert f"# HELP {name} " in metrics, name


async def test_streaming_is_relayed_and_usage_counted(tmp_path: Path, pvc_root: Path) -> None:
    fake = FakeVLLM()
    async with serve_app(fake.app()) as vurl:
        s = make_settings(tmp_path, vurl, manifest_doc([pvc_adapter("ad0")]), pvc_root)
        async with run_server(s) as srv, aiohttp.ClientSession() as c:
            async with c.post(
                f"{srv.url}/v1/completions", json=completion("ad0", stream=True)
            ) as r:
                assert r.headers["Content-Type"].startswith("text/event-stream")
                raw = await r.read()
            events = [ln for ln in raw.decode().split("\n\n") if ln]
            assert events[-1] == "data: [DONE]"
            assert [json.loads(e[6:])["choices"][:1] for e in events[:2]] == [
                [{"text": "a"}],
                [{"text": "b"}],
            ]
            metrics = (await get(f"{srv.url}/metrics"))[1]
            assert 'loraplex_server_completion_tokens_total{adapter="ad0"} 2.0' in metrics


async def test_concurrent_first_requests_share_one_load(tmp_path: Path, pvc_root: Path) -> None:
    fake = FakeVLLM(load_delay=0.3)
    async with serve_app(fake.app()) as vurl:
        s = make_settings(tmp_path, vurl, manifest_doc([pvc_adapter("ad1")]), pvc_root)
        async with run_server(s) as srv:
            results = await asyncio.gather(
                *[post(f"{srv.url}/v1/completions", completion("ad1")) for _ in range(6)]
            )
    assert [r[0] for r in results] == [200] * 6
    assert fake.load_calls == ["ad1"]


async def test_lru_eviction_and_pinned(tmp_path: Path, pvc_root: Path) -> None:
    fake = FakeVLLM()
    ads = [pvc_adapter("ad0", pinned=True)] + [pvc_adapter(f"ad{i}") for i in range(1, 5)]
    async with serve_app(fake.app()) as vurl:
        s = make_settings(tmp_path, vurl, manifest_doc(ads, max_loras=2), pvc_root)
        async with run_server(s) as srv:
            await wait_for(lambda: "ad0" in fake.loaded)
            await wait_for(lambda: srv.server.registry.ready())
            assert (await get(f"{srv.url}/readyz"))[0] == 200
            peak = 0
            for name in ["ad1", "ad2", "ad3", "ad1", "ad4", "ad0", "ad2"]:
                st, body, _ = await post(f"{srv.url}/v1/completions", completion(name))
                assert (st, body["model"]) == (200, name)
                peak = max(peak, len(fake.loaded))
            assert peak == 2
            assert "ad0" not in fake.unload_calls  # pinned
            assert fake.unload_calls == ["ad1", "ad2", "ad3", "ad1", "ad4"]  # LRU order
            rep = await report(srv.url)
            assert rep["ad0"]["state"] == "loaded" and rep["ad0"]["pinned"]
            assert rep["ad4"]["state"] == "evicted"
            assert rep["ad2"]["loadSeconds"] is not None and rep["ad2"]["lastUsed"]


async def test_adapter_not_yet_answered_is_not_evicted(tmp_path: Path, pvc_root: Path) -> None:
    fake = FakeVLLM(chunk_delay=0.4)
    async with serve_app(fake.app()) as vurl:
        s = make_settings(
            tmp_path,
            vurl,
            manifest_doc([pvc_adapter("ad1"), pvc_adapter("ad2")], max_loras=1),
            pvc_root,
        )
        async with run_server(s) as srv:
            slow = asyncio.create_task(post(f"{srv.url}/v1/completions", completion("ad1")))
            await wait_for(lambda: "ad1" in fake.loaded)
            second = await post(f"{srv.url}/v1/completions", completion("ad2"))
            first = await slow
    assert first[0] == 200 and second[0] == 200
    assert fake.unload_calls == ["ad1"]


async def test_request_during_eviction_waits_for_reload(tmp_path: Path, pvc_root: Path) -> None:
    """A request must never reach vLLM for a name that vLLM is in the middle of dropping."""
    fake = FakeVLLM(unload_delay=0.3)
    async with serve_app(fake.app()) as vurl:
        ads = [pvc_adapter("ad1"), pvc_adapter("ad2")]
        s = make_settings(tmp_path, vurl, manifest_doc(ads, max_loras=1), pvc_root)
        async with run_server(s) as srv:
            assert (await post(f"{srv.url}/v1/completions", completion("ad1")))[0] == 200
            evicting = asyncio.create_task(post(f"{srv.url}/v1/completions", completion("ad2")))
            await wait_for(lambda: fake.unload_calls == ["ad1"])
            st, body, _ = await post(f"{srv.url}/v1/completions", completion("ad1"))
            assert (st, body["model"]) == (200, "ad1")
            assert (await evicting)[0] == 200
    assert fake.load_calls == ["ad1", "ad2", "ad1"]


async def test_load_timeout_gives_503_with_retry_after(tmp_path: Path, pvc_root: Path) -> None:
    fake = FakeVLLM(load_delay=1.5)
    async with serve_app(fake.app()) as vurl:
        s = make_settings(
            tmp_path, vurl, manifest_doc([pvc_adapter("ad1")]), pvc_root, load_timeout=0.3
        )
        async with run_server(s) as srv:
            st, body, headers = await post(f"{srv.url}/v1/completions", completion("ad1"))
            assert (
                st == 503 and headers["Retry-After"] and body["error"]["code"] == "adapter_loading"
            )
            await wait_for(lambda: "ad1" in fake.loaded)
            st, _, _ = await post(f"{srv.url}/v1/completions", completion("ad1"))
            assert st == 200
            assert fake.load_calls == ["ad1"]


async def test_failed_adapters_report_reasons(
    tmp_path: Path, pvc_root: Path, tiny_model: Path
) -> None:
    from loraplex.devtools.tinymodel import make_adapter

    make_adapter(tiny_model, pvc_root / "adapters" / "big", rank=16, seed=5)
    fake = FakeVLLM(refuse={"ad2"})
    ads = [pvc_adapter("big"), pvc_adapter("ad2")]
    async with serve_app(fake.app()) as vurl:
        s = make_settings(tmp_path, vurl, manifest_doc(ads), pvc_root)
        async with run_server(s) as srv:
            for name, reason in [("big", "RankExceedsMax"), ("ad2", "LoadFailed")]:
                st, body, _ = await post(f"{srv.url}/v1/completions", completion(name))
                assert st == 503 and body["error"]["code"] == "adapter_failed"
                assert reason in body["error"]["message"]
                rep = (await report(srv.url))[name]
                assert (rep["state"], rep["reason"]) == ("failed", reason)
            assert "big" not in fake.load_calls  # never sent to vLLM
            fake.refuse.clear()  # the admin API retries a failed load on request
            st, body, _ = await post(
                f"{srv.admin}/admin/adapters/ad2/load",
                {},
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
            assert (st, body["state"]) == (200, "loaded")


async def test_broken_source_fails_one_adapter_only(
    tmp_path: Path, pvc_root: Path, tiny_adapters: dict[str, Path]
) -> None:
    fake = FakeVLLM()
    blob = tar_bytes(tiny_adapters["ad1"])
    async with (
        FileServer(
            files={"/b.tgz": blob, "/t.tgz": blob}, modes={"/b.tgz": "500", "/t.tgz": "truncate"}
        ) as files,
        serve_app(fake.app()) as vurl,
    ):
        ads = [
            {"name": "broken", "servedName": "broken", "source": f"{files.url}/b.tgz"},
            {"name": "short", "servedName": "short", "source": f"{files.url}/t.tgz"},
            pvc_adapter("ad0"),
        ]
        s = make_settings(tmp_path, vurl, manifest_doc(ads), pvc_root)
        async with run_server(s) as srv:
            for name in ("broken", "short"):
                st, body, _ = await post(f"{srv.url}/v1/completions", completion(name))
                assert st == 503 and body["error"]["code"] == "adapter_failed", body
                rep = (await report(srv.url))[name]
                assert (rep["state"], rep["reason"], rep["attempts"]) == (
                    "failed",
                    "DownloadFailed",
                    3,
                )
            assert files.hits == {"/b.tgz": 3, "/t.tgz": 3}
            st, _, _ = await post(f"{srv.url}/v1/completions", completion("ad0"))
            assert st == 200
    assert fake.load_calls == ["ad0"]  # nothing half-downloaded was ever offered to vLLM
    # Only ad0's verified copy (vLLM loads pvc adapters from the cache, not from the claim).
    assert sorted(p.name for p in s.cache_dir.iterdir()) == ["ad0"]


async def test_vllm_death_and_return(tmp_path: Path, pvc_root: Path) -> None:
    fake = FakeVLLM()
    ads = [pvc_adapter("ad0", pinned=True), pvc_adapter("ad1")]
    async with serve_app(fake.app()) as vurl:
        s = make_settings(tmp_path, vurl, manifest_doc(ads), pvc_root)
        async with run_server(s) as srv:
            await post(f"{srv.url}/v1/completions", completion("ad1"))
            await wait_for(lambda: srv.server.registry.ready())
            fake.healthy = False
            fake.loaded.clear()  # a restarted vLLM has forgotten every adapter
            t0 = asyncio.get_running_loop().time()
            for _ in range(100):  # polls /readyz like a kubelet, every 50 ms
                if (await get(f"{srv.url}/readyz"))[0] != 200:
                    break
                await asyncio.sleep(0.05)
            assert asyncio.get_running_loop().time() - t0 < 2.0
            fake.healthy = True
            await wait_for(lambda: set(fake.loaded) == {"ad0", "ad1"})
            assert (await get(f"{srv.url}/readyz"))[0] == 200
            assert {a["state"] for a in (await report(srv.url)).values()} == {"loaded"}


async def test_manifest_file_watch_and_admin_push(
    tmp_path: Path, pvc_root: Path, tiny_adapters: dict[str, Path]
) -> None:
    fake = FakeVLLM()
    blob = tar_bytes(tiny_adapters["ad5"])
    async with FileServer(files={"/ad5.tgz": blob}) as files, serve_app(fake.app()) as vurl:
        s = make_settings(tmp_path, vurl, manifest_doc([pvc_adapter("ad0")]), pvc_root)
        async with run_server(s) as srv:
            # Hot add through the mounted file.
            http_ad = {"name": "ad5", "servedName": "ad5", "source": f"{files.url}/ad5.tgz"}
            s.manifest.write_text(json.dumps(manifest_doc([pvc_adapter("ad0"), http_ad], 2)))
            await wait_for(lambda: "ad5" in srv.server.registry.entries)
            st, _, _ = await post(f"{srv.url}/v1/completions", completion("ad5"))
            assert st == 200
            assert (s.cache_dir / "ad5" / "adapter_config.json").exists()
            # Remove both through the admin API: unloaded, 404, cache gone, PVC untouched.
            auth = {"Authorization": f"Bearer {TOKEN}"}
            url = f"{srv.admin}/admin/manifest"
            async with aiohttp.ClientSession() as c:
                r = await c.put(url, json=manifest_doc([], 3), headers=auth)
                assert r.status == 200
                r = await c.put(url, json=manifest_doc([], 3), headers=auth)
                assert r.status == 409 and "not newer" in (await r.json())["error"]["message"]
            st, _, _ = await post(f"{srv.url}/v1/completions", completion("ad5"))
            assert st == 404
            assert "ad5" in fake.unload_calls and "ad5" not in fake.loaded
            assert not (s.cache_dir / "ad5").exists()
            assert (pvc_root / "adapters" / "ad0" / "adapter_config.json").exists()
            # An older file does not undo the push.
            s.manifest.write_text(json.dumps(manifest_doc([pvc_adapter("ad0")], 2)))
            await asyncio.sleep(0.6)
            assert srv.server.registry.manifest.generation == 3


BAD_ADMIN: list[tuple[str, str, str, Any, dict[str, str] | None, int]] = [
    ("no-token", "PUT", "/admin/manifest", manifest_doc([], 5), {}, 401),
    (
        "wrong-token",
        "PUT",
        "/admin/manifest",
        manifest_doc([], 5),
        {"Authorization": "Bearer nope"},
        401,
    ),
    (
        "basic-auth",
        "PUT",
        "/admin/manifest",
        manifest_doc([], 5),
        {"Authorization": f"Basic {TOKEN}"},
        401,
    ),
    ("malformed-json", "PUT", "/admin/manifest", "{not json", None, 400),
    ("unknown-field", "PUT", "/admin/manifest", manifest_doc([], 5, surprise=1), None, 422),
    (
        "traversal-name-in-manifest",
        "PUT",
        "/admin/manifest",
        manifest_doc([{"name": "../x", "servedName": "x", "source": "pvc://adapters/ad0"}], 5),
        None,
        422,
    ),
    (
        "traversal-source",
        "PUT",
        "/admin/manifest",
        manifest_doc([{"name": "x", "servedName": "x", "source": "pvc://adapters/%2e%2e/x"}], 5),
        None,
        422,
    ),
    ("older-generation", "PUT", "/admin/manifest", manifest_doc([], 0), None, 409),
    ("oversized", "PUT", "/admin/manifest", "x" * (70 * 1024), None, 413),
    ("dotdot-load", "POST", "/admin/adapters/%2e%2e/load", {}, None, 404),  # normalised away
    ("uppercase-load", "POST", "/admin/adapters/AD0/load", {}, None, 400),
    ("encoded-slash-load", "POST", "/admin/adapters/..%2Fx/load", {}, None, 400),
    ("undeclared-load", "POST", "/admin/adapters/ghost/load", {}, None, 404),
    ("pinned-unload", "POST", "/admin/adapters/ad0/unload", {}, None, 409),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status"),
    [c[1:] for c in BAD_ADMIN],
    ids=[c[0] for c in BAD_ADMIN],
)
async def test_bad_admin_input(
    tmp_path: Path,
    pvc_root: Path,
    method: str,
    path: str,
    body: Any,
    headers: dict[str, str] | None,
    status: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    fake = FakeVLLM()
    before = sorted(p.name for p in tmp_path.parent.iterdir())
    async with serve_app(fake.app()) as vurl:
        s = make_settings(tmp_path, vurl, manifest_doc([pvc_adapter("ad0", pinned=True)]), pvc_root)
        async with run_server(s) as srv, aiohttp.ClientSession() as c:
            data = body if isinstance(body, str) else json.dumps(body)
            hdrs = {"Authorization": f"Bearer {TOKEN}"} if headers is None else headers
            async with c.request(
                method,
                srv.admin + path,
                data=data,
                headers={"Content-Type": "application/json", **hdrs},
            ) as r:
                assert r.status == status, await r.text()
                err = await r.json()
                assert err["error"]["message"]
            assert srv.server.registry.manifest.generation == 1
    assert sorted(p.name for p in tmp_path.parent.iterdir()) == before
    assert TOKEN not in caplog.text


BAD_PUBLIC: list[tuple[str, Any, int, str]] = [
    ("malformed-json", "{nope", 400, "invalid_json"),
    ("model-not-string", {"model": 5, "prompt": "x"}, 400, "invalid_request"),
    ("oversized", {"model": "tiny", "prompt": "x" * (70 * 1024)}, 413, "body_too_large"),
    ("traversal-model", {"model": "../ad0", "prompt": "x"}, 404, "model_not_found"),
    ("absolute-model", {"model": "/etc/passwd", "prompt": "x"}, 404, "model_not_found"),
    ("encoded-model", {"model": "%2e%2e", "prompt": "x"}, 404, "model_not_found"),
]


@pytest.mark.parametrize(
    ("body", "status", "code"), [c[1:] for c in BAD_PUBLIC], ids=[c[0] for c in BAD_PUBLIC]
)
async def test_bad_public_input(
    tmp_path: Path, pvc_root: Path, body: Any, status: int, code: str
) -> None:
    fake = FakeVLLM()
    async with serve_app(fake.app()) as vurl:
        s = make_settings(tmp_path, vurl, manifest_doc([pvc_adapter("ad0")]), pvc_root)
        async with run_server(s) as srv:
            st, err, _ = await post(f"{srv.url}/v1/completions", body)
    assert (st, err["error"]["code"]) == (status, code)
    assert fake.seen_bodies == [] and fake.load_calls == []
