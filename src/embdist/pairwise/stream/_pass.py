"""The streaming pass: one walk over the engine's tiles of a shard, reduced in the native epilogue."""
from __future__ import annotations

import ctypes
import math
import threading
from dataclasses import dataclass

import numpy as np
import torch

from embdist import rows

from .. import _cpu
from ._bindings import DT_CODES, STREAM_METRICS, _check_x, _chunks, _lib, _ptr
from ._partial import (MAX_NEAR_STEPS, MAX_RADII, MB, NB, PW, TOLQ, FORMAT, StreamPartial, _empty_lists,
                       _fingerprint, _items, _max_band, _state, shard_rows)


@dataclass
class _Prepared:
    packed: torch.Tensor
    dp: int
    norms: np.ndarray | None = None
    rnorms: np.ndarray | None = None
    prm: np.ndarray | None = None
    hist_hi: float = 1.0


def _prepare(lib, x: torch.Tensor, metric: str, pack: bool = True) -> _Prepared:
    n, d = x.shape
    dt = DT_CODES[x.dtype]
    mu_t, xc_max = _cpu.centre(lib, x)             # the engine's centring: the same mu and scale
    mu = mu_t.numpy()
    chunks = _chunks(n)
    ext = [np.zeros(2) for _ in chunks]
    _cpu.run_parallel(list(range(len(chunks))), lambda c: lib.emb_stream_extent(
        _ptr(x), dt, n, d, _ptr(mu), chunks[c][0], chunks[c][1], _ptr(ext[c])))
    ext = np.max(ext, axis=0)
    hi = 2.0 * (ext[0] if metric == "euclidean" else ext[1])
    hist_hi = hi * (1 + 1e-6) if hi > 0 else 1.0
    if not pack:
        return _Prepared(torch.empty(16), 0, hist_hi=hist_hi)
    dp = _cpu.padded_depth(lib, d)
    npan = -(-n // PW)
    packed = torch.empty(npan * dp * PW + 16, dtype=torch.float32)
    assert packed.data_ptr() % 64 == 0
    step = max(1, (1 << 20) // (dp * PW))
    pans = [(p, min(npan, p + step)) for p in range(0, npan, step)]
    if metric == "euclidean":
        e = 0
        if xc_max > 0 and math.isfinite(xc_max):
            e = max(min(math.frexp(xc_max)[1], 120), -120)
        norms = np.zeros(npan * PW)
        _cpu.run_parallel(pans, lambda r: lib.emb_pack(_ptr(x), dt, n, d, dp, _ptr(mu), 2.0 ** (-e),
                                                              _ptr(packed), r[0], r[1], _ptr(norms)))
        return _Prepared(packed, dp, norms, np.sqrt(norms), _cpu.euclid_params(lib, d, dp, 2.0 ** (2 * e)), hist_hi)
    _cpu.run_parallel(pans, lambda r: lib.emb_pack(_ptr(x), dt, n, d, dp, None, 1.0, _ptr(packed),
                                                          r[0], r[1], None))
    return _Prepared(packed, dp, hist_hi=hist_hi)


def _meta(x, metric, k, K, bins, hist_hi, radii, near_steps, count, fingerprint, n_items) -> dict:
    return {"format": FORMAT, "metric": metric, "n": int(x.shape[0]), "d": int(x.shape[1]),
            "dtype": str(x.dtype).replace("torch.", ""), "k": int(k), "K": int(K), "bins": int(bins),
            "hist_hi": float(hist_hi), "radii": [float(r) for r in radii],
            "near_steps": None if near_steps is None else int(near_steps), "tolq": TOLQ,
            "shard_count": int(count), "fingerprint": fingerprint, "n_items": int(n_items)}


def _check_args(metric, k, radii, bins, hist_max, near_steps, shard):
    if metric not in STREAM_METRICS:
        raise ValueError(f"unknown metric {metric!r} for streaming; choose one of {', '.join(STREAM_METRICS)}")
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if len(radii) > MAX_RADII or any(not (r >= 0 and math.isfinite(r)) for r in radii):
        raise ValueError(f"radii must be at most {MAX_RADII} finite values >= 0, got {list(radii)}")
    if int(bins) < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    if hist_max is not None and not (hist_max > 0 and math.isfinite(hist_max)):
        raise ValueError(f"hist_max must be a finite value > 0 (or None), got {hist_max}")
    if near_steps is not None and not 0 <= int(near_steps) <= MAX_NEAR_STEPS:
        raise ValueError(f"near_steps must be in 0..{MAX_NEAR_STEPS}, got {near_steps}")
    index, count = shard
    if int(count) < 1 or not 0 <= int(index) < int(count):
        raise ValueError(f"shard index {index} is not in 0..{count - 1}")


class _Acc(threading.local):
    pass


def stream_pass(x: torch.Tensor, metric: str = "euclidean", *, k: int = 10, radii=(), bins: int = 65536,
           hist_max: float | None = None, near_steps: int | None = None, shard=(0, 1),
           candidates: int | None = None, progress: bool = False, near_radius: float | None = None) -> StreamPartial:
    """One pass over the tiles of shard ``shard`` of x's upper triangle (see the module doc).

    ``near_radius`` (instead of ``near_steps``): the candidate pairs ``partial.nd`` are then the
    pairs of representatives within that absolute distance (Chebyshev: exactly; Euclidean: a
    superset, the GEMM tolerance added; verify with ``exact_pairs``)."""
    radii = tuple(float(r) for r in radii)
    _check_args(metric, k, radii, bins, hist_max, near_steps, shard)
    if near_radius is not None and (near_steps is not None or not (near_radius >= 0 and math.isfinite(near_radius))):
        raise ValueError(f"near_radius must be a finite value >= 0 and excludes near_steps, got {near_radius}")
    x = _check_x(x)
    lib = _lib()
    n, d = x.shape
    dt = DT_CODES[x.dtype]
    index, count = int(shard[0]), int(shard[1])
    k = int(k)
    K = int(candidates) if candidates else k + max(8, k) + 128
    if K <= k:
        raise ValueError(f"candidates ({K}) must exceed k ({k})")
    groups = rows.row_groups(x)
    fp = _fingerprint(x)
    items = _items(n) if d > 0 else []
    r0, r1 = shard_rows(n, index, count)
    mine = [t for t, it in enumerate(items) if r0 <= it[0] < r1]
    acc = _empty_lists(n, K)
    item_sum = np.zeros(len(items))
    item_done = np.zeros(len(items), dtype=bool)
    item_done[mine] = True
    prep = _prepare(lib, x, metric, pack=bool(mine)) if n and d else _Prepared(torch.empty(16), 0)
    hist_hi = float(hist_max) if hist_max is not None else prep.hist_hi
    nbins = int(bins)
    nsteps = None if near_steps is None else int(near_steps)
    sp = np.zeros(5 + MAX_RADII)
    sp[:5] = [nbins, nbins / hist_hi, len(radii), TOLQ if metric == "euclidean" else 0.0,
              4 * TOLQ if metric == "euclidean" else 0.0]
    sp[5:5 + len(radii)] = np.square(np.array(radii, dtype=np.float64))
    ndthr = None
    if near_radius is not None and mine:
        ndthr = np.full(n, float(near_radius) ** 2)
    elif nsteps and mine:
        ndthr = np.zeros(n)
        code = 0 if metric == "euclidean" else 1
        _cpu.run_parallel(_chunks(n), lambda r: lib.emb_stream_nd_bound(_ptr(x), dt, n, d, nsteps, code, r[0], r[1],
                                                                        _ptr(ndthr)))
    st = _state(acc, n, K)
    tl = _Acc()
    made: list = []
    made_lock = threading.Lock()
    tile = MB * PW * NB * PW

    def thread_acc():
        a = getattr(tl, "a", None)
        if a is None:
            a = {"hist": np.zeros(nbins, dtype=np.uint64), "cnt": np.zeros(16, dtype=np.int64),
                 "st": np.zeros(2), "buf": np.empty(tile + tile // 2 + tile // 64 + 64)}
            tl.a = a
            with made_lock:
                made.append(a)
        return a

    stp = ctypes.byref(st)

    def one(t):
        rr0, nrp, c0, ncp = items[t]
        a = thread_acc()
        out = item_sum[t:t + 1]
        if metric == "euclidean":
            lib.emb_stream_euclid_item(stp, _ptr(prep.packed), prep.dp, n, d, _ptr(x), dt, rr0, nrp, c0, ncp,
                                       _ptr(a["buf"]), _ptr(prep.norms), _ptr(prep.rnorms), _ptr(groups),
                                       _ptr(prep.prm), _ptr(sp), _ptr(ndthr), _ptr(a["hist"]), _ptr(a["cnt"]),
                                       _ptr(a["st"]), _ptr(out))
        else:
            lib.emb_stream_cheb_item(stp, _ptr(prep.packed), prep.dp, n, rr0, nrp, c0, ncp, _ptr(a["buf"]),
                                     _ptr(groups), _ptr(sp), _ptr(ndthr), _ptr(a["hist"]), _ptr(a["cnt"]),
                                     _ptr(a["st"]), _ptr(out))

    try:
        bar = None
        if progress and mine:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(mine), desc=f"stream {metric}", unit="tile", leave=False)
        try:
            _cpu.run_parallel(mine, one, bar)
        finally:
            if bar is not None:
                bar.close()
        cnt = np.sum([a["cnt"] for a in made], axis=0) if made else np.zeros(16, dtype=np.int64)
        if cnt[10]:
            raise MemoryError("out of memory for the candidate buffers of the streaming pass")
        mx = np.ctypeslib.as_array((ctypes.c_int64 * (2 * st.mx_len)).from_address(st.mxp)).reshape(-1, 2).copy() \
            if st.mx_len else np.zeros((0, 2), dtype=np.int64)
        mxq = np.ctypeslib.as_array((ctypes.c_double * st.mx_len).from_address(st.mxq)).copy() \
            if st.mx_len else np.zeros(0)
        nd = np.ctypeslib.as_array((ctypes.c_int64 * (2 * st.nd_len)).from_address(st.nd)).reshape(-1, 2).copy() \
            if st.nd_len else np.zeros((0, 2), dtype=np.int64)
    finally:
        lib.emb_stream_free(ctypes.byref(st))
    max_q = max([float(a["st"][0]) for a in made], default=0.0)
    mx, mxq = _max_band(mx, mxq, max_q)
    nd = np.unique(nd, axis=0) if len(nd) else nd
    hist = np.sum([a["hist"] for a in made], axis=0).astype(np.int64) if made else np.zeros(nbins, dtype=np.int64)
    meta = _meta(x, metric, k, K, nbins, hist_hi, radii, nsteps, count, fp, len(items))
    return StreamPartial(meta=meta, shards=[index], groups=groups, hq=acc["hq"], hid=acc["hid"], hex=acc["hex"],
                         hcnt=acc["hcnt"], minap=acc["minap"], hist=hist,
                         radius_counts=cnt[:len(radii)].astype(np.int64).copy(), item_done=item_done,
                         item_sum=item_sum, mx=mx, mxq=mxq, nd=nd, pairs=int(cnt[8]), flagged=int(cnt[9]),
                         max_q=max_q)


