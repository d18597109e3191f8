"""The train stage on the shared local Ray cluster: ddp, fsdp, deepspeed ZeRO-2/3, 2 CPU workers each.

The loss is normalised by the global batch's label count, so every run with the same seed follows
the same loss curve whatever the strategy or world size: a one-process baseline (num_workers=0, no
Ray workers) is the reference for all of them. Three of the four Ray runs crash on rank 0 after
step FAIL_AT (debug.fail_at_step), restart from the step-CHECKPOINT_EVERY checkpoint and must still
end on the baseline's curve, which checks each strategy's checkpoint restore (model, optimizer,
step, RNG and data position).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from loraforge.context import StageContext
from loraforge.resolve import load_model, load_tokenizer
from loraforge.spec import TrainSpec
from loraforge.tracking import start_run
from loraforge.train.sft_data import collate, read_training_conversations, tokenize_conversation
from loraforge.train.trainer import TrainResult, run_train

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]  # one thread: see tests/conftest.py

STEPS, CHECKPOINT_EVERY, FAIL_AT = 8, 4, 5
TIMINGS: dict[str, float] = {}


def _spec(lab, **overrides) -> TrainSpec:
    task = sorted(lab.tasks)[0]
    base = dict(
        data=f"lab://tasks/{task}_train.jsonl", num_workers=2, max_steps=STEPS, batch_size=8, learning_rate=5e-3,
        warmup_steps=2, checkpoint_every=CHECKPOINT_EVERY, max_seq_len=128, max_failures=1, seed=3,
    )
    return TrainSpec(**{**base, **overrides})


def _train(label: str, spec: TrainSpec, ctx: StageContext) -> TrainResult:
    start = time.monotonic()
    result = run_train(spec, ctx)
    TIMINGS[label] = time.monotonic() - start
    print(f"\n[train timing] {label}: {TIMINGS[label]:.1f} s, losses {[round(x, 4) for x in result.losses]}")
    return result


@pytest.fixture(scope="module")
def probe(lab):
    """A fixed batch of task prompts to compare adapters by their logits."""
    tok = load_tokenizer(str(lab.model_dir))
    convs = read_training_conversations(f"lab://tasks/{sorted(lab.tasks)[0]}_train.jsonl")[:4]
    return collate([tokenize_conversation(tok, c, 128) for c in convs], pad_id=tok.pad_token_id)


def _logits(lab, probe, adapter_dir: Path | None) -> torch.Tensor:
    from peft import PeftModel

    model = load_model(str(lab.model_dir), dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    with torch.no_grad():
        return model.eval()(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits


@pytest.fixture(scope="module")
def baseline(lab, probe, tmp_path_factory) -> tuple[TrainResult, torch.Tensor]:
    """num_workers=0: the loop runs in this process (Ray Train local mode), uninterrupted."""
    ctx = StageContext(run_dir=tmp_path_factory.mktemp("train-baseline"), model="lab")
    result = _train("local num_workers=0 (ddp)", _spec(lab, num_workers=0), ctx)
    return result, _logits(lab, probe, result.adapter_dir)


def _check_against_baseline(result: TrainResult, baseline, lab, probe, restarts: int) -> None:
    base_result, base_logits = baseline
    assert result.steps == STEPS and len(result.losses) == STEPS
    assert result.restarts == restarts
    assert all(math.isfinite(x) for x in result.losses)
    # Same seed, same data order, same math: the curve matches step by step, resumed or not.
    assert result.losses == pytest.approx(base_result.losses, rel=2e-3)
    assert (result.adapter_dir / "adapter_config.json").is_file()
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    logits = _logits(lab, probe, result.adapter_dir)
    assert torch.allclose(logits, base_logits, atol=2e-2, rtol=1e-3)
    assert not torch.allclose(logits, _logits(lab, probe, None), atol=1e-2)  # the adapter changed the model


def test_local_baseline_learns(baseline, lab, probe):
    result, logits = baseline
    assert result.steps == STEPS and result.restarts == 0
    assert sum(result.losses[-3:]) < sum(result.losses[:3])
    assert not torch.allclose(logits, _logits(lab, probe, None), atol=1e-2)


def test_ddp_restarts_from_checkpoint_and_logs_to_mlflow(ray_cluster, mlflow_server, lab, probe, baseline, tmp_path):
    run = start_run(mlflow_server, "test-train", "train-ddp", "train", "test-train")
    spec = _spec(lab, strategy="ddp", debug={"fail_at_step": FAIL_AT})
    result = _train("ddp 2 workers, fail at 5", spec, StageContext(run_dir=tmp_path, model="lab", run=run))
    _check_against_baseline(result, baseline, lab, probe, restarts=1)

    client = MlflowClient(mlflow_server)
    history = client.get_metric_history(run.run_id, "loss")
    assert {m.step for m in history} == set(range(1, STEPS + 1))
    last = {m.step: m.value for m in history}[STEPS]
    assert last == pytest.approx(result.final_loss)
    assert len(client.get_metric_history(run.run_id, "learning_rate")) >= STEPS
    data = client.get_run(run.run_id).data
    assert data.params["strategy"] == "ddp" and data.params["lora.r"] == "8"
    assert data.metrics["restarts"] == 1
    files = {f.path for f in client.list_artifacts(run.run_id, "adapter")}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= files


@pytest.mark.parametrize(
    ("strategy", "zero_stage", "fail_at"),
    [("fsdp", 2, FAIL_AT), ("deepspeed", 2, None), ("deepspeed", 3, FAIL_AT)],
    ids=["fsdp-fail", "zero2", "zero3-fail"],
)
def test_sharded_strategies(ray_cluster, lab, probe, baseline, tmp_path, strategy, zero_stage, fail_at):
    spec = _spec(lab, strategy=strategy, zero_stage=zero_stage, debug={"fail_at_step": fail_at})
    label = f"{strategy}{'' if strategy == 'fsdp' else f' zero{zero_stage}'} 2 workers" + (
        f", fail at {fail_at}" if fail_at else ""
    )
    result = _train(label, spec, StageContext(run_dir=tmp_path, model="lab"))
    _check_against_baseline(result, baseline, lab, probe, restarts=1 if fail_at else 0)
