"""Full fine-tuning: every weight trains. The reference the other methods are measured against.

Build: the model itself with every parameter trainable (tied input/output embeddings stay one parameter).

Save: evaluate and serve load PEFT adapter folders onto the base model, so the fully trained model is
written as one PEFT adapter that reproduces it exactly on the original base:
- every bias-free linear layer and every embedding (a tied output head included) carries a full-rank LoRA
  whose product is the trained minus the base weight: for a [d_out, d_in] weight r = min(d_out, d_in), one
  factor is the identity, the other the difference, and alpha = r so the scale is 1. LoRA layers, unlike
  PEFT's module copies, can sit next to other adapters on the same layer, so serve can hold this adapter
  beside ordinary LoRA adapters of the same base;
- every other module owning parameters (norms, linear layers with a bias) is a PEFT `modules_to_save`
  module: the folder holds its trained weights as they are.
The folder is about the model's size, and loading it holds the base and the update (2x the weights);
`merge` (or `merge_and_unload()` on the loaded adapter) gives the plain trained model.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from loraforge.adapters.registry_core import BuildSetup, Method, unwrap, write_method_file
from loraforge.spec import TrainSpec


def build_full(model: nn.Module, spec: TrainSpec, setup: BuildSetup | None = None) -> nn.Module:
    return model.requires_grad_(True)


def _trained_lookup(base: nn.Module, trained: dict[str, Tensor]):
    """name -> trained tensor, following tied aliases (a gathered state may hold a tied weight once)."""
    aliases: dict[int, list[str]] = defaultdict(list)
    for n, p in base.named_parameters(remove_duplicate=False):
        aliases[id(p)].append(n)
    by_name = {n: names for names in aliases.values() for n in names}

    def get(name: str) -> Tensor:
        for alias in [name, *by_name.get(name, [])]:
            if alias in trained:
                return trained[alias].detach().to("cpu", torch.float32)
        raise KeyError(f"full: the trained state has no value for {name}")

    return get


def _full_rank_factors(delta: Tensor) -> tuple[Tensor, Tensor]:
    """(A [r, d_in], B [d_out, r]) with B @ A == delta exactly, r = min(d_out, d_in)."""
    d_out, d_in = delta.shape
    if d_in <= d_out:
        return torch.eye(d_in, dtype=delta.dtype), delta.clone()
    return delta.clone(), torch.eye(d_out, dtype=delta.dtype)


def _lora_target(module: nn.Module) -> bool:
    """Linear layers without bias and embeddings carry a full-rank LoRA (a LoRA cannot carry a bias change)."""
    return isinstance(module, nn.Embedding) or (type(module) is nn.Linear and module.bias is None)


def full_model_as_adapter(base: nn.Module, trained: dict[str, Tensor], out: Path) -> Path:
    """Write the PEFT adapter that turns `base` (consumed) into the model whose state is `trained`."""
    get = _trained_lookup(base, trained)
    owners = [(n, m) for n, m in base.named_modules() if any(True for _ in m.parameters(recurse=False))]
    lora_targets = [n for n, m in owners if _lora_target(m)]
    kept = [n for n, m in owners if not _lora_target(m)]
    if not lora_targets:
        raise ValueError("full: the model has no bias-free linear layer or embedding to carry the update")
    ranks = {n: min(base.get_submodule(n).weight.shape) for n in lora_targets}
    config = LoraConfig(
        r=1, lora_alpha=1, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", init_lora_weights=True,
        target_modules=lora_targets, modules_to_save=kept or None,
        rank_pattern={re.escape(n): r for n, r in ranks.items()},
        alpha_pattern={re.escape(n): r for n, r in ranks.items()},  # alpha = r: scale 1
    )
    base_weights = {n: base.get_submodule(n).weight.detach().clone() for n in lora_targets}
    peft_model = get_peft_model(base, config)
    inner = peft_model.get_base_model()
    with torch.no_grad():
        for name in lora_targets:
            layer = inner.get_submodule(name)
            assert isinstance(layer, LoraLayer) and layer.scaling["default"] == 1.0
            delta = get(f"{name}.weight") - base_weights[name]
            if isinstance(layer.get_base_layer(), nn.Embedding):
                # PEFT's embedding LoRA adds (B @ A).T with A [r, vocab], B [dim, r]: factor delta.T
                a, b = _full_rank_factors(delta.T)
                layer.lora_embedding_A["default"].copy_(a)
                layer.lora_embedding_B["default"].copy_(b)
            else:
                a, b = _full_rank_factors(delta)
                layer.lora_A["default"].weight.copy_(a)
                layer.lora_B["default"].weight.copy_(b)
        for name in kept:
            copy = inner.get_submodule(name).modules_to_save["default"]
            for pname, p in copy.named_parameters(recurse=False):
                p.copy_(get(f"{name}.{pname}"))
    peft_model.save_pretrained(str(out), safe_serialization=True)
    return out


def save_full(model: nn.Module, out: Path, state_dict: dict[str, Tensor] | None, base_path: str | None) -> Path:
    from loraforge.resolve import load_model

    if base_path is None:
        raise ValueError("full: saving needs the base model folder (base_path) to write the update against it")
    trained = state_dict if state_dict is not None else dict(unwrap(model).state_dict())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    full_model_as_adapter(load_model(base_path, dtype=torch.float32), trained, out)
    write_method_file(out, "full")
    return out


def merge_full(model: nn.Module) -> nn.Module:
    return unwrap(model)


FULL = Method(
    name="full",
    summary="every weight trains",
    build=build_full,
    save=save_full,
    merge=merge_full,
    via_peft=False,
)
