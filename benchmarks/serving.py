"""Multi-LoRA serving throughput: our engine against PEFT's mixed-adapter batches and adapter switching.

    LORAFORGE_HOME=.loraforge/test python benchmarks/serving.py [--quick] [--layers 4] [--new-tokens 24]

(LORAFORGE_HOME: any home whose lab is built; its tokenizer is used.) About 4 minutes on 2 cores; --quick (only
1 and 32 adapters, rank 8, 16 new tokens) about a minute. Model and adapters live in a temporary folder.

The model is the lab tokenizer's Llama with random weights, hidden 1024, intermediate 2816, 16 heads over 4 KV
heads (head_dim 64), `--layers` layers, tied embeddings (about 47M parameters at 4 layers): large enough that a
batch-32 decode step is matrix multiplication (a few ms of Python against tens of ms of matmul on this CPU),
small enough that switching adapters group by group finishes in the time budget. Adapters are PEFT folders of
rank 8 or 16 on every linear layer of every decoder layer (q, k, v, o, gate, up, down), random A and B.

For each adapter count n in 1, 8, 32, 64 and each rank, max(32, n) requests (request i on adapter i mod n; batch
32, so 64 adapters run as two waves of 32), the same prompts (12-24 tokens of lab text) and exactly
`--new-tokens` greedy tokens each (ignore_eos / min_new_tokens), timed from submit to the last token:
  engine       loraforge.serve.engine.Engine (continuous batching, every adapter in one batched forward)
  peft_mixed   PEFT generate(..., adapter_names=[...]) on batches of 32
  peft_switch  PEFT set_adapter per adapter, generate on that adapter's requests as one batch
  base         the same requests on the base model through our engine (the ceiling), run alternately with
               the engine's, best of --repeats each; HF generate on the base model is printed for reference.
Tokens/s counts generated tokens. The LoRA FLOP overhead is 2 r (d_in + d_out) over all targets against 2 d_in
d_out over all linear layers and the output head, per token (attention scores excluded: they are the same
for every system); next to it, the adapter weight bytes a decode step reads on top of the base weights.

The last line printed is one JSON object for 32 adapters at rank 8; RESULTS.md gets a section (unless
--no-results).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
from results_md import write_section  # noqa: E402

SECTION = "## Multi-LoRA serving (issue 5)"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BATCH = 32


# ---------------------------------------------------------------- setup
def build_model(out: Path, layers: int, hidden: int, intermediate: int) -> Path:
    """A random-weight Llama with the lab tokenizer, saved as an HF folder the engine and PEFT both load."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraforge.lab.build import ensure_lab
    from loraforge.resolve import load_tokenizer

    tok = load_tokenizer(str(ensure_lab().model_dir))
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out


def make_adapters(model_dir: Path, out: Path, rank: int, count: int) -> dict[str, Path]:
    """`count` PEFT folders: one written by PEFT, the rest the same keys and config with their own random
    weights (creating each through PEFT would take minutes on the 47M-parameter model)."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    template = out / f"r{rank}_00"
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(TARGETS), init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config).save_pretrained(str(template))
    keys = load_file(str(template / "adapter_model.safetensors"))
    folders = {template.name: template}
    gen = torch.Generator().manual_seed(rank)
    for i in range(1, count):
        folder = out / f"r{rank}_{i:02d}"
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_bytes((template / "adapter_config.json").read_bytes())
        tensors = {k: torch.randn(v.shape, generator=gen) * (0.02 if "lora_A" in k else 0.01) for k, v in keys.items()}
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        folders[folder.name] = folder
    return folders


def make_prompts(tok, count: int) -> list[list[int]]:
    """`count` prompts of 12-24 tokens cut from the lab's held-out text."""
    from loraforge.lab.build import ensure_lab

    ids = tok((ensure_lab().data_dir / "general_heldout.txt").read_text()[:200_000])["input_ids"]
    prompts, at = [], 0
    for i in range(count):
        n = 12 + (7 * i) % 13
        prompts.append([tok.bos_token_id, *ids[at : at + n - 1]])
        at += n
    return prompts


