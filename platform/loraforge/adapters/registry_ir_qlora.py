"""The `ir_qlora` method: IR-QLoRA (adapters/ir_qlora.py, ours: PEFT has no ICQ or IEC) wired into training.

Build: every linear layer but the output head is stored with ICQ (NF4 of w - tau, tau per block chosen to
maximise the code entropy; double-quantised block constants as `quant.double_quant` says); the targeted
ones (`lora.target_modules`) also get an IEC LoRA branch (IECLoRALinear: A, B and the two elastic scalars
start at Kaiming / 0 / 0 / 0, so the model starts exactly at its quantised base).

Save: the IEC branch is linear in x, so each layer's update is exactly a plain LoRA with the same scaling and
the *effective* factors (A + alpha_iec G, B + beta R) (IECLoRALinear.effective_factors). We write those as a
standard PEFT adapter (rank r, safetensors) and record the ICQ settings in the method note. Loaded by PEFT
on the original fp32 base (what evaluate and serve do) it is the usual QLoRA deployment, off by the
quantisation error; `load_ir_qlora` rebuilds the identical ICQ base (ICQ is deterministic) under the same
adapter and reproduces the trained model exactly. Merge: dequantised ICQ weight + s (B + beta R)(A + alpha G).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import save_file
from torch import nn

from loraforge.adapters.ir_qlora import ICQLinear, IECLoRALinear, icq_quantize
from loraforge.adapters.lora import ADAPTER_WEIGHTS
from loraforge.adapters.qlora import output_head_names, plain_linear
from loraforge.adapters.registry_core import BuildSetup, Method, unwrap, write_method_file
from loraforge.spec import IrQloraSpec, QuantSpec, TrainSpec

NOTE_ATTR = "loraforge_ir_qlora"


def _targets(name: str, target_modules: list[str] | str) -> bool:
    if target_modules == "all-linear":
        return True
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _icq_kwargs(quant: QuantSpec, icq: IrQloraSpec) -> dict[str, Any]:
    return {"blocksize": quant.blocksize, "tau_lambda": icq.tau_lambda, "tau_n": icq.tau_n,
            "double_quant": quant.double_quant, "quantize_tau": icq.quantize_tau}


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _base_linears(model: nn.Module) -> list[str]:
    skip = output_head_names(model)
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and n not in skip]


def build_ir_qlora(model: nn.Module, spec: TrainSpec, setup: BuildSetup | None = None) -> nn.Module:
    """In place: ICQ-quantise the linear layers, add IEC LoRA on the targeted ones; only those train."""
    lora = spec.lora
    kwargs = _icq_kwargs(spec.quant, spec.ir_qlora)
    model.requires_grad_(False)
    quantized, adapted = [], []
    for name in _base_linears(model):
        linear = model.get_submodule(name)
        base = ICQLinear(icq_quantize(linear.weight.data, **kwargs)[0], linear.bias)
        if _targets(name, lora.target_modules):
            _set_module(model, name, IECLoRALinear(base, lora.r, lora.alpha, dropout=lora.dropout))
            adapted.append(name)
        else:
            _set_module(model, name, base)
        quantized.append(name)
    if not adapted:
        raise ValueError(f"ir_qlora: lora.target_modules {lora.target_modules!r} matched no linear layer")
    setattr(model, NOTE_ATTR, {"quant": spec.quant.model_dump(), "ir_qlora": spec.ir_qlora.model_dump(),
                               "quantized_modules": quantized, "r": lora.r, "alpha": lora.alpha,
                               "dropout": lora.dropout})
    return model


def iec_layers(model: nn.Module) -> dict[str, IECLoRALinear]:
    return {n: m for n, m in unwrap(model).named_modules() if isinstance(m, IECLoRALinear)}


IEC_PARAMS = ("lora_A", "lora_B", "lora_iec_scale_a", "lora_iec_scale_b")


def effective_adapter(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """PEFT-format tensors (base_model.model.<layer>.lora_A/B.weight) of every IEC layer's effective factors.

    `state_dict`: the gathered trainable state when the live parameters are sharded (FSDP, ZeRO-3); the
    factors are then computed on a dense stand-in layer holding those values, by the same
    IECLoRALinear.effective_factors."""
    tensors = {}
    for name, layer in iec_layers(model).items():
        if state_dict is not None:
            values = {p: state_dict[f"{name}.{p}"].detach().to("cpu", torch.float32) for p in IEC_PARAMS}
            layer = IECLoRALinear(torch.zeros(layer.out_features, layer.in_features), layer.r, layer.alpha)
            with torch.no_grad():
                for p, v in values.items():
                    getattr(layer, p).copy_(v)
        with torch.no_grad():
            a_eff, b_eff = layer.effective_factors()
        tensors[f"base_model.model.{name}.lora_A.weight"] = a_eff.detach().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b_eff.detach().cpu().contiguous()
    return tensors


def save_ir_qlora(model: nn.Module, out: Path, state_dict: dict[str, torch.Tensor] | None,
                  base_path: str | None) -> Path:
    inner = unwrap(model)
    note = getattr(inner, NOTE_ATTR, None)
    if note is None:
        raise RuntimeError("ir_qlora: the model was not built by build_ir_qlora (no ICQ note)")
    tensors = effective_adapter(inner, state_dict)
    config = LoraConfig(
        r=note["r"], lora_alpha=note["alpha"], lora_dropout=note["dropout"], bias="none", task_type="CAUSAL_LM",
        target_modules=sorted(n for n in iec_layers(inner)), base_model_name_or_path=base_path, inference_mode=True,
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    write_method_file(out, "ir_qlora", **{k: note[k] for k in ("quant", "ir_qlora", "quantized_modules")})
    return out


def merge_ir_qlora(model: nn.Module) -> nn.Module:
    """In place: each IEC layer becomes nn.Linear(dequantised W + its exact update), each bare ICQ layer
    nn.Linear(dequantised W)."""
    inner = unwrap(model)
    for name, module in list(inner.named_modules()):
        with torch.no_grad():
            if isinstance(module, IECLoRALinear):
                w = module.base.dequantized_weight().float() + module.delta_weight().float()
                _set_module(inner, name, plain_linear(w, module.base.bias))
            elif isinstance(module, ICQLinear):
                _set_module(inner, name, plain_linear(module.dequantized_weight().float(), module.bias))
    if hasattr(inner, NOTE_ATTR):
        delattr(inner, NOTE_ATTR)
    return inner


def icq_dequantize_base(base: nn.Module, note: dict[str, Any]) -> None:
    """Replace, in place, the weights of the recorded linear layers by their ICQ dequantisation."""
    quant = QuantSpec(**note["quant"])
    icq = IrQloraSpec(**note["ir_qlora"])
    kwargs = _icq_kwargs(quant, icq)
    for name in note["quantized_modules"]:
        linear = base.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"ir_qlora: {name} is not a linear layer of this base model")
        with torch.no_grad():
            linear.weight.copy_(icq_quantize(linear.weight.data, **kwargs)[0].dequantize())


def load_ir_qlora(base: nn.Module, folder: str | Path, note: dict[str, Any]) -> PeftModel:
    icq_dequantize_base(base, note)
    return PeftModel.from_pretrained(base, str(folder))


IR_QLORA = Method(
    name="ir_qlora",
    summary="ICQ entropy-calibrated NF4 base, IEC elastic connections on LoRA",
    build=build_ir_qlora,
    save=save_ir_qlora,
    merge=merge_ir_qlora,
    via_peft=False,
)
