"""Read a PEFT LoRA adapter folder into plain tensors the batched runner applies per request row.

Every supported PEFT form becomes `W0 + b @ a` per module (scale folded into b), optionally with a DoRA
per-output magnitude: `y = magnitude * (W0 x + b a x) + bias`. Embedding LoRA uses the same factors on the
token one-hot. `modules_to_save` weights replace base parameters. Anything else PEFT can save (LoRA biases,
conv layers, aLoRA, VeLoRA, ...) is refused by name instead of being served wrongly.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from loraforge.errors import ModelError
from loraforge.serve.engine.folders import ADAPTER_CONFIG, ADAPTER_WEIGHTS, check_adapter_dir

PEFT_PREFIX = "base_model.model."

# Config fields that switch PEFT to a forward this engine does not implement (truthy value = in use).
UNSUPPORTED_CONFIG = {
    "lora_bias": "lora_bias (a trained bias on lora_B)",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D-style transposed weights)",
    "layer_replication": "layer_replication",
    "target_parameters": "target_parameters (LoRA on raw parameters)",
    "trainable_token_indices": "trainable_token_indices",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens)",
    "use_qalora": "QALoRA (use_qalora)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "kasa_config": "KaSA (kasa_config)",
    "megatron_config": "Megatron parallel layers (megatron_config)",
}

# <module path>.<part>[.<adapter name>][.weight]; PEFT drops the adapter name when saving, older files may keep it.
_LORA_KEY = re.compile(
    r"^(?P<path>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.(?P<adapter>[^.]+))??(?P<suffix>\.weight|\.bias)?$"
)
_BASE_COPY_KEY = re.compile(r"^(?P<path>.+)\.base_layer\.(?P<param>weight)$")


@dataclass
class LoraModule:
    a: torch.Tensor  # [r, d_in] float32, contiguous
    b: torch.Tensor  # [d_out, r] float32, the adapter's scale (alpha/r or alpha/sqrt(r)) folded in
    magnitude: torch.Tensor | None = None  # DoRA only: m / ||W0 + s*B@A|| per output row, [d_out]


@dataclass
class AdapterWeights:
    name: str
    content_hash: str  # sha256 hex of adapter_config.json bytes + adapter_model.safetensors bytes
    rank: int  # the largest rank among its modules
    modules: dict[str, LoraModule]  # key: the base model's module path, e.g. "model.layers.0.self_attn.q_proj"
    embeddings: dict[str, LoraModule]  # key: e.g. "model.embed_tokens": a [r, vocab], b [d, r]
    replaced: dict[str, torch.Tensor]  # PEFT modules_to_save (and changed embedding copies), key: parameter path
    nbytes: int  # bytes held by all tensors above


def content_hash(folder: Path) -> str:
    """sha256 of the config bytes then the weights bytes: the adapter's identity for caching."""
    digest = hashlib.sha256()
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        with open(Path(folder) / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def pattern_value(patterns: dict[str, Any], module_path: str, default: Any) -> Any:
    """PEFT 0.21's rank_pattern / alpha_pattern rule (peft.utils.other.get_pattern_key): the first key, in
    insertion order, that matches the end of the module path as a regex (`(.*\\.)?(key)$`)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default


def _config(folder: Path, name: str) -> dict[str, Any]:
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"adapter {name!r}: cannot read {folder / ADAPTER_CONFIG}: {e}") from e
    if not isinstance(config, dict):
        raise ModelError(f"adapter {name!r}: {ADAPTER_CONFIG} is not a JSON object")
    if config.get("peft_type") != "LORA":
        raise ModelError(f"adapter {name!r}: peft_type {config.get('peft_type')!r} is not supported, only LORA")
    used = [label for field, label in UNSUPPORTED_CONFIG.items() if config.get(field)]
    if used:
        raise ModelError(f"adapter {name!r} uses {', '.join(used)}: not supported by the serving engine")
    for field in ("r", "lora_alpha"):
        if not isinstance(config.get(field), int | float) or config[field] <= 0:
            raise ModelError(f"adapter {name!r}: {ADAPTER_CONFIG} field {field!r} must be a positive number")
    return config


def _scale(config: dict[str, Any], path: str) -> tuple[int, float]:
    """(rank, scale) PEFT gives the module at `path`."""
    r = pattern_value(config.get("rank_pattern") or {}, path, config["r"])
    alpha = pattern_value(config.get("alpha_pattern") or {}, path, config["lora_alpha"])
    return int(r), float(alpha) / (math.sqrt(r) if config.get("use_rslora") else r)


def _saved_module(path: str, modules_to_save: list[str]) -> bool:
    """PEFT wraps every module whose path ends with a modules_to_save entry (peft.utils.other._set_trainable)."""
    return any(path.endswith(t) for t in modules_to_save)


def _submodule(base: nn.Module, path: str, name: str) -> nn.Module:
    try:
        return base.get_submodule(path)
    except AttributeError:
        raise ModelError(f"adapter {name!r} targets {path!r}, which the base model does not have") from None


def _parameter_aliases(base: nn.Module) -> dict[str, list[str]]:
    """parameter path -> every path of that same parameter (tied embeddings share one)."""
    by_id: dict[int, list[str]] = defaultdict(list)
    for path, p in base.named_parameters(remove_duplicate=False):
        by_id[id(p)].append(path)
    return {path: paths for paths in by_id.values() for path in paths}


def _group(state: dict[str, torch.Tensor], config: dict[str, Any], name: str):
    """Split saved keys into LoRA parts per module path, replaced parameters and embedding base copies."""
    lora: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    saved: dict[str, torch.Tensor] = {}
    base_copies: dict[str, torch.Tensor] = {}
    modules_to_save = list(config.get("modules_to_save") or [])
    for key, tensor in state.items():
        if not key.startswith(PEFT_PREFIX):
            raise ModelError(f"adapter {name!r}: unknown key {key!r} (PEFT LoRA keys start with {PEFT_PREFIX!r})")
        rest = key[len(PEFT_PREFIX):]
        if m := _LORA_KEY.match(rest):
            if m["part"] == "lora_B" and m["suffix"] == ".bias":
                raise ModelError(f"adapter {name!r} has a LoRA bias ({key}): lora_bias is not supported")
            lora[m["path"]][m["part"]] = tensor
        elif m := _BASE_COPY_KEY.match(rest):
            base_copies[f"{m['path']}.{m['param']}"] = tensor
        else:
            # modules_to_save: "<module>.<param>", older files "<module>.modules_to_save.<adapter>.<param>"
            module, _, param = re.sub(r"\.modules_to_save\.[^.]+\.", ".", rest).rpartition(".")
            if not module or not _saved_module(module, modules_to_save):
                what = "a trained bias (bias='all' or 'lora_only')" if param == "bias" else "unknown key"
                raise ModelError(f"adapter {name!r}: {what} {key!r} is not supported")
            saved[f"{module}.{param}"] = tensor
    return lora, saved, base_copies


def _shape_error(name: str, path: str, what: str, got: torch.Size, want: tuple[int, ...]) -> ModelError:
    return ModelError(f"adapter {name!r}: {path} {what} has shape {tuple(got)}, the base model needs {want}")


def _read_module(name: str, path: str, parts: dict[str, torch.Tensor], base: nn.Module,
                 config: dict[str, Any]) -> tuple[bool, LoraModule]:
    """(is_embedding, module) for one targeted module of `base`."""
    target = _submodule(base, path, name)
    r, scale = _scale(config, path)
    embedding = isinstance(target, nn.Embedding)
    if not embedding and not isinstance(target, nn.Linear):
        raise ModelError(f"adapter {name!r} targets {path} ({type(target).__name__}): only Linear and Embedding "
                         f"layers are supported (conv and other layers are not)")
    a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
    missing = [k for k in (a_key, b_key) if k not in parts]
    extra = sorted(set(parts) - {a_key, b_key, "lora_magnitude_vector"})
    if missing or extra:
        raise ModelError(f"adapter {name!r}: {path} ({type(target).__name__}) has parts {sorted(parts)}, "
                         f"expected {a_key} and {b_key}")
    weight = target.weight.detach().float()
    # Linear weight [d_out, d_in]; embedding weight [vocab, d], whose LoRA input is the one-hot over vocab.
    d_out, d_in = (weight.shape[1], weight.shape[0]) if embedding else (weight.shape[0], weight.shape[1])
    a, b = parts[a_key].float(), parts[b_key].float()
    if a.shape != (r, d_in):
        raise _shape_error(name, path, a_key, a.shape, (r, d_in))
    if b.shape != (d_out, r):
        raise _shape_error(name, path, b_key, b.shape, (d_out, r))
    b = b * scale
    magnitude = None
    if "lora_magnitude_vector" in parts:
        m = parts["lora_magnitude_vector"].float()
        if m.shape != (d_out,):
            raise _shape_error(name, path, "lora_magnitude_vector", m.shape, (d_out,))
        # PEFT's DoRA norm: per output feature of W0 + s*B@A (embeddings: per embedding dim, over the vocab).
        w_out_in = weight.T if embedding else weight
        magnitude = (m / torch.linalg.norm(w_out_in + b @ a, dim=1)).contiguous()
    return embedding, LoraModule(a=a.contiguous(), b=b.contiguous(), magnitude=magnitude)


def _replacement(name: str, param_path: str, tensor: torch.Tensor, base: nn.Module) -> torch.Tensor:
    try:
        current = base.get_parameter(param_path)
    except AttributeError:
        raise ModelError(f"adapter {name!r} saves {param_path!r}, which the base model does not have") from None
    if tensor.shape != current.shape:
        raise _shape_error(name, param_path, "saved parameter", tensor.shape, tuple(current.shape))
    return tensor.to(current.dtype).contiguous()  # PEFT loads it into a copy of the base module: base dtype


def _nbytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of distinct tensors (tied aliases in `replaced` share one)."""
    seen = {t.data_ptr(): t.nelement() * t.element_size() for t in tensors}
    return sum(seen.values())


def read_adapter(name: str, folder: Path, base: torch.nn.Module) -> AdapterWeights:
    """The adapter in `folder` as per-module tensors for `base` (the served base model, not modified)."""
    folder = check_adapter_dir(folder)
    config = _config(folder, name)
    digest = content_hash(folder)
    try:
        state = load_file(str(folder / ADAPTER_WEIGHTS), device="cpu")
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ModelError(f"adapter {name!r}: cannot read {folder / ADAPTER_WEIGHTS}: {e}") from e
    lora, saved, base_copies = _group(state, config, name)
    if not lora and not saved:
        raise ModelError(f"adapter {name!r}: {ADAPTER_WEIGHTS} holds no LoRA weights")
    modules: dict[str, LoraModule] = {}
    embeddings: dict[str, LoraModule] = {}
    with torch.no_grad():
        for path, parts in sorted(lora.items()):
            embedding, module = _read_module(name, path, parts, base, config)
            (embeddings if embedding else modules)[path] = module
        replaced = {p: _replacement(name, p, t, base) for p, t in saved.items()}
        aliases = _parameter_aliases(base)
        for param_path, tensor in base_copies.items():
            # PEFT saves targeted embeddings' base weights too; only a changed one (resized / trained) matters,
            # and PEFT loads it into the shared parameter, so every tied alias gets it.
            value = _replacement(name, param_path, tensor, base)
            if not torch.equal(value, base.get_parameter(param_path)):
                replaced.update({alias: value for alias in aliases.get(param_path, [param_path])})
    tensors = [t for m in (*modules.values(), *embeddings.values())
               for t in (m.a, m.b, m.magnitude) if t is not None] + list(replaced.values())
    rank = max((m.a.shape[0] for m in (*modules.values(), *embeddings.values())), default=0)
    return AdapterWeights(name=name, content_hash=digest, rank=rank, modules=modules, embeddings=embeddings,
                          replaced=replaced, nbytes=_nbytes(tensors))
