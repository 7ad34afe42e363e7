"""The server with 10,000 declared adapters, against a fake vLLM (in process, loopback only).

Matrix: a pod starting on a sharded manifest serves the whole generation; a pod starting on a
torn set (index of generation 2, a shard still of generation 1) waits and starts on the
complete generation 2, never on part of it; a running pod that sees a torn set keeps serving
its generation and takes the next one once consistent; the admin push of a 10,000-adapter
manifest (plain and gzip-encoded) is accepted at the production body limit; GET /v1/adapters
pages (limit/continue, bad values 400, no limit = everything) and the operator's poller
follows the pages; /v1/models and a page of /v1/adapters answer fast with 10,000 declared.
"""

from __future__ import annotations

import asyncio
import collections
import gzip
import json
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from loraplex.podsync import PodSync, PodTarget
from loraplex_server import errors
from loraplex_server import manifest_shards as ms
from loraplex_server.manifest import AdapterManifest, AdapterState
from loraplex_server.metrics import Metrics

from .helpers import FakeVLLM, make_settings, manifest_doc, run_server, serve_app, wait_for

pytestmark = pytest.mark.timeout(120)
PRODUCTION_BODY_LIMIT = 8 * 1024 * 1024  # settings.py's --max-body-bytes default


@pytest.fixture
def pvc_root(tiny_adapters: dict[str, Path]) -> Path:
    return tiny_adapters["ad0"].parent.parent


def many(n: int, generation: int = 1) -> dict[str, Any]:
    """`n` declared adapters that all read the same tiny adapter from the PVC."""
    adapters = [
        {"name": f"t-{i:05d}", "servedName": f"t-{i:05d}", "source": "pvc://adapters/ad0"}
        for i in range(n)
    ]
    return manifest_doc(adapters, generation, max_loras=2, max_cpu_loras=4)


def write_sharded(folder: Path, doc: dict[str, Any], shard_bytes: int = 16 * 1024) -> None:
    """What the projected volume holds: shards beside the index file."""
    index, chunks = ms.split(
        AdapterManifest.model_validate(doc), lambda n: f"x-manifest-{n}", shard_bytes=shard_bytes
    )
    for ref, chunk in zip(index.shards, chunks, strict=True):
        (folder / ref.key).write_bytes(chunk)
    (folder / "manifest.json").write_text(index.model_dump_json(by_alias=True))


def shard_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.glob("shard-*.gz")}


