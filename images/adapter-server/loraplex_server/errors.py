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
ADAPTER_TOO_LARGE = "AdapterTooLarge"
CACHE_FULL = "CacheFull"
SOURCE_NOT_ALLOWED = "SourceNotAllowed"
DOWNLOAD_TIMEOUT = "DownloadTimeout"
# Every reason above: the operator copies these onto LoRAAdapter conditions as they are.
FAILURE_REASONS = frozenset(
    {
        INVALID_SOURCE,
        DOWNLOAD_FAILED,
        CHECKSUM_MISMATCH,
        RANK_EXCEEDS_MAX,
        RANK_MISMATCH,
        UNSUPPORTED_ADAPTER,
        INCOMPATIBLE_BASE_MODEL,
        LOAD_FAILED,
        ADAPTER_TOO_LARGE,
        CACHE_FULL,
        SOURCE_NOT_ALLOWED,
        DOWNLOAD_TIMEOUT,
        NO_EFFECT,
    }
)


class AdapterError(Exception):
    """Something wrong with one adapter that retrying will not fix.

    `message` goes to the public adapter report and the LoRAAdapter status, so it says what
    failed without URLs, addresses, ports or exception class names; `detail` (for logs and the
    admin port only) may carry them.
    """

    def __init__(self, reason: str, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.detail = detail or message


class TransientError(Exception):
    """A failure worth retrying: 5xx, connection errors, timeouts, truncated bodies.

    Same split as AdapterError: `str(exc)` is the public message, `detail` the full story.
    """

    def __init__(self, message: str, detail: str = "", reason: str = DOWNLOAD_FAILED) -> None:
        super().__init__(message)
        self.detail = detail or message
        self.reason = reason


class VLLMUnavailable(Exception):
    """vLLM did not answer; the adapter is fine and will be loaded when vLLM is back."""


class Problem(Exception):
    """A request that ends in an error response: raised anywhere on the request path, turned
    into the OpenAI error envelope once, by `app.problems` (like Starlette's HTTPException)."""

    status = 400
    err_type = "invalid_request_error"
    code = "invalid_request"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        err_type: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status or self.status
        self.code = code or self.code
        self.err_type = err_type or self.err_type
        self.param = param
        self.retry_after = retry_after

    def response(self) -> web.Response:
        headers = {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, round(self.retry_after)))
        return json_error(
            self.status,
            self.message,
            err_type=self.err_type,
            code=self.code,
            param=self.param,
            headers=headers or None,
        )


class Unavailable(Problem):
    """503 with Retry-After: the request may succeed later (vLLM down, adapter loading, full)."""

    status = 503
    err_type = "ServiceUnavailable"
    code = "vllm_unavailable"

    def __init__(self, message: str = "vLLM is not available", **kw: Any) -> None:
        kw.setdefault("retry_after", RETRY_AFTER_SECONDS)
        super().__init__(message, **kw)


RETRY_AFTER_SECONDS = 5.0


class ModelNotFound(Problem):
    status = 404
    err_type = "NotFoundError"
    code = "model_not_found"


NAMES_SHOWN = 20  # served names listed in a 404: a base may serve 10,000 adapters


def model_not_found(name: str, served: list[str]) -> ModelNotFound:
    """A 404 that names a few served models and where to find the rest.

    The list is cut short so that a mistyped name costs a small answer, not every served
    name (about 150 kB at 10,000 adapters).
    """
    shown = ", ".join(served[:NAMES_SHOWN])
    if len(served) > NAMES_SHOWN:
        shown += f", ... and {len(served) - NAMES_SHOWN} more (GET /v1/models lists them all)"
    return ModelNotFound(
        f"The model `{name[:200]}` does not exist. Served models: {shown}", param="model"
    )


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