def lora_share(config, rank: int) -> float:
    """One adapter's parameters over the base's linear-layer and head parameters. Per token that is the LoRA
    FLOP overhead (2 r (d_in + d_out) against 2 d_in d_out per layer); per decode step every adapter present
    in the batch is read once, so it is also the extra weight bytes per step for each adapter present."""
    h, inter, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * config.head_dim
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]
    base = config.num_hidden_layers * sum(i * o for i, o in shapes) + h * config.vocab_size
    lora = config.num_hidden_layers * sum(rank * (i + o) for i, o in shapes)
    return lora / base


# ---------------------------------------------------------------- the systems
Outputs = list[list[int]]  # generated token ids per request, in request order


def run_engine(engine, prompts: list[list[int]], models: list[str], new_tokens: int) -> tuple[float, Outputs]:
    """Tokens/s: every request submitted at once, the engine batches them (32 at a time)."""
    from loraforge.serve.engine import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    streams = [engine.submit(p, m, params) for p, m in zip(prompts, models, strict=True)]
    outputs = [[t for delta in stream for t in delta.token_ids] for stream in streams]
    seconds = time.perf_counter() - start
    assert all(len(o) == new_tokens for o in outputs), [len(o) for o in outputs]
    return len(outputs) * new_tokens / seconds, outputs


