"""Whole-matrix analysis without an N x N matrix: the engine's tiles, reduced as they stream.

In the spirit of scikit-learn's ``pairwise_distances_chunked``, but with the reductions done in
the native epilogue of each tile (kernels_stream.c), so nothing of size N x N ever exists.

API
---
``stream(x, metric="euclidean", *, k=10, radii=(), bins=65536, hist_max=None, near_steps=None,
shard=(0, 1), candidates=None, progress=False) -> StreamPartial``
    One pass over the work items of shard ``shard = (index, count)`` (all of them for (0, 1)).
    x: (N, d) bfloat16 / float16 / float32 CPU tensor, read in its stored dtype.
    metric: "euclidean" or "chebyshev".  The partial holds, for every distinct vector (the
    representative of each exact-duplicate group), its ``candidates`` (default k + max(8, k) +
    128) best other representatives by (squared distance, id), plus the histogram, counts, sums
    and candidate pairs of the items it covered.
``StreamPartial.merge(parts) -> StreamPartial``
    Combines the partials of disjoint shards: the result is exactly the partial a single
    process would have produced (every reduction is a function of the set of pairs seen).
``StreamPartial.save(path)`` / ``StreamPartial.load(path)``; ``save_partials`` /
``load_partials`` keep several (one per metric) and extra arrays in one ``.npz``.
``finalize(x, partial) -> StreamResult``
    Needs the complete partial (all shards) and the same x.  Returns exact k nearest
    neighbours, exact-duplicate groups, near-duplicate groups, and the statistics.
``vocab_stats(x, metric, **kw)`` = ``finalize(x, stream(x, metric, **kw))``.
``row_groups(x)``: groups[i] = smallest row equal to row i (value equality, -0.0 == 0.0).

What ``StreamResult`` holds, and how exact it is
------------------------------------------------
* ``duplicate_groups``: rows that are elementwise equal (-0.0 == 0.0), found by hashing the
  rows and verifying equal hashes exactly; each group ascending, groups by size then first row.
  Pairs inside a group have distance exactly 0 and are never computed.
* ``knn_ids`` / ``knn_dist`` (N, k): row indices and float64 distances, ordered by (distance,
  id).  Exact: a row's identical rows come first (distance 0, by id), then its representative's
  list expanded into rows (a representative stands for its whole group, same distance; equal
  distances ordered by row id).  The entries of a list that can reach the first k rows are
  re-evaluated directly in float64 (Euclidean: float64 sum of float64 squared differences;
  Chebyshev: the bit-exact float32 max, as ``pairwise``), and the order is then proven: every
  pair left out of the list (or not re-evaluated) had a GEMM value whose error bound puts it
  after the k-th (tolerance ``TOLQ`` = 4.9e-6 relative on d^2: 1.35 x the 3.62e-6 that the
  engine's flag rule leaves), or an exact value with a larger (distance, id).  A row the check
  cannot settle (a near-tie block longer than its list) is evaluated in full against all rows
  (counted in ``diagnostics["fallback_rows"]``).  Rows with fewer than k others are padded with
  id -1, inf.  The default list length, k + max(8, k) + 128, holds a near-tie block of the size
  of Qwen3-4B's dead tokens (134 distinct vectors within 2 bf16 steps: for an ordinary token
  they are all at nearly the same distance).
* ``near_groups`` (``near_steps=n``): connected components (size >= 2) of the graph joining two
  rows when, in every coordinate, their stored values are at most n representable steps apart
  (bf16 steps for bf16 input; the ordinal distance of the bit patterns, -0 == +0).  Candidates
  come from the same pass: n steps from a move a coordinate by at most 2 n step(a_k), so a
  near-duplicate pair has ||a - b||^2 <= sum_k (2 n step(a_k))^2 (Chebyshev: the max); pairs
  below both rows' bound (with the error tolerance) are verified exactly on the bit patterns.
  (||a-b||_inf <= ||a-b||_2 alone gives no such filter: a small Chebyshev distance does not
  imply a small Euclidean one.)  n = 0 gives the exact-duplicate groups.  n <= 64.
* ``stats``: ``n_pairs`` (N(N-1)/2), ``zero_pairs`` (sum C(k,2) over the groups), ``min``
  (exact: the smallest nearest-neighbour distance), ``max`` (exact: pairs within 4 TOLQ of the
  largest GEMM value are recomputed directly), ``mean`` (float64 sum of every pair's distance,
  per work item, added with ``math.fsum``; relative error <= the engine's 2e-6), ``median``
  (the lower median, sorted[(P-1)//2], from the histogram: the midpoint of its bin clipped to
  [min nonzero, max], with ``median_error_bound`` = half that interval, widened by the values'
  relative error), ``below`` {radius: pairs with distance < radius} (exact: pairs whose GEMM
  value is within 2 TOLQ of a radius^2 are recomputed directly).
* ``hist_counts`` over ``hist_edges``: ``bins`` equal bins on [0, hist_max]; hist_max None = an
  upper bound of the largest distance known before the pass (2 max_i ||x_i - mean||, Chebyshev
  2 max |x - mean|), so every shard uses the same edges.  A value is binned by its computed
  distance (within 2e-6 relative of the exact one; exact zeros in bin 0); values beyond hist_max
  go into the last bin.

Design
------
Work items are the engine's (128 rows x 512 columns of the upper triangle, ``_cpu._items``).
A shard is a contiguous range of row blocks with about 1/count of the work, so shards never
share a pair.  Every shard prepares the same centring, scaling and packing as the engine
(deterministic: fixed chunking, not tied to the thread count), so every pair gets the same
float64 value in whichever process computes it, and a merged result is bit-identical to a
single run.  The Euclidean tile is the engine's GEMM with its proven error bound and
direct-recomputation rule; the epilogue writes q = d^2 into the tile instead of an N x N
output, marks recomputed (exact) entries, and reduces the tile (see kernels_stream.c): lists
are max-heaps per row, fed from both the rows and the columns of each tile (pairs of two
representatives only), merged under per-panel spin locks.  The final step works on 8,192 lists
at a time.  Memory: the input (stored dtype) + one packed float32 copy + K candidates per row
(N K 17 bytes) + per-thread tiles (~1 MB) and histograms.  CPU only (native kernels).
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import _common as C
from . import _cpu, _native

__all__ = ["stream", "finalize", "vocab_stats", "StreamPartial", "StreamResult", "row_groups",
           "save_partials", "load_partials", "shard_rows", "STREAM_METRICS", "TOLQ"]

STREAM_METRICS = ("euclidean", "chebyshev")
DT_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# |stored - exact| <= TOLQ * exact for an expansion (GEMM) value of d^2 that the engine's flag rule
# does not recompute: its bound E < 2 REL_TOL d^2 (GEMM) and the centring's (1 + CENTER_TOL)^2
# (3.0e-6 and 6.0e-7 with the engine's constants: 3.62e-6), with a 35% margin: 4.9e-6.
TOLQ = 1.35 * ((1 + 2 * C.REL_TOL / (1 - 2 * C.REL_TOL)) * (1 + C.CENTER_TOL) ** 2 - 1)
MAX_RADII = 8
MAX_NEAR_STEPS = 64
FORMAT = 1
PW, MB, NB = _cpu.PW, _cpu.MB_PANELS, _cpu.NB_PANELS
_CHUNK = 4096          # rows per preparation chunk (fixed: results must not depend on threads)


class _State(ctypes.Structure):
    _fields_ = [("n", ctypes.c_int64), ("K", ctypes.c_int64),
                ("hq", ctypes.c_void_p), ("hid", ctypes.c_void_p), ("hex", ctypes.c_void_p),
                ("hcnt", ctypes.c_void_p), ("hthr", ctypes.c_void_p), ("minap", ctypes.c_void_p),
                ("nd", ctypes.c_void_p), ("nd_len", ctypes.c_int64), ("nd_cap", ctypes.c_int64),
                ("mxp", ctypes.c_void_p), ("mxq", ctypes.c_void_p), ("mx_len", ctypes.c_int64),
                ("mx_cap", ctypes.c_int64), ("lock", ctypes.c_int), ("locks", ctypes.c_void_p)]


_P, _I, _D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
_SP = ctypes.POINTER(_State)
_SIGS = {
    "emb_stream_row_hash": [_P, _I, _I, _I, _I, _I, _P],
    "emb_stream_col_sums": [_P, _I, _I, _I, _I, _I, _P],
    "emb_stream_extent": [_P, _I, _I, _I, _P, _I, _I, _P],
    "emb_stream_pack": [_P, _I, _I, _I, _I, _P, _D, _P, _I, _I, _P],
    "emb_stream_nd_bound": [_P, _I, _I, _I, _I, _I, _I, _I, _P],
    "emb_stream_within_steps": [_P, _I, _I, _P, _P, _I, _I, _P],
    "emb_stream_exact": [_P, _I, _I, _I, _P, _P, _I, _P],
    "emb_stream_row_exact": [_P, _I, _I, _I, _I, _P, _I, _P],
    "emb_stream_absorb": [_SP, _P, _P, _P, _P, _P, _I, _I],
    "emb_stream_free": [_SP],
    "emb_stream_euclid_item": [_SP, _P, _I, _I, _I, _P, _I, _I, _I, _I, _I, _P, _P, _P, _P, _P, _P, _P,
                               _P, _P, _P, _P],
    "emb_stream_cheb_item": [_SP, _P, _I, _I, _I, _I, _I, _I, _P, _P, _P, _P, _P, _P, _P, _P],
}
_lib_lock = threading.Lock()


def _lib():
    """The native library with the stream signatures set; RuntimeError if it cannot be built."""
    lib = _native.load()
    if lib is None:
        raise RuntimeError("whole-matrix streaming needs the native CPU kernels (a C compiler): "
                           f"{_native.load_error()}")
    with _lib_lock:
        if not getattr(lib, "_embdist_stream", False):
            for name, args in _SIGS.items():
                f = getattr(lib, name)
                f.argtypes = args
                f.restype = None
            lib._embdist_stream = True
    return lib


def _ptr(a) -> int | None:
    if a is None:
        return None
    return a.ctypes.data if isinstance(a, np.ndarray) else a.data_ptr()


def _check_x(x) -> torch.Tensor:
    C.check_input(x, 2, "x")
    if x.device.type != "cpu":
        x = x.detach().to("cpu")
    return x.detach().contiguous()


def _chunks(n: int, step: int = _CHUNK):
    return [(s, min(n, s + step)) for s in range(0, n, step)]


# ----------------------------------------------------------------------------- groups
def _row_hashes(lib, x: torch.Tensor) -> np.ndarray:
    n, d = x.shape
    h = np.zeros(n, dtype=np.uint64)
    if n and d:
        _cpu.run_parallel(_chunks(n), lambda r: lib.emb_stream_row_hash(_ptr(x), DT_CODES[x.dtype], n, d, r[0], r[1],
                                                                        _ptr(h)))
    return h


def _canon_bits(x: torch.Tensor, idx: np.ndarray) -> np.ndarray:
    rows = x[torch.from_numpy(idx)]
    if x.dtype == torch.float32:
        b = rows.view(torch.int32).numpy().view(np.uint32)
        return np.where((b & np.uint32(0x7FFFFFFF)) == 0, np.uint32(0), b)
    b = rows.view(torch.int16).numpy().view(np.uint16)
    return np.where((b & np.uint16(0x7FFF)) == 0, np.uint16(0), b)


def _groups_from_hashes(x: torch.Tensor, h: np.ndarray) -> np.ndarray:
    n = len(h)
    groups = np.arange(n, dtype=np.int64)
    if n < 2:
        return groups
    if x.shape[1] == 0:
        groups[:] = 0
        return groups
    order = np.argsort(h, kind="stable")
    hs = h[order]
    cut = np.flatnonzero(hs[1:] != hs[:-1]) + 1
    starts = np.concatenate(([0], cut))
    ends = np.concatenate((cut, [n]))
    for s, e in zip(starts[ends - starts > 1], ends[ends - starts > 1]):
        idx = order[s:e]                                   # ascending (stable sort)
        bits = _canon_bits(x, idx)
        if bool((bits == bits[0]).all()):
            groups[idx] = idx[0]
            continue
        _, inv = np.unique(bits, axis=0, return_inverse=True)   # a hash collision: split exactly
        inv = inv.reshape(-1)
        for g in np.unique(inv):
            members = idx[inv == g]
            groups[members] = members.min()
    return groups


def row_groups(x: torch.Tensor) -> np.ndarray:
    """groups[i] = the smallest row index whose row equals row i (value equality, -0.0 == 0.0)."""
    x = _check_x(x)
    return _groups_from_hashes(x, _row_hashes(_lib(), x))


def group_lists(groups: np.ndarray) -> list[np.ndarray]:
    """Groups of size >= 2 from a representative array: ascending members, biggest group first
    (ties: smaller first member)."""
    n = len(groups)
    if n == 0:
        return []
    sizes = np.bincount(groups, minlength=n)
    multi = sizes[groups] > 1
    idx = np.flatnonzero(multi)
    if len(idx) == 0:
        return []
    order = idx[np.lexsort((idx, groups[idx]))]
    reps = groups[order]
    cut = np.flatnonzero(reps[1:] != reps[:-1]) + 1
    out = np.split(order, cut)
    out.sort(key=lambda g: (-len(g), int(g[0])))
    return out


def _fingerprint(h: np.ndarray, x: torch.Tensor) -> str:
    m = hashlib.sha256(h.tobytes())
    m.update(f"{tuple(x.shape)} {x.dtype}".encode())
    return m.hexdigest()[:32]


# ----------------------------------------------------------------------------- work items and shards
def _items(n: int) -> list[tuple[int, int, int, int]]:
    return _cpu._items(n)


def _block_work(n: int) -> np.ndarray:
    npan = -(-n // PW)
    blocks = range(0, npan, MB)
    return np.array([min(MB, npan - b) * (npan - b) for b in blocks], dtype=np.float64)


def shard_rows(n: int, index: int, count: int) -> tuple[int, int]:
    """Rows [r0, r1) of shard ``index`` of ``count``: contiguous row blocks of about equal work
    (pairs of the upper triangle).  A shard may be empty when count exceeds the row blocks."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard index {index} is not in 0..{count - 1}")
    w = _block_work(n)
    if len(w) == 0:
        return 0, 0
    cum = np.concatenate(([0.0], np.cumsum(w)))
    total = cum[-1]
    # block b goes to the shard in which its work starts
    owner = np.minimum((cum[:-1] * count / total).astype(np.int64), count - 1)
    blocks = np.flatnonzero(owner == index)
    if len(blocks) == 0:
        return 0, 0
    step = MB * PW
    return int(blocks[0] * step), int(min(n, (blocks[-1] + 1) * step))


