"""Build (once) and cache the lab: world data, tokenizer and a tiny pretrained Llama.

The cache folder is named by a hash of every setting that shapes the result (tokenizer, model,
pretraining) and of the generated world's content, so changing any of them rebuilds. Builds
happen in a temp folder that is renamed into place, under an fcntl lock, so concurrent callers (Ray
workers, parallel tests) build once and never see a half-written lab.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loraforge.paths import lab_dir, shared_data_dir

LAB_FORMAT = 1  # bump when the meaning of the cache folder changes without a settings change
_KEYS: dict[tuple[Any, str], str] = {}


@dataclass(frozen=True)
class LabSettings:
    seed: int = 0
    vocab_size: int = 2048
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 1024
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 1000
    learning_rate: float = 6e-3
    warmup_steps: int = 20
    weight_decay: float = 0.1
    # shares of each pretraining batch: synthetic facts, chat-formatted examples; the rest is real text
    fact_fraction: float = 0.25
    chat_fraction: float = 0.55
    log_every: int = 100


@dataclass
class LabPaths:
    root: Path
    model_dir: Path
    data_dir: Path
    tasks: list[str]
    report: dict[str, Any] = field(default_factory=dict)


def lab_key(settings: LabSettings = LabSettings()) -> str:
    """Hash of the settings, the generated world's content and the tokenizer's specials/template.

    Hashing the data (cheap: the world generates in well under a second) instead of source files means
    reformatting code does not rebuild, while any change to what the lab contains does.
    """
    from loraforge.lab.tokenizer import SPECIAL_TOKENS
    from loraforge.lab.world import chat_template, generate_world

    cache_key = (settings, str(shared_data_dir(required=False)))
    if cache_key in _KEYS:  # ensure_lab is called often (every lab:// reference); generate once per process
        return _KEYS[cache_key]
    world = generate_world(settings.seed)
    h = hashlib.sha256()
    h.update(json.dumps({"format": LAB_FORMAT, **asdict(settings)}, sort_keys=True).encode())
    h.update(json.dumps([SPECIAL_TOKENS, chat_template()]).encode())
    h.update(world.general_train.encode())
    h.update(world.general_heldout.encode())
    h.update(json.dumps([world.tasks, world.format_rows], sort_keys=True).encode())
    _KEYS[cache_key] = h.hexdigest()[:12]
    return _KEYS[cache_key]


def ensure_lab(force: bool = False, settings: LabSettings = LabSettings()) -> LabPaths:
    """Return the cached lab, building it first if it is missing (or if `force`)."""
    root = lab_dir() / lab_key(settings)
    if not force and _is_complete(root):
        return _paths(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(root.parent / f"{root.name}.lock"):
        if not force and _is_complete(root):  # another process built it while we waited
            return _paths(root)
        for stale in root.parent.glob(f".tmp-{root.name}-*"):  # left by a builder that died holding the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root.parent / f".tmp-{root.name}-{os.getpid()}"
        _build(tmp, settings)
        if root.exists():
            old = root.parent / f".old-{root.name}-{os.getpid()}"
            root.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(root)
    return _paths(root)


def lab_build_cli(force: bool = False) -> dict[str, Any]:
    """What `loraforge lab build` runs: build or reuse, print where things are and how good the model is."""
    lab = ensure_lab(force=force)
    r = lab.report
    print(f"lab:    {lab.root}")
    print(f"model:  {lab.model_dir}  ({r['params']:,} parameters)")
    print(f"data:   {lab.data_dir}  (tasks: {', '.join(lab.tasks)})")
    print(
        f"held-out perplexity: {r['perplexity_init']:.1f} (random init) -> {r['perplexity_pretrained']:.2f} "
        f"(pretrained), vocab {r['vocab_size']}; built in {r['build_seconds']:.0f} s"
    )
    print(f"knowledge recall (capital facts, greedy): {r['knowledge_recall']:.2f}")
    return {
        "root": str(lab.root),
        "model_dir": str(lab.model_dir),
        "data_dir": str(lab.data_dir),
        "tasks": lab.tasks,
        "report": r,
    }


def _is_complete(root: Path) -> bool:
    return (root / "report.json").is_file()


def _paths(root: Path) -> LabPaths:
    report = json.loads((root / "report.json").read_text())
    return LabPaths(
        root=root, model_dir=root / "model", data_dir=root / "data", tasks=list(report["tasks"]), report=report
    )


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _log(msg: str) -> None:
    print(f"[lab] {msg}", flush=True)


def _build(out: Path, s: LabSettings) -> None:
    import torch

    from loraforge.lab.tokenizer import train_tokenizer
    from loraforge.lab.world import alpaca_to_messages, generate_world, knowledge_probe, write_lab_data

    start = time.time()
    data_dir, model_dir = out / "data", out / "model"
    world = generate_world(s.seed)
    write_lab_data(data_dir, world)
    task_texts = [json.dumps(r) for splits in world.tasks.values() for rows in splits.values() for r in rows]
    tok = train_tokenizer([world.general_train, *task_texts, *map(json.dumps, world.format_rows)], s.vocab_size)
    _log(f"world + tokenizer ready in {time.time() - start:.1f} s (vocab {len(tok)})")

    threads_before = torch.get_num_threads()
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(s.seed)
        model = _new_model(s, tok)
        general = _encode_docs(tok, world.general_train.split("\n\n"))
        facts = _encode_docs(tok, world.fact_docs)
        real = _encode_docs(tok, world.real_docs) if world.real_docs else facts
        heldout = _encode_docs(tok, world.general_heldout.split("\n\n"))
        chats = [tok.apply_chat_template(alpaca_to_messages(r), tokenize=False) for r in world.format_rows]
        chat_stream = _encode_docs(tok, chats, sep=None)
        ppl_init = perplexity(model, heldout, s.seq_len)
        _log(f"{_n_params(model):,} parameters; held-out perplexity at init {ppl_init:.1f}")
        n_facts = round(s.batch_size * s.fact_fraction)
        n_chat = round(s.batch_size * s.chat_fraction)
        sources = [
            (facts, _starts(facts, s.seq_len), n_facts),
            (
                chat_stream,
                _starts(chat_stream, s.seq_len, (chat_stream == tok.bos_token_id).nonzero().flatten()),
                n_chat,
            ),
            (real, _starts(real, s.seq_len), s.batch_size - n_facts - n_chat),
        ]
        t_train = time.time()
        losses = _pretrain(model, sources, s)
        train_seconds = time.time() - t_train
        ppl_final = perplexity(model, heldout, s.seq_len)
        recall = knowledge_recall(model, tok, knowledge_probe(world))
        _log(f"held-out perplexity {ppl_init:.1f} -> {ppl_final:.2f}; knowledge recall {recall:.2f}")
    finally:
        torch.set_num_threads(threads_before)

    model_dir.mkdir(parents=True)
    model.save_pretrained(str(model_dir), safe_serialization=True)
    tok.save_pretrained(str(model_dir))
    report = {
        "key": out.name.split("-")[1],
        "settings": asdict(s),
        "tasks": sorted(world.tasks),
        "task_sizes": {t: {k: len(v) for k, v in sp.items()} for t, sp in world.tasks.items()},
        "params": _n_params(model),
        "vocab_size": len(tok),
        "perplexity_init": ppl_init,
        "perplexity_pretrained": ppl_final,
        "knowledge_recall": recall,
        "heldout_tokens": int(heldout.numel()),
        "general_train_tokens": int(general.numel()),
        "loss_curve": losses,
        "notes": world.notes,
        "threads": threads,
        "pretrain_seconds": train_seconds,
        "build_seconds": time.time() - start,
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    _log(f"built in {report['build_seconds']:.0f} s")


def _new_model(s: LabSettings, tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_layers,
        num_attention_heads=s.num_heads,
        num_key_value_heads=s.num_heads,
        max_position_embeddings=s.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        rope_theta=10000.0,
    )
    return LlamaForCausalLM(config)


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _encode_docs(tok, docs: list[str], sep: str | None = "\n\n"):
    """One long token stream; docs are encoded separately (fast, and no warning about length)."""
    import torch

    ids: list[int] = []
    backend = tok.backend_tokenizer
    sep_ids = backend.encode(sep, add_special_tokens=False).ids if sep else []
    for enc in backend.encode_batch(docs, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.extend(sep_ids)
    return torch.tensor(ids, dtype=torch.long)


def perplexity(model, stream, seq_len: int, max_windows: int = 64) -> float:
    """Mean next-token perplexity over non-overlapping windows of the token stream."""
    import torch

    n = min(max_windows, (stream.numel() - 1) // seq_len)
    windows = stream[: n * seq_len].view(n, seq_len)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in windows.split(16):
            out = model(input_ids=batch, labels=batch)
            tokens = batch.numel() - batch.shape[0]
            total += out.loss.item() * tokens
            count += tokens
    return math.exp(total / count)


def _starts(stream, seq_len: int, candidates=None):
    """Offsets where a training window may start (chat windows start at a conversation's bos)."""
    import torch

    if candidates is None:
        candidates = torch.arange(stream.numel())
    return candidates[candidates < stream.numel() - seq_len]


def knowledge_recall(model, tok, probes: list[dict[str, str]]) -> float:
    """Share of plain-text fact prompts ("The capital of X is") the model completes correctly (greedy)."""
    import torch

    model.eval()
    hits = 0
    with torch.no_grad():
        for p in probes:
            ids = torch.tensor([tok(p["prompt"], add_special_tokens=False)["input_ids"]])
            n_new = len(tok(" " + p["answer"], add_special_tokens=False)["input_ids"])
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n_new,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
            hits += tok.decode(out[0, ids.shape[1] :]).strip() == p["answer"]
    return hits / max(1, len(probes))


def _pretrain(model, sources, s: LabSettings) -> list[list[float]]:
    """Causal-LM training; every batch mixes windows from each (stream, start offsets, count) source."""
    import torch

    gen = torch.Generator().manual_seed(s.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=s.learning_rate,
        betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:
        if step < s.warmup_steps:
            return s.learning_rate * (step + 1) / s.warmup_steps
        progress = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
        return s.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    model.train()
    losses: list[list[float]] = []
    threads = _ThreadChooser()
    t0 = time.time()
    for step in range(s.steps):
        threads.before_step(step)
        windows = []
        for stream, starts, count in sources:
            for i in torch.randint(0, starts.numel(), (count,), generator=gen).tolist():
                o = int(starts[i])
                windows.append(stream[o : o + s.seq_len])
        batch = torch.stack(windows)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        threads.after_step(step)
        if step % s.log_every == 0 or step == s.steps - 1:
            losses.append([step, round(loss.item(), 4)])
            _log(
                f"pretrain step {step + 1}/{s.steps} loss {loss.item():.3f} "
                f"({time.time() - t0:.0f} s, {torch.get_num_threads()} threads)"
            )
    model.eval()
    return losses


class _ThreadChooser:
    """Re-pick the intra-op thread count every `period` steps by timing a few steps with each choice.

    On an idle machine all cores are fastest; when other processes keep the cores busy, threads that
    wait for each other at every small op make a step many times slower than one thread does.
    """

    def __init__(self, period: int = 100, probe: int = 5):
        import torch

        self.options = sorted({1, os.cpu_count() or 1}, reverse=True)
        self.period, self.probe = period, probe
        self.timings: dict[int, float] = {}
        self.torch = torch
        self._t = 0.0

    def _probing(self, step: int) -> int | None:
        i = (step % self.period) // self.probe
        return self.options[i] if i < len(self.options) else None

    def before_step(self, step: int) -> None:
        if step % self.period == 0:
            self.timings = {}
        n = self._probing(step)
        if n is None and self.timings:
            n = min(self.timings, key=self.timings.__getitem__)
        if n is not None and n != self.torch.get_num_threads():
            self.torch.set_num_threads(n)
        self._t = time.perf_counter()

    def after_step(self, step: int) -> None:
        n = self._probing(step)
        if n is not None and step % self.probe:  # skip each probe's first step (warm-up)
            self.timings[n] = self.timings.get(n, 0.0) + time.perf_counter() - self._t
