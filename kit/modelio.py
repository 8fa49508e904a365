"""Model folders in and out: the engine's model class, Hugging Face FlexOlmo format.

A folder is read with the engine's strict loader (every tensor present with its shape, nothing
unexpected) into a plain CPU model whose parameters the caller may train. A folder is written
into a temporary sibling and renamed into place at the end, so a failed or interrupted command
never leaves a half-written model where a finished one is expected.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, FlexOlmoConfig, GenerationConfig, PreTrainedTokenizerBase

from engine import loading
from engine.errors import EngineError
from engine.experts import ExpertInfo, read_experts, write_experts
from engine.modeling import ROUTER_BIAS_ATTR, GovernedFlexOlmoForCausalLM
from kit.errors import KitError, KitRefused

__all__ = [
    "atomic_dir",
    "fingerprint",
    "load_model",
    "load_state",
    "prepare_out",
    "save_model",
]

WEIGHTS = "model.safetensors"


def load_state(model_dir: Path) -> tuple[FlexOlmoConfig, dict[str, torch.Tensor]]:
    """Config and every tensor of a FlexOlmo folder (float32, CPU), checked strictly."""
    try:
        config = loading.read_config(model_dir)
        tensors = loading.checkpoint_tensors(model_dir)
        bias = loading.has_router_bias(tensors, config.num_hidden_layers)
        empty = loading.build_empty_model(config, bias, torch.float32)
        loading.validate_checkpoint(empty, tensors)
    except EngineError as exc:
        raise KitError(str(exc)) from exc
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    for file in sorted({info.file for info in tensors.values()}):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 - not a mapping
                state[key] = f.get_tensor(key).to(torch.float32)
    setattr(config, ROUTER_BIAS_ATTR, bias)
    return config, state


def build_model(
    config: FlexOlmoConfig, state: Mapping[str, torch.Tensor] | None = None
) -> GovernedFlexOlmoForCausalLM:
    """The engine's model for ``config`` on the CPU in float32, from ``state`` when given."""
    config._attn_implementation = "sdpa"
    model = GovernedFlexOlmoForCausalLM(config)
    if state is not None:
        missing, unexpected = model.load_state_dict(dict(state), strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
        if missing or unexpected:
            raise KitError(
                f"weights do not fit the config: missing {missing[:4]}, unexpected {unexpected[:4]}"
            )
    model.requires_grad_(False)
    model.train(False)
    return model


def load_model(model_dir: Path) -> tuple[GovernedFlexOlmoForCausalLM, PreTrainedTokenizerBase]:
    config, state = load_state(model_dir)
    return build_model(config, state), load_tokenizer(model_dir)


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as exc:  # transformers raises several types for a bad folder
        raise KitError(f"{model_dir}: no loadable tokenizer ({exc})") from exc


def read_expert_infos(model_dir: Path, num_experts: int) -> tuple[ExpertInfo, ...]:
    try:
        return read_experts(model_dir, num_experts)
    except EngineError as exc:
        raise KitError(str(exc)) from exc


def save_model(
    out: Path,
    config: FlexOlmoConfig,
    state: Mapping[str, torch.Tensor],
    tokenizer: PreTrainedTokenizerBase,
    experts: list[ExpertInfo],
) -> None:
    """Write a FlexOlmo folder: config, generation config, weights, tokenizer, experts.json."""
    config.architectures = ["FlexOlmoForCausalLM"]
    config.dtype = torch.float32
    bias = getattr(config, ROUTER_BIAS_ATTR, False)
    if hasattr(config, ROUTER_BIAS_ATTR):
        delattr(config, ROUTER_BIAS_ATTR)  # the engine reads it from the tensors
    config.save_pretrained(out)
    setattr(config, ROUTER_BIAS_ATTR, bias)
    GenerationConfig(  # type: ignore[no-untyped-call]
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    ).save_pretrained(out)
    tensors = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in state.items()}
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    tokenizer.save_pretrained(out)
    write_experts(out, experts)


def prepare_out(out: Path, force: bool, what: str = "output folder") -> None:
    """Refuse an existing ``out`` unless ``force`` (then it is replaced at the end)."""
    if out.exists() and not force:
        raise KitRefused(f"{out}: {what} exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise KitError(f"{out}: exists and is not a folder")
    if not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)


@contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out``, renamed to ``out`` when the block succeeds (an
    existing ``out`` is replaced); removed when it fails."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a model folder is read by the server's user
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the public model's tensors (names, dtypes, shapes, bytes), sorted by name:
    what an expert was trained against; merge refuses an expert whose fingerprint differs."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to(torch.float32).contiguous().cpu()
        h.update(f"{key}|{list(t.shape)}|float32\n".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()
