"""Nearest neighbour of every row of a square distance matrix, row block by row block."""
from __future__ import annotations

import torch

_BLOCK_ROWS = 1024


def nearest_neighbours(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row i: the j != i with the smallest d[i, j] (ties: the smaller j), and that distance.

    Works on one block of rows at a time (a copy of at most 1024 rows), never an N×N temporary.
    Returns (ids int64 (N,), distances float32 (N,)); for N < 2, ids are -1 and distances inf.
    """
    n = d.shape[0]
    ids = torch.full((n,), -1, dtype=torch.int64)
    dist = torch.full((n,), float("inf"), dtype=torch.float32)
    if n < 2:
        return ids, dist
    for r0 in range(0, n, _BLOCK_ROWS):
        r1 = min(n, r0 + _BLOCK_ROWS)
        block = d[r0:r1].to(torch.float32, copy=True)  # the diagonal is masked in the copy, not in d
        rows = torch.arange(r1 - r0)
        block[rows, rows + r0] = float("inf")
        # torch.min returns the first index of the minimum: the smaller id on ties.
        values, idx = block.min(dim=1)
        ids[r0:r1], dist[r0:r1] = idx, values
    return ids, dist
