"""Every fine-tuning method of the registry on the lab model, against its math: the output at init, rsLoRA's
scale, DoRA's magnitude and detached norm, PiSSA's principal components, QLoRA's NF4 double-quantised base
and its memory, the per-method settings of the spec, and a few real training steps through the train loop."""

from __future__ import annotations

import math

import pytest
import torch
from method_batches import fp32_base, task_batches
from pydantic import ValidationError

from loraforge.adapters import ADAPTERS, METHODS, BuildSetup, build_adapter, storage_bytes
from loraforge.adapters.lora_ga import default_loss
from loraforge.adapters.registry_ir_qlora import icq_dequantize_base
from loraforge.context import StageContext
from loraforge.spec import METHODS as METHOD_NAMES
from loraforge.spec import TrainSpec
from loraforge.train.trainer import run_train

R, ALPHA = 4, 8.0
FAST_ICQ = {"tau_n": 10}  # 21 shifts per block instead of 201: the same code path, 10x faster


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see tests/conftest.py


@pytest.fixture(scope="module")
def batches(lab, model_dir):
    return task_batches(model_dir, sorted(lab.tasks)[0])


def _spec(method: str, **kw) -> TrainSpec:
    extra = {"ir_qlora": FAST_ICQ} if method == "ir_qlora" else {}
    return TrainSpec(method=method, lora={"r": R, "alpha": ALPHA, **kw.pop("lora", {})}, **{**extra, **kw})


