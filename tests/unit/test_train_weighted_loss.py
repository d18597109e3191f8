"""Per-token loss weights (token cleaning) in the SFT loss: a weighted mean over the global batch,
checked against the plain formula, on gradients, and across a simulated 2-rank split (no Ray)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from loraforge.errors import DataError
from loraforge.train.loop import _with_global_denominator, global_denominator
from loraforge.train.objectives import LOSS_DENOMINATOR, predicted_label_count, predicted_label_weight, sft_loss
from loraforge.train.sft_data import (
    IGNORE_INDEX,
    LOSS_WEIGHTS,
    TokenizedExample,
    collate,
    predicted_label_positions,
    tokenize_all,
    tokenize_conversation,
)
from loraforge.train.training_rows import TrainingRow

CONVS = [
    [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}],
    [{"role": "user", "content": "Reverse: abc"}, {"role": "assistant", "content": "the reversed word is cba"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "hello"},
     {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "goodbye then"}],
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see tests/conftest.py


@pytest.fixture(scope="module")
def tok(lab):
    from loraforge.resolve import load_tokenizer

    return load_tokenizer(str(lab.model_dir))


@pytest.fixture(scope="module")
def model(lab):
    from loraforge.resolve import load_model

    return load_model(str(lab.model_dir), dtype=torch.float32).eval()


def _n_predicted(tok, conv) -> int:
    return len(predicted_label_positions(tokenize_conversation(tok, conv, 256).labels))


def _weights(tok, seed: int) -> list[list[float]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 2, (_n_predicted(tok, c),), generator=g).float().tolist() for c in CONVS]


def _batch(tok, weights=None):
    exs = [tokenize_conversation(tok, c, 256, None if weights is None else weights[i]) for i, c in enumerate(CONVS)]
    return collate(exs, pad_id=tok.pad_token_id)


def _plain_weighted_mean(model, batch, weights) -> torch.Tensor:
    """sum_k w_k * CE_k / sum_k w_k over every predicted label token k, row by row, no padding."""
    total, norm = torch.zeros(()), 0.0
    for row in range(batch["input_ids"].size(0)):
        n = int(batch["attention_mask"][row].sum())
        ids, labels = batch["input_ids"][row, :n], batch["labels"][row, :n]
        logits = model(input_ids=ids[None]).logits[0]
        ce = F.cross_entropy(logits[:-1], ids[1:], reduction="none")
        for k, j in enumerate(predicted_label_positions(labels.tolist())):
            total = total + weights[row][k] * ce[j - 1]
            norm += weights[row][k]
    return total / norm


# ---------------------------------------------------------------- the loss
def test_all_ones_weights_equal_the_unweighted_loss(tok, model):
    plain = _batch(tok)
    ones = _batch(tok, [[1.0] * _n_predicted(tok, c) for c in CONVS])
    assert LOSS_WEIGHTS not in plain and LOSS_WEIGHTS in ones
    with torch.no_grad():
        assert torch.allclose(sft_loss(model, ones), sft_loss(model, plain), rtol=1e-6)
    assert predicted_label_weight(ones) == predicted_label_count(plain).float()


def test_weighted_loss_is_the_weighted_token_mean(tok, model):
    weights = _weights(tok, seed=1)
    assert any(0.0 in w for w in weights) and any(1.0 in w for w in weights)
    batch = _batch(tok, weights)
    with torch.no_grad():
        ours = sft_loss(model, batch)
        want = _plain_weighted_mean(model, batch, weights)
        unweighted = sft_loss(model, _batch(tok))
    assert torch.allclose(ours, want, rtol=1e-5)
    assert not torch.allclose(ours, unweighted, rtol=1e-3)
    # Fractional weights too: the loss is a weighted mean, not a masked one.
    halves = [[0.5 + 0.25 * (k % 3) for k in range(len(w))] for w in weights]
    with torch.no_grad():
        assert torch.allclose(sft_loss(model, _batch(tok, halves)), _plain_weighted_mean(model, _batch(tok), halves),
                              rtol=1e-5)


def test_zero_weight_tokens_get_no_gradient():
    """With a leaf tensor as the logits, d loss / d logits is zero exactly at zero-weight positions."""
    torch.manual_seed(0)
    ex = TokenizedExample([3, 4, 5, 6, 7, 8], [IGNORE_INDEX, 4, 5, 6, 7, 8], None)
    weighted = tokenize_like(ex, [1.0, 0.0, 1.0, 0.0, 1.0])  # one weight per predicted label (positions 1..5)
    batch = collate([weighted], pad_id=0)
    logits = torch.randn(1, 6, 11, requires_grad=True)
    fake = lambda **_: SimpleNamespace(logits=logits)  # noqa: E731
    sft_loss(fake, batch).backward()
    # logits at position j-1 predict token j: tokens 2 and 4 carry weight 0, so logits 1 and 3 get no gradient.
    per_position = logits.grad[0].abs().sum(-1)
    assert per_position[1] == 0 and per_position[3] == 0 and per_position[5] == 0  # last predicts nothing
    assert all(per_position[p] > 0 for p in (0, 2, 4))
    # The surviving tokens' gradient is that of their own unweighted mean (3 tokens, denominator 3).
    expected = torch.zeros_like(logits)
    kept = torch.tensor([0, 2, 4])
    ref = logits.detach().clone().requires_grad_(True)
    F.cross_entropy(ref[0, kept], torch.tensor([4, 6, 8])).backward()
    expected[0, kept] = ref.grad[0, kept]
    assert torch.allclose(logits.grad, expected, atol=1e-7)


def tokenize_like(ex: TokenizedExample, weights: list[float]) -> TokenizedExample:
    from loraforge.train.sft_data import spread_weights

    return TokenizedExample(ex.input_ids, ex.labels, spread_weights(ex.labels, weights, False, 64))


def test_zero_weight_rows_get_no_gradient_in_a_real_model(tok, lab):
    """A row whose weights are all 0 contributes nothing: gradients equal those of the other rows alone."""
    from loraforge.adapters import build_adapter
    from loraforge.resolve import load_model
    from loraforge.spec import LoraSpec, TrainSpec

    def grads(batch):
        torch.manual_seed(0)
        m = build_adapter(load_model(str(lab.model_dir), dtype=torch.float32),
                          TrainSpec(lora=LoraSpec(r=2, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"])))
        for p in m.parameters():  # non-zero B so A's gradient is non-zero too
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.02)
        m.eval()
        sft_loss(m, batch).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}

    w = [[1.0] * _n_predicted(tok, CONVS[0]), [0.0] * _n_predicted(tok, CONVS[1]), [1.0] * _n_predicted(tok, CONVS[2])]
    with_zero_row = grads(_batch(tok, w))
    exs = [tokenize_conversation(tok, CONVS[i], 256) for i in (0, 2)]
    without = grads(collate(exs, pad_id=tok.pad_token_id))
    assert with_zero_row.keys() == without.keys()
    assert all(torch.allclose(with_zero_row[n], without[n], atol=1e-6) for n in without)
    assert any(g.abs().sum() > 0 for g in without.values())


# ---------------------------------------------------------------- the global denominator
def test_two_rank_denominator_gives_the_global_weighted_mean(tok, model):
    """Each 'rank' divides its weighted sum by global_denominator; the ranks' mean (what DDP's gradient
    averaging computes) equals the whole batch's weighted mean, however unevenly the weight falls."""
    weights = _weights(tok, seed=2)
    batch = _batch(tok, weights)
    ranks = [{k: v[:1] for k, v in batch.items()}, {k: v[1:] for k, v in batch.items()}]
    local = [predicted_label_weight(r) for r in ranks]
    assert local[0] != local[1]
    denominator = global_denominator(local, world_size=2)
    assert torch.isclose(denominator * 2, predicted_label_weight(batch))
    with torch.no_grad():
        per_rank = [sft_loss(model, {**r, LOSS_DENOMINATOR: denominator}) for r in ranks]
        naive = [sft_loss(model, r) for r in ranks]
        whole = _plain_weighted_mean(model, batch, weights)
    assert torch.allclose((per_rank[0] + per_rank[1]) / 2, whole, rtol=1e-5)
    assert not torch.allclose((naive[0] + naive[1]) / 2, whole, rtol=1e-3)


