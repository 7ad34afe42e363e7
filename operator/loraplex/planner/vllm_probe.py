"""Measure what a running vLLM really allocated, to check the planner against it.

These functions run inside a vLLM worker process (sent with `LLM.collective_rpc`), so they
take the worker and return plain data. They live in the package, not in a test module,
because the worker unpickles them by reference and must be able to import them.
"""

from __future__ import annotations

from typing import Any


def _tensors(value: Any) -> list[Any]:
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def measure_worker(worker: Any) -> dict[str, Any]:
    """Bytes of LoRA slot buffers and of model weights held by one worker.

    LoRA buffers are plain tensor attributes (not parameters) of the LoRA-wrapped layers, named
    `lora_*`; views of the same storage (e.g. `lora_a_stacked_2d`) are counted once, because
    they cost no memory of their own.
    """
    model = worker.model_runner.model
    seen: set[int] = set()
    lora_bytes = 0
    lora_tensors: list[dict[str, Any]] = []
    for mod_name, module in model.named_modules():
        for attr, value in vars(module).items():
            if not attr.startswith("lora_") and "lora" not in attr:
                continue
            for tensor in _tensors(value):
                key = tensor.untyped_storage().data_ptr()
                if key in seen:
                    continue
                seen.add(key)
                size = tensor.untyped_storage().nbytes()
                lora_bytes += size
                lora_tensors.append(
                    {
                        "module": mod_name,
                        "attr": attr,
                        "shape": list(tensor.shape),
                        "dtype": str(tensor.dtype),
                        "bytes": size,
                    }
                )
    weight_bytes = 0
    weight_seen: set[int] = set()
    repacked = 0
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if param.numel() == 0 and hasattr(module, "cpu_linear"):
                # vLLM's CPU backend moves linear weights into opaque oneDNN handles and
                # empties the Parameter; count what create_weights allocated instead.
                size = module.output_size_per_partition * module.input_size_per_partition
                weight_bytes += size * module.params_dtype.itemsize
                repacked += 1
                continue
            key = param.untyped_storage().data_ptr()
            if key in weight_seen or param.numel() == 0:
                continue
            weight_seen.add(key)
            weight_bytes += param.untyped_storage().nbytes()
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    return {
        "lora_bytes": lora_bytes,
        "lora_tensor_count": len(lora_tensors),
        "lora_tensors": lora_tensors,
        "weight_bytes": weight_bytes,
        "repacked_linear_weights": repacked,
        "buffer_bytes": buffer_bytes,
    }


def run_probe(
    model: str, max_loras: int, max_lora_rank: int, max_model_len: int = 256, tp: int = 1
) -> list[dict[str, Any]]:
    """Start a CPU vLLM with LoRA enabled and measure each worker (about 30 s on 2 cores);
    one result per tensor-parallel rank.

    Call it in a fresh process (see `main`): vLLM's engine processes and its global state are
    torn down most reliably by process exit.
    """
    import os

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if tp > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        # vllm-cpu binds each tensor-parallel worker to its own NUMA node and refuses
        # ("Not enough allowed NUMA nodes to bind threads of 2 local CPUWorkers") on a one-node
        # machine; binding each rank to its own core by hand is what the message suggests.
        cpus = sorted(os.sched_getaffinity(0))
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(
            str(cpus[i % len(cpus)]) for i in range(tp)
        )
    from vllm import LLM

    llm = LLM(
        model=model,
        enable_lora=True,
        max_loras=max_loras,
        max_lora_rank=max_lora_rank,
        dtype="bfloat16",
        max_model_len=max_model_len,
        enforce_eager=True,
        tensor_parallel_size=tp,
    )
    results: list[dict[str, Any]] = llm.collective_rpc(measure_worker)
    return results


def main() -> None:
    """`python -m loraplex.planner.vllm_probe MODEL MAX_LORAS MAX_LORA_RANK [TP]` -> JSON on
    the last stdout line: rank 0's measurement, with every rank's under `ranks`."""
    import json
    import sys

    model, loras, rank = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    tp = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    results = run_probe(model, loras, rank, tp=tp)
    print("\nPROBE " + json.dumps({**results[0], "ranks": results}), flush=True)


if __name__ == "__main__":
    main()
