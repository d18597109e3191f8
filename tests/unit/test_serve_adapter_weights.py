"""read_adapter against PEFT: W0 + b@a (DoRA, embedding and replaced forms too) must equal PEFT's merged weights,
which checks the key mapping, the scale (alpha/r, rsLoRA) and rank/alpha patterns; bad folders are refused by name."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from lab_adapters import make_adapter_zoo, make_random_adapter
from method_batches import fp32_base, perturbed_method_folder, task_batches
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from loraforge.errors import ModelError
from loraforge.serve.engine.adapter_weights import AdapterWeights, content_hash, pattern_value, read_adapter

TOL = 1e-5
ISSUE4_METHODS = ("lora", "rslora", "dora", "pissa", "lora_ga", "full")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see tests/conftest.py


@pytest.fixture(scope="module")
def base(model_dir):
    return fp32_base(model_dir)


@pytest.fixture(scope="module")
def issue4_folders(lab, model_dir, tmp_path_factory) -> dict[str, Path]:
    """The training methods' saved folders, every trainable parameter moved off its init."""
    root = tmp_path_factory.mktemp("issue4")
    batches = task_batches(model_dir, sorted(lab.tasks)[-1])
    folders = {method: perturbed_method_folder(model_dir, method, batches, root) for method in ISSUE4_METHODS}
    return folders


def _applied(base: torch.nn.Module, w: AdapterWeights) -> torch.nn.Module:
    """A copy of `base` with `w` folded into its weights, untied so each module carries its own update."""
    import copy

    model = copy.deepcopy(base)
    with torch.no_grad():
        for path, p in list(model.named_parameters(remove_duplicate=False)):
            owner, _, attr = path.rpartition(".")
            setattr(model.get_submodule(owner), attr, torch.nn.Parameter(p.detach().clone()))
        for path, m in w.modules.items():
            weight = model.get_submodule(path).weight
            merged = weight + m.b @ m.a
            weight.copy_(merged if m.magnitude is None else m.magnitude[:, None] * merged)
        for path, m in w.embeddings.items():
            weight = model.get_submodule(path).weight
            merged = weight + (m.b @ m.a).T
            weight.copy_(merged if m.magnitude is None else merged * m.magnitude[None, :])
        for path, value in w.replaced.items():
            model.get_parameter(path).copy_(value)
    return model


def _peft_merged(model_dir: str, folder: Path) -> torch.nn.Module:
    return PeftModel.from_pretrained(fp32_base(model_dir), str(folder)).merge_and_unload()


def _assert_matches_peft_merge(model_dir: str, base, folder: Path, name: str) -> AdapterWeights:
    """Per module: our W0 + b@a form equals PEFT's merged weight; untouched modules stay the base's."""
    w = read_adapter(name, folder, base)
    ours, peft = _applied(base, w), _peft_merged(model_dir, folder)
    changed = set(w.modules) | set(w.embeddings)
    for path, module in peft.named_modules():
        if not isinstance(module, torch.nn.Linear | torch.nn.Embedding):
            continue
        got, want = ours.get_submodule(path).weight, module.weight
        err = float((got - want).abs().max())
        assert err < TOL, f"{name}: {path} differs from PEFT's merge by {err}"
        if path not in changed:
            assert torch.equal(got, base.get_submodule(path).weight), path
    return w


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_zoo_adapters_equal_peft_merge(model_dir, base, tmp_path):
    zoo = make_adapter_zoo(Path(model_dir), tmp_path, count=3)  # ranks 2, 4, 8; a02 is rsLoRA
    for name, folder in zoo.items():
        w = _assert_matches_peft_merge(model_dir, base, folder, name)
        config = json.loads((folder / "adapter_config.json").read_text())
        assert w.rank == config["r"] and w.name == name and not w.embeddings and not w.replaced
        assert len(w.modules) == 4 * len(config["target_modules"])
        assert all(m.a.dtype == m.b.dtype == torch.float32 and m.a.is_contiguous() for m in w.modules.values())


