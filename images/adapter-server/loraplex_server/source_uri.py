"""Parsing adapter and model source URIs: one definition shared by the operator and server.

The operator rejects a bad source with `InvalidSource` before it reaches a pod; the server
parses the same way before it downloads, so both give the same verdict and message.
"""

from __future__ import annotations

import functools
import posixpath
import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote, urlsplit

Scheme = Literal["hf", "s3", "https", "http", "pvc"]
SCHEMES: tuple[str, ...] = ("hf", "s3", "https", "http", "pvc")
MAX_URI_LENGTH = 2048
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
_CLAIM_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_HF_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# A control character or any Unicode whitespace (`\s` in a str pattern is `str.isspace`).
_UNSAFE_CHAR = re.compile(r"[\x00-\x1f\s]")


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
    # http(s) only: the path exactly as written (still percent-encoded, so `%3F` stays part
    # of a file name) and the query (presigned URLs carry their signature there).
    encoded_path: str = ""
    query: str = ""

    @property
    def is_archive(self) -> bool:
        return self.path.endswith(ARCHIVE_SUFFIXES)

    def url(self, file: str | None = None) -> str:
        """The http(s) URL to request, optionally for one file under a folder URL."""
        path = self.encoded_path
        if file is not None:
            path = path.rstrip("/") + "/" + file
        return f"{self.scheme}://{self.authority}{path}" + (f"?{self.query}" if self.query else "")

    def shown(self, file: str | None = None) -> str:
        """The URL for logs: a query may hold a signature, so only its presence shows."""
        url = self.url(file)
        return url.split("?", 1)[0] + ("?<redacted>" if self.query else "")


def _shown(raw: str) -> str:
    """The URI as it may appear in messages: credentials removed, length capped.

    Messages end up in status conditions and logs, which must never carry secrets.
    """
    parts = urlsplit(raw)
    if parts.username or parts.password:
        raw = raw.replace(parts.netloc, "***@" + (parts.hostname or ""), 1)
    if parts.query:
        raw = raw.split("?", 1)[0] + "?<redacted>"
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
    return _parse(raw)


@functools.lru_cache(maxsize=32_768)
def _parse(raw: str) -> SourceURI:
    """Cached: a reconcile pass checks every adapter's source several times, and at 10,000
    adapters parsing was half of a pass (the result is frozen; refusals are not cached)."""
    if len(raw) > MAX_URI_LENGTH:
        raise SourceError(f"source is {len(raw)} characters long; the limit is {MAX_URI_LENGTH}")
    if _UNSAFE_CHAR.search(raw):
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
        parts.netloc.lower(),
        _safe_relative(parts.path, raw),
        raw,
        encoded_path="/" + parts.path.lstrip("/"),
        query=parts.query,
    )


def sha256_problem(src: SourceURI) -> str | None:
    """Why spec.sha256 cannot be checked for this source, or None when it can.

    A sha256 is checked against one downloaded file, so it fits an https archive only. For a
    folder URL, s3:// or hf:// it would cover some files and not others: refusing it is
    better than a checksum that silently protects nothing.
    """
    if src.scheme in ("http", "https") and src.is_archive:
        return None
    return (
        "spec.sha256 can only be checked for an https:// archive (.tar, .tar.gz, .tgz, "
        ".tar.bz2, .tar.xz); remove it, package the adapter as one archive, or for hf:// pin "
        "spec.revision to a commit"
    )
