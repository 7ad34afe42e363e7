"""`kubectl get`-style tables of loraplex objects, from the CRDs' own printer columns."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from loraplex.crdgen import build_crd


def _path(obj: dict[str, Any], json_path: str) -> Any:
    value: Any = obj
    for part in json_path.strip(".").split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _age(ts: str | None) -> str:
    if not ts:
        return "<unknown>"
    then = datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    secs = int((datetime.now(UTC) - then).total_seconds())
    return f"{secs}s" if secs < 120 else f"{secs // 60}m"


def table(kind: str, objects: list[dict[str, Any]], *, wide: bool = False) -> str:
    """Render objects as `kubectl get` would, using the columns declared in the CRD."""
    columns = build_crd(kind)["spec"]["versions"][0]["additionalPrinterColumns"]
    columns = [c for c in columns if wide or not c.get("priority")]
    header = ["NAME"] + [c["name"].upper() for c in columns]
    rows = [header]
    for obj in sorted(objects, key=lambda o: o["metadata"]["name"]):
        row = [obj["metadata"]["name"]]
        for c in columns:
            v = _path(obj, c["jsonPath"])
            row.append(_age(v) if c["type"] == "date" else ("<none>" if v is None else str(v)))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join(
        "   ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )
