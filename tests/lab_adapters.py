"""Test helper: LoRA adapters on the lab model with random (non-zero) B, so they change its output."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_random_adapter(
    model_dir: Path,
    out: Path,
    seed: int,
    rank: int = 4,
    alpha: int = 16,
    targets: Sequence[str] = ("q_proj", "v_proj", "down_proj"),
    use_rslora: bool = False,
    use_dora: bool = False,
    b_scale: float = 1.0,
) -> Path:
    """A PEFT LoRA adapter saved as safetensors; `b_scale` shrinks B so outputs stay near the base's."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(targets),
        init_lora_weights=False,
        use_rslora=use_rslora,
        use_dora=use_dora,
    )
    model = get_peft_model(base, cfg)
    if b_scale != 1.0:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(b_scale)
    model.save_pretrained(out)
    return out


def make_adapter_zoo(model_dir: Path, root: Path, count: int, ranks: Sequence[int] = (2, 4, 8, 16)) -> dict[str, Path]:
    """`count` adapters named a00, a01, ... with ranks cycling through `ranks`, mixed targets, every
    third one rsLoRA; each with its own seed so every adapter changes the output differently."""
    zoo: dict[str, Path] = {}
    for i in range(count):
        name = f"a{i:02d}"
        targets = ALL_LINEAR if i % 2 == 0 else ("q_proj", "v_proj", "up_proj", "down_proj")
        zoo[name] = make_random_adapter(
            model_dir, root / name, seed=100 + i, rank=ranks[i % len(ranks)], alpha=2 * ranks[i % len(ranks)],
            targets=targets, use_rslora=i % 3 == 2, b_scale=0.3,
        )
    return zoo
