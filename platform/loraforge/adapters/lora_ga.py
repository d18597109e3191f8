"""LoRA-GA (Wang et al. 2024, "LoRA-GA: Low-Rank Adaptation with Gradient Approximation"), official init.

LoRA-GA initialises A and B so that the first gradient step of the low-rank product moves the weight along
the best rank-2r approximation of the full fine-tuning gradient:

1. `estimate_gradients`: the full-weight gradient G of every target linear layer, averaged over a few
   batches (and over workers through `reduce`).
2. `lora_ga_init`: G = U S V^T; with the official default direction "ArB2r", A = V^T[:r] (the top r right
   singular vectors) and B = U[:, r:2r] (the next r left singular vectors). For plain SGD with learning
   rate eta the first step then changes the effective weight by
       dW = -eta s^2 (B B^T G + G A^T A) = -eta s^2 c^2 sum_{i <= 2r} sigma_i u_i v_i^T,
   where s is the LoRA scaling and c the common factor of A and B: exactly the best rank-2r approximation
   of -G. Both A and B are multiplied by the same "stable" factor c = d_out^(1/4) / sqrt(gamma) (paper,
   section 3.3; official code Outsider565/LoRA-GA, peft/src/peft/tuners/lora/layer.py, `lora_ga_init`,
   branch `scale == "stable"`: `B = B * m**0.25 / gamma**0.5; A = A * m**0.25 / gamma**0.5` with m =
   feature_out), which keeps the output scale independent of the width. Since B A != 0, the base weight
   is offset, W0 <- W0 - s B A, so the model's output at initialisation is unchanged.
3. `apply_lora_ga`: writes A, B and the offset W0 into a PEFT LoRA model built with ordinary init.

PEFT's own `lora_ga` (peft 0.21) differs: it multiplies B by diag(S[r:2r]) and applies the stable factor to
B only, leaving A unscaled. Then B B^T G weights the B-block directions by sigma_i^3 instead of sigma_i, so
the first step is no longer the rank-2r approximation of the gradient; `peft_style_lora_ga_init`
reproduces it for the comparison test.

Saving: the trained adapter only makes sense on the offset base. PEFT converts it into a plain rank-2r LoRA
for the original base (B' = [B | B0], A' = [A ; -A0]) with
`save_pretrained(out, path_initial_model_for_weight_conversion=<dir of the adapter saved right after init>)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

Direction = Literal["ArB2r", "A2rBr", "ArBr"]
Scale = Literal["stable", "unit", "gd"]
SvdMethod = Literal["exact", "lowrank"]
LossFn = Callable[[nn.Module, Any], Tensor]


def default_loss(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """The model's own loss (Hugging Face causal LMs return `.loss` when `labels` are in the batch)."""
    out = model(**batch)
    if getattr(out, "loss", None) is None:
        raise ValueError("the model returned no loss: pass batches with `labels` or a `loss_fn`")
    return out.loss


