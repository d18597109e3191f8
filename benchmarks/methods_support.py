"""Pieces of benchmarks/methods.py: the lab task as batches, one training run, scores, and the memory probe.

A training run here is the train loop's step (loraforge.train.loop._train) without Ray: the method's model from
`build_adapter` (lora_ga gets the loop's BuildSetup: the first `grad_batches` train batches and the SFT loss),
AdamW on the trainable parameters with the spec's weight decay, the SFT loss, gradient clipping at the
strategies' MAX_GRAD_NORM, and the loop's deterministic batches (`iter_batches`, same seed = same batches). Two
things differ on purpose: the learning rate is constant (the loop's cosine would tie every run's schedule to
its length, and steps-to-target to the cap), and a run can stop as soon as its smoothed loss reaches a target.
`loop_agrees` checks the step against `run_train(num_workers=0)`.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loraforge.adapters import BuildSetup, build_adapter, storage_bytes
from loraforge.lab.build import LabSettings
from loraforge.spec import LoraSpec, TrainSpec
from loraforge.train.objectives import sft_loss
from loraforge.train.sft_data import TokenizedExample, iter_batches, tokenize_all
from loraforge.train.strategies import MAX_GRAD_NORM

SMOOTH = 5  # running-mean window (steps) for every loss comparison
# Quarter-decade log grid (10^(k/4), two significant digits): the learning rates any search may try.
LR_LADDER = tuple(float(f"{10 ** (k / 4):.2g}") for k in range(-20, -3))


@dataclass
class Bench:
    """The lab model and one task: tokenised train examples, eval prompts and answers, held-out text."""

    model_dir: str
    tokenizer: Any
    task: str
    train_path: Path
    examples: list[TokenizedExample]
    eval_prompts: list[str]
    eval_refs: list[str]
    heldout_text: str
    batch_size: int
    max_seq_len: int = 256
    rank: int = 8  # LoRA rank r of every LoRA-family method
    alpha: float = 16.0  # LoRA alpha (scale alpha / r; rslora alpha / sqrt(r))
    lab_hidden: int = 128  # the lab model's width and parameter count, from its build report
    lab_params: int = 0


def lab_settings(hidden: int | None) -> LabSettings:
    """The default lab, or a wider variant: same world, tokenizer, depth and pretraining data, `hidden` wide.

    Heads stay 32 wide and the MLP 4x hidden, as in the default lab (hidden 128). The pretraining learning rate
    is scaled down above hidden 256 (6e-3 x 256 / hidden), as usual for Adam on wider layers."""
    if hidden is None or hidden == LabSettings().hidden_size:
        return LabSettings()
    if hidden < 32 or hidden % 32:
        raise SystemExit(f"--lab-hidden must be a positive multiple of 32 (heads are 32 wide), got {hidden}")
    return LabSettings(hidden_size=hidden, intermediate_size=4 * hidden, num_heads=hidden // 32,
                       learning_rate=6e-3 * min(1.0, 256 / hidden))


def load_bench(task: str, batch_size: int, max_seq_len: int = 256, rank: int = 8, alpha: float = 16.0,
               lab_hidden: int | None = None) -> Bench:
    from loraforge.evaluate.runner import load_eval_rows
    from loraforge.lab.build import ensure_lab
    from loraforge.resolve import load_tokenizer
    from loraforge.train.training_rows import read_training_rows

    lab = ensure_lab(settings=lab_settings(lab_hidden))
    if task not in lab.tasks:
        raise SystemExit(f"unknown lab task {task!r}; the lab has {lab.tasks}")
    model_dir = str(lab.model_dir)
    tok = load_tokenizer(model_dir)
    train_path = lab.data_dir / "tasks" / f"{task}_train.jsonl"
    examples, _ = tokenize_all(tok, read_training_rows(str(train_path)), max_seq_len)
    convs, refs = load_eval_rows(lab.data_dir / "tasks" / f"{task}_eval.jsonl", 10**9)
    prompts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]
    heldout = (lab.data_dir / "general_heldout.txt").read_text(encoding="utf-8")
    return Bench(model_dir, tok, task, train_path, examples, prompts, refs, heldout, batch_size, max_seq_len, rank,
                 alpha, lab.report["settings"]["hidden_size"], lab.report["params"])


def train_spec(bench: Bench, method: str, lr: float, seed: int = 0, **extra: Any) -> TrainSpec:
    if method != "full":  # full reads no lora section (the spec refuses a changed one)
        extra.setdefault("lora", LoraSpec(r=bench.rank, alpha=bench.alpha))
    return TrainSpec(method=method, num_workers=0, batch_size=bench.batch_size, learning_rate=lr, seed=seed,
                     max_seq_len=bench.max_seq_len, data=str(bench.train_path), **extra)


def batches(bench: Bench, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """The loop's batch stream for one worker: a pure function of the seed."""
    return iter_batches(bench.examples, global_batch_size=bench.batch_size, world_rank=0, world_size=1,
                        seed=seed, pad_id=bench.tokenizer.pad_token_id)


