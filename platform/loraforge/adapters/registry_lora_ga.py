"""The `lora_ga` method: the official LoRA-GA initialisation (adapters/lora_ga.py) wired into training.

Build: a PEFT LoRA model with ordinary init, then one pass over `lora_ga.grad_batches` global train batches
that averages the full-weight gradient of every adapted linear layer (each worker runs its shard of every
batch and the sums and counts are added over workers, see lora_ga.estimate_gradients), then A, B and the
offset base from the gradient's SVD. The base layer's gradient is taken inside the PEFT model: with B = 0
the adapter adds nothing, so it is the plain model's gradient.

Save: the trained adapter converted to a rank-2r plain LoRA for the original base (lora.offset_to_plain_lora),
so evaluate and serve load it like any LoRA adapter.

A restarted run (FailureConfig) builds again and so re-estimates the gradient on the same batches: the same
initial point when the world size is unchanged (up to the summation order of the all-reduce otherwise).
"""

from __future__ import annotations

import itertools

import torch
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from loraforge.adapters.lora import (
    DEFAULT_ADAPTER,
    lora_config,
    merge_peft,
    offset_saver,
    remember_initial_adapter,
)
from loraforge.adapters.lora_ga import apply_lora_ga, default_loss, estimate_gradients
from loraforge.adapters.registry_core import BuildSetup, Method
from loraforge.spec import TrainSpec

PEFT_PREFIX = "base_model.model."


def adapted_layer_names(peft_model: PeftModel) -> list[str]:
    """Names, in the base model, of the linear layers carrying the default LoRA adapter."""
    return [n.removeprefix(PEFT_PREFIX) for n, m in peft_model.named_modules()
            if isinstance(m, LoraLayer) and DEFAULT_ADAPTER in m.lora_A]


def build_lora_ga(model: nn.Module, spec: TrainSpec, setup: BuildSetup | None = None) -> PeftModel:
    if setup is None or setup.batches is None:
        raise ValueError("lora_ga needs training batches to estimate the gradient: pass BuildSetup(batches=...)")
    cfg = spec.lora_ga
    peft_model = get_peft_model(model, lora_config(spec.lora))
    names = adapted_layer_names(peft_model)
    inner = peft_model.get_base_model()  # the model with LoRA layers injected; its base layers are the W0
    was_training = inner.training
    inner.eval()  # no dropout: the gradient of the model as it is
    try:
        grads = estimate_gradients(
            inner, itertools.islice(setup.batches, cfg.grad_batches), [f"{n}.base_layer" for n in names],
            loss_fn=setup.loss_fn or default_loss, reduce=setup.reduce,
        )
    finally:
        inner.train(was_training)
    grads = {n.removesuffix(".base_layer"): g for n, g in grads.items()}
    apply_lora_ga(peft_model, grads, cfg.stable_gamma, direction=cfg.direction, scale=cfg.scale, svd=cfg.svd)
    del grads
    remember_initial_adapter(peft_model)
    return peft_model


def sum_over_workers(t: torch.Tensor) -> torch.Tensor:
    """In-place SUM all-reduce over the default process group (identity on one worker)."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


LORA_GA = Method(
    name="lora_ga",
    summary="A, B from the SVD of the averaged full gradient (official init), W0 offset",
    build=build_lora_ga,
    save=offset_saver("lora_ga"),
    merge=merge_peft,
    via_peft=False,
    needs_data=True,
)
