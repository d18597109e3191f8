"""Data-parallel strategies on CPU over gloo: ddp, fsdp (FSDP2) and deepspeed (ZeRO-2/3).

Each wraps the model to train (a PEFT model; the whole model for `full`), owns its optimizer, and knows
how to take a step, save and restore a checkpoint folder, and gather the trainable state for saving.
`save` and `load` are called on every rank with that rank's own folder: Ray merges the ranks' folders
into one checkpoint, so file names must not collide across ranks (each library's per-rank names already
don't).
Only trainable parameters are checkpointed; the frozen base is reloaded from the model folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from loraforge.adapters.registry_core import unwrap
from loraforge.spec import TrainSpec

MAX_GRAD_NORM = 1.0


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _adamw(model: torch.nn.Module, spec: TrainSpec) -> torch.optim.Optimizer:
    return torch.optim.AdamW(_trainable(model), lr=spec.learning_rate, weight_decay=spec.weight_decay)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


class Strategy:
    """Common surface the loop uses; `model` is what forward is called on."""

    model: Any
    peft_model: torch.nn.Module
    optimizer: Any

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def backward_step(self, loss: torch.Tensor) -> None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(_trainable(self.peft_model), MAX_GRAD_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, ckpt_dir: Path) -> None:
        raise NotImplementedError

    def load(self, ckpt_dir: Path) -> None:
        raise NotImplementedError

    def adapter_state(self) -> dict[str, torch.Tensor] | None:
        """Collective on every rank; rank 0 gets the full trainable state (None: read the model's own)."""
        return None


class DdpStrategy(Strategy):
    """Ray's prepare_model: DistributedDataParallel over gloo when there is more than one worker."""

    STATE_FILE = "ddp_state.pt"

    def __init__(self, model: torch.nn.Module, spec: TrainSpec):
        from ray.train.torch import prepare_model

        self.peft_model = model
        self.model = prepare_model(model)
        self.optimizer = _adamw(model, spec)

    def save(self, ckpt_dir: Path) -> None:
        if _rank() == 0:  # replicas are identical: one copy is enough
            trainable = {n: p.detach().clone() for n, p in self.peft_model.named_parameters() if p.requires_grad}
            torch.save({"model": trainable, "optimizer": self.optimizer.state_dict()}, ckpt_dir / self.STATE_FILE)

    def load(self, ckpt_dir: Path) -> None:
        state = torch.load(ckpt_dir / self.STATE_FILE, map_location="cpu", weights_only=True)
        result = self.peft_model.load_state_dict(state["model"], strict=False)
        if result.unexpected_keys:
            raise RuntimeError(f"checkpoint has parameters the model lacks: {result.unexpected_keys[:5]}")
        self.optimizer.load_state_dict(state["optimizer"])


class FsdpStrategy(Strategy):
    """FSDP2: `fully_shard` on each decoder layer, then on the root; DCP checkpoints."""

    DCP_DIR = "dcp"

    def __init__(self, model: torch.nn.Module, spec: TrainSpec):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        inner = unwrap(model)
        inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # full: no PEFT wrapper
        layer_types = set(getattr(inner, "_no_split_modules", None) or [])
        layers = [m for m in model.modules() if type(m).__name__ in layer_types]
        if not layers:
            raise ValueError(f"fsdp: found no decoder layers ({sorted(layer_types)}) to shard in the model")
        mesh = init_device_mesh("cpu", (_world_size(),))
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        self.peft_model = self.model = model
        self.optimizer = _adamw(model, spec)  # after sharding: it must hold the sharded (DTensor) params

    def _options(self, **kw: Any):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(ignore_frozen_params=True, **kw)

    def save(self, ckpt_dir: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self._options())
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(ckpt_dir / self.DCP_DIR))

    def load(self, ckpt_dir: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self._options())
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(ckpt_dir / self.DCP_DIR))
        set_state_dict(
            self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
            options=self._options(strict=False),  # the frozen base is not in the checkpoint
        )

    def adapter_state(self) -> dict[str, torch.Tensor] | None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        # All ranks all-gather; only rank 0 keeps the full tensors (on CPU).
        return get_model_state_dict(self.model, options=self._options(full_state_dict=True, cpu_offload=True))


class DeepSpeedStrategy(Strategy):
    """DeepSpeed ZeRO-2/3 on CPU, reusing the gloo process group Ray set up."""

    CKPT_DIR = "deepspeed"
    TAG = "state"

    def __init__(self, model: torch.nn.Module, spec: TrainSpec, per_worker_batch: int):
        import deepspeed

        self.stage = spec.zero_stage
        config = {
            "train_micro_batch_size_per_gpu": per_worker_batch,
            "gradient_accumulation_steps": 1,
            "train_batch_size": per_worker_batch * _world_size(),
            "gradient_clipping": MAX_GRAD_NORM,
            # torch_adam: DeepSpeed's own CPU Adam needs a C++ build we do not want on every worker.
            "optimizer": {
                "type": "AdamW",
                "params": {"lr": spec.learning_rate, "weight_decay": spec.weight_decay, "torch_adam": True},
            },
            "zero_optimization": {"stage": spec.zero_stage},
            "steps_per_print": 10**9,
        }
        self.peft_model = model
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=_trainable(model), config=config, dist_init_required=False
        )

    def backward_step(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)
        self.model.step()  # clips, steps and zeroes grads

    def save(self, ckpt_dir: Path) -> None:
        # Collective: every rank writes its optimizer partition.
        self.model.save_checkpoint(str(ckpt_dir / self.CKPT_DIR), tag=self.TAG, exclude_frozen_parameters=True)

    def load(self, ckpt_dir: Path) -> None:
        path, _ = self.model.load_checkpoint(
            str(ckpt_dir / self.CKPT_DIR), tag=self.TAG, load_module_strict=False,
            load_optimizer_states=True, load_lr_scheduler_states=False,
        )
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {ckpt_dir / self.CKPT_DIR}")

    def adapter_state(self) -> dict[str, torch.Tensor] | None:
        if self.stage < 3:
            return None  # ZeRO-2 keeps full parameters on every rank
        import deepspeed

        named = [(n, p) for n, p in self.peft_model.named_parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            return {n: p.detach().clone().cpu() for n, p in named} if _rank() == 0 else {}


def make_strategy(model: torch.nn.Module, spec: TrainSpec, per_worker_batch: int) -> Strategy:
    if spec.strategy == "ddp":
        return DdpStrategy(model, spec)
    if spec.strategy == "fsdp":
        return FsdpStrategy(model, spec)
    return DeepSpeedStrategy(model, spec, per_worker_batch)
