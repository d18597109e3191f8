"""LoRA through PEFT (Hu et al. 2021): h = W0 x + (alpha / r) B A x, A random, B zero, W0 frozen.

Also the PEFT plumbing the other PEFT-based methods share: the LoraConfig from the spec, saving a
PEFT adapter folder (safetensors), the exact merge, and the conversion of methods that offset the base
weight at initialisation (PiSSA, LoRA-GA) into a plain LoRA for the original base.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from torch import Tensor, nn

from loraforge.adapters.registry_core import INIT_STATE_ATTR, BuildSetup, Method, unwrap, write_method_file
from loraforge.spec import LoraSpec, TrainSpec

ADAPTER_WEIGHTS = "adapter_model.safetensors"
DEFAULT_ADAPTER = "default"


def lora_config(spec: LoraSpec, **overrides: Any) -> LoraConfig:
    # PEFT's "all-linear" targets every linear layer of attention and MLP and leaves lm_head out.
    kwargs: dict[str, Any] = dict(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return LoraConfig(**{**kwargs, **overrides})


def build_lora(model: nn.Module, spec: TrainSpec, setup: BuildSetup | None = None) -> PeftModel:
    """Base weights frozen, LoRA B initialised to zero: the wrapped model's output is unchanged."""
    return get_peft_model(model, lora_config(spec.lora))


def peft_model_of(model: nn.Module) -> PeftModel:
    peft_model = unwrap(model)
    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"expected a PEFT model, got {type(peft_model).__name__}")
    return peft_model


def save_adapter(model: nn.Module, out_dir: str | Path, state_dict: dict[str, Any] | None = None) -> Path:
    """adapter_config.json + adapter_model.safetensors, loadable by PeftModel.from_pretrained.

    `state_dict` is the full (gathered) state when the live parameters are sharded (FSDP, ZeRO-3);
    PEFT keeps only the adapter's entries of it.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    peft_model_of(model).save_pretrained(str(out), state_dict=state_dict, safe_serialization=True)
    return out


def peft_saver(method: str):
    """A Method.save for methods whose trained PEFT adapter applies to the original base as it is."""

    def save(model: nn.Module, out: Path, state_dict: dict[str, Tensor] | None, base_path: str | None) -> Path:
        folder = save_adapter(model, out, state_dict)
        write_method_file(folder, method)
        return folder

    return save


def merge_peft(model: nn.Module) -> nn.Module:
    """The base model with every adapter folded into its weights (PEFT's merge_and_unload, in place)."""
    return peft_model_of(model).merge_and_unload()


def load_adapter(base: nn.Module, adapter_dir: str | Path) -> PeftModel:
    return PeftModel.from_pretrained(base, str(adapter_dir))


# ------------------------------------------------ methods that move W0 at init (PiSSA, LoRA-GA)
def remember_initial_adapter(peft_model: PeftModel) -> None:
    """Keep the factors right after initialisation (CPU copies), before any wrapper shards them: saving
    needs them to express the trained adapter against the original, un-offset base weight."""
    initial = get_peft_model_state_dict(peft_model, adapter_name=DEFAULT_ADAPTER)
    setattr(peft_model, INIT_STATE_ATTR, {"initial_adapter": {k: v.detach().cpu().clone() for k, v in initial.items()}})


def offset_to_plain_lora(trained: dict[str, Tensor], initial: dict[str, Tensor]) -> dict[str, Tensor]:
    """W0 - s B0 A0 + s B A = W0 + s [B | -B0] [A ; A0]: a rank-2r LoRA on the original base.

    The same tensors as PEFT's `save_pretrained(path_initial_model_for_weight_conversion=...)`, computed
    from state dicts alone (PEFT's own route loads the initial adapter into the live model, which a sharded
    FSDP / ZeRO-3 model cannot take on one rank).
    """
    missing = sorted(set(trained) - set(initial))
    if missing:
        raise ValueError(f"no initial value for adapter tensors {missing[:3]} (of {len(missing)})")
    out = {}
    for name, value in trained.items():
        value = value.detach().cpu()
        if "lora_A" in name:
            out[name] = torch.cat([value, initial[name].to(value.dtype)], dim=0)
        elif "lora_B" in name:
            out[name] = torch.cat([value, -initial[name].to(value.dtype)], dim=1)
        else:
            raise ValueError(f"cannot convert adapter tensor {name!r}: only lora_A / lora_B are expected")
    return {k: v.contiguous() for k, v in out.items()}


def converted_config(config: LoraConfig) -> LoraConfig:
    """The config of the rank-2r plain LoRA: same scaling, ordinary init (PEFT's own conversion rules)."""
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ValueError("cannot convert an rsLoRA adapter with rank_pattern / alpha_pattern")
    config = copy.deepcopy(config)
    config.init_lora_weights = True
    config.r *= 2
    config.lora_alpha *= math.sqrt(2) if config.use_rslora else 2
    config.rank_pattern = {k: 2 * v for k, v in (config.rank_pattern or {}).items()}
    config.alpha_pattern = {k: 2 * v for k, v in (config.alpha_pattern or {}).items()}
    config.inference_mode = True
    return config


def offset_saver(method: str):
    """A Method.save for PiSSA / LoRA-GA: the trained adapter converted for the original base."""

    def save(model: nn.Module, out: Path, state_dict: dict[str, Tensor] | None, base_path: str | None) -> Path:
        peft_model = peft_model_of(model)
        init_state = getattr(peft_model, INIT_STATE_ATTR, None)
        if not init_state or "initial_adapter" not in init_state:
            raise RuntimeError(f"{method}: the initial adapter was not recorded at build time; cannot convert")
        trained = get_peft_model_state_dict(peft_model, state_dict=state_dict, adapter_name=DEFAULT_ADAPTER)
        tensors = offset_to_plain_lora(trained, init_state["initial_adapter"])
        config = converted_config(peft_model.peft_config[DEFAULT_ADAPTER])
        if config.base_model_name_or_path is None and base_path is not None:
            config.base_model_name_or_path = base_path
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(str(out))
        save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        write_method_file(out, method, converted_from_rank=config.r // 2)
        return out

    return save


LORA = Method(
    name="lora",
    summary="W0 x + (alpha/r) B A x; A random, B zero",
    build=build_lora,
    save=peft_saver("lora"),
    merge=merge_peft,
    via_peft=True,
)
