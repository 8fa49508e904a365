"""Does the new expert's router bias (kit.expert.BIAS_INIT) change what the demo's experts do?

Needs a full demo build in FLEXGATE_HOME (``flexgate demo build``): its experts were trained
with the bias, and ``demo-model`` merges them with the biases dropped. This script trains the
same four experts again with ``bias=False`` (the same documents, embeddings, seeds, steps and
batches as the build), and writes beside the build

- ``demo-build/merged-keepbias``: the build's experts merged with ``keep_bias=True``;
- ``demo-build/merged-nobias``: the no-bias experts merged;

then prints each trained expert's final bias per layer. Evaluate the three models (with
``demo-model``) with ``flexgate model eval`` on ``demo-data/*/valid.txt``; results go to
docs/kit.md.

    python bench/kit_bias.py [FLEXGATE_HOME]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

# the repository root first: bench/engine.py would shadow the engine package
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kit.corpora import load_corpus
from kit.demo import DESCRIPTIONS, FULL, OWNERS
from kit.documents import Documents
from kit.expert import train_expert
from kit.merge import merge


def main() -> None:
    home = Path(sys.argv[1] if len(sys.argv) > 1 else "var")
    build = home / "demo-build"
    public = build / "public"
    torch.set_num_threads(1)
    plan = FULL
    for i, name in enumerate(OWNERS, start=1):  # the build's order and seeds
        corpus = load_corpus(name, plan.domain_chars, plan.valid_chars)
        train_expert(
            public,
            Documents(corpus.train),
            build / f"{name}.embedding.safetensors",
            build / f"nobias-{name}",
            expert_id=name,
            owner=OWNERS[name],
            description=DESCRIPTIONS[name],
            steps=plan.expert_steps,
            batch_size=plan.expert_batch,
            seed=i,
            bias=False,
            force=True,
        )
    biased = [build / f"expert-{name}" for name in OWNERS]
    merge(public, biased, build / "merged-keepbias", top_k=2, keep_bias=True, force=True)
    nobias = [build / f"nobias-{name}" for name in OWNERS]
    merge(public, nobias, build / "merged-nobias", top_k=2, force=True)
    for art in biased:
        tensors = load_file(str(art / "expert.safetensors"))
        layers = sorted(k for k in tensors if k.endswith(".bias"))
        values = ", ".join(f"{float(tensors[k]):.4f}" for k in layers)
        print(f"{art.name}: final bias per layer {values}")


if __name__ == "__main__":
    main()