def _build(method: str, model_dir: str, batches, **kw):
    torch.manual_seed(0)
    setup = BuildSetup(batches=iter(batches), loss_fn=default_loss) if method == "lora_ga" else None
    return build_adapter(fp32_base(model_dir), _spec(method, **kw), setup).eval()


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _quantised_reference(method: str, model_dir: str):
    """What a quantised method must equal at init: its base with the weights it actually computes with."""
    base = fp32_base(model_dir)
    if method == "ir_qlora":
        names = [n for n, m in base.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"]
        icq_dequantize_base(base, {"quant": {}, "ir_qlora": FAST_ICQ, "quantized_modules": names})
    elif method == "qlora":
        from loraforge.adapters.qlora import dequantize_base, quantize_base_bnb
        from loraforge.spec import QuantSpec

        quantize_base_bnb(base, QuantSpec())
        dequantize_base(base)
    return base


# ---------------------------------------------------------------- registry and spec
def test_registry_lists_every_method_of_the_spec():
    assert tuple(METHODS) == METHOD_NAMES == ("lora", "rslora", "dora", "pissa", "lora_ga", "qlora", "ir_qlora", "full")
    assert set(ADAPTERS) == set(METHODS)
    assert {m for m, meta in METHODS.items() if meta.via_peft} == {"lora", "rslora", "dora", "pissa", "qlora"}


def test_spec_rejects_settings_of_another_method_but_takes_its_own_dump():
    with pytest.raises(ValidationError, match=r"settings \['lora_ga'\] do not apply to method 'lora'"):
        TrainSpec(method="lora", lora_ga={"grad_batches": 2})
    with pytest.raises(ValidationError, match=r"\['quant'\] do not apply to method 'dora'"):
        TrainSpec(method="dora", quant={"double_quant": False})
    spec = TrainSpec(method="lora_ga", lora_ga={"grad_batches": 3, "stable_gamma": 8})
    assert TrainSpec.model_validate(spec.model_dump(mode="json")) == spec
    assert TrainSpec.model_validate(TrainSpec(method="qlora").model_dump(mode="json")).quant.double_quant is True
    with pytest.raises(ValidationError):
        TrainSpec(method="galore")


# ---------------------------------------------------------------- output at init
@pytest.mark.parametrize("method", ["lora", "rslora", "dora", "pissa", "lora_ga", "qlora", "ir_qlora", "full"])
def test_output_at_init_equals_the_base_model(method, model_dir, batches):
    model = _build(method, model_dir, batches)
    reference = _quantised_reference(method, model_dir)
    before, after = _logits(reference, batches[0]), _logits(model, batches[0])
    scale = float(before.abs().max())
    tol = {"pissa": 2e-5, "lora_ga": 2e-5, "ir_qlora": 2e-5}.get(method, 1e-6)  # offset / dequantised bases
    assert torch.allclose(after, before, atol=tol * scale, rtol=0), float((after - before).abs().max())
    if method in ("qlora", "ir_qlora"):  # and the quantised base is not the fp32 model
        assert not torch.allclose(after, _logits(fp32_base(model_dir), batches[0]), atol=1e-3 * scale)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if method == "full":
        assert len(trainable) == len(list(model.parameters()))
    else:
        assert trainable and all("lora_" in n for n in trainable)


# ---------------------------------------------------------------- rsLoRA
def _measured_scale(model_dir: str, method: str, r: int) -> float:
    """Fit s in layer(x) - W0 x = s B A x on one q_proj with random A, B: the scale the layer applies."""
    torch.manual_seed(r)
    spec = _spec(method, lora={"r": r, "alpha": ALPHA, "target_modules": ["q_proj"]})
    model = build_adapter(fp32_base(model_dir), spec)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    a, b = torch.randn_like(layer.lora_A["default"].weight), torch.randn_like(layer.lora_B["default"].weight)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
        x = torch.randn(6, layer.in_features)
        delta = layer(x) - layer.get_base_layer()(x)
        bax = x @ a.T @ b.T
    return float((delta * bax).sum() / (bax * bax).sum())


@pytest.mark.parametrize("r", [2, 8, 32])
def test_rslora_update_scale_is_alpha_over_sqrt_r(model_dir, r):
    assert _measured_scale(model_dir, "rslora", r) == pytest.approx(ALPHA / math.sqrt(r), rel=1e-5)
    assert _measured_scale(model_dir, "lora", r) == pytest.approx(ALPHA / r, rel=1e-5)


# ---------------------------------------------------------------- DoRA
def _dora_layers(model):
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_magnitude_vector") and m.lora_magnitude_vector}


def test_dora_magnitude_starts_at_the_norms_of_w0(model_dir, batches):
    model = _build("dora", model_dir, batches)
    layers = _dora_layers(model)
    assert len(layers) == 4 * 7
    for name, layer in layers.items():
        w0 = layer.get_base_layer().weight
        m = layer.lora_magnitude_vector["default"].weight
        assert m.requires_grad and m.shape == (w0.shape[0],)
        # one magnitude per output unit: the paper's column norm of W (d x k) is a row norm in nn.Linear layout
        assert torch.allclose(m, w0.norm(dim=1), rtol=1e-6, atol=0), name


def test_dora_gradients_treat_the_norm_as_a_constant(model_dir, batches):
    """With n = ||W0 + s B A|| per output unit held constant, y = (m / n) * (W0 + s B A) x gives closed-form
    gradients for m, A and B; PEFT's must equal them, and differ from the gradients with n in the graph."""
    model = _build("dora", model_dir, batches)
    layer = model.get_base_model().model.layers[1].mlp.down_proj
    a_p, b_p = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m_p = layer.lora_magnitude_vector["default"].weight
    s = layer.scaling["default"]
    torch.manual_seed(1)
    with torch.no_grad():  # away from init: B != 0 makes the norm depend on A and B
        b_p.copy_(0.05 * torch.randn_like(b_p))
        m_p.mul_(1 + 0.1 * torch.randn_like(m_p))
    x = torch.randn(5, layer.in_features)
    g = torch.randn(5, layer.out_features)
    (layer(x) * g).sum().backward()

    w0 = layer.get_base_layer().weight.detach()
    a, b, m = a_p.detach(), b_p.detach(), m_p.detach()
    v = w0 + s * b @ a
    n = v.norm(dim=1)
    gs = g * (m / n)
    expected = {"m": (g * (x @ v.T)).sum(0) / n, "B": s * gs.T @ (x @ a.T), "A": s * (gs @ b).T @ x}
    got = {"m": m_p.grad, "B": b_p.grad, "A": a_p.grad}
    for k in expected:
        assert torch.allclose(got[k], expected[k], rtol=1e-4, atol=1e-6 * float(expected[k].abs().max())), k

    # The same layer with the norm left in the graph: the A / B gradients change measurably.
    a2, b2 = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    v2 = w0 + s * b2 @ a2
    ((x @ v2.T) * (m / v2.norm(dim=1)) * g).sum().backward()
    assert not torch.allclose(b2.grad, expected["B"], rtol=1e-2, atol=1e-3 * float(expected["B"].abs().max()))


# ---------------------------------------------------------------- PiSSA
def test_pissa_adapter_holds_the_top_r_singular_components(model_dir, batches):
    original = fp32_base(model_dir)
    model = _build("pissa", model_dir, batches)
    layer = model.get_base_model().model.layers[2].self_attn.o_proj
    w0 = original.model.layers[2].self_attn.o_proj.weight.detach().double()
    u, sv, vh = torch.linalg.svd(w0)
    top = u[:, :R] @ torch.diag(sv[:R]) @ vh[:R]
    b, a = layer.lora_B["default"].weight.double(), layer.lora_A["default"].weight.double()
    adapter = layer.scaling["default"] * b @ a
    assert torch.allclose(adapter, top, atol=1e-5 * float(top.abs().max()))
    assert torch.allclose(layer.get_base_layer().weight.double(), w0 - top, atol=1e-5 * float(w0.abs().max()))


# ---------------------------------------------------------------- QLoRA
def test_qlora_base_is_nf4_double_quantised_and_under_a_third_of_fp32(model_dir, batches):
    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    fp32_bytes = storage_bytes(fp32_base(model_dir))
    model = _build("qlora", model_dir, batches)
    quantised = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantised) == 4 * 7  # every linear layer but the tied output head
    for q in quantised:
        state = q.weight.quant_state
        assert q.weight.dtype == torch.uint8 and q.weight.quant_type == "nf4" and state.quant_type == "nf4"
        assert state.blocksize == 64
        # double quantisation: the block absmax constants are 8-bit codes with their own fp32 state
        assert state.nested and state.state2 is not None and state.absmax.dtype == torch.uint8
        assert state.state2.blocksize == 256 and state.offset is not None
    assert sum(isinstance(m, LoraLinear4bit) for m in model.modules()) == 4 * 7
    base_bytes = storage_bytes(model.get_base_model()) - sum(
        p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)
    print(f"lab model: fp32 {fp32_bytes} bytes, NF4 + double quant base {base_bytes} bytes "
          f"({base_bytes / fp32_bytes:.3f})")
    assert base_bytes < fp32_bytes / 3


