"""Ragged-batch forward of a Hugging Face Llama-architecture causal LM over a slot KV cache.

One `forward` runs any mix of prefill chunks and decode tokens, each request with its own adapter (or none):
all tokens are flattened into one [T, hidden] matrix so every linear layer runs once per step over the whole
batch (LoRA updates added per row by `multi_lora`); attention is per request against its slot of a
preallocated cache [max_slots, kv_heads, max_len, head_dim] per layer. Decode rows share one masked
attention call; prefill chunks are causal. Only each chunk's last token reaches the output head.

The module weights are the HF model's own (no copies); rotary embeddings come from its `rotary_emb`.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loraforge.errors import ModelError
from loraforge.serve.engine.multi_lora import BaseShapes, LoraRows, MultiLora, check_adapter

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from loraforge.serve.engine.adapter_weights import AdapterWeights

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")  # same decoder layer; attention biases are handled
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass
class SeqChunk:
    slot: int  # KV-cache slot owned by the request
    token_ids: list[int]  # tokens to run now: the prompt (prefill) or the last sampled token (decode)
    start: int  # position of token_ids[0] == number of tokens already cached in the slot
    adapter: AdapterWeights | None  # None = base model


def _check_model(model: nn.Module, max_len: int) -> None:
    """ModelError naming what this runner cannot run: the layer code below is Llama's."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if type(model).__name__.startswith("Peft") or hasattr(model, "peft_config"):
        raise ModelError("ModelRunner takes the plain base model; adapters are passed per request, not loaded into it")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(f"model_type {model_type!r} is not supported by the batching engine "
                         f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    window = getattr(config, "sliding_window", None)
    sliding = model_type == "mistral" or getattr(config, "use_sliding_window", False)
    if sliding and window and window < max_len:  # shorter sequences never reach the window
        raise ModelError(f"{model_type} with sliding-window attention (window {window}) is not supported beyond "
                         f"the window: use max_len <= {window}")
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not hasattr(inner, "rotary_emb") or not hasattr(model, "lm_head"):
        raise ModelError(f"{type(model).__name__} does not have the Llama layout (model.layers, rotary_emb, lm_head)")
    for i, layer in enumerate(layers):
        linears = [getattr(layer.self_attn, n, None) for n in _ATTENTION] + [getattr(layer.mlp, n, None) for n in _MLP]
        if any(type(m) is not nn.Linear for m in linears):
            raise ModelError(f"layer {i} of {model_type} is not plain nn.Linear projections (quantised or changed "
                             f"layers are not supported)")


class ModelRunner:
    """Slot-based KV cache + ragged mixed-adapter forward over an HF Llama-architecture model (eval mode)."""

    def __init__(self, model: PreTrainedModel, max_slots: int, max_len: int):
        if max_slots < 1 or max_len < 1:
            raise ValueError(f"max_slots and max_len must be positive, got {max_slots} and {max_len}")
        _check_model(model, max_len)
        config = model.config
        self.model = model.eval()
        self.max_slots, self.max_len = max_slots, max_len
        self.layers = list(model.model.layers)
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scaling = attn.scaling
        weight = model.model.embed_tokens.weight
        self.dtype, self.device = weight.dtype, weight.device
        self.vocab_size = model.lm_head.out_features
        shape = (max_slots, self.num_kv_heads, max_len, self.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.cached = [0] * max_slots  # tokens held per slot
        self._free = list(range(max_slots))
        self._in_use: set[int] = set()
        norms = [f"model.layers.{i}.{n}" for i in range(len(self.layers))
                 for n in ("input_layernorm", "post_attention_layernorm")]
        self.lora = MultiLora(BaseShapes.of(model, [*norms, "model.norm"]), max_slots, self.dtype, self.device)

    # ------------------------------------------------------------ slots
    def alloc(self) -> int:
        """A free KV slot (the lowest); RuntimeError when all are taken."""
        if not self._free:
            raise RuntimeError(f"all {self.max_slots} KV slots are in use")
        slot = heapq.heappop(self._free)
        self._in_use.add(slot)
        self.cached[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        if slot not in self._in_use:
            raise ValueError(f"slot {slot} is not allocated")
        self._in_use.remove(slot)
        self.cached[slot] = 0
        heapq.heappush(self._free, slot)

    # ------------------------------------------------------------ forward
    def check_adapter(self, adapter: AdapterWeights) -> None:
        """ModelError if the batched forward cannot apply `adapter` to this base (checked before queueing)."""
        check_adapter(adapter, self.lora.shapes)

    @torch.inference_mode()
    def forward(self, chunks: list[SeqChunk]) -> Tensor:
        """[len(chunks), vocab] logits at each chunk's last token; appends the chunks' K/V to their slots."""
        self._check_chunks(chunks)
        batch = self.lora.prepare([c.adapter for c in chunks], [len(c.token_ids) for c in chunks])
        ordered = [chunks[i] for i in batch.order]
        lengths = [len(c.token_ids) for c in ordered]
        ids = torch.tensor([t for c in ordered for t in c.token_ids], device=self.device)
        positions = torch.tensor([c.start + i for c in ordered for i in range(len(c.token_ids))], device=self.device)
        slots = torch.tensor([c.slot for c, n in zip(ordered, lengths, strict=True) for _ in range(n)],
                             device=self.device)
        attention = _AttentionPlan(ordered, lengths, self.device)

        inner = self.model.model
        h = inner.embed_tokens(ids)
        for start, end, saved in batch.rows.saved("model.embed_tokens"):
            h[start:end] = F.embedding(ids[start:end], saved["weight"])
        batch.rows.embedding("model.embed_tokens", ids, h)
        cos, sin = (t[0] for t in inner.rotary_emb(h[None], positions[None]))
        cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
        rows = batch.rows
        for i, layer in enumerate(self.layers):
            prefix = f"model.layers.{i}"
            x = self._norm(layer.input_layernorm, f"{prefix}.input_layernorm", h, rows)
            sa = layer.self_attn
            q = self._linear(sa.q_proj, f"{prefix}.self_attn.q_proj", x, rows).view(-1, self.num_heads, self.head_dim)
            k = self._linear(sa.k_proj, f"{prefix}.self_attn.k_proj", x, rows).view(-1, self.num_kv_heads,
                                                                                      self.head_dim)
            v = self._linear(sa.v_proj, f"{prefix}.self_attn.v_proj", x, rows).view(-1, self.num_kv_heads,
                                                                                      self.head_dim)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            self.k_cache[i][slots, :, positions] = k
            self.v_cache[i][slots, :, positions] = v
            o = attention.run(q, self.k_cache[i], self.v_cache[i], self.scaling)
            h = h + self._linear(sa.o_proj, f"{prefix}.self_attn.o_proj", o.view(o.shape[0], -1), rows)
            x = self._norm(layer.post_attention_layernorm, f"{prefix}.post_attention_layernorm", h, rows)
            mlp = layer.mlp
            gate = self._linear(mlp.gate_proj, f"{prefix}.mlp.gate_proj", x, rows)
            up = self._linear(mlp.up_proj, f"{prefix}.mlp.up_proj", x, rows)
            h = h + self._linear(mlp.down_proj, f"{prefix}.mlp.down_proj", mlp.act_fn(gate) * up, rows)

        for c in ordered:
            self.cached[c.slot] = c.start + len(c.token_ids)
        last = torch.tensor(lengths, device=self.device).cumsum(0) - 1
        h_last = self._norm(inner.norm, "model.norm", h[last], batch.last)
        logits = self._linear(self.model.lm_head, "lm_head", h_last, batch.last)
        out = torch.empty_like(logits)
        out[torch.tensor(batch.order, device=self.device)] = logits
        return out

    def _check_chunks(self, chunks: list[SeqChunk]) -> None:
        if not chunks:
            raise ValueError("forward needs at least one chunk")
        seen: set[int] = set()
        for c in chunks:
            if c.slot not in self._in_use:
                raise ValueError(f"slot {c.slot} is not allocated")
            if c.slot in seen:
                raise ValueError(f"slot {c.slot} appears twice in one forward")
            seen.add(c.slot)
            if not c.token_ids:
                raise ValueError(f"slot {c.slot}: a chunk needs at least one token")
            if not 0 <= c.start <= self.cached[c.slot]:
                raise ValueError(f"slot {c.slot}: chunk starts at {c.start} but {self.cached[c.slot]} tokens are "
                                 f"cached (a chunk continues the cached sequence)")
            if c.start + len(c.token_ids) > self.max_len:
                raise ValueError(f"slot {c.slot}: {c.start + len(c.token_ids)} tokens exceed max_len {self.max_len}")
            if min(c.token_ids) < 0 or max(c.token_ids) >= self.vocab_size:
                raise ValueError(f"slot {c.slot}: token id out of range [0, {self.vocab_size})")

    def _linear(self, module: nn.Linear, path: str, x: Tensor, rows: LoraRows) -> Tensor:
        """The base layer over all rows (rows of an adapter that saved this layer use its copy), then LoRA."""
        y = F.linear(x, module.weight, module.bias)
        for start, end, saved in rows.saved(path):
            y[start:end] = F.linear(x[start:end], saved.get("weight", module.weight), saved.get("bias", module.bias))
        return rows.linear(path, x, y, module.bias)

    def _norm(self, norm: nn.Module, path: str, x: Tensor, rows: LoraRows) -> Tensor:
        """RMSNorm as HF computes it; rows whose adapter saved this norm (modules_to_save) use that weight."""
        eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None) or 1e-6
        x32 = x.to(torch.float32)
        normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
        y = norm.weight * normed
        for start, end, saved in rows.saved(path):
            y[start:end] = saved["weight"] * normed[start:end]
        return y


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _AttentionPlan:
    """Which rows attend how: single-token chunks together in one masked batch, longer chunks causally."""

    def __init__(self, ordered: list[SeqChunk], lengths: list[int], device: torch.device):
        starts = [0]
        for n in lengths[:-1]:
            starts.append(starts[-1] + n)
        decode = [i for i, n in enumerate(lengths) if n == 1]
        self.prefill = [(starts[i], lengths[i], ordered[i].slot, ordered[i].start)
                        for i, n in enumerate(lengths) if n > 1]
        self.decode_rows = torch.tensor([starts[i] for i in decode], dtype=torch.long, device=device)
        self.decode_slots = [ordered[i].slot for i in decode]
        self.decode_lengths = [ordered[i].start + 1 for i in decode]
        self.all_decode = len(decode) == len(lengths)
        if decode:
            self.key_len = max(self.decode_lengths)
            lo, hi = min(self.decode_slots), max(self.decode_slots) + 1
            # A slot range no wider than twice the rows is read as a view; sparser sets gather their slots.
            self.slot_range = (lo, hi) if hi - lo <= 2 * len(decode) else None
            if self.slot_range is None:
                self.slot_index = torch.tensor(self.decode_slots, device=device)
                batch_slot = list(range(len(decode)))
                batch = len(decode)
            else:
                batch_slot = [s - lo for s in self.decode_slots]
                batch = hi - lo
            self.batch_slot = torch.tensor(batch_slot, device=device)
            mask = torch.zeros(batch, self.key_len, dtype=torch.bool, device=device)
            mask[:, 0] = True  # rows of the slot range without a query stay finite; their output is dropped
            for b, n in zip(batch_slot, self.decode_lengths, strict=True):
                mask[b, :n] = True
            self.mask = mask
            self.batch = batch

    def run(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, scaling: float) -> Tensor:
        """q [T, heads, head_dim] (rotated; this step's K/V already in the cache) -> [T, heads, head_dim]."""
        out = torch.empty_like(q) if not self.all_decode else None
        heads, head_dim = q.shape[1], q.shape[2]
        kv_heads = k_cache.shape[1]
        for start, n, slot, pos in self.prefill:
            qc = q[start : start + n].transpose(0, 1)[None]  # [1, heads, n, d]
            kc, vc = k_cache[slot : slot + 1, :, : pos + n], v_cache[slot : slot + 1, :, : pos + n]
            if pos == 0:
                o = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, scale=scaling, enable_gqa=True)
            else:  # query i sits at position pos + i and sees keys 0..pos+i
                allowed = torch.ones(n, pos + n, dtype=torch.bool, device=q.device).tril(pos)
                o = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=allowed, scale=scaling, enable_gqa=True)
            out[start : start + n] = o[0].transpose(0, 1)
        if len(self.decode_slots):
            # Grouped-query attention without repeating K/V: the query heads sharing a KV head form one batch.
            group = heads // kv_heads
            if self.slot_range is not None:
                lo, hi = self.slot_range
                keys, values = k_cache[lo:hi, :, : self.key_len], v_cache[lo:hi, :, : self.key_len]
            else:
                keys = k_cache[:, :, : self.key_len].index_select(0, self.slot_index)
                values = v_cache[:, :, : self.key_len].index_select(0, self.slot_index)
            qd = q.new_zeros(self.batch, heads, head_dim)
            qd[self.batch_slot] = q.index_select(0, self.decode_rows) if out is not None else q
            qd = qd.view(self.batch, kv_heads, group, head_dim)
            scores = torch.matmul(qd, keys.transpose(2, 3)) * scaling  # [B, kv_heads, group, key_len]
            scores = scores.masked_fill(~self.mask[:, None, None, :], float("-inf"))
            o = torch.matmul(scores.softmax(-1), values).view(self.batch, heads, head_dim)[self.batch_slot]
            if out is None:
                return o
            out[self.decode_rows] = o
        return out
