"""Placement of the governed model on devices with accelerate, expert by expert.

Placement units: the embedding, the rotary embedding, each layer's attention, norms and router,
the final norm, the LM head, and **each expert's FFN in each layer**
(``model.layers.N.mlp.experts.E``). Every unit can go to a GPU, to ``"cpu"`` (offloaded to CPU
RAM and streamed to the GPU per call when the model runs on a GPU) or to ``"disk"`` (read per
call from the checkpoint's safetensors files, or from ``offload_folder`` when one is given).
An expert the routing never selects is never loaded, even when offloaded.

``device_map`` is ``"cpu"``, a single device (``"cuda:0"``, ``0``), ``"auto"`` (every layer's
trunk on a home GPU spread evenly over the GPUs, then the experts in priority order on the GPUs
while ``max_memory`` allows, then on CPU, then on disk), or an explicit mapping from module names
to devices (a module name covers the units below it; the longest name wins).

Experts can be unloaded from memory and loaded back while the engine runs
(:func:`unload_expert`, :func:`load_expert`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import torch
from accelerate import dispatch_model
from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module
from accelerate.utils import (
    compute_module_sizes,
    convert_file_size_to_int,
    offload_weight,
    save_offload_index,
    set_module_tensor_to_device,
)
from accelerate.utils.offload import OffloadedWeightsLoader, PrefixedDataset
from safetensors import safe_open

from engine.errors import CheckpointError, PlacementError
from engine.loading import TensorInfo, load_tensors
from engine.modeling import GovernedFlexOlmoForCausalLM, GovernedSparseMoeBlock

__all__ = [
    "Device",
    "DeviceMapSpec",
    "ExpertRecord",
    "Placement",
    "auto_device_map",
    "expand_device_map",
    "expert_unit",
    "load_expert",
    "place_model",
    "placement_units",
    "resolve_device_map",
    "unload_expert",
]

Device: TypeAlias = int | str
"""A placement target: a GPU index, ``"cpu"``, ``"disk"``, ``"mps"``."""
DeviceMapSpec: TypeAlias = str | int | torch.device | Mapping[str, int | str | torch.device]


def expert_unit(layer: int, expert: int) -> str:
    """Module name of one expert's FFN in one layer."""
    return f"model.layers.{layer}.mlp.experts.{expert}"


def placement_units(model: GovernedFlexOlmoForCausalLM) -> list[str]:
    """Every placement unit, in forward order (experts after their layer's router)."""
    cfg = model.config
    units = ["model.embed_tokens", "model.rotary_emb"]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        units += [f"{p}.self_attn", f"{p}.post_attention_layernorm", f"{p}.mlp.gate"]
        units += [expert_unit(i, e) for e in range(cfg.num_experts)]
        units.append(f"{p}.post_feedforward_layernorm")
    return [*units, "model.norm", "lm_head"]