def base_model(bench: Bench) -> nn.Module:
    from loraforge.resolve import load_model

    return load_model(bench.model_dir, dtype=torch.float32)


def build(bench: Bench, spec: TrainSpec) -> nn.Module:
    """The model to train, seeded as the loop seeds it (LoRA's random A must not depend on earlier runs)."""
    torch.manual_seed(spec.seed)
    setup = BuildSetup(batches=batches(bench, spec.seed), loss_fn=sft_loss) if spec.method == "lora_ga" else None
    return build_adapter(base_model(bench), spec, setup)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def smoothed(losses: list[float], window: int = SMOOTH) -> list[float]:
    """Trailing running mean; entry i averages losses[i - window + 1 .. i] (fewer at the start)."""
    out, total = [], 0.0
    for i, x in enumerate(losses):
        total += x
        if i >= window:
            total -= losses[i - window]
        out.append(total / min(i + 1, window))
    return out


def steps_to(losses: list[float], target: float, window: int = SMOOTH) -> int | None:
    """First step count n (1-based, n >= window) whose smoothed loss is <= target; None if never."""
    for i, s in enumerate(smoothed(losses, window)):
        if i + 1 >= window and s <= target:
            return i + 1
    return None


@dataclass
class Run:
    method: str
    lr: float
    losses: list[float] = field(default_factory=list)
    steps_to_target: int | None = None
    seconds: float = 0.0
    build_seconds: float = 0.0
    model: nn.Module | None = None

    @property
    def final(self) -> float:
        """Smoothed loss at the last step run."""
        return smoothed(self.losses)[-1] if self.losses else math.inf


def train_run(bench: Bench, method: str, lr: float, steps: int, target: float | None = None, seed: int = 0,
              keep_model: bool = False) -> Run:
    """Train `steps` steps at a constant `lr`; with `target`, stop once the smoothed loss reaches it.

    A run whose loss turns non-finite stops there (it never reaches the target)."""
    spec = train_spec(bench, method, lr, seed)
    t0 = time.perf_counter()
    model = build(bench, spec)
    run = Run(method, lr, build_seconds=time.perf_counter() - t0)
    params = trainable(model)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=spec.weight_decay)
    model.train()
    stream = batches(bench, seed)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = sft_loss(model, next(stream))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        run.losses.append(float(loss))
        if not math.isfinite(run.losses[-1]):
            break
        if target is not None and steps_to(run.losses, target) is not None:
            break
    run.seconds = time.perf_counter() - t0
    run.steps_to_target = None if target is None else steps_to(run.losses, target)
    if keep_model:
        run.model = model.eval()
    return run


def loop_agrees(bench: Bench, method: str, lr: float, workdir: Path, steps: int = 2) -> tuple[list[float], list[float]]:
    """(run_train's losses, ours) for the first `steps` steps: the loop's cosine schedule starts at the peak,
    so its first two updates use the same learning rate as a constant schedule."""
    from loraforge.context import StageContext
    from loraforge.train.trainer import run_train

    spec = train_spec(bench, method, lr, max_steps=steps, checkpoint_every=steps)
    theirs = run_train(spec, StageContext(run_dir=workdir / method, model=bench.model_dir)).losses
    ours = train_run(bench, method, lr, steps).losses
    return theirs, ours


# ---------------------------------------------------------------- scores
def accuracy(model: nn.Module, bench: Bench, max_new_tokens: int) -> float:
    """Exact match of greedy answers on the task's held-out eval split (the evaluate stage's metric)."""
    from loraforge.evaluate.metrics import exact_match, generate_greedy

    model.eval()
    return exact_match(generate_greedy(model, bench.tokenizer, bench.eval_prompts, max_new_tokens), bench.eval_refs)


