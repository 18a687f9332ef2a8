"""1-D k-means for palettization: optimal by dynamic programming, or Lloyd from a DP start.

Palettization (2024 report; WAVE2.md "Compression") fits, per group of weights, a ``2^b``-entry
lookup table minimising the squared reconstruction error: 1-D k-means. In one dimension the
clusters of an optimal solution are contiguous runs of the sorted values, so the optimum is a
dynamic programme over split points (Wang & Song's Ckmeans.1d.dp; coremltools' palettizer uses
the ``kmeans1d`` package, the same optimum computed in O(k n log n))::

    D[c][i] = min_{j <= i} D[c-1][j] + SSE(x_j .. x_{i-1})     (first i sorted values, c clusters)

:func:`kmeans_1d` solves it exactly, vectorised over groups, while a group has at most
:data:`EXACT_MAX` values (O(k n^2) work and n^2 memory per group). Larger groups (a full-size
model's 16 x 2048 rows) start from the same DP solved on :data:`SUMMARY_BINS` equal-count bins of
the sorted values (each bin a weighted point at its mean), then run Lloyd's iterations on all the
values until no assignment changes (at most ``max_iter``): a documented, deterministic init whose
result is within a fraction of a percent of the optimum on weight-like data (the tests compare
with coremltools' exact palettizer).
"""

from __future__ import annotations

import torch

__all__ = ["EXACT_MAX", "SUMMARY_BINS", "kmeans_1d", "kmeans_1d_exact", "assign"]

EXACT_MAX = 512  # values per group solved by the exact O(k n^2) DP
SUMMARY_BINS = 128  # equal-count (and as many equal-width) cells the large-group init solves the DP on
_CHUNK_ELEMENTS = 1 << 20  # groups x n x n per DP chunk (a few MiB: the split search stays in cache)


