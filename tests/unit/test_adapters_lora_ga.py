"""LoRA-GA on the lab model: gradient estimation (incl. the distributed reduction), an unchanged output at
init, and the paper's claim that the first step follows the best rank-2r approximation of the full gradient
for the official init but not for PEFT's variant."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from loraforge.adapters.lora_ga import (
    apply_lora_ga,
    default_loss,
    estimate_gradients,
    linear_names,
    lora_ga_init,
    lora_scaling,
    peft_style_lora_ga_init,
)

R, ALPHA, GAMMA = 4, 8.0, 16.0
CONVS = [
    [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}],
    [{"role": "user", "content": "Reverse: abc"}, {"role": "assistant", "content": "the reversed word is cba"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue is a colour."}],
    [{"role": "user", "content": "Count to four."}, {"role": "assistant", "content": "one two three four"}],
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see tests/conftest.py


@pytest.fixture(scope="module")
def batches(model_dir):
    from loraforge.resolve import load_tokenizer
    from loraforge.train.sft_data import collate, tokenize_conversation

    tok = load_tokenizer(model_dir)
    rows = [tokenize_conversation(tok, c, 64) for c in CONVS]
    return [collate(rows[i : i + 2], pad_id=tok.pad_token_id) for i in (0, 2)]


def _base(model_dir: str, dtype=torch.float32):
    from loraforge.resolve import load_model

    return load_model(model_dir, dtype=dtype).eval()


@pytest.fixture(scope="module")
def grads(model_dir, batches):
    return estimate_gradients(_base(model_dir), batches)


def _inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


def _peft(model, use_rslora: bool = False):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear",
                                            use_rslora=use_rslora))


def test_estimate_gradients_is_the_batch_mean_and_restores_flags(model_dir, batches, grads):
    model = _base(model_dir)
    names = linear_names(model)
    assert set(grads) == set(names) and len(names) == 7 * model.config.num_hidden_layers
    manual = {n: torch.zeros_like(g) for n, g in grads.items()}
    for b in batches:
        model.zero_grad()
        default_loss(model, b).backward()
        for n in names:
            manual[n] += model.get_submodule(n).weight.grad / len(batches)
    for n in names:
        assert torch.allclose(grads[n], manual[n], atol=1e-7, rtol=1e-5), n
    assert all(p.requires_grad for p in model.parameters())  # the estimation left the flags as it found them

    frozen = _base(model_dir).requires_grad_(False)
    estimate_gradients(frozen, batches[:1], target_names=names[:2])
    assert not any(p.requires_grad for p in frozen.parameters()) and all(p.grad is None for p in frozen.parameters())


def test_distributed_reduction_weights_every_batch_once(model_dir, batches):
    """Two simulated workers with uneven shards (2 batches and 1): sums and counts are both reduced, so the
    result is the mean over the 3 batches, not the mean of the two workers' means."""
    model = _base(model_dir)
    names = linear_names(model)[:3]
    other = [batches[1]]
    recorded: list[torch.Tensor] = []
    estimate_gradients(model, other, names, reduce=lambda t: recorded.append(t.clone()) or t)
    reduced = estimate_gradients(model, batches, names, reduce=lambda t: t + recorded.pop(0))
    assert not recorded
    expected = estimate_gradients(model, [batches[0], batches[1], batches[1]], names)
    for n in names:
        assert torch.allclose(reduced[n], expected[n], atol=1e-7, rtol=1e-5)


