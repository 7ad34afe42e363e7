"""The GPU memory planner: vLLM's LoRA and memory flags, computed from the model and GPU.

Pure functions only; the operator and `loraplex plan` call `plan_base_model` with the same
inputs and get the same `Plan`. See plan.py for the rules and lora_memory.py for how the LoRA
slot buffers follow vLLM's allocation.
"""

from loraplex.planner.architecture import ModelShape, shape_from_config, weight_bytes
from loraplex.planner.catalog import GPUS, MODELS, find_gpu, find_model
from loraplex.planner.cli import PlanInputs, add_plan_parser, plan_cli_inputs, run_plan
from loraplex.planner.lora_memory import lora_slot_bytes
from loraplex.planner.plan import allowed_rank_at_least, plan_base_model
from loraplex.planner.result import AdapterDemand, Breakdown, Plan, vllm_flags

__all__ = [
    "GPUS",
    "MODELS",
    "AdapterDemand",
    "Breakdown",
    "ModelShape",
    "Plan",
    "PlanInputs",
    "add_plan_parser",
    "allowed_rank_at_least",
    "find_gpu",
    "find_model",
    "lora_slot_bytes",
    "plan_base_model",
    "plan_cli_inputs",
    "run_plan",
    "shape_from_config",
    "vllm_flags",
    "weight_bytes",
]
