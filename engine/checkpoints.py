"""Tiny random FlexOlmo checkpoints in Hugging Face format, built offline (tests, demos).

:func:`build_tiny_checkpoint` writes what a released FlexOlmo checkpoint holds: ``config.json``
(``model_type: flex_olmo``), ``model.safetensors`` with per-expert keys
``model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight`` and ``model.layers.N.mlp.gate.weight``
(the format of allenai/FlexOlmo-7x7B-1T, which transformers' own ``from_pretrained`` converts to
its fused layout at load), ``generation_config.json``, tokenizer files with a chat template and,
when expert ids are given, ``experts.json``. The tokenizer is a byte-level BPE trained with the
``tokenizers`` library on a short built-in text, so nothing is downloaded.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import FlexOlmoConfig, GenerationConfig, PreTrainedTokenizerFast

from engine.experts import ExpertInfo, write_experts

__all__ = [
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "build_tiny_checkpoint",
    "build_tokenizer",
    "tiny_config",
]

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN, "<|system|>", "<|user|>", "<|assistant|>")

# OLMo-2 style: each turn opens with its role tag; assistant turns end with the EOS token.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A data owner trains an expert on data that never
leaves them, and the experts are merged with a router. Any expert can be left out at inference.
def add(a, b):
    return a + b
for i in range(10):
    print(i, add(i, i))
Shall I compare thee to a summer's day? Thou art more lovely and more temperate.
The patient presented with fever, cough and fatigue; the physician ordered a blood test.
Theorem: for every natural number n, the sum 1 + 2 + ... + n equals n (n + 1) / 2.
Permission is hereby granted, free of charge, to any person obtaining a copy of this software.
The stock market rose on Tuesday as investors weighed the latest news on interest rates.
"""


def build_tokenizer(
    vocab_size: int = 320, corpus: Sequence[str] | None = None
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with FlexGate's special tokens and chat template.

    Trained on ``corpus`` (default: a short built-in text) up to ``vocab_size`` entries; every
    byte is in the alphabet, so any text encodes. Deterministic for a given corpus.
    """
    min_size = 256 + len(SPECIAL_TOKENS)
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be at least {min_size} (bytes + special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus) if corpus is not None else [_CORPUS], trainer=trainer)
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=list(SPECIAL_TOKENS[2:]),
        chat_template=CHAT_TEMPLATE,
        model_max_length=None,
    )


def tiny_config(num_experts: int = 4, **overrides: Any) -> FlexOlmoConfig:
    """A FlexOlmoConfig small enough for unit tests; keyword overrides win."""
    values: dict[str, Any] = {
        "vocab_size": 320,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "num_experts": num_experts,
        "num_experts_per_tok": 2,
        "initializer_range": 0.1,
        "pad_token_id": SPECIAL_TOKENS.index(PAD_TOKEN),
        "eos_token_id": SPECIAL_TOKENS.index(EOS_TOKEN),
        "bos_token_id": None,
        "tie_word_embeddings": False,
    }
    values.update(overrides)
    return FlexOlmoConfig(**values)


def build_tiny_checkpoint(
    path: str | Path,
    expert_ids: Sequence[str] | None = ("public", "code", "news", "math"),
    seed: int = 0,
    *,
    router_bias: Sequence[float] | None = None,
    shards: int = 1,
    dtype: torch.dtype = torch.float32,
    **config_overrides: Any,
) -> Path:
    """Write a random-init FlexOlmo checkpoint to ``path`` (created if missing); return it.

    Args:
        expert_ids: ids written to ``experts.json`` in router-row order; None writes no
            ``experts.json`` (the engine then names them expert-0..N-1) and takes the number of
            experts from ``num_experts`` (default 4).
        seed: the weights are a deterministic function of the seed and the config.
        router_bias: per-expert router bias (FlexOlmo paper), written as
            ``model.layers.N.mlp.gate.bias`` for every layer; None writes none (as released).
        shards: split the weights over this many safetensors files with an index.
        dtype: dtype of the stored tensors.
        config_overrides: FlexOlmoConfig fields (hidden_size, num_experts, ...).
    """
    # imported here: engine.modeling imports transformers' model code, which is slow to import
    from engine.modeling import GovernedFlexOlmoForCausalLM

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    if expert_ids is not None:
        n = config_overrides.setdefault("num_experts", len(expert_ids))
        if n != len(expert_ids):
            raise ValueError(f"{len(expert_ids)} expert ids but num_experts={n}")
    config = tiny_config(**config_overrides)
    if router_bias is not None and len(router_bias) != config.num_experts:
        raise ValueError(
            f"router_bias has {len(router_bias)} values for {config.num_experts} experts"
        )

    tokenizer = build_tokenizer(config.vocab_size)
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} entries, above vocab_size")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GovernedFlexOlmoForCausalLM(config)
        state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
        # RMSNorm weights start at one; perturb them so that tests see every tensor matter
        for key, value in state.items():
            if key.endswith("norm.weight"):
                state[key] = (1.0 + 0.1 * torch.randn(value.shape)).to(dtype)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    if router_bias is not None:
        bias = torch.tensor(list(router_bias), dtype=dtype)
        for layer in range(config.num_hidden_layers):
            state[f"model.layers.{layer}.mlp.gate.bias"] = bias.clone()

    config.architectures = ["FlexOlmoForCausalLM"]
    config.dtype = dtype
    config.save_pretrained(out)
    GenerationConfig(  # type: ignore[no-untyped-call]
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    ).save_pretrained(out)
    _save_weights(out, state, shards)
    tokenizer.save_pretrained(out)
    if expert_ids is not None:
        write_experts(
            out,
            [
                ExpertInfo(eid, owner=f"owner-{eid}", description=f"tiny random expert {eid}")
                for eid in expert_ids
            ],
        )
    return out


def _save_weights(out: Path, state: dict[str, torch.Tensor], shards: int) -> None:
    keys = sorted(state)
    if shards <= 1:
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map: dict[str, str] = {}
    per = -(-len(keys) // shards)
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i * per : (i + 1) * per]}
        save_file(part, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
