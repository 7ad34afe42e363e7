"""Domain errors, mapped to kopf's retry semantics once, at the handler boundary."""

from __future__ import annotations


class LoraplexError(Exception):
    """Base of the operator's own errors."""


class KubeError(LoraplexError):
    """The Kubernetes API answered with an error (status 0: it could not be reached)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class InvalidSpec(LoraplexError):
    """The object's spec cannot be served as written; `field` and the message say the fix."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
