"""The unrestricted MoE: the FlexOlmo paper's upper-bound baseline, trained jointly on every
closed domain's data at once (what FlexOlmo's data owners cannot do).

A bench-only helper (nobody but the reproduction trains on pooled closed data), built from the
kit's pieces: the public model becomes a (1 + domains)-expert MoE with top-2 routing (every FFN
a copy of the public FFN, router rows the public row and the domain embeddings, as the merged
FlexOlmo model starts), and :func:`kit.trainer.train` trains every FFN and the router on
equal shares of blocks of every domain (attention, embeddings, norms and lm_head frozen, as in
expert training), with the expert recipe (AdamW, no weight decay, warm-up, cosine decay). No
load-balancing loss (the kit has none). Resumes from ``OUT.partial`` like the kit.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from engine.experts import ExpertInfo
from kit.data import tokenize_blocks
from kit.distributed import World
from kit.documents import Documents
from kit.embed import read_embedding
from kit.expert import read_public
from kit.modelio import atomic_dir, build_model, load_tokenizer, prepare_out, save_model
from kit.trainer import fine_tune_schedule, partial_dir, train, train_only

__all__ = ["train_joint"]


def train_joint(
    public: Path,
    data: Mapping[str, Documents],
    embeddings: Mapping[str, Path],
    out: Path,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seq_len: int,
    seed: int,
    world: World,
    checkpoint_every: int = 50,
) -> int:
    """Train and write the joint MoE to ``out``; returns the tokens it trained on."""
    prepare_out(out, force=False)
    config, state = read_public(public)
    tokenizer = load_tokenizer(public)
    ids = list(data)
    per = [tokenize_blocks(tokenizer, data[d].texts, seq_len) for d in ids]
    n = min(len(b) for b in per)
    blocks = torch.cat([b[:n] for b in per])
    rows = [state[f"model.layers.{i}.mlp.gate.weight"] for i in range(config.num_hidden_layers)]
    embs = {
        d: read_embedding(embeddings[d], config.num_hidden_layers, config.hidden_size) for d in ids
    }
    moe = config.__class__.from_dict(config.to_dict())
    moe.num_experts = 1 + len(ids)
    moe.num_experts_per_tok = 2
    joint: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".mlp.experts.0." in key:
            for e in range(moe.num_experts):
                joint[key.replace(".experts.0.", f".experts.{e}.")] = value.clone()
        elif key.endswith(".mlp.gate.weight"):
            layer = int(key.split(".")[2])
            joint[key] = torch.cat([rows[layer]] + [embs[d][layer].unsqueeze(0) for d in ids])
        else:
            joint[key] = value.clone()
    torch.manual_seed(seed)
    model = build_model(moe, joint)
    model.to(world.device)  # type: ignore[arg-type]  # transformers types .to oddly
    params = train_only(model, lambda k: ".mlp." in k)
    schedule = fine_tune_schedule(steps, batch_size, lr, seed, checkpoint_every)
    work = partial_dir(out, force=False)
    result = train(model, params, blocks, schedule, work, world, label="joint MoE")
    if world.main:
        model.to("cpu")  # type: ignore[arg-type]
        infos = [ExpertInfo("public", owner="public", description="public FFN, trained jointly")]
        infos += [ExpertInfo(d, owner="joint", description=f"joint MoE expert {d}") for d in ids]
        with atomic_dir(out) as tmp:
            save_model(tmp, moe, model.state_dict(), tokenizer, infos)
        shutil.rmtree(work, ignore_errors=True)
    world.barrier()
    return result.tokens
