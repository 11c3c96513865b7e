"""From a complete partial to the result: exact k nearest neighbours (with the proof of their
order), the statistics and the near-duplicate groups."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from embdist.rows import group_lists

from .. import _cpu
from ._bindings import DT_CODES, _check_x, _lib, _ptr
from ._near import near_groups
from ._partial import StreamPartial, _fingerprint
from ._stats import exact_pairs, statistics


@dataclass
class StreamResult:
    metric: str
    n: int
    k: int
    knn_ids: np.ndarray          # (N, k) int64 row indices, -1 padded
    knn_dist: np.ndarray         # (N, k) float64, inf padded
    hist_counts: np.ndarray      # (bins,) int64
    hist_edges: np.ndarray       # (bins + 1,) float64
    stats: dict
    duplicate_groups: list
    near_groups: list | None
    near_steps: int | None
    groups: np.ndarray           # (N,) representative of each row's exact-duplicate group
    diagnostics: dict = field(default_factory=dict)


_FINAL_CHUNK = 8192     # representative rows per step of the final exact pass (bounds its memory)


def _lists_chunk(lib, x, partial, reps, rneed, sizes, memk, k, tolq, mcode):
    """Exact first rows of a chunk of representative rows' lists, and the proof of their order.

    Returns (ids (r, k), q (r, k), smallest nonzero q (r,), indices of unresolved rows).  A row
    is unresolved when its list cannot prove that every pair left out of it (or not re-evaluated)
    comes after its need-th row; the caller evaluates those rows in full.
    """
    n = len(sizes)
    K = partial.meta["K"]
    nr = len(reps)
    rows_r = np.arange(nr)
    big = np.iinfo(np.int64).max
    hq, hid, hex_, hcnt = partial.hq[reps], partial.hid[reps], partial.hex[reps], partial.hcnt[reps]
    live = np.arange(K)[None, :] < hcnt[:, None]
    key_id = np.where(live, hid, big)
    order = np.lexsort((key_id, hq), axis=-1)          # the list by its stored keys
    aq = np.take_along_axis(hq, order, 1)
    aid = np.take_along_axis(key_id, order, 1)
    aex = np.take_along_axis(hex_, order, 1).astype(bool)
    del key_id
    top = order[:, K - 1]                                  # the largest stored key
    last_q, last_id, last_ex = hq[rows_r, top], hid[rows_r, top], hex_[rows_r, top].astype(bool)
    del order, hq, hid, hex_
    asz = np.where(aid < big, sizes[np.minimum(aid, n - 1)], 0)
    pa = np.minimum((np.cumsum(asz, axis=1) < np.maximum(rneed, 1)[:, None]).sum(1), K - 1)
    t_approx = aq[rows_r, pa]                              # stored value holding the need-th row
    # Entries that can reach the first need rows (the first row when need = 0): exact value
    # possibly <= the exact need-th.  A stored value v means exact in [v/(1+tol), v/(1-tol)].
    # Only they are re-evaluated; the others' exact values exceed the exact need-th value.
    grow = (1 + tolq) / (1 - tolq) * (1 + 1e-15)
    band = live & (aq <= (t_approx * grow)[:, None])
    redo = band & ~aex
    qx = aq.copy()
    if redo.any():
        r, c = np.nonzero(redo)
        qx[r, c] = exact_pairs(lib, x, mcode, reps[r], aid[r, c])
    qx[~band & live] = np.inf                              # not needed: after the need-th row
    order2 = np.lexsort((aid, qx), axis=-1)
    sq = np.take_along_axis(qx, order2, 1)
    sid = np.take_along_axis(aid, order2, 1)
    sid[~np.isfinite(sq)] = big
    del qx, order2
    first = np.where(live[:, 0], sq[:, 0], np.inf)
    lst_id, lst_q = _expand(sq, sid, sizes, memk, rneed, k, n)
    # proof: every pair of a full list's row left out comes after the need-th row
    tpos = np.clip(rneed - 1, 0, k - 1)
    t_q, t_id = lst_q[rows_r, tpos], lst_id[rows_r, tpos]
    t_q = np.where(rneed > 0, t_q, first)                  # need = 0: the first row must be proven
    t_id = np.where(rneed > 0, t_id, big)
    cond_b = np.where(last_ex, (last_q > t_q) | ((last_q == t_q) & (last_id >= t_id)),
                      last_q > t_q * (1 + tolq))
    cond_a = partial.minap[reps] > t_q * (1 + tolq)
    unresolved = np.flatnonzero((hcnt == K) & ~(cond_a & cond_b))
    return lst_id, lst_q, first, unresolved


def _first_members(groups: np.ndarray, k: int) -> np.ndarray:
    """memk[g] = the first k rows of representative g's group, ascending (-1 padded)."""
    n = len(groups)
    memk = np.full((n, k), -1, dtype=np.int64)
    memk[:, 0] = np.arange(n)
    for g in group_lists(groups):
        memk[g[0], :min(k, len(g))] = g[:k]
    return memk


