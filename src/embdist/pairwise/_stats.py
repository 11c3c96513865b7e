"""Summary statistics of distance matrices without N x N temporaries."""
from __future__ import annotations

import math

import numpy as np
import torch

_ROW_BLOCK_ELEMS = 1 << 24   # elements of d read per block (64 MB of float32)


def _sortable_keys(v: np.ndarray) -> np.ndarray:
    """Map float32/float64 values to unsigned keys with the same order (-0.0 -> +0.0)."""
    if v.dtype == np.float32:
        b = (v + np.float32(0.0)).view(np.uint32)
        sign = np.uint32(0x80000000)
        return np.where(b & sign, ~b, b | sign)
    b = (v + 0.0).view(np.uint64)
    sign = np.uint64(0x8000000000000000)
    return np.where(b & sign, ~b, b | sign)


def _key_to_value(key: int, dtype) -> float:
    if dtype == np.float32:
        sign = 0x80000000
        b = key ^ sign if key & sign else (~key) & 0xFFFFFFFF
        return float(np.array([b], dtype=np.uint32).view(np.float32)[0])
    sign = 0x8000000000000000
    b = key ^ sign if key & sign else (~key) & 0xFFFFFFFFFFFFFFFF
    return float(np.array([b], dtype=np.uint64).view(np.float64)[0])


def _upper_blocks(d: torch.Tensor):
    """Yield 1-D numpy arrays: the strict-upper-triangle values, row block by row block."""
    n = d.shape[0]
    np_dtype = np.float64 if d.dtype == torch.float64 else np.float32
    rows = max(1, _ROW_BLOCK_ELEMS // max(1, n))
    for r0 in range(0, n - 1, rows):
        r1 = min(n - 1, r0 + rows)
        blk = d[r0:r1, r0 + 1:]
        if blk.dtype not in (torch.float32, torch.float64):
            blk = blk.float()
        a = blk.detach().cpu().numpy().astype(np_dtype, copy=False)
        # row r0+k keeps columns >= k of the sliced block
        m = np.arange(a.shape[1])[None, :] >= np.arange(a.shape[0])[:, None]
        yield a[m]


def upper_triangle_stats(d: torch.Tensor) -> dict:
    if d.ndim != 2 or d.shape[0] != d.shape[1]:
        raise ValueError(f"d must be a square matrix, got shape {tuple(d.shape)}")
    n = d.shape[0]
    n_pairs = n * (n - 1) // 2
    nan = float("nan")
    if n_pairs == 0:
        return {"n_pairs": 0, "min": nan, "median": nan, "mean": nan, "max": nan, "zero_pairs": 0}
    if d.dtype == torch.float32 and d.device.type == "cpu" and d.stride(1) == 1 and n > 1:
        from . import _native
        import os
        lib = _native.load() if os.environ.get("EMBDIST_PAIRWISE_BACKEND", "auto") != "generic" else None
        if lib is not None:
            return _native_stats(lib, d, n_pairs)
    wide = d.dtype == torch.float64
    nbits = 64 if wide else 32
    np_dtype = np.float64 if wide else np.float32
    # pass 1: min/max/sum/zeros/nans + histogram of the top 16 key bits
    vmin, vmax, total, zeros, nans = math.inf, -math.inf, 0.0, 0, 0
    hist = np.zeros(1 << 16, dtype=np.int64)
    shift = nbits - 16
    for v in _upper_blocks(d):
        if v.size == 0:
            continue
        isn = np.isnan(v)
        k = int(isn.sum())
        if k:
            nans += k
            v = v[~isn]
            if v.size == 0:
                continue
        vmin = min(vmin, float(v.min()))
        vmax = max(vmax, float(v.max()))
        total += float(v.sum(dtype=np.float64))
        zeros += int(np.count_nonzero(v == 0))
        hist += np.bincount((_sortable_keys(v) >> shift).astype(np.int64), minlength=1 << 16)
    if nans:
        return {"n_pairs": n_pairs, "min": nan, "median": nan, "mean": nan, "max": nan, "zero_pairs": zeros}
    rank = (n_pairs - 1) // 2   # lower median, torch.median semantics
    prefix, width = 0, 16
    b = int(np.searchsorted(np.cumsum(hist), rank, side="right"))
    rank -= int(hist[:b].sum())
    prefix = b
    while width < nbits:   # refine 16 bits at a time among keys sharing the prefix
        step = min(16, nbits - width)
        sh = nbits - width - step
        hist = np.zeros(1 << step, dtype=np.int64)
        for v in _upper_blocks(d):
            kk = _sortable_keys(v)
            kk = kk[(kk >> (nbits - width)) == prefix]
            if kk.size:
                hist += np.bincount(((kk >> sh) & ((1 << step) - 1)).astype(np.int64), minlength=1 << step)
        b = int(np.searchsorted(np.cumsum(hist), rank, side="right"))
        rank -= int(hist[:b].sum())
        prefix = (prefix << step) | b
        width += step
    median = _key_to_value(prefix, np_dtype)
    return {"n_pairs": n_pairs, "min": vmin, "median": median, "mean": total / n_pairs,
            "max": vmax, "zero_pairs": zeros}


def _native_stats(lib, d: torch.Tensor, n_pairs: int) -> dict:
    """Two passes of a 16-bit radix select on the float32 keys, row block by row block."""
    from . import _cpu
    hist, st = _cpu.hist_pass(lib, d, 0, 0)
    nan = float("nan")
    zeros = int(st[3])
    if st[4] > 0:
        return {"n_pairs": n_pairs, "min": nan, "median": nan, "mean": nan, "max": nan, "zero_pairs": zeros}
    rank = (n_pairs - 1) // 2
    b = int(np.searchsorted(np.cumsum(hist), rank, side="right"))
    rank -= int(hist[:b].sum())
    hist2, _ = _cpu.hist_pass(lib, d, 16, b)
    b2 = int(np.searchsorted(np.cumsum(hist2), rank, side="right"))
    median = _key_to_value((b << 16) | b2, np.float32)
    return {"n_pairs": n_pairs, "min": float(st[0]), "median": median, "mean": float(st[2]) / n_pairs,
            "max": float(st[1]), "zero_pairs": zeros}


def snapshot_step_stats(d: torch.Tensor) -> dict[str, torch.Tensor]:
    if d.ndim != 3 or d.shape[1] != d.shape[2]:
        raise ValueError(f"d must have shape (T, V, V), got {tuple(d.shape)}")
    t, v, _ = d.shape
    iu = torch.triu_indices(v, v, 1)
    res = {"min": torch.full((t,), float("nan"), dtype=torch.float64),
           "mean": torch.full((t,), float("nan"), dtype=torch.float64),
           "max": torch.full((t,), float("nan"), dtype=torch.float64),
           "zero_pairs": torch.zeros(t, dtype=torch.int64)}
    if iu.shape[1] == 0 or t == 0:
        return res
    step = max(1, (1 << 24) // iu.shape[1])
    for s in range(0, t, step):
        vals = d[s:s + step][:, iu[0], iu[1]].to("cpu", torch.float64)
        res["min"][s:s + step] = vals.amin(1)
        res["max"][s:s + step] = vals.amax(1)
        res["mean"][s:s + step] = vals.sum(1) / iu.shape[1]
        res["zero_pairs"][s:s + step] = (vals == 0).sum(1)
    return res
