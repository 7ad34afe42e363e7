"""Whole-chain benchmark: cold start, hot add, and the restart a user would otherwise need.

`python -m bench.chain_bench` (or `run()` from Python) runs, in one go on this machine:

1. **Cold start.** The demo chain (`loraplex.demo.chain`): the API stand-in, the operator as
   a real process, `kubectl apply` of examples/ (BaseModel + two LoRAAdapters), the rendered
   pod run as local processes (CPU vLLM + loraplex-server). Measured: apply -> pod Ready
   (`/readyz`, pinned adapter loaded) and apply -> first successful completion through the
   pod with the `openai` client. vLLM's own start dominates on CPU.
2. **Hot add.** `N` times: apply a new LoRAAdapter (files already on the PVC claim folder) and
   poll completions for it through the pod until the first 200. vLLM keeps running.
3. **Restart.** What a user without loraplex does: stop vLLM and start it again with the
   adapter in `--lora-modules name=path` (same tiny model, the pod's vLLM flags), timed from
   the decision (the stop) to the adapter's first successful completion. Each restart adds
   one more adapter, as adapters accumulate. The restarts use the same adapter files as the
   first hot adds, so their greedy outputs are compared too.

It prints a markdown table and the JSON behind it, and exits non-zero on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import openai

from loraplex import naming
from loraplex.demo.chain import BASE, CLAIM, NS, PROMPT, Chain
from loraplex.devtools.emulator import RunningEmulator
from loraplex.devtools.kubelet import LocalPod, stop_containers
from loraplex.devtools.processes import Managed, start_vllm
from loraplex.devtools.tinymodel import make_adapter, make_model
from loraplex.kube import KubeClient

MAX_TOKENS = 12
# Flags start_vllm sets itself (from the pod's values below) or that only make sense in a pod.
_OWN_FLAGS = {
    "--model",
    "--served-model-name",
    "--host",
    "--port",
    "--enable-lora",
    "--max-loras",
    "--max-lora-rank",
    "--max-cpu-loras",
    "--dtype",
    "--max-model-len",
}


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def _stats(values: list[float]) -> dict[str, Any]:
    return {
        "runs": [round(v, 3) for v in values],
        "median": round(statistics.median(values), 3),
        "p90": round(_pct(values, 90), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def _other_vllms() -> int:
    """vLLM servers already running (someone else's): they would skew every number here."""
    count = 0
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"vllm.entrypoints" in cmdline.read_bytes():
                count += 1
        except OSError:
            pass
    return count


def _flag(argv: list[str], name: str, default: int) -> int:
    return int(argv[argv.index(name) + 1]) if name in argv else default


def pod_vllm_flags(argv: list[str]) -> tuple[dict[str, int], list[str]]:
    """Split the pod's vLLM argv into start_vllm's keyword values and the remaining flags."""
    kwargs = {
        "max_loras": _flag(argv, "--max-loras", 2),
        "max_lora_rank": _flag(argv, "--max-lora-rank", 8),
        "max_cpu_loras": _flag(argv, "--max-cpu-loras", 4),
        "max_model_len": _flag(argv, "--max-model-len", 256),
    }
    start = argv.index("--model") if "--model" in argv else len(argv)
    rest: list[str] = []
    i = start
    while i < len(argv):
        token = argv[i]
        has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
        if token in _OWN_FLAGS:
            i += 2 if has_value else 1
            continue
        rest.append(token)
        i += 1
    return kwargs, rest


async def _first_completion(
    client: openai.AsyncOpenAI, model: str, t0: float, limit: float, proc: Managed | None = None
) -> tuple[float, str]:
    """Poll a completion for `model` until it succeeds; seconds since `t0` and the text."""
    while True:
        try:
            r = await client.completions.create(
                model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0
            )
            return time.monotonic() - t0, r.choices[0].text
        except (openai.APIConnectionError, openai.APIStatusError):
            if proc is not None and not proc.alive():
                raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}") from None
            if time.monotonic() - t0 > limit:
                raise
        await asyncio.sleep(0.05)


