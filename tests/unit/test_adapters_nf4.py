"""NF4 with double quantisation in plain torch: the codebook, the per-block error bound the codebook implies,
exact zeros, agreement with bitsandbytes on CPU and the memory of a quantised lab model."""

from __future__ import annotations

import pytest
import torch

from loraforge.adapters.nf4 import (
    DYNAMIC_8BIT_CODE,
    NF4_CODE,
    NF4Linear,
    dequantize_nf4,
    largest_code_gap,
    nf4_bytes,
    quantize_linears,
    quantize_nf4,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see tests/conftest.py


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(256, 512, generator=g) * 0.02
    heavy = torch.distributions.StudentT(3.0).sample((128, 256)) * 0.01
    outliers = torch.randn(64, 640, generator=g) * 0.02
    outliers.view(-1)[::997] *= 40  # a few large values, as in LLM weights
    ragged = torch.randn(3, 70, generator=g)  # 210 values: the last block is short
    return {"normal": normal, "student_t": heavy, "outliers": outliers, "ragged": ragged}


def test_codebook_is_the_qlora_normal_float_with_exact_zero():
    import bitsandbytes.functional as bnbf

    assert NF4_CODE.shape == (16,)
    assert torch.all(NF4_CODE[1:] > NF4_CODE[:-1])
    assert NF4_CODE[0] == -1.0 and NF4_CODE[-1] == 1.0
    assert (NF4_CODE == 0).sum() == 1 and (NF4_CODE > 0).sum() == 8 and (NF4_CODE < 0).sum() == 7
    # The derived quantiles are the table bitsandbytes hard-codes (and the QLoRA paper lists).
    assert torch.allclose(NF4_CODE, bnbf.get_4bit_type("nf4", device="cpu"), atol=1e-6, rtol=0)
    assert torch.allclose(DYNAMIC_8BIT_CODE, bnbf.create_dynamic_map(signed=True), atol=1e-6, rtol=0)
    assert largest_code_gap() == pytest.approx(1.0 - 0.6961928, abs=1e-6)  # between -1 and the next code


@pytest.mark.parametrize("name", ["normal", "student_t", "outliers", "ragged"])
def test_round_trip_error_within_the_codebook_bound_per_block(name):
    """|w - deq| <= (half the gap around w's code) * absmax + |code| * |absmax - absmax_dq| for every value, and
    the double-quantised absmax is itself within half a dynamic-map step of its 256-group scale."""
    w = _weights()[name]
    q = quantize_nf4(w, blocksize=64, double_quant=True)
    deq = dequantize_nf4(q).double()
    assert deq.shape == w.shape and deq.dtype == torch.float64 and dequantize_nf4(q).dtype == w.dtype

    flat = torch.nn.functional.pad(w.reshape(-1).double(), (0, (-w.numel()) % 64)).view(-1, 64)
    absmax = flat.abs().amax(1)
    absmax_dq = q.block_absmax().double()
    codes = torch.nn.functional.pad(q.codes(), (0, (-w.numel()) % 64)).view(-1, 64).long()
    code = NF4_CODE.double()
    # The gap on each side of a code: a value rounds to the code only from within half of it.
    gaps = torch.cat([torch.zeros(1), code[1:] - code[:-1], torch.zeros(1)]).double()
    local_half_gap = torch.maximum(gaps[codes], gaps[codes + 1]) / 2
    err = (flat - torch.nn.functional.pad(deq.reshape(-1), (0, (-w.numel()) % 64)).view(-1, 64)).abs()
    dq_err = (absmax - absmax_dq).abs()
    elem_bound = local_half_gap * absmax[:, None] + code[codes].abs() * dq_err[:, None] + 1e-7
    assert torch.all(err <= elem_bound), float((err - elem_bound).max())
    block_bound = largest_code_gap() / 2 * absmax + dq_err + 1e-7
    assert torch.all(err.amax(1) <= block_bound)

    # Double quantisation: absmax - mean, 8-bit dynamic map, one scale per 256 constants.
    centred = absmax - absmax.mean()
    group_scale = torch.nn.functional.pad(centred.abs(), (0, (-centred.numel()) % 256)).view(-1, 256).amax(1)
    half_dyn_gap = float((DYNAMIC_8BIT_CODE[1:] - DYNAMIC_8BIT_CODE[:-1]).max()) / 2
    assert torch.all(dq_err <= half_dyn_gap * group_scale.repeat_interleave(256)[: absmax.numel()] + 1e-7)
    if name == "normal":  # the bound is nearly reached: the test would catch a coarser codebook
        normalised = (err / absmax[:, None]).max()
        assert normalised > 0.8 * largest_code_gap() / 2


def test_exact_zero_stays_zero_including_an_all_zero_block():
    w = torch.randn(4, 128) * 0.05
    w[0, ::3] = 0.0
    w[2, :64] = 0.0  # a whole block of zeros: absmax 0 must not produce NaN
    for dq in (True, False):
        deq = dequantize_nf4(quantize_nf4(w, double_quant=dq))
        assert torch.all(deq[w == 0] == 0)
        assert torch.isfinite(deq).all()


def test_single_quantisation_keeps_fp32_absmax_and_is_at_least_as_accurate():
    w = _weights()["normal"]
    single, double = quantize_nf4(w, double_quant=False), quantize_nf4(w, double_quant=True)
    assert single.absmax is not None and single.absmax_codes is None and double.absmax is None
    assert torch.equal(single.codes(), double.codes())  # codes depend on the exact absmax only
    mse = lambda q: float(((dequantize_nf4(q) - w) ** 2).mean())  # noqa: E731
    assert mse(single) <= mse(double) < 1.01 * mse(single)
    # bytes: 4 bits per value + 32 bits per block vs. 8 bits per block + 32 bits per 256 blocks + offset
    n, blocks = w.numel(), w.numel() // 64
    assert nf4_bytes(single) == n // 2 + 4 * blocks
    assert nf4_bytes(double) == n // 2 + blocks + 4 * (blocks // 256) + 4


def test_agrees_with_bitsandbytes_on_cpu():
    """Same packed 4-bit codes byte for byte; the 8-bit absmax codes differ only where bitsandbytes' CPU kernel
    picks a neighbouring (not the nearest) dynamic-map value, and only those blocks dequantise differently."""
    import bitsandbytes.functional as bnbf

    for name in ("normal", "student_t", "outliers"):
        w = _weights()[name]
        ours = quantize_nf4(w, blocksize=64, double_quant=True)
        packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        theirs = bnbf.dequantize_4bit(packed, state)
        assert torch.equal(ours.packed, packed.reshape(-1))
        assert state.offset.item() == pytest.approx(ours.absmax_offset.item(), rel=1e-6)
        same = ours.absmax_codes == state.absmax
        assert same.float().mean() >= 0.97
        assert ((ours.absmax_codes.int() - state.absmax.int()).abs() <= 1).all()  # at most one code apart
        diff = (dequantize_nf4(ours) - theirs).abs().reshape(-1, 64)
        assert diff[same].max() <= 1e-6 * w.abs().max()
        ours_mse, theirs_mse = (((dequantize_nf4(ours) - w) ** 2).mean(), ((theirs - w) ** 2).mean())
        assert ours_mse <= theirs_mse * 1.001  # nearest-code rounding is never worse


def test_quantised_lab_model_linear_memory_below_a_third_of_fp32(lab):
    from loraforge.resolve import load_model

    model = load_model(str(lab.model_dir), dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    fp32_bytes = {n: m.weight.numel() * 4 for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")}
    replaced = quantize_linears(model)
    assert set(replaced) == set(fp32_bytes) and len(replaced) == 7 * model.config.num_hidden_layers
    ratio = sum(m.weight_bytes() for m in replaced.values()) / sum(fp32_bytes.values())
    print(f"NF4+DQ linear weights: {ratio:.4f} of fp32")
    assert ratio < 1 / 3
    assert ratio == pytest.approx(0.5 / 4 + 1 / 64 / 4, abs=0.002)  # 4 bits + 8 bits per 64 values
    assert all(not list(m.parameters()) for m in replaced.values())  # no fp32 copy kept anywhere
    with torch.no_grad():
        after = model(input_ids=ids).logits
        layer = next(iter(replaced.values()))
        x = torch.randn(3, layer.in_features)
        assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.dequantized_weight()))
    rel = float((after - before).norm() / before.norm())
    print(f"relative logit change after NF4: {rel:.4f}")
    assert 0 < rel < 0.2


def test_bad_input_is_named():
    with pytest.raises(TypeError, match="floating-point"):
        quantize_nf4(torch.ones(64, dtype=torch.int32))
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(torch.ones(64), blocksize=63)
    with pytest.raises(ValueError, match="2-D"):
        NF4Linear(quantize_nf4(torch.ones(64)))
