"""``flexgate demo build``: the demo model, made with the kit's own commands.

``$FLEXGATE_HOME/demo-model``: a public model pretrained on fortune-file English and four domain
experts (code, literature, biomedical, legal) trained against it by two data owners (``alice``:
code and legal; ``bob``: literature and biomedical), merged without joint training. The corpora
splits are written to ``$FLEXGATE_HOME/demo-data/DOMAIN/{train,valid}.txt`` and the pieces
(public model, embeddings, expert artifacts) to ``$FLEXGATE_HOME/demo-build``, so every step
can be rerun by hand with the commands docs/kit.md lists. At the end: held-out perplexity per
domain with every expert and with each expert left out, and a Python prompt completed with and
without the code expert. The full build checks that each expert lowers its own domain's
perplexity by at least ``MIN_GAIN`` and that the code expert changes the completion.

Training runs one CPU thread per process: on a busy 2-core machine torch's OpenMP team of two
spin-waits for the other core and a step takes several times longer (docs/kit.md).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kit.corpora import load_corpus
from kit.documents import Documents
from kit.errors import KitError

__all__ = ["OWNERS", "DemoPlan", "build_demo"]

OWNERS = {"code": "alice", "legal": "alice", "literature": "bob", "biomedical": "bob"}
DESCRIPTIONS = {
    "code": "Python standard library source",
    "literature": "Shakespeare's plays",
    "biomedical": "Human Phenotype Ontology definitions",
    "legal": "software licence texts",
}
MIN_GAIN = 0.10
PYTHON_PROMPT = "if __name__ == "


@dataclass(frozen=True)
class DemoPlan:
    public_chars: int
    domain_chars: int
    valid_chars: int
    pretrain_steps: int
    expert_steps: int
    expert_batch: int
    eval_blocks: int
    completion_tokens: int


FULL = DemoPlan(1_000_000, 300_000, 40_000, 200, 100, 8, 16, 24)
QUICK = DemoPlan(60_000, 20_000, 6_000, 4, 3, 4, 2, 8)


def _say(message: str) -> None:
    sys.stderr.write(f"[demo] {message}\n")
    sys.stderr.flush()


def _write_split(folder: Path, train: list[str], valid: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    sep = "\n\n"
    (folder / "train.txt").write_text(sep.join(train) + "\n", encoding="utf-8")
    (folder / "valid.txt").write_text(sep.join(valid) + "\n", encoding="utf-8")


def build_demo(home: Path, *, force: bool = False, quick: bool = False) -> Path | None:
    """Build ``home/demo-model`` unless it exists (``force`` rebuilds); returns its path."""
    model_dir = home / "demo-model"
    if model_dir.exists() and not force:
        _say(f"{model_dir} exists; nothing to do (--force rebuilds)")
        return model_dir
    # after the check: an existing model costs no import of transformers' model code
    from engine.api import load_engine
    from kit.distributed import init_world
    from kit.embed import run_embed
    from kit.evaluate import domain_blocks, format_table, perplexity_table
    from kit.expert import train_expert
    from kit.merge import merge
    from kit.pretrain import pretrain

    plan = QUICK if quick else FULL
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        world = init_world("cpu")
        data_dir, build_dir = home / "demo-data", home / "demo-build"
        if build_dir.exists():
            shutil.rmtree(build_dir)
        build_dir.mkdir(parents=True)

        _say("1/5 corpora (held-out splits in demo-data/)")
        corpora = {d: load_corpus(d, plan.domain_chars, plan.valid_chars) for d in OWNERS}
        closed_texts = [t for c in corpora.values() for t in c.train + c.valid]
        public = load_corpus("public", plan.public_chars, plan.valid_chars, exclude=closed_texts)
        for name, c in {"public": public, **corpora}.items():
            _write_split(data_dir / name, c.train, c.valid)
            tr, va = c.chars()
            _say(
                f"    {name:<11} {len(c.train):>5} train docs ({tr:,} chars), "
                f"{len(c.valid)} held out ({va:,} chars)"
            )
        if public.dropped_overlap:
            _say(f"    public: dropped {public.dropped_overlap} fortunes quoting a closed domain")

        _say(f"2/5 pretrain the public model ({plan.pretrain_steps} steps)")
        public_dir = build_dir / "public"
        pretrain(
            Documents(public.train),
            public_dir,
            size="tiny",
            steps=plan.pretrain_steps,
            seed=0,
            owner="public",
            world=world,
        )

        _say(f"3/5 train {len(corpora)} experts ({plan.expert_steps} steps each)")
        artifacts = []
        for i, (name, c) in enumerate(corpora.items(), start=1):
            docs = Documents(c.train)
            emb = build_dir / f"{name}.embedding.safetensors"
            run_embed(public_dir, docs, emb, "hidden", force=True)
            art = build_dir / f"expert-{name}"
            _say(f"    expert {i}/{len(corpora)}: {name} (owner {OWNERS[name]})")
            train_expert(
                public_dir,
                docs,
                emb,
                art,
                expert_id=name,
                owner=OWNERS[name],
                description=DESCRIPTIONS[name],
                steps=plan.expert_steps,
                batch_size=plan.expert_batch,
                seed=i,
                world=world,
            )
            artifacts.append(art)

        _say("4/5 merge")
        merged = build_dir / "merged"
        merge(public_dir, artifacts, merged, top_k=2)

        _say("5/5 evaluate (held-out perplexity through the governed engine)")
        eng = load_engine(merged)
        domains = {
            name: domain_blocks(eng, c.valid, plan.eval_blocks)
            for name, c in {"public": public, **corpora}.items()
        }
        sets: dict[str, list[str] | None] = {"all": None}
        for name in corpora:
            sets[f"-{name}"] = [e for e in eng.expert_ids if e != name]
        sets["public only"] = ["public"]
        table = perplexity_table(eng, domains, sets)
        _say(
            "held-out perplexity (columns: experts allowed; '-X': all but X)\n"
            + format_table(table)
        )
        gains = {name: 1.0 - table["all"][name] / table[f"-{name}"][name] for name in corpora}
        _say(
            "own-domain gain of each expert (1 - ppl with / ppl without): "
            + ", ".join(f"{k} {v:+.1%}" for k, v in gains.items())
        )
        with_code, without_code = _complete(eng, PYTHON_PROMPT, plan.completion_tokens)
        _say(
            f"completion of {PYTHON_PROMPT!r}\n    with code:    {with_code!r}\n"
            f"    without code: {without_code!r}"
        )
        seconds = time.perf_counter() - t0
        report = {
            "seconds": round(seconds, 1),
            "quick": quick,
            "plan": plan.__dict__,
            "perplexity": table,
            "gains": gains,
            "completion": {
                "prompt": PYTHON_PROMPT,
                "with_code": with_code,
                "without_code": without_code,
            },
            "owners": OWNERS,
        }
        (build_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        if not quick:
            weak = [k for k, v in gains.items() if v < MIN_GAIN]
            if weak:
                raise KitError(
                    f"demo experts {weak} lower their domain's perplexity by less "
                    f"than {MIN_GAIN:.0%}; see {build_dir / 'report.json'}"
                )
            if with_code == without_code:
                raise KitError("excluding the code expert did not change the Python completion")
        eng.close()
        if model_dir.exists():
            shutil.rmtree(model_dir)
        merged.rename(model_dir)
        _say(f"done in {seconds:.0f} s: {model_dir}")
        return model_dir
    finally:
        torch.set_num_threads(threads)


def _complete(eng: object, prompt: str, tokens: int) -> tuple[str, str]:
    from engine.api import Engine

    assert isinstance(eng, Engine)
    ids = [int(i) for i in eng.tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    everyone = eng.expert_ids
    outs = []
    for allowed in (list(everyone), [e for e in everyone if e != "code"]):
        res = eng.generate(ids, allowed=allowed, max_tokens=tokens, temperature=0.0)
        outs.append(res.text)
    return outs[0], outs[1]