def _normalise_device(value: object) -> Device:
    if isinstance(value, torch.device):
        if value.type == "cuda":
            return value.index or 0
        return value.type
    if isinstance(value, bool):
        raise PlacementError(f"invalid device {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        if value in ("cpu", "disk", "mps", "meta"):
            if value == "meta":
                raise PlacementError("device 'meta' holds no weights")
            return value
        if value == "cuda":
            return 0
        if value.startswith("cuda:") and value[5:].isdigit():
            return int(value[5:])
    raise PlacementError(f"invalid device {value!r} (use 'cpu', 'disk', 'cuda:N' or N)")


def _check_available(devices: Sequence[Device]) -> None:
    gpus = sorted({d for d in devices if isinstance(d, int)})
    count = torch.cuda.device_count()
    bad = [g for g in gpus if g >= count]
    if bad:
        raise PlacementError(f"GPU(s) {bad} not available (this machine has {count})")
    if "mps" in devices and not torch.backends.mps.is_available():
        raise PlacementError("device 'mps' not available")


def expand_device_map(
    model: GovernedFlexOlmoForCausalLM, spec: Mapping[str, int | str | torch.device]
) -> dict[str, Device]:
    """An explicit map (module name -> device) expanded to every placement unit.

    A name covers the units under it; the longest matching name wins; ``""`` is the whole
    model. Raises PlacementError for names that are not modules, names inside a unit (an
    expert is placed whole), units left without a device, or invalid devices.
    """
    units = placement_units(model)
    modules = {name for name, _ in model.named_modules()}
    normalised: dict[str, Device] = {}
    for key, value in spec.items():
        if key != "" and key not in modules:
            raise PlacementError(f"device_map key {key!r} is not a module of the model")
        inside = [u for u in units if key.startswith(u + ".")]
        if inside:
            raise PlacementError(
                f"device_map key {key!r} lies inside placement unit {inside[0]!r}; map it whole"
            )
        normalised[key] = _normalise_device(value)
    out: dict[str, Device] = {}
    missing: list[str] = []
    for unit in units:
        best = None
        for key in normalised:
            if (key == "" or unit == key or unit.startswith(key + ".")) and (
                best is None or len(key) > len(best)
            ):
                best = key
        if best is None:
            missing.append(unit)
        else:
            out[unit] = normalised[best]
    if missing:
        raise PlacementError(f"device_map places no device for {missing[:8]}")
    _check_available(list(out.values()))
    return out


def auto_device_map(
    model: GovernedFlexOlmoForCausalLM,
    max_memory: Mapping[int | str, int | str] | None,
    dtype: torch.dtype,
    expert_priority: Sequence[int] | None = None,
) -> dict[str, Device]:
    """Plan every unit: layer trunks on home GPUs (spread evenly), then experts in priority
    order (default: router-row order, the public expert first) on GPUs while memory lasts,
    then CPU, then disk. ``max_memory`` maps GPU index / ``"cpu"`` to bytes or "10GiB"; by
    default all free GPU memory (less 10%) and all but 2 GiB of RAM are used."""
    budget = _memory_budget(max_memory)
    gpus = [d for d in budget if isinstance(d, int)]
    order: list[Device] = [*gpus, "cpu"] if "cpu" in budget else list(gpus)
    sizes = compute_module_sizes(model, dtype=dtype)
    cfg = model.config
    n_layers, n_experts = cfg.num_hidden_layers, cfg.num_experts
    priority = list(expert_priority) if expert_priority is not None else list(range(n_experts))
    if sorted(priority) != list(range(n_experts)):
        raise PlacementError(f"expert_priority must be a permutation of 0..{n_experts - 1}")
    left = dict(budget)
    plan: dict[str, Device] = {}

    def home(layer: int) -> Device:
        return gpus[layer * len(gpus) // n_layers] if gpus else order[0] if order else "disk"

    def put(unit: str, preferred: Device) -> None:
        size = sizes[unit]
        for device in [preferred, *order]:
            if device != "disk" and left.get(device, 0) >= size:
                left[device] -= size
                plan[unit] = device
                return
        plan[unit] = "disk"

    put("model.embed_tokens", home(0))
    put("model.rotary_emb", home(0))
    for i in range(n_layers):
        for part in (
            "self_attn",
            "post_attention_layernorm",
            "mlp.gate",
            "post_feedforward_layernorm",
        ):
            put(f"model.layers.{i}.{part}", home(i))
    put("model.norm", home(n_layers - 1))
    put("lm_head", home(n_layers - 1))
    for e in priority:
        for i in range(n_layers):
            put(expert_unit(i, e), home(i))
    return {unit: plan[unit] for unit in placement_units(model)}


def _memory_budget(max_memory: Mapping[int | str, int | str] | None) -> dict[Device, int]:
    if max_memory is not None:
        budget: dict[Device, int] = {}
        for key, value in max_memory.items():
            device = _normalise_device(key)
            if device == "disk":
                continue
            budget[device] = value if isinstance(value, int) else convert_file_size_to_int(value)
        _check_available(list(budget))
        return budget
    import psutil

    budget = {}
    for i in range(torch.cuda.device_count()):
        free, _ = torch.cuda.mem_get_info(i)
        budget[i] = int(free * 0.9)
    budget["cpu"] = max(0, psutil.virtual_memory().available - 2 * 2**30)
    return budget


def resolve_device_map(
    model: GovernedFlexOlmoForCausalLM,
    device_map: DeviceMapSpec,
    max_memory: Mapping[int | str, int | str] | None,
    dtype: torch.dtype,
    expert_priority: Sequence[int] | None = None,
) -> dict[str, Device]:
    """Turn any accepted ``device_map`` into a map of every placement unit to a device."""
    if isinstance(device_map, Mapping):
        return expand_device_map(model, device_map)
    if device_map == "auto":
        return auto_device_map(model, max_memory, dtype, expert_priority)
    if device_map == "disk":
        raise PlacementError("device_map='disk' would leave nothing to compute on")
    device = _normalise_device(device_map)
    _check_available([device])
    return dict.fromkeys(placement_units(model), device)


@dataclass
class Placement:
    """Where the model lies: the unit map, the main device, offload settings."""

    device_map: dict[str, Device]
    main_device: torch.device
    offload_folder: Path | None
    dispatched: bool


def _torch_device(device: Device) -> torch.device:
    return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)


def place_model(
    model: GovernedFlexOlmoForCausalLM,
    tensors: Mapping[str, TensorInfo],
    device_map: dict[str, Device],
    dtype: torch.dtype,
    offload_folder: str | Path | None = None,
) -> Placement:
    """Load the checkpoint's tensors into ``model`` (built on meta) where ``device_map`` says
    and attach accelerate's hooks when the model spans several devices or the disk."""
    units = sorted(device_map, key=len, reverse=True)

    def unit_of(key: str) -> str:
        for unit in units:
            if key.startswith(unit + "."):
                return unit
        raise PlacementError(f"tensor {key} belongs to no placement unit")

    keys = [k for k in model.state_dict() if k in tensors]
    device_of = {k: device_map[unit_of(k)] for k in keys}
    values = set(device_map.values())
    gpus = [d for d in device_map.values() if isinstance(d, int) or d == "mps"]
    first = device_map["model.embed_tokens"]
    main: Device = first if first not in ("cpu", "disk") else (gpus[0] if gpus else "cpu")
    folder = Path(offload_folder) if offload_folder is not None else None

    resident = [k for k in keys if device_of[k] != "disk"]
    load_tensors(
        model, tensors, resident, {k: _torch_device(device_of[k]) for k in resident}, dtype
    )
    if model.config.tie_word_embeddings and "lm_head.weight" not in tensors:
        if device_map["lm_head"] != device_map["model.embed_tokens"]:
            raise PlacementError("tied lm_head and embed_tokens must be on the same device")
        model.lm_head.weight = model.model.embed_tokens.weight

    if len(values) == 1 and "disk" not in values:
        # buffers (rotary frequencies) follow the weights
        torch.nn.Module.to(model, _torch_device(main))
        return Placement(device_map, _torch_device(main), folder, dispatched=False)

    disk = [k for k in keys if device_of[k] == "disk"]
    index: dict[str, dict[str, Any]] = {}
    if disk and folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        for key in disk:
            with safe_open(str(tensors[key].file), framework="pt", device="cpu") as f:
                offload_weight(f.get_tensor(key).to(dtype), key, str(folder), index=index)
        save_offload_index(index, str(folder))
    else:
        dtype_name = str(dtype).removeprefix("torch.")
        for key in disk:
            index[key] = {
                "safetensors_file": str(tensors[key].file),
                "weight_name": key,
                "dtype": dtype_name,
            }
    _reset_caches(model)
    dispatch_model(
        model,
        device_map=dict(device_map),
        main_device=main,  # accelerate takes a GPU index or a device name here
        offload_dir=str(folder) if folder is not None and disk else None,
        offload_index=index or None,
    )
    _reset_caches(model)
    return Placement(device_map, _torch_device(main), folder, dispatched=True)


def _reset_caches(model: GovernedFlexOlmoForCausalLM) -> None:
    for block in _blocks(model):
        block.reset_placement_cache()


# -- unloading and loading experts at run time ---------------------------------------------


@dataclass
class ExpertRecord:
    """What unloading one expert in one layer took away, to put it back."""

    layer: int
    hooks: dict[str, ModelHook] = field(default_factory=dict)
    devices: dict[str, torch.device] = field(default_factory=dict)
    offloaded_state: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    """full key -> the accelerate CPU-offload state dict it was popped from."""


def _blocks(model: GovernedFlexOlmoForCausalLM) -> list[GovernedSparseMoeBlock]:
    return [layer.mlp for layer in model.model.layers]


def _loader_state(hook: ModelHook) -> dict[str, torch.Tensor] | None:
    wm = getattr(hook, "weights_map", None)
    if isinstance(wm, PrefixedDataset) and isinstance(wm.dataset, OffloadedWeightsLoader):
        state: dict[str, torch.Tensor] = wm.dataset.state_dict
        return state
    return None


def unload_expert(model: GovernedFlexOlmoForCausalLM, expert: int) -> list[ExpertRecord]:
    """Free one expert's weights in every layer (params to meta, hooks removed, CPU-offload
    copies dropped) and mark it unavailable, so that routing to it fails closed."""
    records: list[ExpertRecord] = []
    for layer, block in enumerate(_blocks(model)):
        module = block.experts[expert]
        prefix = f"{expert_unit(layer, expert)}."
        rec = ExpertRecord(layer)
        for name, sub in module.named_modules():
            hook = getattr(sub, "_hf_hook", None)
            if hook is not None:
                rec.hooks[name] = hook
        rec.devices = {name: p.device for name, p in module.named_parameters()}
        block.unloaded.add(expert)
        remove_hook_from_module(module, recurse=True)
        for name in rec.devices:
            set_module_tensor_to_device(module, name, "meta")
        for hook in rec.hooks.values():
            state = _loader_state(hook)
            if state is None:
                continue
            for name in rec.devices:
                if prefix + name in state:
                    del state[prefix + name]
                    rec.offloaded_state[prefix + name] = state
        records.append(rec)
    _reset_caches(model)
    return records


def load_expert(
    model: GovernedFlexOlmoForCausalLM,
    expert: int,
    records: list[ExpertRecord],
    tensors: Mapping[str, TensorInfo],
    dtype: torch.dtype,
) -> None:
    """Read one expert's weights back from the checkpoint, put them where they were, re-attach
    their hooks and mark the expert available. Checks shapes against the model."""
    blocks = _blocks(model)
    for rec in records:
        module = blocks[rec.layer].experts[expert]
        prefix = f"{expert_unit(rec.layer, expert)}."
        values: dict[str, torch.Tensor] = {}
        for name in rec.devices:
            key = prefix + name
            info = tensors.get(key)
            if info is None:
                raise CheckpointError(f"missing tensor {key}")
            with safe_open(str(info.file), framework="pt", device="cpu") as f:
                value = f.get_tensor(key).to(dtype)
            expected = tuple(module.get_parameter(name).shape)
            if tuple(value.shape) != expected:
                raise CheckpointError(
                    f"tensor {key} has shape {list(value.shape)}, expected {list(expected)}"
                )
            values[name] = value
        for name, device in rec.devices.items():
            key = prefix + name
            if key in rec.offloaded_state:
                rec.offloaded_state[key][key] = values[name]
            elif device.type != "meta":
                set_module_tensor_to_device(module, name, device, value=values[name])
        for sub_name, hook in rec.hooks.items():
            add_hook_to_module(module.get_submodule(sub_name), hook)
    for block in blocks:
        block.unloaded.discard(expert)
    _reset_caches(model)
