"""IR-QLoRA (Qin et al. 2024, "Accurate LoRA-Finetuning Quantization of LLMs via Information Retention").

Two parts, both following the official code (github.com/htqin/IR-QLoRA, utils.py):

ICQ, information calibration quantisation. Each 64-value block w is quantised as NF4(w - tau) + tau with a
per-block constant tau chosen to maximise the Shannon entropy of the block's 16-bin histogram of NF4 codes
(more evenly used codes carry more information). The search starts at the block median tau0 and tries
    tau = tau0 + f * absmax(w - tau0),   f in linspace(-lambda * sigma, lambda * sigma, 2 * n + 1),
with sigma = 1 / Phi^-1(0.9677083) (the standard deviation of N(0, 1) in NF4's normalised units, i.e. a
block's std expressed as a share of its absmax), lambda = 0.1 and n = 100 (official `tau_lambda`, `tau_n`
defaults of irlora.py). Like the official code, the codes are those of w - tau with the exact tau, and tau
itself is stored in 8 bits: the dynamic map, scaled by the absmax of each group of 256 taus.
Deviation: on entropy ties we keep the candidate closest to the median (the official loop keeps the most
negative shift); this only changes which of equally informative codes is stored and makes "the chosen
entropy is never below the median start's" hold by construction.

IEC, information elastic connection. A LoRA layer over the quantised base with two parameter-free
shortcuts, each weighted by a learnable scalar that starts at 0:
    h = W_q x + s * (B + beta R)(A + alpha_iec G) x
where G x averages the input over r contiguous groups (so it has A's output size r) and R repeats each of
the r entries of A's output over a contiguous group of d_out / r outputs (the official reshape-and-add).
With both scalars at zero this is exactly QLoRA; the whole update is linear in x, so it merges into
the weight as s (B + beta R)(A + alpha_iec G).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loraforge.adapters.nf4 import (
    ABSMAX_BLOCKSIZE,
    NF4_BLOCKSIZE,
    NF4_CODE,
    NF4Linear,
    NF4Tensor,
    absmax_normalise,
    dequantize_blockwise_8bit,
    nearest_code,
    nf4_bytes,
    quantize_blockwise_8bit,
    quantize_nf4,
)

# Official utils.py: sigma = 1 / norm.ppf(0.9677083), the NF4 offset quantile.
ICQ_SIGMA = float(1.0 / torch.special.ndtri(torch.tensor(((1 - 1 / 30) + (1 - 1 / 32)) / 2, dtype=torch.float64)))
TAU_LAMBDA = 0.1
TAU_N = 100


def code_entropy(codes: Tensor, n_codes: int = 16) -> Tensor:
    """Shannon entropy in bits of each row's histogram of code indices: [n_blocks, blocksize] -> [n_blocks]."""
    counts = torch.zeros(codes.shape[0], n_codes, dtype=torch.float32, device=codes.device)
    counts.scatter_add_(1, codes.long(), torch.ones_like(codes, dtype=torch.float32))
    p = counts / codes.shape[1]
    return -(p * torch.log2(torch.where(p > 0, p, torch.ones_like(p)))).sum(dim=1)


def nf4_block_codes(blocks: Tensor) -> Tensor:
    """NF4 code indices of each row of [n_blocks, blocksize] under its own absmax (no double quant needed:
    the codes depend only on the exact absmax)."""
    normed, _ = absmax_normalise(blocks)
    return nearest_code(normed, NF4_CODE)


def _weight_blocks(w: Tensor, blocksize: int) -> Tensor:
    if w.numel() % blocksize:
        raise ValueError(f"ICQ needs numel divisible by blocksize {blocksize}, got shape {tuple(w.shape)}")
    return w.detach().reshape(-1, blocksize).float()


