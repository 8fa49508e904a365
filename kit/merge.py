"""``flexgate model merge``: the public model and experts -> one FlexOlmo checkpoint.

No joint training: the public model's weights are kept as they are, each expert's FFN becomes
one more expert per layer and its router row one more row. ``experts.json`` lists the public
expert first, then each expert with its owner and description.

Router biases: the released FlexOlmo checkpoints carry none, and transformers'
FlexOlmoForCausalLM has no place for one, so by default the merged model drops them (it is then
exactly a transformers FlexOlmo checkpoint: no missing or unexpected weights, the same logits).
``keep_bias`` writes them as ``model.layers.N.mlp.gate.bias`` (0 for the public expert), which
this engine applies and transformers ignores (it reports them as unexpected).

Refused with a clear error, before anything is written: an expert trained on another public
model (fingerprint), two experts with one id (or the public id), tensors whose shapes do not
fit the public model, a file that is not an expert artifact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from engine.experts import ExpertInfo
from engine.modeling import ROUTER_BIAS_ATTR
from kit.errors import KitError
from kit.expert import FORMAT, MANIFEST, PROJ, WEIGHTS
from kit.modelio import (
    atomic_dir,
    fingerprint,
    load_state,
    load_tokenizer,
    prepare_out,
    read_expert_infos,
    save_model,
)

__all__ = ["Artifact", "merge", "read_artifact"]


@dataclass
class Artifact:
    path: Path
    manifest: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def id(self) -> str:
        return str(self.manifest["id"])


def read_artifact(path: Path) -> Artifact:
    manifest_path, weights = path / MANIFEST, path / WEIGHTS
    if not manifest_path.is_file() or not weights.is_file():
        raise KitError(f"{path}: not an expert artifact (needs {MANIFEST} and {WEIGHTS})")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise KitError(f"{manifest_path}: not readable JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise KitError(f"{manifest_path}: not a {FORMAT} manifest")
    for key in ("id", "owner", "public_fingerprint"):
        if not isinstance(manifest.get(key), str):
            raise KitError(f"{manifest_path}: no string {key!r}")
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k).float() for k in f.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own types for a corrupt file
        raise KitError(f"{weights}: unreadable ({exc})") from exc
    return Artifact(path, manifest, tensors)


def _check_shapes(art: Artifact, config: Any) -> bool:
    """Every expected tensor with its shape; returns whether the artifact has a bias."""
    h, inter, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    expected: dict[str, tuple[int, ...]] = {}
    for i in range(n):
        expected[f"layers.{i}.gate_proj.weight"] = (inter, h)
        expected[f"layers.{i}.up_proj.weight"] = (inter, h)
        expected[f"layers.{i}.down_proj.weight"] = (h, inter)
        expected[f"layers.{i}.router"] = (h,)
    has_bias = any(k.endswith(".bias") for k in art.tensors)
    if has_bias:
        expected.update({f"layers.{i}.bias": (1,) for i in range(n)})
    problems = []
    for key, shape in expected.items():
        got = art.tensors.get(key)
        if got is None:
            problems.append(f"{key} missing")
        elif tuple(got.shape) != shape:
            problems.append(
                f"{key} has shape {list(got.shape)}, the public model needs {list(shape)}"
            )
    problems += [f"{k} unexpected" for k in art.tensors if k not in expected]
    if problems:
        raise KitError(
            f"{art.path}: expert {art.id!r} does not fit the public model (hidden_size={h}, "
            f"intermediate_size={inter}, layers={n}): " + "; ".join(problems[:6])
        )
    return has_bias


def merge(
    public: Path,
    experts: list[Path],
    out: Path,
    *,
    top_k: int = 2,
    keep_bias: bool = False,
    force: bool = False,
) -> Path:
    """Write the merged model to ``out`` (a temporary folder renamed at the end)."""
    if not experts:
        raise KitError("no --expert given")
    if top_k < 1:
        raise KitError("--top-k must be at least 1")
    prepare_out(out, force)
    config, state = load_state(public)
    if config.num_experts != 1:
        raise KitError(f"{public}: has {config.num_experts} experts; --public is the dense model")
    public_info = read_expert_infos(public, 1)[0]
    fp = fingerprint(state)
    arts = [read_artifact(p) for p in experts]
    seen: dict[str, Path] = {public_info.id: public}
    biases = []
    for art in arts:
        if art.id in seen:
            raise KitError(f"two experts with id {art.id!r}: {seen[art.id]} and {art.path}")
        seen[art.id] = art.path
        if art.manifest["public_fingerprint"] != fp:
            raise KitError(
                f"{art.path}: expert {art.id!r} was trained on another public model "
                f"(fingerprint {art.manifest['public_fingerprint'][:16]}…, "
                f"{public} has {fp[:16]}…)"
            )
        biases.append(_check_shapes(art, config))

    n_exp = 1 + len(arts)
    merged = dict(state)
    write_bias = keep_bias and any(biases)
    for i in range(config.num_hidden_layers):
        rows = [state[f"model.layers.{i}.mlp.gate.weight"][0]]
        bias = [torch.zeros(1)]
        for e, art in enumerate(arts, start=1):
            for proj in PROJ:
                key = f"model.layers.{i}.mlp.experts.{e}.{proj}.weight"
                merged[key] = art.tensors[f"layers.{i}.{proj}.weight"]
            rows.append(art.tensors[f"layers.{i}.router"])
            bias.append(art.tensors.get(f"layers.{i}.bias", torch.zeros(1)))
        merged[f"model.layers.{i}.mlp.gate.weight"] = torch.stack(rows)
        if write_bias:
            merged[f"model.layers.{i}.mlp.gate.bias"] = torch.cat(bias)
    config.num_experts = n_exp
    config.num_experts_per_tok = min(top_k, n_exp)
    setattr(config, ROUTER_BIAS_ATTR, write_bias)
    infos = [public_info] + [
        ExpertInfo(a.id, owner=str(a.manifest["owner"]), description=a.manifest.get("description"))
        for a in arts
    ]
    tokenizer = load_tokenizer(public)
    with atomic_dir(out) as tmp:
        save_model(tmp, config, merged, tokenizer, infos)
    return out
