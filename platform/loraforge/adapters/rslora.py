"""rsLoRA (Kalajdzievski 2023): LoRA scaled by alpha / sqrt(r) instead of alpha / r, through PEFT (use_rslora).

With alpha / r the update's scale shrinks as the rank grows, so higher ranks learn no faster; alpha / sqrt(r)
keeps the learning dynamics rank-stable.
"""

from __future__ import annotations

from peft import PeftModel, get_peft_model
from torch import nn

from loraforge.adapters.lora import lora_config, merge_peft, peft_saver
from loraforge.adapters.registry_core import BuildSetup, Method
from loraforge.spec import TrainSpec


def build_rslora(model: nn.Module, spec: TrainSpec, setup: BuildSetup | None = None) -> PeftModel:
    return get_peft_model(model, lora_config(spec.lora, use_rslora=True))


RSLORA = Method(
    name="rslora",
    summary="LoRA with scaling alpha/sqrt(r)",
    build=build_rslora,
    save=peft_saver("rslora"),
    merge=merge_peft,
    via_peft=True,
)