def test_dora_adapter_magnitude_equals_peft_merge(model_dir, base, tmp_path):
    folder = make_random_adapter(Path(model_dir), tmp_path / "dora", seed=7, use_dora=True,
                                 targets=("q_proj", "o_proj", "gate_proj"))
    w = _assert_matches_peft_merge(model_dir, base, folder, "dora")
    assert all(m.magnitude is not None and m.magnitude.shape == (m.b.shape[0],) for m in w.modules.values())


@pytest.mark.parametrize("method", ISSUE4_METHODS)
def test_training_method_folders_equal_peft(method, issue4_folders, model_dir, base):
    folder = issue4_folders[method]
    ids = torch.randint(0, 2048, (2, 12), generator=torch.Generator().manual_seed(0))
    if method == "full":  # tied embedding and head both carry a LoRA: PEFT's merge would add both to one tensor
        w = read_adapter(method, folder, base)
        assert set(w.embeddings) == {"model.embed_tokens"} and "lm_head" in w.modules
        assert "model.norm.weight" in w.replaced and len(w.replaced) == 9
        assert w.rank == 128
    else:
        w = _assert_matches_peft_merge(model_dir, base, folder, method)
        assert w.rank == (8 if method in ("pissa", "lora_ga") else 4)
    peft = PeftModel.from_pretrained(fp32_base(model_dir), str(folder)).eval()
    want = _logits(peft, ids)
    got = _logits(_applied(base, w), ids)
    assert float((got - want).abs().max()) < 1e-4 * float(want.abs().max()), method
    assert not torch.allclose(want, _logits(base, ids), atol=1e-3)  # the adapter matters


def test_dora_on_tied_embedding_reproduces_peft_logits(model_dir, base, tmp_path):
    folder = make_random_adapter(Path(model_dir), tmp_path / "emb", seed=3, use_dora=True, b_scale=0.3,
                                 targets=("embed_tokens", "v_proj"))
    w = read_adapter("emb", folder, base)
    emb = w.embeddings["model.embed_tokens"]
    assert emb.a.shape == (4, 2048) and emb.b.shape == (128, 4) and emb.magnitude.shape == (128,)
    assert not w.replaced  # the saved base embedding copy equals the base: nothing to replace
    ids = torch.randint(0, 2048, (2, 10), generator=torch.Generator().manual_seed(1))
    want = _logits(PeftModel.from_pretrained(fp32_base(model_dir), str(folder)).eval(), ids)
    got = _logits(_applied(base, w), ids)
    assert float((got - want).abs().max()) < 1e-4 * float(want.abs().max())


def test_rank_and_alpha_patterns_follow_peft(model_dir, base, tmp_path):
    """Suffix keys and regex keys, first match wins, as PEFT's get_pattern_key; rsLoRA off so alpha/r applies."""
    torch.manual_seed(5)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj", "up_proj"],
                        rank_pattern={"q_proj": 8, r"layers\.1\.self_attn\.v_proj": 2},
                        alpha_pattern={r"layers\.[23]\..*": 3, "up_proj": 32})
    get_peft_model(fp32_base(model_dir), config).save_pretrained(tmp_path / "pat")
    w = _assert_matches_peft_merge(model_dir, base, tmp_path / "pat", "pat")
    assert w.modules["model.layers.0.self_attn.q_proj"].a.shape[0] == 8
    assert w.modules["model.layers.1.self_attn.v_proj"].a.shape[0] == 2
    assert w.rank == 8
    assert pattern_value({r"layers\.[23]\..*": 3, "up_proj": 32}, "model.layers.2.mlp.up_proj", 8) == 3
    assert pattern_value({"q_proj": 8}, "model.layers.0.self_attn.xq_proj", 4) == 4  # a suffix, not a substring


def test_nbytes_counts_every_tensor(model_dir, base, tmp_path):
    folder = make_random_adapter(Path(model_dir), tmp_path / "n", seed=1, rank=4, targets=("q_proj",))
    w = read_adapter("n", folder, base)
    assert w.nbytes == 4 * (4 * 128 + 128 * 4) * 4  # 4 layers, a and b, float32