def _expand(sq, sid, sizes, memk, rneed, k: int, n: int, chunk_elems: int = 1 << 22):
    """Rows in (q, row id) order from representative lists sorted by (q, rep): each representative
    stands for its group's rows (same q).  Returns the first need rows per list (k columns)."""
    nr, K = sq.shape
    big = np.iinfo(np.int64).max
    lst_id = np.full((nr, k), -1, dtype=np.int64)
    lst_q = np.full((nr, k), np.inf)
    if nr == 0 or K == 0:
        return lst_id, lst_q
    valid = sid < big
    ssz = np.where(valid, sizes[np.minimum(sid, n - 1)], 0)
    p = np.minimum((np.cumsum(ssz, axis=1) < rneed[:, None]).sum(1), K - 1)
    cutq = sq[np.arange(nr), p]
    cnt = (valid & (sq <= cutq[:, None])).sum(1)        # entries up to the need-th row, ties included
    cnt = np.where(rneed > 0, np.maximum(cnt, 1), 0)
    order = np.argsort(cnt, kind="stable")
    s = 0
    while s < nr:
        L = max(1, int(cnt[order[min(nr - 1, s)]]))
        step = max(1, chunk_elems // (L * k))
        rows = order[s:s + step]
        L = max(1, int(cnt[rows].max()))
        ids = memk[np.where(valid[rows, :L], sid[rows, :L], 0)]                     # (r, L, k)
        ok = (np.arange(L)[None, :] < cnt[rows, None])[:, :, None] & (ids >= 0)
        qq = np.where(ok, sq[rows, :L, None], np.inf).reshape(len(rows), -1)
        ii = np.where(ok, ids, big).reshape(len(rows), -1)
        o = np.lexsort((ii, qq), axis=-1)[:, :k]
        got_q = np.take_along_axis(qq, o, 1)
        got_i = np.take_along_axis(ii, o, 1)
        keep = (np.arange(o.shape[1])[None, :] < rneed[rows, None]) & np.isfinite(got_q)
        lst_q[rows, :o.shape[1]] = np.where(keep, got_q, np.inf)
        lst_id[rows, :o.shape[1]] = np.where(keep, got_i, -1)
        s += step
    return lst_id, lst_q


def _mates(groups: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row: up to k identical rows (ascending, itself excluded), and how many."""
    n = len(groups)
    ids = np.full((n, k), -1, dtype=np.int64)
    cnt = np.zeros(n, dtype=np.int64)
    for g in group_lists(groups):
        head = g[:k + 1]
        s = len(g)
        m = min(k, s - 1)
        for p, i in enumerate(g):
            row = np.delete(head, p)[:m] if p <= k else head[:m]
            ids[i, :m] = row
            cnt[i] = m
    return ids, cnt


def finalize(x: torch.Tensor, partial: StreamPartial) -> StreamResult:
    """Exact neighbours, groups and statistics from a complete partial (see the module doc)."""
    x = _check_x(x)
    lib = _lib()
    meta = partial.meta
    if not partial.complete:
        missing = sorted(set(range(meta["shard_count"])) - set(partial.shards))
        raise ValueError(f"the partial lacks shard(s) {missing} of {meta['shard_count']}; merge them all first")
    n, d = x.shape
    if (n, d) != (meta["n"], meta["d"]) or str(x.dtype).replace("torch.", "") != meta["dtype"]:
        raise ValueError(f"x is {tuple(x.shape)} {x.dtype} but the partial was computed on "
                         f"({meta['n']}, {meta['d']}) {meta['dtype']}")
    if _fingerprint(x) != meta["fingerprint"]:
        raise ValueError("x is not the matrix the partial was computed on (row hashes differ)")
    metric = meta["metric"]
    mcode = 0 if metric == "euclidean" else 1
    k, tolq = meta["k"], meta["tolq"] if metric == "euclidean" else 0.0
    groups = partial.groups
    dt = DT_CODES[x.dtype]
    sizes = np.bincount(groups, minlength=n) if n else np.zeros(0, dtype=np.int64)
    zero_pairs = int((sizes * (sizes - 1) // 2).sum())
    n_pairs = n * (n - 1) // 2
    if partial.pairs != n_pairs - zero_pairs:
        raise RuntimeError(f"the passes covered {partial.pairs:,} pairs, expected {n_pairs - zero_pairs:,}: "
                           "shards missing or overlapping")

    # --- k nearest neighbours (lists are kept for representative rows, over representatives)
    mate_ids, m = _mates(groups, k)
    need = k - m                                       # rows to take beyond the identical ones
    reps = np.flatnonzero(groups == np.arange(n))
    sizes = np.bincount(groups, minlength=n)
    memk = _first_members(groups, k)
    nr = len(reps)
    rneed = need[reps]
    lst_id = np.full((nr, k), -1, dtype=np.int64)
    lst_q = np.full((nr, k), np.inf)
    first = np.full(nr, np.inf)
    unresolved = []
    for c0 in range(0, nr, _FINAL_CHUNK):
        sl = slice(c0, min(nr, c0 + _FINAL_CHUNK))
        li, lq, fi, un = _lists_chunk(lib, x, partial, reps[sl], rneed[sl], sizes, memk, k, tolq, mcode)
        lst_id[sl], lst_q[sl], first[sl] = li, lq, fi
        unresolved.extend((c0 + un).tolist())
    unresolved = np.array(unresolved, dtype=np.int64)
    if len(unresolved):
        def one(r):
            i = int(reps[r])
            q = np.empty(n)
            lib.emb_stream_row_exact(_ptr(x), dt, n, d, mcode, _ptr(groups), i, _ptr(q))
            qr = q[groups]
            qr[np.isnan(qr)] = np.inf
            first[r] = qr.min()
            nd_ = int(rneed[r])
            if nd_ == 0:
                return
            cut = np.partition(qr, nd_ - 1)[nd_ - 1] if nd_ <= n else np.inf
            cand = np.flatnonzero(qr <= cut)
            o = cand[np.lexsort((cand, qr[cand]))][:nd_]
            lst_id[r, :nd_] = np.where(np.isfinite(qr[o]), o, -1)
            lst_q[r, :nd_] = qr[o]
        _cpu.run_parallel(list(unresolved), one)
    row_list = np.full(n, -1, dtype=np.int64)
    row_list[reps] = np.arange(nr)
    li = row_list[groups]                               # each row reads its representative's list
    knn_ids = np.full((n, k), -1, dtype=np.int64)
    knn_q = np.full((n, k), np.inf)
    cols = np.arange(k)
    has_mate = cols[None, :] < m[:, None]
    src = np.clip(cols[None, :] - m[:, None], 0, k - 1)
    from_list = ~has_mate
    knn_ids[has_mate] = mate_ids[has_mate]
    knn_q[has_mate] = 0.0
    knn_ids[from_list] = lst_id[li[:, None].repeat(k, 1)[from_list], src[from_list]]
    knn_q[from_list] = lst_q[li[:, None].repeat(k, 1)[from_list], src[from_list]]
    knn_ids[~np.isfinite(knn_q)] = -1
    knn_dist = np.sqrt(knn_q)
    first_nz = np.full(n, np.inf)
    first_nz[reps] = first

    stats, counts, edges = statistics(lib, x, partial, groups, first_nz, zero_pairs, tolq)
    near, diag_nd = near_groups(lib, x, partial, groups)
    ns = meta["near_steps"]
    diagnostics = {"flagged_pairs": int(partial.flagged), "fallback_rows": int(len(unresolved)),
                   "max_candidates": int(len(partial.mx)), **diag_nd}
    return StreamResult(metric=metric, n=n, k=k, knn_ids=knn_ids, knn_dist=knn_dist, hist_counts=counts,
                        hist_edges=edges, stats=stats, duplicate_groups=group_lists(groups), near_groups=near,
                        near_steps=ns, groups=groups, diagnostics=diagnostics)


def vocab_stats(x: torch.Tensor, metric: str = "euclidean", **kw) -> StreamResult:
    """stream + finalize in one process."""
    from ._pass import stream_pass
    return finalize(x, stream_pass(x, metric, **kw))