class BenchChain(Chain):
    """The demo chain, with the demo's narrated steps replaced by the timed ones."""

    def __init__(self, workdir: Path, hot_names: list[str]) -> None:
        super().__init__(workdir, say=lambda _text: None)
        self.hot_names = hot_names
        self.bench: dict[str, Any] = {}

    async def _serve(self, cluster: RunningEmulator, kube: KubeClient, pod: LocalPod) -> None:
        # `_deploy` recorded apply -> /readyz as its last step, so this recovers the apply time.
        apply_t0 = time.monotonic() - self.result.timings["cold_start_apply_to_ready"]
        client = openai.AsyncOpenAI(
            base_url=pod.url(naming.PUBLIC_PORT) + "/v1",
            api_key="none",
            max_retries=0,
            timeout=120,
        )
        try:
            first, base_text = await _first_completion(client, BASE, apply_t0, 60)
            pinned, pinned_text = await _first_completion(client, "sql-expert", apply_t0, 60)
            self.bench["cold"] = {
                "apply_to_ready_s": self.result.timings["cold_start_apply_to_ready"],
                "containers_started_s": self.result.timings["containers_started"],
                "apply_to_first_completion_s": round(first, 3),
                "apply_to_pinned_adapter_completion_s": round(pinned, 3),
                "outputs": {BASE: base_text, "sql-expert": pinned_text},
            }
            vllm_pid = pod.procs["vllm"].pid
            times: list[float] = []
            outputs: dict[str, str] = {}
            for name in self.hot_names:
                await kube.apply(
                    {
                        "apiVersion": "loraplex.io/v1alpha1",
                        "kind": "LoRAAdapter",
                        "metadata": {"name": name, "namespace": NS},
                        "spec": {"baseModel": BASE, "source": f"pvc://{CLAIM}/{name}", "rank": 8},
                    }
                )
                t0 = time.monotonic()
                secs, text = await _first_completion(client, name, t0, 60)
                times.append(secs)
                outputs[name] = text
            self.bench["hot_add"] = {
                **_stats(times),
                "adapters": len(times),
                "vllm_restarted": pod.procs["vllm"].pid != vllm_pid,
                "outputs": outputs,
            }
        finally:
            await client.close()
        # Free the two cores before the restart baseline; the chain's cleanup is idempotent.
        await asyncio.to_thread(stop_containers, pod)


async def _restarts(
    model: Path, adapters: dict[str, Path], pod_argv: list[str], logs: Path
) -> dict[str, Any]:
    kwargs, rest = pod_vllm_flags(pod_argv)
    t0 = time.monotonic()
    proc = await asyncio.to_thread(
        start_vllm, model, BASE, **kwargs, extra_args=rest, log_path=logs / "vllm-0.log"
    )
    plain_start = time.monotonic() - t0
    times: list[float] = []
    outputs: dict[str, str] = {}
    modules: list[str] = []
    try:
        for i, (name, path) in enumerate(adapters.items(), start=1):
            t0 = time.monotonic()  # the decision: this adapter needs serving
            await asyncio.to_thread(proc.stop)
            modules.append(f"{name}={path}")
            proc = await asyncio.to_thread(
                start_vllm,
                model,
                BASE,
                **kwargs,
                extra_args=[*rest, "--lora-modules", *modules],
                log_path=logs / f"vllm-{i}.log",
                wait=None,
            )
            client = openai.AsyncOpenAI(
                base_url=proc.url + "/v1", api_key="none", max_retries=0, timeout=60
            )
            try:
                secs, text = await _first_completion(client, name, t0, 300, proc)
            finally:
                await client.close()
            times.append(secs)
            outputs[name] = text
    finally:
        await asyncio.to_thread(proc.stop)
    return {
        **_stats(times),
        "restarts": len(times),
        "plain_vllm_start_s": round(plain_start, 2),
        "flags": [
            f"--max-loras {kwargs['max_loras']}",
            f"--max-lora-rank {kwargs['max_lora_rank']}",
            f"--max-cpu-loras {kwargs['max_cpu_loras']}",
            f"--max-model-len {kwargs['max_model_len']}",
            *rest,
        ],
        "outputs": outputs,
    }


