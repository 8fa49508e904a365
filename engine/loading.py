"""Loading a FlexOlmo checkpoint (Hugging Face format) into the governed model, strictly.

The model is built on the meta device, the checkpoint's tensor headers are checked against it
(every expected tensor present with the expected shape, nothing unexpected), and only then are
tensors read and placed where the device map says. A missing or mis-shaped tensor, or a config
that disagrees with the tensors, is a :class:`~engine.errors.CheckpointError` naming the tensor:
nothing is ever left randomly initialised.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from transformers import AutoTokenizer, FlexOlmoConfig

from engine.errors import CheckpointError
from engine.modeling import ROUTER_BIAS_ATTR, GovernedFlexOlmoForCausalLM

__all__ = [
    "TensorInfo",
    "build_empty_model",
    "check_tokenizer_files",
    "checkpoint_tensors",
    "load_tensors",
    "load_tokenizer",
    "read_config",
    "resolve_dtype",
    "validate_checkpoint",
]

_SAFE_INDEX = "model.safetensors.index.json"
_SAFE_SINGLE = "model.safetensors"
_BIAS_SUFFIX = ".mlp.gate.bias"
_MAX_LISTED = 8

# The vocabulary files of each tokenizer format transformers reads, in the order tried.
TOKENIZER_FORMATS: tuple[tuple[str, ...], ...] = (
    ("tokenizer.json",),  # fast (Rust) tokenizers
    ("tokenizer.model",),  # SentencePiece
    ("vocab.json", "merges.txt"),  # byte-level BPE
    ("vocab.txt",),  # WordPiece
)


@dataclass(frozen=True)
class TensorInfo:
    """Where one checkpoint tensor lies, and its header shape and dtype (no data read)."""

    file: Path
    shape: tuple[int, ...]
    dtype: str


def read_config(model_dir: str | Path) -> FlexOlmoConfig:
    """``config.json`` of a FlexOlmo checkpoint; CheckpointError unless it is flex_olmo."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (not a Hugging Face checkpoint folder)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(raw, dict) or raw.get("model_type") != "flex_olmo":
        got = raw.get("model_type") if isinstance(raw, dict) else None
        raise CheckpointError(f"{path}: model_type is {got!r}, expected 'flex_olmo'")
    try:
        config = FlexOlmoConfig.from_pretrained(str(model_dir))
    except Exception as exc:  # transformers raises several types for invalid configs
        raise CheckpointError(f"{path}: invalid FlexOlmo config ({exc})") from exc
    if config.num_experts < 1 or config.num_experts_per_tok < 1:
        raise CheckpointError(
            f"{path}: num_experts={config.num_experts}, "
            f"num_experts_per_tok={config.num_experts_per_tok} must both be at least 1"
        )
    return config


def checkpoint_tensors(model_dir: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint's safetensors files, from their headers only."""
    folder = Path(model_dir)
    index_path = folder / _SAFE_INDEX
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index_path}: no readable weight_map ({exc})") from exc
        files = sorted({folder / name for name in weight_map.values()})
    elif (folder / _SAFE_SINGLE).is_file():
        weight_map, files = None, [folder / _SAFE_SINGLE]
    else:
        raise CheckpointError(f"{folder}: no {_SAFE_SINGLE} or {_SAFE_INDEX} (safetensors needed)")
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"{file}: listed in {_SAFE_INDEX} but missing")
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    sl = f.get_slice(key)
                    if key in tensors:
                        raise CheckpointError(f"tensor {key} is stored twice ({file})")
                    tensors[key] = TensorInfo(file, tuple(sl.get_shape()), str(sl.get_dtype()))
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own error type for corrupt headers
            raise CheckpointError(f"{file}: unreadable safetensors file ({exc})") from exc
    if weight_map is not None:
        for key, name in weight_map.items():
            info = tensors.get(key)
            if info is None or info.file.name != name:
                raise CheckpointError(f"tensor {key}: {_SAFE_INDEX} says {name}, not found there")
    return tensors


def has_router_bias(tensors: Mapping[str, TensorInfo], num_layers: int) -> bool:
    """Whether the checkpoint carries the per-expert router bias; all layers or none."""
    present = [k for k in tensors if k.endswith(_BIAS_SUFFIX)]
    if not present:
        return False
    missing = [
        f"model.layers.{i}{_BIAS_SUFFIX}"
        for i in range(num_layers)
        if f"model.layers.{i}{_BIAS_SUFFIX}" not in tensors
    ]
    if missing:
        raise CheckpointError(
            f"router bias present for some layers but missing tensor(s) {_short(missing)}"
        )
    return True


