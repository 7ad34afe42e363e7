"""Pure helpers for kstatus-style conditions."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from loraplex.api.common import Condition, ConditionStatus


def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def set_condition(
    conditions: Sequence[Condition],
    type_: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    *,
    generation: int | None,
    at: datetime | None = None,
) -> list[Condition]:
    """Return `conditions` with `type_` set; lastTransitionTime moves only when status flips.

    Keeping the time when only the reason or message changes is what lets `kubectl wait` and
    kstatus tell "still failing, for a new reason" from "just started failing".
    """
    out: list[Condition] = []
    found = False
    for cond in conditions:
        if cond.type != type_:
            out.append(cond)
            continue
        found = True
        changed = cond.status != status
        out.append(
            Condition(
                type=type_,
                status=status,
                reason=reason,
                message=message,
                last_transition_time=(at or now()) if changed else cond.last_transition_time,
                observed_generation=generation,
            )
        )
    if not found:
        out.append(
            Condition(
                type=type_,
                status=status,
                reason=reason,
                message=message,
                last_transition_time=at or now(),
                observed_generation=generation,
            )
        )
    return out


def get_condition(conditions: Sequence[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)


def parse_conditions(raw: Any) -> list[Condition]:
    """Conditions from a stored status, skipping entries that are not conditions at all."""
    out = []
    for item in raw or []:
        try:
            out.append(Condition.model_validate(item))
        except ValueError:
            continue
    return out
