"""Identical rows, compared bit for bit.

``duplicate_groups`` finds the groups of identical rows of one matrix (Qwen3-4B: 2,100 dead
tokens sharing 13 vectors); ``distinct_vectors_per_step`` counts distinct rows in every snapshot
of a training history (the toy run of seed 08.4b: 1 at step 0, about 50 later).

Equality is on the raw bytes of each row, whatever the dtype (bf16 stays bf16), after -0.0 is
made +0.0: two rows are identical exactly when their distance is 0 (the engine's contract), so
the groups account for every zero pair. NaN rows are equal here when their bits match. Rows are hashed with a 64-bit linear hash of their machine words, and every
group of equal hashes is checked element by element, so the results are exact: a hash
collision is split, never merged.
"""
from __future__ import annotations

import numpy as np
import torch

from embdist.pairwise._common import equal_hash_runs

_SEED = 0x5EED_6A09
_CHUNK_WORDS = 1 << 22  # words hashed per block: bounds the uint64 temporaries to ~32 MiB


def _as_bits(x) -> np.ndarray:
    """Unsigned-integer numpy view of x's bytes, last axis = one row's machine words."""
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu().contiguous()
        if t.is_floating_point():
            t = t + 0.0  # -0.0 + 0.0 = +0.0: equal values, equal bits (a copy; the input is untouched)
        if t.dtype == torch.bool:
            t = t.to(torch.uint8)
        size = t.element_size()
        if t.is_complex():
            raise TypeError(f"complex tensors are not supported (dtype {t.dtype})")
        a = t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]).numpy()
    else:
        a = np.ascontiguousarray(np.asarray(x))
        if a.dtype.kind == "f":
            a = a + a.dtype.type(0)  # -0.0 -> +0.0, as for tensors
        if a.dtype == object:
            raise TypeError("object arrays are not supported")
    a = np.ascontiguousarray(a)
    if a.ndim == 0:
        raise ValueError("expected a matrix or a history, got a scalar")
    row_bytes = a.shape[-1] * a.dtype.itemsize
    for word in (8, 4, 2, 1):
        if row_bytes % word == 0:
            break
    u = np.dtype(f"u{word}")
    if row_bytes == 0:
        return np.zeros(a.shape[:-1] + (0,), dtype=np.uint64)
    return a.view(np.uint8).reshape(a.shape[:-1] + (row_bytes,)).view(u)


