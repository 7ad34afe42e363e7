"""The limits a real kube-apiserver enforces that loraplex can run into, for the emulator.

The in-memory emulator would otherwise accept a 5 MB ConfigMap that a real cluster refuses,
and no test would notice until production. `refusal()` is a pure check of one write: given
the kind, the object as it would be stored, and the object before (for updates), it returns
the status code and message the API server would answer, or None. The messages follow the
real server's (`ConfigMap "x" is invalid: []: Too long: must have at most 1048576 bytes`).

Covered: the 3 MiB request body cap (413), the 1 MiB data cap of ConfigMaps and Secrets
(422), object names over 253 and label values over 63 characters (422), and a Deployment's
immutable `spec.selector` (422).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MAX_REQUEST_BYTES = 3 * 1024 * 1024  # kube-apiserver --max-request-body-bytes default
MAX_DATA_BYTES = 1024 * 1024  # corev1 MaxSecretSize, also the ConfigMap cap
MAX_NAME = 253
MAX_LABEL_VALUE = 63


@dataclass(frozen=True)
class Refusal:
    code: int
    reason: str
    message: str

    def status(self) -> dict[str, Any]:
        """The metav1.Status body the API server sends."""
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }


def _invalid(kind: str, name: str, detail: str) -> Refusal:
    return Refusal(422, "Invalid", f'{kind} "{name}" is invalid: {detail}')


def _data_bytes(kind: str, obj: Mapping[str, Any]) -> int:
    """Bytes of data as the API server counts them (decoded, keys excluded for ConfigMaps)."""
    total = 0
    for key, value in (obj.get("data") or {}).items():
        if kind == "Secret":
            try:
                total += len(key) + len(base64.b64decode(str(value)))
            except binascii.Error:
                total += len(key) + len(str(value))
        else:
            total += len(str(value).encode())
    for key, value in (obj.get("stringData") or {}).items():
        total += len(key) + len(str(value).encode())
    for value in (obj.get("binaryData") or {}).values():
        try:
            total += len(base64.b64decode(str(value)))
        except binascii.Error:
            total += len(str(value))
    return total


def refusal(
    kind: str,
    body_bytes: int,
    obj: Mapping[str, Any] | None,
    before: Mapping[str, Any] | None = None,
) -> Refusal | None:
    """What the API server would refuse about this write, or None.

    `obj` is the object as it would be stored (a patch already merged into `before`).
    """
    if body_bytes > MAX_REQUEST_BYTES:
        return Refusal(
            413,
            "RequestEntityTooLarge",
            f"Request entity too large: limit is {MAX_REQUEST_BYTES}",
        )
    if obj is None:
        return None
    meta = obj.get("metadata") or {}
    name = str(meta.get("name") or "")
    if len(name) > MAX_NAME:
        return _invalid(
            kind,
            name,
            f'metadata.name: Invalid value: "{name}": must be no more than {MAX_NAME} characters',
        )
    for key, value in (meta.get("labels") or {}).items():
        if isinstance(value, str) and len(value) > MAX_LABEL_VALUE:
            return _invalid(
                kind,
                name,
                f'metadata.labels: Invalid value: "{value}": must be no more than '
                f"{MAX_LABEL_VALUE} characters (label {key})",
            )
    if kind in ("ConfigMap", "Secret") and _data_bytes(kind, obj) > MAX_DATA_BYTES:
        where = "[]" if kind == "ConfigMap" else "data"
        return _invalid(kind, name, f"{where}: Too long: must have at most {MAX_DATA_BYTES} bytes")
    if kind == "Deployment" and before is not None:
        old = (before.get("spec") or {}).get("selector")
        new = (obj.get("spec") or {}).get("selector")
        if old is not None and new != old:
            return _invalid(
                "Deployment.apps",
                name,
                f"spec.selector: Invalid value: {json.dumps(new, sort_keys=True)}: "
                "field is immutable",
            )
    return None
