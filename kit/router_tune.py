"""``flexgate model router-tune``: the paper's optional router tuning on proxy samples.

Everything but the router rows and biases is frozen; the router learns, from a small sample
of each domain (mixed, in equal shares of blocks), where to send which text. The model is
written as a new folder (same experts, same experts.json, new router weights).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from kit.data import tokenize_blocks
from kit.distributed import World, init_world
from kit.documents import Documents
from kit.errors import KitError
from kit.modelio import (
    atomic_dir,
    build_model,
    load_state,
    load_tokenizer,
    prepare_out,
    read_expert_infos,
    save_model,
)
from kit.trainer import fine_tune_schedule, partial_dir, train, train_only

__all__ = ["router_tune"]


def router_tune(
    model_dir: Path,
    data: dict[str, Documents],
    out: Path,
    *,
    steps: int = 100,
    batch_size: int = 16,
    lr: float = 1e-3,
    seq_len: int = 128,
    seed: int = 0,
    force: bool = False,
    world: World | None = None,
) -> Path:
    if not data:
        raise KitError("no --data ID=PATH given")
    if not 1 <= steps <= 100_000:
        raise KitError("--steps must be between 1 and 100000")
    prepare_out(out, force)
    world = world or init_world()
    config, state = load_state(model_dir)
    infos = read_expert_infos(model_dir, config.num_experts)
    unknown = sorted(set(data) - {e.id for e in infos})
    if unknown:
        raise KitError(
            f"--data for unknown expert id(s) {unknown}; the model has "
            f"{', '.join(e.id for e in infos)}"
        )
    tokenizer = load_tokenizer(model_dir)
    seq_len = min(seq_len, config.max_position_embeddings)
    per = [tokenize_blocks(tokenizer, d.texts, seq_len) for d in data.values()]
    n = min(len(b) for b in per)
    blocks = torch.cat([b[:n] for b in per])
    model = build_model(config, state)
    model.to(world.device)  # type: ignore[arg-type]  # transformers types .to oddly
    params = train_only(model, lambda k: ".mlp.gate." in k)
    schedule = fine_tune_schedule(steps, batch_size, lr, seed)
    work = partial_dir(out, force)

    def clamp() -> None:
        with torch.no_grad():
            for layer in model.model.layers:
                if layer.mlp.gate.bias is not None:
                    layer.mlp.gate.bias.clamp_(max=0.0)

    train(model, params, blocks, schedule, work, world, label="router-tune", after_step=clamp)
    if world.main:
        model.to("cpu")  # type: ignore[arg-type]
        with atomic_dir(out) as tmp:
            save_model(tmp, config, model.state_dict(), tokenizer, list(infos))
        shutil.rmtree(work, ignore_errors=True)
    world.barrier()
    return out
