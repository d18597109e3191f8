"""The batched runner against PEFT: every row of a mixed-adapter ragged batch (prefill and decode chunks together,
requests joining and leaving) must give the logits PEFT gives for that adapter alone on the full sequence."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lab_adapters import make_adapter_zoo, make_random_adapter
from method_batches import fp32_base, perturbed_method_folder, task_batches
from peft import LoraConfig, PeftModel, get_peft_model

from loraforge.adapters import load_tuned
from loraforge.errors import ModelError
from loraforge.serve.engine.adapter_weights import AdapterWeights, LoraModule, read_adapter
from loraforge.serve.engine.multi_lora import POOL_MAX_RANK, BaseShapes, MultiLora, RankPool
from loraforge.serve.engine.runner import ModelRunner, SeqChunk

ATOL = 1e-4
BASE = "base"


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see tests/conftest.py


def _perturbed_adapter(model_dir: str, out: Path, cfg: LoraConfig) -> Path:
    """A PEFT adapter with every trainable tensor (LoRA factors, modules_to_save copies) moved off its init."""
    torch.manual_seed(11)
    model = get_peft_model(fp32_base(model_dir), cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def folders(model_dir, tmp_path_factory) -> dict[str, Path]:
    """Eight zoo adapters (ranks 2, 4, 8, 16, rsLoRA, mixed targets), DoRA, embedding/head/norm adapter."""
    root = tmp_path_factory.mktemp("adapters")
    zoo = make_adapter_zoo(Path(model_dir), root, 8)
    zoo["dora"] = make_random_adapter(Path(model_dir), root / "dora", seed=7, rank=8, use_dora=True, b_scale=0.3,
                                      targets=("q_proj", "v_proj", "o_proj", "down_proj"))
    # Embedding and tied-head LoRA, saved norms; saved (modules_to_save) embedding and linear layers.
    zoo["emb"] = _perturbed_adapter(model_dir, root / "emb", LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens", "lm_head"], init_lora_weights=False,
        modules_to_save=["model.norm", "post_attention_layernorm"]))
    zoo["saved"] = _perturbed_adapter(model_dir, root / "saved", LoraConfig(
        r=2, lora_alpha=4, target_modules=["v_proj"], init_lora_weights=False,
        modules_to_save=["embed_tokens", "o_proj"]))
    return zoo


@pytest.fixture(scope="module")
def base(model_dir):
    return fp32_base(model_dir)


@pytest.fixture(scope="module")
def weights(folders, base) -> dict[str, AdapterWeights]:
    return {name: read_adapter(name, folder, base) for name, folder in folders.items()}


def _reference(model_dir: str, folder: Path | None, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), vocab]: PEFT with this adapter alone (or the plain HF model), one full-sequence forward."""
    model = fp32_base(model_dir)
    if folder is not None:
        model = PeftModel.from_pretrained(model, str(folder)).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0]


class _Request:
    def __init__(self, model: str, tokens: list[int], reference: torch.Tensor):
        self.model, self.tokens, self.reference = model, tokens, reference
        self.slot: int | None = None
        self.done = 0  # tokens already run


def _check(runner: ModelRunner, weights: dict[str, AdapterWeights], step: list[tuple[_Request, int]]) -> float:
    """Run one forward of (request, tokens to run now) chunks; return the largest logit error against PEFT."""
    chunks = []
    for req, n in step:
        if req.slot is None:
            req.slot = runner.alloc()
        chunks.append(SeqChunk(req.slot, req.tokens[req.done : req.done + n], req.done, weights.get(req.model)))
    logits = runner.forward(chunks)
    assert logits.shape == (len(step), runner.vocab_size)
    errors = []
    for row, (req, n) in zip(logits, step, strict=True):
        req.done += n
        errors.append(float((row - req.reference[req.done - 1]).abs().max()))
    return max(errors)


