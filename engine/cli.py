"""Engine commands of the ``flexgate`` CLI: ``generate`` and ``model inspect``.

``gateway.cli`` wires them in lazily (``engine.cli:generate``, ``engine.cli:model``). Errors
print one line and exit with `contracts.exit_codes` (docs/cli.md): 2 for bad input (the
checkpoint folder, expert ids, prompt, sampling or placement options), 3 when the model
fails while generating.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import click

from contracts.exit_codes import ExitCode

__all__ = ["generate", "model"]


def _fail(exc: Exception) -> click.exceptions.Exit:
    """Print the one-line error; the caller raises the returned Exit with its code."""
    from engine.errors import GenerationError

    click.echo(f"Error: {exc}", err=True)
    failed_model = isinstance(exc, GenerationError)
    return click.exceptions.Exit(int(ExitCode.UNAVAILABLE if failed_model else ExitCode.USAGE))


@click.group()
def model() -> None:
    """Inspect FlexOlmo checkpoints."""


@model.command("inspect")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def inspect_cmd(model_dir: Path, as_json: bool) -> None:
    """Print MODEL_DIR's config, experts, total and active parameters and memory per dtype.

    Reads only headers: no weights are loaded. Fails when the tensors disagree with the config.
    """
    from engine.errors import EngineError
    from engine.inspect import format_summary, summarize

    try:
        summary = summarize(model_dir)
    except EngineError as exc:
        raise _fail(exc) from None
    if as_json:
        click.echo(json.dumps(summary.to_json(), indent=2, default=str))
    else:
        click.echo(format_summary(summary))


def _served_model() -> str:
    """FLEXGATE_MODEL (else the demo model in FLEXGATE_HOME), from the process settings."""
    from contracts.settings import SettingsError, settings

    try:
        return str(settings().model_dir)
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from None


def _allowed(expert_ids: Sequence[str], only: Sequence[str], exclude: Sequence[str]) -> list[str]:
    from engine.errors import ExpertSetError

    unknown = sorted({i for i in [*only, *exclude] if i not in expert_ids})
    if unknown:
        raise ExpertSetError(f"unknown expert id(s) {unknown}", unknown)
    base = [i for i in expert_ids if i in set(only)] if only else list(expert_ids)
    return [i for i in base if i not in set(exclude)]


@click.command()
@click.option(
    "--model",
    "model_dir",
    default=_served_model,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="FlexOlmo checkpoint folder (default: $FLEXGATE_MODEL, else the demo model).",
)
@click.option("--prompt", required=True, help="Prompt text.")
@click.option("--exclude", multiple=True, metavar="ID", help="Leave this expert out (repeatable).")
@click.option("--only", multiple=True, metavar="ID", help="Use only these experts (repeatable).")
@click.option("--max-tokens", default=32, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--temperature",
    default=0.0,
    show_default=True,
    type=click.FloatRange(min=0.0),
    help="0 is greedy decoding.",
)
@click.option("--seed", type=int, default=None, help="Seed for reproducible sampling.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template.")
@click.option("--device-map", default="cpu", show_default=True, help="'cpu', 'auto', 'cuda:0' ...")
@click.option("--dtype", default=None, help="float32, bfloat16, float16 (default: the config's).")
def generate(
    model_dir: Path,
    prompt: str,
    exclude: tuple[str, ...],
    only: tuple[str, ...],
    max_tokens: int,
    temperature: float,
    seed: int | None,
    chat: bool,
    device_map: str,
    dtype: str | None,
) -> None:
    """Generate a completion of PROMPT with the allowed experts and print per-expert usage.

    Usage counts (token, layer) top-k selections over the prompt and the generated tokens;
    weight is the sum of their router probabilities.
    """
    from engine.api import load_engine
    from engine.errors import EngineError, ExpertSetError

    try:
        eng = load_engine(model_dir, device_map=device_map, dtype=dtype)
        allowed = _allowed(eng.expert_ids, only, exclude)
        if not allowed:
            raise ExpertSetError("no expert left: --only/--exclude exclude every expert")
        text = prompt
        if chat:
            text = str(
                eng.tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}],
                    add_generation_prompt=True,
                    tokenize=False,
                )
            )
        prompt_ids = [int(i) for i in eng.tokenizer(text, add_special_tokens=False)["input_ids"]]
        out = eng.generate(
            prompt_ids, allowed=allowed, max_tokens=max_tokens, temperature=temperature, seed=seed
        )
    except (EngineError, ValueError) as exc:
        raise _fail(exc) from None
    click.echo(out.text)
    click.echo("")
    click.echo(
        f"finish: {out.finish_reason}  prompt tokens: {out.prompt_tokens}  "
        f"completion tokens: {out.completion_tokens}"
    )
    click.echo(_usage_table(eng.expert_ids, set(allowed), out.usage or {}))


def _usage_table(ids: Sequence[str], allowed: set[str], usage: dict[str, tuple[int, float]]) -> str:
    width = max(len("expert"), *(len(i) for i in ids))
    rows = [f"{'expert':<{width}}  {'allowed':<7}  {'tokens':>8}  {'weight':>10}"]
    for eid in ids:
        tokens, weight = usage.get(eid, (0, 0.0))
        mark = "yes" if eid in allowed else "no"
        rows.append(f"{eid:<{width}}  {mark:<7}  {tokens:>8}  {weight:>10.3f}")
    return "\n".join(rows)