def icq_factors(tau_lambda: float = TAU_LAMBDA, tau_n: int = TAU_N) -> Tensor:
    """The 2 n + 1 relative shifts, ordered by distance from 0 (0 first) so ties keep the smaller shift."""
    if tau_n < 0 or tau_lambda < 0:
        raise ValueError(f"tau_lambda and tau_n must be >= 0, got {tau_lambda}, {tau_n}")
    steps = torch.arange(-tau_n, tau_n + 1, dtype=torch.float64)
    factors = steps * (tau_lambda * ICQ_SIGMA / max(tau_n, 1))
    return factors[torch.argsort(steps.abs(), stable=True)].to(torch.float32)


def icq_search(w: Tensor, blocksize: int = NF4_BLOCKSIZE, tau_lambda: float = TAU_LAMBDA,
               tau_n: int = TAU_N) -> tuple[Tensor, Tensor, Tensor]:
    """Per block: (chosen tau, its code entropy, the entropy at the median start tau0)."""
    blocks = _weight_blocks(w, blocksize)
    tau0 = blocks.median(dim=1).values  # lower median for even sizes, like torch in the official code
    spread = (blocks - tau0[:, None]).abs().amax(dim=1)
    best_tau, best_h, median_h = tau0.clone(), None, None
    for f in icq_factors(tau_lambda, tau_n):
        tau = tau0 + f * spread
        h = code_entropy(nf4_block_codes(blocks - tau[:, None]))
        if best_h is None:  # the first factor is 0: the median start
            best_h, median_h = h, h.clone()
            continue
        better = h > best_h
        best_tau = torch.where(better, tau, best_tau)
        best_h = torch.where(better, h, best_h)
    assert best_h is not None and median_h is not None
    return best_tau, best_h, median_h


@dataclass
class ICQTensor:
    """NF4 codes of w - tau plus the per-block tau (8-bit dynamic map x fp32 absmax per 256 taus, or fp32)."""

    nf4: NF4Tensor
    tau_codes: Tensor | None  # uint8 [n_blocks]
    tau_absmax: Tensor | None  # fp32 [ceil(n_blocks / 256)]
    tau_fp: Tensor | None = None  # fp32 [n_blocks], when tau is kept unquantised
    tau_blocksize: int = ABSMAX_BLOCKSIZE

    def taus(self) -> Tensor:
        if self.tau_fp is not None:
            return self.tau_fp
        assert self.tau_codes is not None and self.tau_absmax is not None
        return dequantize_blockwise_8bit(self.tau_codes, self.tau_absmax, self.tau_blocksize)

    def dequantize(self) -> Tensor:
        q = self.nf4
        w = q.dequantize().float().reshape(-1, q.blocksize) + self.taus()[:, None]
        return w.reshape(q.shape).to(q.dtype)

    def tensors(self) -> dict[str, Tensor]:
        own = {"tau_codes": self.tau_codes, "tau_absmax": self.tau_absmax, "tau_fp": self.tau_fp}
        return {**{f"nf4_{k}": v for k, v in self.nf4.tensors().items()},
                **{k: v for k, v in own.items() if v is not None}}

    def nbytes(self) -> int:
        return nf4_bytes(self.nf4) + sum(t.numel() * t.element_size() for t in
                                         (self.tau_codes, self.tau_absmax, self.tau_fp) if t is not None)

    def block_entropy(self) -> Tensor:
        return code_entropy(self.nf4.codes().reshape(-1, self.nf4.blocksize))


def icq_quantize(w: Tensor, blocksize: int = NF4_BLOCKSIZE, tau_lambda: float = TAU_LAMBDA, tau_n: int = TAU_N,
                 double_quant: bool = True, quantize_tau: bool = True) -> tuple[ICQTensor, Tensor, Tensor]:
    """ICQ-quantise `w`: (quantised weight, chosen tau per block (exact), entropy of the stored codes per block)."""
    if not torch.is_floating_point(w) or w.dim() < 1:
        raise TypeError(f"icq_quantize needs a floating-point tensor, got {w.dtype} of shape {tuple(w.shape)}")
    tau, _, _ = icq_search(w, blocksize, tau_lambda, tau_n)
    shifted = (_weight_blocks(w, blocksize) - tau[:, None]).reshape(w.shape)
    nf4 = quantize_nf4(shifted, blocksize, double_quant)
    nf4.dtype = w.dtype
    if quantize_tau:
        codes, absmax = quantize_blockwise_8bit(tau, ABSMAX_BLOCKSIZE)
        q = ICQTensor(nf4=nf4, tau_codes=codes, tau_absmax=absmax)
    else:
        q = ICQTensor(nf4=nf4, tau_codes=None, tau_absmax=None, tau_fp=tau.clone())
    return q, tau, q.block_entropy()