@pytest.fixture(scope="module")
def requests(model_dir, folders) -> dict[str, _Request]:
    """One request per adapter plus two on the base model, prompts of different lengths, and their references."""
    gen = torch.Generator().manual_seed(0)
    names = [*folders, BASE, BASE]
    out = {}
    for i, name in enumerate(names):
        tokens = torch.randint(3, 2000, (6 + 3 * (i % 4) + 6,), generator=gen).tolist()  # prompt + 6 "sampled"
        out[f"{name}#{i}"] = _Request(name, tokens, _reference(model_dir, folders.get(name), tokens))
    return out


@pytest.mark.parametrize("grouped_mm", [True, False], ids=["grouped_mm", "padded_bmm"])
def test_mixed_batch_with_joins_and_slot_reuse_matches_peft_per_row(grouped_mm, base, weights, requests):
    runner = ModelRunner(base, max_slots=16, max_len=64)
    runner.lora.grouped_mm = grouped_mm
    reqs = [_Request(r.model, r.tokens, r.reference) for r in requests.values()]
    first, later, last = reqs[:6], reqs[6:-1], reqs[-1]
    prompt = lambda r: len(r.tokens) - 6  # noqa: E731
    errors = [_check(runner, weights, [(r, prompt(r)) for r in first])]  # prefill only
    # Decode rows of the first wave and the prompts of every other request in one forward (joining mid-decode);
    # one prompt is split in two chunks, so the second chunk attends to the cache causally.
    errors.append(_check(runner, weights, [(r, 1) for r in first] + [(r, prompt(r)) for r in later]
                         + [(last, 3)]))
    errors.append(_check(runner, weights, [(r, 1) for r in first + later] + [(last, prompt(last) - 3)]))
    for _ in range(3):
        errors.append(_check(runner, weights, [(r, 1) for r in reqs]))
    # The first request leaves; a new request on another adapter takes its slot (no old K/V may leak in).
    gone = reqs[0]
    runner.free(gone.slot)
    newcomer = _Request(reqs[3].model, reqs[3].tokens, reqs[3].reference)
    errors.append(_check(runner, weights, [(newcomer, prompt(newcomer))] + [(r, 1) for r in reqs[1:]]))
    assert newcomer.slot == gone.slot
    # Two decode rows with far-apart slots: attention gathers their slots instead of reading a slot range.
    errors.append(_check(runner, weights, [(newcomer, 1), (last, 1)]))
    assert max(errors) < ATOL, errors
    assert len({r.model for r in reqs}) == 12  # 8 zoo adapters, DoRA, embedding/norm, saved layers, base


def test_base_rows_equal_the_plain_hf_model(base, requests):
    runner = ModelRunner(base, max_slots=4, max_len=64)
    reqs = [_Request(r.model, r.tokens, r.reference) for r in requests.values() if r.model == BASE]
    assert _check(runner, {}, [(r, len(r.tokens) - 1) for r in reqs]) < ATOL
    assert _check(runner, {}, [(r, 1) for r in reqs]) < ATOL


def test_freed_slot_and_reused_pool_position_forget_the_old_request(base, weights, requests):
    """Two slots and two rank-8 pool positions: a request taking over a freed slot and pool position must see
    neither the old K/V nor the old adapter's weights (a02 targets every linear layer, the DoRA adapter only four,
    and a06 beside it keeps the other layers' pooled update running)."""
    runner = ModelRunner(base, max_slots=2, max_len=64)
    by_model = {r.model: r for r in requests.values()}
    old, stay = (_Request(m, by_model[m].tokens, by_model[m].reference) for m in ("a02", "a06"))
    assert _check(runner, weights, [(old, len(old.tokens)), (stay, 4)]) < ATOL
    runner.free(old.slot)
    new = _Request("dora", by_model["dora"].tokens, by_model["dora"].reference)
    errors = [_check(runner, weights, [(new, 2), (stay, 1)])]
    errors += [_check(runner, weights, [(new, 1), (stay, 1)]) for _ in range(2)]
    assert new.slot == old.slot and max(errors) < ATOL, errors
    (pool,) = runner.lora.pools.values()
    assert pool.capacity == 2 and set(pool.occupant) == {(m, weights[m].content_hash) for m in ("dora", "a06")}