def linear_names(model: nn.Module, skip: Sequence[str] = ("lm_head",)) -> list[str]:
    """Names of every nn.Linear in `model` except those whose last name part is in `skip`."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] not in skip]


def estimate_gradients(
    model: nn.Module,
    batches: Iterable[Any],
    target_names: Sequence[str] | None = None,
    loss_fn: LossFn = default_loss,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """Average gradient of each target Linear's weight over `batches` (fp32, on the weight's device).

    Only the target weights require grad during the pass (cheaper, and nothing else accumulates); the
    previous requires_grad flags are restored afterwards and every `.grad` is left cleared. The model's
    train/eval mode is left as the caller set it (eval turns dropout off). For a distributed pass every
    worker runs this on its shard with `reduce` = a SUM all-reduce (e.g. `lambda t: (dist.all_reduce(t),
    t)[1]`): the per-worker gradient sums and batch counts are both reduced, so the result is the mean
    over all batches even when workers saw different numbers of batches.
    """
    names = list(target_names) if target_names is not None else linear_names(model)
    if not names:
        raise ValueError("estimate_gradients: no target linear layers")
    modules = dict(model.named_modules())
    missing = [n for n in names if not isinstance(modules.get(n), nn.Linear)]
    if missing:
        raise ValueError(f"estimate_gradients: not nn.Linear modules of the model: {missing[:5]}")
    weights = {n: modules[n].weight for n in names}

    flags = {p: p.requires_grad for p in model.parameters()}
    sums = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in weights.items()}
    count = 0
    try:
        for p in flags:
            p.requires_grad_(False)
            p.grad = None
        for w in weights.values():
            w.requires_grad_(True)
        with torch.enable_grad():
            for batch in batches:
                loss_fn(model, batch).backward()
                for n, w in weights.items():
                    if w.grad is not None:  # a layer the loss does not reach has zero gradient
                        sums[n] += w.grad.float()
                        w.grad = None
                count += 1
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
    total = torch.tensor(float(count), device=next(iter(sums.values())).device)
    if reduce is not None:
        sums = {n: reduce(s) for n, s in sums.items()}
        total = reduce(total)
    if float(total) == 0:
        raise ValueError("estimate_gradients: no batches")
    return {n: s / total for n, s in sums.items()}


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _check(weight: Tensor, grad: Tensor, r: int) -> None:
    if weight.dim() != 2 or weight.shape != grad.shape:
        raise ValueError(f"weight {tuple(weight.shape)} and grad {tuple(grad.shape)} must be equal 2-D shapes")
    if r < 1 or 2 * r > min(grad.shape):
        raise ValueError(f"LoRA-GA needs 1 <= 2r <= min(d_out, d_in) = {min(grad.shape)}, got r={r}")
    if not torch.isfinite(grad).all():
        raise ValueError("LoRA-GA: the gradient has non-finite values")


def gradient_svd(grad: Tensor, r: int, svd: SvdMethod = "exact") -> tuple[Tensor, Tensor, Tensor]:
    """U [d_out, 2r], S [2r], Vh [2r, d_in] of the gradient, in float64.

    "exact" is a full SVD, under which the first-step property holds to float precision; "lowrank" is the
    randomised `torch.svd_lowrank(q=4r, niter=4)` the official code uses to stay fast on 7B-sized layers.
    """
    g = grad.detach().to(torch.float64)
    if svd == "exact":
        u, s, vh = torch.linalg.svd(g, full_matrices=False)
    elif svd == "lowrank":
        u, s, v = torch.svd_lowrank(g, q=min(4 * r, min(g.shape)), niter=4)
        vh = v.T
    else:
        raise ValueError(f"unknown svd method {svd!r}; known: exact, lowrank")
    return u[:, : 2 * r], s[: 2 * r], vh[: 2 * r]


def _split(u: Tensor, s: Tensor, vh: Tensor, r: int, direction: Direction) -> tuple[Tensor, Tensor, Tensor]:
    """(A rows of Vh, B columns of U, the singular values that go with B) for the official directions."""
    if direction == "ArB2r":  # official default: A <- v_1..v_r, B <- u_{r+1}..u_{2r}
        return vh[:r], u[:, r : 2 * r], s[r : 2 * r]
    if direction == "A2rBr":
        return vh[r : 2 * r], u[:, :r], s[:r]
    if direction == "ArBr":  # interleaved: B takes the even, A the odd indices
        return vh[1 : 2 * r : 2], u[:, 0 : 2 * r : 2], s[0 : 2 * r : 2]
    raise ValueError(f"unknown direction {direction!r}; known: ArB2r, A2rBr, ArBr")


def _offset(weight: Tensor, a: Tensor, b: Tensor, scaling: float) -> tuple[Tensor, Tensor, Tensor]:
    """A, B cast to the weight's dtype and W0 - s B A computed in float64 from those cast values, so that
    W0' x + s B (A x) reproduces W0 x up to the rounding of the forward pass itself."""
    a_out, b_out = a.to(weight.dtype), b.to(weight.dtype)
    new_w = weight.detach().to(torch.float64) - scaling * (b_out.to(torch.float64) @ a_out.to(torch.float64))
    return a_out.contiguous(), b_out.contiguous(), new_w.to(weight.dtype)