def test_loop_denominator_single_process_and_unweighted_unchanged(tok):
    plain = _batch(tok)
    out = _with_global_denominator(plain, world_size=1)
    assert LOSS_WEIGHTS not in out
    assert out[LOSS_DENOMINATOR] == predicted_label_count(plain).float()  # exactly the old denominator
    weights = _weights(tok, seed=3)
    assert _with_global_denominator(_batch(tok, weights), 1)[LOSS_DENOMINATOR] == sum(map(sum, weights))
    zero = _batch(tok, [[0.0] * len(w) for w in weights])
    assert _with_global_denominator(zero, 1)[LOSS_DENOMINATOR] == 1.0  # nothing to learn: loss 0, not NaN


# ---------------------------------------------------------------- alignment errors
def test_weights_must_cover_every_label_token(tok):
    conv = CONVS[1]
    n = _n_predicted(tok, conv)
    with pytest.raises(DataError, match=rf"{n - 1} loss weights for {n} predicted label tokens"):
        tokenize_conversation(tok, conv, 256, [1.0] * (n - 1))
    with pytest.raises(DataError, match="different tokenizer"):
        tokenize_conversation(tok, conv, 256, [1.0] * (n + 1))  # not truncated: must match exactly
    cut = tokenize_conversation(tok, conv, 16, [float(k) for k in range(n)])  # truncated: trailing ones dropped
    kept = predicted_label_positions(cut.labels)
    assert 0 < len(kept) < n and [cut.weights[j] for j in kept] == [float(k) for k in range(len(kept))]
    with pytest.raises(DataError, match="finite number"):
        tokenize_conversation(tok, conv, 256, [-1.0] * n)
    with pytest.raises(DataError, match=r"row s:9: 1 loss weights"):
        tokenize_all(tok, [TrainingRow(conv, [1.0], id="s:9")], 256)


def test_mixed_batch_weighs_unweighted_rows_one():
    a = TokenizedExample([5, 6, 7], [IGNORE_INDEX, 6, 7], [0.0, 0.0, 1.0])
    b = TokenizedExample([8, 9], [8, 9])
    batch = collate([a, b], pad_id=0)
    assert batch[LOSS_WEIGHTS].tolist() == [[0.0, 0.0, 1.0], [1.0, 1.0, 0.0]]
    assert predicted_label_weight(batch) == 2.0  # row a: token 7; row b: token 9 (token 8 is never predicted)