def test_qlora_without_double_quant_keeps_fp32_constants(model_dir, batches):
    import bitsandbytes as bnb

    model = _build("qlora", model_dir, batches, quant={"double_quant": False, "blocksize": 128})
    state = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)).weight.quant_state
    assert not state.nested and state.absmax.dtype == torch.float32 and state.blocksize == 128


# ---------------------------------------------------------------- IR-QLoRA wiring
def test_ir_qlora_adapts_the_targets_and_quantises_every_linear(model_dir, batches):
    from loraforge.adapters.ir_qlora import ICQLinear, IECLoRALinear

    model = _build("ir_qlora", model_dir, batches, lora={"target_modules": ["q_proj", "v_proj"]})
    iec = {n for n, m in model.named_modules() if isinstance(m, IECLoRALinear)}
    bare = {n for n, m in model.named_modules() if isinstance(m, ICQLinear) and not n.endswith(".base")}
    assert {n.rsplit(".", 1)[-1] for n in iec} == {"q_proj", "v_proj"} and len(iec) == 8
    assert len(bare) == 4 * 5 and not any(type(m) is torch.nn.Linear and n != "lm_head"
                                          for n, m in model.named_modules())
    assert all(m.lora_iec_scale_a.item() == 0 == m.lora_iec_scale_b.item() for m in model.modules()
               if isinstance(m, IECLoRALinear))
    with pytest.raises(ValueError, match="matched no linear layer"):
        _build("ir_qlora", model_dir, batches, lora={"target_modules": ["nope"]})


def test_lora_ga_without_batches_is_a_clear_error(model_dir):
    with pytest.raises(ValueError, match="lora_ga needs training batches"):
        build_adapter(fp32_base(model_dir), _spec("lora_ga"))


# ---------------------------------------------------------------- a few steps of the real train loop
@pytest.mark.parametrize("method", list(METHOD_NAMES))
def test_a_few_training_steps_reduce_the_loss(method, lab, tmp_path):
    """strategy ddp, num_workers=0: the loop runs in this process (no Ray workers)."""
    task = sorted(lab.tasks)[0]
    extra = {"lora_ga": {"grad_batches": 2}} if method == "lora_ga" else {}
    spec = _spec(method, data=f"lab://tasks/{task}_train.jsonl", num_workers=0, max_steps=8, batch_size=8,
                 learning_rate=1e-3 if method == "full" else 5e-3, max_seq_len=64, checkpoint_every=8, seed=1,
                 **extra)
    result = run_train(spec, StageContext(run_dir=tmp_path, model="lab"))
    losses = result.losses
    print(f"{method}: {[round(x, 3) for x in losses]}")
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:2]) / 2
    files = {p.name for p in result.adapter_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "loraforge_method.json"} <= files
