"""The kit's commands: ``model pretrain|merge|router-tune|eval``, ``expert embed|train``,
``demo build``. ``gateway.cli`` wires each in lazily by name; heavy imports happen inside.

Every bad input is one line on stderr and exit code 2 (an output that exists without --force:
4; contracts.exit_codes, docs/cli.md); nothing is left half-written (outputs are written to
a temporary folder and renamed at the end).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click

from contracts.exit_codes import ExitCode

__all__ = [
    "demo_build",
    "eval_cmd",
    "expert_embed",
    "expert_train",
    "merge_cmd",
    "pretrain_cmd",
    "router_tune_cmd",
]

F = TypeVar("F", bound=Callable[..., Any])

_PATH = click.Path(path_type=Path)
_DATA = click.option(
    "--data",
    "data",
    multiple=True,
    required=True,
    type=_PATH,
    help="A text file or folder (repeatable); non-UTF-8 and empty files are skipped.",
)
_FORCE = click.option("--force", is_flag=True, help="Replace an existing output.")
_SEED = click.option("--seed", default=0, show_default=True, type=int)
_DEVICE = click.option(
    "--device", default=None, help="cpu, cuda:0 ... (default: this rank's GPU, else the CPU)."
)


def _kit_errors(fn: F) -> F:
    """KitError (and the engine's errors) -> one line on stderr and the error's exit code."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from engine.errors import EngineError
        from kit.errors import KitError

        try:
            return fn(*args, **kwargs)
        except (KitError, EngineError) as exc:
            click.echo(f"Error: {exc}", err=True)
            code = exc.exit_code if isinstance(exc, KitError) else ExitCode.USAGE
            raise SystemExit(int(code)) from None

    return wrapper  # type: ignore[return-value]


def _docs(paths: tuple[Path, ...]) -> Any:
    from kit.documents import read_documents

    docs = read_documents(list(paths))
    click.echo(f"data: {docs.summary()}", err=True)
    return docs


@click.command("pretrain")
@_DATA
@click.option("--out", required=True, type=_PATH, help="Folder for the public model.")
@click.option("--size", type=click.Choice(["tiny", "small"]), default="tiny", show_default=True)
@click.option("--steps", type=click.IntRange(1, 200_000), default=300, show_default=True)
@_SEED
@click.option("--owner", default="public", show_default=True, help="Owner in experts.json.")
@click.option("--checkpoint-every", type=click.IntRange(1), default=50, show_default=True)
@_DEVICE
@_FORCE
@_kit_errors
def pretrain_cmd(
    data: tuple[Path, ...],
    out: Path,
    size: str,
    steps: int,
    seed: int,
    owner: str,
    checkpoint_every: int,
    device: str | None,
    force: bool,
) -> None:
    """Train a small dense public model and its byte-level BPE tokenizer from scratch.

    An interrupted run resumes from OUT.partial (at most one checkpoint interval is lost)."""
    docs = _docs(data)  # bad --data fails before torch is imported
    from kit.distributed import init_world
    from kit.pretrain import pretrain

    pretrain(
        docs,
        out,
        size=size,
        steps=steps,
        seed=seed,
        owner=owner,
        force=force,
        checkpoint_every=checkpoint_every,
        world=init_world(device),
    )
    click.echo(str(out))


@click.command("embed")
@click.option("--public", required=True, type=_PATH, help="The public model folder.")
@_DATA
@click.option("--out", required=True, type=_PATH, help="Embedding file to write.")
@click.option(
    "--method",
    type=click.Choice(["hidden", "minilm"]),
    default="hidden",
    show_default=True,
    help="hidden: the public model's router inputs; minilm: all-MiniLM-L6-v2 (pip).",
)
@_FORCE
@_kit_errors
def expert_embed(public: Path, data: tuple[Path, ...], out: Path, method: str, force: bool) -> None:
    """The domain embedding that initialises a new expert's router row."""
    docs = _docs(data)  # bad --data fails before torch is imported
    from kit.embed import run_embed

    run_embed(public, docs, out, method, force)
    click.echo(str(out))


@click.command("train")
@click.option("--public", required=True, type=_PATH, help="The public model folder.")
@_DATA
@click.option("--embedding", required=True, type=_PATH, help="From `flexgate expert embed`.")
@click.option("--id", "expert_id", required=True, help="The expert's id.")
@click.option("--owner", required=True, help="The data owner (a principal id).")
@click.option("--description", default=None)
@click.option("--out", required=True, type=_PATH, help="Expert artifact folder to write.")
@click.option("--steps", type=click.IntRange(1, 200_000), default=200, show_default=True)
@click.option("--batch-size", type=click.IntRange(1, 4096), default=16, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0.0, min_open=True), default=2e-3)
@click.option("--no-bias", is_flag=True, help="No learned negative bias on the new expert.")
@click.option(
    "--bias-init",
    type=click.FloatRange(max=0.0, max_open=True),
    default=-1.0,
    show_default=True,
    help="Where the new expert's router bias starts (below 0; it is clamped to <= 0).",
)
@click.option("--checkpoint-every", type=click.IntRange(1), default=50, show_default=True)
@_SEED
@_DEVICE
@_FORCE
@_kit_errors
def expert_train(
    public: Path,
    data: tuple[Path, ...],
    embedding: Path,
    expert_id: str,
    owner: str,
    description: str | None,
    out: Path,
    steps: int,
    batch_size: int,
    lr: float,
    no_bias: bool,
    bias_init: float,
    checkpoint_every: int,
    seed: int,
    device: str | None,
    force: bool,
) -> None:
    """Train one expert against the frozen public model (FlexOlmo's coordinated training).

    The artifact holds only the new FFN per layer, its router row and bias, and a manifest."""
    docs = _docs(data)  # bad --data fails before torch is imported
    from kit.distributed import init_world
    from kit.expert import train_expert

    train_expert(
        public,
        docs,
        embedding,
        out,
        expert_id=expert_id,
        owner=owner,
        description=description,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        bias=not no_bias,
        bias_init=bias_init,
        seed=seed,
        force=force,
        checkpoint_every=checkpoint_every,
        world=init_world(device),
    )
    click.echo(str(out))