def _left_padded(prompts: list[list[int]], pad: int) -> dict[str, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return {"input_ids": ids, "attention_mask": mask}


def _generate(model, prompts: list[list[int]], new_tokens: int, pad: int, **kwargs) -> Outputs:
    width = max(len(p) for p in prompts)
    with torch.inference_mode():
        out = model.generate(**_left_padded(prompts, pad), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=pad, **kwargs)
    assert out.shape[1] - width == new_tokens, out.shape
    return out[:, width:].tolist()


def run_peft_mixed(peft, prompts: list[list[int]], models: list[str], new_tokens: int,
                   pad: int) -> tuple[float, Outputs]:
    start, outputs = time.perf_counter(), []
    for i in range(0, len(prompts), BATCH):
        outputs += _generate(peft, prompts[i : i + BATCH], new_tokens, pad, adapter_names=models[i : i + BATCH])
    return len(outputs) * new_tokens / (time.perf_counter() - start), outputs


def run_peft_switch(peft, prompts: list[list[int]], models: list[str], new_tokens: int, pad: int) -> float:
    groups: dict[str, list[list[int]]] = {}
    for p, m in zip(prompts, models, strict=True):
        groups.setdefault(m, []).append(p)
    start, tokens = time.perf_counter(), 0
    for name, group in groups.items():
        peft.set_adapter(name)
        tokens += len(group) * new_tokens
        _generate(peft, group, new_tokens, pad)
    return tokens / (time.perf_counter() - start)


def run_hf(model, prompts: list[list[int]], new_tokens: int, pad: int) -> float:
    start, tokens = time.perf_counter(), 0
    for i in range(0, len(prompts), BATCH):
        tokens += len(_generate(model, prompts[i : i + BATCH], new_tokens, pad)) * new_tokens
    return tokens / (time.perf_counter() - start)


def agreement(a: Outputs, b: Outputs) -> float:
    """Share of requests whose greedy tokens are identical (random weights give near-tied logits, so float
    summation order may flip a rare one)."""
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


# ---------------------------------------------------------------- main
def main(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="serving-bench-"))
    try:
        return measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from peft import PeftModel

    from loraforge.resolve import load_model, load_tokenizer
    from loraforge.serve.engine import Engine

    torch.set_num_threads(args.threads)
    counts = [1, 32] if args.quick else [1, 8, 32, 64]
    ranks = [8] if args.quick else [8, 16]
    new_tokens = args.new_tokens or (16 if args.quick else 24)
    t0 = time.perf_counter()
    model_dir = build_model(work / "model", args.layers, 1024, 2816)
    folders = {r: make_adapters(model_dir, work / "adapters", r, max(counts)) for r in ranks}
    tok = load_tokenizer(str(model_dir))
    prompts = make_prompts(tok, max(BATCH, max(counts)))
    served = {name: folder for by_rank in folders.values() for name, folder in by_rank.items()}

    engine = Engine(str(model_dir), served, max_batch_size=BATCH, pinned=list(served),
                    max_len=max(map(len, prompts)) + new_tokens)
    try:
        # One PeftModel per rank: PEFT's load_adapter slows down with every adapter already loaded.
        pefts = {}
        for rank, by_name in folders.items():
            (first, folder), *rest = by_name.items()
            pefts[rank] = PeftModel.from_pretrained(load_model(str(model_dir)).eval(), str(folder), adapter_name=first)
            for name, folder in rest:
                pefts[rank].load_adapter(str(folder), adapter_name=name)
        plain = load_model(str(model_dir)).eval()
        config = plain.config
        print(f"setup {time.perf_counter() - t0:.0f} s: {sum(p.numel() for p in plain.parameters()) / 1e6:.0f}M "
              f"parameters, {len(served)} adapters, {new_tokens} new tokens per request, {args.threads} threads",
              flush=True)
        systems = Systems(engine, pefts, plain, tok.pad_token_id, new_tokens)
        systems.warm_up(prompts[:BATCH], ranks[0], list(folders[ranks[0]]))
        hf_base = run_hf(plain, prompts[:BATCH], new_tokens, tok.pad_token_id)
        print(f"HF generate, base model: {hf_base:.0f} tok/s", flush=True)
        rows = []
        for rank in ranks:
            for n in counts:
                requests, started = max(BATCH, n), time.perf_counter()
                models = [list(folders[rank])[i % n] for i in range(requests)]
                row = {"adapters": n, "rank": rank, "requests": requests, "flop_overhead": lora_share(config, rank),
                       "bytes_overhead": min(n, BATCH) * lora_share(config, rank),
                       **systems.case(prompts[:requests], rank, models, args.repeats)}
                row["seconds"] = time.perf_counter() - started
                rows.append(row)
                print_row(row)
    finally:
        engine.close()
    elapsed = time.perf_counter() - t0
    if not args.no_results:
        write_results(rows, hf_base, args, config, new_tokens, elapsed)
    key = next(r for r in rows if r["adapters"] == 32 and r["rank"] == 8)
    return {
        "adapters": 32, "rank": 8,
        "tokens_per_s": {"engine": round(key["engine"], 1), "peft_mixed": round(key["peft_mixed"], 1),
                         "peft_switch": round(key["peft_switch"], 1), "base": round(key["base"], 1)},
        "vs_peft_switch": round(key["engine"] / key["peft_switch"], 2),
        "vs_peft_mixed": round(key["engine"] / key["peft_mixed"], 2),
        "vs_base": round(key["engine"] / key["base"], 2),
        "flop_overhead": round(key["flop_overhead"], 4),
    }


@dataclass
class Systems:
    engine: Any
    pefts: dict[int, Any]  # rank -> PeftModel holding that rank's adapters
    plain: Any
    pad: int
    new_tokens: int

    def warm_up(self, prompts: list[list[int]], rank: int, adapters: list[str]) -> None:
        """First calls allocate caches and pick kernels (a full batch, every adapter placed): keep them out of
        the timings."""
        models = [adapters[i % len(adapters)] for i in range(len(prompts))]
        run_engine(self.engine, prompts, models, 2)
        run_engine(self.engine, prompts, [self.engine.base_name] * len(prompts), 2)
        run_peft_mixed(self.pefts[rank], prompts, models, 2, self.pad)
        run_hf(self.plain, prompts, 2, self.pad)

    def case(self, prompts: list[list[int]], rank: int, models: list[str], repeats: int) -> dict[str, float]:
        """Tokens/s of every system on these requests; the engine and its base ceiling alternate, best of
        `repeats` each, so both see the same machine load."""
        n = self.new_tokens
        out = {"engine": 0.0, "base": 0.0}
        for _ in range(repeats):
            rate, ours = run_engine(self.engine, prompts, models, n)
            out["engine"] = max(out["engine"], rate)
            out["base"] = max(out["base"], run_engine(self.engine, prompts, [self.engine.base_name] * len(models),
                                                      n)[0])
        out["peft_mixed"], theirs = run_peft_mixed(self.pefts[rank], prompts, models, n, self.pad)
        out["peft_switch"] = run_peft_switch(self.pefts[rank], prompts, models, n, self.pad)
        out["agreement"] = agreement(ours, theirs)
        return out