def _dp_weighted(x: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:  # (G, n), (G, n) -> (G, k)
    """Optimal k-means of sorted weighted points ``x`` (weights ``w`` > 0), per row; float64."""
    groups, n = x.shape
    zero = torch.zeros(groups, 1, dtype=torch.float64)
    s0 = torch.cat([zero, w.cumsum(1)], 1)  # (G, n+1) prefix sums: weight, w x, w x^2
    s1 = torch.cat([zero, (w * x).cumsum(1)], 1)
    s2 = torch.cat([zero, (w * x * x).cumsum(1)], 1)
    # cost[g, j, i] = SSE of points j..i (j <= i), inf below the diagonal
    count = s0[:, None, 1:] - s0[:, :-1, None]  # (G, n, n)
    total = s1[:, None, 1:] - s1[:, :-1, None]
    cost = (s2[:, None, 1:] - s2[:, :-1, None]) - total * total / count.clamp_min(1e-300)
    upper = torch.ones(n, n, dtype=torch.bool).triu()
    # the split search in float32 (4x less memory traffic); centroids below come back in float64
    cost = torch.where(upper, cost.clamp_min(0.0), torch.full_like(cost, float("inf"))).float()
    best = cost[:, 0, :]  # (G, n): D[1][i+1], one cluster over points 0..i
    splits = []  # per added cluster: (G, n) start index of the last cluster ending at i
    total_cost = torch.empty_like(cost)  # (G, j, i), reused by every layer
    for _ in range(1, k):
        previous = torch.cat([torch.full_like(best[:, :1], float("inf")), best[:, :-1]], 1)  # D[c-1][j], j = 0..n-1
        torch.add(cost, previous[:, :, None], out=total_cost)
        best, start = total_cost.min(1)
        splits.append(start)
    # walk the splits back from the last point
    centroids = torch.empty(groups, k, dtype=torch.float64)
    end = torch.full((groups,), n, dtype=torch.long)  # exclusive end of the current cluster
    rows = torch.arange(groups)
    for c in range(k - 1, -1, -1):
        begin = splits[c - 1][rows, end - 1] if c > 0 else torch.zeros_like(end)
        weight = s0[rows, end] - s0[rows, begin]
        mean = (s1[rows, end] - s1[rows, begin]) / weight.clamp_min(1e-300)
        # a mean lies within its points; a cluster of only near-empty summary cells (weight
        # 1e-12) divides float64 cancellation noise by that weight and landed as far out as 1e287
        # (8-bit tables of 24,576 values: infinite fp16 entries), so it is held to its points' range
        centroids[:, c] = torch.minimum(torch.maximum(mean, x[rows, begin]), x[rows, end - 1])
        end = begin
    return centroids


def _dp_chunked(x: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
    n = x.shape[1]
    chunk = max(1, _CHUNK_ELEMENTS // (n * n))
    return torch.cat([_dp_weighted(x[i:i + chunk], w[i:i + chunk], k) for i in range(0, x.shape[0], chunk)])


def _unique_pad(centroids: torch.Tensor) -> torch.Tensor:
    """Groups with fewer distinct values than k get duplicate centroids; harmless, kept sorted."""
    return centroids.sort(1).values


def kmeans_1d_exact(values: torch.Tensor, k: int) -> torch.Tensor:  # (G, n) -> (G, k)
    """The optimal ``k`` centroids of each row of ``values`` (sorted ascending), by the DP.

    Raises:
        ValueError: fewer values than clusters.
    """
    if values.shape[1] < k:
        raise ValueError(f"k-means: {values.shape[1]} values per group < {k} clusters")
    x = values.detach().to(torch.float64).sort(1).values
    return _unique_pad(_dp_chunked(x, torch.ones_like(x), k))


def assign(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:  # (G, n), (G, k) -> (G, n) long
    """Index of the nearest centroid (ties to the lower one) of each value; centroids sorted."""
    boundaries = ((centroids[:, 1:] + centroids[:, :-1]) / 2).contiguous()  # (G, k-1)
    return torch.searchsorted(boundaries.to(values.dtype), values.contiguous(), right=False)


def _lloyd(x: torch.Tensor, centroids: torch.Tensor, max_iter: int) -> torch.Tensor:
    """Lloyd's iterations on sorted rows ``x`` (float64) until no assignment changes."""
    groups, n = x.shape
    zero = torch.zeros(groups, 1, dtype=torch.float64)
    prefix = torch.cat([zero, x.cumsum(1)], 1)  # (G, n+1)
    rows = torch.arange(groups)[:, None]
    previous = None
    for _ in range(max_iter):
        boundaries = ((centroids[:, 1:] + centroids[:, :-1]) / 2).contiguous()
        # cluster c holds the sorted values [ends[c-1], ends[c])
        ends = torch.searchsorted(x, boundaries, right=True)  # (G, k-1)
        if previous is not None and torch.equal(ends, previous):
            break
        previous = ends
        lo = torch.cat([torch.zeros(groups, 1, dtype=torch.long), ends], 1)
        hi = torch.cat([ends, torch.full((groups, 1), n, dtype=torch.long)], 1)
        count = (hi - lo).to(torch.float64)
        means = (prefix[rows, hi] - prefix[rows, lo]) / count.clamp_min(1)
        centroids = torch.where(count > 0, means, centroids).sort(1).values  # an empty cluster keeps its place
    return centroids


def _summary(x: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:  # (G, n) sorted -> 2 x (G, m)
    """Weighted points summarising sorted rows: the union of ``bins`` equal-count and ``bins``
    equal-width cells (equal count resolves the dense middle, equal width the sparse tails where
    a 16-entry table puts its outer entries); each non-empty cell is its mean with its count,
    empty cells get weight 1e-12 at their edge (no effect on the optimum)."""
    groups, n = x.shape
    count_edges = torch.linspace(0, n, bins + 1, dtype=torch.float64).round().long().expand(groups, bins + 1)
    lo, hi = x[:, :1], x[:, -1:]
    width_values = lo + (hi - lo) * torch.linspace(0, 1, bins + 1, dtype=torch.float64)  # (G, bins+1)
    width_edges = torch.searchsorted(x, width_values.contiguous(), right=False)
    width_edges[:, -1] = n
    edges = torch.cat([count_edges, width_edges], 1).sort(1).values  # (G, 2 bins + 2) indices into x
    prefix = torch.cat([torch.zeros(groups, 1, dtype=torch.float64), x.cumsum(1)], 1)
    begin, end = edges[:, :-1], edges[:, 1:]
    counts = (end - begin).to(torch.float64)
    at = x.gather(1, begin.clamp_max(n - 1))
    means = torch.where(counts > 0, (prefix.gather(1, end) - prefix.gather(1, begin)) / counts.clamp_min(1), at)
    return means, counts.clamp_min(1e-12)


def kmeans_1d(values: torch.Tensor, k: int, exact_max: int = EXACT_MAX, max_iter: int = 300) -> torch.Tensor:
    """``k`` centroids per row of ``values`` (G, n), sorted ascending, float64.

    Exact (the DP) for rows of at most ``exact_max`` values; longer rows start from the DP on
    :data:`SUMMARY_BINS` equal-count bins and run Lloyd's iterations to convergence.

    Raises:
        ValueError: fewer values per row than clusters, or not a 2-D tensor.
    """
    if values.dim() != 2:
        raise ValueError(f"k-means: values must be (groups, n), got shape {tuple(values.shape)}")
    groups, n = values.shape
    if n < k:
        raise ValueError(f"k-means: {n} values per group < {k} clusters")
    if n <= exact_max:
        return kmeans_1d_exact(values, k)
    x = values.detach().to(torch.float64).sort(1).values
    means, counts = _summary(x, min(SUMMARY_BINS, n))
    start = _dp_chunked(means, counts, k)
    return _lloyd(x, _unique_pad(start), max_iter)
