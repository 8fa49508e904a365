"""Engine commands of the ``flexgate`` CLI: ``generate`` and ``model inspect``.

``gateway.cli`` wires them in lazily (``engine.cli:generate``, ``engine.cli:model``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from engine.api import Engine

__all__ = ["generate", "model"]


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
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(summary.to_json(), indent=2, default=str))
    else:
        click.echo(format_summary(summary))


@dataclass(frozen=True)
class _Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    usage: dict[str, tuple[int, float]]


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
    envvar="FLEXGATE_MODEL",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="FlexOlmo checkpoint folder (default: $FLEXGATE_MODEL).",
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
    from engine.errors import EngineError

    try:
        eng = load_engine(model_dir, device_map=device_map, dtype=dtype)
        allowed = _allowed(eng.expert_ids, only, exclude)
        if not allowed:
            raise click.ClickException("no expert left: --only/--exclude exclude every expert")
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
        out = _run(eng, prompt_ids, allowed, max_tokens, temperature, seed)
    except (EngineError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(out.text)
    click.echo("")
    click.echo(
        f"finish: {out.finish_reason}  prompt tokens: {out.prompt_tokens}  "
        f"completion tokens: {out.completion_tokens}"
    )
    click.echo(_usage_table(eng.expert_ids, set(allowed), out.usage))


def _usage_table(ids: Sequence[str], allowed: set[str], usage: dict[str, tuple[int, float]]) -> str:
    width = max(len("expert"), *(len(i) for i in ids))
    rows = [f"{'expert':<{width}}  {'allowed':<7}  {'tokens':>8}  {'weight':>10}"]
    for eid in ids:
        tokens, weight = usage.get(eid, (0, 0.0))
        mark = "yes" if eid in allowed else "no"
        rows.append(f"{eid:<{width}}  {mark:<7}  {tokens:>8}  {weight:>10.3f}")
    return "\n".join(rows)


def _run(
    eng: Engine,
    prompt_ids: list[int],
    allowed: list[str],
    max_tokens: int,
    temperature: float,
    seed: int | None,
) -> _Completion:
    """Engine.generate when engine.generation provides it, else the minimal loop below."""
    gen: Any = getattr(eng, "generate", None)
    if gen is not None:
        from engine.sampling import SamplingParams  # type: ignore[import-not-found,unused-ignore]

        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
        res = gen(prompt_ids, params, allowed=allowed)
        return _Completion(
            res.text,
            str(res.finish_reason),
            res.prompt_tokens,
            res.completion_tokens,
            dict(res.usage or {}),
        )
    return _minimal_generate(eng, prompt_ids, allowed, max_tokens, temperature, seed)


def _minimal_generate(
    eng: Engine,
    prompt_ids: list[int],
    allowed: list[str],
    max_tokens: int,
    temperature: float,
    seed: int | None,
) -> _Completion:
    """MINIMAL STAND-IN for Engine.generate (engine.generation, not merged yet): one sequence,
    KV cache, greedy or temperature sampling with a seeded generator, stop at EOS, max_tokens
    or the context window. No top_p/top_k, stop strings, batching or streaming."""
    import torch
    from transformers import DynamicCache

    from engine.routing import RoutingControl

    window = int(eng.config.max_position_embeddings)
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    if len(prompt_ids) >= window:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the context window is {window}")
    eos = eng.config.eos_token_id
    eos_ids = set(eos) if isinstance(eos, list) else {eos} if eos is not None else set()
    generator = torch.Generator(device=eng.device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    ctl = RoutingControl(eng.mask_for(allowed, 1))
    cache = DynamicCache(config=eng.config)
    ids = torch.tensor([prompt_ids], device=eng.device)
    out_ids: list[int] = []
    finish = "length"
    with eng.lock, torch.inference_mode():
        for _ in range(min(max_tokens, window - len(prompt_ids))):
            out = eng.model(
                input_ids=ids, cache=cache, use_cache=True, routing=ctl, logits_to_keep=1
            )
            logits = out.logits[0, -1].float()
            if temperature == 0:
                token = int(torch.argmax(logits))
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                token = int(torch.multinomial(probs, 1, generator=generator))
            out_ids.append(token)
            if token in eos_ids:
                finish = "stop"
                break
            cache = out.cache
            ids = torch.tensor([[token]], device=eng.device)
    text_ids = [t for t in out_ids if t not in eos_ids]
    usage = eng.usage_of(ctl)[0]
    return _Completion(
        str(eng.tokenizer.decode(text_ids, skip_special_tokens=True)),
        finish,
        len(prompt_ids),
        len(out_ids),
        usage,
    )