def print_row(r: dict[str, Any]) -> None:
    print(f"rank {r['rank']:2d}, {r['adapters']:2d} adapters: engine {r['engine']:.0f}, PEFT mixed "
          f"{r['peft_mixed']:.0f}, PEFT switching {r['peft_switch']:.0f}, base {r['base']:.0f} tok/s; engine/base "
          f"{r['engine'] / r['base']:.2f} (LoRA FLOPs +{100 * r['flop_overhead']:.1f}%, adapter bytes per decode step "
          f"+{100 * r['bytes_overhead']:.0f}%); same tokens as PEFT: {100 * r['agreement']:.0f}% of requests "
          f"[{r['seconds']:.0f} s]", flush=True)


def write_results(rows: list[dict[str, Any]], hf_base: float, args: argparse.Namespace, config,
                  new_tokens: int, elapsed: float) -> None:
    command = "LORAFORGE_HOME=.loraforge/test python benchmarks/serving.py" + (" --quick" if args.quick else "")
    body = [
        SECTION, "",
        f"`{command}` ({elapsed:.0f} s, {args.threads} threads). Random-weight Llama with the lab tokenizer: "
        f"hidden {config.hidden_size}, intermediate {config.intermediate_size}, {config.num_hidden_layers} layers, "
        f"16 heads over 4 KV heads; adapters on all 7 linear layers per decoder layer. Batch 32 "
        f"(max(32, adapters) requests, request i on adapter i mod n), prompts of 12-24 tokens, exactly {new_tokens} "
        "greedy tokens per request, timed from submit to the last token (prefill included). Base = the same "
        "requests on the base model through our engine, measured alternately with the engine run (best of "
        f"{args.repeats} each); HF generate on the base model: {hf_base:.0f} tokens/s.", "",
        "| rank | adapters | engine | PEFT mixed | PEFT switching | engine / mixed | engine / switching "
        "| base | engine / base | LoRA FLOP overhead | LoRA bytes per decode step | same tokens as PEFT |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        body.append(f"| {r['rank']} | {r['adapters']} | {r['engine']:.0f} | {r['peft_mixed']:.0f} | "
                    f"{r['peft_switch']:.0f} | {r['engine'] / r['peft_mixed']:.2f}x | "
                    f"{r['engine'] / r['peft_switch']:.2f}x | {r['base']:.0f} | {r['engine'] / r['base']:.2f} | "
                    f"{100 * r['flop_overhead']:.1f}% | +{100 * r['bytes_overhead']:.0f}% | "
                    f"{100 * r['agreement']:.0f}% |")
    body += ["", "LoRA FLOP overhead: one adapter's FLOPs per token over the base's. LoRA bytes per decode step: every "
             "adapter in the batch (up to 32) has its A and B read once per step, against one read of the base "
             "weights. The 1- and 32-adapter rows of one rank have the same FLOPs and 32x the adapter bytes: the "
             "difference between their engine / base ratios is the cost of those bytes. Same tokens as PEFT: requests "
             "whose greedy tokens from the engine equal PEFT mixed's (random weights give near-tied logits, so a "
             "different float summation order can flip one).",
             "", "Targets at 32 adapters: >= 3x PEFT switching, >= 1.3x PEFT mixed, >= 0.7x base.", ""]
    write_section(SECTION, body)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 and 32 adapters, rank 8, 16 new tokens")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=None, help="per request (default 24, --quick 16)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="engine and base runs per case (best of)")
    ap.add_argument("--no-results", action="store_true", help="do not update RESULTS.md")
    print(json.dumps(main(ap.parse_args())))