def test_content_hash_is_config_then_weights_sha256(model_dir, tmp_path):
    folder = make_random_adapter(Path(model_dir), tmp_path / "h", seed=1, targets=("q_proj",))
    data = (folder / "adapter_config.json").read_bytes() + (folder / "adapter_model.safetensors").read_bytes()
    assert content_hash(folder) == hashlib.sha256(data).hexdigest()
    before = content_hash(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["lora_alpha"] = 32
    (folder / "adapter_config.json").write_text(json.dumps(config))
    assert content_hash(folder) != before


# --- refusals -------------------------------------------------------------------------------------------------


@pytest.fixture
def small(model_dir, tmp_path) -> Path:
    return make_random_adapter(Path(model_dir), tmp_path / "small", seed=2, targets=("q_proj",))


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))


def _edit_weights(folder: Path, edit) -> None:
    state = load_file(str(folder / "adapter_model.safetensors"))
    edit(state)
    save_file(state, str(folder / "adapter_model.safetensors"))


def test_pickled_weights_are_refused(small, base):
    (small / "adapter_model.safetensors").rename(small / "adapter_model.bin")
    with pytest.raises(ModelError, match="pickle"):
        read_adapter("x", small, base)


@pytest.mark.parametrize(("changes", "message"), [
    ({"peft_type": "IA3"}, "peft_type 'IA3'"),
    ({"lora_bias": True}, "lora_bias"),
    ({"alora_invocation_tokens": [1, 2]}, "aLoRA"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"r": 0}, "'r' must be a positive number"),
])
def test_unsupported_configs_are_refused_by_name(small, base, changes, message):
    _edit_config(small, **changes)
    with pytest.raises(ModelError, match=re.escape(message)):
        read_adapter("x", small, base)


def test_target_the_base_lacks_is_refused(small, base):
    def rename(state):
        for k in [k for k in state if "layers.0." in k]:
            state[k.replace("layers.0.", "layers.9.")] = state.pop(k)

    _edit_weights(small, rename)
    with pytest.raises(ModelError, match=re.escape("'model.layers.9.self_attn.q_proj', which the base model")):
        read_adapter("x", small, base)


def test_shape_mismatch_names_module_and_shapes(small, base):
    key = "base_model.model.model.layers.2.self_attn.q_proj.lora_B.weight"
    _edit_weights(small, lambda s: s.update({key: torch.zeros(64, 4)}))
    with pytest.raises(ModelError, match=re.escape("model.layers.2.self_attn.q_proj lora_B has shape (64, 4), "
                                                   "the base model needs (128, 4)")):
        read_adapter("x", small, base)


def test_rank_disagreeing_with_config_is_refused(small, base):
    _edit_config(small, r=8)
    with pytest.raises(ModelError, match=re.escape("lora_A has shape (4, 128), the base model needs (8, 128)")):
        read_adapter("x", small, base)


@pytest.mark.parametrize(("key", "message"), [
    ("base_model.model.model.layers.0.input_layernorm.lora_A.weight", "(LlamaRMSNorm): only Linear and Embedding"),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias", "lora_bias is not supported"),
    ("base_model.model.model.layers.0.mlp.down_proj.bias", "a trained bias"),
    ("base_model.model.model.layers.0.mystery", "unknown key 'base_model.model.model.layers.0.mystery'"),
    ("model.layers.0.self_attn.q_proj.lora_A.weight", "PEFT LoRA keys start with"),
])
def test_unsupported_keys_are_refused_by_name(small, base, key, message):
    _edit_weights(small, lambda s: s.update({key: torch.zeros(4, 128)}))
    with pytest.raises(ModelError, match=re.escape(message)):
        read_adapter("x", small, base)


def test_adapter_name_in_saved_keys_is_accepted(small, base):
    """Older PEFT files keep the adapter name ("lora_A.default.weight"): same weights either way."""
    plain = read_adapter("x", small, base)

    def add_name(state):
        for k in list(state):
            state[k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")] = state.pop(k)

    _edit_weights(small, add_name)
    named = read_adapter("x", small, base)
    assert named.modules.keys() == plain.modules.keys()
    assert all(torch.equal(named.modules[k].b, plain.modules[k].b) for k in plain.modules)
