"""Domain errors of the server, and the one place they become HTTP responses.

Fetch and verify code raises these; the registry records them as an adapter's failure reason;
handlers turn them into OpenAI-style JSON bodies, so every 4xx/5xx a client sees has the same
shape as vLLM's own errors.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

# Machine reasons shown in AdapterReport.reason (and copied by the operator into conditions).
INVALID_SOURCE = "InvalidSource"
DOWNLOAD_FAILED = "DownloadFailed"
CHECKSUM_MISMATCH = "ChecksumMismatch"
RANK_EXCEEDS_MAX = "RankExceedsMax"
RANK_MISMATCH = "RankMismatch"
UNSUPPORTED_ADAPTER = "UnsupportedAdapter"
INCOMPATIBLE_BASE_MODEL = "IncompatibleBaseModel"
LOAD_FAILED = "LoadFailed"
NO_EFFECT = "NoEffect"


class AdapterError(Exception):
    """Something wrong with one adapter that retrying will not fix."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class TransientError(Exception):
    """A failure worth retrying: 5xx, connection errors, timeouts, truncated bodies."""


class VLLMUnavailable(Exception):
    """vLLM did not answer; the adapter is fine and will be loaded when vLLM is back."""


def error_body(message: str, err_type: str, code: str, param: str | None = None) -> dict[str, Any]:
    """The OpenAI error envelope, which the `openai` client turns into typed exceptions."""
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def json_error(
    status: int,
    message: str,
    *,
    err_type: str = "invalid_request_error",
    code: str = "invalid_request",
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    return web.json_response(
        error_body(message, err_type, code, param), status=status, headers=headers
    )
