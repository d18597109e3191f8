"""The per-worker train loop that Ray Train's TorchTrainer runs on every worker.

Reads top to bottom: build the method's model (lora_ga first estimates the gradient over the train data,
across workers), restore-or-start, then step / log / checkpoint, then save the adapter folder.
`config` (built by trainer.build_trainer) carries plain data only:
  spec        TrainSpec as a dict
  model_path  resolved base model folder or hub id
  data_path   resolved training data file or folder
  output      adapter output folder
  run         loraforge.tracking.RunRef or None
  storage_dir this run's folder in Ray's storage (fault-injection marker, attempt log)
It returns (from rank 0, into Result.return_value) {"steps", "losses", "attempt"}.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from loraforge.adapters import BuildSetup, build_adapter, get_method, save_tuned, sum_over_workers
from loraforge.resolve import load_model, load_tokenizer
from loraforge.spec import TrainSpec
from loraforge.tracking import RunRef
from loraforge.train.objectives import LOSS_DENOMINATOR, OBJECTIVES, positive_or_one, predicted_label_weight
from loraforge.train.schedule import learning_rate_at
from loraforge.train.sft_data import iter_batches, per_worker_batch_size, tokenize_all
from loraforge.train.strategies import Strategy, make_strategy
from loraforge.train.training_rows import read_training_rows

TRAIN_STATE_FILE = "train_state.json"
ADAPTER_SUBDIR = "adapter"  # the final checkpoint also carries the adapter (for multi-node clusters)
FAULT_MARKER = "fault_injected"
ATTEMPTS_FILE = "attempts.log"


class InjectedFault(RuntimeError):
    """Raised by debug.fail_at_step to exercise restart-from-checkpoint."""


class MetricBuffer:
    """Rank 0's per-step metrics, sent to MLflow in one log_batch call every few seconds."""

    def __init__(self, run: RunRef | None, every_s: float = 5.0):
        self.run, self.every_s = run, every_s
        self.pending: list[Any] = []
        self.last_flush = time.monotonic()

    def add(self, step: int, metrics: dict[str, float]) -> None:
        if self.run is None:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        if time.monotonic() - self.last_flush > self.every_s:
            self.flush()

    def flush(self) -> None:
        if self.run is None or not self.pending:
            return
        client = self.run.client()
        for i in range(0, len(self.pending), 500):
            client.log_batch(self.run.run_id, metrics=self.pending[i : i + 500])
        self.pending, self.last_flush = [], time.monotonic()


@contextmanager
def _process_setup(context: Any, strategy: str) -> Iterator[None]:
    """torch launcher variables (DeepSpeed insists on LOCAL_RANK even when the process group exists),
    and a one-process gloo group for fsdp/deepspeed in local mode (num_workers=0); both undone after,
    since local mode runs in the caller's process."""
    wanted = {
        "RANK": context.get_world_rank(), "WORLD_SIZE": context.get_world_size(),
        "LOCAL_RANK": context.get_local_rank(), "LOCAL_WORLD_SIZE": context.get_local_world_size(),
    }
    added = [k for k in wanted if k not in os.environ]
    for k in added:
        os.environ[k] = str(wanted[k])
    own_group = not dist.is_initialized() and strategy != "ddp"
    if own_group:
        from loraforge.cluster import free_port

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()
        for k in added:
            os.environ.pop(k, None)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def global_denominator(local_weights: list[torch.Tensor], world_size: int) -> torch.Tensor:
    """What each rank divides its summed loss by: the global batch's label weight / world_size.

    `local_weights`: the ranks' `predicted_label_weight`s (label counts when unweighted), or their
    all-reduced sum as one tensor.
    """
    return positive_or_one(torch.stack(local_weights).sum()) / world_size


def _with_global_denominator(batch: dict[str, torch.Tensor], world_size: int) -> dict[str, torch.Tensor]:
    """Normalise every rank's loss by the global batch's label weight (see objectives.LOSS_DENOMINATOR)."""
    weight = predicted_label_weight(batch)
    if dist.is_initialized() and world_size > 1:
        dist.all_reduce(weight, op=dist.ReduceOp.SUM)
    return {**batch, LOSS_DENOMINATOR: global_denominator([weight], world_size)}


def _mean_over_ranks(value: torch.Tensor) -> float:
    value = value.detach().float().cpu()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return float(value)


def _save_checkpoint(
    ckpt_dir: Path, strategy: Strategy, rank: int, step: int, losses: list[float], world_size: int
) -> None:
    strategy.save(ckpt_dir)
    torch.save(_rng_state(), ckpt_dir / f"rng_rank{rank}.pt")
    if rank == 0:
        state = {"step": step, "losses": losses, "world_size": world_size}
        (ckpt_dir / TRAIN_STATE_FILE).write_text(json.dumps(state))


def _restore(strategy: Strategy, rank: int) -> tuple[int, list[float]]:
    """(steps already done, their losses) from Ray's latest checkpoint, or (0, []) on a fresh start."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, []
    with checkpoint.as_directory() as d:
        ckpt_dir = Path(d)
        state = json.loads((ckpt_dir / TRAIN_STATE_FILE).read_text())
        strategy.load(ckpt_dir)
        rng_file = ckpt_dir / f"rng_rank{rank}.pt"
        if rng_file.exists():  # absent when restarted with more workers than saved
            _set_rng_state(torch.load(rng_file, weights_only=False))
    return int(state["step"]), [float(x) for x in state["losses"]]


def _first_attempt_fault(storage_dir: Path) -> bool:
    """True once per run: the marker lives in the run's storage folder, which outlives worker restarts."""
    marker = storage_dir / FAULT_MARKER
    if marker.exists():
        return False
    marker.write_text(str(time.time()))
    return True


