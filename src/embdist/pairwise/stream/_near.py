"""Near-duplicate groups: rows within n stored-format steps in every coordinate, verified on the
bit patterns of the candidate pairs the pass collected, joined into connected components."""
from __future__ import annotations

import numpy as np

from embdist.rows import group_lists

from .. import _cpu
from ._bindings import DT_CODES, _chunks, _ptr


def near_groups(lib, x, partial, groups: np.ndarray):
    """(near-duplicate groups or None, diagnostics)."""
    meta = partial.meta
    n, d = x.shape
    dt = DT_CODES[x.dtype]
    near = None
    ns = meta["near_steps"]
    if ns is not None:
        labels = groups.copy()
        cand = partial.nd
        verified = 0
        if ns > 0 and len(cand):
            ok = np.zeros(len(cand), dtype=np.uint8)
            a = np.ascontiguousarray(cand[:, 0])
            b = np.ascontiguousarray(cand[:, 1])
            _cpu.run_parallel(_chunks(len(cand), 4096), lambda r: lib.emb_stream_within_steps(
                _ptr(x), dt, d, _ptr(a[r[0]:]), _ptr(b[r[0]:]), r[1] - r[0], ns, _ptr(ok[r[0]:])))
            e = cand[ok.astype(bool)]
            verified = len(e)
            if verified:
                from scipy.sparse import coo_matrix
                from scipy.sparse.csgraph import connected_components
                src = np.concatenate([e[:, 0], np.arange(n)])
                dst = np.concatenate([e[:, 1], groups])
                g = coo_matrix((np.ones(len(src), dtype=np.int8), (src, dst)), shape=(n, n))
                _, comp = connected_components(g, directed=False)
                first = np.full(comp.max() + 1, n, dtype=np.int64)
                np.minimum.at(first, comp, np.arange(n))
                labels = first[comp]
        near = group_lists(labels)
        diag_nd = {"near_candidates": int(len(cand)), "near_edges": int(verified)}
    else:
        diag_nd = {}
    return near, diag_nd
