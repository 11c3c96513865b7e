"""Shared helpers: argument checks, identical-row groups, GEMM error model, rounding guards."""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch

# Element codes of the C kernels' dtype loads and stores (kernels.c, kernels_stream.c,
# kernels_dynamics.c): the one map from a torch dtype to the code the kernels take.
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

METRICS = ("euclidean", "chebyshev", "sqeuclidean", "manhattan", "cosine")
INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

U32 = 2.0 ** -24          # unit roundoff of float32
TINY = 2.0 ** -148        # 2x the smallest float32 subnormal: per-operation absolute underflow error
# Relative-error budget of a Euclidean distance (contract: 2e-6):
REL_TOL = 1.5e-6          # the expansion |a|^2+|b|^2-2a.b
CENTER_TOL = 3.0e-7       # rounding of the centred coordinates fl(x - mu)
#                           the rest (<= 2e-7): float64 sums, sqrt, final rounding to float32
INV_2TOL = 1.0 / (2.0 * REL_TOL)   # flag a pair when |error of d^2| bound > 2*REL_TOL*d^2
U64 = 2.0 ** -53

# Error model constants (see the package docstring).  |fl(a.b) - a.b| <= U32 * (CG*sqrt(d)*|a.b| + CP*|a||b|)
# + TINY*(d + sqrt(d)(|a|+|b|)).  "generic" = any BLAS we do not control (MKL/cuBLAS/MPS).
CG_GENERIC, CP_GENERIC = 1.0, 8.0


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    return metric


def resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise ValueError(f"device must be a string, got {device!r}")
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda[:i]' or 'mps'") from e
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {device!r}; use 'auto', 'cpu', 'cuda[:i]' or 'mps'")
    return dev


def check_device_available(dev: torch.device) -> None:
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {dev} requested but CUDA is not available")
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise RuntimeError(f"device {dev} requested but MPS is not available")


