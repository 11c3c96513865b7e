"""Exact pairwise distances between embedding rows: the distance engine of embdist.

API
---
``pairwise(x, metric="euclidean", *, device="auto", out=None, progress=False)``
    x: (N, d) bfloat16 / float16 / float32 (computed in float32: conversion is exact).
    Returns the (N, N) float32 CPU matrix, or fills ``out`` (a float32 CPU tensor of shape
    (N, N), e.g. memory-mapped with ``torch.from_file`` / ``np.memmap``) and returns it.
    metric: "euclidean", "chebyshev", "sqeuclidean", "manhattan", "cosine"; anything else
    raises ValueError naming the value and the choices.
``pairwise_snapshots(history, metric, *, out_dtype=torch.float32, device="auto", out=None, progress=False)``
    history: (T, V, D) -> (T, V, V) in ``out_dtype``, same contract per snapshot.
``pairwise_snapshots_multi(history, metrics, *, out_dtype=torch.float32, device="auto", out=None, progress=False)``
    -> {metric: (T, V, V)} for a list of metric names (repeats ignored, order kept); each
    tensor is bit-identical to ``pairwise_snapshots(history, metric, ...)``.  Euclidean (or
    squared) and Chebyshev share one pass over each snapshot.  ``out`` ({metric: tensor}; a
    tensor for ``pairwise_snapshots``): contiguous (T, V, V) CPU tensors of ``out_dtype`` to
    fill, e.g. buffers reused across calls or memory-mapped files.
``upper_triangle_stats(d)`` -> {"n_pairs", "min", "median", "mean", "max", "zero_pairs"}
    over the strict upper triangle of a square matrix.  median is the LOWER median
    (``torch.median``: sorted[(n-1)//2]), exact, found by a 16-bit-digit radix select on the
    order-preserving integer keys of the float bits, row block by row block: no N x N mask,
    no gathered copy.  mean is accumulated in float64.  Any NaN makes min/median/mean/max NaN.
``snapshot_step_stats(d)``: d (T, V, V) -> per step over the strict upper triangle (the
    off-diagonal pairs of a symmetric matrix): {"min", "mean", "max"} float64 (T,),
    {"zero_pairs"} int64 (T,).
``output_nbytes(n, dtype=torch.float32)``: bytes of an n x n output (n * n * itemsize).

Contract (for finite input)
---------------------------
* A distance is exactly 0 if and only if the two rows are identical (elementwise equal,
  -0.0 == 0.0).  Never negative, never NaN; the matrix is exactly symmetric with an exactly
  zero diagonal.  (Cosine is the exception to "only if": distinct parallel rows may be 0.)
* euclidean: relative error <= 2e-6 against float64 for every pair, near-duplicates
  included.  Distances below float32's normal range (< 1.2e-38) are correctly rounded to
  within the subnormal spacing 2**-149 and are never rounded to 0 for distinct rows.
* sqeuclidean: relative error <= 4e-6 (squares below 2**-126 as above; a nonzero square
  that underflows float32 is stored as the smallest subnormal, never as 0).
* manhattan: relative error <= 2e-6 (float32 |a-b| summed 16 at a time, then in float64).
* chebyshev: bit-identical to the seed's ``torch.abs(a - b).max()`` in float32 (max and
  abs are exact, so the order of evaluation cannot change a bit).
* cosine: 1 - cos = |a/|a| - b/|b||^2 / 2, error <= 4e-6 relative + 2.5e-7 absolute (the
  float32 rounding of the normalised rows); exactly 0 for identical rows; 1 between a zero
  row and a nonzero row (where scipy gives NaN).
* pairwise_snapshots with float16/bfloat16 ``out_dtype``: values are rounded once; a
  nonzero distance below the format's smallest subnormal is stored as that subnormal, so 0
  still means identical rows.  Relative accuracy is then the format's (~5e-4 for float16).
* Non-finite input: IEEE arithmetic applies, the contract does not.
* The process must not run with flush-to-zero / denormals-are-zero enabled
  (``torch.set_flush_denormal(True)``): the exact-zero guarantee for rows that differ only
  in subnormal coordinates relies on gradual underflow.

Devices, memory, progress, interrupts
-------------------------------------
``device="auto"`` picks CUDA, then MPS, then CPU; "cpu", "cuda[:i]", "mps" force one
(RuntimeError if unavailable).  The output always lives on the CPU.  Work is done in tiles:
no (rows, N, d) intermediate; extra memory on the CPU path is about one float32 copy of x
plus one packed copy (2 x 4Nd bytes) and per-thread tiles of a few MB, so the peak is
within output + input + 1 GB for the sizes of the seeds (20,373 x 2,560: +0.45 GB).
With ``progress=True`` tqdm shows the tiles.  Ctrl-C: KeyboardInterrupt reaches the
caller after the running tiles finish (worker threads are joined, nothing keeps running);
the contents of ``out`` are then undefined, everything else is as before the call.

Design
------
CPU (default when the native kernels build): ``kernels.c`` driven from Python threads.
* Identical rows: a 64-bit hash of the canonical float bits of each row, equal hashes
  verified elementwise -> ``groups[i]`` = first row equal to row i.  Pairs in one group
  are written as exact 0; no arithmetic can make them nonzero or others zero.
* Euclidean / squared / cosine (cosine = squared distance of the normalised rows / 2):
  rows are centred (distances are translation invariant; float32 rounding of x - mu is
  bounded below) and scaled by a power of two (exact) so max |x| is in [0.5, 1), then
  packed into 32-row panels.  A register-tiled AVX-512 kernel (4 rows x 32 columns, two
  independent accumulator chains per output: 16 zmm accumulators) computes G = a.b for the
  upper-triangle blocks only (128 x 512 rows x columns per work item; symmetry halves the
  work) and the epilogue writes d^2 = |a|^2 + |b|^2 - 2G (float64) to the block and to its
  mirror (contiguous runs), so no full-size temporary exists.
* Euclidean error bound (proven, deterministic; see ``_cpu.euclid_params``): per block of
  32 products, each output has two float32 chains of exactly 16 fused multiply-adds from
  zero (even and odd k); their float32 sum is added to a float64 accumulator.  With
  u = 2**-24, one chain errs by <= gamma_16 sum|a_k b_k| (16 roundings) and the sum of the
  two by <= gamma_17 sum|a_k b_k| over the block.  So |fl(G) - G| <= gamma_17 sum|a_k b_k|
  + (d/32) 2**-53 sum|a_k b_k| + d 2**-150 (underflow), and sum|a_k b_k| <= |a||b|
  (Cauchy-Schwarz).  Adding the float64 roundings of the norms and of |a|^2+|b|^2-2G gives
  a bound E = c1 |a||b| + c2 (|a|^2+|b|^2) + c3 on the error of d^2, c1 ~ 2 gamma_17 = 2.0e-6.
  The avx2 tier sums 16 chains per float64 flush, pairwise (an eighth of the flushes; with
  its 16 registers the flush is costly): each product then passes 16 + 4 roundings, gamma_20,
  c1 ~ 2.4e-6; the tier reports m (``_cpu.gram_shape``) and the constants follow it.
  The relative error of d = sqrt(d^2) is <= E / (2 d^2), so every pair with
  d^2 <= E / (2 * 1.5e-6) -- roughly: centred cosine > 0.66 -- is recomputed directly:
  float64 sum of float64 squared differences of the original rows (relative error
  <= (d+2) 2**-53), through the groups' representatives and memoised, so two big
  near-duplicate groups cost one sum.  The centring rounding moves a distance by at most
  u (|a_c| + |b_c|) + sqrt(d) 2**-149; pairs where that could exceed 3e-7 of the distance
  are recomputed too.  Budget: 1.5e-6 (expansion) + 3e-7 (centring) + 1.2e-7 (float64
  sums, sqrt, rounding to float32) < 2e-6, with no probabilistic assumption.  Because the
  blocking and the summation order are ours, this bound holds; it would not for a BLAS
  whose accumulation we cannot see (and MKL's sgemm is ~2x slower here: on this AMD CPU it
  runs its AVX2 code).
* Chebyshev: the same tiling with subtract + VRANGEPS (|.|-max in one instruction),
  upper-triangle blocks, mirrored.  Manhattan: subtract, abs, add (float32 x 16, float64).
* Snapshots (small V, read in their own dtype): direct, up to 64 snapshots per work item (one
  C call).  Each snapshot is converted once (bf16/fp16 -> float32, vector conversions and
  16 x 16 register transposes) into panels of 16 rows stored k-major, zero padded (padding
  adds exact zeros).  Upper-triangle tiles of 16 x 16 pairs: per coordinate one subtract
  b - a feeds both an FMA (Euclidean) and VRANGEPS (Chebyshev), so both metrics cost one
  pass; each finished tile is written straight into the output rows (plain stores: they hit
  the lines the page fault has just zeroed; streaming stores into reused buffers) and,
  transposed in registers, into its mirror: the output is written once, by the threads that
  fault its pages.  Euclidean: chains of 16 FMAs from zero, 4 chains added in float32
  (superblocks of 64 terms, then float64 when D > 64): relative error <= 22u on d^2, so
  <= 12u ~ 7.2e-7 on d after the float32 sqrt.  Identical rows are those whose Chebyshev
  value of the same pass is 0 (fl(a - b) = 0 iff a == b under gradual underflow); pairs of
  distinct rows with d^2 < 2**-90 (squares may underflow) or d^2 >= 2**126 (may overflow)
  are settled by a float64 sum.  Chebyshev: float32 |a-b| max.  Every kernel tier does the
  same arithmetic (bit-identical results: the square-accumulate is rounded once everywhere).  Float16/bfloat16 outputs are rounded in the
  kernel.  Measured at 5,001 x 128 x 64, both metrics, float32 output, 2 cores: 0.04 s of
  kernel time (0.08 s on one core); the first touch of the fresh 656 MB output costs
  0.14-0.35 s more on this project's VMs (the same for any writer; float16 halves it).
  Manhattan and cosine snapshots use the generic path (float64, bounded chunks).
* Statistics: the radix select's histograms are built in C on the threads.

Why a C source compiled at first use: the Chebyshev target (>= 20x torch.cdist) needs a
register-tiled AVX-512 loop (a simple numba kernel is ~15x slower, REFERENCE.md), and the
proven Euclidean bound needs a GEMM whose accumulation we control, at least as fast as
MKL.  numba cannot express VRANGEPS or guarantee the register tiling; a build-time
extension would need a setuptools build backend and a compiler at install time anyway.
So ``_native.py`` compiles ``kernels.c`` with the system compiler (gcc/cc/clang, the tier's
ISA flags, ``-O3 -ffp-contract=off``, no fast-math) into a per-user cache keyed by source,
compiler, flags and CPU flags, atomically, on first use (~2-5 s), one library per tier:
avx512, avx2 (AVX2 + FMA), neon (ARM64) and portable (x86-64-v2 / any CPU) share one kernel
design (see kernels.c: the per-ISA part is a ~20-line header per tier) and the same bound.
If no compiler exists or the build fails, a warning is logged and the generic path runs.

Generic path (``_generic.py``; CUDA, MPS, and CPU fallback): pure torch ops on the device,
upper-triangle tiles.  Euclidean uses a float64 GEMM where the device has float64 (CPU,
CUDA; bound gamma_d |a||b|, so only d^2 < ~1e-9 |a||b| is recomputed), plus the same
groups, direct recomputation and rounding guards.  MPS has no float64: float32 GEMM on
centred data with an error model (not a proof), recomputation on the CPU in float64.
Chebyshev uses torch.cdist(p=inf) per tile (exact operations, bit-identical).  Snapshots
(CUDA, CPU fallback): chunks of snapshots with (b, V, V) temporaries only -- batched
cdist(p=inf) for Chebyshev and for the identical-row test, a batched float64 GEMM with the same
bound and direct recomputation for Euclidean; MPS, Manhattan, cosine and chunks holding NaN or
inf take direct differences of sub-chunks of at most 96 MB.

Kernel tiers (``_native.py``): avx512, avx2 (AVX2 + FMA), neon (ARM64), portable, or torch
(no native library); the best one the CPU runs is picked at load time.
``use_kernels(name) -> str`` forces one (auto|avx512|avx2|neon|portable|torch; InputError if the
CPU lacks it) and returns the tier in use; ``active_kernels() -> str`` says which tier runs.

Environment: EMBDIST_KERNELS=auto|avx512|avx2|neon|portable|torch (tier, as use_kernels),
EMBDIST_PAIRWISE_BACKEND=auto|native|generic (CPU path choice),
EMBDIST_PAIRWISE_NATIVE=0 (never build), EMBDIST_PAIRWISE_THREADS (default
torch.get_num_threads()), EMBDIST_CACHE_DIR, EMBDIST_PAIRWISE_MARCH (with auto: one build
for that -march, the compiler's target decides the tier), CC,
EMBDIST_SNAPSHOT_THP=1 (snapshot outputs on transparent huge pages, see ``_snap_empty``).
"""
from __future__ import annotations