def _record_attempt(storage_dir: Path) -> int:
    log = storage_dir / ATTEMPTS_FILE
    with log.open("a") as fh:
        fh.write(f"{time.time()}\n")
    return len(log.read_text().splitlines())


def _build_setup(spec: TrainSpec, examples: list, pad_id: int, loss_fn: Any, rank: int,
                 world_size: int) -> BuildSetup | None:
    """For methods whose init reads data (lora_ga): this rank's share of the first global train batches, the
    training loss normalised by the global batch (so summing over ranks gives the global mean), and a SUM
    all-reduce over workers."""
    if not get_method(spec.method).needs_data:
        return None
    batches = iter_batches(
        examples, global_batch_size=spec.batch_size, world_rank=rank, world_size=world_size,
        seed=spec.seed, pad_id=pad_id, start_step=0, data_order=spec.data_order,
    )
    return BuildSetup(
        batches=batches,
        loss_fn=lambda model, batch: loss_fn(model, _with_global_denominator(batch, world_size)),
        reduce=sum_over_workers,
    )


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    import ray.train

    spec = TrainSpec.model_validate(config["spec"])
    context = ray.train.get_context()
    with _process_setup(context, spec.strategy):
        return _train(spec, config, context.get_world_rank(), context.get_world_size())


def _train(spec: TrainSpec, config: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    import ray.train

    run: RunRef | None = config.get("run")
    storage_dir = Path(config["storage_dir"])
    output = Path(config["output"])
    attempt = 0
    if rank == 0:
        storage_dir.mkdir(parents=True, exist_ok=True)
        attempt = _record_attempt(storage_dir)

    # Same seed on every rank: LoRA's random A matrices must start identical everywhere.
    _seed_all(spec.seed)
    tokenizer = load_tokenizer(config["model_path"])
    rows = read_training_rows(config["data_path"])  # curate's curriculum order; optional loss weights
    examples, skipped = tokenize_all(tokenizer, rows, spec.max_seq_len)
    per_worker = per_worker_batch_size(spec.batch_size, world_size)
    loss_fn = OBJECTIVES[spec.objective]
    setup = _build_setup(spec, examples, tokenizer.pad_token_id, loss_fn, rank, world_size)
    model = build_adapter(load_model(config["model_path"], dtype=torch.float32), spec, setup)
    strategy = make_strategy(model, spec, per_worker)

    _seed_all(spec.seed + 1000 * rank)  # dropout differs per rank, reproducibly; a checkpoint's RNG wins
    done, losses = _restore(strategy, rank)
    batches = iter_batches(
        examples, global_batch_size=spec.batch_size, world_rank=rank, world_size=world_size,
        seed=spec.seed, pad_id=tokenizer.pad_token_id, start_step=done, data_order=spec.data_order,
    )
    metrics_out = MetricBuffer(run if rank == 0 else None)
    if attempt == 1 and run is not None:  # rank 0's first attempt only: MLflow params are write-once
        run.log_params({"data.examples": len(examples), "data.skipped_no_assistant_tokens": skipped,
                        "data.weighted_examples": sum(e.weights is not None for e in examples),
                        "per_worker_batch_size": per_worker, "world_size": world_size})
    strategy.model.train()
    final_state: dict[str, torch.Tensor] | None = None
    have_final_state = False

    for step in range(done, spec.max_steps):
        lr = learning_rate_at(step, peak=spec.learning_rate, warmup_steps=spec.warmup_steps,
                              max_steps=spec.max_steps)
        strategy.set_lr(lr)
        loss = loss_fn(strategy.model, _with_global_denominator(next(batches), world_size))
        strategy.backward_step(loss)
        n = step + 1
        losses.append(_mean_over_ranks(loss))
        metrics = {"loss": losses[-1], "step": n}
        metrics_out.add(n, {"loss": losses[-1], "learning_rate": lr})

        if n % spec.checkpoint_every == 0 or n == spec.max_steps:
            if n == spec.max_steps:
                final_state, have_final_state = strategy.adapter_state(), True
            with tempfile.TemporaryDirectory(prefix="loraforge-ckpt-") as tmp:
                ckpt_dir = Path(tmp)
                _save_checkpoint(ckpt_dir, strategy, rank, n, losses, world_size)
                if n == spec.max_steps and rank == 0:
                    save_tuned(strategy.peft_model, spec.method, ckpt_dir / ADAPTER_SUBDIR, final_state,
                               config["model_path"])
                metrics_out.flush()
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        elif n % spec.log_every == 0:
            ray.train.report(metrics)  # every rank reports: report() is a barrier

        if spec.debug.fail_at_step == n and rank == 0 and _first_attempt_fault(storage_dir):
            metrics_out.flush()
            raise InjectedFault(f"debug.fail_at_step={n}: injected failure on rank 0")

    if not have_final_state:  # restored from the final checkpoint (a crash while saving the adapter)
        final_state = strategy.adapter_state()
    if rank == 0:
        save_tuned(strategy.peft_model, spec.method, output, final_state, config["model_path"])
    metrics_out.flush()
    return {"steps": len(losses), "losses": losses, "attempt": attempt}