# ----------------------------------------------------------------------------- partial results
@dataclass
class StreamPartial:
    meta: dict
    shards: list
    groups: np.ndarray
    hq: np.ndarray
    hid: np.ndarray
    hex: np.ndarray
    hcnt: np.ndarray
    minap: np.ndarray
    hist: np.ndarray
    radius_counts: np.ndarray
    item_done: np.ndarray
    item_sum: np.ndarray
    mx: np.ndarray            # (m, 2) int64 pairs
    mxq: np.ndarray           # (m,) float64
    nd: np.ndarray            # (m, 2) int64 representative pairs, unique
    pairs: int = 0
    flagged: int = 0
    max_q: float = 0.0

    _ARRAYS = ("groups", "hq", "hid", "hex", "hcnt", "minap", "hist", "radius_counts", "item_done",
               "item_sum", "mx", "mxq", "nd")

    @property
    def complete(self) -> bool:
        return sorted(self.shards) == list(range(self.meta["shard_count"]))

    def to_arrays(self, prefix: str = "") -> dict:
        out = {prefix + k: getattr(self, k) for k in self._ARRAYS}
        info = dict(meta=self.meta, shards=self.shards, pairs=int(self.pairs), flagged=int(self.flagged),
                    max_q=float(self.max_q))
        out[prefix + "info"] = np.frombuffer(json.dumps(info).encode(), dtype=np.uint8)
        return out

    @classmethod
    def from_arrays(cls, arrays, prefix: str = "") -> "StreamPartial":
        info = json.loads(bytes(arrays[prefix + "info"]).decode())
        kw = {k: np.asarray(arrays[prefix + k]) for k in cls._ARRAYS}
        return cls(meta=info["meta"], shards=list(info["shards"]), pairs=int(info["pairs"]),
                   flagged=int(info["flagged"]), max_q=float(info["max_q"]), **kw)

    def save(self, path) -> Path:
        return save_partials(path, {"": self})

    @classmethod
    def load(cls, path) -> "StreamPartial":
        parts, _, _ = load_partials(path)
        return parts[""]

    @classmethod
    def merge(cls, parts) -> "StreamPartial":
        """Combine partials of disjoint shards of the same input and settings."""
        parts = list(parts)
        if not parts:
            raise ValueError("nothing to merge")
        meta = parts[0].meta
        seen: set = set()
        for p in parts:
            if p.meta != meta:
                diff = sorted(k for k in set(meta) | set(p.meta) if meta.get(k) != p.meta.get(k))
                raise ValueError(f"partials disagree on {', '.join(diff)}; they are not shards of one run")
            if seen & set(p.shards):
                raise ValueError(f"shard(s) {sorted(seen & set(p.shards))} appear twice")
            seen |= set(p.shards)
        if len(parts) == 1:
            return parts[0]
        lib = _lib()
        n, K = meta["n"], meta["K"]
        acc = _empty_lists(n, K)
        st = _state(acc, n, K)
        try:
            for p in parts:
                _cpu.run_parallel(_chunks(n, 8192), lambda r, p=p: lib.emb_stream_absorb(
                    ctypes.byref(st), _ptr(p.hq), _ptr(p.hid), _ptr(p.hex), _ptr(p.hcnt), _ptr(p.minap),
                    r[0], r[1]))
        finally:
            lib.emb_stream_free(ctypes.byref(st))
        done = np.zeros_like(parts[0].item_done)
        sums = np.zeros_like(parts[0].item_sum)
        for p in parts:
            if (done & p.item_done).any():
                raise ValueError("two partials cover the same work items")
            done |= p.item_done
            sums[p.item_done] = p.item_sum[p.item_done]
        max_q = max(p.max_q for p in parts)
        mx = np.concatenate([p.mx for p in parts])
        mxq = np.concatenate([p.mxq for p in parts])
        mx, mxq = _max_band(mx, mxq, max_q)
        nd = np.concatenate([p.nd for p in parts])
        nd = np.unique(nd, axis=0) if len(nd) else nd.reshape(0, 2)
        return cls(meta=meta, shards=sorted(seen), groups=parts[0].groups, hq=acc["hq"], hid=acc["hid"],
                   hex=acc["hex"], hcnt=acc["hcnt"], minap=acc["minap"],
                   hist=np.sum([p.hist for p in parts], axis=0, dtype=np.int64),
                   radius_counts=np.sum([p.radius_counts for p in parts], axis=0, dtype=np.int64),
                   item_done=done, item_sum=sums, mx=mx, mxq=mxq, nd=nd,
                   pairs=sum(p.pairs for p in parts), flagged=sum(p.flagged for p in parts), max_q=max_q)