import torch

from embdist import rows

from . import _common as C
from ._common import native_lib as _native_lib, progress_bar as _bar
from . import _generic
from . import _native  # noqa: F401  (embdist.pairwise._native: the kernels' build)
from ._native import active_kernels, use_kernels
from ._stats import snapshot_step_stats, upper_triangle_stats

__all__ = ["pairwise", "pairwise_snapshots", "pairwise_snapshots_multi", "upper_triangle_stats",
           "snapshot_step_stats", "output_nbytes", "METRICS", "use_kernels", "active_kernels"]

METRICS = C.METRICS


def output_nbytes(n: int, dtype=torch.float32) -> int:
    """Bytes of an n x n output matrix of ``dtype``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return int(n) * int(n) * torch.empty((), dtype=dtype).element_size()


def _prepare_out(out, shape) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=torch.float32)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape) or out.dtype != torch.float32 or out.device.type != "cpu":
        raise ValueError(f"out must be a float32 CPU tensor of shape {tuple(shape)}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    return out


def _row_major(out: torch.Tensor) -> bool:
    return out.stride(1) == 1 and out.stride(0) >= out.shape[1]


def pairwise(x: torch.Tensor, metric: str = "euclidean", *, device: str = "auto",
             out: torch.Tensor | None = None, progress: bool = False) -> torch.Tensor:
    C.check_metric(metric)
    C.check_input(x, 2, "x")
    dev = C.resolve_device(device)
    C.check_device_available(dev)
    n = x.shape[0]
    out = _prepare_out(out, (n, n))
    if n == 0:
        return out
    if x.shape[1] == 0:          # all rows are the empty vector: identical
        out.zero_()
        return out
    lib = _native_lib(dev)
    if lib is not None and _row_major(out):
        from . import _cpu
        xs = C.stored_cpu(x)         # the kernels read bf16 / fp16 as stored: no float32 copy
        with _bar(progress, _cpu.n_items(n), f"pairwise {metric}") as bar:
            if metric in ("euclidean", "sqeuclidean", "cosine"):
                groups = rows.row_groups(xs, nan_equal=False)
                if metric == "cosine":
                    xn, zero_rows = _normalize_rows(C.to_f32_cpu(xs))
                    _cpu.euclid_like(lib, xn, groups, out, "cosine", bar, zero_rows=zero_rows)
                else:
                    _cpu.euclid_like(lib, xs, groups, out, metric, bar)
            else:
                _cpu.direct_metric(lib, xs, out, metric, bar)
        return out
    x32 = C.to_f32_cpu(x)
    if metric in ("euclidean", "sqeuclidean", "cosine"):
        groups = rows.row_groups(x, nan_equal=False)
        with _bar(progress, _generic.n_work_euclid(n, dev), f"pairwise {metric}") as bar:
            if metric == "cosine":
                xn, zero_rows = _normalize_rows(x32)
                _generic.euclid_like(xn, groups, out, dev, "cosine", bar, zero_rows=zero_rows)
            else:
                _generic.euclid_like(x32, groups, out, dev, metric, bar)
    else:
        with _bar(progress, _generic.n_work_direct(n, dev), f"pairwise {metric}") as bar:
            _generic.direct_metric(x32, out, dev, metric, bar)
    return out


def _normalize_rows(x32: torch.Tensor):
    """Rows divided by their float64 norms, rounded to float32 (zero rows stay zero), in
    bounded chunks; and the zero-row mask."""
    n, d = x32.shape
    xn = torch.empty_like(x32)
    zero = torch.empty(n, dtype=torch.bool)
    step = max(1, (1 << 22) // max(1, d))
    for s in range(0, n, step):
        blk = x32[s:s + step].double()
        nrm = blk.square().sum(1).sqrt()
        z = nrm == 0
        xn[s:s + step] = (blk / torch.where(z, torch.ones_like(nrm), nrm)[:, None]).float()
        zero[s:s + step] = z
    return xn, zero.numpy()


from ._snapshots import pairwise_snapshots, pairwise_snapshots_multi  # noqa: E402
from ._neighbours import nearest_neighbours  # noqa: E402

__all__ += ["nearest_neighbours"]


class _CallableModule(type(C)):
    """``embdist.pairwise(x, metric)`` is ``embdist.pairwise.pairwise(x, metric)``: the engine's
    one entry point, callable as the module boundary the tasks depend on."""

    def __call__(self, x, metric: str = "euclidean", **kwargs):
        return pairwise(x, metric, **kwargs)


import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _CallableModule
