"""The evaluate stage: task accuracy and held-out perplexity, before and after the adapter.

The forgetting delta is after.perplexity - before.perplexity on general text the model was
pretrained on but never saw: a positive delta means fine-tuning cost general ability.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraforge.context import StageContext
from loraforge.errors import DataError
from loraforge.evaluate.metrics import exact_match, generate_greedy, perplexity
from loraforge.spec import LAB_MODEL, EvaluateSpec


@dataclass
class EvalResult:
    before: dict[str, float]
    after: dict[str, float]
    samples: dict[str, list[dict[str, str]]] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, float]:
        out = {f"before.{k}": v for k, v in self.before.items()}
        out |= {f"after.{k}": v for k, v in self.after.items()}
        if "perplexity" in self.before and "perplexity" in self.after:
            out["forgetting.perplexity_delta"] = self.after["perplexity"] - self.before["perplexity"]
        return out


def task_name(path: Path) -> str:
    stem = path.stem
    return stem[: -len("_eval")] if stem.endswith("_eval") else stem


def default_task_refs(model_ref: str) -> list[str]:
    """With the lab model and no tasks named, evaluate every lab task's held-out split."""
    if model_ref != LAB_MODEL:
        return []
    from loraforge.lab.build import ensure_lab

    return [f"lab://tasks/{t}_eval.jsonl" for t in ensure_lab().tasks]


def load_eval_rows(path: Path, limit: int) -> tuple[list[list[dict[str, str]]], list[str]]:
    """Prompts (conversation up to the last assistant turn) and the reference answers."""
    from loraforge.data.io import read_conversations

    prompts, refs = [], []
    for conv in read_conversations(path)[:limit]:
        if not conv or conv[-1]["role"] != "assistant":
            raise DataError(f"{path}: every eval row must end with an assistant answer")
        prompts.append(conv[:-1])
        refs.append(conv[-1]["content"])
    if not refs:
        raise DataError(f"{path}: no evaluation rows")
    return prompts, refs


def _score(model, tokenizer, tasks: dict[str, tuple[list, list[str]]], text: str | None, spec: EvaluateSpec,
           samples: dict[str, list[dict[str, str]]] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, (convs, refs) in tasks.items():
        prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]
        preds = generate_greedy(model, tokenizer, prompts, spec.max_new_tokens)
        out[f"accuracy.{name}"] = exact_match(preds, refs)
        if samples is not None:
            samples[name] = [
                {"prompt": c[-1]["content"], "reference": r, "prediction": p}
                for c, r, p in list(zip(convs, refs, preds, strict=True))[:5]
            ]
    if text:
        seq_len = min(256, int(getattr(model.config, "max_position_embeddings", 256)))
        out["perplexity"] = perplexity(model, tokenizer, text, seq_len=seq_len)
    return out


def evaluate_adapter(spec_dict: dict[str, Any], model_path: str, adapter_dir: str | None,
                     task_paths: dict[str, str], general_text: str | None) -> dict[str, Any]:
    """Runs where the model lives (a Ray task in the pipeline): returns before/after metrics."""
    import torch
    from peft import PeftModel

    from loraforge.resolve import load_model, load_tokenizer

    torch.manual_seed(0)
    spec = EvaluateSpec.model_validate(spec_dict)
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path).eval()
    tasks = {n: load_eval_rows(Path(p), spec.max_examples) for n, p in task_paths.items()}
    text = general_text[: spec.perplexity_max_chars] if general_text else None
    before = _score(model, tokenizer, tasks, text, spec, None)
    after: dict[str, float] = {}
    samples: dict[str, list[dict[str, str]]] = {}
    if adapter_dir:
        from loraforge.adapters import QUANTISED_METHODS, load_tuned, read_method_file

        if read_method_file(adapter_dir)["method"] in QUANTISED_METHODS:
            # The model that was trained: its base quantised again exactly as in training.
            tuned = load_tuned(model_path, adapter_dir).eval()
        else:
            tuned = PeftModel.from_pretrained(model, adapter_dir).eval()
        after = _score(tuned, tokenizer, tasks, text, spec, samples)
    return {"before": before, "after": after, "samples": samples}


def run_evaluate(spec: EvaluateSpec, ctx: StageContext, adapter_dir: Path | None = None) -> EvalResult:
    from loraforge.resolve import resolve_data, resolve_model

    model_ref = spec.model or ctx.model_ref or ctx.model
    model_path = resolve_model(model_ref)
    is_lab = model_ref == LAB_MODEL
    adapter = spec.adapter or (str(adapter_dir) if adapter_dir else None)
    if adapter and not (Path(adapter) / "adapter_config.json").is_file():
        raise DataError(f"adapter folder {adapter} has no adapter_config.json")
    refs = spec.tasks or (default_task_refs(model_ref) if is_lab else [])
    if not refs:
        raise DataError("evaluate.tasks is empty: name eval JSONL files (only the lab model has defaults)")
    task_paths = {task_name(p): str(p) for p in map(resolve_data, refs)}
    text_ref = spec.general_text or ("lab://general_heldout.txt" if is_lab else None)
    general_text = resolve_data(text_ref).read_text() if text_ref else None

    raw = _run_remote(evaluate_adapter, spec.model_dump(), model_path, adapter, task_paths, general_text)
    result = EvalResult(raw["before"], raw["after"], raw["samples"])
    out = ctx.stage_dir("evaluate") / "eval.json"
    out.write_text(json.dumps({"metrics": result.metrics, **raw}, indent=2))
    if ctx.run:
        ctx.run.log_params({"adapter": adapter, "task_files": ",".join(task_paths.values()), **spec.model_dump()})
        ctx.run.log_metrics(result.metrics)
        ctx.run.log_artifact(out, "evaluate")
    return result


def _run_remote(fn, *args):
    """Run on the cluster when Ray is up (the stage is a Ray program), in-process otherwise."""
    import ray

    if not ray.is_initialized():
        return fn(*args)
    return ray.get(ray.remote(num_cpus=1)(fn).remote(*args))
