"""Shared by the adapter-method tests: the lab model in fp32 and two small batches of one lab task."""

from __future__ import annotations

import torch

from loraforge.train.sft_data import collate, read_training_conversations, tokenize_conversation


def fp32_base(model_dir: str):
    from loraforge.resolve import load_model

    return load_model(model_dir, dtype=torch.float32).eval()


def task_batches(model_dir: str, task: str) -> list[dict[str, torch.Tensor]]:
    """Two batches of 4 rows of `task`'s training file, at most 64 tokens each."""
    from loraforge.resolve import load_tokenizer

    tok = load_tokenizer(model_dir)
    convs = read_training_conversations(f"lab://tasks/{task}_train.jsonl")[:8]
    rows = [tokenize_conversation(tok, c, 64) for c in convs]
    return [collate(rows[i : i + 4], pad_id=tok.pad_token_id) for i in (0, 4)]


def perturbed_method_folder(model_dir: str, method: str, batches, out):
    """A training method's saved folder with every trainable parameter moved off its init (as after training),
    so a wrong key mapping, scale or offset shows in the served weights; rank 4, alpha 8."""
    from loraforge.adapters import BuildSetup, build_adapter, save_tuned
    from loraforge.adapters.lora_ga import default_loss
    from loraforge.spec import TrainSpec

    torch.manual_seed(0)
    setup = BuildSetup(batches=iter(batches), loss_fn=default_loss) if method == "lora_ga" else None
    model = build_adapter(fp32_base(model_dir), TrainSpec(method=method, lora={"r": 4, "alpha": 8.0}), setup)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    return save_tuned(model.eval(), method, out / method, None, model_dir)
