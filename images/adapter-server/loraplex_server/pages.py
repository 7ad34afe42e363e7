"""Paging `GET /v1/adapters`, so a pod with 10,000 declared adapters answers in pieces.

Without `limit` the whole list comes back, as before (older pollers keep working). With
`?limit=N` (1..MAX_LIMIT) it returns the first N adapters by name after `?continue=` and sets
`continue` when more remain; the token is the last name returned, so a page stays correct
while adapters are added or removed between calls (like the Kubernetes list `continue`, but
without a snapshot: the caller compares `generation` across pages to see a change).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from loraplex_server.manifest import ADAPTER_NAME_RE, AdaptersResponse
from loraplex_server.registry import Registry

MAX_LIMIT = 1000


class BadPage(ValueError):
    """A `limit` or `continue` the caller must fix; the message names which."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def page_args(query: Mapping[str, str]) -> tuple[int | None, str | None]:
    raw_limit, after = query.get("limit"), query.get("continue") or None
    limit = None
    if raw_limit is not None:
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_LIMIT:
            raise BadPage("limit", f"limit must be an integer from 1 to {MAX_LIMIT}")
        limit = int(raw_limit)
    if after is not None and not ADAPTER_NAME_RE.fullmatch(after):
        raise BadPage("continue", "continue must be the token a previous page returned")
    return limit, after


ANY = "*"  # If-None-Match: * matches whatever version is current (RFC 9110 13.1.2)


def etags(if_none_match: str) -> frozenset[str]:
    """The versions an If-None-Match header names (RFC 9110: `*`, or a list of quoted tags,
    weak or strong; a weak match is enough for GET). Anything else names none."""
    if if_none_match.strip() == ANY:
        return frozenset({ANY})
    tags = (t.strip().removeprefix("W/") for t in if_none_match.split(","))
    return frozenset(t[1:-1] for t in tags if len(t) >= 2 and t[0] == t[-1] == '"')


def if_none_match(versions: Collection[str]) -> str:
    """The header that names `versions` again (a follower forwarding its caller's)."""
    if ANY in versions:
        return ANY
    return ", ".join(f'"{v}"' for v in sorted(versions))


def unchanged(version: str, versions: Collection[str]) -> bool:
    return version in versions or ANY in versions


def adapters_page(reg: Registry, limit: int | None, after: str | None) -> AdaptersResponse:
    """One page of the report; only the adapters on it are rendered."""
    names = sorted(n for n in reg.entries if after is None or n > after)
    more = limit is not None and len(names) > limit
    names = names[:limit] if limit is not None else names
    return AdaptersResponse(
        generation=reg.manifest.generation,
        base_served_name=reg.manifest.base_served_name,
        vllm_healthy=reg.vllm_healthy,
        adapters=[reg.entries[n].report() for n in names],
        continue_=names[-1] if more and names else None,
    )
