"""DoRA (Liu et al. 2024), through PEFT (use_dora): W = m * (W0 + s B A) / ||W0 + s B A||_c.

The weight is split into a learnable magnitude vector m, initialised to the norms of W0 (one per output
unit: PEFT stores weights as [d_out, d_in], so the paper's column norm is the norm of each row here), and a
direction W0 + s B A trained as LoRA. The norm is detached from the graph (paper, section 4.3): it follows
B A in the forward pass but no gradient flows through it. Both properties are checked in
tests/unit/test_adapters_methods.py against PEFT 0.21's implementation.
"""

from __future__ import annotations

from peft import PeftModel, get_peft_model
from torch import nn

from loraforge.adapters.lora import lora_config, merge_peft, peft_saver
from loraforge.adapters.registry_core import BuildSetup, Method
from loraforge.spec import TrainSpec


def build_dora(model: nn.Module, spec: TrainSpec, setup: BuildSetup | None = None) -> PeftModel:
    return get_peft_model(model, lora_config(spec.lora, use_dora=True))


DORA = Method(
    name="dora",
    summary="magnitude m times direction (W0 + sBA)/||W0 + sBA||, norm detached",
    build=build_dora,
    save=peft_saver("dora"),
    merge=merge_peft,
    via_peft=True,
)
