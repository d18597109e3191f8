"""Per-request token choice: greedy at temperature 0, else temperature + nucleus (top-p) sampling driven by
the request's own seeded generator, so a seeded request picks the same tokens whatever shares its batch."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks); eos then counts as an ordinary token


class Sampler:
    """Chooses one request's next tokens. Draws one uniform number per sampled token from a CPU generator
    seeded by `seed` (a random seed if None): the draw sequence depends on nothing but the seed, and the
    logits stay on their device."""

    def __init__(self, params: SamplingParams):
        self.temperature = params.temperature
        self.top_p = params.top_p
        self.generator: torch.Generator | None = None
        if params.temperature > 0:
            self.generator = torch.Generator(device="cpu")
            self.generator.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))

    @property
    def greedy(self) -> bool:
        return self.generator is None

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token id for one row of logits ([vocab]), as a 0-d tensor on the logits' device."""
        if self.generator is None:
            return torch.argmax(logits)
        u = float(torch.rand((), generator=self.generator))
        return nucleus_pick(logits, self.temperature, self.top_p, u)


def _nucleus(logits: torch.Tensor, temperature: float, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(logits / temperature) sorted descending, zeroed outside the smallest set of most probable
    tokens whose mass reaches top_p (HF/OpenAI nucleus semantics; the top token always stays), and the order."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = torch.sort(probs, descending=True)
    # Keep a token while the mass of the tokens before it is below top_p.
    keep = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) < top_p
    keep[0] = True
    return torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs)), order


def nucleus_distribution(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The distribution nucleus_pick draws from, in vocabulary order."""
    kept, order = _nucleus(logits, temperature, top_p)
    return torch.zeros_like(kept).scatter_(0, order, kept / kept.sum())


def nucleus_pick(logits: torch.Tensor, temperature: float, top_p: float, u: float) -> torch.Tensor:
    """Inverse-CDF draw at `u` in [0, 1) from nucleus_distribution (one row of logits, [vocab])."""
    kept, order = _nucleus(logits, temperature, top_p)
    kept_cumulative = torch.cumsum(kept, dim=-1)
    target = (u * kept_cumulative[-1]).reshape(1)
    index = torch.searchsorted(kept_cumulative, target, right=True)
    # u * mass can round up to the mass itself; stay on the last kept token.
    index = torch.minimum(index, (kept > 0).sum().reshape(1) - 1)
    return order[index[0]]


def choose_tokens(samplers: list[Sampler], logits: torch.Tensor) -> list[int]:
    """Next token per row of `logits` ([rows, vocab]); greedy rows share one argmax, one host sync in all."""
    picks: list[torch.Tensor | None] = [None] * len(samplers)
    greedy_rows = [i for i, s in enumerate(samplers) if s.greedy]
    if greedy_rows:
        best = torch.argmax(logits[greedy_rows], dim=-1)
        for j, row in enumerate(greedy_rows):
            picks[row] = best[j]
    for row, sampler in enumerate(samplers):
        if not sampler.greedy:
            picks[row] = sampler.choose(logits[row])
    if not picks:
        return []
    return torch.stack([p for p in picks if p is not None]).tolist()
