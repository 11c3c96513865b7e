"""Device-agnostic implementation in plain torch ops.

Used for CUDA and MPS, and on the CPU when the native kernels cannot be built
(or ``EMBDIST_PAIRWISE_NATIVE=0``).  Same contract as the native path; the
native path is only faster.
"""
from __future__ import annotations

import numpy as np
import torch

from . import _common as C


def _tiles(n: int, b: int):
    """Upper-triangle tile pairs (r0, r1, c0, c1) with r0 <= c0."""
    starts = list(range(0, n, b))
    for bi, r0 in enumerate(starts):
        for c0 in starts[bi:]:
            yield r0, min(r0 + b, n), c0, min(c0 + b, n)


def _n_tiles(n: int, b: int) -> int:
    k = -(-n // b)
    return k * (k + 1) // 2


def _write_sym(out: torch.Tensor, r0, r1, c0, c1, tile_cpu: torch.Tensor) -> None:
    out[r0:r1, c0:c1].copy_(tile_cpu)
    if c0 != r0:
        out[c0:c1, r0:r1].copy_(tile_cpu.T)


def _mm_highest(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fp32 matmul with TF32 and reduced-precision reductions off (CUDA)."""
    if a.device.type == "cuda":
        old = torch.backends.cuda.matmul.allow_tf32
        old_red = torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            return a @ b
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
            torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = old_red
    return a @ b


def _direct_sq(x32: torch.Tensor, i: torch.Tensor, j: torch.Tensor, dev64: torch.device) -> torch.Tensor:
    """Exact-ish ||x_i - x_j||^2 in float64 for index lists (chunked)."""
    out = torch.empty(i.numel(), dtype=torch.float64, device=dev64)
    d = x32.shape[1]
    step = max(1, (32 << 20) // (8 * max(d, 1)))
    for s in range(0, i.numel(), step):
        ii = i[s:s + step].to(x32.device)
        jj = j[s:s + step].to(x32.device)
        a = x32[ii].to(dev64, torch.float64)
        b = x32[jj].to(dev64, torch.float64)
        out[s:s + step] = (a - b).square_().sum(1)
    return out


TILE = {"cpu": 2048, "cuda": 4096, "mps": 4096}
DIRECT_TILE = {"cpu": 512, "cuda": 4096, "mps": 1024}


def _fp64_ok(dev: torch.device) -> bool:
    return dev.type in ("cpu", "cuda")


def euclid_like(x32: torch.Tensor, groups: np.ndarray, out: torch.Tensor, dev: torch.device,
                mode: str, bar, zero_rows: np.ndarray | None = None) -> None:
    """Fill ``out`` (N, N) float32 with Euclidean / squared Euclidean / cosine distances.

    ``x32`` is the (N, d) float32 CPU input; ``groups[i]`` is the smallest index of
    the rows equal to row i (identical rows -> exact 0).  The expansion
    |a|^2+|b|^2-2a.b runs in float64 where the device has it (the error bound is
    then deterministic, see the package docstring), in float32 on MPS.
    """
    n, d = x32.shape
    f64 = _fp64_ok(dev)
    # float64: plain rows (fp32 squares cannot overflow it); float32: centred, power-of-two scaled
    prep = C.prepare_gemm_input(x32, center=not f64, scale=not f64)
    gdt = torch.float64 if f64 else torch.float32
    xg = prep.xc.to(dev, gdt)
    nrm = prep.norms.to(dev, gdt)
    g_t = torch.from_numpy(groups).to(dev)
    b = TILE[dev.type]
    for r0, r1, c0, c1 in _tiles(n, b):
        g = _mm_highest(xg[r0:r1], xg[c0:c1].T)
        na = nrm[r0:r1][:, None]
        nb = nrm[c0:c1][None, :]
        d2 = na + nb - 2.0 * g
        if f64:
            bound = C.gemm_error_bound_f64(na, nb, g, d)
            flag = d2 <= bound * C.INV_2TOL
        else:
            bound = C.gemm_error_bound(na, nb, g, d)
            flag = (d2 <= bound * C.INV_2TOL) | C.centering_flag(na, nb, d2, d)
        same = g_t[r0:r1, None] == g_t[None, c0:c1]
        flag &= ~same
        d2 = d2.to(torch.float64) if f64 else d2.cpu().to(torch.float64)
        d2 = d2 * prep.inv_scale2  # back to the input's units (exact power of two)
        fi = torch.nonzero(flag).to(d2.device)
        if fi.numel():
            ii = fi[:, 0] + r0
            jj = fi[:, 1] + c0
            d2[fi[:, 0], fi[:, 1]] = _direct_sq(x32, ii.cpu(), jj.cpu(), d2.device)
        same = same.to(d2.device)
        d2.clamp_(min=0.0)
        d2[same] = 0.0
        if mode == "euclidean":
            res32 = C.to_f32_keep_nonzero(d2.sqrt(), ~same)
        elif mode == "sqeuclidean":
            res32 = C.to_f32_keep_nonzero(d2, ~same)
        else:  # cosine distance = |a/|a| - b/|b||^2 / 2; 1 against a zero row
            res = (d2 * 0.5).clamp_(max=2.0)
            if zero_rows is not None and zero_rows.any():
                za = torch.from_numpy(zero_rows[r0:r1]).to(res.device)[:, None]
                zb = torch.from_numpy(zero_rows[c0:c1]).to(res.device)[None, :]
                res = torch.where((za ^ zb) & ~same, torch.ones_like(res), res)
            res32 = C.to_dtype_keep_nonzero(res, ~same, torch.float32, cosine=True)
        _write_sym(out, r0, r1, c0, c1, res32.cpu())
        if r0 == c0:
            out[r0:r1, r0:r1].fill_diagonal_(0.0)
        if bar is not None:
            bar.update(1)


def n_work_euclid(n: int, dev: torch.device) -> int:
    return _n_tiles(n, TILE[dev.type])


def direct_metric(x32: torch.Tensor, out: torch.Tensor, dev: torch.device, metric: str, bar) -> None:
    """Chebyshev (fp32, bit-identical to abs(a-b).max()) or Manhattan (fp64 sum)."""
    n, d = x32.shape
    b = DIRECT_TILE[dev.type]
    xg = x32.to(dev)
    if metric == "manhattan" and dev.type != "mps":
        xg = xg.to(torch.float64)
    for r0, r1, c0, c1 in _tiles(n, b):
        a = xg[r0:r1]
        bb = xg[c0:c1]
        if metric == "chebyshev":
            t = _cheb_tile(a, bb)
        else:
            t = torch.cdist(a, bb, p=1.0) if a.dtype == torch.float64 else _manhattan_tile_f64cpu(a, bb)
            t = C.to_f32_keep_nonzero(t, t != 0)
        _write_sym(out, r0, r1, c0, c1, t.cpu().float())
        if r0 == c0:
            out[r0:r1, r0:r1].fill_diagonal_(0.0)
        if bar is not None:
            bar.update(1)


def n_work_direct(n: int, dev: torch.device) -> int:
    return _n_tiles(n, DIRECT_TILE[dev.type])


def _cheb_tile(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # max |a - b| over columns, in fp32: exact operations, so any order is
    # bit-identical to the seed's abs(a - b).max().  Bounded intermediates.
    if a.device.type in ("cuda", "cpu"):
        return torch.cdist(a, b, p=float("inf"))
    rows = max(1, (64 << 20) // (4 * max(1, b.shape[0] * a.shape[1])))
    return torch.cat([(a[s:s + rows, None, :] - b[None]).abs_().amax(-1) for s in range(0, a.shape[0], rows)])


def _manhattan_tile_f64cpu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a.cpu().double(), b.cpu().double(), p=1.0)


def snapshots(h32: torch.Tensor, out: torch.Tensor, dev: torch.device, metric: str, bar) -> None:
    """(T, V, D) float32 -> fills out (T, V, V) (any float dtype), per snapshot exact, a chunk
    of snapshots at a time.  Euclidean, squared and Chebyshev on CPU/CUDA hold only (b, V, V)
    temporaries (``_chunk_gemm``); MPS (no float64), Manhattan, cosine and chunks holding NaN or
    inf take direct differences of a smaller chunk (``_chunk_direct``: b x V x V x D, <= 96 MB)."""
    t, v, d = h32.shape
    gemm = metric in ("euclidean", "sqeuclidean", "chebyshev") and _fp64_ok(dev)
    per = max(1, (64 << 20) // (32 * v * v)) if gemm else max(1, (96 << 20) // (8 * v * v * max(d, 1)))
    iu = torch.triu_indices(v, v, 1)
    for s in range(0, t, per):
        e = min(t, s + per)
        hb = h32[s:e].to(dev)
        if gemm and bool(torch.isfinite(hb).all()):
            r, nz = _chunk_gemm(hb, metric)
        else:   # non-finite values follow the seed's IEEE arithmetic, pair by pair
            r, nz = _chunk_direct_bounded(hb, metric, dev)
        out[s:e].copy_(C.to_dtype_keep_nonzero(r, nz, out.dtype, cosine=metric == "cosine").cpu())
        o = out[s:e]                      # exact symmetry (the GEMM's two halves may differ) and zero diagonal
        o[:, iu[1], iu[0]] = o[:, iu[0], iu[1]]
        o.diagonal(dim1=1, dim2=2).zero_()
        if bar is not None:
            bar.update(e - s)


def _chunk_gemm(hb: torch.Tensor, metric: str):
    """(b, V, D) finite -> ((b, V, V) distances, nonzero mask).  Chebyshev: batched
    torch.cdist(p=inf) (exact operations: bit-identical to the seed; 0 exactly for identical
    rows).  Euclidean: float64 batched GEMM |a|^2 + |b|^2 - 2 a.b; every pair its error bound
    (gamma_d |a||b|) cannot resolve is recomputed directly in float64; identical rows
    (Chebyshev 0) are exactly 0."""
    d = hb.shape[2]
    cheb = torch.cdist(hb, hb, p=float("inf"))
    same = cheb == 0
    if metric == "chebyshev":
        return cheb, ~same
    hd = hb.double()
    g = hd @ hd.mT
    nrm = hd.square().sum(-1)
    na, nb = nrm[:, :, None], nrm[:, None, :]
    d2 = na + nb - 2.0 * g
    flag = (d2 <= C.gemm_error_bound_f64(na, nb, g, d) * C.INV_2TOL) & ~same
    del g
    fi = torch.nonzero(flag)
    step = max(1, (32 << 20) // (8 * max(d, 1)))            # flagged pairs gathered per round
    for k in range(0, fi.shape[0], step):
        q = fi[k:k + step]
        d2[q[:, 0], q[:, 1], q[:, 2]] = (hd[q[:, 0], q[:, 1]] - hd[q[:, 0], q[:, 2]]).square_().sum(1)
    d2.clamp_(min=0.0)
    d2[same] = 0.0
    return (d2.sqrt_() if metric == "euclidean" else d2), ~same


def _chunk_direct_bounded(hb: torch.Tensor, metric: str, dev: torch.device):
    """_chunk_direct over sub-chunks small enough for its b x V x V x D differences."""
    b, v, d = hb.shape
    sub = max(1, (96 << 20) // (8 * v * v * max(d, 1)))
    parts = [_chunk_direct(hb[k:k + sub], metric, dev) for k in range(0, b, sub)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _chunk_direct(hb: torch.Tensor, metric: str, dev: torch.device):
    use64 = dev.type != "mps"
    diff = hb[:, :, None, :] - hb[:, None, :, :]
    if metric == "chebyshev":
        r = diff.abs_().amax(-1)
        return r, r != 0
    nz = (diff != 0).any(-1)
    if metric in ("euclidean", "sqeuclidean", "manhattan"):
        dd = (hb.double()[:, :, None, :] - hb.double()[:, None, :, :]) if use64 else diff.cpu().double()
        r = dd.abs_().sum(-1) if metric == "manhattan" else dd.square_().sum(-1)
        if metric == "euclidean":
            r = r.sqrt_()
        return r, nz.to(r.device)
    hh = hb.double() if use64 else hb.cpu().double()      # cosine
    nrm = hh.norm(dim=-1)
    hn = hh / torch.where(nrm > 0, nrm, torch.ones_like(nrm))[..., None]
    r = (hn[:, :, None, :] - hn[:, None, :, :]).square_().sum(-1) * 0.5
    zero = nrm == 0
    r = torch.where(zero[:, :, None] ^ zero[:, None, :], torch.ones_like(r), r)
    nz = nz.to(r.device)
    r = r.clamp_(0.0, 2.0)
    return torch.where(nz, r, torch.zeros_like(r)), nz