def test_unchanged_adapter_set_copies_nothing_and_replaced_content_gets_new_weights(base, weights, requests,
                                                                                     monkeypatch):
    writes: list[str] = []
    original = RankPool._write
    monkeypatch.setattr(RankPool, "_write", lambda self, pos, a: (writes.append(a.name), original(self, pos, a))[1])
    runner = ModelRunner(base, max_slots=16, max_len=64)
    reqs = [_Request(r.model, r.tokens, r.reference) for r in requests.values()]
    _check(runner, weights, [(r, 4) for r in reqs])
    placed = len(writes)
    assert placed == len(weights)  # every adapter in this batch is pooled (all ranks <= POOL_MAX_RANK)
    for _ in range(2):
        assert _check(runner, weights, [(r, 1) for r in reqs]) < ATOL
    assert len(writes) == placed
    # Same name, new content: it must take a fresh pool entry, never the stale one.
    name = reqs[0].model
    changed = AdapterWeights(name=name, content_hash="other", rank=weights[name].rank,
                             modules={p: LoraModule(m.a, 2 * m.b) for p, m in weights[name].modules.items()},
                             embeddings={}, replaced={}, nbytes=0)
    runner.forward([SeqChunk(reqs[0].slot, [5], reqs[0].done, changed)])
    assert writes[-1] == name and len(writes) == placed + 1


def _random_adapter(name: str, shapes: BaseShapes, ranks: dict[str, int], gen: torch.Generator) -> AdapterWeights:
    modules = {p: LoraModule(torch.randn(r, shapes.linears[p][0], generator=gen),
                             torch.randn(shapes.linears[p][1], r, generator=gen)) for p, r in ranks.items()}
    return AdapterWeights(name, name, max(ranks.values()), modules, {}, {}, 0)


@pytest.mark.parametrize("counts", [[1] * 12, [3] * 6, [40, 1, 1, 7, 1, 2], [25]],
                         ids=["decode", "uniform", "ragged", "single"])
@pytest.mark.parametrize("grouped_mm", [True, False], ids=["grouped_mm", "padded_bmm"])
def test_lora_rows_add_each_rows_own_update(counts, grouped_mm, base):
    """LoraRows.linear against B @ A x row by row, for per-module ranks in several pools and above the pool limit."""
    gen = torch.Generator().manual_seed(1)
    shapes = BaseShapes.of(base, {})
    path = "model.layers.1.mlp.up_proj"
    other = "model.layers.1.mlp.down_proj"
    ranks = [1, 2, 3, 8, 16, POOL_MAX_RANK + 8]
    adapters = [_random_adapter(f"x{i}", shapes, {path: r, other: 2 * r} if i % 2 else {path: r}, gen)
                for i, r in enumerate(ranks[: len(counts)])]
    chosen: list[AdapterWeights | None] = [adapters[i % len(adapters)] for i in range(len(counts))]
    if len(counts) > 2:
        chosen[1] = None  # a base row among them
    lora = MultiLora(shapes, max_adapters=8, dtype=torch.float32, device=torch.device("cpu"))
    lora.grouped_mm = grouped_mm
    batch = lora.prepare(chosen, counts)
    ordered = [(chosen[i], counts[i]) for i in batch.order]
    d_in, d_out = shapes.linears[path]
    x = torch.randn(sum(counts), d_in, generator=gen)
    expected = torch.zeros(x.shape[0], d_out)
    row = 0
    for a, n in ordered:
        if a is not None:
            m = a.modules[path]
            expected[row : row + n] = x[row : row + n] @ (m.b @ m.a).T
        row += n
    got = batch.rows.linear(path, x, torch.zeros(x.shape[0], d_out), None)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-5)


