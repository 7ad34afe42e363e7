"""The pure core of a reconcile: from a BaseModel and its adapters to the objects to apply.

Both the operator (`loraplex.reconcile`) and `loraplex render` call `decide`, so what GitOps
users diff offline is exactly what the operator applies.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from loraplex.adapters import (
    Candidate,
    Verdict,
    build_manifest,
    judge,
    manifest_limits,
    rank_verdict,
    read_candidate,
    same_content,
)
from loraplex.api.basemodel import BaseModelSpec
from loraplex.errors import InvalidSpec
from loraplex.planner import AdapterDemand, Plan, plan_base_model
from loraplex.planner.footprint import model_footprint
from loraplex.planner.modules import base_modules
from loraplex.render import (
    DEFAULT_IMAGES,
    DEFAULT_OPERATOR_PODS,
    Images,
    OperatorPods,
    Owner,
    render_all,
    render_routing,
)
from loraplex.routing import ALL_APIS, Capabilities, RoutingProblem
from loraplex.validation import parse_spec
from loraplex_server.manifest import AdapterManifest
from loraplex_server.manifest_shards import ManifestTooLarge


@dataclass
class Decision:
    """What should exist for one BaseModel; `objects` is empty when nothing may be applied."""

    invalid: InvalidSpec | None = None
    spec: BaseModelSpec | None = None
    plan: Plan | None = None
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    manifest: AdapterManifest | None = None
    objects: list[dict[str, Any]] = field(default_factory=list)
    # spec.routing/autoscaling asked for an API the cluster lacks; the rest is still applied.
    routing_problem: RoutingProblem | None = None


def decide(
    owner: Owner,
    raw_spec: Mapping[str, Any] | None,
    adapters: Sequence[Mapping[str, Any]],
    *,
    token: str,
    previous: AdapterManifest | None,
    previous_generation: int = 0,
    images: Images = DEFAULT_IMAGES,
    config_json: Mapping[str, Any] | None = None,
    operator: OperatorPods = DEFAULT_OPERATOR_PODS,
    caps: Capabilities = ALL_APIS,
    read: Callable[[Mapping[str, Any]], Candidate] = read_candidate,
) -> Decision:
    """Validate, plan, build the manifest (bumping its generation only on change), render.

    `read` parses one LoRAAdapter; the operator passes one that remembers unchanged adapters
    (parsing 10,000 specs was a third of the pass that hot-adds the 10,001st)."""
    try:
        spec = parse_spec(BaseModelSpec, raw_spec)
    except InvalidSpec as exc:
        return Decision(invalid=exc)
    cands = [read(a) for a in adapters]
    verdicts = judge(owner.name, spec, cands)
    accepted = [c for c in cands if verdicts[c.name].accepted]
    plan = plan_base_model(
        spec,
        [AdapterDemand(c.name, c.spec.rank, c.spec.pinned) for c in accepted if c.spec],
        config_json=config_json,
        running_rank=previous.max_lora_rank if previous else None,
    )
    ranks = {c.name: c.spec.rank if c.spec else None for c in accepted}
    for n in plan.rank_exceeded:
        verdicts[n] = rank_verdict(n, ranks.get(n), plan.max_lora_rank)
    accepted = [c for c in accepted if verdicts[c.name].accepted]
    decision = Decision(spec=spec, plan=plan, verdicts=verdicts)
    if not plan.feasible:
        return decision
    decision.manifest = next_manifest(
        owner.name,
        spec,
        plan,
        accepted,
        previous,
        previous_generation,
        base_modules=base_modules(spec, config_json),
    )
    footprint = model_footprint(spec, plan.max_lora_rank, config_json)
    try:
        decision.objects = render_all(
            owner, spec, plan, decision.manifest, token, images, operator, footprint=footprint
        )
    except ManifestTooLarge as exc:
        return Decision(invalid=InvalidSpec("LoRAAdapters", str(exc)), spec=spec, plan=plan)
    try:
        decision.objects += render_routing(owner, spec, caps)
    except RoutingProblem as exc:
        decision.routing_problem = exc
    return decision


def next_manifest(
    name: str,
    spec: BaseModelSpec,
    plan: Plan,
    accepted: Sequence[Candidate],
    previous: AdapterManifest | None,
    previous_generation: int,
    base_modules: dict[str, tuple[int, int]] | None = None,
) -> AdapterManifest:
    """The manifest to publish; its generation moves only when its content changes."""
    prev = max(previous.generation if previous else 0, previous_generation)
    manifest = build_manifest(
        generation=prev,
        base_served_name=spec.model.served_name or name,
        base_model=spec.model.source,
        max_loras=plan.max_loras,
        max_lora_rank=plan.max_lora_rank,
        max_cpu_loras=plan.max_cpu_loras,
        accepted=accepted,
        limits=manifest_limits(spec),
        base_modules=base_modules,
        checks=spec.adapter_checks,
    )
    if previous is None or not same_content(manifest, previous) or previous.generation < prev:
        manifest = manifest.model_copy(update={"generation": prev + 1})
    return manifest