def run(hot_adds: int = 5, restarts: int = 2, workdir: Path | None = None) -> dict[str, Any]:
    """Cold start, `hot_adds` hot adds and `restarts` restarts in one run; the numbers."""
    if restarts > hot_adds:
        raise ValueError("restarts reuse the hot-added adapters: restarts <= hot_adds")
    started = time.monotonic()
    others = _other_vllms()
    with tempfile.TemporaryDirectory(prefix="loraplex-chain-bench-") as tmp:
        root = workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        # Generated before anything is timed; Chain.run finds them and skips generating.
        model = make_model(root / "models" / "tiny-llama")
        claim = root / "pvc" / CLAIM
        names = [f"hot-{i}" for i in range(hot_adds)]
        paths = {
            n: make_adapter(model, claim / n, rank=8, seed=100 + i) for i, n in enumerate(names)
        }
        chain = BenchChain(root, names)
        result = asyncio.run(chain.run())
        if "hot_add" not in chain.bench:
            raise RuntimeError("the chain ended before the hot adds")
        reused = {n: paths[n] for n in names[:restarts]}
        restart = asyncio.run(_restarts(model, reused, result.vllm_argv, root / "restart-logs"))
    hot = chain.bench["hot_add"]
    same = {n: hot["outputs"][n] == restart["outputs"][n] for n in reused}
    return {
        "cold_start": chain.bench["cold"],
        "hot_add": hot,
        "restart": restart,
        "restart_over_hot_add_median": round(restart["median"] / hot["median"], 1),
        "same_output_hot_add_vs_restart": same,
        "setup": {
            "model": "tiny random Llama (hidden 128, 2 layers), bf16, CPU vLLM",
            "adapters": "rank 8, q/k/v/o_proj, read in place from the PVC folder",
            "max_tokens": MAX_TOKENS,
            "pod_vllm_argv": result.vllm_argv[1:],
            "pod_rules": result.rules,
            "total_s": round(time.monotonic() - started, 1),
            "other_vllm_processes_at_start": others,
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        },
    }


def markdown(r: dict[str, Any]) -> str:
    cold, hot, rs = r["cold_start"], r["hot_add"], r["restart"]
    runs = ", ".join(f"{v:.2f}" for v in hot["runs"])
    rows = [
        ("Cold start: apply -> pod Ready (s)", f"{cold['apply_to_ready_s']:.1f}"),
        (
            "Cold start: apply -> first completion (s)",
            f"{cold['apply_to_first_completion_s']:.1f} (of which containers started: "
            f"{cold['containers_started_s']:.1f}, mostly vLLM)",
        ),
        (
            f"Hot add: apply LoRAAdapter -> first completion, {hot['adapters']} adapters (s)",
            f"median {hot['median']:.2f}, p90 {hot['p90']:.2f} (runs {runs}); "
            f"vLLM restarted: {'yes' if hot['vllm_restarted'] else 'no'}",
        ),
        (
            f"Restart vLLM with --lora-modules -> first completion, {rs['restarts']} restarts (s)",
            f"median {rs['median']:.1f} (runs {', '.join(f'{v:.1f}' for v in rs['runs'])})",
        ),
        ("Plain vLLM start, no adapters (s)", f"{rs['plain_vllm_start_s']:.1f}"),
        ("Restart / hot add (medians)", f"{r['restart_over_hot_add_median']:.0f}x"),
        (
            "Same greedy text, hot add vs restart",
            ", ".join(
                f"{n}: {'yes' if v else 'no'}"
                for n, v in r["same_output_hot_add_vs_restart"].items()
            ),
        ),
        (
            "Other vLLM servers at start; load average at end",
            f"{r['setup']['other_vllm_processes_at_start']}; "
            + " ".join(str(x) for x in r["setup"]["load_average_at_end"]),
        ),
    ]
    out = ["| measure | result |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--hot-adds", type=int, default=5)
    p.add_argument("--restarts", type=int, default=2)
    p.add_argument("--workdir", type=Path, help="keep models and logs here (default: temp)")
    a = p.parse_args()
    try:
        result = run(a.hot_adds, a.restarts, a.workdir)
    except Exception as exc:  # any failure: a message and a non-zero exit
        print(f"chain_bench failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(markdown(result))
    print()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
