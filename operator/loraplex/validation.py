"""Turning raw objects into validated specs, with errors that name the field and the fix."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from loraplex.errors import InvalidSpec

M = TypeVar("M", bound=BaseModel)
_MAX_MESSAGE = 600


def field_path(prefix: str, loc: tuple[int | str, ...]) -> str:
    """`spec.lora.maxLoraRank` style paths from a pydantic error location."""
    out = prefix
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def parse_spec(model: type[M], raw: Mapping[str, Any] | None, prefix: str = "spec") -> M:
    """Validate `raw` into `model`, or raise InvalidSpec for the first bad field."""
    if raw is not None and not isinstance(raw, Mapping):
        raise InvalidSpec(prefix, f"must be an object, not {type(raw).__name__}")
    try:
        return model.model_validate(dict(raw or {}))
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = errors[0]
        where = field_path(prefix, tuple(first["loc"]))
        msg = first["msg"]
        if first["type"] == "extra_forbidden":
            msg = "unknown field; remove it or check its spelling against `kubectl explain`"
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        raise InvalidSpec(where, (msg + more)[:_MAX_MESSAGE]) from None
