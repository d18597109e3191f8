"""K-center greedy (farthest-point) selection: the coverage step of MoDS.

Gonzalez's greedy picks a first point (seeded), then repeatedly the point farthest from everything
picked so far. Invariants, which the tests check against the math:
- the pick distances d_1 >= d_2 >= ... are non-increasing, and the picked points are pairwise at least
  d_k apart (d_k: distance of the last pick when it was picked);
- after k picks every point lies within `covering_radius` r <= d_{k+1} of the picked set, so the
  k picks plus the next farthest point are k+1 points pairwise >= r apart: any k centres leave two of
  them in one cluster, so the optimal radius is >= r / 2 (a 2-approximation).

Euclidean distance; with L2-normalised embeddings it is a monotone function of cosine similarity.
Cost O(n * k * d): one matrix-vector product per pick.
"""

from __future__ import annotations

import numpy as np


def _sq_norms(x: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", x, x)


def _distances_to(x: np.ndarray, sq: np.ndarray, i: int) -> np.ndarray:
    """Euclidean distance of every row of x to row i (clamped: rounding can make d^2 slightly negative)."""
    d2 = sq - 2.0 * (x @ x[i]) + sq[i]
    return np.sqrt(np.maximum(d2, 0.0))


def k_center_greedy(embeddings: np.ndarray, k: int, seed: int = 0) -> list[int]:
    """Indices of k rows chosen by farthest-point greedy, in pick order (first pick drawn with `seed`).

    k >= n returns every index. Ties (equal distances) go to the lowest index, so the result is a
    pure function of (embeddings, k, seed). A picked row is never picked again, even among duplicates.
    """
    return k_center_greedy_with_distances(embeddings, k, seed)[0]


def k_center_greedy_with_distances(embeddings: np.ndarray, k: int, seed: int = 0) -> tuple[list[int], list[float]]:
    """Like k_center_greedy, plus each pick's distance to the points picked before it (inf for the first)."""
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array (rows x dims), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("embeddings contain NaN or infinite values")
    n = x.shape[0]
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if n == 0 or k == 0:
        return [], []
    sq = _sq_norms(x)
    first = int(np.random.default_rng(seed).integers(n))
    picks, dists = [first], [float("inf")]
    min_d = _distances_to(x, sq, first)
    min_d[first] = -1.0  # never picked again
    for _ in range(min(k, n) - 1):
        nxt = int(np.argmax(min_d))
        picks.append(nxt)
        dists.append(float(min_d[nxt]))
        min_d = np.minimum(min_d, _distances_to(x, sq, nxt))
        min_d[picks] = -1.0
    return picks, dists


def covering_radius(embeddings: np.ndarray, centres: list[int]) -> float:
    """Largest distance from any row to its nearest centre (0 when every row is a centre)."""
    x = np.asarray(embeddings, dtype=np.float64)
    if not centres:
        raise ValueError("covering_radius needs at least one centre")
    sq = _sq_norms(x)
    min_d = np.full(x.shape[0], np.inf)
    for c in centres:
        min_d = np.minimum(min_d, _distances_to(x, sq, c))
    return float(min_d.max())
