"""Fine-tuning methods: one registry from the spec's `method` to its build / save / merge.

    build_adapter(model, spec, setup=None)  the model to train (only the method's parameters trainable)
    save_tuned(model, method, out, state_dict=None, base_path=None)  a PEFT adapter folder for the base
    merge_tuned(model, method)              the plain model with the update folded in (exact)
    load_tuned(base_path, folder)           the trained model back, exactly (rebuilds a quantised base)

Each method lives in its own module: lora, rslora, dora, pissa (PEFT); lora_ga (registry_lora_ga: the
official init from lora_ga.py on a PEFT adapter); qlora (bitsandbytes NF4 base + PEFT LoRA); ir_qlora
(registry_ir_qlora: ICQ + IEC from ir_qlora.py, ours); full (every weight). Every method runs under
ddp, fsdp and deepspeed (ZeRO-2/3).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from loraforge.adapters.dora import DORA
from loraforge.adapters.full import FULL
from loraforge.adapters.lora import LORA, save_adapter
from loraforge.adapters.pissa import PISSA
from loraforge.adapters.qlora import QLORA, load_qlora
from loraforge.adapters.registry_core import (
    METHOD_FILE,
    BuildSetup,
    Method,
    read_method_file,
    storage_bytes,
    unwrap,
)
from loraforge.adapters.registry_ir_qlora import IR_QLORA, load_ir_qlora
from loraforge.adapters.registry_lora_ga import LORA_GA, sum_over_workers
from loraforge.adapters.rslora import RSLORA
from loraforge.spec import METHODS as METHOD_NAMES
from loraforge.spec import TrainSpec

METHODS: dict[str, Method] = {m.name: m for m in (LORA, RSLORA, DORA, PISSA, LORA_GA, QLORA, IR_QLORA, FULL)}
assert tuple(METHODS) == METHOD_NAMES, "the registry and TrainSpec.method must list the same methods"

AdapterBuilder = Callable[..., nn.Module]
ADAPTERS: dict[str, AdapterBuilder] = {name: m.build for name, m in METHODS.items()}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}") from None


def build_adapter(model: nn.Module, spec: TrainSpec, setup: BuildSetup | None = None) -> nn.Module:
    """The model to train for `spec.method` (built in place on `model`); `setup` carries the train
    batches for methods whose initialisation reads data (lora_ga)."""
    return get_method(spec.method).build(model, spec, setup)


def save_tuned(model: nn.Module, method: str, out: str | Path, state_dict: dict[str, Tensor] | None = None,
               base_path: str | None = None) -> Path:
    """Write the trained model as a PEFT adapter folder for the original base (plus loraforge_method.json).

    `state_dict`: the gathered full state when parameters are sharded (FSDP, ZeRO-3), else None.
    `base_path`: the base model folder (the `full` method writes its update against it)."""
    return get_method(method).save(model, Path(out), state_dict, base_path)


def merge_tuned(model: nn.Module, method: str) -> nn.Module:
    """The trained model as a plain model with the update folded in; modifies `model` in place."""
    merge = get_method(method).merge
    if merge is None:
        raise ValueError(f"method {method!r} has no exact merge")
    return merge(model)


# Methods whose trained model has a quantised base: load_tuned rebuilds it; plain PEFT loading puts the
# adapter on the fp32 base instead (the usual QLoRA deployment, off by the quantisation error).
QUANTISED_METHODS = ("qlora", "ir_qlora")


def load_tuned(base_path: str, folder: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The trained model from a saved folder, exactly: for qlora / ir_qlora the base is quantised again the
    way it was in training (both quantisations are deterministic) before the adapter is loaded. Plain
    `PeftModel.from_pretrained(base, folder)`, what evaluate and serve do, is exact for every other method."""
    from peft import PeftModel

    from loraforge.resolve import load_model

    note = read_method_file(folder)
    base = load_model(base_path, dtype=dtype)
    if note["method"] == "qlora":
        return load_qlora(base, folder, note)
    if note["method"] == "ir_qlora":
        return load_ir_qlora(base, folder, note)
    return PeftModel.from_pretrained(base, str(folder))


__all__ = [
    "ADAPTERS", "METHODS", "METHOD_FILE", "QUANTISED_METHODS",
    "AdapterBuilder", "BuildSetup", "Method", "build_adapter", "get_method",
    "load_tuned", "merge_tuned", "read_method_file", "save_adapter", "save_tuned", "storage_bytes",
    "sum_over_workers", "unwrap",
]
