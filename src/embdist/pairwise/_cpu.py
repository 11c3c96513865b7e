"""CPU path: the native kernels of kernels.c driven from a few Python threads."""
from __future__ import annotations

import ctypes
import math
import os
import threading

import numpy as np
import torch

from . import _common as C

PW = 32          # panel width (rows per packed panel), must match kernels.c
MB_PANELS = 4    # row panels per work item (128 rows)
NB_PANELS = 16   # column panels per work item (512 columns)


def _ptr(t) -> int:
    if isinstance(t, np.ndarray):
        return t.ctypes.data
    return t.data_ptr()


def n_threads() -> int:
    env = os.environ.get("EMBDIST_PAIRWISE_THREADS")
    if env:
        return max(1, int(env))
    return max(1, torch.get_num_threads())


def run_parallel(items, fn, bar=None, workers: int | None = None) -> None:
    """Run fn(item) for all items on worker threads (the C calls release the GIL).

    Progress is reported, and Ctrl-C is received, by the calling thread; on any
    exception (KeyboardInterrupt included) the workers stop after their current
    item, are joined, and the exception propagates.
    """
    items = list(items)
    n = len(items)
    workers = min(workers or n_threads(), n)
    if workers <= 1:
        for it in items:
            fn(it)
            if bar is not None:
                bar.update(1)
        return
    stop = threading.Event()
    lock = threading.Lock()
    state = {"next": 0, "done": 0}
    errors: list[BaseException] = []

    def worker():
        while not stop.is_set():
            with lock:
                k = state["next"]
                state["next"] += 1
            if k >= n:
                return
            try:
                fn(items[k])
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller
                errors.append(e)
                stop.set()
                return
            with lock:
                state["done"] += 1

    threads = [threading.Thread(target=worker, name=f"embdist-pairwise-{i}", daemon=True)
               for i in range(workers)]
    for t in threads:
        t.start()
    shown = 0
    try:
        while True:
            alive = False
            for t in threads:
                t.join(timeout=0.05)
                alive = alive or t.is_alive()
            if bar is not None:
                done = state["done"]
                if done > shown:
                    bar.update(done - shown)
                    shown = done
            if not alive:
                break
    except BaseException:
        stop.set()
        for t in threads:
            t.join()
        raise
    if errors:
        raise errors[0]


