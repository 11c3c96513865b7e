"""Statistics of every pair from a complete partial: exact min and max, the mean, the median
from the histogram with its bound, and the counts below each radius."""
from __future__ import annotations

import math

import numpy as np


from .. import _cpu
from ._bindings import DT_CODES, _chunks, _ptr
from ._partial import _max_band


def exact_pairs(lib, x, metric_code: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distances of the pairs (a[i], b[i]) evaluated directly (the exact rule of the engine)."""
    n, d = x.shape
    out = np.empty(len(a))
    if len(a) == 0:
        return out
    lo = np.ascontiguousarray(np.minimum(a, b), dtype=np.int64)
    hi = np.ascontiguousarray(np.maximum(a, b), dtype=np.int64)
    dt = DT_CODES[x.dtype]
    _cpu.run_parallel(_chunks(len(a), 2048), lambda r: lib.emb_stream_exact(
        _ptr(x), dt, d, metric_code, _ptr(lo[r[0]:]), _ptr(hi[r[0]:]), r[1] - r[0], _ptr(out[r[0]:])))
    return out


def statistics(lib, x, partial, groups: np.ndarray, first_nz: np.ndarray, zero_pairs: int, tolq: float):
    """(stats dict, histogram counts, histogram edges)."""
    meta = partial.meta
    metric = meta["metric"]
    mcode = 0 if metric == "euclidean" else 1
    n = int(x.shape[0])
    n_pairs = n * (n - 1) // 2
    min_nz = math.sqrt(float(first_nz.min())) if n and np.isfinite(first_nz).any() else math.nan
    if n_pairs == 0:
        dmin = dmax = mean = median = math.nan
        bound = math.nan
    else:
        dmin = 0.0 if zero_pairs else min_nz
        if partial.pairs == 0:
            dmax = 0.0
        elif metric == "chebyshev":
            dmax = math.sqrt(partial.max_q)
        else:
            mx, mxq = _max_band(partial.mx, partial.mxq, partial.max_q)
            pairs = np.unique(np.sort(groups[mx], axis=1), axis=0)
            dmax = math.sqrt(float(exact_pairs(lib, x, mcode, pairs[:, 0], pairs[:, 1]).max()))
        mean = math.fsum(partial.item_sum[partial.item_done].tolist()) / n_pairs
    nb = meta["bins"]
    hi = meta["hist_hi"]
    counts = partial.hist.astype(np.int64).copy()
    counts[0] += zero_pairs
    edges = np.linspace(0.0, hi, nb + 1)
    if n_pairs:
        rank = (n_pairs - 1) // 2
        if rank < zero_pairs:
            median, bound = 0.0, 0.0
        else:
            cum = np.cumsum(counts)
            b = int(np.searchsorted(cum, rank, side="right"))
            w = hi / nb
            rel = 1 / math.sqrt(1 - tolq) - 1 if tolq else 0.0   # relative error of a distance
            lo_v = b * w / (1 + rel) - 1e-12 * w
            hi_v = (b + 1) * w * (1 + rel) + 1e-12 * w if b < nb - 1 else math.inf
            lo_v = max(lo_v, min_nz if math.isfinite(min_nz) else 0.0)
            hi_v = min(hi_v, dmax)
            median, bound = (lo_v + hi_v) / 2, (hi_v - lo_v) / 2
    below = {float(r): int(c) + (zero_pairs if r > 0 else 0)
             for r, c in zip(meta["radii"], partial.radius_counts)}
    stats = {"n_pairs": n_pairs, "zero_pairs": zero_pairs, "min": dmin, "min_nonzero": min_nz, "mean": mean,
             "max": dmax, "median": median, "median_error_bound": bound, "below": below}

    return stats, counts, edges