def nf4_entropy(w: Tensor, blocksize: int = NF4_BLOCKSIZE) -> Tensor:
    """Per-block code entropy of plain NF4 (tau = 0), the baseline ICQ is compared with."""
    return code_entropy(nf4_block_codes(_weight_blocks(w, blocksize)))


class ICQLinear(nn.Module):
    """A frozen linear layer stored as ICQ (NF4 codes + per-block tau), dequantised on every forward."""

    def __init__(self, q: ICQTensor, bias: Tensor | None = None) -> None:
        super().__init__()
        if len(q.nf4.shape) != 2:
            raise ValueError(f"ICQLinear needs a 2-D weight, got shape {q.nf4.shape}")
        self.out_features, self.in_features = q.nf4.shape
        nf4 = q.nf4
        self._nf4_meta = {k: getattr(nf4, k) for k in ("shape", "dtype", "blocksize", "absmax_blocksize")}
        self._nf4_names = list(nf4.tensors())
        self._tau_blocksize = q.tau_blocksize
        for name, t in q.tensors().items():  # buffers so .to()/state_dict see the quantised storage
            self.register_buffer(name, t)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, **icq_kwargs) -> ICQLinear:
        q, _, _ = icq_quantize(linear.weight.data, **icq_kwargs)
        return cls(q, linear.bias)

    def quantized(self) -> ICQTensor:
        nf4 = NF4Tensor(**self._nf4_meta, **{k: getattr(self, f"nf4_{k}") for k in self._nf4_names})
        own = {k: getattr(self, k) for k in ("tau_codes", "tau_absmax", "tau_fp") if k in self._buffers}
        return ICQTensor(nf4=nf4, tau_codes=own.get("tau_codes"), tau_absmax=own.get("tau_absmax"),
                         tau_fp=own.get("tau_fp"), tau_blocksize=self._tau_blocksize)

    def dequantized_weight(self) -> Tensor:
        return self.quantized().dequantize()

    def weight_bytes(self) -> int:
        return self.quantized().nbytes()

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            w = self.dequantized_weight().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))


def group_average(x: Tensor, groups: int) -> Tensor:
    """[..., d] -> [..., groups]: the mean of each of `groups` contiguous slices of the last dimension."""
    return x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups).mean(dim=-1)


