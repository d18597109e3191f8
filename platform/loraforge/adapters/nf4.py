"""NF4 quantisation with double quantisation, written in plain torch (QLoRA, Dettmers et al. 2023).

A weight is flattened row-major and cut into blocks of `blocksize` (64) values. Each block is divided by its
absolute maximum and every value is replaced by the index of the nearest of the 16 NF4 code values (4 bits,
two codes packed per byte, first value in the high nibble as bitsandbytes does). Double quantisation
stores the per-block absmax constants themselves in 8 bits: their mean is subtracted and the centred
constants are quantised blockwise (blocksize 256) with the 8-bit dynamic (floating-point-like) map, keeping
one fp32 scale per 256 constants. That brings the constants from 32/64 = 0.5 to about 8/64 + 32/(64*256)
= 0.127 bits per parameter.

This module is the reference used by ICQ (ir_qlora.py), which quantises `w - tau` per block; its output is
checked against `bitsandbytes.functional.quantize_4bit(..., quant_type="nf4", compress_statistics=True)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NF4_BLOCKSIZE = 64
ABSMAX_BLOCKSIZE = 256

# QLoRA section 3: the k=16 code values are quantiles of N(0, 1). The outermost quantile is taken at the
# midpoint between the last quantile of a 15-bin and of a 16-bin split, offset = ((1 - 1/30) + (1 - 1/32)) / 2
# = 0.9677083, so that the extreme codes stay finite. Eight positive and seven negative quantiles are taken
# on either side of 0.5 and a code of exactly zero is added (so zero padding and zero weights are exact);
# the values are then normalised into [-1, 1].
_NF4_OFFSET = ((1 - 1 / 30) + (1 - 1 / 32)) / 2


def _nf4_code_values() -> Tensor:
    offset = torch.tensor(_NF4_OFFSET, dtype=torch.float64)
    pos_probs = 0.5 + (offset - 0.5) * torch.arange(1, 9, dtype=torch.float64) / 8
    neg_probs = 0.5 + (offset - 0.5) * torch.arange(1, 8, dtype=torch.float64) / 7
    values = torch.cat([-torch.special.ndtri(neg_probs), torch.zeros(1, dtype=torch.float64),
                        torch.special.ndtri(pos_probs)])
    values = values / torch.special.ndtri(offset)
    return torch.sort(values).values.to(torch.float32)


NF4_CODE: Tensor = _nf4_code_values()


def _dynamic_map_values() -> Tensor:
    """The signed 8-bit dynamic map (Dettmers 2015, used by QLoRA for the second quantisation).

    For exponent e = 0..6 it holds 2**e evenly spread fractions in [0.1, 1] (interval midpoints) scaled by
    10**(e - 6), with both signs, plus 0 and 1: 2 * 127 + 2 = 256 values, dense near zero and coarse near one.
    """
    values = [0.0, 1.0]
    for e in range(7):
        n = 2**e
        edges = torch.linspace(0.1, 1.0, n + 1, dtype=torch.float64)
        mids = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (e - 6)
        values += mids.tolist() + (-mids).tolist()
    return torch.sort(torch.tensor(values, dtype=torch.float64)).values.to(torch.float32)


DYNAMIC_8BIT_CODE: Tensor = _dynamic_map_values()


def nearest_code(x: Tensor, code: Tensor) -> Tensor:
    """Index of the nearest value of the sorted `code` for every element of `x` (ties go to the lower code)."""
    bounds = (code[:-1] + code[1:]) / 2
    return torch.bucketize(x.contiguous(), bounds.to(x.device)).to(torch.uint8)


def _blocks(flat: Tensor, blocksize: int) -> Tensor:
    """`flat` zero-padded to whole blocks, shaped [n_blocks, blocksize]; zeros change no absmax."""
    pad = (-flat.numel()) % blocksize
    return F.pad(flat, (0, pad)).view(-1, blocksize)


def absmax_normalise(blocks: Tensor) -> tuple[Tensor, Tensor]:
    absmax = blocks.abs().amax(dim=1)
    # An all-zero block has absmax 0: divide by 1 instead, every value then maps to the zero code.
    normed = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax)).unsqueeze(1)
    return normed.clamp_(-1, 1), absmax


def quantize_blockwise_8bit(x: Tensor, blocksize: int = ABSMAX_BLOCKSIZE) -> tuple[Tensor, Tensor]:
    """8-bit dynamic-map codes of a 1-D tensor, blockwise absmax scaled: (codes uint8 [n], absmax fp32 [blocks])."""
    flat = x.reshape(-1).float()
    normed, absmax = absmax_normalise(_blocks(flat, blocksize))
    return nearest_code(normed.reshape(-1)[: flat.numel()], DYNAMIC_8BIT_CODE), absmax


def dequantize_blockwise_8bit(codes: Tensor, absmax: Tensor, blocksize: int = ABSMAX_BLOCKSIZE) -> Tensor:
    values = _blocks(DYNAMIC_8BIT_CODE.to(codes.device)[codes.long()], blocksize) * absmax.unsqueeze(1)
    return values.reshape(-1)[: codes.numel()]


@dataclass
class NF4Tensor:
    """A weight stored in NF4. With double quantisation `absmax` is None and the block scales are
    `absmax_codes` (uint8, one per block) * `absmax_scale` (fp32, one per 256 blocks) + `absmax_offset`."""

    packed: Tensor  # uint8 [ceil(numel / 2)], two 4-bit code indices per byte, first in the high nibble
    shape: tuple[int, ...]
    dtype: torch.dtype  # dtype of the original weight, restored by dequantize
    blocksize: int
    absmax: Tensor | None = None  # fp32 [n_blocks], without double quantisation
    absmax_codes: Tensor | None = None  # uint8 [n_blocks]
    absmax_scale: Tensor | None = None  # fp32 [ceil(n_blocks / 256)]
    absmax_offset: Tensor | None = None  # fp32 scalar: mean of the absmax constants
    absmax_blocksize: int = ABSMAX_BLOCKSIZE

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def double_quant(self) -> bool:
        return self.absmax is None

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)}

    def codes(self) -> Tensor:
        """Unpacked code indices (uint8 in 0..15), flat, `numel` long."""
        out = torch.stack([self.packed >> 4, self.packed & 0x0F], dim=1).reshape(-1)
        return out[: self.numel]

    def block_absmax(self) -> Tensor:
        """The per-block scales used to dequantise (after undoing the double quantisation)."""
        if self.absmax is not None:
            return self.absmax
        assert self.absmax_codes is not None and self.absmax_scale is not None and self.absmax_offset is not None
        centred = dequantize_blockwise_8bit(self.absmax_codes, self.absmax_scale, self.absmax_blocksize)
        return centred + self.absmax_offset

    def dequantize(self) -> Tensor:
        values = _blocks(NF4_CODE.to(self.packed.device)[self.codes().long()], self.blocksize)
        values = values * self.block_absmax().unsqueeze(1)
        return values.reshape(-1)[: self.numel].reshape(self.shape).to(self.dtype)

    def to(self, device: torch.device | str) -> NF4Tensor:
        moved = {name: t.to(device) for name, t in self.tensors().items()}
        return NF4Tensor(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **moved})


def quantize_nf4(w: Tensor, blocksize: int = NF4_BLOCKSIZE, double_quant: bool = True,
                 absmax_blocksize: int = ABSMAX_BLOCKSIZE) -> NF4Tensor:
    """Blockwise absmax NF4 quantisation of any float tensor (flattened row-major, last block may be short)."""
    if not torch.is_floating_point(w):
        raise TypeError(f"quantize_nf4 needs a floating-point tensor, got {w.dtype}")
    if blocksize < 2 or blocksize % 2:
        raise ValueError(f"blocksize must be an even number >= 2, got {blocksize}")
    if w.numel() == 0:
        raise ValueError("quantize_nf4 got an empty tensor")
    flat = w.detach().reshape(-1).float()
    normed, absmax = absmax_normalise(_blocks(flat, blocksize))
    codes = nearest_code(normed.reshape(-1)[: flat.numel()], NF4_CODE)
    if codes.numel() % 2:
        codes = F.pad(codes, (0, 1))  # pad with code 0; it is cut off again on unpacking
    packed = (codes[0::2] << 4) | codes[1::2]
    q = NF4Tensor(packed=packed, shape=tuple(w.shape), dtype=w.dtype, blocksize=blocksize,
                  absmax_blocksize=absmax_blocksize)
    if not double_quant:
        q.absmax = absmax
        return q
    # QLoRA: the absmax constants are positive, so centre them (their mean) to use the signed map's range.
    offset = absmax.mean()
    q.absmax_codes, q.absmax_scale = quantize_blockwise_8bit(absmax - offset, absmax_blocksize)
    q.absmax_offset = offset
    return q


def dequantize_nf4(q: NF4Tensor) -> Tensor:
    return q.dequantize()


def nf4_bytes(q: NF4Tensor) -> int:
    """Bytes the quantised weight takes: packed codes plus the (double-quantised) block constants."""
    return sum(t.numel() * t.element_size() for t in q.tensors().values())


def largest_code_gap() -> float:
    """The widest gap between adjacent NF4 code values: twice the worst normalised rounding error."""
    return float((NF4_CODE[1:] - NF4_CODE[:-1]).max())


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4 and dequantised on every forward pass."""

    def __init__(self, q: NF4Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        if len(q.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-D weight, got shape {q.shape}")
        self.out_features, self.in_features = q.shape
        self._meta = {"shape": q.shape, "dtype": q.dtype, "blocksize": q.blocksize,
                      "absmax_blocksize": q.absmax_blocksize}
        self._names = list(q.tensors())
        for name, t in q.tensors().items():
            self.register_buffer(name, t)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = NF4_BLOCKSIZE, double_quant: bool = True) -> NF4Linear:
        return cls(quantize_nf4(linear.weight.data, blocksize, double_quant), linear.bias)

    def quantized(self) -> NF4Tensor:
        return NF4Tensor(**self._meta, **{name: getattr(self, name) for name in self._names})

    def dequantized_weight(self) -> Tensor:
        return self.quantized().dequantize()

    def weight_bytes(self) -> int:
        return nf4_bytes(self.quantized())

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            w = self.dequantized_weight().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, blocksize={self._meta['blocksize']}"


def quantize_linears(model: nn.Module, skip: tuple[str, ...] = ("lm_head",), blocksize: int = NF4_BLOCKSIZE,
                     double_quant: bool = True) -> dict[str, NF4Linear]:
    """Replace every nn.Linear of `model` (except names ending in `skip`) by an NF4Linear, in place."""
    replaced: dict[str, NF4Linear] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name.split(".")[-1] in skip:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        replaced[name] = NF4Linear.from_linear(module, blocksize, double_quant)
        setattr(parent, child, replaced[name])
    return replaced


__all__ = [
    "ABSMAX_BLOCKSIZE", "DYNAMIC_8BIT_CODE", "absmax_normalise", "NF4_BLOCKSIZE", "NF4_CODE", "NF4Linear", "NF4Tensor",
    "dequantize_blockwise_8bit", "dequantize_nf4", "largest_code_gap", "nearest_code", "nf4_bytes",
    "quantize_blockwise_8bit", "quantize_linears", "quantize_nf4",
]