async def adapters_of(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/v1/adapters") as r:
        assert r.status == 200
        body: dict[str, Any] = await r.json()
        return body


async def test_a_pod_starting_on_shards_serves_the_whole_generation(
    tmp_path: Path, pvc_root: Path
) -> None:
    vllm = FakeVLLM()
    async with serve_app(vllm.app()) as vurl:
        settings = make_settings(tmp_path, vurl, many(1), pvc_root)
        write_sharded(tmp_path, many(10_000, generation=7))
        async with run_server(settings) as srv:
            body = await adapters_of(srv.url)
            assert body["generation"] == 7
            assert len(body["adapters"]) == 10_000


async def test_a_torn_set_at_start_is_waited_out_never_half_applied(
    tmp_path: Path, pvc_root: Path
) -> None:
    old, new = many(3000, generation=1), many(3001, generation=2)
    write_sharded(tmp_path, old)
    old_files = shard_files(tmp_path)
    write_sharded(tmp_path, new)
    new_files = shard_files(tmp_path)
    changed = next(k for k in old_files if old_files[k] != new_files[k])
    (tmp_path / changed).write_bytes(old_files[changed])  # the kubelet is behind on one shard
    vllm = FakeVLLM()
    async with serve_app(vllm.app()) as vurl:
        settings = make_settings(tmp_path, vurl, many(1), pvc_root, manifest_wait=30.0)
        write_sharded(tmp_path, new)  # make_settings wrote a plain manifest; restore the index
        (tmp_path / changed).write_bytes(old_files[changed])

        async def kubelet_catches_up() -> None:
            await asyncio.sleep(1.0)
            (tmp_path / changed).write_bytes(new_files[changed])

        catch_up = asyncio.create_task(kubelet_catches_up())
        async with run_server(settings) as srv:
            assert catch_up.done()  # the server did not start before the set was whole
            body = await adapters_of(srv.url)
            assert body["generation"] == 2 and len(body["adapters"]) == 3001
        await catch_up


async def test_a_running_pod_keeps_its_generation_through_a_torn_set(
    tmp_path: Path, pvc_root: Path
) -> None:
    vllm = FakeVLLM()
    async with serve_app(vllm.app()) as vurl:
        settings = make_settings(tmp_path, vurl, many(1), pvc_root)
        write_sharded(tmp_path, many(3000, generation=1))
        async with run_server(settings) as srv:
            assert (await adapters_of(srv.url))["generation"] == 1
            new = many(3001, generation=2)
            index, chunks = ms.split(
                AdapterManifest.model_validate(new), lambda n: f"x-{n}", shard_bytes=16 * 1024
            )
            # The index arrives first; the shards lag behind.
            (tmp_path / "manifest.json").write_text(index.model_dump_json(by_alias=True))
            await asyncio.sleep(4 * settings.manifest_interval)
            body = await adapters_of(srv.url)
            assert body["generation"] == 1 and len(body["adapters"]) == 3000
            for ref, chunk in zip(index.shards, chunks, strict=True):
                (tmp_path / ref.key).write_bytes(chunk)
            await wait_for(lambda: srv.server.registry.manifest.generation == 2)
            assert len(srv.server.registry.entries) == 3001


async def test_a_mounted_generation_the_push_brought_is_not_read_again(
    tmp_path: Path, pvc_root: Path
) -> None:
    """The push usually brings a generation before the kubelet refreshes the mounted files:
    the index then names a generation the pod holds, and its shards are not joined and
    validated again (0.15 s of the event loop at 10,000 adapters). A newer one still is,
    validating only the adapters that changed."""
    vllm = FakeVLLM()
    async with serve_app(vllm.app()) as vurl:
        settings = make_settings(
            tmp_path, vurl, many(1), pvc_root, max_body_bytes=PRODUCTION_BODY_LIMIT
        )
        write_sharded(tmp_path, many(1500, generation=1))
        async with run_server(settings) as srv:
            server = srv.server
            reads = 0
            real_read = server.read_manifest

            def counted() -> Any:
                nonlocal reads
                reads += 1
                return real_read()

            server.read_manifest = counted  # type: ignore[method-assign]
            pushed = json.dumps(many(1501, generation=2)).encode()
            async with (
                aiohttp.ClientSession() as s,
                s.put(f"{srv.admin}/admin/manifest", data=pushed, headers=srv.auth) as r,
            ):
                assert r.status == 200, await r.text()
            write_sharded(tmp_path, many(1501, generation=2))  # the kubelet catches up
            await asyncio.sleep(4 * settings.manifest_interval)
            assert reads == 0 and server.registry.manifest.generation == 2
            held = {name: e.spec for name, e in server.registry.entries.items()}
            write_sharded(tmp_path, many(1502, generation=3))  # newer than held: read
            await wait_for(lambda: server.registry.manifest.generation == 3)
            assert reads == 1 and len(server.registry.entries) == 1502
            # ... validating only the adapter that is new: the others keep their entries.
            entries = server.registry.entries
            assert all(entries[name].spec is spec for name, spec in held.items())


@pytest.mark.parametrize("encoding", ["identity", "gzip"])
async def test_admin_push_of_ten_thousand_adapters(
    tmp_path: Path, pvc_root: Path, encoding: str
) -> None:
    vllm = FakeVLLM()
    async with serve_app(vllm.app()) as vurl:
        settings = make_settings(
            tmp_path, vurl, many(1), pvc_root, max_body_bytes=PRODUCTION_BODY_LIMIT
        )
        async with run_server(settings) as srv:
            raw = json.dumps(many(10_000, generation=5)).encode()
            headers = {**srv.auth, "Content-Type": "application/json"}
            if encoding == "gzip":
                raw = gzip.compress(raw)
                headers["Content-Encoding"] = "gzip"
            async with (
                aiohttp.ClientSession() as s,
                s.put(f"{srv.admin}/admin/manifest", data=raw, headers=headers) as r,
            ):
                assert r.status == 200, await r.text()
                body = await r.json()
            assert body["generation"] == 5 and len(body["adapters"]) == 10_000


async def test_adapters_are_paged_and_the_operator_poller_follows_pages(
    tmp_path: Path, pvc_root: Path
) -> None:
    vllm = FakeVLLM()
    async with serve_app(vllm.app()) as vurl:
        settings = make_settings(tmp_path, vurl, many(2500, generation=3), pvc_root)
        async with run_server(settings) as srv, aiohttp.ClientSession() as s:
            names: list[str] = []
            token: str | None = None
            pages = 0
            while True:
                q = {"limit": "1000", **({"continue": token} if token else {})}
                async with s.get(f"{srv.url}/v1/adapters", params=q) as r:
                    assert r.status == 200
                    page = await r.json()
                pages += 1
                assert len(page["adapters"]) <= 1000 and page["generation"] == 3
                names += [a["name"] for a in page["adapters"]]
                token = page["continue"]
                if not token:
                    break
            assert pages == 3 and names == sorted(f"t-{i:05d}" for i in range(2500))
            whole = await adapters_of(srv.url)  # no limit: everything, as before
            assert len(whole["adapters"]) == 2500 and whole["continue"] is None
            for bad in ({"limit": "0"}, {"limit": "x"}, {"limit": "1001"}, {"continue": "../a"}):
                async with s.get(f"{srv.url}/v1/adapters", params=bad) as r:
                    assert r.status == 400
                    assert (await r.json())["error"]["param"] in bad
            port = int(srv.url.rsplit(":", 1)[1])
            poller = PodSync()
            try:
                report = await poller.poll(PodTarget("p", "127.0.0.1", port, 0))
            finally:
                await poller.close()
            assert report is not None and len(report.adapters) == 2500


async def test_an_unchanged_report_is_answered_304_and_a_change_is_not_missed(
    tmp_path: Path, pvc_root: Path
) -> None:
    """The operator polls every pod every pass: at 10,000 adapters ten pages, half of a pass.
    A pod whose report did not change answers 304 to the version the poller holds, and any
    change (an adapter used, a new manifest) gives a full report again."""
    vllm = FakeVLLM()
    async with serve_app(vllm.app()) as vurl:
        settings = make_settings(
            tmp_path, vurl, many(1500, generation=3), pvc_root, max_body_bytes=PRODUCTION_BODY_LIMIT
        )
        async with run_server(settings) as srv, aiohttp.ClientSession() as s:
            reg = srv.server.registry
            await wait_for(lambda: all(e.state.value == "cached" for e in reg.entries.values()))
            statuses: list[int] = []

            async def on_end(_: Any, __: Any, params: aiohttp.TraceRequestEndParams) -> None:
                statuses.append(params.response.status)

            trace = aiohttp.TraceConfig()
            trace.on_request_end.append(on_end)
            port = int(srv.url.rsplit(":", 1)[1])
            pod = PodTarget("p", "127.0.0.1", port, 0)
            poller = PodSync(trace_configs=[trace])
            try:
                first = await poller.poll(pod)
                assert first is not None and statuses == [200, 200]  # two pages of 1,000
                statuses.clear()
                again = await poller.poll(pod)
                assert again is first and statuses == [304]
                # A request touches one adapter (last used, in flight): the report changed.
                async with s.post(
                    f"{srv.url}/v1/completions",
                    json={"model": "t-01234", "prompt": "hi", "max_tokens": 1},
                ) as r:
                    assert r.status == 200, await r.text()
                statuses.clear()
                used = await poller.poll(pod)
                assert used is not None and used is not first and statuses == [200, 200]
                entry = next(a for a in used.adapters if a.name == "t-01234")
                assert entry.last_used is not None and entry.state.value == "loaded"
                # A new generation pushed by the admin API: a full report of it.
                raw = json.dumps(many(1500, generation=4)).encode()
                async with s.put(f"{srv.admin}/admin/manifest", data=raw, headers=srv.auth) as r:
                    assert r.status == 200, await r.text()
                newer = await poller.poll(pod)
                assert newer is not None and newer.generation == 4
            finally:
                await poller.close()
            # The header as a client sends it: weak tags, lists and `*` match, junk does not.
            async with s.get(f"{srv.url}/v1/adapters?limit=1") as r:
                tag = r.headers["ETag"]
            for header, status in ((tag, 304), (f'W/{tag}, "x"', 304), ("*", 304), ("x", 200)):
                async with s.get(
                    f"{srv.url}/v1/adapters?limit=1", headers={"If-None-Match": header}
                ) as r:
                    assert r.status == status, header


@pytest.mark.timeout(300)
async def test_lists_stay_fast_with_ten_thousand_adapters(tmp_path: Path, pvc_root: Path) -> None:
    vllm = FakeVLLM()
    async with serve_app(vllm.app()) as vurl:
        settings = make_settings(tmp_path, vurl, many(10_000), pvc_root)
        async with run_server(settings) as srv, aiohttp.ClientSession() as s:
            # Settled first (10,000 adapters being fetched would share the loop with the GETs),
            # then the best of three: a timing, not a load test, on a shared machine.
            reg = srv.server.registry
            fetching = ("declared", "downloading")
            await wait_for(
                lambda: all(e.state.value not in fetching for e in reg.entries.values()), 250
            )
            timings = {}
            for path in ("/v1/models", "/v1/adapters?limit=1000", "/v1/adapters"):
                best = float("inf")
                for _ in range(3):
                    start = time.monotonic()
                    async with s.get(f"{srv.url}{path}") as r:
                        assert r.status == 200
                        await r.read()
                    best = min(best, time.monotonic() - start)
                timings[path] = best
            assert timings["/v1/models"] < 1.0, timings
            assert timings["/v1/adapters?limit=1000"] < 0.5, timings


def test_adapter_series_are_bounded_to_the_recently_used() -> None:
    m = Metrics(max_adapter_series=3, idle_after=0)  # every slot may be taken at once
    for i in range(10_000):
        m.requests.labels(f"t-{i:05d}", "200").inc()
        m.duration.labels(f"t-{i:05d}").observe(0.1)
    m.requests.labels("t-09999", "200").inc()  # recent: keeps its series
    m.requests.labels("unknown", "404").inc()  # shared labels are never evicted
    text = m.render().decode()
    labelled = {
        line.split('adapter="')[1].split('"')[0]
        for line in text.splitlines()
        if line.startswith("loraplex_server_requests_total{")
    }
    assert labelled == {"t-09997", "t-09998", "t-09999", "unknown"}
    assert 'loraplex_server_requests_total{adapter="t-09999",code="200"} 2.0' in text
    durations = {
        ln.split('adapter="')[1].split('"')[0]
        for ln in text.splitlines()
        if ln.startswith("loraplex_server_request_duration")
    }
    assert durations == {"t-09997", "t-09998", "t-09999"}  # nothing left of the other 9,997
    off = Metrics(max_adapter_series=0)
    off.requests.labels("t-1", "200").inc()
    assert 'adapter="other"' in off.render().decode()


def test_a_full_set_takes_newcomers_only_in_place_of_idle_adapters() -> None:
    """More adapters busy than slots: the newcomers count under "other" (no churn of series)
    until a slot's adapter has been idle for the window, then the newcomer takes that slot."""
    now = [0.0]
    m = Metrics(max_adapter_series=2, idle_after=300, clock=lambda: now[0])
    for name in ("a", "b", "c", "d", "c"):
        m.requests.labels(name, "200").inc()
        now[0] += 1
    text = m.render().decode()
    assert 'loraplex_server_requests_total{adapter="a",code="200"} 1.0' in text
    assert 'loraplex_server_requests_total{adapter="b",code="200"} 1.0' in text
    assert 'loraplex_server_requests_total{adapter="other",code="200"} 3.0' in text
    assert 'adapter="c"' not in text and 'adapter="d"' not in text
    m.requests.labels("b", "200").inc()  # b stays busy; a goes idle
    now[0] += 300
    m.requests.labels("c", "200").inc()  # a idle for the window: c takes its slot
    text = m.render().decode()
    assert 'adapter="a"' not in text
    assert 'loraplex_server_requests_total{adapter="c",code="200"} 1.0' in text
    assert m.series.own() == ["b", "c"]


def test_an_adapter_back_in_a_slot_counts_on_a_live_series() -> None:
    """The proxy's cached children are dropped with the series: a returning adapter's samples
    reach the scrape (a stale child would take them and show nothing)."""
    m = Metrics(max_adapter_series=1, idle_after=0)
    m.requests.labels("a", "200").inc()
    m.requests.labels("a", "200").inc()
    m.requests.labels("b", "200").inc()  # takes a's slot
    m.requests.labels("a", "200").inc()  # and back
    text = m.render().decode()
    assert 'loraplex_server_requests_total{adapter="a",code="200"} 1.0' in text
    assert 'adapter="b"' not in text


def test_a_404_names_a_few_served_models_not_all_ten_thousand() -> None:
    message = str(errors.model_not_found("nope", [f"t-{i:05d}" for i in range(10_000)]))
    assert "t-00000" in message and "t-00019" in message and "t-00020" not in message
    assert "9980 more (GET /v1/models lists them all)" in message
    assert len(message) < 1_000


async def test_a_hot_add_is_pushed_before_the_pod_is_polled(tmp_path: Path, pvc_root: Path) -> None:
    """The operator's sync: a pod it knows to be behind gets the new manifest first (the poll
    before it is ten pages at 10,000 adapters), answered without the report it then polls
    for; a pod not known to be behind is polled first, and only pushed to when its report is
    older."""
    seen: list[str] = []
    answers: list[tuple[str, int]] = []
    trace = aiohttp.TraceConfig()

    async def on_start(_: Any, __: Any, params: aiohttp.TraceRequestStartParams) -> None:
        seen.append(params.method)

    async def on_end(_: Any, __: Any, params: aiohttp.TraceRequestEndParams) -> None:
        answers.append((params.method, params.response.status))

    trace.on_request_start.append(on_start)
    trace.on_request_end.append(on_end)
    vllm = FakeVLLM()
    async with serve_app(vllm.app()) as vurl:
        settings = make_settings(tmp_path, vurl, many(20, generation=3), pvc_root)
        async with run_server(settings) as srv:
            pod = PodTarget(
                "p", "127.0.0.1", int(srv.url.rsplit(":", 1)[1]), int(srv.admin.rsplit(":", 1)[1])
            )
            token = srv.auth["Authorization"].removeprefix("Bearer ")
            sync = PodSync(trace_configs=[trace])
            try:
                current = AdapterManifest.model_validate(many(20, generation=3))
                reports = await sync.sync([pod], current, token)
                assert seen == ["GET"] and reports["p"] is not None  # up to date: no push
                assert reports["p"].generation == 3
                seen.clear()
                added = AdapterManifest.model_validate(many(21, generation=4))
                reports = await sync.sync([pod], added, token)
                assert seen == ["PUT", "GET"], seen
                # The push asks for no report (`Prefer: return=minimal`): the poll brings it.
                assert ("PUT", 204) in answers, answers
                report = reports["p"]
                assert report is not None and report.generation == 4
                assert any(a.name == "t-00020" for a in report.adapters)
                # A pass pushes first, while it holds its BaseModel, and polls after: the
                # poll does not push the same generation again.
                seen.clear()
                again = AdapterManifest.model_validate(many(22, generation=5))
                await sync.push_behind([pod], again, token)
                assert seen == ["PUT"], seen
                await sync.push_behind([pod], again, token)  # pushed already: not again
                reports = await sync.sync([pod], again, token)
                assert seen == ["PUT", "GET"], seen
                assert (report := reports["p"]) is not None and report.generation == 5
                # The pod restarts (same name and IP) on its mounted generation 3: the next
                # pass's poll finds it behind and pushes again.
                (tmp_path / "restarted").mkdir()
                restarted = make_settings(
                    tmp_path / "restarted", vurl, many(20, generation=3), pvc_root
                )
                async with run_server(restarted) as again_srv:
                    moved = PodTarget(
                        "p",
                        "127.0.0.1",
                        int(again_srv.url.rsplit(":", 1)[1]),
                        int(again_srv.admin.rsplit(":", 1)[1]),
                    )
                    again_token = again_srv.auth["Authorization"].removeprefix("Bearer ")
                    seen.clear()
                    await sync.push_behind([moved], again, again_token)  # known current
                    reports = await sync.sync([moved], again, again_token)
                    assert seen == ["GET", "PUT", "GET"], seen
                    assert (report := reports["p"]) is not None and report.generation == 5
                # A new operator (nothing known of the pod) polls first, and finds it current.
                seen.clear()
                fresh = PodSync(trace_configs=[trace])
                try:
                    await fresh.sync([pod], added, token)
                finally:
                    await fresh.close()
                assert seen == ["GET"]
            finally:
                await sync.close()


def state_gauge(metrics_text: str) -> dict[str, float]:
    found = re.findall(r'^loraplex_server_adapters\{state="(\w+)"\} (\S+)$', metrics_text, re.M)
    return {state: float(value) for state, value in found}


async def test_the_state_gauge_says_what_the_adapters_are_after_every_kind_of_change(
    tmp_path: Path, pvc_root: Path
) -> None:
    """The per-state gauge is kept by each state write, not recounted from the entries (a
    recount per event-loop turn made settling 10,000 adapters take ~40 s). So after adds, a
    failed fetch, loads, evictions and removals, it must still agree with the report."""
    S = AdapterState
    vllm = FakeVLLM()
    async with serve_app(vllm.app()) as vurl:
        doc = many(300)
        broken = {"name": "broken", "servedName": "broken", "source": "pvc://adapters/missing"}
        doc["adapters"].append(broken)
        settings = make_settings(tmp_path, vurl, doc, pvc_root, download_attempts=1)
        async with run_server(settings) as srv, aiohttp.ClientSession() as s:
            reg = srv.server.registry
            done = {S.CACHED, S.FAILED, S.LOADED, S.EVICTED}
            await wait_for(lambda: {e.state for e in reg.entries.values()} <= done, within=60)
            for i in range(6):  # max_cpu_loras is 4: loads, then evictions
                body = {"model": f"t-{i:05d}", "prompt": "hi", "max_tokens": 2}
                async with s.post(f"{srv.url}/v1/completions", json=body) as r:
                    assert r.status == 200, await r.text()
            second = many(340, generation=2)  # keeps 240 of the first, drops 60, adds 40
            second["adapters"] = second["adapters"][:240] + second["adapters"][300:] + [broken]
            headers = {**srv.auth, "Content-Type": "application/json"}
            async with s.put(f"{srv.admin}/admin/manifest", json=second, headers=headers) as r:
                assert r.status == 200, await r.text()
            await wait_for(lambda: {e.state for e in reg.entries.values()} <= done, within=60)
            await asyncio.sleep(0.05)  # the gauge is set at the end of an event-loop turn
            async with s.get(f"{srv.url}/metrics") as r:
                gauge = state_gauge(await r.text())
            report = await adapters_of(srv.url)
    states = collections.Counter(a["state"] for a in report["adapters"])
    assert gauge == {state.value: float(states[state.value]) for state in AdapterState}
    assert len(report["adapters"]) == 281 and states["failed"] == 1
    assert states["evicted"] >= 1 and states["loaded"] >= 1


async def test_a_request_for_an_adapter_still_queued_for_its_download_goes_first(
    tmp_path: Path, pvc_root: Path
) -> None:
    """Thousands of adapters at a pod's start queue for the download slots (10,000 take ~40 s
    here); a request for one near the end of the queue must not wait for all the others."""
    vllm = FakeVLLM()
    async with serve_app(vllm.app()) as vurl:
        settings = make_settings(tmp_path, vurl, many(2000), pvc_root)
        async with run_server(settings) as srv, aiohttp.ClientSession() as s:
            reg = srv.server.registry
            body = {"model": "t-01999", "prompt": "hi", "max_tokens": 2}
            async with s.post(f"{srv.url}/v1/completions", json=body) as r:
                assert r.status == 200, await r.text()
            cached = sum(e.state != AdapterState.DOWNLOADING for e in reg.entries.values())
            assert reg.entries["t-01999"].state == AdapterState.LOADED
            assert cached < 1000, f"{cached} of 2000 fetched first"
