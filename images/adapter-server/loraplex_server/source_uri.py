"""Parsing adapter and model source URIs: one definition shared by the operator and server.

The operator rejects a bad source with `InvalidSource` before it reaches a pod; the server
parses the same way before it downloads, so both give the same verdict and message.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote, urlsplit

Scheme = Literal["hf", "s3", "https", "http", "pvc"]
SCHEMES: tuple[str, ...] = ("hf", "s3", "https", "http", "pvc")
MAX_URI_LENGTH = 2048
_CLAIM_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_HF_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class SourceError(ValueError):
    """A source URI that cannot be used; the message says what to write instead."""


def checked_source(raw: str) -> str:
    """`raw` unchanged if it parses (a pydantic validator: SourceError is a ValueError)."""
    parse_source_uri(raw)
    return raw


@dataclass(frozen=True)
class SourceURI:
    """A parsed source. `path` is relative (never absolute, never containing '..')."""

    scheme: Scheme
    authority: str  # hf: "org/repo"; s3: bucket; https: host[:port]; pvc: claim name
    path: str
    raw: str


def _shown(raw: str) -> str:
    """The URI as it may appear in messages: credentials removed, length capped.

    Messages end up in status conditions and logs, which must never carry secrets.
    """
    parts = urlsplit(raw)
    if parts.username or parts.password:
        raw = raw.replace(parts.netloc, "***@" + (parts.hostname or ""), 1)
    return raw if len(raw) <= 200 else raw[:200] + "..."


def _safe_relative(path: str, raw: str) -> str:
    decoded = unquote(path)
    parts = [p for p in decoded.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts) or "\\" in decoded or "\x00" in decoded:
        raise SourceError(f"source {_shown(raw)!r} must not contain '..', backslashes or NUL bytes")
    return posixpath.join(*parts) if parts else ""


def parse_source_uri(raw: str) -> SourceURI:
    """Parse and check a source URI; raise SourceError naming the fix."""
    if not isinstance(raw, str) or not raw:
        raise SourceError(
            "source is empty: use hf://org/repo, s3://bucket/prefix, "
            "https://host/file or pvc://claim/path"
        )
    if len(raw) > MAX_URI_LENGTH:
        raise SourceError(f"source is {len(raw)} characters long; the limit is {MAX_URI_LENGTH}")
    if any(ord(c) < 0x20 or c.isspace() for c in raw):
        raise SourceError("source must not contain whitespace or control characters")
    parts = urlsplit(raw)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise SourceError(
            f"source scheme {parts.scheme or '(none)'!r} is not supported: use hf://, s3://, "
            "https:// or pvc://"
        )
    if scheme == "hf":
        repo = (parts.netloc + "/" + parts.path.lstrip("/")).strip("/")
        segments = repo.split("/")
        repo_id = "/".join(segments[:2])
        if not _HF_REPO_RE.fullmatch(repo_id) or ".." in repo_id:
            raise SourceError(f"source {_shown(raw)!r} must look like hf://org/repo[/subfolder]")
        sub = _safe_relative("/".join(segments[2:]), raw)
        return SourceURI("hf", repo_id, sub, raw)
    if scheme == "s3":
        if not _BUCKET_RE.fullmatch(parts.netloc):
            raise SourceError(f"source {_shown(raw)!r} must look like s3://bucket/prefix")
        return SourceURI("s3", parts.netloc, _safe_relative(parts.path, raw), raw)
    if scheme == "pvc":
        if not _CLAIM_RE.fullmatch(parts.netloc):
            raise SourceError(
                f"source {_shown(raw)!r} must look like pvc://claim/path with a valid claim name"
            )
        return SourceURI("pvc", parts.netloc, _safe_relative(parts.path, raw), raw)
    if not parts.netloc or parts.username or parts.password:
        raise SourceError(
            f"source {_shown(raw)!r} must look like https://host/path, without credentials in "
            "the URL (put them in spec.credentials.secretRef)"
        )
    return SourceURI(
        "https" if scheme == "https" else "http",
        parts.netloc,
        _safe_relative(parts.path, raw),
        raw,
    )