def check_input(x: torch.Tensor, ndim: int, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{what} must be {ndim}-D, got shape {tuple(x.shape)}")
    if x.dtype not in INPUT_DTYPES:
        raise TypeError(f"{what} dtype must be bfloat16, float16 or float32, got {x.dtype}")
    return x


def stored_cpu(x: torch.Tensor) -> torch.Tensor:
    """x C-contiguous on the CPU in its stored dtype (one of INPUT_DTYPES, which the native
    kernels read as is)."""
    return x.detach().to("cpu").contiguous()


def to_f32_cpu(x: torch.Tensor) -> torch.Tensor:
    """float32, C-contiguous, on the CPU (exact conversion from bf16/fp16)."""
    return x.detach().to("cpu", torch.float32).contiguous()


@dataclass
class GemmInput:
    xc: torch.Tensor        # (N, d) float32: (x - mu) * scale, contiguous
    norms: torch.Tensor     # (N,) float64: exact squared norms of xc rows
    inv_scale2: float       # multiply a scaled d^2 by this to get input units (power of two)


def prepare_gemm_input(x32: torch.Tensor, center: bool = True, scale: bool = True) -> GemmInput:
    """Optionally centre the rows (distances are translation invariant; this rounds each
    coordinate once, an error the callers bound with ``centering_flag``) and scale by a
    power of two so that the expansion cannot overflow: max |xc| in [0.5, 1)."""
    n, d = x32.shape
    if n == 0 or d == 0:
        return GemmInput(x32.clone(), torch.zeros(n, dtype=torch.float64), 1.0)
    if center:
        mu = x32.double().mean(0).float() if n * d <= (1 << 26) else _mean_chunked(x32)
        xc = x32 - mu
    else:
        xc = x32.clone()
    m = float(xc.abs().max()) if scale else 0.0
    e = 0
    if m > 0 and math.isfinite(m):
        e = math.frexp(m)[1]          # m = f * 2**e, f in [0.5, 1)
        e = max(min(e, 120), -120)
        xc.mul_(2.0 ** (-e))
    norms = _row_sq_norms64(xc)
    return GemmInput(xc, norms, 2.0 ** (2 * e))


def _mean_chunked(x32: torch.Tensor) -> torch.Tensor:
    acc = torch.zeros(x32.shape[1], dtype=torch.float64)
    step = max(1, (1 << 24) // max(1, x32.shape[1]))
    for s in range(0, x32.shape[0], step):
        acc += x32[s:s + step].double().sum(0)
    return (acc / x32.shape[0]).float()


def _row_sq_norms64(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty(x.shape[0], dtype=torch.float64)
    step = max(1, (1 << 23) // max(1, x.shape[1]))
    for s in range(0, x.shape[0], step):
        out[s:s + step] = x[s:s + step].double().square().sum(1)
    return out


def gemm_error_bound(na, nb, g, d: int):
    """Error model (not a proof) for an fp32 GEMM whose summation we do not control (MPS):
    returns a bound for the error of d^2 = na + nb - 2G, in scaled units."""
    sd = math.sqrt(d)
    ra, rb = na.sqrt(), nb.sqrt()
    return 2.0 * (U32 * (CG_GENERIC * sd * g.abs() + CP_GENERIC * ra * rb) + TINY * (d + sd * (ra + rb)))


def gemm_error_bound_f64(na, nb, g, d: int):
    """Deterministic bound on |computed d^2 - exact d^2| (scaled units) when G is a float64
    GEMM of float32 data: |dG| <= gamma_d |a||b| (any summation order), plus the
    roundings of na + nb - 2G.  Returns a bound for the error of d^2."""
    gam = (d + 2) * U64 / (1.0 - (d + 2) * U64)
    return 2.0 * gam * (na * nb).sqrt() + 4.0 * U64 * (na + nb + 2.0 * g.abs()) + gam * (na + nb)


def centering_flag(na, nb, d2, d: int):
    """True where the one rounding of fl(x - mu) per coordinate may cost more than
    CENTER_TOL relative error: |d' - d| <= U32 (|a_c| + |b_c|) + sqrt(d)*TINY."""
    e = U32 * (na.sqrt() + nb.sqrt()) + math.sqrt(max(d, 1)) * 2.0 ** -149
    return d2 * (CENTER_TOL * CENTER_TOL) <= e * e


def to_f32_keep_nonzero(res: torch.Tensor, nonzero: torch.Tensor) -> torch.Tensor:
    return to_dtype_keep_nonzero(res, nonzero, torch.float32)


def to_dtype_keep_nonzero(res: torch.Tensor, nonzero: torch.Tensor, dtype: torch.dtype,
                          cosine: bool = False) -> torch.Tensor:
    """Round to ``dtype``; a nonzero distance that rounds to 0 becomes the smallest
    positive subnormal of ``dtype`` (exact 0 stays reserved for identical rows)."""
    r = res.to(dtype)
    bad = (r == 0) & nonzero
    if cosine:
        bad = bad & (res != 0)
    if bool(bad.any()):
        fi = torch.finfo(dtype)
        r[bad] = fi.smallest_normal * fi.eps   # smallest positive subnormal
    return r


@contextlib.contextmanager
def progress_bar(progress: bool, total: int, desc: str):
    if not progress:
        yield None
        return
    from tqdm.auto import tqdm
    bar = tqdm(total=total, desc=desc, unit="tile", leave=False)
    try:
        yield bar
    finally:
        bar.close()


def native_lib(dev: torch.device):
    """The native library when the CPU path should use it, else None."""
    choice = os.environ.get("EMBDIST_PAIRWISE_BACKEND", "auto")
    if choice not in ("auto", "native", "generic"):
        raise ValueError(f"EMBDIST_PAIRWISE_BACKEND must be auto, native or generic, got {choice!r}")
    if dev.type != "cpu" or choice == "generic":
        return None
    from . import _native
    lib = _native.load()
    if lib is None and choice == "native":
        raise RuntimeError(f"native kernels requested but unavailable: {_native.load_error()}")
    return lib
