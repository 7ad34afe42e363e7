"""The base-weights cache: where a model's weights live on a PVC, and the loader Job's state.

With `spec.weightsCache`, hf:// and s3:// weights are downloaded once, by a Job, into a folder
of a PVC named after the source and revision; every replica and restart then reads that folder
(read-only) instead of downloading 30-140 GB into its own emptyDir. The Deployment is applied
only once the Job for its folder has succeeded, so no pod starts against a half-filled cache.
A new revision gets a new folder and a new Job, while the running pods keep the old folder
until the new one is complete: changing the model is a normal rolling update.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from loraplex import naming
from loraplex.api.basemodel import BaseModelSpec, WeightsStatus
from loraplex_server.source_uri import parse_source_uri

WEIGHTS_MOUNT = "/mnt/loraplex/weights"
COMPLETE_MARKER = ".loraplex-complete"


@dataclass(frozen=True)
class WeightsCache:
    """Where one BaseModel's weights are cached, and the Job that fills the folder."""

    claim_name: str
    create_claim: bool
    folder: str  # relative to the PVC's root
    job_name: str

    @property
    def model_path(self) -> str:
        """What vLLM's --model becomes inside the pod."""
        return f"{WEIGHTS_MOUNT}/{self.folder}"


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")[:80] or "model"


def weights_cache(name: str, spec: BaseModelSpec) -> WeightsCache | None:
    """The cache layout, or None when weights are not cached (no weightsCache, or a pvc:// or
    image-path source, which is already local)."""
    cache = spec.weights_cache
    source = spec.model.source
    if cache is None or source.startswith("/"):
        return None
    uri = parse_source_uri(source)
    if uri.scheme not in ("hf", "s3"):
        return None
    revision = spec.model.revision or ""
    digest = hashlib.sha256(f"{source}\n{revision}".encode()).hexdigest()[:10]
    where = f"{uri.authority}/{uri.path}" if uri.path else uri.authority
    folder = f"{uri.scheme}/{_safe(where)}-{_safe(revision or 'default')}-{digest}"
    # Job names end up in a pod label (job-name), which allows 63 characters.
    job = f"{name[:40].rstrip('-.')}-weights-{digest}"
    return WeightsCache(
        claim_name=cache.claim_name or naming.weights_claim_name(name),
        create_claim=cache.claim_name is None,
        folder=folder,
        job_name=job,
    )


def _condition(job: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_ and cond.get("status") == "True":
            return dict(cond)
    return None


def loader_state(
    cache: WeightsCache,
    job: Mapping[str, Any] | None,
    expected_bytes: int | None,
    failure_message: str | None = None,
) -> WeightsStatus:
    """The weights' phase from the loader Job as the Job controller reports it."""
    status = (job or {}).get("status") or {}
    out = WeightsStatus(
        claim_name=cache.claim_name,
        path=cache.folder,
        job=cache.job_name,
        expected_bytes=expected_bytes,
        attempts=int(status.get("failed") or 0),
        start_time=status.get("startTime"),
        completion_time=status.get("completionTime"),
    )
    size = f"{expected_bytes / 1024**3:.1f} GiB" if expected_bytes else "unknown size"
    if job is None:
        out.phase = "Pending"
        out.message = f"creating loader Job {cache.job_name} ({size})"
    elif _condition(job, "Complete") or int(status.get("succeeded") or 0) > 0:
        out.phase = "Ready"
        out.message = f"weights cached in PVC {cache.claim_name} at {cache.folder}"
    elif failed := _condition(job, "Failed"):
        out.phase = "Failed"
        why = failure_message or failed.get("message") or failed.get("reason") or "failed"
        out.message = (
            f"loader Job {cache.job_name} failed after {out.attempts} attempt(s): {why}; fix "
            "the source or spec.credentials, then `kubectl delete job "
            f"{cache.job_name}` and the operator starts it again"
        )
    else:
        out.phase = "Downloading"
        active = int(status.get("active") or 0)
        out.message = (
            f"loader Job {cache.job_name} downloading {size} into PVC {cache.claim_name} "
            f"({active} pod(s) active, {out.attempts} failed attempt(s)"
            + (f", started {out.start_time})" if out.start_time else ")")
        )
    return out


def job_succeeded(job: Mapping[str, Any] | None) -> bool:
    return job is not None and (
        _condition(job, "Complete") is not None
        or int(((job.get("status") or {}).get("succeeded")) or 0) > 0
    )


def failure_message(pods: Sequence[Mapping[str, Any]], job_name: str) -> str | None:
    """The loader's own words for its last failure (its termination message), if any pod of
    the Job left one: the Job's condition only says BackoffLimitExceeded."""
    newest: tuple[str, str] | None = None
    for pod in pods:
        labels = (pod.get("metadata") or {}).get("labels") or {}
        if job_name not in (labels.get("job-name"), labels.get("batch.kubernetes.io/job-name")):
            continue
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            term = (cs.get("state") or {}).get("terminated") or {}
            if term.get("exitCode") and term.get("message"):
                when = str(term.get("finishedAt") or "")
                if newest is None or when >= newest[0]:
                    newest = (when, str(term["message"]).strip()[-500:])
    return newest[1] if newest else None
