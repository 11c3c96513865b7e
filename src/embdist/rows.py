"""Which rows are identical: the one row-identity code of embdist.

The engine's exact zeros, the streaming pass's duplicate groups, ``duplicate_groups`` for the
reports, the distinct vectors of every training step and the toy trainer all ask this module.

The contract (the seeds' headline, 651,034 zero pairs, rests on it):

* Rows are compared on the stored bits (bf16 stays bf16: no rounding can merge two rows), after
  -0.0 is made +0.0, so "identical" means "every coordinate equal", i.e. distance exactly 0.
* Rows are hashed with a 64-bit linear hash of their machine words, and every group of equal
  hashes is verified element by element: a hash collision is split, never merged, so the
  result is exact whatever the hash does.
* NaN: two rows holding NaN are identical when their bits match (``nan_equal=True``, what the
  reports show); the engine passes ``nan_equal=False`` since such rows have no distance 0.

Labels: ``labels[i]`` is the smallest row index whose row is identical to row i (so
``labels[i] == i`` for the first row of each group and for unique rows).
"""
from __future__ import annotations

import numpy as np

_SEED = 0x5EED_6A09
_CHUNK_WORDS = 1 << 22  # words hashed per block: bounds the uint64 temporaries to ~32 MiB


def canonical_bits(x) -> np.ndarray:
    """Unsigned-integer numpy view of x's stored bits, -0.0 made +0.0; the last axis holds one
    row's machine words (the widest word size dividing the row's bytes)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency; numpy input works without it
        torch = None
    if torch is not None and isinstance(x, torch.Tensor):
        t = x.detach().cpu().contiguous()
        if t.is_complex():
            raise TypeError(f"complex tensors are not supported (dtype {t.dtype})")
        if t.is_floating_point():
            t = t + 0.0  # -0.0 + 0.0 = +0.0: equal values, equal bits (a copy; the input is untouched)
        if t.dtype == torch.bool:
            t = t.to(torch.uint8)
        a = t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).numpy()
    else:
        a = np.ascontiguousarray(np.asarray(x))
        if a.dtype == object:
            raise TypeError("object arrays are not supported")
        if a.dtype.kind == "f":
            a = a + a.dtype.type(0)  # -0.0 -> +0.0, as for tensors
    a = np.ascontiguousarray(a)
    if a.ndim == 0:
        raise ValueError("expected a matrix or a history, got a scalar")
    row_bytes = a.shape[-1] * a.dtype.itemsize
    if row_bytes == 0:
        return np.zeros(a.shape[:-1] + (0,), dtype=np.uint64)
    word = next(w for w in (8, 4, 2, 1) if row_bytes % w == 0)
    return a.view(np.uint8).reshape(a.shape[:-1] + (row_bytes,)).view(np.dtype(f"u{word}"))


def hash_rows(bits: np.ndarray) -> np.ndarray:
    """The one row hash: 64-bit linear hash of each row (last axis) of ``canonical_bits``."""
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
            # one pass of unsigned 64-bit multiply-adds (wrapping mod 2^64, so the order of the
            # sum does not matter): the same values as (words * w).sum(axis=1), no temporary
            h[s:s + step] = np.dot(flat[s:s + step].astype(np.uint64, copy=False), w)
    return h.reshape(lead)


def equal_hash_runs(h: np.ndarray):
    """Index arrays (ascending) of the rows sharing one hash value, for every value held by two
    or more rows: the candidates of a group, to be verified elementwise."""
    n = len(h)
    order = np.argsort(h, kind="stable")
    hs = h[order]
    cut = np.flatnonzero(hs[1:] != hs[:-1]) + 1
    starts = np.concatenate(([0], cut))
    ends = np.concatenate((cut, [n]))
    for k in np.flatnonzero(ends - starts > 1):
        yield order[starts[k]:ends[k]]          # ascending (stable sort)


def _labels(bits: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Labels of one matrix's rows from their canonical bits (n, k) and hashes (n,)."""
    n = bits.shape[0]
    labels = np.arange(n, dtype=np.int64)
    for idx in equal_hash_runs(h):
        rows = bits[idx]
        if bool((rows == rows[0]).all()):
            labels[idx] = idx[0]
            continue
        _, inv = np.unique(rows, axis=0, return_inverse=True)   # a hash collision: split exactly
        inv = inv.reshape(-1)
        for g in np.unique(inv):
            members = idx[inv == g]
            labels[members] = members.min()
    return labels


