"""Test helper: LoRA adapters on the lab model with random (non-zero) B, so they change its output."""

from __future__ import annotations

from pathlib import Path

import torch


def make_random_adapter(model_dir: Path, out: Path, seed: int) -> Path:
    """A PEFT LoRA adapter saved as safetensors."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(base, cfg).save_pretrained(out)
    return out
