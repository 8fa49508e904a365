"""``flexgate expert train``: one data owner's expert, trained against the frozen public model.

Coordinated training as in the FlexOlmo paper: the public model becomes a 2-expert MoE, top-k
2. Expert 0 is the public FFN (frozen); expert 1 starts as a copy of it and trains. The router
has two rows: the public row (frozen) and the new row, initialised from the domain embedding
(:mod:`kit.embed`), which trains. With the bias on (default), the router adds a learned bias to
the new expert's logit, starting at ``bias_init`` (< 0, :data:`BIAS_INIT` by default) and
clamped to <= 0 after every step (the public expert's bias is 0 and frozen). Embeddings,
attention, norms and lm_head are frozen. AdamW without weight decay.
``router_init="random"`` starts the row from a seeded random unit vector instead of the
embedding: the paper's ablation of the domain-informed router (bench/reproduce.py).

The artifact (``EXPERT_DIR``) holds only what is new: ``expert.safetensors`` with, per layer,
the new FFN (``layers.N.{gate,up,down}_proj.weight``), the router row (``layers.N.router``)
and the bias (``layers.N.bias``, when trained), and ``manifest.json`` (id, owner, the public
model's fingerprint, token and document counts, settings). No text.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from engine.modeling import ROUTER_BIAS_ATTR, GovernedFlexOlmoForCausalLM
from kit.data import tokenize_blocks
from kit.distributed import World, init_world
from kit.documents import Documents
from kit.embed import read_embedding
from kit.errors import KitError
from kit.modelio import (
    atomic_dir,
    build_model,
    fingerprint,
    load_state,
    load_tokenizer,
    prepare_out,
)
from kit.trainer import fine_tune_schedule, partial_dir, train, train_only

__all__ = [
    "BIAS_INIT",
    "FORMAT",
    "MANIFEST",
    "ROUTER_INITS",
    "WEIGHTS",
    "ExpertRun",
    "build_coordinated",
    "random_rows",
    "train_expert",
    "write_artifact",
]

FORMAT = "flexgate-expert/1"
MANIFEST = "manifest.json"
WEIGHTS = "expert.safetensors"
PROJ = ("gate_proj", "up_proj", "down_proj")
MAX_STEPS = 200_000
ROUTER_INITS = ("embedding", "random")
ROUTER_LR_SCALE = 0.1
"""The router row and bias learn at a tenth of the FFN's rate: trained on the owner's data
alone, a row can only learn to take more tokens, so it is kept near its embedding, which
tells the owner's text from other text (docs/kit.md, "Routing")."""
BIAS_INIT = -1.0
"""Where the new expert's router bias starts (the public expert's is 0). Trained on the owner's
text alone, the gradient always asks for a larger logit for the new expert: a bias started at 0
was held there by the clamp in every layer of every expert (docs/reproduction.md), so it never
acted and ``--no-bias`` trained the same expert. Started below 0 it stays below 0 for runs of
the kit's length (Adam moves it by at most about the sum of its step sizes, a tenth of the FFN's
learning rate), so the expert is trained, and with ``merge(keep_bias=True)`` served, with the
public expert favoured by this much in the logits. FlexOlmo's reference router
(allenai/FlexOlmo, ``MoERouterWithExpertBias``) also adds ``min(bias, 0)`` to every non-public
expert's logit; its initialisation is left undefined there (``torch.empty``; a commented-out
truncated normal in [-0.06, 0]), so this value is the kit's choice, measured in docs/kit.md."""


@dataclass
class ExpertRun:
    """What :func:`train_expert` did: the artifact folder, the trained 2-expert model and the
    loss of each step (``complete`` is False when ``stop_after`` ended the run early)."""

    path: Path
    model: GovernedFlexOlmoForCausalLM
    losses: list[float]
    complete: bool


