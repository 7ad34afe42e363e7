"""Which origins an adapter download may reach: the pod's guard against request forgery.

An adapter source is written by whoever may create LoRAAdapters, and the pod sits inside the
cluster, next to vLLM's unauthenticated routes, the admin port, cloud metadata endpoints and
every Service. So a download may go only to public addresses, unless the BaseModel names a
private network in spec.adapterLimits.privateNetworks. The check runs at connect time, on the
addresses the name resolved to (the connector then connects to exactly those), so DNS tricks
(a name that resolves to 127.0.0.1, a rebinding second answer) and redirects are checked too.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class BlockedAddress(Exception):
    """A host that resolved to an address downloads may not reach.

    Not an OSError on purpose: aiohttp wraps OSErrors from resolvers into generic connection
    errors, and this one must stay recognisable to become `SourceNotAllowed`.
    """

    def __init__(self, host: str, address: str) -> None:
        super().__init__(f"{host} resolves to {address}, which is not a public address")
        self.host = host
        self.address = address


def parse_networks(networks: Sequence[str]) -> list[IPNetwork]:
    return [ipaddress.ip_network(n, strict=False) for n in networks]


def address_allowed(address: str, allowed: Sequence[IPNetwork]) -> bool:
    """Public (globally routable) addresses, plus those inside an allowlisted network.

    `is_global` is false for loopback, link-local (cloud metadata at 169.254.169.254),
    RFC 1918 and unique-local ranges, shared address space (100.64/10, common for cluster
    Service and Pod ranges), reserved, unspecified and multicast addresses.
    """
    ip: IPAddress = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    if any(ip.version == n.version and ip in n for n in allowed):
        return True
    return ip.is_global and not ip.is_multicast


def literal_address(host: str) -> str | None:
    """The host if it is an IP literal (aiohttp connects to those without any resolver)."""
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None


class GuardedResolver(AbstractResolver):
    """Resolves like aiohttp's default, then refuses if any answer is not allowed.

    Refusing when any (not all) answer is private leaves no room for the connector to fall
    back from a refused address to another one it happens to try first.
    """

    def __init__(self, allowed: Sequence[IPNetwork]) -> None:
        self._inner = DefaultResolver()
        self._allowed = list(allowed)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        name = host.lower().rstrip(".")
        local = name == "localhost" or name.endswith(".localhost")
        if local and not address_allowed("127.0.0.1", self._allowed):
            raise BlockedAddress(host, "127.0.0.1")
        answers = await self._inner.resolve(host, port, family)
        for a in answers:
            if not address_allowed(a["host"], self._allowed):
                raise BlockedAddress(host, a["host"])
        return answers

    async def close(self) -> None:
        await self._inner.close()
