"""Pure comparison of desired and observed objects: does the cluster need a write?"""

from __future__ import annotations

from typing import Any


def is_subset(desired: Any, observed: Any) -> bool:
    """True when every field we set is present in `observed` with the same value.

    Fields the API server adds (defaults, status, metadata) are ignored; lists must match
    element by element, so an extra container or env var added by hand is seen as drift.
    """
    if isinstance(desired, dict):
        if not isinstance(observed, dict):
            return False
        return all(is_subset(v, observed.get(k)) for k, v in desired.items())
    if isinstance(desired, list):
        if not isinstance(observed, list) or len(desired) != len(observed):
            return False
        return all(is_subset(d, o) for d, o in zip(desired, observed, strict=True))
    if isinstance(desired, int | float) and isinstance(observed, str):
        return str(desired) == observed  # resource quantities come back as strings
    return bool(desired == observed)


def drifted(desired: dict[str, Any], observed: dict[str, Any] | None) -> bool:
    """Whether `observed` lacks or contradicts anything in `desired` (the parts we own)."""
    if observed is None:
        return True
    wanted = {k: v for k, v in desired.items() if k not in ("stringData",)}
    return not is_subset(wanted, observed)