def lora_ga_init(
    weight: Tensor,
    grad: Tensor,
    r: int,
    alpha: float,
    stable_gamma: float = 16.0,
    *,
    use_rslora: bool = False,
    direction: Direction = "ArB2r",
    scale: Scale = "stable",
    svd: SvdMethod = "exact",
) -> tuple[Tensor, Tensor, Tensor]:
    """The official LoRA-GA initialisation of one linear layer: (A [r, d_in], B [d_out, r], offset W0).

    `weight` is [d_out, d_in] (nn.Linear layout) and `grad` its averaged full gradient. Scales (official
    names): "stable" multiplies A and B by d_out^(1/4)/sqrt(gamma); "gd" divides both by the LoRA scaling;
    "unit" leaves the orthonormal singular vectors as they are.
    """
    _check(weight, grad, r)
    scaling = lora_scaling(r, alpha, use_rslora)
    u, s, vh = gradient_svd(grad, r, svd)
    a, b, _ = _split(u, s, vh, r, direction)
    if scale == "stable":
        c = weight.shape[0] ** 0.25 / math.sqrt(stable_gamma)
        a, b = a * c, b * c
    elif scale == "gd":
        a, b = a / scaling, b / scaling
    elif scale != "unit":
        raise ValueError(f"unknown scale {scale!r}; known: stable, unit, gd")
    return _offset(weight, a, b, scaling)


def peft_style_lora_ga_init(
    weight: Tensor,
    grad: Tensor,
    r: int,
    alpha: float,
    stable_gamma: float = 16.0,
    *,
    use_rslora: bool = False,
    direction: Direction = "ArB2r",
    svd: SvdMethod = "exact",
) -> tuple[Tensor, Tensor, Tensor]:
    """PEFT 0.21's `lora_ga` init (scale="stable"): B = U_b diag(S_b) d_out^(1/4)/sqrt(gamma), A = V_a^T unscaled.

    Kept only to show in a test how it departs from the paper (PEFT also uses `svd_lowrank`; `svd="exact"`
    here isolates the difference in scaling).
    """
    _check(weight, grad, r)
    scaling = lora_scaling(r, alpha, use_rslora)
    u, s, vh = gradient_svd(grad, r, svd)
    a, b, s_b = _split(u, s, vh, r, direction)
    b = b * s_b * (weight.shape[0] ** 0.25 / math.sqrt(stable_gamma))
    return _offset(weight, a, b, scaling)


def _lora_layers(peft_model: nn.Module, adapter: str) -> dict[str, nn.Module]:
    """PEFT LoRA layers holding `adapter`, keyed by the name of the wrapped Linear in the base model."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            key = name.removeprefix("base_model.model.")
            out[key] = module
    return out


def apply_lora_ga(
    peft_model: nn.Module,
    grads: Mapping[str, Tensor],
    stable_gamma: float = 16.0,
    *,
    adapter_name: str = "default",
    direction: Direction = "ArB2r",
    scale: Scale = "stable",
    svd: SvdMethod = "exact",
    init: Callable[..., tuple[Tensor, Tensor, Tensor]] = lora_ga_init,
) -> list[str]:
    """Write LoRA-GA's A, B and offset base weight into every LoRA layer of a PEFT model; returns their names.

    `grads` is keyed by the base model's Linear names (as `estimate_gradients` returns them on the
    unwrapped model). Rank, alpha and rsLoRA come from the PEFT config, so the layer's own scaling is used.
    """
    config = peft_model.peft_config[adapter_name]
    layers = _lora_layers(peft_model, adapter_name)
    if not layers:
        raise ValueError(f"apply_lora_ga: the model has no LoRA layers for adapter {adapter_name!r}")
    missing = sorted(set(layers) - set(grads))
    if missing:
        raise ValueError(f"apply_lora_ga: no gradient for LoRA layers {missing[:5]} (of {len(missing)})")
    done = []
    for name, layer in layers.items():
        base = layer.get_base_layer()
        if not isinstance(base, nn.Linear) or getattr(layer, "fan_in_fan_out", False):
            raise TypeError(f"apply_lora_ga supports nn.Linear layers only, {name} is {type(base).__name__}")
        kwargs: dict[str, Any] = {"use_rslora": bool(config.use_rslora), "direction": direction, "svd": svd}
        if init is lora_ga_init:
            kwargs["scale"] = scale
        with torch.no_grad():
            a, b, new_w = init(base.weight, grads[name].to(base.weight.device), layer.r[adapter_name],
                               layer.lora_alpha[adapter_name], stable_gamma, **kwargs)
            layer.lora_A[adapter_name].weight.copy_(a)
            layer.lora_B[adapter_name].weight.copy_(b)
            base.weight.copy_(new_w)
        done.append(name)
    return done


__all__ = [
    "apply_lora_ga", "default_loss", "estimate_gradients", "gradient_svd", "linear_names", "lora_ga_init",
    "lora_scaling", "peft_style_lora_ga_init",
]
