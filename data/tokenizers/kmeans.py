"""Nearest-centroid search and mini-batch k-means in torch (codebooks of the demo tokenizers).

``nearest_centroid`` is the fast path (one matmul per chunk); ``nearest_centroid_reference``
is the plain broadcast distance it must agree with. The GLM-4-Voice quantiser uses the same
search against its learned codebook.
"""

from __future__ import annotations

import math

import torch

_CHUNK = 4096
_SEED_ROUNDS = 128
_SCORE_ROWS = 2048


def nearest_centroid(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid (L2) per row: argmin ``||c||^2 - 2 x.c`` (``||x||^2`` is constant)."""
    c2 = centroids.pow(2).sum(1)
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for start in range(0, x.shape[0], _CHUNK):
        rows = x[start : start + _CHUNK]
        out[start : start + _CHUNK] = torch.addmm(c2, rows, centroids.t(), alpha=-2.0).argmin(1)
    return out


def nearest_centroid_reference(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Plain ``argmin_j sum((x - c_j)^2)`` by broadcasting (memory n*k*d: small inputs only)."""
    return (x[:, None, :] - centroids[None, :, :]).pow(2).sum(-1).argmin(1)


def inertia(x: torch.Tensor, centroids: torch.Tensor) -> float:
    """Mean squared distance of the rows of ``x`` to their nearest centroid."""
    return float((x - centroids[nearest_centroid(x, centroids)]).pow(2).sum(1).mean())


def fit_kmeans(
    x: torch.Tensor, k: int, seed: int, *, batch_size: int = 2048, epochs: int = 20, reassign_ratio: float = 0.01
) -> torch.Tensor:
    """Mini-batch k-means (Sculley 2010) with dead-centroid reseeding and a final full Lloyd step.

    Centroids start from a greedy k-means++ seeding; each step moves the centroids hit by a batch
    towards their batch mean with rate ``batch hits / total hits``. After every epoch, centroids
    with fewer than ``reassign_ratio`` x the largest count are reseeded at rows drawn with
    probability proportional to their squared distance (so they go where the error is).
    Deterministic for a given ``seed``. Returns ``[k, d]`` float32 centroids.
    """
    x = x.detach().float().reshape(x.shape[0], -1)
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= codebook size <= number of training vectors, got {k} > {n}")
    gen = torch.Generator().manual_seed(seed)
    centroids = _kmeans_pp_seeds(x, k, gen)
    counts = torch.zeros(k)
    batch_size = min(batch_size, n)
    steps_per_epoch = -(-n // batch_size)
    for _ in range(epochs):
        for _ in range(steps_per_epoch):
            batch = x[torch.randint(n, (batch_size,), generator=gen)]
            assign = nearest_centroid(batch, centroids)
            hits = torch.bincount(assign, minlength=k).float()
            sums = torch.zeros_like(centroids).index_add_(0, assign, batch)
            counts += hits
            hit = hits > 0
            rate = (hits[hit] / counts[hit])[:, None]
            centroids[hit] += rate * (sums[hit] / hits[hit][:, None] - centroids[hit])
        _reseed_dead(x, centroids, counts, reassign_ratio, gen)
    assign = nearest_centroid(x, centroids)
    hits = torch.bincount(assign, minlength=k).float()
    sums = torch.zeros_like(centroids).index_add_(0, assign, x)
    hit = hits > 0
    centroids[hit] = sums[hit] / hits[hit][:, None]
    return centroids


def _reseed_dead(x: torch.Tensor, centroids: torch.Tensor, counts: torch.Tensor, ratio: float,
                 gen: torch.Generator) -> None:
    dead = (counts < ratio * counts.max()).nonzero().flatten()
    if dead.numel() == 0:
        return
    d2 = (x - centroids[nearest_centroid(x, centroids)]).pow(2).sum(1)
    if d2.sum() <= 0:
        return
    rows = torch.multinomial(d2, min(dead.numel(), int((d2 > 0).sum())), replacement=False, generator=gen)
    dead = dead[: rows.numel()]
    centroids[dead] = x[rows]
    counts[dead] = counts[counts >= ratio * counts.max()].min()


def _kmeans_pp_seeds(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding (as in scikit-learn): draw ``2 + ln k`` candidates per seed with
    probability proportional to the squared distance to the seeds so far and keep those that
    lower the potential most (scored on at most ``_SCORE_ROWS`` rows). Above ``_SEED_ROUNDS``
    seeds, each round adds a batch of seeds, so large codebooks stay fast."""
    n = x.shape[0]
    seeds = [x[torch.randint(n, (1,), generator=gen)]]
    d2 = (x - seeds[0]).pow(2).sum(1)
    per_round = -(-(k - 1) // _SEED_ROUNDS) if k > 1 else 0
    trials = 2 + int(math.log(k))
    chosen = 1
    while chosen < k:
        m = min(per_round, k - chosen)
        positive = int((d2 > 0).sum())
        if positive < m:  # fewer distinct rows than seeds left: the rest duplicate rows (never the argmin)
            rows = torch.cat([d2.nonzero().flatten(), torch.randint(n, (m - positive,), generator=gen)])
        else:
            candidates = torch.multinomial(d2, min(m * trials, positive), replacement=False, generator=gen)
            score_rows = torch.randperm(n, generator=gen)[:_SCORE_ROWS]
            gain = (d2[score_rows, None] - _sq_dist(x[score_rows], x[candidates])).clamp_min(0).sum(0)
            rows = candidates[gain.topk(m).indices]
        d2 = torch.minimum(d2, _sq_dist(x, x[rows]).min(1).values)
        seeds.append(x[rows])
        chosen += m
    return torch.cat(seeds).clone()


def _sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1) - 2.0 * a @ b.t()).clamp_min_(0.0)
