"""The reproduction's results: derived numbers (averages, relative improvements, the paper's
claims), Markdown tables, and the two figures (matplotlib, optional).

Averages are geometric means of the per-domain perplexities (``exp`` of the mean log
perplexity: each domain weighs the same, whatever its scale); a relative improvement over a
reference is ``1 - average / reference average`` (positive: lower perplexity).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["claims", "figures", "geomean", "markdown", "method_row"]


def geomean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def method_row(
    key: str, label: str, group: str, ppl: Mapping[str, float], public: Mapping[str, float]
) -> dict[str, Any]:
    avg = geomean(list(ppl.values()))
    return {
        "key": key,
        "label": label,
        "group": group,
        "perplexity": dict(ppl),
        "average": avg,
        "relative_to_public": 1.0 - avg / geomean(list(public.values())),
        "relative_to_public_by_domain": {d: 1.0 - ppl[d] / public[d] for d in ppl},
    }


def _rel(a: float, b: float) -> float:
    """How much lower ``a`` is than ``b`` (relative)."""
    return 1.0 - a / b


def claims(rows: Mapping[str, Mapping[str, Any]], domains: Sequence[str]) -> dict[str, Any]:
    """The paper's three claims, in this run's numbers."""
    avg = {k: float(r["average"]) for k, r in rows.items()}
    out: dict[str, Any] = {}
    for base in ("flexolmo", "flexolmo-tuned"):
        priors = {p: _rel(avg[base], avg[p]) for p in ("soup", "btm")}
        entry: dict[str, Any] = {
            "relative_to_public": rows[base]["relative_to_public"],
            "relative_to_prior_merging": priors,
            "relative_to_prior_merging_mean": sum(priors.values()) / len(priors),
        }
        if "joint" in avg:
            entry["relative_to_joint_moe"] = _rel(avg[base], avg["joint"])
        opt: dict[str, Any] = {}
        for x in domains:
            minus = rows[f"{base}-minus:{x}"]["perplexity"]
            full = rows[base]["perplexity"]
            pub = rows["public"]["perplexity"]
            gain = pub[x] - full[x]
            others = [abs(minus[d] / full[d] - 1.0) for d in full if d != x]
            opt[x] = {
                "own_domain_change": minus[x] / full[x] - 1.0,
                "own_gain_removed": (minus[x] - full[x]) / gain if gain else None,
                "others_mean_abs_change": sum(others) / len(others),
                "others_max_abs_change": max(others),
            }
        entry["opt_out"] = opt
        out[base] = entry
    return out


def _fmt(v: float) -> str:
    return f"{v:.2f}"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v * 100:+.1f} %"


def markdown(result: Mapping[str, Any]) -> str:
    """The tables of docs/reproduction.md, from ``results.json``'s content."""
    domains = ["public", *result["domains"]]
    rows = result["methods"]
    head = "| method | " + " | ".join(domains) + " | average | vs public |"
    sep = "| --- | " + " | ".join("---:" for _ in domains) + " | ---: | ---: |"
    lines = ["### Held-out perplexity", "", head, sep]
    for r in rows:
        cells = [_fmt(r["perplexity"][d]) for d in domains]
        lines.append(
            f"| {r['label']} | "
            + " | ".join(cells)
            + f" | {_fmt(r['average'])} | {_pct(r['relative_to_public'])} |"
        )
    for base, c in result["claims"].items():
        lines += ["", f"### Opt-out ({base}): change when one expert is left out", ""]
        lines += [
            "| expert left out | own domain | share of own gain removed | others, mean abs"
            " | others, max abs |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for x, o in c["opt_out"].items():
            lines.append(
                f"| {x} | {_pct(o['own_domain_change'])} | {_pct(o['own_gain_removed'])} | "
                f"{_pct(o['others_mean_abs_change'])} | {_pct(o['others_max_abs_change'])} |"
            )
    for model, shares in (result.get("routing") or {}).items():
        experts = list(next(iter(shares.values()))["weight"])
        lines += [
            "",
            f"### Routing ({model}): share of the router probability mass per expert, by domain",
            "",
            "| domain | " + " | ".join(experts) + " |",
            "| --- | " + " | ".join("---:" for _ in experts) + " |",
        ]
        for d, v in shares.items():
            lines.append(
                f"| {d} | " + " | ".join(f"{v['weight'][e] * 100:.1f} %" for e in experts) + " |"
            )
    ex = result.get("extraction")
    if ex:
        lines += [
            "",
            f"### Extraction ({ex['domain']} training documents: {ex['documents']} prefixes of "
            f"{ex['prefix_tokens']} tokens, {ex['continuation_tokens']} generated, "
            f"extracted when similarity >= {ex['threshold']})",
            "",
            "| model | greedy | sampled | mean similarity, greedy | mean similarity, sampled |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for name, v in ex["models"].items():
            lines.append(
                f"| {name} | {v['greedy'] * 100:.1f} % | {v['sampled'] * 100:.1f} % | "
                f"{v['greedy_mean_similarity']:.3f} | {v['sampled_mean_similarity']:.3f} |"
            )
    return "\n".join(lines) + "\n"


FIGURE_ROWS = (
    "public",
    "soup",
    "btm",
    "flexolmo",
    "flexolmo-normtopk",
    "flexolmo-tuned",
    "ablation:random-router",
    "ablation:no-bias",
    "ablation:no-frozen-public",
    "joint",
)


def figures(result: Mapping[str, Any], folder: Path) -> list[str]:
    """perplexity.png and optout.png in ``folder``; [] when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    rows = {r["key"]: r for r in result["methods"]}
    domains = ["public", *result["domains"]]
    keys = [k for k in FIGURE_ROWS if k in rows]
    fig, ax = plt.subplots(figsize=(12, 6))
    width = 0.8 / len(keys)
    for j, k in enumerate(keys):
        xs = [i + (j - (len(keys) - 1) / 2) * width for i in range(len(domains) + 1)]
        ys = [rows[k]["perplexity"][d] for d in domains] + [rows[k]["average"]]
        ax.bar(xs, ys, width, label=rows[k]["label"])
    ax.set_xticks(range(len(domains) + 1), [*domains, "average (geo.)"])
    ax.set_yscale("log")
    ax.set_ylabel("held-out perplexity (log scale, lower is better)")
    ax.set_title("Held-out perplexity by domain and method")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    fig.tight_layout()
    fig.savefig(folder / "perplexity.png", dpi=110)
    plt.close(fig)

    bases = [b for b in ("flexolmo", "flexolmo-tuned") if b in rows]
    fig, axes = plt.subplots(1, len(bases), figsize=(6 * len(bases), 4.8), squeeze=False)
    for ax, base in zip(axes[0], bases, strict=True):
        full = rows[base]["perplexity"]
        grid = [
            [100 * (rows[f"{base}-minus:{x}"]["perplexity"][d] / full[d] - 1) for d in domains]
            for x in result["domains"]
        ]
        lim = max(1.0, max(abs(v) for line in grid for v in line))
        im = ax.imshow(grid, cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_xticks(range(len(domains)), domains, rotation=30)
        ax.set_yticks(range(len(result["domains"])), [f"-{x}" for x in result["domains"]])
        for i, line in enumerate(grid):
            for j, v in enumerate(line):
                ax.text(j, i, f"{v:+.0f}", ha="center", va="center", fontsize=8)
        ax.set_title(f"{rows[base]['label']}: % perplexity change\nwhen one expert opts out")
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(folder / "optout.png", dpi=110)
    plt.close(fig)
    return ["perplexity.png", "optout.png"]
