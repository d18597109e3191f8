"""What every fine-tuning method provides to the registry, and the note each saved folder carries.

A method is one module of `loraforge.adapters` exposing a `Method`: how to turn the base model into the
model to train (`build`), how to write the trained result as a folder evaluate and serve can load (`save`),
and, when it exists, an exact merge into a plain model (`merge`). Every saved folder is a PEFT adapter
(adapter_config.json + adapter_model.safetensors) for the *original* base model, plus `loraforge_method.json`
naming the method and, for quantised methods, how to rebuild the quantised base it was trained on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from loraforge.spec import TrainSpec

METHOD_FILE = "loraforge_method.json"
# Attribute on the trainable model holding what `save` needs beyond the trained state (e.g. the initial
# factors of methods that offset the base weight). Plain Python data: survives DDP, FSDP and DeepSpeed wrapping.
INIT_STATE_ATTR = "loraforge_init_state"

LossFn = Callable[[nn.Module, Any], Tensor]


@dataclass
class BuildSetup:
    """What a data-aware initialisation needs (LoRA-GA): this worker's batches and how to combine workers.

    `batches` yields this worker's share of each global batch; `loss_fn(model, batch)` is the training loss;
    `reduce` sums a tensor over workers in place and returns it (identity on one worker).
    """

    batches: Iterable[Any] | None = None
    loss_fn: LossFn | None = None
    reduce: Callable[[Tensor], Tensor] | None = None


Builder = Callable[[nn.Module, TrainSpec, BuildSetup | None], nn.Module]
# (trained model, output folder, gathered state dict or None, base model folder) -> the folder
Saver = Callable[[nn.Module, Path, dict[str, Tensor] | None, str | None], Path]
Merger = Callable[[nn.Module], nn.Module]


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    build: Builder
    save: Saver
    merge: Merger | None  # None: no exact merge
    via_peft: bool  # implemented by PEFT (True) or by us on top of PEFT's adapter format (False)
    needs_data: bool = False  # build reads BuildSetup.batches


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP / DeepSpeed wrapper (both keep it as `.module`)."""
    from peft import PeftModel

    while not isinstance(model, PeftModel) and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def write_method_file(out: Path, method: str, **details: Any) -> None:
    (out / METHOD_FILE).write_text(json.dumps({"method": method, **details}, indent=2, sort_keys=True))


def read_method_file(folder: str | Path) -> dict[str, Any]:
    """The saved folder's method note; a plain PEFT adapter without one is treated as `lora`."""
    path = Path(folder) / METHOD_FILE
    if not path.is_file():
        return {"method": "lora"}
    return json.loads(path.read_text())


def storage_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, counting 4-bit weights by their packed codes and quantisation
    constants (bitsandbytes keeps those in `weight.quant_state`, outside the parameter)."""
    seen: set[int] = set()
    total = 0

    def add(t: Tensor | None) -> None:
        nonlocal total
        if t is None or id(t) in seen:
            return
        seen.add(id(t))
        total += t.numel() * t.element_size()

    for t in [*model.parameters(), *model.buffers()]:
        add(t)
        state = getattr(t, "quant_state", None)
        while state is not None:  # double quantisation nests a second state for the absmax constants
            add(state.absmax)
            add(getattr(state, "code", None))
            add(getattr(state, "offset", None))
            state = getattr(state, "state2", None)
    return total
