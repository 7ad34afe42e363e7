"""The loraplex.io/v1alpha1 API as pydantic models: the single source of the CRD schemas."""

from loraplex.api.basemodel import BaseModelResource, BaseModelSpec, BaseModelStatus
from loraplex.api.common import Condition
from loraplex.api.loraadapter import LoRAAdapterResource, LoRAAdapterSpec, LoRAAdapterStatus
from loraplex.api.plan import PlanBreakdown, PlanStatus

__all__ = [
    "BaseModelResource",
    "BaseModelSpec",
    "BaseModelStatus",
    "Condition",
    "LoRAAdapterResource",
    "LoRAAdapterSpec",
    "LoRAAdapterStatus",
    "PlanBreakdown",
    "PlanStatus",
]
