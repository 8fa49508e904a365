"""FlexOlmo's central results at small scale, with the kit and the governed engine.

    python bench/reproduce.py [--quick | --mode tiny|quick|full] [--seed 0] [--out DIR]
                              [--device cpu|cuda] [--threads 1] [--stop-after STAGE] [--force]

A public model is pretrained on the public split (FreeBSD fortunes); each of five closed
domains (kit.corpora: code, literature, biomedical, legal, math) gets an expert trained
independently against it with the coordinated recipe (``kit.expert.train_expert``), never
seeing another domain; the same budget of tokens trains every expert and every baseline (dense
fine-tunes of the public FFN, ``kit.dense``; the ablations' experts; the joint MoE gets the
sum, i.e. the same FLOPs). Held-out perplexity of every method row of docs/reproduction.md is
measured through the governed engine (``kit.evaluate``: ``Engine.forward`` with the allowed
set, which is also how an expert opts out), and training-data extraction through
``Engine.generate``. Everything goes to ``OUT`` (default ``var/reproduce-MODE``):
``results/results.json``, ``results/tables.md`` and, when matplotlib is installed
(``pip install 'flexgate[reproduce]'``), ``results/perplexity.png`` and ``results/optout.png``.

Deterministic under ``--seed`` (one CPU thread per process; the kit's batches are a function
of the seed and the step). Resumable: every stage writes its output atomically and is skipped
when the output exists, and a training interrupted mid-way resumes from its checkpoint (the
kit's ``OUT.partial``); a run with other settings in the same ``OUT`` is refused (``--force``
starts afresh). ``--stop-after STAGE`` ends the run after that stage, as an interruption would.
Progress goes to stderr, one line per stage and the kit's training lines.

``--mode tiny`` is for the test suite: a micro model and a few steps, to check the plumbing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

# the repository root first: bench/engine.py would shadow the engine package
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.repro.plan import DOMAINS, EXTRACT_DOMAIN, MODES, OWNERS, Plan
from contracts.exit_codes import ExitCode
from kit.documents import Documents
from kit.errors import KitError

STAGES = (
    "data",
    "public",
    "embed",
    "experts",
    "dense",
    "ablations",
    "joint",
    "merge",
    "tune",
    "eval",
    "routing",
    "extract",
    "report",
)
RESULTS = "results"


class Stopped(Exception):
    """``--stop-after`` ended the run."""


class Run:
    """One reproduction in ``work``: its stages, each skipped when its output exists."""

    def __init__(self, work: Path, mode: str, plan: Plan, seed: int, device: str) -> None:
        self.work, self.mode, self.plan, self.seed, self.device = work, mode, plan, seed, device
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        self.timing_file = work / "timing.json"
        self.timing: dict[str, Any] = (
            json.loads(self.timing_file.read_text())
            if self.timing_file.is_file()
            else {"stages": {}, "sessions": []}
        )
        self.session: dict[str, Any] = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "load_start": list(os.getloadavg()),
        }
        self.stop_after: str | None = None
        from kit.distributed import init_world

        self.world = init_world(device)

    # -- bookkeeping ------------------------------------------------------------------------

    def say(self, message: str) -> None:
        s = int(time.perf_counter() - self.t0)
        sys.stderr.write(f"[reproduce {s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}] {message}\n")
        sys.stderr.flush()

    def path(self, *parts: str) -> Path:
        return self.work.joinpath(*parts)

    def step(self, label: str, output: Path | None, fn: Callable[[], object]) -> None:
        """Run ``fn`` unless ``output`` exists (None: the caller checked); record its wall and
        CPU time and the load average after it."""
        if output is not None and output.exists():
            self.say(f"  skip {label} (done: {output.relative_to(self.work)})")
            return
        self.say(f"  {label}")
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        self.timing["stages"][label] = {
            "wall_s": round(time.perf_counter() - w0, 2),
            "cpu_s": round(time.process_time() - c0, 2),
            "load_after": [round(x, 2) for x in os.getloadavg()],
        }
        write_json(self.timing_file, self.timing)

    def stage_done(self, name: str) -> None:
        if self.stop_after == name:
            raise Stopped(name)

    def finish_session(self, last: str) -> None:
        self.session.update(
            {
                "wall_s": round(time.perf_counter() - self.t0, 2),
                "cpu_s": round(time.process_time() - self.c0, 2),
                "load_end": list(os.getloadavg()),
                "ended_after": last,
            }
        )
        self.timing["sessions"].append(self.session)
        write_json(self.timing_file, self.timing)

    # -- data -------------------------------------------------------------------------------

    def docs(self, domain: str, split: str = "train") -> Documents:
        data = json.loads(self.path("data", f"{domain}.json").read_text(encoding="utf-8"))
        return Documents(list(data[split]))

    def stage_data(self) -> None:
        from kit.corpora import load_corpus

        p = self.plan

        def build() -> None:
            closed = {d: load_corpus(d, p.domain_chars, p.valid_chars) for d in DOMAINS}
            texts = [t for c in closed.values() for t in c.train + c.valid]
            public = load_corpus("public", p.public_chars, p.valid_chars, exclude=texts)
            folder = self.path("data.tmp")
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            summary = {}
            for name, c in {"public": public, **closed}.items():
                write_json(folder / f"{name}.json", {"train": c.train, "valid": c.valid})
                tr, va = c.chars()
                summary[name] = {
                    "train_documents": len(c.train),
                    "train_chars": tr,
                    "valid_documents": len(c.valid),
                    "valid_chars": va,
                    "dropped_overlap": c.dropped_overlap,
                }
            write_json(folder / "summary.json", summary)
            os.replace(folder, self.path("data"))

        self.step("corpora (held-out splits)", self.path("data"), build)

    # -- training ---------------------------------------------------------------------------

    def stage_public(self) -> None:
        from kit.pretrain import pretrain

        p = self.plan
        self.step(
            f"pretrain the public model ({p.pretrain_steps} steps)",
            self.path("models", "public"),
            lambda: pretrain(
                self.docs("public"),
                self.path("models", "public"),
                size=p.size,
                steps=p.pretrain_steps,
                seed=self.seed,
                owner="public",
                checkpoint_every=p.checkpoint_every,
                world=self.world,
            ),
        )

    def embedding(self, domain: str) -> Path:
        return self.path("embeddings", f"{domain}.safetensors")

    def stage_embed(self) -> None:
        from kit.embed import run_embed

        for d in DOMAINS:
            self.step(
                f"embed {d}",
                self.embedding(d),
                lambda d=d: run_embed(  # type: ignore[misc]
                    self.path("models", "public"), self.docs(d), self.embedding(d), "hidden", False
                ),
            )

    def expert_seed(self, domain: str) -> int:
        """One seed per domain, shared by its expert, dense model and ablations (the same
        batches, so only the recipe differs)."""
        return self.seed + 1 + DOMAINS.index(domain)

    def artifact(self, variant: str, domain: str) -> Path:
        return self.path("experts", variant, domain)

    def _common(self, d: str) -> dict[str, Any]:
        p = self.plan
        return {
            "expert_id": d,
            "owner": OWNERS[d],
            "steps": p.expert_steps,
            "batch_size": p.expert_batch,
            "lr": p.expert_lr,
            "seq_len": p.seq_len,
            "seed": self.expert_seed(d),
            "checkpoint_every": p.checkpoint_every,
            "world": self.world,
        }

    def stage_experts(self, variant: str) -> None:
        """``coordinated`` (FlexOlmo), ``random-router``, ``no-bias`` or ``dense``."""
        from kit.dense import train_dense
        from kit.expert import train_expert

        public = self.path("models", "public")
        for i, d in enumerate(DOMAINS, start=1):
            out = self.artifact(variant, d)
            emb = self.embedding(d)

            def run(d: str = d, out: Path = out, emb: Path = emb) -> None:
                kw = self._common(d)
                docs = self.docs(d)
                if variant == "dense":
                    train_dense(public, docs, emb, out, **kw)
                elif variant == "random-router":
                    train_expert(public, docs, None, out, router_init="random", **kw)
                elif variant == "no-bias":
                    train_expert(public, docs, emb, out, bias=False, **kw)
                else:
                    train_expert(public, docs, emb, out, **kw)

            self.step(f"{variant} expert {i}/{len(DOMAINS)}: {d}", out, run)

    def stage_joint(self) -> None:
        from bench.repro.joint import train_joint

        p = self.plan
        if not p.joint:
            self.say("  joint MoE: not in this plan")
            return
        self.step(
            f"joint MoE on all closed data ({p.expert_steps * len(DOMAINS)} steps)",
            self.path("models", "joint"),
            lambda: train_joint(
                self.path("models", "public"),
                {d: self.docs(d) for d in DOMAINS},
                {d: self.embedding(d) for d in DOMAINS},
                self.path("models", "joint"),
                steps=p.expert_steps * len(DOMAINS),
                batch_size=p.expert_batch,
                lr=p.expert_lr,
                seq_len=p.seq_len,
                seed=self.seed + 50,
                world=self.world,
                checkpoint_every=p.checkpoint_every,
            ),
        )

    # -- merging ----------------------------------------------------------------------------

    def model(self, name: str) -> Path:
        return self.path("models", name)

    def stage_merge(self) -> None:
        from kit.dense import dense_model
        from kit.merge import merge

        public = self.model("public")
        coord = [self.artifact("coordinated", d) for d in DOMAINS]
        dense = [self.artifact("dense", d) for d in DOMAINS]
        jobs: list[tuple[str, Callable[[Path], object]]] = []
        for d in DOMAINS:
            art, dart = self.artifact("coordinated", d), self.artifact("dense", d)
            jobs.append((f"moe2-{d}", partial(_merge_one, public, art)))
            jobs.append((f"dense-{d}", partial(_dense_one, public, dart, d)))
        jobs += [
            ("soup", lambda o: dense_model(public, dense, o, model_id="soup")),
            ("flexolmo", lambda o: merge(public, coord, o, keep_bias=True)),
            ("flexolmo-dropbias", lambda o: merge(public, coord, o, keep_bias=False)),
            ("flexolmo-normtopk", partial(_renormalised, self.model("flexolmo"))),
            (
                "abl-random-router",
                lambda o: merge(
                    public, [self.artifact("random-router", d) for d in DOMAINS], o, keep_bias=True
                ),
            ),
            (
                "abl-no-bias",
                lambda o: merge(public, [self.artifact("no-bias", d) for d in DOMAINS], o),
            ),
            ("abl-no-frozen-public", lambda o: merge(public, dense, o)),
        ]
        for name, fn in jobs:
            out = self.model(name)
            self.step(f"merge {name}", out, lambda fn=fn, out=out: fn(out))  # type: ignore[misc]

    def tune_data(self) -> dict[str, Documents]:
        """Proxy samples for router tuning: the first ``tune_chars`` of each domain's
        training documents (the public one included)."""
        out = {}
        for d in ("public", *DOMAINS):
            texts, used = [], 0
            for t in self.docs(d).texts:
                if used >= self.plan.tune_chars:
                    break
                texts.append(t[: self.plan.tune_chars - used])
                used += len(texts[-1])
            out[d] = Documents(texts)
        return out

    def stage_tune(self) -> None:
        from kit.router_tune import router_tune

        p = self.plan
        self.step(
            f"router-tune FlexOlmo ({p.tune_steps} steps)",
            self.model("flexolmo-tuned"),
            lambda: router_tune(
                self.model("flexolmo"),
                self.tune_data(),
                self.model("flexolmo-tuned"),
                steps=p.tune_steps,
                batch_size=p.expert_batch,
                seq_len=p.seq_len,
                seed=self.seed,
                world=self.world,
            ),
        )

    # -- evaluation -------------------------------------------------------------------------

    def rows(self) -> list[tuple[str, str, str, str | None, list[str] | None]]:
        """(key, label, group, model folder or None for BTM, allowed set or None)."""
        rows: list[tuple[str, str, str, str | None, list[str] | None]] = [
            ("public", "public model", "baseline", "public", None)
        ]
        for d in DOMAINS:
            rows.append(
                (f"moe2:{d}", f"2-expert MoE, public + {d}", "single expert", f"moe2-{d}", None)
            )
        for d in DOMAINS:
            rows.append(
                (f"dense:{d}", f"dense model, {d} FFN", "single expert", f"dense-{d}", None)
            )
        rows += [
            ("soup", "model soup (mean of the 5 dense FFNs)", "prior merging", "soup", None),
            ("btm", "BTM ensemble (public + 5 dense)", "prior merging", None, None),
            ("flexolmo", "FlexOlmo, no router tuning", "FlexOlmo", "flexolmo", None),
            (
                "flexolmo-dropbias",
                "FlexOlmo, no router tuning, biases dropped at merge",
                "FlexOlmo",
                "flexolmo-dropbias",
                None,
            ),
            (
                "flexolmo-normtopk",
                "FlexOlmo, no router tuning, top-2 weights renormalised (diagnostic)",
                "FlexOlmo",
                "flexolmo-normtopk",
                None,
            ),
            ("flexolmo-tuned", "FlexOlmo, router-tuned", "FlexOlmo", "flexolmo-tuned", None),
            (
                "ablation:random-router",
                "ablation: router rows randomly initialised",
                "ablation",
                "abl-random-router",
                None,
            ),
            ("ablation:no-bias", "ablation: no negative bias", "ablation", "abl-no-bias", None),
            (
                "ablation:no-frozen-public",
                "ablation: experts trained without the frozen public expert",
                "ablation",
                "abl-no-frozen-public",
                None,
            ),
        ]
        if self.plan.joint:
            rows.append(
                (
                    "joint",
                    "unrestricted MoE, joint on all data (same FLOPs)",
                    "upper bound",
                    "joint",
                    None,
                )
            )
        everyone = ["public", *DOMAINS]
        for base, label in (("flexolmo", "FlexOlmo"), ("flexolmo-tuned", "FlexOlmo tuned")):
            for d in DOMAINS:
                rows.append(
                    (
                        f"{base}-minus:{d}",
                        f"{label}, {d} opted out",
                        "opt-out",
                        base,
                        [e for e in everyone if e != d],
                    )
                )
        return rows

    def eval_file(self, key: str) -> Path:
        return self.path("eval", key.replace(":", "__") + ".json")

    def stage_eval(self) -> None:
        from bench.repro.btm import btm_perplexity, token_logprobs
        from engine.api import load_engine
        from kit.evaluate import domain_blocks, perplexity

        valid = {d: self.docs(d, "valid").texts for d in ("public", *DOMAINS)}
        rows = self.rows()
        by_model: dict[str, list[tuple[str, list[str] | None]]] = {}
        for key, _, _, model, allowed in rows:
            if model is not None:
                by_model.setdefault(model, []).append((key, allowed))
        for model, wanted in by_model.items():
            todo = [(k, a) for k, a in wanted if not self.eval_file(k).exists()]
            if not todo:
                self.say(f"  skip eval {model} (done)")
                continue

            def run(model: str = model, todo: list[tuple[str, list[str] | None]] = todo) -> None:
                eng = load_engine(self.model(model), device_map=self.device)
                try:
                    blocks = {
                        d: domain_blocks(eng, t, self.plan.eval_blocks) for d, t in valid.items()
                    }
                    for key, allowed in todo:
                        ppl = {d: perplexity(eng, b, allowed) for d, b in blocks.items()}
                        write_json(self.eval_file(key), {"perplexity": ppl, "allowed": allowed})
                finally:
                    eng.close()

            self.step(f"eval {model} ({len(todo)} row(s))", None, run)

        def btm() -> None:
            members = ["public", *(f"dense-{d}" for d in DOMAINS)]
            logps: dict[str, list[Any]] = {d: [] for d in valid}
            for m in members:
                eng = load_engine(self.model(m), device_map=self.device)
                try:
                    for d, t in valid.items():
                        logps[d].append(
                            token_logprobs(eng, domain_blocks(eng, t, self.plan.eval_blocks))
                        )
                finally:
                    eng.close()
            ppl = {d: btm_perplexity(lp) for d, lp in logps.items()}
            write_json(self.eval_file("btm"), {"perplexity": ppl, "members": members})

        self.step("eval BTM ensemble", self.eval_file("btm"), btm)

    # -- extraction -------------------------------------------------------------------------

    def stage_routing(self) -> None:
        """Where the merged models send each domain's held-out tokens: per expert, its share
        of the router probability mass over the top-k selections (``Engine.forward``'s usage
        ``weight``) and of the selections themselves (``tokens``), every expert allowed."""
        from engine.api import load_engine
        from kit.evaluate import BATCH, domain_blocks

        valid = {d: self.docs(d, "valid").texts for d in ("public", *DOMAINS)}
        out = self.path("routing.json")

        def run() -> None:
            result: dict[str, Any] = {}
            for model in ("flexolmo", "flexolmo-tuned"):
                eng = load_engine(self.model(model), device_map=self.device)
                try:
                    shares: dict[str, Any] = {}
                    for d, texts in valid.items():
                        blocks = domain_blocks(eng, texts, self.plan.eval_blocks)
                        tok = dict.fromkeys(eng.expert_ids, 0.0)
                        wt = dict.fromkeys(eng.expert_ids, 0.0)
                        for start in range(0, len(blocks), BATCH):
                            for row in eng.forward(blocks[start : start + BATCH]).usage:
                                for e, (t, w) in row.items():
                                    tok[e] += t
                                    wt[e] += w
                        shares[d] = {
                            "weight": {e: wt[e] / sum(wt.values()) for e in wt},
                            "selections": {e: tok[e] / sum(tok.values()) for e in tok},
                        }
                    result[model] = shares
                finally:
                    eng.close()
            write_json(out, result)

        self.step("routing shares of the merged models", out, run)

    def stage_extract(self) -> None:
        from bench.repro.extraction import SAMPLED, THRESHOLD, extraction_rate, probes
        from engine.api import load_engine

        p, d = self.plan, EXTRACT_DOMAIN
        out = self.path("extraction.json")

        def run() -> None:
            texts = self.docs(d).texts
            everyone = ["public", *DOMAINS]
            targets = [
                ("public model", "public", None),
                (f"dense model fine-tuned on {d}", f"dense-{d}", None),
                (f"FlexOlmo with the {d} expert", "flexolmo", everyone),
                (f"FlexOlmo without the {d} expert", "flexolmo", [e for e in everyone if e != d]),
            ]
            models: dict[str, Any] = {}
            count = 0
            for label, model, allowed in targets:
                eng = load_engine(self.model(model), device_map=self.device)
                try:
                    items = probes(eng, texts, p.extract_docs, p.extract_prefix, p.extract_tokens)
                    count = len(items)
                    models[label] = extraction_rate(
                        eng, items, allowed, p.extract_tokens, self.seed + 1000
                    )
                finally:
                    eng.close()
                self.say(f"    {label}: {models[label]}")
            write_json(
                out,
                {
                    "domain": d,
                    "documents": count,
                    "prefix_tokens": p.extract_prefix,
                    "continuation_tokens": p.extract_tokens,
                    "threshold": THRESHOLD,
                    "sampling": SAMPLED,
                    "models": models,
                },
            )

        self.step(f"extraction ({d} training documents)", out, run)

    # -- report -----------------------------------------------------------------------------

    def tokens(self) -> dict[str, Any]:
        """Tokens each expert and baseline trained on, from the artifacts' manifests; the one
        budget is checked here."""
        p = self.plan
        per: dict[str, dict[str, int]] = {}
        for variant in ("coordinated", "dense", "random-router", "no-bias"):
            per[variant] = {}
            for d in DOMAINS:
                manifest = json.loads((self.artifact(variant, d) / "manifest.json").read_text())
                per[variant][d] = int(manifest["tokens_seen"])
        seen = {t for v in per.values() for t in v.values()}
        if seen != {p.expert_tokens}:
            raise RuntimeError(f"token budgets differ: {per}")
        pre = json.loads((self.model("public") / "pretrain.json").read_text())
        return {
            "budget_per_expert": p.expert_tokens,
            "per_expert": per,
            "joint_moe": p.expert_tokens * len(DOMAINS) if p.joint else None,
            "router_tuning": p.tune_steps * p.expert_batch * p.seq_len,
            "public_pretraining": int(pre["tokens_seen"]),
        }

    def stage_report(self) -> dict[str, Any]:
        from bench.repro.report import claims, figures, markdown, method_row

        rows = self.rows()
        ppl = {k: json.loads(self.eval_file(k).read_text())["perplexity"] for k, *_ in rows}
        public = ppl["public"]
        methods = [method_row(k, label, group, ppl[k], public) for k, label, group, _, _ in rows]
        by_key = {m["key"]: m for m in methods}
        extraction = self.path("extraction.json")
        result: dict[str, Any] = {
            "mode": self.mode,
            "seed": self.seed,
            "plan": self.plan.to_json(),
            "domains": list(DOMAINS),
            "owners": OWNERS,
            "data": json.loads(self.path("data", "summary.json").read_text()),
            "tokens": self.tokens(),
            "methods": methods,
            "claims": claims(by_key, DOMAINS),
            "extraction": json.loads(extraction.read_text()) if extraction.exists() else None,
            "routing": json.loads(self.path("routing.json").read_text()),
        }
        folder = self.path(RESULTS)
        folder.mkdir(exist_ok=True)
        (folder / "tables.md").write_text(markdown(result), encoding="utf-8")
        result["figures"] = figures(result, folder)
        result["run"] = self.run_info()
        write_json(folder / "results.json", result)
        return result

    def run_info(self) -> dict[str, Any]:
        stages = self.timing["stages"]
        return {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "device": self.device,
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "stage_wall_s": round(sum(s["wall_s"] for s in stages.values()), 1),
            "stage_cpu_s": round(sum(s["cpu_s"] for s in stages.values()), 1),
            "stages": stages,
            "sessions": [*self.timing["sessions"], {**self.session, "running": True}],
        }


def _merge_one(public: Path, artifact: Path, out: Path) -> None:
    from kit.merge import merge

    merge(public, [artifact], out, keep_bias=True)


def _dense_one(public: Path, artifact: Path, model_id: str, out: Path) -> None:
    from kit.dense import dense_model

    dense_model(public, [artifact], out, model_id=model_id)


def _renormalised(merged: Path, out: Path) -> None:
    """A copy of ``merged`` whose top-k router weights are renormalised to sum to 1
    (``norm_topk_prob``): each expert was trained in a 2-expert MoE where its top-2 weights
    summed to 1, and in the merged top-2-of-6 model they sum to less (a diagnostic row)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(merged, tmp)
    config = json.loads((tmp / "config.json").read_text())
    config["norm_topk_prob"] = True
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, out)