def group_repeat(z: Tensor, size: int) -> Tensor:
    """[..., r] -> [..., size]: entry i repeated over the i-th contiguous slice of size / r outputs."""
    return z.repeat_interleave(size // z.shape[-1], dim=-1)


def iec_lora_delta(x: Tensor, lora_a: Tensor, lora_b: Tensor, scale_a: Tensor, scale_b: Tensor,
                   scaling: float) -> Tensor:
    """The IEC LoRA branch s * (B + beta R)(A + alpha G) x for weights A [r, d_in], B [d_out, r]."""
    r = lora_a.shape[0]
    z = F.linear(x, lora_a) + scale_a * group_average(x, r)
    return scaling * (F.linear(z, lora_b) + scale_b * group_repeat(z, lora_b.shape[0]))


def _frozen_linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    lin.requires_grad_(False)
    return lin


class IECLoRALinear(nn.Module):
    """LoRA with information elastic connections over a frozen (quantised) base layer.

    `base` is any module computing W x + b with `in_features`/`out_features` (NF4Linear, ICQLinear, a
    bitsandbytes Linear4bit, nn.Linear) or a weight tensor [d_out, d_in] (wrapped as a frozen nn.Linear).
    A starts Kaiming-uniform and B at zero as in LoRA/PEFT; the IEC scalars start at zero. Parameter names
    start with `lora_` so PEFT-style state-dict filters keep them.
    """

    def __init__(self, base: nn.Module | Tensor, r: int, alpha: float, *, bias: Tensor | None = None,
                 dropout: float = 0.0, use_rslora: bool = False) -> None:
        super().__init__()
        self.base = _frozen_linear(base, bias) if isinstance(base, Tensor) else base
        self.base.requires_grad_(False)
        self.in_features, self.out_features = int(self.base.in_features), int(self.base.out_features)
        if r < 1 or self.in_features % r or self.out_features % r:
            raise ValueError(f"IEC needs r >= 1 dividing in_features={self.in_features} and "
                             f"out_features={self.out_features}, got r={r}")
        self.r, self.alpha = r, alpha
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        ref = next(iter([*self.base.parameters(), *self.base.buffers()]), None)
        device = ref.device if ref is not None else None
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_iec_scale_a = nn.Parameter(torch.zeros(1, device=device))
        self.lora_iec_scale_b = nn.Parameter(torch.zeros(1, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def lora_delta(self, x: Tensor) -> Tensor:
        dtype = self.lora_A.dtype
        delta = iec_lora_delta(self.dropout(x.to(dtype)), self.lora_A, self.lora_B, self.lora_iec_scale_a,
                               self.lora_iec_scale_b, self.scaling)
        return delta.to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.lora_delta(x)

    def effective_factors(self) -> tuple[Tensor, Tensor]:
        """(A + alpha G [r, d_in], B + beta R [d_out, r]): a plain rank-r LoRA with the same scaling that
        reproduces this layer exactly, e.g. to export it as a standard PEFT adapter."""
        r = self.r
        eye_in = torch.eye(self.in_features, device=self.lora_A.device, dtype=self.lora_A.dtype)
        eye_r = torch.eye(r, device=self.lora_A.device, dtype=self.lora_A.dtype)
        a_eff = self.lora_A + self.lora_iec_scale_a * group_average(eye_in, r).T  # G is [r, d_in]
        b_eff = self.lora_B + self.lora_iec_scale_b * group_repeat(eye_r, self.out_features).T  # R is [d_out, r]
        return a_eff, b_eff

    def delta_weight(self) -> Tensor:
        """s (B + beta R)(A + alpha G) as a [d_out, d_in] matrix: what merging adds to the base weight."""
        a_eff, b_eff = self.effective_factors()
        return self.scaling * b_eff @ a_eff


def replace_with_ir_qlora(model: nn.Module, r: int, alpha: float, *, skip: tuple[str, ...] = ("lm_head",),
                          use_icq: bool = True, quantized: Mapping[str, ICQTensor | NF4Tensor] | None = None,
                          dropout: float = 0.0, use_rslora: bool = False, **icq_kwargs) -> dict[str, IECLoRALinear]:
    """Freeze `model` and replace each nn.Linear (except `skip`) by an IECLoRALinear over its ICQ (or plain
    NF4 when `use_icq` is False) quantisation, in place. `quantized` may supply precomputed weights by name."""
    model.requires_grad_(False)
    replaced: dict[str, IECLoRALinear] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name.split(".")[-1] in skip:
            continue
        q = (quantized or {}).get(name)
        if q is None:
            q = icq_quantize(module.weight.data, **icq_kwargs)[0] if use_icq else quantize_nf4(module.weight.data)
        base = ICQLinear(q, module.bias) if isinstance(q, ICQTensor) else NF4Linear(q, module.bias)
        parent_name, _, child = name.rpartition(".")
        replaced[name] = IECLoRALinear(base, r, alpha, dropout=dropout, use_rslora=use_rslora)
        setattr(model.get_submodule(parent_name) if parent_name else model, child, replaced[name])
    return replaced


__all__ = [
    "ICQ_SIGMA", "ICQLinear", "ICQTensor", "IECLoRALinear", "TAU_LAMBDA", "TAU_N", "code_entropy",
    "group_average", "group_repeat", "icq_factors", "icq_quantize", "icq_search", "iec_lora_delta",
    "nf4_block_codes", "nf4_entropy", "replace_with_ir_qlora",
]
