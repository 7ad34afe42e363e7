"""Generate tiny random models and LoRA adapters on the spot, so no weights are committed.

The models are small enough to build in seconds and to serve with CPU vLLM, and shaped so that
vLLM's CPU attention accepts them (head_dim 64). Adapters use `init_lora_weights=False` so they
really change the outputs, which is what lets tests tell the base and each adapter apart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

Arch = Literal["llama", "qwen2"]

_CORPUS = [
    "select name from users where id = 1;",
    "the quick brown fox jumps over the lazy dog",
    "LoRA adapters share one base model on one GPU",
    "def main():\n    return 42\n",
    "Kubernetes operators reconcile desired and observed state.",
]


def _tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    fast_cls: Any = PreTrainedTokenizerFast  # transformers 5 leaves __init__ untyped
    fast = fast_cls(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    fast.save_pretrained(str(path))


# The shape every tiny model has (config.json keys); tests that need its numbers import this.
TINY_SHAPE: dict[str, int] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "vocab_size": 512,
    "max_position_embeddings": 1024,
}


def make_model(path: Path, arch: Arch = "llama", *, seed: int = 0, tie: bool = False) -> Path:
    """Write a random causal LM with a trained tokenizer to `path` (idempotent)."""
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    _tokenizer(path)
    common: dict[str, Any] = dict(
        **TINY_SHAPE,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        torch_dtype="bfloat16",
    )
    model_cls: Any = LlamaForCausalLM if arch == "llama" else Qwen2ForCausalLM
    config_cls: Any = LlamaConfig if arch == "llama" else Qwen2Config
    model: Any = model_cls(config_cls(**common))
    model = model.to(torch.bfloat16)
    model.save_pretrained(str(path), safe_serialization=True)
    return path


def make_adapter(
    base: Path,
    path: Path,
    *,
    rank: int = 8,
    seed: int = 1,
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    **lora_kwargs: Any,
) -> Path:
    """Write a PEFT LoRA adapter for `base` whose weights are random (so outputs differ)."""
    if (path / "adapter_config.json").exists():
        return path
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank * 2,
        target_modules=list(target_modules),
        init_lora_weights=False,
        task_type="CAUSAL_LM",
        **lora_kwargs,
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.mul_(4.0)  # make the adapter's effect on greedy tokens unmistakable
    path.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(path), safe_serialization=True)
    cfg_path = path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(base)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return path


def _reference_model(base: Path, adapter: Path | None) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok: Any = AutoTokenizer.from_pretrained(str(base))
    model: Any = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    return tok, model.eval()


def reference_greedy(
    base: Path, prompt: str, max_tokens: int, adapter: Path | None = None
) -> list[int]:
    """Greedy token ids from transformers (+peft): the independent reference for vLLM."""
    import torch

    tok, model = _reference_model(base, adapter)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id
        )
    return [int(t) for t in out[0, ids.shape[1] :]]


def greedy_gaps(
    base: Path, prompt: str, tokens: list[int], adapter: Path | None = None
) -> list[float]:
    """For tokens another engine chose greedily, how far each fell below the reference's best.

    Teacher-forced on `tokens`, so one near-tie does not derail the rest: each entry is
    `max(logits) - logits[token]` at that step (0.0 where the engines agree). vLLM computes in
    bfloat16 and this reference in float32, so on a random tiny model exact sequences can part
    at a near-tie; a small gap is rounding, a large one is a different model or adapter.
    """
    import torch

    tok, model = _reference_model(base, adapter)
    ids = tok(prompt, return_tensors="pt").input_ids
    full = torch.cat([ids, torch.tensor([tokens], dtype=ids.dtype)], dim=1)
    with torch.no_grad():
        logits = model(full).logits[0].float()
    start = ids.shape[1] - 1
    return [float(logits[start + i].max() - logits[start + i][t]) for i, t in enumerate(tokens)]


def main() -> None:
    """`python -m loraplex.devtools.tinymodel DIR`: a model and two adapters for manual runs."""
    import sys

    root = Path(sys.argv[1] if len(sys.argv) > 1 else ".demo/models")
    base = make_model(root / "tiny-llama")
    for i, name in enumerate(["sql-expert", "chat-helper"]):
        make_adapter(base, root / "adapters" / name, seed=10 + i)
    print(root)


if __name__ == "__main__":
    main()