def heldout_perplexity(model: nn.Module, bench: Bench, seq_len: int = 256) -> float:
    from loraforge.evaluate.metrics import perplexity

    model.eval()
    return perplexity(model, bench.tokenizer, bench.heldout_text, seq_len=seq_len)


# ---------------------------------------------------------------- memory and step time (one fresh process each)
def _proc_status() -> dict[str, int]:
    """VmRSS / VmHWM of this process in bytes (Linux)."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, `echo 5 > /proc/self/clear_refs`)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


# Settings that make the throw-away warm-up build cheap without changing which kernels run.
CHEAP_BUILD: dict[str, dict[str, Any]] = {
    "lora_ga": {"lora_ga": {"grad_batches": 1}}, "ir_qlora": {"ir_qlora": {"tau_n": 1}},
}


def run_steps(model: nn.Module, lr: float, weight_decay: float, fixed: list[dict[str, torch.Tensor]]) -> list[float]:
    """The loop's step on each batch of `fixed`; the wall time of each."""
    params = trainable(model)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.train()
    times = []
    for batch in fixed:
        t0 = time.perf_counter()
        loss = sft_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def time_steps(bench: Bench, method: str, lr: float, warmup: int, steps: int) -> dict[str, float]:
    """Mean and median wall time of `steps` training steps after `warmup` ones, on the same fixed batches."""
    spec = train_spec(bench, method, lr)
    stream = batches(bench, spec.seed)
    times = run_steps(build(bench, spec), lr, spec.weight_decay, [next(stream) for _ in range(warmup + steps)])
    times = times[warmup:]
    return {"step_time_s": sum(times) / len(times), "step_time_median_s": sorted(times)[len(times) // 2]}


def probe_method(task: str, batch_size: int, method: str, lr: float, warmup: int, steps: int, rank: int = 8,
                 alpha: float = 16.0, lab_hidden: int | None = None, threads: int = 1) -> dict[str, Any]:
    """In a fresh process: build `method` on the loaded base, run `warmup` + `steps` steps on fixed batches.

    Peak memory is the peak resident set size (VmHWM, reset via /proc/self/clear_refs) above the RSS measured
    just before the phase it covers: `peak_build_mb` over the loaded fp32 base + batches (building, including
    quantisation and lora_ga's gradient pass), `peak_steps_mb` over the built model (the training steps:
    activations, gradients, optimizer state), `peak_total_mb` the highest of both over the loaded base.
    A throw-away build and two steps of the same method run first, so the code pages and one-time
    buffers of the libraries are already resident and not counted. None where the peak cannot be reset."""
    torch.set_num_threads(threads)
    bench = load_bench(task, batch_size, rank=rank, alpha=alpha, lab_hidden=lab_hidden)
    spec = train_spec(bench, method, lr)
    stream = batches(bench, spec.seed)
    fixed = [next(stream) for _ in range(warmup + steps)]
    run_steps(build(bench, train_spec(bench, method, lr, **CHEAP_BUILD.get(method, {}))), lr, spec.weight_decay,
              fixed[:2])
    gc.collect()

    torch.manual_seed(spec.seed)
    setup = BuildSetup(batches=batches(bench, spec.seed), loss_fn=sft_loss) if method == "lora_ga" else None
    base = base_model(bench)
    gc.collect()
    before = _proc_status()["VmRSS"]
    resettable = _reset_peak_rss()
    model = build_adapter(base, spec, setup)
    del base, setup
    gc.collect()
    built = _proc_status()
    _reset_peak_rss()
    run_steps(model, lr, spec.weight_decay, fixed)
    after = _proc_status()
    mb = 1024 * 1024
    return {
        "method": method,
        "storage_bytes": storage_bytes(model),
        "trainable_params": sum(p.numel() for p in trainable(model)),
        "peak_build_mb": (built["VmHWM"] - before) / mb if resettable else None,
        "peak_steps_mb": (after["VmHWM"] - built["VmRSS"]) / mb if resettable else None,
        "peak_total_mb": (max(built["VmHWM"], after["VmHWM"]) - before) / mb if resettable else None,
        "rss_mb": after["VmRSS"] / mb,
    }


def probe_to_pipe(conn: Any, *args: Any) -> None:
    """Process target: send probe_method's result (or the error's text) back through `conn`."""
    try:
        conn.send(("ok", probe_method(*args)))
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which raises
        conn.send(("error", f"{type(err).__name__}: {err}"))
    finally:
        conn.close()
