"""Building blocks shared by both kinds: camelCase wire models, conditions, int-or-auto."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from pydantic.alias_generators import to_camel

# Custom keys the CRD generator passes through untouched.
CEL = "x-kubernetes-validations"


class Wire(BaseModel):
    """A Kubernetes-shaped object: camelCase on the wire and unknown fields refused.

    Refusing unknown fields matters because a typo such as `maxLora` would otherwise be
    silently ignored and the user would get defaults they did not ask for.
    """

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", validate_default=True
    )

    def dump(self) -> dict[str, Any]:
        """The JSON form Kubernetes stores (camelCase, no nulls)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


IntOrAuto = Annotated[
    Annotated[int, Field(ge=1)] | Literal["auto"],
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            CEL: [
                {
                    "rule": "type(self) == string ? self == 'auto' : self >= 1",
                    "message": "must be a positive integer or 'auto'",
                }
            ],
        }
    ),
]

ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(Wire):
    """A kstatus-compatible condition (the shape of metav1.Condition)."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="ignore", validate_default=True
    )

    type: str = Field(description="Condition type, e.g. Ready, Planned, Accepted.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(default="", description="Machine-readable CamelCase reason.")
    message: str = Field(default="", description="What happened and how to fix it.")
    last_transition_time: datetime | None = Field(
        default=None, description="When status last changed."
    )
    observed_generation: int | None = Field(
        default=None, description="The .metadata.generation this condition was computed for."
    )


Conditions = Annotated[
    list[Condition],
    Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    ),
]


class ObjectRef(Wire):
    """A reference to an object by name in the same namespace."""

    name: str = Field(min_length=1, max_length=253, description="Object name.")


class Metadata(BaseModel):
    """The subset of ObjectMeta the operator reads; everything else is passed through."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, alias_generator=to_camel)

    name: str = ""
    namespace: str = "default"
    uid: str = ""
    generation: int = 0
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
