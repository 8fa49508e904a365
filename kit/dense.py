"""Dense fine-tuning of the public model's FFN, and dense models (or a soup) from artifacts.

The baselines FlexOlmo is measured against (bench/reproduce.py, docs/reproduction.md) need
experts that were *not* trained against a frozen public expert: the owner fine-tunes the
public model's own FFN on their data, with the same recipe as ``expert train`` (embeddings,
attention, norms and lm_head frozen; AdamW without weight decay, warm-up and cosine decay,
the same batches for the same seed) but no second expert, router or bias. The result is
written as an ordinary expert artifact (the trained FFN, and the domain embedding as its
router row), so the same file serves three baselines:

- as a dense model: the public model with that FFN (:func:`dense_model`, one artifact);
- as a model soup: the public model with the uniform average of several artifacts' FFNs
  (:func:`dense_model`, several artifacts; the other weights are the public model's in every
  one of them, so averaging the FFNs is averaging the whole models);
- merged as experts of a FlexOlmo model (``model merge``): the paper's ablation "experts
  trained without the frozen public expert".
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from engine.experts import ExpertInfo
from kit.data import tokenize_blocks
from kit.distributed import World, init_world
from kit.documents import Documents
from kit.embed import read_embedding
from kit.errors import KitError
from kit.expert import (
    PROJ,
    ExpertRun,
    base_manifest,
    check_expert_args,
    read_public,
    write_artifact,
)
from kit.merge import read_artifact
from kit.modelio import (
    atomic_dir,
    build_model,
    fingerprint,
    load_tokenizer,
    prepare_out,
    save_model,
)
from kit.trainer import fine_tune_schedule, partial_dir, train, train_only

__all__ = ["dense_model", "train_dense"]

TRAINING = "dense"
"""The manifest's ``training`` for these artifacts (coordinated ones have none)."""


def train_dense(
    public: Path,
    docs: Documents,
    embedding_file: Path,
    out: Path,
    *,
    expert_id: str,
    owner: str,
    description: str | None = None,
    steps: int = 200,
    batch_size: int = 16,
    lr: float = 2e-3,
    seq_len: int = 128,
    seed: int = 0,
    force: bool = False,
    checkpoint_every: int = 50,
    world: World | None = None,
    stop_after: int | None = None,
) -> ExpertRun:
    """Fine-tune the public FFN on ``docs``; write it as an artifact to ``out`` (resuming
    from ``OUT.partial``). ``ExpertRun.model`` is the dense fine-tuned model."""
    check_expert_args(expert_id, owner, steps)
    prepare_out(out, force)
    world = world or init_world()
    config, state = read_public(public)
    emb = read_embedding(embedding_file, config.num_hidden_layers, config.hidden_size)
    tokenizer = load_tokenizer(public)
    seq_len = min(seq_len, config.max_position_embeddings)
    blocks = tokenize_blocks(tokenizer, docs.texts, seq_len)
    torch.manual_seed(seed)
    model = build_model(config, {k: v.clone() for k, v in state.items()})
    model.to(world.device)  # type: ignore[arg-type]  # transformers types .to oddly
    params = train_only(model, lambda n: ".mlp.experts.0." in n)
    schedule = fine_tune_schedule(steps, batch_size, lr, seed, checkpoint_every)
    work = partial_dir(out, force)
    result = train(
        model,
        params,
        blocks,
        schedule,
        work,
        world,
        label=f"dense {expert_id}",
        stop_after=stop_after,
    )
    if len(result.losses) < steps:
        return ExpertRun(out, model, result.losses, complete=False)
    if world.main:
        tensors: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(model.model.layers):
            ffn = layer.mlp.experts[0]
            for proj in PROJ:
                tensors[f"layers.{i}.{proj}.weight"] = getattr(ffn, proj).weight.detach()
            tensors[f"layers.{i}.router"] = emb[i]
        manifest = base_manifest(
            expert_id, owner, description, config, fingerprint(state), docs, blocks
        )
        manifest.update(
            {
                "training": TRAINING,
                "tokens_seen": result.tokens,
                "router_bias": False,
                "final_loss": result.losses[-1],
                "first_loss": result.losses[0],
                "settings": {**asdict(schedule), "seq_len": seq_len},
            }
        )
        write_artifact(out, {k: v.float().contiguous().cpu() for k, v in tensors.items()}, manifest)
        shutil.rmtree(work, ignore_errors=True)
    world.barrier()
    return ExpertRun(out, model, result.losses, complete=True)


def dense_model(
    public: Path, artifacts: list[Path], out: Path, *, model_id: str, force: bool = False
) -> Path:
    """The public model with, as its one FFN, the uniform average of the artifacts' FFNs (one
    artifact: that FFN). Written as a one-expert model folder whose expert is ``model_id``."""
    from contracts.experts import ID_RULE, is_valid_id

    if not artifacts:
        raise KitError("no expert artifact given")
    if not is_valid_id(model_id):
        raise KitError(f"invalid model id {model_id!r}: {ID_RULE}")
    prepare_out(out, force)
    config, state = read_public(public)
    fp = fingerprint(state)
    arts = [read_artifact(p) for p in artifacts]
    for art in arts:
        if art.manifest["public_fingerprint"] != fp:
            raise KitError(f"{art.path}: expert {art.id!r} was trained on another public model")
    merged = dict(state)
    for i in range(config.num_hidden_layers):
        for proj in PROJ:
            key = f"layers.{i}.{proj}.weight"
            want = tuple(state[f"model.layers.{i}.mlp.experts.0.{proj}.weight"].shape)
            got = [a.tensors.get(key) for a in arts]
            if any(t is None or tuple(t.shape) != want for t in got):
                raise KitError(f"an artifact's {key} is missing or does not fit the public model")
            merged[f"model.layers.{i}.mlp.experts.0.{proj}.weight"] = torch.stack(
                [t for t in got if t is not None]
            ).mean(0)
    ids = ", ".join(a.id for a in arts)
    what = f"dense: the public model with the FFN of {ids}"
    if len(arts) > 1:
        what = f"model soup: the public model with the mean FFN of {ids}"
    tokenizer = load_tokenizer(public)
    with atomic_dir(out) as tmp:
        save_model(tmp, config, merged, tokenizer, [ExpertInfo(model_id, description=what)])
    return out
