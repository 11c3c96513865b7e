"""Pairs of distinct rows within a radius, without an N x N matrix.

``radius_pairs(x, metric, radius)`` -> ``RadiusPairs``: the exact-duplicate groups of x (as
``row_groups``) and every pair (a, b), a < b, of representatives (distinct vectors) whose
distance is <= radius, with that distance.

How, and how exact: the streaming pass (``stream.stream_pass`` with ``near_radius``) emits the
candidate pairs of representatives within the radius from its tiles (Chebyshev: the engine's
bit-exact float32 max, so exactly those pairs; Euclidean: the GEMM value with its proven error
tolerance, so a superset); every candidate is then evaluated directly (``stream._stats.exact_pairs``:
Chebyshev the float32 max, Euclidean a float64 sum of float64 squares) and kept when <= radius.

Prefilter (rows wider than ``2 * prefilter`` columns): a distance over a subset of the
columns is a lower bound of the full one (Chebyshev: a max over fewer terms; Euclidean: a sum
of fewer squares), so the pass first runs on the ``prefilter`` columns of largest variance (a
fraction of the work), its candidate pairs (expanded over rows equal on those columns) are
evaluated on all columns. When the subset is not selective (more than ``max_candidates``
candidates), the pass is rerun on all columns. The result is the same set of pairs either way.

``dynamics_lib()``: the native library with the signatures of kernels_dynamics.c set (the
training dynamics' labels, changes / lattice units and components passes, which find the pairs
within a radius with their own necessary-condition filter; see embdist.dynamics), or None.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np
import torch

from embdist import rows

from .stream import STREAM_METRICS, stream_pass
from .stream._bindings import _check_x, _lib
from .stream._stats import exact_pairs

__all__ = ["radius_pairs", "RadiusPairs", "exact_distances", "dynamics_lib"]

_VP = ctypes.c_void_p
_SLACK = 1e-9          # the candidate pass uses a slightly larger radius; the exact check decides


@dataclass
class RadiusPairs:
    groups: np.ndarray      # (N,) smallest row index of each row's exact-duplicate group
    a: np.ndarray           # (P,) int64 representative rows, a < b
    b: np.ndarray
    dist: np.ndarray        # (P,) float64 exact distances, <= radius
    prefiltered: bool = False


def _expand(groups: np.ndarray, nd: np.ndarray, cap: int):
    """Row pairs behind representative pairs ``nd`` of ``groups``, plus the pairs inside each
    group; None when there would be more than cap."""
    n = len(groups)
    sizes = np.bincount(groups, minlength=n)
    inside = int((sizes * (sizes - 1) // 2).sum())
    across = int((sizes[nd[:, 0]] * sizes[nd[:, 1]]).sum()) if len(nd) else 0
    if inside + across > cap:
        return None
    order = np.argsort(groups, kind="stable")
    start = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(sizes, out=start[1:])
    members = [order[start[g]:start[g + 1]] for g in range(n)]
    aa, bb = [], []
    for g in np.flatnonzero(sizes > 1):
        m = members[g]
        i, j = np.triu_indices(len(m), 1)
        aa.append(m[i]), bb.append(m[j])
    for p, q in nd:
        mp, mq = members[p], members[q]
        aa.append(np.repeat(mp, len(mq))), bb.append(np.tile(mq, len(mp)))
    if not aa:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    a, b = np.concatenate(aa), np.concatenate(bb)
    return np.minimum(a, b), np.maximum(a, b)


def _candidates(x: torch.Tensor, metric: str, radius: float):
    p = stream_pass(x, metric, k=1, candidates=2, bins=1, near_radius=radius * (1 + _SLACK))
    return p.groups, p.nd


def radius_pairs(x: torch.Tensor, metric: str, radius: float, *, prefilter: int = 64,
                 max_candidates: int = 20_000_000) -> RadiusPairs:
    """Every pair of distinct rows of x (N, d) within ``radius`` (see the module doc)."""
    if metric not in STREAM_METRICS:
        raise ValueError(f"radius_pairs supports {', '.join(STREAM_METRICS)}, not {metric!r}")
    if not (radius >= 0 and np.isfinite(radius)):
        raise ValueError(f"radius must be a finite value >= 0, got {radius}")
    x = _check_x(x)
    lib = _lib()
    groups = rows.row_groups(x)
    reps = np.flatnonzero(groups == np.arange(len(groups)))
    xr = x[torch.from_numpy(reps)].contiguous() if len(reps) < len(groups) else x
    n, d = xr.shape
    a = b = None
    pre = False
    if n > 1 and d > 2 * prefilter:
        sample = xr[::max(1, n // 4096)].float()       # the columns of largest spread (a heuristic: any subset is exact)
        cols = torch.topk(sample.var(dim=0), prefilter).indices.sort().values
        sg, nd = _candidates(xr[:, cols].contiguous(), metric, radius)
        got = _expand(sg, nd, max_candidates)
        if got is not None:
            a, b = got
            pre = True
    if a is None:
        if n > 1:
            _, nd = _candidates(xr, metric, radius)
            a, b = np.minimum(nd[:, 0], nd[:, 1]), np.maximum(nd[:, 0], nd[:, 1])
        else:
            a = b = np.zeros(0, np.int64)
    q = exact_pairs(lib, xr, 0 if metric == "euclidean" else 1, a, b)
    dist = np.sqrt(q)
    keep = dist <= radius
    a, b, dist = reps[a[keep]], reps[b[keep]], dist[keep]
    order = np.lexsort((b, a))
    return RadiusPairs(groups=groups, a=a[order], b=b[order], dist=dist[order], prefiltered=pre)


def exact_distances(x: torch.Tensor, metric: str, a, b) -> np.ndarray:
    """Distances of the row pairs (a[k], b[k]) of x, evaluated directly (Chebyshev: the
    engine's float32 max; Euclidean: float64), as float64."""
    x = _check_x(x)
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    return np.sqrt(exact_pairs(_lib(), x, 0 if metric == "euclidean" else 1, a, b))


# ----------------------------------------------------------------------------- dynamics passes
_I64 = ctypes.c_int64
_DYN_SIGS = {   # kernels_dynamics.c
    "emb_dyn_labels": ([_VP, _I64, _I64, _I64, _VP, _VP], None),
    "emb_dyn_steps": ([_VP, _VP, _VP, _I64, _I64, _I64, _I64, _VP, _VP, _VP], _I64),
    "emb_dyn_components": ([_VP, _I64, _I64, _I64, _I64, _VP, _I64, _VP, _I64, _VP, _I64, _VP, _VP], _I64),
}


def dynamics_lib():
    """The native library with the dynamics passes' signatures set, or None (no C compiler or
    kernels=torch: embdist.dynamics then runs its numpy / engine path)."""
    from . import _native
    lib = _native.load()
    if lib is None or not hasattr(lib, "emb_dyn_components"):
        return None
    if not getattr(lib, "_embdist_dynamics", False):
        for name, (args, res) in _DYN_SIGS.items():
            f = getattr(lib, name)
            f.argtypes, f.restype = args, res
        lib._embdist_dynamics = True
    return lib
