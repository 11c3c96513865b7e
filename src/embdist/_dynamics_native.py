"""The native passes of embdist.dynamics' Tracker (kernels_dynamics.c through ctypes): labels,
changes, lattice units and components of a chunk of steps. See the dynamics module doc."""
from __future__ import annotations

import numpy as np
import torch

from embdist import rows
from embdist.pairwise import _cpu
from embdist.pairwise._common import DTYPE_CODES as _DT    # element codes of kernels_dynamics.c

FILTER_COLS = 16        # columns of largest spread in the components' candidate filter


def runs(mask: np.ndarray):
    """(start, end) of the runs of True in a 1-D mask."""
    m = np.concatenate(([False], mask, [False])).astype(np.int8)
    edges = np.flatnonzero(np.diff(m))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def _split(n: int, k: int):
    """At most k contiguous non-empty (start, end) pieces of range(n)."""
    k = max(1, min(k, n))
    edges = [n * j // k for j in range(k + 1)]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def steps(tr, lib, x: torch.Tensor, bits: np.ndarray, elem: np.ndarray):
    """Labels, changes and lattice units of a chunk in two native passes (kernels_dynamics.c):
    the hashes are embdist.rows' (hash_rows), equal hashes verified bytewise."""
    c, v, _ = x.shape
    tr._start(bits, v)
    dt = _DT[x.dtype]
    changed = np.empty((c, v), dtype=np.uint8)
    differs0 = np.empty((c, v), dtype=np.uint8)
    disp = np.empty((c, v))
    prev = None if tr.prev_bits is None else tr.prev_bits.view(elem.dtype).reshape(-1)   # (v * d,)
    first = np.ascontiguousarray(tr.first_bits).view(elem.dtype).reshape(-1)
    d = elem.shape[2]
    bad = np.zeros(1 + 2 * _cpu.n_threads(), dtype=np.int64)
    if c == 1:                      # one step (a checkpoint): pieces of tokens
        pieces = [(0, 1, a, b) for a, b in _split(v, len(bad) - 1)]
    else:                           # pieces of steps
        pieces = [(a, b, 0, v) for a, b in _split(c, len(bad) - 1)]

    def piece(k):
        s0, s1, i0, i1 = pieces[k]
        ref = (elem[s0 - 1, i0] if s0 else None if prev is None else prev[i0 * d:])
        bad[k] = lib.emb_dyn_steps(elem[s0, i0].ctypes.data, None if ref is None else ref.ctypes.data,
                                   first[i0 * d:].ctypes.data, dt,
                                   s1 - s0, i1 - i0, d, changed[s0, i0:].ctypes.data, differs0[s0, i0:].ctypes.data,
                                   disp[s0, i0:].ctypes.data)
    _cpu.run_parallel(range(len(pieces)), piece)
    if bad.any():
        raise ValueError("the history holds NaN or Inf values; the dynamics need finite rows")
    hashes = rows.hash_rows(bits)
    labels = np.empty((c, v), dtype=np.int64)
    lib.emb_dyn_labels(bits.ctypes.data, c, v, bits.shape[2] * bits.itemsize, hashes.ctypes.data,
                       labels.ctypes.data)
    if c and v and labels.min() < 0:
        raise MemoryError("the dynamics' label pass ran out of memory")
    return labels, changed.view(bool), differs0.view(bool), disp


def components(tr, lib, x: torch.Tensor, labels: np.ndarray, changed) -> None:
    """Components of every step of the chunk in one native pass (kernels_dynamics.c): candidate
    pairs of distinct vectors filtered on the columns of largest spread, each evaluated
    exactly (Chebyshev: the engine's float32 max; Euclidean: its float64 direct sum), joined
    per threshold. A step where no row changed repeats the step before."""
    c, v, d = x.shape
    x = x.detach().cpu().contiguous()
    thr = np.array(tr.thresholds, dtype=np.float64)
    nthr = len(thr)
    count = np.zeros((c, nthr), dtype=np.int64)
    largest = np.zeros((c, nthr), dtype=np.int64)
    same = np.zeros(c, dtype=bool)                 # no row changed: the step before's components
    if changed is not None:
        same[:] = ~changed.any(axis=1)
        if tr.prev_comp is None:
            same[0] = False
    if not same.all() and v:
        sample = x[np.flatnonzero(~same)[-1], ::max(1, v // 4096)].float()
        spread = sample.var(dim=0).numpy() if len(sample) > 1 else np.zeros(d)
        order = np.argsort(-spread, kind="stable").astype(np.int64)
        lab = np.ascontiguousarray(labels, dtype=np.int64)
        pieces = [(a + r0, b + r0) for r0, r1 in runs(~same) for a, b in _split(r1 - r0, 2 * _cpu.n_threads())]
        got = np.zeros(len(pieces), dtype=np.int64)

        def piece(k):               # steps are independent: any split gives the same numbers
            s0, s1 = pieces[k]
            got[k] = lib.emb_dyn_components(x[s0].data_ptr(), _DT[x.dtype], s1 - s0, v, d, lab[s0].ctypes.data,
                                            1 if tr.metric == "chebyshev" else 0, thr.ctypes.data, nthr,
                                            order.ctypes.data, FILTER_COLS, count[s0].ctypes.data,
                                            largest[s0].ctypes.data)
        _cpu.run_parallel(range(len(pieces)), piece)
        if (got < 0).any():
            raise MemoryError("the dynamics' components pass ran out of memory")
    for s in np.flatnonzero(same):
        count[s], largest[s] = (count[s - 1], largest[s - 1]) if s else tr.prev_comp
    tr.prev_comp = (count[-1].copy(), largest[-1].copy())
    for k, t in enumerate(tr.thresholds):
        tr.comp[t][0].append(count[:, k]), tr.comp[t][1].append(largest[:, k])