def read_public(public: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """Config and tensors of a dense public model (refused: an MoE or one with a bias)."""
    config, state = load_state(public)
    if config.num_experts != 1:
        raise KitError(
            f"{public}: has {config.num_experts} experts; a public model for expert training "
            "is dense (one expert, as `flexgate model pretrain` writes)"
        )
    if getattr(config, ROUTER_BIAS_ATTR, False):
        raise KitError(f"{public}: a public model carries no router bias")
    return config, state


def build_coordinated(
    public_config: Any,
    public_state: dict[str, torch.Tensor],
    embedding: torch.Tensor,
    bias: bool,
    bias_init: float = BIAS_INIT,
) -> GovernedFlexOlmoForCausalLM:
    """The 2-expert model: [public FFN, copy of it], router rows [public, embedding], biases
    [0, ``bias_init``] when ``bias``."""
    config = public_config.__class__.from_dict(public_config.to_dict())
    config.num_experts = 2
    config.num_experts_per_tok = 2
    setattr(config, ROUTER_BIAS_ATTR, bias)
    state: dict[str, torch.Tensor] = {}
    for key, value in public_state.items():
        if ".mlp.experts.0." in key:
            state[key] = value.clone()
            state[key.replace(".experts.0.", ".experts.1.")] = value.clone()
        elif key.endswith(".mlp.gate.weight"):
            layer = int(key.split(".")[2])
            state[key] = torch.cat([value, embedding[layer].unsqueeze(0)])
        else:
            state[key] = value.clone()
    if bias:
        for layer in range(config.num_hidden_layers):
            state[f"model.layers.{layer}.mlp.gate.bias"] = torch.tensor([0.0, bias_init])
    return build_model(config, state)


def random_rows(layers: int, hidden: int, seed: int) -> torch.Tensor:
    """``[layers, hidden]`` unit rows of seeded normal entries: the norm of an embedding row
    (:func:`kit.embed.beside_public`), so only the direction differs from the domain-informed
    initialisation."""
    rows = torch.randn(layers, hidden, generator=torch.Generator().manual_seed(seed))
    out: torch.Tensor = rows / rows.norm(dim=-1, keepdim=True)
    return out


def trainable(model: GovernedFlexOlmoForCausalLM) -> dict[str, torch.nn.Parameter]:
    """The new expert's FFNs, the router weights and biases (their public rows are masked)."""
    return train_only(model, lambda name: ".mlp.experts.1." in name or ".mlp.gate." in name)


def _mask_public(model: GovernedFlexOlmoForCausalLM) -> None:
    """Zero the public rows' gradients: AdamW without weight decay then leaves them as they
    are, bit for bit (a zero gradient gives zero moments and a zero update)."""
    for layer in model.model.layers:
        gate = layer.mlp.gate
        if gate.weight.grad is not None:
            gate.weight.grad[0].zero_()
        if gate.bias is not None and gate.bias.grad is not None:
            gate.bias.grad[0].zero_()


def _clamp_bias(model: GovernedFlexOlmoForCausalLM) -> None:
    """Keep the new expert's bias <= 0 in the parameter itself (the reference takes
    ``min(bias, 0)`` in the forward instead): the value trained is then the value stored and
    served, and the engine's router needs no clamp of its own."""
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.mlp.gate.bias is not None:
                layer.mlp.gate.bias[1:].clamp_(max=0.0)


def artifact_tensors(model: GovernedFlexOlmoForCausalLM) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(model.model.layers):
        expert = layer.mlp.experts[1]
        for proj in PROJ:
            out[f"layers.{i}.{proj}.weight"] = getattr(expert, proj).weight.detach().clone()
        out[f"layers.{i}.router"] = layer.mlp.gate.weight[1].detach().clone()
        if layer.mlp.gate.bias is not None:
            out[f"layers.{i}.bias"] = layer.mlp.gate.bias[1:].detach().clone()
    return {k: v.float().contiguous().cpu() for k, v in out.items()}


def train_expert(
    public: Path,
    docs: Documents,
    embedding_file: Path | None,
    out: Path,
    *,
    expert_id: str,
    owner: str,
    description: str | None = None,
    steps: int = 200,
    batch_size: int = 16,
    lr: float = 2e-3,
    seq_len: int = 128,
    bias: bool = True,
    bias_init: float = BIAS_INIT,
    router_init: str = "embedding",
    seed: int = 0,
    force: bool = False,
    checkpoint_every: int = 50,
    world: World | None = None,
    stop_after: int | None = None,
) -> ExpertRun:
    """Train the expert and write its artifact to ``out`` (resuming from ``OUT.partial``).

    ``embedding_file`` may be None only with ``router_init="random"`` (whose rows come from
    ``seed``). ``bias_init`` (< 0) is where the new expert's bias starts when ``bias``."""
    check_expert_args(expert_id, owner, steps)
    if bias and not bias_init < 0.0:
        raise KitError(
            f"--bias-init must be below 0 (got {bias_init}): a bias started at 0 is held there "
            "by the clamp on the owner's data and never acts; --no-bias turns it off"
        )
    if router_init not in ROUTER_INITS:
        raise KitError(f"router_init must be one of {', '.join(ROUTER_INITS)}")
    if embedding_file is None and router_init == "embedding":
        raise KitError("an embedding file is needed unless router_init='random'")
    prepare_out(out, force)
    world = world or init_world()
    config, state = read_public(public)
    public_fp = fingerprint(state)  # once: it reads every public weight
    if router_init == "random":
        emb = random_rows(config.num_hidden_layers, config.hidden_size, seed)
    else:
        assert embedding_file is not None
        emb = read_embedding(embedding_file, config.num_hidden_layers, config.hidden_size)
    tokenizer = load_tokenizer(public)
    seq_len = min(seq_len, config.max_position_embeddings)
    blocks = tokenize_blocks(tokenizer, docs.texts, seq_len)
    torch.manual_seed(seed)
    model = build_coordinated(config, state, emb, bias, bias_init)
    model.to(world.device)  # type: ignore[arg-type]  # transformers types .to oddly
    params = trainable(model)
    schedule = fine_tune_schedule(steps, batch_size, lr, seed, checkpoint_every)
    work = partial_dir(out, force)
    result = train(
        model,
        params,
        blocks,
        schedule,
        work,
        world,
        label=f"expert {expert_id}",
        grad_hook=lambda: _mask_public(model),
        after_step=lambda: _clamp_bias(model),
        stop_after=stop_after,
        lr_scale=lambda name: ROUTER_LR_SCALE if ".mlp.gate." in name else 1.0,
        settings={
            "router_bias": bias,
            "router_bias_init": bias_init if bias else None,
            "router_init": router_init,
            "public_fingerprint": public_fp,
            "embedding_sha256": None
            if embedding_file is None
            else hashlib.sha256(embedding_file.read_bytes()).hexdigest(),
        },
    )
    if len(result.losses) < steps:
        return ExpertRun(out, model, result.losses, complete=False)
    if world.main:
        manifest = base_manifest(expert_id, owner, description, config, public_fp, docs, blocks)
        manifest.update(
            {
                "tokens_seen": result.tokens,
                "router_bias": bias,
                "router_bias_init": bias_init if bias else None,
                "router_init": router_init,
                "final_loss": result.losses[-1],
                "first_loss": result.losses[0],
                "settings": {**asdict(schedule), "seq_len": seq_len, "top_k": 2},
            }
        )
        write_artifact(out, artifact_tensors(model), manifest)
        shutil.rmtree(work, ignore_errors=True)
    world.barrier()
    return ExpertRun(out, model, result.losses, complete=True)


def check_expert_args(expert_id: str, owner: str, steps: int) -> None:
    """The id, owner and step count every expert-training command takes, checked."""
    from contracts.experts import ID_RULE, is_valid_id  # the one id rule (experts.json)

    if not is_valid_id(expert_id) or expert_id == "public":
        raise KitError(f"invalid expert id {expert_id!r}: {ID_RULE}, not 'public'")
    if not owner.strip():
        raise KitError("--owner must not be empty")
    if not 1 <= steps <= MAX_STEPS:
        raise KitError(f"--steps must be between 1 and {MAX_STEPS}")


def base_manifest(
    expert_id: str,
    owner: str,
    description: str | None,
    config: Any,
    public_fingerprint: str,
    docs: Documents,
    blocks: torch.Tensor,
) -> dict[str, Any]:
    """The manifest fields that say who trained what on which public model (no text);
    ``public_fingerprint`` is kit.modelio.fingerprint of the public model's tensors."""
    return {
        "format": FORMAT,
        "id": expert_id,
        "owner": owner,
        "description": description or f"expert {expert_id}",
        "public_fingerprint": public_fingerprint,
        "public_shapes": {
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.num_hidden_layers,
            "vocab_size": config.vocab_size,
        },
        "documents": len(docs.texts),
        "files": docs.files,
        "skipped_not_utf8": docs.skipped_not_utf8,
        "skipped_empty": docs.skipped_empty,
        "tokens_available": int(blocks.numel()),
    }


def write_artifact(out: Path, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> None:
    """``out``/expert.safetensors and manifest.json, written into a folder renamed at the end."""
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