class _Scratch(threading.local):
    def get(self, nbytes: int) -> np.ndarray:
        buf = getattr(self, "buf", None)
        if buf is None or buf.nbytes < nbytes:
            buf = np.empty(nbytes // 8 + 8, dtype=np.float64)
            self.buf = buf
        return buf


_scratch = _Scratch()


PREP_ROWS = 4096   # rows per preparation chunk: fixed, so the results do not depend on the threads


def prep_chunks(n: int, step: int = PREP_ROWS) -> list[tuple[int, int]]:
    return [(s, min(n, s + step)) for s in range(0, n, step)]


def centre(lib, x: torch.Tensor):
    """Column means (float64 sums, rounded to float32) and max |fl(x - mu)|, in one pass in C on
    the threads (the max from each column's min and max: fl(x - mu) is monotone in x); x (N, d)
    contiguous on the CPU in its stored dtype (float32, bfloat16 or float16)."""
    n, d = x.shape
    dt = C.DTYPE_CODES[x.dtype]
    ranges = prep_chunks(n)
    parts = [(np.zeros(d, dtype=np.float64), np.full(d, np.inf, dtype=np.float32),
              np.full(d, -np.inf, dtype=np.float32)) for _ in ranges]
    run_parallel(list(range(len(ranges))),
                 lambda k: lib.emb_col_sums(_ptr(x), dt, n, d, ranges[k][0], ranges[k][1], *map(_ptr, parts[k])))
    with np.errstate(invalid="ignore", over="ignore"):      # inf / NaN columns: mu inf or NaN
        mu = (np.sum([p[0] for p in parts], axis=0) / n).astype(np.float32)   # chunks in order
        lo = np.fmin.reduce([p[1] for p in parts])
        hi = np.fmax.reduce([p[2] for p in parts])
        dev = np.fmax(np.abs(lo - mu), np.abs(hi - mu))     # float32 subtractions, as fl(x - mu)
    mx = float(np.fmax.reduce(dev, initial=0.0))            # NaN ignored
    return torch.from_numpy(mu), mx


def gram_shape(lib) -> tuple[int, int, int]:
    """(products per float32 chain, chains per float64 flush, m) of the tier's gram (kernels.c):
    its float32 part errs by <= gamma_m sum|a_k b_k| per flush."""
    s = int(lib.emb_gram_shape())
    return s & 0xFF, (s >> 8) & 0xFF, s >> 16


def padded_depth(lib, d: int) -> int:
    """d rounded up to whole float32 chains of the tier's gram (padding adds exact zeros; the
    last float64 flush of a row may hold fewer chains)."""
    ch, _, _ = gram_shape(lib)
    return max(ch, -(-d // ch) * ch)


def pack(lib, x: torch.Tensor, mu: torch.Tensor | None, scale: float, want_norms: bool):
    """Panels of fl(fl(x - mu) * scale) in float32 (kernels.c, "packing"), x in its stored dtype."""
    n, d = x.shape
    dt = C.DTYPE_CODES[x.dtype]
    dp = padded_depth(lib, d)
    npan = -(-n // PW)
    packed = torch.empty(npan * dp * PW + 16, dtype=torch.float32)
    assert packed.data_ptr() % 64 == 0
    norms = np.zeros(npan * PW, dtype=np.float64) if want_norms else None
    step = max(1, (1 << 20) // (dp * PW))
    mu_p = _ptr(mu) if mu is not None else None
    run_parallel([(p, min(npan, p + step)) for p in range(0, npan, step)],
                 lambda r: lib.emb_pack(_ptr(x), dt, n, d, dp, mu_p, scale, _ptr(packed), r[0], r[1],
                                               _ptr(norms) if norms is not None else None))
    return packed, dp, norms


def _items(n: int):
    """(r0, nrp, c0, ncp) blocks covering every pair i < j exactly once, biggest first."""
    npan = -(-n // PW)
    items = []
    for rp0 in range(0, npan, MB_PANELS):
        nrp = min(MB_PANELS, npan - rp0)
        for cp0 in range(rp0, npan, NB_PANELS):
            items.append((rp0 * PW, nrp, cp0 * PW, min(NB_PANELS, npan - cp0)))
    return items


def n_items(n: int) -> int:
    return len(_items(n))


# Bound constants of the native GEMM (see the package docstring, "Euclidean error bound").
# The gram's float32 part errs by gamma_m sum|a_k b_k| per flush, m = chain + log2(chains) (the
# chains are summed pairwise: 17 for 2 chains of 16, 20 for avx2's 16): the library reports m.
def euclid_params(lib, d: int, dp: int, inv_scale2: float) -> np.ndarray:
    u = C.U32
    e = C.U64
    ch, nch, m = gram_shape(lib)
    gm = m * u / (1.0 - m * u)
    nblk = -(-dp // (ch * nch))        # float64 flushes per pair
    c1 = 2.0 * gm + 2.02 * nblk * e + 1.02 * 2.0 * e
    c2 = 1.01 * (d + 1) * e + 2.0 * e
    c3 = dp * 2.0 ** -148
    c4 = math.sqrt(d) * 2.0 ** -149
    return np.array([c1, c2, c3, C.INV_2TOL, u * (1.0 + 2 * u), c4, C.CENTER_TOL ** 2, inv_scale2],
                    dtype=np.float64)


def euclid_like(lib, x: torch.Tensor, groups: np.ndarray, out: torch.Tensor, mode: str, bar,
                zero_rows: np.ndarray | None = None) -> int:
    """Native Euclidean / squared / cosine (x normalised, float32) into ``out``; x contiguous on
    the CPU in its stored dtype (no float32 copy: the kernels convert as they read); returns
    #recomputed pairs."""
    n, d = x.shape
    dt = C.DTYPE_CODES[x.dtype]
    mu, xc_max = centre(lib, x)
    e = 0
    if xc_max > 0 and math.isfinite(xc_max):
        e = max(min(math.frexp(xc_max)[1], 120), -120)
    packed, dp, norms = pack(lib, x, mu, 2.0 ** (-e), True)
    rnorms = np.sqrt(norms)
    prm = euclid_params(lib, d, dp, 2.0 ** (2 * e))
    mcode = {"euclidean": 0, "sqeuclidean": 1, "cosine": 2}[mode]
    zr = None
    if zero_rows is not None and zero_rows.any():
        zr = np.ascontiguousarray(zero_rows.astype(np.uint8))
    ld = out.stride(0)
    flagged = [0]
    lock = threading.Lock()

    def one(it):
        r0, nrp, c0, ncp = it
        cbuf = _scratch.get(nrp * PW * ncp * PW * 8)
        k = lib.emb_euclid_block(_ptr(packed), dp, n, d, _ptr(x), dt, r0, nrp, c0, ncp, _ptr(cbuf),
                                 _ptr(norms), _ptr(rnorms), _ptr(groups), _ptr(zr) if zr is not None else None,
                                 mcode, _ptr(prm), _ptr(out), ld)
        if k:
            with lock:
                flagged[0] += k

    run_parallel(_items(n), one, bar)
    return flagged[0]


def direct_metric(lib, x: torch.Tensor, out: torch.Tensor, metric: str, bar) -> None:
    n, d = x.shape
    packed, dp, _ = pack(lib, x, None, 1.0, False)
    ld = out.stride(0)
    fn = lib.emb_cheb_block if metric == "chebyshev" else lib.emb_l1_block
    esize = 4 if metric == "chebyshev" else 8

    def one(it):
        r0, nrp, c0, ncp = it
        cbuf = _scratch.get(nrp * PW * ncp * PW * esize)
        fn(_ptr(packed), dp, n, _ptr(cbuf), r0, nrp, c0, ncp, _ptr(out), ld)

    run_parallel(_items(n), one, bar)


SNAP_OUT_DTYPES = C.DTYPE_CODES
SNAP_ITEM = 64   # snapshots per work item at most (one C call: converts, computes, writes its rows)


def _snap_multi(lib):
    """lib.emb_snap_multi with its ctypes signature (set here: the snapshot kernels' own entry)."""
    f = lib.emb_snap_multi
    if f.argtypes is None:
        f.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 5 + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2
        f.restype = None
    return f


def snap_items(t0: int, t1: int) -> list[tuple[int, int]]:
    """[t0, t1) in work items of up to SNAP_ITEM snapshots, at least ~8 items per thread."""
    n = t1 - t0
    step = max(1, min(SNAP_ITEM, -(-n // (8 * n_threads()))))
    return [(s, min(t1, s + step)) for s in range(t0, t1, step)]


def snapshots(lib, h: torch.Tensor, t0: int, t1: int, *, out_e: torch.Tensor | None = None,
              out_c: torch.Tensor | None = None, squared: bool = False, fresh: bool = True, bar=None) -> None:
    """Snapshots [t0, t1) of h (T, V, D; float32/bfloat16/float16, contiguous, read as is) in one
    pass: Euclidean (squared if ``squared``) into out_e and Chebyshev into out_c (either may be
    None), each (T', V, V) contiguous float32/bfloat16/float16 of one dtype, out[0] = snapshot t0.
    ``fresh``: the outputs were just allocated (plain stores; else streaming stores).
    ``bar`` advances by one per snapshot."""
    t, v, dd = h.shape
    outs = [o for o in (out_e, out_c) if o is not None]
    if not outs or t1 <= t0:
        return
    odt = SNAP_OUT_DTYPES[outs[0].dtype]
    assert all(o.dtype == outs[0].dtype and o.is_contiguous() for o in outs)
    fn = _snap_multi(lib)
    esz = outs[0].element_size()

    def base(o):        # the kernel indexes the output by the absolute t
        return None if o is None else _ptr(o) - t0 * v * v * esz

    be, bc = base(out_e), base(out_c)
    items = snap_items(t0, t1)
    prog = None
    if bar is not None:
        step, left = items[0][1] - items[0][0], [t1 - t0]

        class _Prog:    # run_parallel counts items, the bar counts snapshots (the short item last)
            def update(self, k):
                n = min(left[0], k * step)
                left[0] -= n
                bar.update(n)
        prog = _Prog()

    def one(r):
        fn(_ptr(h), SNAP_OUT_DTYPES[h.dtype], v, dd, r[0], r[1], be, bc, int(squared) | (0 if fresh else 2), odt)

    run_parallel(items, one, prog)


def hist_pass(lib, d: torch.Tensor, prefix_bits: int, prefix: int):
    """One pass of the radix select over the strict upper triangle (float32, row-major)."""
    n = d.shape[0]
    ld = d.stride(0)
    # row ranges of about equal numbers of elements
    target = max(1 << 22, (n * (n - 1) // 2) // (8 * n_threads()) + 1)
    ranges, r0, acc = [], 0, 0
    for i in range(n):
        acc += n - 1 - i
        if acc >= target or i == n - 1:
            ranges.append((r0, i + 1))
            r0, acc = i + 1, 0
    res = []
    lock = threading.Lock()

    def one(r):
        hist = np.zeros(1 << 16, dtype=np.int64)
        st = np.array([math.inf, -math.inf, 0.0, 0.0, 0.0])
        lib.emb_hist_upper(_ptr(d), n, ld, r[0], r[1], prefix_bits, prefix, 0, _ptr(hist), _ptr(st))
        with lock:
            res.append((hist, st))

    run_parallel(ranges, one)
    hist = np.zeros(1 << 16, dtype=np.int64)
    st = np.array([math.inf, -math.inf, 0.0, 0.0, 0.0])
    for h, s in res:
        hist += h
        st[0] = min(st[0], s[0])
        st[1] = max(st[1], s[1])
        st[2:] += s[2:]
    return hist, st