def _labels_steps(bits: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Labels of every step of (c, n, k) canonical bits with hashes (c, n), vectorised over the
    steps: sort each step's rows by hash (stable: ascending index within a hash), a run of equal
    hashes and equal adjacent rows gets its first (smallest) index; a step where one hash run
    holds different rows (a collision) is redone exactly with ``_labels``."""
    c, n, k = bits.shape
    cols = np.arange(n)
    order = np.argsort(h, axis=1, kind="stable")
    hs = np.take_along_axis(h, order, axis=1)
    srt = np.take_along_axis(bits, order[:, :, None], axis=1)
    same_hash = hs[:, 1:] == hs[:, :-1]
    same_row = (srt[:, 1:] == srt[:, :-1]).all(axis=2) if k else np.ones_like(same_hash)
    start = np.ones(order.shape, dtype=bool)
    start[:, 1:] = ~(same_hash & same_row)
    first = np.take_along_axis(order, np.maximum.accumulate(np.where(start, cols, 0), axis=1), axis=1)
    labels = np.empty_like(order)
    np.put_along_axis(labels, order, first, axis=1)
    for j in np.flatnonzero((same_hash & ~same_row).any(axis=1)):
        labels[j] = _labels(bits[j], h[j])
    return labels


def labels_of_bits(bits: np.ndarray, chunk_steps: int | None = None, hashes: np.ndarray | None = None) -> np.ndarray:
    """Labels (int64) from ``canonical_bits``: (n, k) -> (n,); (T, n, k) -> (T, n), in chunks of
    steps (about 4M words at a time). ``hashes``: their ``hash_rows``, when already computed."""
    if bits.ndim == 2:
        return _labels(bits, hash_rows(bits) if hashes is None else hashes)
    t, n, k = bits.shape
    out = np.empty((t, n), dtype=np.int64)
    step = chunk_steps or max(1, _CHUNK_WORDS // max(1, n * k))
    for s in range(0, t, step):
        blk = bits[s:s + step]
        h = hash_rows(blk) if hashes is None else hashes[s:s + step]
        out[s:s + len(blk)] = _labels_steps(blk, h) if n else 0
    return out


def rows_differ(bits: np.ndarray, hashes: np.ndarray, ref_bits: np.ndarray, ref_hashes: np.ndarray) -> np.ndarray:
    """Whether each row differs from its reference row (same shapes, broadcasting over leading
    axes): different hashes say so at once; equal hashes are verified on the bits."""
    differ = hashes != ref_hashes
    eq = np.nonzero(~differ)
    if len(eq[0]):
        ref = np.broadcast_to(ref_bits, bits.shape)
        differ[eq] = (bits[eq] != ref[eq]).any(axis=-1)
    return differ


def _nan_rows(x) -> np.ndarray | None:
    """Which rows hold a NaN (None for non-float input).  Tensors: a row's float32 sum is NaN when
    the row holds a NaN (and possibly when +inf and -inf meet), so the sums (one fast pass, in
    chunks of rows) name the candidates and only those rows are checked with isnan."""
    a = x.detach().cpu() if hasattr(x, "detach") else np.asarray(x)
    if hasattr(a, "is_floating_point"):
        if not a.is_floating_point():
            return None
        if a.dim() == 0 or a.numel() == 0:
            return a.isnan().reshape(a.shape[:-1] + (-1,)).any(-1).numpy()      # as before: no rows to sum
        import torch
        flat = a.reshape(-1, a.shape[-1])
        cand = torch.zeros(flat.shape[0], dtype=torch.bool)
        step = max(1, _CHUNK_WORDS // max(1, flat.shape[1]))
        for s in range(0, flat.shape[0], step):
            blk = flat[s:s + step]
            if blk.dtype not in (torch.float32, torch.float64):
                blk = blk.float()
            cand[s:s + step] = blk.sum(-1).isnan()
        idx = torch.nonzero(cand).reshape(-1)
        if len(idx):
            cand[idx] = flat[idx].isnan().any(-1)
        return cand.reshape(a.shape[:-1]).numpy()
    return np.isnan(a).any(-1) if a.dtype.kind == "f" else None


def row_groups(x, nan_equal: bool = True) -> np.ndarray:
    """Labels (int64) of a (N, D) matrix's rows, or (T, N) labels of a (T, N, D) history, step by step."""
    bits = canonical_bits(x)
    if bits.ndim not in (2, 3):
        raise ValueError(f"row_groups needs a (rows, dims) matrix or a (steps, rows, dims) history, got shape {tuple(np.shape(x))}")
    labels = labels_of_bits(bits)
    if not nan_equal:
        nan = _nan_rows(x)
        if nan is not None and nan.any():
            own = np.broadcast_to(np.arange(labels.shape[-1]), labels.shape)
            labels = np.where(nan | np.take_along_axis(nan, labels, -1) if labels.ndim == 2 else nan | nan[labels],
                              own, labels)
    return labels


def group_lists(labels: np.ndarray) -> list[np.ndarray]:
    """Groups of size >= 2 from labels: ascending members, biggest group first (ties: smaller
    first member)."""
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if n == 0:
        return []
    sizes = np.bincount(labels, minlength=n)
    idx = np.flatnonzero(sizes[labels] > 1)
    if len(idx) == 0:
        return []
    order = idx[np.lexsort((idx, labels[idx]))]
    reps = labels[order]
    out = np.split(order, np.flatnonzero(reps[1:] != reps[:-1]) + 1)
    out.sort(key=lambda g: (-len(g), int(g[0])))
    return out


def duplicate_groups(x) -> list[np.ndarray]:
    """Groups of identical rows of a 2-D tensor/array, each of size >= 2 (see ``group_lists``)."""
    if np.ndim(x) != 2 and not (hasattr(x, "dim") and x.dim() == 2):
        raise ValueError(f"duplicate_groups needs a 2-D matrix (rows, dims), got shape {tuple(np.shape(x))}")
    return group_lists(row_groups(x))


def distinct_per_step(history, chunk_steps: int | None = None) -> np.ndarray:
    """Number of distinct rows in each snapshot of a (T, V, D) history: int64 (T,).
    ``chunk_steps`` snapshots are canonicalised and hashed at a time (default: ~4M values)."""
    shape = tuple(history.shape) if hasattr(history, "shape") else np.shape(history)
    if len(shape) != 3:
        raise ValueError(f"distinct_per_step needs a (steps, tokens, dims) history, got shape {shape}")
    t, v, d = shape
    out = np.zeros(t, dtype=np.int64)
    if v == 0:
        return out
    step = chunk_steps or max(1, _CHUNK_WORDS // max(1, v * d))
    for s in range(0, t, step):
        labels = row_groups(history[s:s + step])
        out[s:s + len(labels)] = (labels == np.arange(v)).sum(axis=1)
    return out


def group_sizes_of(groups: list[np.ndarray]) -> np.ndarray:
    """Sizes of the groups, as listed."""
    return np.array([len(g) for g in groups], dtype=np.int64)


def pairs_in_groups(sizes) -> int:
    """Σ C(k, 2): the number of zero-distance pairs the groups account for (Qwen3-4B: 651,034)."""
    s = np.asarray(sizes, dtype=np.int64)
    return int((s * (s - 1) // 2).sum())
