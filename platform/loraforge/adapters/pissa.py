"""PiSSA (Meng et al. 2024), through PEFT (init_lora_weights="pissa"): principal singular components init.

W0 = U S V^T; A = S_r^(1/2) V_r^T / sqrt(s), B = U_r S_r^(1/2) / sqrt(s) for the top r singular triplets (s the
LoRA scaling), and the frozen base becomes the residual W0 - s B A, so the output at init is unchanged while
the adapter starts on the weight's principal subspace. The trained adapter is saved converted to a rank-2r
plain LoRA for the original base (see lora.offset_to_plain_lora), so evaluate and serve load it as usual.
"""

from __future__ import annotations

from peft import PeftModel, get_peft_model
from torch import nn

from loraforge.adapters.lora import lora_config, merge_peft, offset_saver, remember_initial_adapter
from loraforge.adapters.registry_core import BuildSetup, Method
from loraforge.spec import TrainSpec


def pissa_init_name(niter: int | None) -> str:
    return "pissa" if niter is None else f"pissa_niter_{niter}"


def build_pissa(model: nn.Module, spec: TrainSpec, setup: BuildSetup | None = None) -> PeftModel:
    peft_model = get_peft_model(model, lora_config(spec.lora, init_lora_weights=pissa_init_name(spec.pissa.niter)))
    remember_initial_adapter(peft_model)
    return peft_model


PISSA = Method(
    name="pissa",
    summary="A, B from the top-r SVD of W0; residual base",
    build=build_pissa,
    save=offset_saver("pissa"),
    merge=merge_peft,
    via_peft=True,
)
