"""LoRA through PEFT: wrap a causal LM, save and load the adapter in PEFT format (safetensors)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from loraforge.spec import LoraSpec, TrainSpec


def lora_config(spec: LoraSpec) -> LoraConfig:
    # PEFT's "all-linear" targets every linear layer of attention and MLP and leaves lm_head out.
    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )


def build_lora(model: torch.nn.Module, spec: TrainSpec) -> PeftModel:
    """Base weights frozen, LoRA B initialised to zero: the wrapped model's output is unchanged."""
    return get_peft_model(model, lora_config(spec.lora))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The PeftModel inside a DDP / DeepSpeed wrapper (both keep it as `.module`)."""
    while not isinstance(model, PeftModel) and hasattr(model, "module"):
        model = model.module
    return model


def save_adapter(model: torch.nn.Module, out_dir: str | Path, state_dict: dict[str, Any] | None = None) -> Path:
    """adapter_config.json + adapter_model.safetensors, loadable by PeftModel.from_pretrained.

    `state_dict` is the full (gathered) state when the live parameters are sharded (FSDP, ZeRO-3);
    PEFT keeps only the adapter's entries of it.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    peft_model = unwrap(model)
    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"expected a PEFT model, got {type(peft_model).__name__}")
    peft_model.save_pretrained(str(out), state_dict=state_dict, safe_serialization=True)
    return out


def load_adapter(base: torch.nn.Module, adapter_dir: str | Path) -> PeftModel:
    return PeftModel.from_pretrained(base, str(adapter_dir))