def resolve_dtype(dtype: torch.dtype | str | None, config: FlexOlmoConfig) -> torch.dtype:
    """The compute dtype: the one asked for, else the config's, else float32."""
    value: object = dtype
    if value is None or value == "auto":
        value = getattr(config, "dtype", None) or torch.float32
    if isinstance(value, str):
        resolved = getattr(torch, value.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown dtype {value!r}")
        value = resolved
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch dtype, got {value!r}")
    return value


def build_empty_model(
    config: FlexOlmoConfig, router_bias: bool, dtype: torch.dtype
) -> GovernedFlexOlmoForCausalLM:
    """The governed model with its parameters on the meta device (no memory, no init)."""
    setattr(config, ROUTER_BIAS_ATTR, router_bias)
    config._attn_implementation = "sdpa"
    with init_empty_weights():
        model = GovernedFlexOlmoForCausalLM(config)
    for param in model.parameters():
        param.data = param.data.to(dtype)
    model.requires_grad_(False)  # an inference engine; training code turns grads back on
    model.train(False)
    return model


def validate_checkpoint(
    model: GovernedFlexOlmoForCausalLM, tensors: Mapping[str, TensorInfo]
) -> None:
    """Every tensor the model needs is in the checkpoint with its shape; nothing else is.

    Raises CheckpointError naming the missing, mis-shaped or unexpected tensors.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    optional = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    missing = [k for k in expected if k not in tensors and k not in optional]
    unexpected = [k for k in tensors if k not in expected]
    wrong = [
        f"{k} has shape {list(tensors[k].shape)} in {tensors[k].file.name}, "
        f"the config implies {list(shape)}"
        for k, shape in expected.items()
        if k in tensors and tensors[k].shape != shape
    ]
    not_float = [
        f"{k} has dtype {info.dtype}" for k, info in tensors.items() if info.dtype not in _FLOATS
    ]
    problems: list[str] = []
    cfg = model.config
    summary = (
        f"(config: num_hidden_layers={cfg.num_hidden_layers}, num_experts={cfg.num_experts}, "
        f"hidden_size={cfg.hidden_size}, intermediate_size={cfg.intermediate_size}, "
        f"vocab_size={cfg.vocab_size})"
    )
    if missing:
        problems.append(f"missing tensor(s) {_short(missing)}")
    if wrong:
        problems.append("mis-shaped tensor(s): " + "; ".join(wrong[:_MAX_LISTED]))
    if unexpected:
        problems.append(f"tensor(s) not in a model with this config: {_short(unexpected)}")
    if not_float:
        problems.append("non-float tensor(s): " + "; ".join(not_float[:_MAX_LISTED]))
    if problems:
        raise CheckpointError(
            "checkpoint does not match its config " + summary + ": " + ". ".join(problems)
        )


_FLOATS = {"F64", "F32", "F16", "BF16"}


def load_tensors(
    model: torch.nn.Module,
    tensors: Mapping[str, TensorInfo],
    keys: Iterable[str],
    device_of: Mapping[str, torch.device | str],
    dtype: torch.dtype,
) -> None:
    """Read ``keys`` from the checkpoint, cast to ``dtype`` and place each on ``device_of[key]``.

    Files are opened once each; only the listed tensors are read.
    """
    by_file: dict[Path, list[str]] = {}
    for key in keys:
        by_file.setdefault(tensors[key].file, []).append(key)
    for file, file_keys in by_file.items():
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in file_keys:
                value = f.get_tensor(key).to(dtype)
                set_module_tensor_to_device(model, key, device_of[key], value=value)


def _short(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


def check_tokenizer_files(folder: Path) -> None:
    """Refuse a checkpoint folder without a complete tokenizer, naming what is missing.

    Called before any weight is read, so a folder copied without its tokenizer fails at once
    with a message that says which files to add, rather than deep inside transformers.
    """
    for files in TOKENIZER_FORMATS:
        if all((folder / f).is_file() for f in files):
            return
    partial = [
        (files, [f for f in files if not (folder / f).is_file()])
        for files in TOKENIZER_FORMATS
        if any((folder / f).is_file() for f in files)
    ]
    if partial:
        files, missing = partial[0]
        raise CheckpointError(
            f"{folder}: incomplete tokenizer: {', '.join(missing)} missing beside "
            f"{', '.join(f for f in files if f not in missing)}"
        )
    expected = " or ".join(" and ".join(files) for files in TOKENIZER_FORMATS)
    raise CheckpointError(f"{folder}: no tokenizer files: expected {expected}")


def load_tokenizer(folder: Path) -> Any:
    """The checkpoint's tokenizer (with its chat template); CheckpointError when unreadable."""
    check_tokenizer_files(folder)
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{folder}: the tokenizer files cannot be loaded ({exc})") from exc
