"""The whole chain, as `make demo` runs it: this is how we know the operator's pod starts vLLM.

API stand-in -> operator process -> examples applied -> the rendered pod run locally under
bubblewrap with the pod's own rules (real CPU vLLM started with the rendered arguments and
environment, as the rendered uid with no passwd entry, on a read-only root with only the
rendered volumes writable; substituting only model path, GPU memory flag, context length,
interpreter, the image's PATH, CPU-only vLLM env and ports) -> official openai client -> hot
add -> delete -> statuses as the operator wrote them.

Missing bubblewrap fails this test in CI (`CI=true`) and skips it elsewhere: `make setup`
installs it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplex.demo.chain import run_chain
from loraplex.devtools import bubblewrap

pytestmark = [pytest.mark.e2e, pytest.mark.vllm, pytest.mark.timeout(900)]


async def test_demo_chain_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    why = bubblewrap.problem()
    if why is not None and not bubblewrap.in_ci():
        pytest.skip(why)
    monkeypatch.setenv("LORAPLEX_LEAK_CANARY", "host-only")  # must not reach the containers
    lines: list[str] = []
    result = await run_chain(tmp_path, lines.append, sandbox=True)

    # vLLM served under the pod's rules: seen from the host, while it ran.
    assert result.sandboxed
    proc = result.vllm_proc
    assert b"vllm.entrypoints.openai.api_server" in proc["cmdline"]
    pod_sc, vllm_sc = result.rendered_security["pod"], result.rendered_security["vllm"]
    uid = vllm_sc.get("runAsUser", pod_sc.get("runAsUser"))
    assert uid and proc["uid_map"][0] == str(uid), proc["uid_map"]  # the rendered runAsUser
    # The host's root is never writable; with readOnlyRootFilesystem nothing but volumes is.
    assert proc["root_mount_options"].startswith("ro"), proc["root_mount_options"]
    root = "read-only root" if vllm_sc.get("readOnlyRootFilesystem") else "writable root"
    assert any(r.startswith(f"vllm: uid {uid} ") and root in r for r in result.rules)
    # Exactly the rendered env, plus the documented additions (each printed as a substitution).
    # PWD is bubblewrap's own (it sets it on --chdir); a runtime's shell would set it too.
    assert proc["env"] == {**result.vllm_env, "PWD": "/"}, proc["env"]
    documented = {"PATH", "VLLM_CPU_KVCACHE_SPACE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"}
    assert set(result.vllm_env) - set(result.rendered_env["vllm"]) <= documented
    assert "LORAPLEX_LEAK_CANARY" not in proc["env"]

    # vLLM ran with the operator's planned flags (only the documented ones substituted).
    argv = result.vllm_argv
    for flag in (
        "--enable-lora",
        "--max-loras",
        "--max-lora-rank",
        "--max-cpu-loras",
        "--tensor-parallel-size",
        "--served-model-name",
        "--dtype",
    ):
        assert flag in argv, flag
    # Adapters of rank 16 and 8: one allowed step of headroom above 16 (issue 9.9).
    assert argv[argv.index("--max-lora-rank") + 1] == "32"
    allowed = (
        "--model",
        "--gpu-memory-utilization",
        "--max-model-len",
        "--port",
        "--vllm-url",
        "--admin-port",
        "image",
        "listens on",
        "port ",
        "env ",
        "PATH=",
        "writable root",
        "spec.model.architecture",  # the tiny model's shape, for the plan and adapter checks
    )
    for sub in result.substitutions:
        assert any(word in sub for word in allowed), f"unexpected substitution: {sub}"
    assert not any("--max-lora" in s or "--max-cpu-loras" in s for s in result.substitutions)

    # The base and each adapter answer, with different text (the adapters really apply).
    assert set(result.outputs) == {"qwen-14b", "sql-expert", "support-bot"}
    assert len(set(result.outputs.values())) == 3, result.outputs
    # Hot add served without restarting vLLM; delete gives an OpenAI-style 404.
    assert result.hot_added_output
    assert result.vllm_pids[0] == result.vllm_pids[1]
    assert result.timings["hot_add_apply_to_first_completion"] < 30
    assert "support-bot" in result.deleted_error and "404" in result.deleted_error
    # Status, as the operator wrote it from the pod's reports.
    bm = result.statuses["qwen-14b"]
    assert bm["phase"] == "Ready" and bm["readyReplicas"] == 1
    assert bm["plan"]["maxLoraRank"] == 32
    for name in ("sql-expert", "chat-helper"):
        st = result.statuses[name]
        assert st["phase"] == "Ready" and st["ready"] == "1/1", st
        assert st["rank"] in (8, 16) and st["digest"]
    assert "support-bot" not in result.statuses
    assert "qwen-14b" in result.tables and "chat-helper" in result.tables
