"""Which router-row initialisation works better: ``hidden`` or ``minilm`` (kit.embed)?

For each domain and method: embed, train the expert for STEPS steps against the demo's public
model, merge the public model with that one expert, and measure held-out perplexity on the
expert's domain and on the public domain (through the engine). Lower is better on both: the
first says the expert helps its domain, the second that the router leaves public text to the
public expert. Results go to docs/kit.md.

    python bench/kit_embed.py [FLEXGATE_HOME] [STEPS]
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

# the repository root first: bench/engine.py would shadow the engine package
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import load_engine
from kit.documents import Documents
from kit.embed import run_embed
from kit.evaluate import domain_blocks, perplexity
from kit.expert import train_expert
from kit.merge import merge


def main() -> None:
    home = Path(sys.argv[1] if len(sys.argv) > 1 else "var")
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    torch.set_num_threads(1)
    public = home / "demo-build" / "public"
    data = home / "demo-data"
    results = {}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        for domain in ("code", "legal"):
            docs = Documents([(data / domain / "train.txt").read_text()[:200_000]])
            for method in ("hidden", "minilm"):
                emb = run_embed(public, docs, tmp / f"{domain}-{method}.st", method, force=True)
                art = train_expert(
                    public,
                    docs,
                    emb,
                    tmp / f"{domain}-{method}",
                    expert_id=domain,
                    owner="bench",
                    steps=steps,
                    batch_size=8,
                    seed=1,
                ).path
                merged = merge(public, [art], tmp / f"m-{domain}-{method}", force=True)
                eng = load_engine(merged)
                own = domain_blocks(eng, [(data / domain / "valid.txt").read_text()], 16)
                pub = domain_blocks(eng, [(data / "public" / "valid.txt").read_text()], 16)
                results[f"{domain}/{method}"] = {
                    "own": round(perplexity(eng, own, None), 2),
                    "own_public_only": round(perplexity(eng, own, ["public"]), 2),
                    "public": round(perplexity(eng, pub, None), 2),
                    "public_public_only": round(perplexity(eng, pub, ["public"]), 2),
                }
                eng.close()
                print(domain, method, results[f"{domain}/{method}"], flush=True)
                shutil.rmtree(merged)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
