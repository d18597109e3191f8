"""The Ray shell of the train stage: a TorchTrainer around train.loop, and the stage entry point."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraforge.context import StageContext
from loraforge.errors import DataError, SpecError
from loraforge.resolve import resolve_data, resolve_model
from loraforge.spec import TrainSpec
from loraforge.train.loop import ADAPTER_SUBDIR, train_loop_per_worker

ADAPTER_WEIGHTS = "adapter_model.safetensors"
CHECKPOINTS_TO_KEEP = 2
CONTROLLER_POLL_ENV, CONTROLLER_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2"


@dataclass
class TrainResult:
    adapter_dir: Path
    steps: int
    final_loss: float
    losses: list[float] = field(default_factory=list)  # one per step, mean over workers, as logged
    restarts: int = 0  # worker-group restarts recovered from (FailureConfig)


def output_dir(spec: TrainSpec, ctx: StageContext) -> Path:
    return Path(spec.output).expanduser().resolve() if spec.output else (ctx.stage_dir("train") / "adapter").resolve()


def check_train_spec(spec: TrainSpec) -> None:
    """User errors a train spec can have beyond its schema; raised before any cluster work."""
    if spec.data is None:
        raise DataError("train: a data path is required (set `data:` in the train stage, or run curate first)")
    if spec.num_workers > spec.batch_size:
        raise SpecError("train", [("batch_size", f"global batch_size {spec.batch_size} is smaller than "
                                   f"num_workers {spec.num_workers}: every worker needs at least one example")])


def train_loop_config(spec: TrainSpec, ctx: StageContext, storage_dir: Path) -> dict[str, Any]:
    check_train_spec(spec)
    return {
        "spec": spec.model_dump(mode="json"),
        "model_path": resolve_model(spec.model or ctx.model),
        "data_path": str(resolve_data(spec.data)),
        "output": str(output_dir(spec, ctx)),
        "run": ctx.run,
        "storage_dir": str(storage_dir),
    }


def build_trainer(
    spec: TrainSpec, ctx: StageContext, *, name: str, storage_path: Path, callbacks: list | None = None
):
    """A TorchTrainer (Train V2) for this spec; `fit()` it. num_workers=0 runs in-process."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Each ray.train.report waits for the controller to take the previous one, and it polls every
    # 2 s by default: with a report per step that, not compute, set the pace. Ray forwards this
    # variable from the driver to its controller; a value the user set wins.
    os.environ.setdefault(CONTROLLER_POLL_ENV, CONTROLLER_POLL_S)
    storage_path = Path(storage_path).resolve()
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=train_loop_config(spec, ctx, storage_path / name),
        scaling_config=ScalingConfig(num_workers=spec.num_workers, use_gpu=False),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage_path),
            failure_config=FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_TO_KEEP),
            callbacks=callbacks,
        ),
    )


def _fetch_adapter(result: Any, adapter_dir: Path) -> None:
    """Rank 0 wrote the adapter on its node; on a multi-node cluster take it from the final checkpoint."""
    if (adapter_dir / ADAPTER_WEIGHTS).is_file():
        return
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as d:
            src = Path(d) / ADAPTER_SUBDIR
            if (src / ADAPTER_WEIGHTS).is_file():
                shutil.copytree(src, adapter_dir, dirs_exist_ok=True)
                return
    raise RuntimeError(f"training finished but no adapter was written to {adapter_dir}")


def run_train(spec: TrainSpec, ctx: StageContext) -> TrainResult:
    """Train the adapter on the connected Ray cluster; log params, per-step loss and the adapter."""
    check_train_spec(spec)
    name = f"train-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    if ctx.run is not None:
        ctx.run.log_params(spec.model_dump(mode="json"))
    trainer = build_trainer(spec, ctx, name=name, storage_path=ctx.stage_dir("train") / "ray")
    result = trainer.fit()
    out = result.return_value or {}
    losses = [float(x) for x in out.get("losses", [])]
    adapter_dir = output_dir(spec, ctx)
    _fetch_adapter(result, adapter_dir)
    train_result = TrainResult(
        adapter_dir=adapter_dir,
        steps=int(out.get("steps", len(losses))),
        final_loss=losses[-1] if losses else float("nan"),
        losses=losses,
        restarts=max(0, int(out.get("attempt", 1)) - 1),
    )
    if ctx.run is not None:
        ctx.run.log_metrics({"final_loss": train_result.final_loss, "restarts": train_result.restarts},
                            step=train_result.steps)
        ctx.run.log_artifact(adapter_dir, "adapter")
    return train_result
