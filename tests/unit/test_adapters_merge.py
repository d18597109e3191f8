"""Merging and saving every method: the merged plain model and the saved folder reproduce the trained
model's logits. Trained = every trainable parameter moved off its init (IEC scalars, DoRA magnitudes and
the full model included), so each check would catch a wrong merge or export formula."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from method_batches import fp32_base, task_batches
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from loraforge.adapters import METHOD_FILE, BuildSetup, build_adapter, load_tuned, merge_tuned, save_tuned
from loraforge.adapters.ir_qlora import ICQLinear, IECLoRALinear
from loraforge.adapters.lora_ga import default_loss
from loraforge.context import StageContext
from loraforge.spec import METHODS, TrainSpec
from loraforge.train.trainer import run_train

R, ALPHA = 4, 8.0
QUANTISED = ("qlora", "ir_qlora")
OFFSET = ("pissa", "lora_ga")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see tests/conftest.py


@pytest.fixture(scope="module")
def batches(lab, model_dir):
    return task_batches(model_dir, sorted(lab.tasks)[-1])


def _spec(method: str) -> TrainSpec:
    extra = {"ir_qlora": {"tau_n": 10}} if method == "ir_qlora" else {}
    return TrainSpec(method=method, lora={"r": R, "alpha": ALPHA}, **extra)


def _trained(method: str, model_dir: str, batches):
    """The method's model with every trainable parameter moved away from its initial value."""
    torch.manual_seed(0)
    setup = BuildSetup(batches=iter(batches), loss_fn=default_loss) if method == "lora_ga" else None
    model = build_adapter(fp32_base(model_dir), _spec(method), setup).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    return model


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 2e-5) -> bool:
    return torch.allclose(a, b, atol=rel * float(b.abs().max()), rtol=0)


@pytest.mark.parametrize("method", list(METHODS))
def test_merged_model_logits_equal_the_adapter_model_logits(method, model_dir, batches):
    model = _trained(method, model_dir, batches)
    trained = _logits(model, batches[0])
    assert not _close(trained, _logits(fp32_base(model_dir), batches[0]), 1e-3)  # the perturbation matters
    merged = merge_tuned(copy.deepcopy(model), method)
    assert not isinstance(merged, PeftModel)
    leftovers = [n for n, m in merged.named_modules() if isinstance(m, LoraLayer | IECLoRALinear | ICQLinear)
                 or type(m).__name__ == "Linear4bit"]
    assert not leftovers, leftovers[:3]
    assert _close(_logits(merged, batches[0]), trained), method


@pytest.mark.parametrize("method", list(METHODS))
def test_saved_folder_reloads_the_trained_model(method, model_dir, batches, tmp_path):
    model = _trained(method, model_dir, batches)
    trained = _logits(model, batches[1])
    folder = save_tuned(model, method, tmp_path / method, None, model_dir)
    assert {"adapter_config.json", "adapter_model.safetensors", METHOD_FILE} <= {p.name for p in folder.iterdir()}
    assert json.loads((folder / METHOD_FILE).read_text())["method"] == method

    exact = load_tuned(model_dir, folder).eval()
    assert _close(_logits(exact, batches[1]), trained), method
    # What evaluate and serve do: the adapter on the original fp32 base.
    plain = _logits(PeftModel.from_pretrained(fp32_base(model_dir), str(folder)).eval(), batches[1])
    if method in QUANTISED:  # the usual QLoRA deployment: off by about the base's quantisation error
        with exact.disable_adapter():
            quant_error = float((_logits(exact, batches[1]) - _logits(fp32_base(model_dir), batches[1])).abs().max())
        print(f"{method}: adapter on fp32 base vs trained {float((plain - trained).abs().max()):.3f}, "
              f"quantised vs fp32 base {quant_error:.3f}")
        assert not _close(plain, trained, 1e-4)
        assert float((plain - trained).abs().max()) < 3 * quant_error
    else:
        assert _close(plain, trained), method
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == (2 * R if method in OFFSET else 1 if method == "full" else R)