def save_partials(path, partials: dict, extra: dict | None = None, info: dict | None = None) -> Path:
    """Several partials (keyed, e.g. by metric) and extra arrays in one .npz, written atomically."""
    path = Path(path)
    arrays = {}
    for key, p in partials.items():
        arrays.update(p.to_arrays(f"p.{key}."))
    for k, v in (extra or {}).items():
        arrays[f"x.{k}"] = np.asarray(v)
    head = {"format": FORMAT, "partials": list(partials), "info": info or {}}
    arrays["head"] = np.frombuffer(json.dumps(head).encode(), dtype=np.uint8)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_partials(path) -> tuple[dict, dict, dict]:
    """(partials by key, extra arrays, info) from :func:`save_partials`."""
    with np.load(path, allow_pickle=False) as z:
        head = json.loads(bytes(z["head"]).decode())
        if head.get("format") != FORMAT:
            raise ValueError(f"{path}: partial format {head.get('format')} is not {FORMAT}")
        parts = {k: StreamPartial.from_arrays(z, f"p.{k}.") for k in head["partials"]}
        extra = {k[2:]: z[k] for k in z.files if k.startswith("x.")}
    return parts, extra, head["info"]


def _empty_lists(n: int, K: int) -> dict:
    return {"hq": np.full((n, K), np.inf), "hid": np.full((n, K), -1, dtype=np.int64),
            "hex": np.zeros((n, K), dtype=np.uint8), "hcnt": np.zeros(n, dtype=np.int64),
            "hthr": np.full(n, np.inf), "minap": np.full(n, np.inf),
            "locks": np.zeros(-(-n // PW) + 1, dtype=np.int32)}


def _state(acc: dict, n: int, K: int) -> _State:
    st = _State()
    st.n, st.K = n, K
    for k in ("hq", "hid", "hex", "hcnt", "hthr", "minap", "locks"):
        setattr(st, k, _ptr(acc[k]))
    return st


def _max_band(mx: np.ndarray, mxq: np.ndarray, max_q: float, tolq: float = TOLQ):
    keep = mxq >= max_q * (1.0 - 4.0 * tolq)
    return mx[keep].reshape(-1, 2), mxq[keep]


# ----------------------------------------------------------------------------- preparation
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
    chunks = _chunks(n)
    sums = [np.zeros(d) for _ in chunks]
    _cpu.run_parallel(list(range(len(chunks))), lambda c: lib.emb_stream_col_sums(
        _ptr(x), dt, n, d, chunks[c][0], chunks[c][1], _ptr(sums[c])))
    total = np.zeros(d)
    for s in sums:                      # fixed order
        total += s
    mu = (total / n).astype(np.float32)
    ext = [np.zeros(3) for _ in chunks]
    _cpu.run_parallel(list(range(len(chunks))), lambda c: lib.emb_stream_extent(
        _ptr(x), dt, n, d, _ptr(mu), chunks[c][0], chunks[c][1], _ptr(ext[c])))
    ext = np.max(ext, axis=0)
    hi = 2.0 * (ext[1] if metric == "euclidean" else ext[2])
    hist_hi = hi * (1 + 1e-6) if hi > 0 else 1.0
    if not pack:
        return _Prepared(torch.empty(16), 0, hist_hi=hist_hi)
    dp = max(_cpu.GBLK, -(-d // _cpu.GBLK) * _cpu.GBLK)
    npan = -(-n // PW)
    packed = torch.empty(npan * dp * PW + 16, dtype=torch.float32)
    assert packed.data_ptr() % 64 == 0
    step = max(1, (1 << 20) // (dp * PW))
    pans = [(p, min(npan, p + step)) for p in range(0, npan, step)]
    if metric == "euclidean":
        e = 0
        if ext[0] > 0 and math.isfinite(ext[0]):
            e = max(min(math.frexp(ext[0])[1], 120), -120)
        norms = np.zeros(npan * PW)
        _cpu.run_parallel(pans, lambda r: lib.emb_stream_pack(_ptr(x), dt, n, d, dp, _ptr(mu), 2.0 ** (-e),
                                                              _ptr(packed), r[0], r[1], _ptr(norms)))
        return _Prepared(packed, dp, norms, np.sqrt(norms), _cpu.euclid_params(d, dp, 2.0 ** (2 * e)), hist_hi)
    _cpu.run_parallel(pans, lambda r: lib.emb_stream_pack(_ptr(x), dt, n, d, dp, None, 1.0, _ptr(packed),
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


def stream(x: torch.Tensor, metric: str = "euclidean", *, k: int = 10, radii=(), bins: int = 65536,
           hist_max: float | None = None, near_steps: int | None = None, shard=(0, 1),
           candidates: int | None = None, progress: bool = False, near_radius: float | None = None) -> StreamPartial:
    """One pass over the tiles of shard ``shard`` of x's upper triangle (see the module doc).

    ``near_radius`` (instead of ``near_steps``): the candidate pairs ``partial.nd`` are then the
    pairs of representatives within that absolute distance (Chebyshev: exactly; Euclidean: a
    superset, the GEMM tolerance added; verify with ``_exact_pairs``)."""
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
    hashes = _row_hashes(lib, x)
    groups = _groups_from_hashes(x, hashes)
    fp = _fingerprint(hashes, x)
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


# ----------------------------------------------------------------------------- finalisation
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


def _exact_pairs(lib, x, metric_code: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
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
        qx[r, c] = _exact_pairs(lib, x, mcode, reps[r], aid[r, c])
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
    if _fingerprint(_row_hashes(lib, x), x) != meta["fingerprint"]:
        raise ValueError("x is not the matrix the partial was computed on (row hashes differ)")
    metric = meta["metric"]
    mcode = 0 if metric == "euclidean" else 1
    k, K, tolq = meta["k"], meta["K"], meta["tolq"] if metric == "euclidean" else 0.0
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

    # --- statistics
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
            dmax = math.sqrt(float(_exact_pairs(lib, x, mcode, pairs[:, 0], pairs[:, 1]).max()))
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

    # --- near-duplicate groups
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
    diagnostics = {"flagged_pairs": int(partial.flagged), "fallback_rows": int(len(unresolved)),
                   "max_candidates": int(len(partial.mx)), **diag_nd}
    return StreamResult(metric=metric, n=n, k=k, knn_ids=knn_ids, knn_dist=knn_dist, hist_counts=counts,
                        hist_edges=edges, stats=stats, duplicate_groups=group_lists(groups), near_groups=near,
                        near_steps=ns, groups=groups, diagnostics=diagnostics)


def vocab_stats(x: torch.Tensor, metric: str = "euclidean", **kw) -> StreamResult:
    """stream + finalize in one process."""
    return finalize(x, stream(x, metric, **kw))
