"""Pod start under the pod's own rules (bubblewrap) vs as plain processes, in one run.

`python -m bench.pod_start_bwrap` renders the examples' pod (`loraplex render -f examples/`,
offline: the Deployment, ConfigMap and Secret), generates the tiny model and the example
adapters on the claim folder, then starts the pod with the local pod runner
(`loraplex.devtools.kubelet`, what `make demo` and the e2e chain use) alternately under
bubblewrap and as plain processes, `--runs` times each, and times:

- vLLM ready: the start of the vLLM container to its `/health` answering 200;
- server ready: the start of the adapter-server to its `/healthz`;
- pod ready: the start of the pod to the adapter-server's `/readyz` (vLLM up and the pinned
  adapter loaded): what a Service waits for;
- sandbox setup: `/bin/true` run with a container's full rule set (the vLLM container's
  mounts, passwd, namespaces) vs directly, 20 times: bubblewrap's own cost per start, which
  the vLLM start's run-to-run noise on a shared machine would otherwise hide.

The two modes alternate (sandboxed first) so load drift hits both alike. It prints a markdown
table with the medians and the sandboxed/plain ratio, then the JSON behind it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from loraplex import naming
from loraplex.devtools import bubblewrap
from loraplex.devtools.kubelet import (
    LocalPod,
    plan_local_pod,
    start_container,
    stop_containers,
    wait_healthy,
)
from loraplex.devtools.processes import wait_http
from loraplex.devtools.tinymodel import make_adapter, make_model
from loraplex.offline import render_paths

ROOT = Path(__file__).resolve().parents[1]
CLAIM = "team-adapters"


def _rendered() -> tuple[dict[str, Any], dict[tuple[str, str], dict[str, Any]]]:
    objects = render_paths([ROOT / "examples"])
    dep = next(o for o in objects if o["kind"] == "Deployment")
    kinds = ("ConfigMap", "Secret")
    refs = {(o["kind"], o["metadata"]["name"]): o for o in objects if o["kind"] in kinds}
    return dep, refs


async def _start_once(pod: LocalPod) -> dict[str, float]:
    t0 = time.monotonic()
    try:
        vllm = start_container(pod, "vllm", pod.url(naming.VLLM_PORT))
        await wait_healthy(vllm, "/health", 300)
        t_vllm = time.monotonic()
        server = start_container(pod, "adapter-server", pod.url(naming.PUBLIC_PORT))
        await wait_healthy(server, "/healthz", 60)
        t_server = time.monotonic()
        await asyncio.to_thread(wait_http, server, "/readyz", 120)
        t_ready = time.monotonic()
    finally:
        await asyncio.to_thread(stop_containers, pod)
    return {
        "vllm_ready_s": round(t_vllm - t0, 2),
        "server_ready_s": round(t_server - t_vllm, 2),
        "pod_ready_s": round(t_ready - t0, 2),
    }


def _setup_cost(pod: LocalPod, container: str, times: int = 20) -> dict[str, float]:
    """Median seconds to run /bin/true under `container`'s sandbox and directly."""
    box = pod.sandboxes[container]
    assert box is not None
    boxed = bubblewrap.command(box, ["/bin/true"], bubblewrap.find() or "bwrap")
    out: dict[str, float] = {}
    for mode, argv in (("bubblewrap", boxed), ("plain", ["/bin/true"])):
        secs = []
        for _ in range(times):
            t0 = time.monotonic()
            subprocess.run(argv, env=pod.env[container], check=True)
            secs.append(time.monotonic() - t0)
        out[f"{mode}_ms"] = round(statistics.median(secs) * 1000, 1)
    return out


def run(runs: int = 2, workdir: Path | None = None) -> dict[str, Any]:
    """`runs` pod starts in each mode, alternating; the numbers."""
    why = bubblewrap.problem()
    if why is not None:
        raise RuntimeError(why)
    dep, refs = _rendered()
    results: dict[str, list[dict[str, float]]] = {"bubblewrap": [], "plain": []}
    rules: list[str] = []
    setup: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="loraplex-pod-start-") as tmp:
        root = workdir or Path(tmp)
        model = make_model(root / "models" / "tiny-llama")
        claim = root / "pvc" / CLAIM
        make_adapter(model, claim / "sql-expert", rank=16, seed=11)
        make_adapter(model, claim / "support-bot" / "v3", rank=8, seed=12)
        for i in range(runs):
            for mode in ("bubblewrap", "plain"):
                pod = plan_local_pod(
                    dep,
                    root=root / f"pod-{mode}-{i}",
                    model_dir=model,
                    claims={CLAIM: claim},
                    refs=refs,
                    sandbox=mode == "bubblewrap",
                )
                if mode == "bubblewrap" and not rules:
                    rules = pod.rules()
                    setup = _setup_cost(pod, "vllm")
                results[mode].append(asyncio.run(_start_once(pod)))
    summary: dict[str, Any] = {}
    for mode, rows in results.items():
        summary[mode] = {
            key: {
                "median": round(statistics.median(r[key] for r in rows), 2),
                "runs": [r[key] for r in rows],
            }
            for key in rows[0]
        }
    ratio = {
        key: round(summary["bubblewrap"][key]["median"] / summary["plain"][key]["median"], 3)
        for key in summary["plain"]
    }
    return {
        **summary,
        "bubblewrap_over_plain": ratio,
        "sandbox_setup": setup,
        "rules": rules,
        "bwrap": bubblewrap.find(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }


def markdown(r: dict[str, Any]) -> str:
    names = {
        "vllm_ready_s": "vLLM start -> /health (s)",
        "server_ready_s": "adapter-server start -> /healthz (s)",
        "pod_ready_s": "pod start -> /readyz, pinned adapter loaded (s)",
    }
    out = ["| measure | bubblewrap (pod rules) | plain processes | ratio |", "|---|---|---|---|"]
    for key, label in names.items():
        b, p = r["bubblewrap"][key], r["plain"][key]
        out.append(
            f"| {label} | {b['median']:.2f} (runs {', '.join(f'{v:.2f}' for v in b['runs'])}) "
            f"| {p['median']:.2f} (runs {', '.join(f'{v:.2f}' for v in p['runs'])}) "
            f"| {r['bubblewrap_over_plain'][key]:.2f}x |"
        )
    su = r["sandbox_setup"]
    out.append(
        f"| sandbox setup: /bin/true under the vLLM container's rules vs direct (ms, median "
        f"of 20) | {su['bubblewrap_ms']:.1f} | {su['plain_ms']:.1f} | "
        f"+{su['bubblewrap_ms'] - su['plain_ms']:.1f} ms |"
    )
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--runs", type=int, default=2, help="pod starts per mode (default 2)")
    p.add_argument("--workdir", type=Path, help="keep the model and logs here (default: temp)")
    a = p.parse_args()
    try:
        result = run(a.runs, a.workdir)
    except Exception as exc:  # any failure: a message and a non-zero exit
        print(f"pod_start_bwrap failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(markdown(result))
    print()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
