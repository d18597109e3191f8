"""IR-QLoRA: ICQ's entropy-maximising tau per block on the lab model's real weights, and IEC's elastic
connections (exactly QLoRA at zero, output unchanged at init, gradients reach the scalars, mergeable)."""

from __future__ import annotations

import pytest
import torch

from loraforge.adapters.ir_qlora import (
    ICQ_SIGMA,
    ICQLinear,
    IECLoRALinear,
    code_entropy,
    group_average,
    group_repeat,
    icq_factors,
    icq_quantize,
    nf4_block_codes,
    nf4_entropy,
    replace_with_ir_qlora,
)
from loraforge.adapters.nf4 import NF4Linear, largest_code_gap, quantize_nf4

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see tests/conftest.py


@pytest.fixture(scope="module")
def lab_weights(lab) -> dict[str, torch.Tensor]:
    from loraforge.resolve import load_model

    model = load_model(str(lab.model_dir), dtype=torch.float32)
    return {n: m.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")}


@pytest.fixture(scope="module")
def icq_results(lab_weights):
    """ICQ of every linear weight of the lab model, computed once (the official 201-point grid)."""
    return {n: icq_quantize(w) for n, w in lab_weights.items()}


def test_code_entropy_in_bits():
    uniform = torch.arange(16).repeat(4)[None]  # every code 4 times in a 64-block
    single = torch.zeros(1, 64, dtype=torch.long)
    halves = torch.cat([torch.zeros(32), torch.full((32,), 5)]).long()[None]
    h = code_entropy(torch.cat([uniform, single, halves]))
    assert torch.allclose(h, torch.tensor([4.0, 0.0, 1.0]))


def test_search_grid_is_the_official_one():
    f = icq_factors(0.1, 100)
    assert f.numel() == 201 and f[0] == 0  # the median start is tried first
    assert ICQ_SIGMA == pytest.approx(1 / 1.8481, rel=1e-3)  # 1 / Phi^-1(0.9677083)
    assert float(f.max()) == pytest.approx(0.1 * ICQ_SIGMA) and float(f.min()) == pytest.approx(-0.1 * ICQ_SIGMA)
    assert torch.allclose(torch.sort(f).values, -torch.sort(-f).values.flip(0))  # symmetric
    assert torch.all(f[1:].abs() >= f[:-1].abs())  # ordered by distance from the median


def test_every_block_entropy_at_least_the_median_start(lab_weights, icq_results):
    improved, total = 0, 0
    for name, w in lab_weights.items():
        q, tau, h = icq_results[name]
        blocks = w.reshape(-1, 64)
        median = blocks.median(dim=1).values
        h_median = code_entropy(nf4_block_codes(blocks - median[:, None]))
        assert torch.all(h >= h_median - 1e-6), name
        # the stored codes are the codes of w - tau, and tau stays within the searched range
        assert torch.allclose(h, code_entropy(nf4_block_codes(blocks - tau[:, None])))
        spread = (blocks - median[:, None]).abs().amax(1)
        assert torch.all((tau - median).abs() <= 0.1 * ICQ_SIGMA * spread * (1 + 1e-5) + 1e-9)
        improved += int((h > h_median + 1e-6).sum())
        total += h.numel()
    print(f"ICQ: {improved}/{total} blocks strictly above their median-start entropy")
    assert improved > total / 2


def test_average_entropy_beats_plain_nf4_on_the_lab_model(lab_weights, icq_results):
    h_nf4 = torch.cat([nf4_entropy(w) for w in lab_weights.values()]).mean()
    h_icq = torch.cat([icq_results[n][2] for n in lab_weights]).mean()
    n = sum(w.numel() for w in lab_weights.values())
    mse_nf4 = sum(float(((quantize_nf4(w).dequantize() - w) ** 2).sum()) for w in lab_weights.values()) / n
    mse_icq = sum(float(((icq_results[k][0].dequantize() - w) ** 2).sum()) for k, w in lab_weights.items()) / n
    print(f"mean code entropy: NF4 {h_nf4:.4f} bits, ICQ {h_icq:.4f} bits; "
          f"reconstruction MSE: NF4 {mse_nf4:.4e}, ICQ {mse_icq:.4e}")
    assert h_icq > h_nf4 + 0.03
    # ICQ maximises information, not squared error: its MSE stays close to plain NF4's.
    assert mse_icq < 1.05 * mse_nf4


def test_icq_storage_dequantises_close_and_stays_small(lab_weights, icq_results):
    name = next(iter(lab_weights))
    w = lab_weights[name]
    q, tau, _ = icq_results[name]
    exact_tau, _, _ = icq_quantize(w, quantize_tau=False)
    assert torch.equal(exact_tau.taus(), tau)
    assert torch.equal(exact_tau.nf4.codes(), q.nf4.codes())
    tau_err = (q.taus() - tau).abs().max()
    assert tau_err <= 0.01 * tau.abs().max()  # 8-bit dynamic map per 256 taus
    err = (q.dequantize() - w).abs().reshape(-1, 64)
    absmax = (w.reshape(-1, 64) - tau[:, None]).abs().amax(1)  # NF4 bound on w - tau, plus the tau error
    nf4_bound = largest_code_gap() / 2 * absmax + (absmax - q.nf4.block_absmax()).abs() + tau_err + 1e-7
    assert torch.all(err.amax(1) <= nf4_bound)
    assert q.nbytes() / (w.numel() * 4) < 1 / 3
    layer = ICQLinear(q)
    x = torch.randn(2, w.shape[1])
    assert torch.equal(layer(x), torch.nn.functional.linear(x, q.dequantize()))
    assert layer.weight_bytes() == q.nbytes()


def test_group_average_and_repeat_match_the_official_reshapes():
    x = torch.randn(2, 3, 12)
    # official: x.reshape(..., r, -1).mean(-1)
    assert torch.equal(group_average(x, 4), x.reshape(2, 3, 4, 3).mean(-1))
    z, b_out = torch.randn(2, 3, 4), torch.randn(2, 3, 8)
    # official: (B(z).reshape(..., r, -1) + s * z.unsqueeze(-1)).reshape(..., -1)
    official = (b_out.reshape(2, 3, 4, 2) + 0.7 * z.unsqueeze(-1)).reshape(2, 3, 8)
    assert torch.allclose(b_out + 0.7 * group_repeat(z, 8), official)


def _layers(w: torch.Tensor, r: int = 4, alpha: float = 8.0):
    base = NF4Linear(quantize_nf4(w))
    torch.manual_seed(0)
    iec = IECLoRALinear(base, r=r, alpha=alpha)
    return base, iec


def test_iec_at_zero_is_plain_qlora_and_init_is_the_quantised_base():
    from peft import LoraConfig, get_peft_model

    w = torch.randn(64, 128) * 0.05
    base, iec = _layers(w)
    x = torch.randn(5, 7, 128)
    with torch.no_grad():
        assert torch.equal(iec(x), base(x))  # B = 0 and both IEC scalars 0
        iec.lora_B.normal_()  # a trained-looking B, scalars still 0
    assert iec.lora_iec_scale_a.item() == 0 and iec.lora_iec_scale_b.item() == 0

    # plain QLoRA = PEFT LoRA over an nn.Linear holding the same dequantised base weight
    holder = torch.nn.Sequential()
    holder.add_module("proj", torch.nn.Linear(128, 64, bias=False))
    with torch.no_grad():
        holder.proj.weight.copy_(base.dequantized_weight())
    qlora = get_peft_model(holder, LoraConfig(r=4, lora_alpha=8.0, target_modules=["proj"]))
    lora = qlora.base_model.model.proj
    with torch.no_grad():
        lora.lora_A["default"].weight.copy_(iec.lora_A)
        lora.lora_B["default"].weight.copy_(iec.lora_B)
        assert torch.equal(iec(x), qlora(x))
        iec.lora_iec_scale_b.fill_(0.3)
        assert not torch.allclose(iec(x), qlora(x))


def test_gradients_reach_the_iec_scalars():
    """At init B = 0, so only beta (B's shortcut) gets a gradient; alpha's path runs through B + beta R, which
    is zero until the first step moves B or beta. After one SGD step both scalars receive gradient."""
    w = torch.randn(64, 128) * 0.05
    _, iec = _layers(w)
    x, target = torch.randn(16, 128), torch.randn(16, 64)
    loss = ((iec(x) - target) ** 2).mean()
    loss.backward()
    assert iec.lora_iec_scale_b.grad.abs().item() > 0
    assert iec.lora_iec_scale_a.grad.item() == 0.0
    assert iec.lora_A.grad.abs().max() == 0 and iec.lora_B.grad.abs().max() > 0
    with torch.no_grad():
        for p in iec.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
                p.grad = None
    ((iec(x) - target) ** 2).mean().backward()
    assert iec.lora_iec_scale_a.grad.abs().item() > 0 and iec.lora_iec_scale_b.grad.abs().item() > 0
    assert sorted(n for n, p in iec.named_parameters() if p.requires_grad) == [
        "lora_A", "lora_B", "lora_iec_scale_a", "lora_iec_scale_b"]


def test_iec_update_is_linear_and_merges_into_the_weight():
    w = torch.randn(64, 128) * 0.05
    base, iec = _layers(w, r=8, alpha=16.0)
    with torch.no_grad():
        iec.lora_B.normal_(std=0.1)
        iec.lora_iec_scale_a.fill_(0.4)
        iec.lora_iec_scale_b.fill_(-0.25)
        x = torch.randn(9, 128)
        merged = torch.nn.functional.linear(x, base.dequantized_weight() + iec.delta_weight())
        assert torch.allclose(iec(x), merged, atol=1e-5, rtol=1e-5)
        a_eff, b_eff = iec.effective_factors()  # the same update as a plain rank-r LoRA
        assert a_eff.shape == (8, 128) and b_eff.shape == (64, 8)
        assert torch.allclose(iec.lora_delta(x), iec.scaling * x @ a_eff.T @ b_eff.T, atol=1e-5, rtol=1e-5)


def test_iec_over_a_dense_weight_and_bad_rank_is_named():
    w = torch.randn(64, 128)
    iec = IECLoRALinear(w, r=4, alpha=8.0, bias=torch.ones(64))
    x = torch.randn(3, 128)
    with torch.no_grad():
        assert torch.allclose(iec(x), x @ w.T + 1, atol=1e-5)
    assert not iec.base.weight.requires_grad
    with pytest.raises(ValueError, match="dividing"):
        IECLoRALinear(torch.randn(64, 100), r=8, alpha=16.0)
    with pytest.raises(ValueError, match="divisible"):
        icq_quantize(torch.randn(10, 10))


def test_ir_qlora_lab_model_starts_at_the_quantised_base(lab, icq_results):
    from loraforge.resolve import load_model

    model = load_model(str(lab.model_dir), dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    layers = replace_with_ir_qlora(model, r=4, alpha=8.0, quantized={n: q for n, (q, _, _) in icq_results.items()})
    assert set(layers) == set(icq_results)
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "lora_iec_scale_a", "lora_iec_scale_b"}
    with torch.no_grad():
        out = model(input_ids=ids).logits
        for n, layer in layers.items():  # swap the bare quantised bases back in: the reference model
            base = layer.base
            parent, _, child = n.rpartition(".")
            setattr(model.get_submodule(parent), child, base)
        assert torch.equal(out, model(input_ids=ids).logits)