def write_json(path: Path, data: Any) -> None:
    """Written beside and renamed: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--mode", choices=sorted(MODES), default="full")
    ap.add_argument(
        "--quick", action="store_const", const="quick", dest="mode", help="--mode quick"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--out", type=Path, default=None, help="work folder (default var/reproduce-MODE)"
    )
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:0 ...")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: see docs/kit.md)")
    ap.add_argument("--stop-after", choices=STAGES, default=None)
    ap.add_argument("--force", action="store_true", help="remove OUT first and start afresh")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    plan = MODES[args.mode]
    work: Path = args.out or Path("var") / f"reproduce-{args.mode}"
    if args.threads < 1:
        sys.stderr.write("Error: --threads must be at least 1\n")
        return int(ExitCode.USAGE)
    if importlib.util.find_spec("rapidfuzz") is None:  # checked before hours of training
        sys.stderr.write(
            "Error: the extraction test needs rapidfuzz: pip install 'flexgate[reproduce]'\n"
        )
        return int(ExitCode.USAGE)
    settings = {"mode": args.mode, "seed": args.seed, "device": args.device, "plan": plan.to_json()}
    marker = work / "settings.json"
    if args.force and work.exists():
        shutil.rmtree(work)
    if marker.is_file() and json.loads(marker.read_text()) != settings:
        sys.stderr.write(
            f"Error: {work} holds a run with other settings (mode, seed, device or plan); "
            "pass --force to start afresh, or another --out\n"
        )
        return int(ExitCode.REFUSED)
    if work.exists() and not marker.is_file() and any(work.iterdir()):
        sys.stderr.write(f"Error: {work} exists and is not a reproduction folder\n")
        return int(ExitCode.REFUSED)
    write_json(marker, settings)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    main_thread = threading.current_thread() is threading.main_thread()
    old_handler = signal.getsignal(signal.SIGTERM)
    if main_thread:
        # a kill ends the run as an interruption does: this session's time is recorded
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    run = Run(work, args.mode, plan, args.seed, args.device)
    run.stop_after = args.stop_after
    run.say(f"mode {args.mode}, seed {args.seed}, device {args.device}, work {work}")
    last = "start"
    try:
        for n, name in enumerate(STAGES, start=1):
            run.say(f"stage {n}/{len(STAGES)}: {name}")
            if name == "experts":
                run.stage_experts("coordinated")
            elif name == "dense":
                run.stage_experts("dense")
            elif name == "ablations":
                run.stage_experts("random-router")
                run.stage_experts("no-bias")
            elif name == "report":
                result = run.stage_report()
                run.say("results in " + str(work / RESULTS))
                sys.stderr.write((work / RESULTS / "tables.md").read_text())
                c = result["claims"]["flexolmo"]
                run.say(
                    f"FlexOlmo vs public: {c['relative_to_public']:+.1%}; vs prior merging "
                    f"(mean of soup, BTM): {c['relative_to_prior_merging_mean']:+.1%}"
                )
            else:
                getattr(run, f"stage_{name}")()
            last = name
            run.stage_done(name)
    except Stopped as stop:
        run.say(f"stopped after stage {stop} (--stop-after); run again to resume")
    except KitError as exc:
        sys.stderr.write(f"Error: {exc}\n")
        return int(exc.exit_code)
    finally:
        run.finish_session(last)
        torch.set_num_threads(threads)
        if main_thread:
            signal.signal(signal.SIGTERM, old_handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
