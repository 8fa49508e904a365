"""``flexgate model pretrain``: a small dense public model and its tokenizer, from scratch.

The public model is an OLMo-2-style FlexOlmo with one expert (so one FFN per layer and a
router that always picks it), the engine's own model class. Its tokenizer is a byte-level BPE
trained on the same data (``engine.checkpoints.build_tokenizer``: EOS and PAD tokens, the chat
template), saved so that ``AutoTokenizer`` loads it. After training, the router row of the
one expert is set to the public data's own embedding (:mod:`kit.embed`, the mean hidden state
at each layer's router input): every expert trained later keeps that row frozen, and the merged
model routes between it and theirs.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from engine.checkpoints import build_tokenizer, tiny_config
from engine.experts import ExpertInfo
from kit import embed
from kit.data import tokenize_blocks
from kit.distributed import World, init_world
from kit.documents import Documents
from kit.errors import KitError, KitRefused
from kit.modelio import atomic_dir, build_model, prepare_out, save_model
from kit.trainer import Schedule, partial_dir, train, train_only

__all__ = ["SIZES", "Size", "pretrain"]


@dataclass(frozen=True)
class Size:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    seq_len: int
    batch_size: int
    lr: float


SIZES = {
    "tiny": Size(2048, 128, 384, 4, 4, 4, 128, 16, 3e-3),
    "small": Size(8192, 256, 768, 6, 8, 4, 256, 32, 1.5e-3),
}
MAX_STEPS = 200_000
STATE_FILE = "pretrain.json"


def pretrain(
    docs: Documents,
    out: Path,
    *,
    size: str | Size = "tiny",
    steps: int = 300,
    seed: int = 0,
    owner: str = "public",
    force: bool = False,
    checkpoint_every: int = 50,
    world: World | None = None,
    stop_after: int | None = None,
) -> Path:
    """Train the public model on ``docs`` and write it to ``out``; resumes an interrupted run
    (its checkpoints are kept in ``OUT.partial`` until the model is written)."""
    if isinstance(size, str) and size not in SIZES:
        raise KitError(f"--size must be one of {', '.join(SIZES)}")
    if not 1 <= steps <= MAX_STEPS:
        raise KitError(f"--steps must be between 1 and {MAX_STEPS}")
    prepare_out(out, force)
    world = world or init_world()
    spec = SIZES[size] if isinstance(size, str) else size
    work = partial_dir(out, force=False)  # a stale one is judged by _check_partial
    settings = {
        "size": size if isinstance(size, str) else "custom",
        "steps": steps,
        "seed": seed,
        "owner": owner,
        "spec": asdict(spec),
    }
    _check_partial(work, settings, force)

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(spec.vocab_size, docs.texts)
    config = tiny_config(
        num_experts=1,
        num_experts_per_tok=1,
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=max(1024, spec.seq_len),
        initializer_range=0.02,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = build_model(config)  # seeded init
    model.to(world.device)  # type: ignore[arg-type]  # transformers types .to oddly
    blocks = tokenize_blocks(tokenizer, docs.texts, spec.seq_len)
    params = train_only(model, lambda n: ".mlp.gate." not in n)
    schedule = Schedule(
        steps=steps,
        batch_size=spec.batch_size,
        lr=spec.lr,
        warmup=max(1, steps // 10),
        weight_decay=0.1,
        seed=seed,
        checkpoint_every=checkpoint_every,
    )
    result = train(
        model, params, blocks, schedule, work, world, label="pretrain", stop_after=stop_after
    )
    if len(result.losses) < steps:
        return out  # interrupted on purpose (tests); the checkpoint is in OUT.partial
    model.requires_grad_(False)
    model.to("cpu")  # type: ignore[arg-type]
    rows = embed.hidden_embedding(model, blocks[: min(len(blocks), 64)])
    with torch.no_grad():
        for layer, row in zip(model.model.layers, rows, strict=True):
            layer.mlp.gate.weight.copy_(row.unsqueeze(0))
    if world.main:
        with atomic_dir(out) as tmp:
            save_model(
                tmp,
                config,
                model.state_dict(),
                tokenizer,
                [ExpertInfo("public", owner=owner, description="public model")],
            )
            (tmp / STATE_FILE).write_text(
                json.dumps(
                    {
                        **settings,
                        "documents": len(docs.texts),
                        "tokens_seen": result.tokens,
                        "final_loss": result.losses[-1],
                        "skipped_not_utf8": docs.skipped_not_utf8,
                        "skipped_empty": docs.skipped_empty,
                    },
                    indent=2,
                )
                + "\n"
            )
        shutil.rmtree(work, ignore_errors=True)
    world.barrier()
    return out


def _check_partial(work: Path, settings: dict[str, object], force: bool) -> None:
    """A partial run with other settings is refused (or, with --force, started again)."""
    marker = work / "settings.json"
    if work.exists() and force:
        shutil.rmtree(work, ignore_errors=True)  # every rank does this; one of them wins
    if marker.is_file() and json.loads(marker.read_text()) != settings:
        raise KitRefused(f"{work}: an interrupted run with other settings; pass --force to restart")
    work.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(settings, indent=2) + "\n")
