"""QLoRA (Dettmers et al. 2023): the frozen base in bitsandbytes 4-bit NF4 with double quantisation, LoRA
(PEFT) on top, compute in fp32. Works on CPU with bitsandbytes >= 0.50.

Every linear layer except the output head is replaced by `bnb.nn.Linear4bit` with quant_type="nf4" and
compress_statistics=True (double quantisation of the block constants) set explicitly: the library defaults
are FP4 without it. Embeddings and norms stay in fp32, as in QLoRA. bitsandbytes' bf16 CPU inference
kernel is switched off per layer (see quantize_base_bnb), so training and inference compute alike.

Save: the PEFT adapter (it applies to the original base weights; loading it on the unquantised base is
the usual QLoRA deployment and differs from the trained model by the quantisation error). The folder's
method note records the quantisation, and `load_qlora` rebuilds the identical 4-bit base (quantisation is
deterministic) for an exact reload. Merge: the dequantised base plus the LoRA update, in fp32 (PEFT's own
merge re-quantises the sum to 4 bits, which is not exact).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from torch import nn

from loraforge.adapters.lora import lora_config, peft_model_of, save_adapter
from loraforge.adapters.registry_core import BuildSetup, Method, write_method_file
from loraforge.spec import QuantSpec, TrainSpec


def _bnb():
    import bitsandbytes as bnb

    return bnb


def output_head_names(model: nn.Module) -> set[str]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {n for n, m in model.named_modules() if head is not None and m is head}


def quantize_base_bnb(model: nn.Module, quant: QuantSpec) -> list[str]:
    """Replace every nn.Linear but the output head by an NF4 (double-quantised) Linear4bit, in place."""
    bnb = _bnb()
    skip = output_head_names(model)
    done = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or name in skip:  # Linear4bit subclasses nn.Linear: exact type
            continue
        q = bnb.nn.Linear4bit(
            module.in_features, module.out_features, bias=module.bias is not None, compute_dtype=torch.float32,
            compress_statistics=quant.double_quant, quant_type="nf4", quant_storage=torch.uint8, device="meta",
        )
        q.weight = bnb.nn.Params4bit(
            module.weight.data.float(), requires_grad=False, blocksize=quant.blocksize,
            compress_statistics=quant.double_quant, quant_type="nf4", quant_storage=torch.uint8, module=q,
        )
        if module.bias is not None:
            q.bias = nn.Parameter(module.bias.data.clone(), requires_grad=False)
        q = q.to(module.weight.device)  # Params4bit quantises on its first move to a real device
        # bitsandbytes 0.50 repacks a 4-bit weight for its bf16 CPU kernel on the first eval-mode forward
        # without grad, which drops the double quantisation in memory and computes in bf16: the model would
        # then answer differently in evaluation than in training. Keep the fp32 path everywhere.
        q.support_avx512bf16_for_cpu = False
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, q)
        done.append(name)
    if not done:
        raise ValueError("qlora: the model has no linear layers to quantise")
    model.is_loaded_in_4bit = True  # PEFT then wraps the Linear4bit layers with its bnb LoRA layers
    model.loraforge_quant = quant_note(quant)  # what save records to rebuild this base
    return done


def build_qlora(model: nn.Module, spec: TrainSpec, setup: BuildSetup | None = None) -> PeftModel:
    if not getattr(model, "is_loaded_in_4bit", False):
        quantize_base_bnb(model, spec.quant)
    return get_peft_model(model, lora_config(spec.lora))


def quant_note(quant: QuantSpec) -> dict[str, Any]:
    return {"quant_type": "nf4", **quant.model_dump()}


def save_qlora(model: nn.Module, out: Path, state_dict: dict[str, torch.Tensor] | None, base_path: str | None) -> Path:
    peft_model = peft_model_of(model)
    quant = getattr(peft_model.get_base_model(), "loraforge_quant", None)
    folder = save_adapter(model, out, state_dict)
    write_method_file(folder, "qlora", quant=quant)
    return folder


def dequantized_linear(module: nn.Module) -> nn.Linear:
    """A plain fp32 nn.Linear with the 4-bit layer's dequantised weight (the weight its forward uses)."""
    bnb = _bnb()
    w = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    lin = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device=w.device)
    with torch.no_grad():
        lin.weight.copy_(w)
        if module.bias is not None:
            lin.bias.copy_(module.bias)
    return lin.requires_grad_(False)


def dequantize_base(model: nn.Module) -> nn.Module:
    """Every Linear4bit of `model` (bare or under a PEFT LoRA layer) replaced by its fp32 dequantisation."""
    bnb = _bnb()
    for name, module in list(model.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, dequantized_linear(module))
    if hasattr(model, "is_loaded_in_4bit"):
        model.is_loaded_in_4bit = False
    return model


def plain_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A frozen nn.Linear holding `weight` (and `bias`): what a merged quantised layer becomes."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin.requires_grad_(False)


def merge_qlora(model: nn.Module) -> nn.Module:
    """In place: each LoRA layer becomes nn.Linear(dequantised W + its LoRA update), in fp32."""
    from peft.tuners.lora import LoraLayer

    inner = peft_model_of(model).get_base_model()
    for name, module in list(inner.named_modules()):
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            with torch.no_grad():
                w = dequantized_linear(base).weight if isinstance(base, _bnb().nn.Linear4bit) else base.weight
                w = w.detach().float().clone()
                for adapter in module.active_adapters:
                    w += module.get_delta_weight(adapter).float()
            parent_name, _, child = name.rpartition(".")
            setattr(inner.get_submodule(parent_name) if parent_name else inner, child, plain_linear(w, base.bias))
    return dequantize_base(inner)


def load_qlora(base: nn.Module, folder: str | Path, note: dict[str, Any]) -> PeftModel:
    quant = QuantSpec(**{k: v for k, v in (note.get("quant") or {}).items() if k in QuantSpec.model_fields})
    quantize_base_bnb(base, quant)
    return PeftModel.from_pretrained(base, str(folder))


QLORA = Method(
    name="qlora",
    summary="bitsandbytes NF4 base with double quantisation, LoRA on top",
    build=build_qlora,
    save=save_qlora,
    merge=merge_qlora,
    via_peft=True,
)