def _hash_rows(bits: np.ndarray) -> np.ndarray:
    """64-bit linear hash of each row (last axis) of an unsigned-integer array."""
    k = bits.shape[-1]
    lead = bits.shape[:-1]
    if k == 0:
        return np.zeros(lead, dtype=np.uint64)
    flat = bits.reshape(-1, k)
    h = np.zeros(flat.shape[0], dtype=np.uint64)
    w = np.random.default_rng(_SEED).integers(1, 2**63 - 1, size=k, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    step = max(1, _CHUNK_WORDS // k)
    with np.errstate(over="ignore"):
        for s in range(0, flat.shape[0], step):
            h[s:s + step] = (flat[s:s + step].astype(np.uint64, copy=False) * w).sum(axis=1, dtype=np.uint64)
    return h.reshape(lead)


def duplicate_groups(x) -> list[np.ndarray]:
    """Groups of identical rows (bitwise, -0.0 == +0.0) of a 2-D tensor/array, each of size >= 2.

    Each group is an int64 array of row indices in ascending order; groups are listed by size,
    largest first, ties by their first index. Rows that are unique appear in no group.
    """
    bits = _as_bits(x)
    if bits.ndim != 2:
        raise ValueError(f"duplicate_groups needs a 2-D matrix (rows, dims), got shape {tuple(np.shape(x))}")
    n = bits.shape[0]
    if n < 2:
        return []
    groups: list[np.ndarray] = []
    for idx in equal_hash_runs(_hash_rows(bits)):
        rows = bits[idx]
        if bool((rows == rows[0]).all()):
            groups.append(idx.astype(np.int64))
            continue
        # A hash collision: split the run exactly.
        _, inv, counts = np.unique(rows, axis=0, return_inverse=True, return_counts=True)
        inv = inv.reshape(-1)
        for g in np.flatnonzero(counts > 1):
            groups.append(idx[inv == g].astype(np.int64))
    groups.sort(key=lambda g: (-len(g), int(g[0])))
    return groups


def group_sizes_of(groups: list[np.ndarray]) -> np.ndarray:
    """Sizes of the groups, as listed."""
    return np.array([len(g) for g in groups], dtype=np.int64)


def pairs_in_groups(sizes) -> int:
    """Σ C(k, 2): the number of zero-distance pairs the groups account for (Qwen3-4B: 651,034)."""
    s = np.asarray(sizes, dtype=np.int64)
    return int((s * (s - 1) // 2).sum())


def distinct_vectors_per_step(history, chunk_steps: int | None = None) -> np.ndarray:
    """Number of bit-distinct rows in each snapshot of a (T, V, D) history: an int64 array (T,)."""
    bits = _as_bits(history)
    if bits.ndim != 3:
        raise ValueError(f"distinct_vectors_per_step needs a (steps, tokens, dims) history, got shape {tuple(np.shape(history))}")
    t, v, k = bits.shape
    out = np.zeros(t, dtype=np.int64)
    if v == 0 or t == 0:
        return out
    if v == 1:
        out[:] = 1
        return out
    if chunk_steps is None:
        chunk_steps = max(1, _CHUNK_WORDS // max(1, v * k))
    for s in range(0, t, chunk_steps):
        blk = bits[s:s + chunk_steps]                       # (c, V, K)
        h = _hash_rows(blk)                                 # (c, V)
        order = np.argsort(h, axis=1, kind="stable")
        hs = np.take_along_axis(h, order, axis=1)
        rows = np.take_along_axis(blk, order[:, :, None], axis=1)
        same_hash = hs[:, 1:] == hs[:, :-1]
        same_row = (rows[:, 1:] == rows[:, :-1]).all(axis=2) if k else np.ones_like(same_hash)
        out[s:s + len(blk)] = v - same_row.sum(axis=1)
        # Within a run of equal hashes all rows must be equal for the count to hold; a run
        # holding two different rows (a collision) shows as an adjacent unequal pair.
        for j in np.flatnonzero((same_hash & ~same_row).any(axis=1)):
            out[s + j] = len(np.unique(blk[j], axis=0))
    return out


def row_groups(x, chunk_steps: int | None = None) -> np.ndarray:
    """Canonical group id of every row: the smallest row index whose row is identical (bitwise on
    the stored dtype, -0.0 == +0.0, equal hashes verified).

    x: a (N, D) matrix -> int32 (N,); a (T, V, D) history -> int32 (T, V), step by step (each
    step's rows compared among themselves). ``labels == arange`` marks one representative per
    distinct vector, so ``(labels[t] == arange(V)).sum()`` is ``distinct_vectors_per_step``.
    """
    bits = _as_bits(x)
    if bits.ndim not in (2, 3):
        raise ValueError(f"row_groups needs a (rows, dims) matrix or a (steps, rows, dims) history, "
                         f"got shape {tuple(np.shape(x))}")
    return row_groups_of_bits(bits, chunk_steps)


def row_groups_of_bits(bits: np.ndarray, chunk_steps: int | None = None) -> np.ndarray:
    """``row_groups`` of rows already given as canonical words (``_as_bits``)."""
    flat = bits.ndim == 2
    if flat:
        bits = bits[None]
    t, v, k = bits.shape
    out = np.empty((t, v), dtype=np.int32)
    if chunk_steps is None:
        chunk_steps = max(1, _CHUNK_WORDS // max(1, v * k))
    cols = np.arange(v)
    for s in range(0, t, chunk_steps):
        blk = bits[s:s + chunk_steps]                       # (c, V, K)
        h = _hash_rows(blk)
        order = np.argsort(h, axis=1, kind="stable")        # equal hashes stay in ascending index
        hs = np.take_along_axis(h, order, axis=1)
        rows = np.take_along_axis(blk, order[:, :, None], axis=1)
        same_hash = hs[:, 1:] == hs[:, :-1]
        same_row = (rows[:, 1:] == rows[:, :-1]).all(axis=2) if k else np.ones_like(same_hash)
        start = np.ones(order.shape, dtype=bool)
        start[:, 1:] = ~(same_hash & same_row)
        first = np.take_along_axis(order, np.maximum.accumulate(np.where(start, cols, 0), axis=1), axis=1)
        lab = np.empty_like(order)
        np.put_along_axis(lab, order, first, axis=1)
        # A run of equal hashes holding different rows (a collision) breaks adjacency: redo exactly.
        for j in np.flatnonzero((same_hash & ~same_row).any(axis=1)):
            _, inv = np.unique(blk[j], axis=0, return_inverse=True)
            inv = inv.reshape(-1)
            smallest = np.full(inv.max() + 1, v, dtype=np.int64)
            np.minimum.at(smallest, inv, cols)
            lab[j] = smallest[inv]
        out[s:s + len(blk)] = lab
    return out[0] if flat else out