def test_full_and_lora_ga_folders_match_load_tuned(model_dir, lab, base, weights, requests, tmp_path):
    """Issue-4 folders: `full` (full-rank LoRA on every linear, embedding and tied head, saved norms) runs outside
    the pools; `lora_ga` (rank 2r) inside; both in one batch with a zoo adapter."""
    batches = task_batches(model_dir, sorted(lab.tasks)[-1])
    folders = {m: perturbed_method_folder(model_dir, m, batches, tmp_path) for m in ("full", "lora_ga")}
    tuned = {m: read_adapter(m, f, base) for m, f in folders.items()}
    assert tuned["full"].rank > POOL_MAX_RANK and tuned["full"].embeddings and tuned["full"].replaced
    zoo = next(r for r in requests.values() if r.model == "a03")
    reqs = [_Request("a03", zoo.tokens, zoo.reference)]
    for method, folder in folders.items():
        model = load_tuned(model_dir, folder).eval()
        with torch.no_grad():
            reqs.append(_Request(method, zoo.tokens, model(torch.tensor([zoo.tokens])).logits[0]))
    runner = ModelRunner(base, max_slots=4, max_len=64)
    all_weights = {**weights, **tuned}
    errors = [_check(runner, all_weights, [(r, 8) for r in reqs])]
    errors += [_check(runner, all_weights, [(r, 1) for r in reqs]) for _ in range(3)]
    assert max(errors) < ATOL, errors


def test_refuses_models_and_adapters_it_cannot_run(base, weights):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(ModelError, match="'gpt2'"):
        ModelRunner(gpt2, 2, 16)
    runner = ModelRunner(base, 2, 16)
    slot = runner.alloc()
    for param, value in (("model.rotary_emb.inv_freq", base.model.rotary_emb.inv_freq),
                         ("model.norm.weight", torch.ones(7))):
        bad = AdapterWeights("bad", param, 1, {}, {}, {param: value}, 0)
        with pytest.raises(ModelError, match=param):
            runner.forward([SeqChunk(slot, [1, 2], 0, bad)])
    wrong = AdapterWeights("wrong", "h", 2, {"model.layers.0.self_attn.q_proj": LoraModule(torch.zeros(2, 7),
                                                                                          torch.zeros(128, 2))},
                           {}, {}, 0)
    with pytest.raises(ModelError, match="q_proj"):
        runner.forward([SeqChunk(slot, [1, 2], 0, wrong)])
    with pytest.raises(ValueError, match="cached"):
        runner.forward([SeqChunk(slot, [1], 3, None)])
    with pytest.raises(ValueError, match="max_len"):
        runner.forward([SeqChunk(slot, list(range(17)), 0, None)])


def test_qwen2_attention_biases_and_grouped_kv_heads_match_peft(tmp_path):
    """Qwen2's q/k/v carry biases (DoRA rescales around them) and share KV heads; a tiny random one."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    def model():
        torch.manual_seed(3)
        config = Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        qwen = Qwen2ForCausalLM(config).eval()
        with torch.no_grad():
            for layer in qwen.model.layers:  # HF initialises biases to zero, which would hide a wrong formula
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
        return qwen

    torch.manual_seed(4)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "down_proj"], init_lora_weights=False,
                     use_dora=True)
    peft_model = get_peft_model(model(), cfg)
    with torch.no_grad():  # untrained DoRA magnitudes equal the weight norms: move them so the rescale matters
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.randn_like(p))
    peft_model.save_pretrained(str(tmp_path / "dora"))
    base = model()
    assert base.model.layers[0].self_attn.q_proj.bias is not None
    tokens = torch.randint(0, 96, (10,), generator=torch.Generator().manual_seed(5)).tolist()
    with torch.no_grad():
        plain = base(torch.tensor([tokens])).logits[0]
        tuned = PeftModel.from_pretrained(model(), str(tmp_path / "dora")).eval()(torch.tensor([tokens])).logits[0]
    dora = read_adapter("dora", tmp_path / "dora", base)
    runner = ModelRunner(base, max_slots=2, max_len=32)
    reqs = [_Request("dora", tokens, tuned), _Request(BASE, tokens, plain)]
    errors = [_check(runner, {"dora": dora}, [(r, 7) for r in reqs])]
    errors += [_check(runner, {"dora": dora}, [(r, 1) for r in reqs]) for _ in range(3)]
    assert max(errors) < ATOL, errors