def test_init_math_on_one_matrix():
    """ArB2r: A = c V^T[:r], B = c U[:, r:2r], c = d_out^(1/4)/sqrt(gamma); W0 offset by -s B A.
    PEFT: B = c U[:, r:2r] diag(S[r:2r]), A = V^T[:r] unscaled."""
    g = torch.Generator().manual_seed(0)
    w, grad = torch.randn(48, 80, generator=g, dtype=torch.float64), torch.randn(48, 80, generator=g,
                                                                                   dtype=torch.float64)
    u, s, vh = torch.linalg.svd(grad, full_matrices=False)
    c2 = math.sqrt(48) / GAMMA
    a, b, new_w = lora_ga_init(w, grad, R, ALPHA, GAMMA)
    scaling = lora_scaling(R, ALPHA)
    assert a.shape == (R, 80) and b.shape == (48, R) and a.dtype == w.dtype
    eye = torch.eye(R, dtype=torch.float64)
    assert torch.allclose(a @ a.T, c2 * eye) and torch.allclose(b.T @ b, c2 * eye)
    assert torch.allclose(a.T @ a, c2 * vh[:R].T @ vh[:R])  # row space of A = top-r right singular vectors
    assert torch.allclose(b @ b.T, c2 * u[:, R : 2 * R] @ u[:, R : 2 * R].T)  # B spans u_{r+1..2r}
    assert torch.allclose(new_w + scaling * b @ a, w, atol=1e-12)

    pa, pb, p_w = peft_style_lora_ga_init(w, grad, R, ALPHA, GAMMA)
    assert torch.allclose(pa @ pa.T, torch.eye(R, dtype=torch.float64))
    assert torch.allclose(pb.T @ pb, c2 * torch.diag(s[R : 2 * R] ** 2))
    assert torch.allclose(p_w + scaling * pb @ pa, w, atol=1e-12)

    a_rs, _, _ = lora_ga_init(w, grad, R, ALPHA, GAMMA, use_rslora=True, scale="gd")
    assert torch.allclose(a_rs @ a_rs.T, torch.eye(R, dtype=torch.float64) / lora_scaling(R, ALPHA, True) ** 2)
    with pytest.raises(ValueError, match="2r"):
        lora_ga_init(w, grad, 25, ALPHA)
    with pytest.raises(ValueError, match="shapes"):
        lora_ga_init(w, grad.T, R, ALPHA)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_at_init_equals_the_base_model(model_dir, batches, grads, dtype):
    base = _base(model_dir, dtype)
    with torch.no_grad():
        before = base(**_inputs(batches[0])).logits
    model = _peft(base)
    done = apply_lora_ga(model, grads, GAMMA)
    assert len(done) == len(grads)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_B["default"].weight.abs().max() > 0  # a real, non-zero adapter at init
    with torch.no_grad():
        after = model(**_inputs(batches[0])).logits
    diff = float((after - before).abs().max())
    scale = float(before.abs().max())
    print(f"{dtype}: max |logit diff| at init {diff:.2e} (max |logit| {scale:.1f})")
    # float32: the offset W0 - sBA is rounded to fp32, so equality holds to fp32 rounding of the logits
    assert diff <= (1e-10 if dtype == torch.float64 else 2e-6 * scale)


def _first_step_cosines(model_dir, batches, grads, init, lr: float = 1e-4) -> torch.Tensor:
    """Cosine between each layer's weight change after one plain-SGD step and the best rank-2r approximation
    of -G. SGD because the paper's claim is about the gradient of the low-rank product: Adam's first step is
    an elementwise sign-like normalisation that no longer keeps the update in the span of U, V."""
    model = _peft(_base(model_dir))
    apply_lora_ga(model, grads, GAMMA, init=init)
    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules()
              if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}

    def delta(m):
        return m.scaling["default"] * (m.lora_B["default"].weight.double() @ m.lora_A["default"].weight.double())

    before = {n: delta(m).detach() for n, m in layers.items()}
    loss = sum(default_loss(model, b) for b in batches) / len(batches)  # same data as the estimate
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p -= lr * p.grad
    cos = []
    for n, m in layers.items():
        u, s, vh = torch.linalg.svd(grads[n].double(), full_matrices=False)
        best = -(u[:, : 2 * R] * s[: 2 * R]) @ vh[: 2 * R]
        cos.append(F.cosine_similarity((delta(m).detach() - before[n]).flatten(), best.flatten(), dim=0))
    return torch.stack(cos)


def test_first_step_follows_the_rank_2r_gradient_for_ours_not_for_peft(model_dir, batches, grads):
    ours = _first_step_cosines(model_dir, batches, grads, lora_ga_init)
    peft_style = _first_step_cosines(model_dir, batches, grads, peft_style_lora_ga_init)
    print(f"first-step cosine with the rank-2r gradient over {ours.numel()} layers: "
          f"official min {ours.min():.6f} mean {ours.mean():.6f}; "
          f"PEFT-style min {peft_style.min():.4f} mean {peft_style.mean():.4f}")
    assert ours.min() > 0.99
    assert peft_style.mean() < ours.mean() - 0.02
    assert peft_style.min() < 0.95


def test_trained_adapter_converts_to_plain_lora_for_the_original_base(model_dir, batches, grads, tmp_path):
    """PEFT's conversion (B' = [B | B0], A' = [A ; -A0], rank 2r) makes the LoRA-GA adapter loadable on the
    unmodified base model, which is what evaluate and serve load."""
    from peft import PeftModel

    model = _peft(_base(model_dir))
    apply_lora_ga(model, grads, GAMMA)
    model.save_pretrained(str(tmp_path / "init"))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for b in batches:
        default_loss(model, b).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        trained = model(**_inputs(batches[0])).logits
    model.save_pretrained(str(tmp_path / "final"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    loaded = PeftModel.from_pretrained(_base(model_dir), str(tmp_path / "final"))
    assert loaded.peft_config["default"].r == 2 * R
    with torch.no_grad():
        reloaded = loaded(**_inputs(batches[0])).logits
    assert torch.allclose(reloaded, trained, atol=2e-6 * float(trained.abs().max()), rtol=0)
    assert not torch.allclose(reloaded, _base(model_dir)(**_inputs(batches[0])).logits, atol=1e-3)


def test_missing_gradient_is_named(model_dir, grads):
    model = _peft(_base(model_dir))
    partial = dict(list(grads.items())[1:])
    with pytest.raises(ValueError, match="no gradient"):
        apply_lora_ga(model, partial)