@click.command("merge")
@click.option("--public", required=True, type=_PATH, help="The public model folder.")
@click.option("--expert", "experts", multiple=True, required=True, type=_PATH)
@click.option("--out", required=True, type=_PATH, help="Merged model folder to write.")
@click.option("--top-k", type=click.IntRange(1), default=2, show_default=True)
@click.option(
    "--keep-bias",
    is_flag=True,
    help="Write the experts' router biases (the engine applies them; transformers does not).",
)
@_FORCE
@_kit_errors
def merge_cmd(
    public: Path, experts: tuple[Path, ...], out: Path, top_k: int, keep_bias: bool, force: bool
) -> None:
    """Merge the public model and experts into one FlexOlmo checkpoint (+ experts.json)."""
    from kit.merge import merge

    merge(public, list(experts), out, top_k=top_k, keep_bias=keep_bias, force=force)
    click.echo(str(out))


@click.command("router-tune")
@click.option("--model", "model_dir", required=True, type=_PATH)
@click.option("--data", "data", multiple=True, required=True, help="ID=PATH (repeatable).")
@click.option("--out", required=True, type=_PATH)
@click.option("--steps", type=click.IntRange(1, 100_000), default=100, show_default=True)
@_SEED
@_DEVICE
@_FORCE
@_kit_errors
def router_tune_cmd(
    model_dir: Path,
    data: tuple[str, ...],
    out: Path,
    steps: int,
    seed: int,
    device: str | None,
    force: bool,
) -> None:
    """Tune only the router rows (and biases) on small proxy samples per domain."""
    from kit.distributed import init_world
    from kit.documents import read_documents
    from kit.errors import KitError
    from kit.router_tune import router_tune

    docs = {}
    for spec in data:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise KitError(f"--data {spec!r}: expected ID=PATH")
        docs[name] = read_documents([Path(path)])
    router_tune(model_dir, docs, out, steps=steps, seed=seed, force=force, world=init_world(device))
    click.echo(str(out))


@click.command("eval")
@click.option("--model", "model_dir", required=True, type=_PATH, envvar="FLEXGATE_MODEL")
@click.option("--data", "data", multiple=True, required=True, help="NAME=PATH (repeatable).")
@click.option("--exclude", multiple=True, metavar="ID", help="Leave this expert out.")
@click.option("--only", multiple=True, metavar="ID", help="Use only these experts.")
@click.option("--max-blocks", type=click.IntRange(1), default=None, help="Per domain.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_kit_errors
def eval_cmd(
    model_dir: Path,
    data: tuple[str, ...],
    exclude: tuple[str, ...],
    only: tuple[str, ...],
    max_blocks: int | None,
    as_json: bool,
) -> None:
    """Held-out perplexity per domain under the allowed set, through the governed engine."""
    from engine.api import load_engine
    from kit.evaluate import (
        allowed_set,
        domain_blocks,
        format_table,
        load_domain_texts,
        perplexity_table,
    )

    texts = dict(load_domain_texts(spec) for spec in data)
    eng = load_engine(model_dir)
    allowed = allowed_set(eng, only, exclude)
    domains = {name: domain_blocks(eng, t, max_blocks) for name, t in texts.items()}
    label = "+".join(allowed)
    table = perplexity_table(eng, domains, {label: allowed})
    if as_json:
        click.echo(
            json.dumps(
                {"model": str(model_dir), "allowed": allowed, "perplexity": table[label]}, indent=2
            )
        )
    else:
        click.echo(f"allowed: {', '.join(allowed)}")
        click.echo(format_table({"perplexity": table[label]}))


@click.command("build")
@click.option("--force", is_flag=True, help="Rebuild even when the demo model exists.")
@click.option("--quick", is_flag=True, help="A miniature build (tests): seconds, no bounds.")
@click.option(
    "--home",
    type=_PATH,
    default=None,
    help="State folder (default: $FLEXGATE_HOME); the model goes to HOME/demo-model.",
)
@_kit_errors
def demo_build(force: bool, quick: bool, home: Path | None) -> None:
    """Build the demo model: a public model and four domain experts, each with an owner."""
    from contracts.settings import settings
    from kit.demo import build_demo

    build_demo(home or Path(settings().home), force=force, quick=quick)
