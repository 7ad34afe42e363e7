"""Request forgery from the pod: which origins an adapter download may reach (issue 8, point 4).

Matrix:
- address table: loopback, link-local (cloud metadata), RFC 1918, shared 100.64/10,
  unique-local and link-local IPv6, IPv4-mapped IPv6, unspecified, multicast -> refused;
  public v4/v6 -> allowed; an allowlisted network -> allowed;
- the resolver: any non-public answer among several refuses the name; `localhost`;
- loopback origins WITHOUT the tests' allowlist: plain http refused, then (http allowed) the
  loopback address refused, by IP literal and by name; the origin sees no request;
- redirects: to a host outside the allowlist (refused, the target sees nothing), to another
  scheme (refused), within the same origin (followed);
- messages: on the public /v1/adapters no address, port, URL or exception class, for a
  refused address, a closed port, an HTTP 401 and a hang; the admin port has the detail;
- queries: a presigned URL's query reaches the origin and never a message; `%3F` in a path
  stays part of the path; sha256 refused where it cannot be checked.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from loraplex_server import errors
from loraplex_server.fetch import Fetcher
from loraplex_server.manifest import AdapterLimits, AdapterManifest, ManifestAdapter
from loraplex_server.metrics import Metrics
from loraplex_server.netguard import (
    BlockedAddress,
    GuardedResolver,
    address_allowed,
    parse_networks,
)

from .helpers import (
    LOOPBACK_LIMITS,
    TOKEN,
    FakeVLLM,
    Origin,
    free_port,
    make_settings,
    manifest_doc,
    run_server,
    serve_app,
    tar_bytes,
    wait_for,
)


def manifest(limits: dict[str, Any]) -> AdapterManifest:
    return AdapterManifest(
        generation=1,
        base_served_name="tiny",
        max_loras=2,
        max_lora_rank=8,
        max_cpu_loras=4,
        limits=AdapterLimits.model_validate(limits),
    )


def spec(source: str, name: str = "x", sha256: str | None = None) -> ManifestAdapter:
    return ManifestAdapter(name=name, served_name=name, source=source, sha256=sha256)


def fetcher(tmp_path: Path, **kw: Any) -> Fetcher:
    f = Fetcher(make_settings(tmp_path, "http://127.0.0.1:9", {}, tmp_path, **kw), Metrics())
    f.clean_temp()
    return f


@pytest.fixture
def blob(tiny_adapters: dict[str, Path]) -> bytes:
    return tar_bytes(tiny_adapters["ad1"])


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("127.0.0.1", False),
        ("127.8.9.10", False),
        ("169.254.169.254", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("100.64.0.10", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("fe80::1", False),
        ("fd00::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("8.8.8.8", True),
        ("151.101.1.1", True),
        ("2606:4700::1111", True),
        ("::ffff:8.8.8.8", True),
    ],
)
def test_address_table(address: str, allowed: bool) -> None:
    assert address_allowed(address, []) is allowed


def test_allowlisted_network_is_reachable_and_nothing_else() -> None:
    nets = parse_networks(["10.1.2.0/24"])
    assert address_allowed("10.1.2.3", nets)
    assert not address_allowed("10.1.3.3", nets)
    assert not address_allowed("127.0.0.1", nets)


async def test_resolver_refuses_a_name_if_any_answer_is_private() -> None:
    class Inner:
        async def resolve(self, host: str, port: int, family: Any) -> list[dict[str, Any]]:
            return [{"host": a, "hostname": host, "port": port} for a in ("8.8.8.8", "10.0.0.7")]

        async def close(self) -> None:
            pass

    r = GuardedResolver([])
    r._inner = Inner()  # type: ignore[assignment]
    with pytest.raises(BlockedAddress):
        await r.resolve("mixed.example", 443)
    with pytest.raises(BlockedAddress):
        await r.resolve("localhost", 443)
    r = GuardedResolver(parse_networks(["10.0.0.0/8"]))
    r._inner = Inner()  # type: ignore[assignment]
    assert len(await r.resolve("mixed.example", 443)) == 2


@pytest.mark.parametrize(
    ("limits", "host", "words"),
    [
        ({}, "127.0.0.1", "plainHttpHosts"),
        ({"plainHttpHosts": ["127.0.0.1"]}, "127.0.0.1", "privateNetworks"),
        ({"plainHttpHosts": ["localhost"]}, "localhost", "privateNetworks"),
    ],
    ids=["plain-http", "loopback-literal", "loopback-by-name"],
)
async def test_loopback_is_refused_without_the_allowlist(
    tmp_path: Path, blob: bytes, limits: dict[str, Any], host: str, words: str
) -> None:
    f = fetcher(tmp_path)
    async with Origin(routes={"/a.tar.gz": blob}) as origin:
        url = origin.url.replace("127.0.0.1", host)
        with pytest.raises(errors.AdapterError) as exc:
            await f.fetch(spec(f"{url}/a.tar.gz"), manifest(limits))
    assert exc.value.reason == errors.SOURCE_NOT_ALLOWED
    assert words in exc.value.message
    assert origin.seen == []  # refused before connecting
    assert host not in exc.value.message and str(origin.url.rsplit(":", 1)[1]) not in str(exc.value)


async def test_loopback_by_name_works_when_allowlisted(tmp_path: Path, blob: bytes) -> None:
    f = fetcher(tmp_path)
    limits = {"plainHttpHosts": ["localhost"], "privateNetworks": ["127.0.0.0/8", "::1/128"]}
    async with Origin(routes={"/a.tar.gz": blob}) as origin:
        url = origin.url.replace("127.0.0.1", "localhost")
        await f.fetch(spec(f"{url}/a.tar.gz"), manifest(limits))
    assert origin.seen == ["/a.tar.gz"]


async def test_redirects_are_checked_at_every_hop(tmp_path: Path, blob: bytes) -> None:
    """Only 127.0.0.1 is allowlisted: a redirect to 127.0.0.2 (another loopback address,
    standing in for any internal host) is refused before it is contacted."""
    limits = {"plainHttpHosts": ["127.0.0.1", "127.0.0.2"], "privateNetworks": ["127.0.0.1/32"]}
    f = fetcher(tmp_path)
    async with Origin(host="127.0.0.2", routes={"/a.tar.gz": blob}) as inside:
        routes: dict[str, Any] = {
            "/away.tar.gz": ("redirect", f"{inside.url}/a.tar.gz"),
            "/file.tar.gz": ("redirect", "file:///etc/passwd"),
            "/here.tar.gz": ("redirect", "/real.tar.gz"),
            "/real.tar.gz": blob,
        }
        async with Origin(routes=routes) as origin:
            for path in ("/away.tar.gz", "/file.tar.gz"):
                with pytest.raises(errors.AdapterError) as exc:
                    await f.fetch(spec(f"{origin.url}{path}"), manifest(limits))
                assert exc.value.reason == errors.SOURCE_NOT_ALLOWED
            await f.fetch(spec(f"{origin.url}/here.tar.gz"), manifest(limits))
    assert inside.seen == []
    assert origin.seen == ["/away.tar.gz", "/file.tar.gz", "/here.tar.gz", "/real.tar.gz"]


async def test_presigned_query_reaches_the_origin_and_no_message(
    tmp_path: Path, blob: bytes
) -> None:
    f = fetcher(tmp_path)
    query = "X-Amz-Credential=AKIA%2F1&X-Amz-Signature=s3cr3t"
    async with Origin(routes={"/a.tar.gz": blob, "/dir%3Fname/b.tar.gz": blob}) as origin:
        await f.fetch(spec(f"{origin.url}/a.tar.gz?{query}"), manifest(LOOPBACK_LIMITS))
        await f.fetch(spec(f"{origin.url}/dir%3Fname/b.tar.gz", "y"), manifest(LOOPBACK_LIMITS))
        with pytest.raises(errors.AdapterError) as exc:
            await f.fetch(spec(f"{origin.url}/gone.tar.gz?{query}", "z"), manifest(LOOPBACK_LIMITS))
    assert origin.seen == [f"/a.tar.gz?{query}", "/dir%3Fname/b.tar.gz", f"/gone.tar.gz?{query}"]
    assert exc.value.reason == errors.DOWNLOAD_FAILED and "HTTP 404" in exc.value.message
    assert "s3cr3t" not in exc.value.message and "s3cr3t" not in exc.value.detail
    assert "?<redacted>" in exc.value.detail


@pytest.mark.parametrize(
    "source",
    ["https://files.example/adapters/x/", "s3://bucket/prefix", "hf://org/repo"],
    ids=["folder-url", "s3", "hf"],
)
async def test_sha256_is_refused_where_it_cannot_be_checked(tmp_path: Path, source: str) -> None:
    f = fetcher(tmp_path)
    with pytest.raises(errors.AdapterError) as exc:
        await f.fetch(spec(source, sha256="0" * 64), manifest({}))
    assert exc.value.reason == errors.INVALID_SOURCE
    assert "https:// archive" in exc.value.message


_LEAKS = re.compile(r"127\.0\.0\.\d|localhost|:\d{2,5}\b|http://|[A-Z][a-z]+(Error|Exception)\b")


async def test_public_report_says_what_failed_without_addresses_or_exceptions(
    tmp_path: Path, blob: bytes
) -> None:
    fake = FakeVLLM()
    closed = free_port()
    async with (
        Origin(routes={"/ok.tar.gz": blob, "/auth.tar.gz": ("status", 401)}) as origin,
        Origin(routes={"/hang.tar.gz": ("drip", 10_000)}, drip_every=30) as hang,
        serve_app(fake.app()) as vurl,
    ):
        ads = [
            {"name": "refused", "servedName": "refused", "source": f"{origin.url}/ok.tar.gz"},
            {
                "name": "closed",
                "servedName": "closed",
                "source": f"http://127.0.0.1:{closed}/x.tgz",
            },
            {"name": "auth", "servedName": "auth", "source": f"{origin.url}/auth.tar.gz"},
            {"name": "hang", "servedName": "hang", "source": f"{hang.url}/hang.tar.gz"},
        ]
        # 127.0.0.1 is allowlisted; 127.0.0.2 stands in for any other internal address.
        ads[0]["source"] = ads[0]["source"].replace("127.0.0.1", "127.0.0.2")
        limits = {
            "plainHttpHosts": ["127.0.0.1", "127.0.0.2"],
            "privateNetworks": ["127.0.0.1/32"],
            "downloadTimeoutSeconds": 1,
        }
        s = make_settings(
            tmp_path, vurl, manifest_doc(ads, limits=limits), tmp_path, download_attempts=1
        )
        async with run_server(s) as srv:
            reg = srv.server.registry
            await wait_for(lambda: all(e.state.value == "failed" for e in reg.entries.values()))
            async with aiohttp.ClientSession() as c:
                async with c.get(f"{srv.url}/v1/adapters") as r:
                    public = {a["name"]: a for a in (await r.json())["adapters"]}
                details = {}
                for name in public:
                    async with c.get(
                        f"{srv.admin}/admin/adapters/{name}",
                        headers={"Authorization": f"Bearer {TOKEN}"},
                    ) as r:
                        details[name] = (await r.json())["detail"]
                async with c.get(f"{srv.admin}/admin/adapters/auth") as r:
                    assert r.status == 401  # the detail is behind the token
    reasons = {n: a["reason"] for n, a in public.items()}
    assert reasons == {
        "refused": "SourceNotAllowed",
        "closed": "DownloadFailed",
        "auth": "DownloadFailed",
        "hang": "DownloadTimeout",
    }
    for name, a in public.items():
        assert a["message"] and not _LEAKS.search(a["message"]), (name, a["message"])
    assert "HTTP 401" in public["auth"]["message"]
    assert "could not be reached" in public["closed"]["message"]
    assert str(closed) in details["closed"] and "127.0.0.2" in details["refused"]
