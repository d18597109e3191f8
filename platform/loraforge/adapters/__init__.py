"""Parameter-efficient tuning methods: a registry from the spec's `method` to a builder.

A builder takes the base model and the TrainSpec (each method reads its own sub-config) and
returns the model to train, with only the method's parameters trainable.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from loraforge.adapters.lora import build_lora, save_adapter
from loraforge.spec import TrainSpec

AdapterBuilder = Callable[[torch.nn.Module, TrainSpec], torch.nn.Module]

ADAPTERS: dict[str, AdapterBuilder] = {"lora": build_lora}


def build_adapter(model: torch.nn.Module, spec: TrainSpec) -> torch.nn.Module:
    try:
        builder = ADAPTERS[spec.method]
    except KeyError:
        raise ValueError(f"unknown method {spec.method!r}; known: {sorted(ADAPTERS)}") from None
    return builder(model, spec)


__all__ = ["ADAPTERS", "AdapterBuilder", "build_adapter", "save_adapter"]