@pytest.mark.parametrize("method", OFFSET)
def test_offset_conversion_equals_peft_path_initial_model_conversion(method, model_dir, batches, tmp_path):
    """Ours works from state dicts (FSDP / ZeRO-3 safe); PEFT's loads the initial adapter into the live model.
    Both must give the same rank-2r tensors and scaling."""
    torch.manual_seed(0)
    setup = BuildSetup(batches=iter(batches), loss_fn=default_loss) if method == "lora_ga" else None
    model = build_adapter(fp32_base(model_dir), _spec(method), setup)
    config = model.peft_config["default"]
    init_weights, config.init_lora_weights = config.init_lora_weights, True  # PEFT's documented recipe
    model.save_pretrained(str(tmp_path / "initial"))
    config.init_lora_weights = init_weights
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    ours = save_tuned(model, method, tmp_path / "ours", None, model_dir)
    model.save_pretrained(str(tmp_path / "peft"), path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    a = load_file(str(ours / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = (json.loads((d / "adapter_config.json").read_text()) for d in (ours, tmp_path / "peft"))
    assert (ca["r"], ca["lora_alpha"]) == (cb["r"], cb["lora_alpha"]) == (2 * R, 2 * ALPHA)


def test_full_folder_is_full_rank_lora_plus_saved_norms(model_dir, batches, tmp_path):
    folder = save_tuned(_trained("full", model_dir, batches), "full", tmp_path / "full", None, model_dir)
    config = json.loads((folder / "adapter_config.json").read_text())
    targets = {t.rsplit(".", 1)[-1] for t in config["target_modules"]}  # PEFT may store suffixes
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens",
                       "lm_head"}  # the tied head carries the same update as the embeddings
    assert set(config["rank_pattern"].values()) == {128} and config["alpha_pattern"] == config["rank_pattern"]
    assert sorted(config["modules_to_save"])[-1] == "model.norm" and len(config["modules_to_save"]) == 4 * 2 + 1


def test_serve_engine_holds_the_full_adapter_beside_lora_adapters(model_dir, batches, tmp_path):
    """One base, several adapters in one continuous batch: a full fine-tune (full-rank LoRA + saved norms) must
    be served beside LoRA-family ones, each greedy answer equal to its reloaded trained model's."""
    from loraforge.serve.engine import Engine, SamplingParams

    folders = {m: save_tuned(_trained(m, model_dir, batches), m, tmp_path / m, None, model_dir)
               for m in ("lora", "full", "lora_ga")}
    engine = Engine(model_dir, {m: str(f) for m, f in folders.items()}, max_batch_size=4)
    try:
        prompt = [int(t) for t in batches[0]["input_ids"][0][:12]]
        params = SamplingParams(max_tokens=10, temperature=0)  # both stop at eos (kept) or after 10 tokens
        streams = {m: engine.submit(prompt, m, params) for m in folders}  # submitted together: one mixed batch
        served = {m: [t for d in s for t in d.token_ids] for m, s in streams.items()}
    finally:
        engine.close()
    for m, folder in folders.items():
        model = load_tuned(model_dir, folder).eval()
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)
        assert served[m] == out[0, len(prompt):].tolist(), m


@pytest.mark.parametrize("method", ["dora", "pissa", "lora_ga", "qlora", "ir_qlora", "full"])
def test_fsdp_saves_the_same_folder_as_ddp(method, lab, tmp_path):
    """In-process (one rank): under fsdp the saver gets the gathered state dict instead of the live model;
    the folders must hold the same tensors."""
    task = sorted(lab.tasks)[0]
    extra = {"lora_ga": {"lora_ga": {"grad_batches": 2}}, "ir_qlora": {"ir_qlora": {"tau_n": 10}}}.get(method, {})
    folders = {}
    for strategy in ("ddp", "fsdp"):
        spec = TrainSpec(method=method, strategy=strategy, lora={"r": R, "alpha": ALPHA}, num_workers=0,
                         data=f"lab://tasks/{task}_train.jsonl", max_steps=3, batch_size=4, max_seq_len=64,
                         learning_rate=1e-3, checkpoint_every=3, **extra)
        folders[strategy] = run_train(spec, StageContext(run_dir=tmp_path / strategy, model="lab")).adapter_dir
    a, b = (load_file(str(folders[s] / "adapter_model.safetensors")) for s in ("ddp", "fsdp"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_evaluate_scores_the_trained_quantised_model_not_the_adapter_on_the_fp32_base(lab, model_dir, batches,
                                                                                       tmp_path):
    from loraforge.evaluate.metrics import perplexity
    from loraforge.evaluate.runner import evaluate_adapter
    from loraforge.resolve import load_tokenizer

    folder = save_tuned(_trained("qlora", model_dir, batches), "qlora", tmp_path / "q", None, model_dir)
    text = (lab.data_dir / "general_heldout.txt").read_text()[:3000]
    result = evaluate_adapter({"kind": "evaluate"}, model_dir, str(folder), {}, text)
    tok = load_tokenizer(model_dir)
    exact = perplexity(load_tuned(model_dir, folder).eval(), tok, text, seq_len=256)
    on_fp32 = perplexity(PeftModel.from_pretrained(fp32_base(model_dir), str(folder)).eval(), tok, text, seq_len=256)
    assert result["after"]["perplexity"] == pytest.approx(exact, rel=1e-6)
    assert abs(exact - on_fp32) > 1e-4 * exact  # the two really differ, so the check above can fail
