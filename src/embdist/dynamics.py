"""Training dynamics of an embedding history: when tokens split, merge, move and freeze.

Everything is computed on the stored bits, step by step, so a history file and a series of
checkpoints read one at a time give the same result (``Tracker.add`` takes any number of steps
at once; a checkpoint series feeds one, a (T, V, D) history feeds chunks of many).

Per step t (rows compared bitwise in the stored dtype, -0.0 == +0.0, equal hashes verified:
``embdist.rows``, the project's one row-identity code):

* ``groups[t, i]``: the canonical id of token i's group, the smallest token id with an identical
  row (a (T, V) int32 array); ``distinct[t]`` the number of distinct vectors.
* events between t-1 and t (step t >= 1): a **fission** when the members of one group of step
  t-1 lie in two or more groups at step t (parent: that group; children: its members split by
  their step-t group, so the children's sizes add up to the parent's); a **merge** when the
  members of one group of step t lie in two or more groups of step t-1 (child: that group;
  parents: its members split by their step t-1 group). A group that splits and merges with
  another in the same step is both a fission and a merge.
* per token: ``first_leave`` the first step its row differs from its step-0 row; ``freeze``
  the last step its row differs from the step before (``n_changes`` steps with a change;
  never-changed tokens have ``freeze = -1`` and ``n_changes = 0``); ``displacement[t, i]`` the
  move from step t-1 to t in bf16 lattice units.
* components at each threshold (``metric`` euclidean or chebyshev, pairs with distance <=
  threshold joined): their number and the largest one's size in tokens.

How (native kernels, ``pairwise/kernels_dynamics.c``; a chunk of steps per call, no per-step
Python): the rows' hashes are ``rows.hash_rows`` of ``rows.canonical_bits`` for the whole chunk,
grouped per step with equal hashes verified bytewise (the rows contract); changes, step-0
differences, lattice units and the finiteness check are one pass over the bits; the components
are one pass over the rows: candidate pairs of distinct vectors by a necessary condition (a pair
within distance r differs by at most r in every column: a sorted window on the column of largest
spread, then a 16-lane filter on the next columns by spread), every candidate evaluated exactly
with the engine's arithmetic (Chebyshev: the float32 max |a - b| of the Chebyshev kernel;
Euclidean: its float64 direct sum) and joined in one union-find per threshold; a pair already
joined at a threshold is only evaluated against the smaller ones. The pairs joined are those of
a brute force over all pairs, so no matrix is needed at any V; a step where no row changed
repeats the step before. Without the native library the same results come from numpy
(``rows.labels_of_bits``) and the engine: the per-step matrices when given or when V is small,
``pairwise._radius.radius_pairs`` (the streaming pass's radius machinery) when V is large.

Lattice units (the seeds' dW' = dW / 2^(E-134)): a coordinate's move |x_t - x_{t-1}| divided by
the bf16 spacing at the **earlier** value x_{t-1}: 2^(E-134) with E its bf16 exponent field
(E = e + 127 for |x| in [2^e, 2^(e+1))). Zero and subnormal earlier values use the subnormal
spacing 2^-133 (that of E = 1). Inside one binade a move of k representable bf16 values is
exactly k units; a move that crosses a binade counts in the earlier binade's spacing. Float16 /
float32 inputs use the same definition (the bf16 spacing at the earlier value's binade). Sums are
float64 of exact terms (powers-of-two scalings of exact float64 differences).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from embdist import rows
from embdist import _dynamics_native
from embdist.pairwise._common import DTYPE_CODES as _DT    # the dtypes the kernels read
from embdist.pairwise._radius import dynamics_lib as _native_lib

METRICS = ("chebyshev", "euclidean")
SMALL_V = 4096          # up to this many tokens the components come from per-step matrices
_CHUNK_ELEMS = 1 << 22  # elements per temporary (about 32 MB of float64)


@dataclass
class Event:
    step: int                       # step number (not index)
    kind: str                       # "fission" | "merge"
    parents: list                   # list of int64 arrays of token ids
    children: list


@dataclass
class Dynamics:
    steps: np.ndarray               # (T,) step numbers
    groups: np.ndarray              # (T, V) int32 canonical group ids
    distinct: np.ndarray            # (T,) int64
    fissions: np.ndarray            # (T,) events per step
    merges: np.ndarray
    events: list
    first_leave: np.ndarray         # (V,) step index, -1: never leaves its step-0 row
    freeze: np.ndarray              # (V,) step index of the last change, -1: never changed
    n_changes: np.ndarray           # (V,)
    displacement: np.ndarray        # (T, V) float64 lattice units moved at each step (0 at t=0)
    metric: str
    thresholds: list
    components: dict = field(default_factory=dict)   # threshold -> {"count": (T,), "largest": (T,)}

    def step_of(self, index: np.ndarray) -> np.ndarray:
        """Step numbers of step indices (-1 stays -1)."""
        index = np.asarray(index)
        return np.where(index >= 0, self.steps[np.maximum(index, 0)], -1)

    @property
    def total_displacement(self) -> np.ndarray:
        return self.displacement.sum(axis=0)


def lattice_units(prev: np.ndarray, cur: np.ndarray) -> np.ndarray:
    """|cur - prev| in bf16 lattice units of prev (elementwise, float64; see the module doc)."""
    p = np.asarray(prev, dtype=np.float32)
    diff = np.abs(np.asarray(cur, dtype=np.float64) - p.astype(np.float64))
    _, e = np.frexp(p)                              # |p| in [2^(e-1), 2^e)
    e = np.where(p == 0, -126, np.maximum(e.astype(np.int64) - 1, -126))
    return np.ldexp(diff, (7 - e).astype(np.int32))


_UINT = {2: np.uint16, 4: np.uint32}


_EXP = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00, torch.float32: 0x7F800000}


def _finite(x: torch.Tensor, elem: np.ndarray) -> bool:
    """No NaN/Inf: every value's exponent field below all-ones (on the canonical bits)."""
    if x.dtype not in _EXP:
        return bool(torch.isfinite(x).all())
    e = _EXP[x.dtype]
    magnitude = elem.dtype.type((1 << (8 * elem.itemsize - 1)) - 1)   # all bits but the sign
    return elem.size == 0 or int((elem & magnitude).max()) < e


def _to_float(u: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    if dtype == torch.bfloat16:
        return (u.astype(np.uint32) << 16).view(np.float32)
    return u.view(np.float16 if dtype == torch.float16 else np.float32)


_SCALE = np.ldexp(1.0, 134 - np.maximum(np.arange(256), 1))   # 1 / bf16 spacing by exponent field


def _units_from_bits(prev: np.ndarray, cur: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Lattice units moved per row (sum over the last axis) from canonical bit patterns (any
    leading shape).

    bf16: two values with the same sign and exponent field are |bits difference| lattice units
    apart (E = 0 and E = 1 alike: both have spacing 2^-133); the other coordinates take
    |dW| * 2^(134 - max(E, 1)) in float64 (exact: a float64 difference of two bf16 values, times
    a power of two), for the few of them, or for all when many values change binade."""
    if dtype != torch.bfloat16:
        return lattice_units(_to_float(prev, dtype), _to_float(cur, dtype)).sum(axis=-1)
    other = (prev ^ cur) >= 0x80                      # sign or exponent differs
    n_other = int(np.count_nonzero(other))
    if n_other * 8 > other.size:                      # many: the float64 formula for every value
        diff = _to_float(cur, dtype).astype(np.float64)
        diff -= _to_float(prev, dtype)
        np.abs(diff, out=diff)
        diff *= _SCALE[(prev >> 7) & 0xFF]
        return diff.sum(axis=-1)
    d = np.abs((cur - prev).view(np.int16))           # exact |difference of bits| where sign and E agree
    out = d.sum(axis=-1, dtype=np.int64).astype(np.float64)
    if n_other:
        idx = np.flatnonzero(other)
        p_, c_ = prev.reshape(-1)[idx], cur.reshape(-1)[idx]
        units = np.abs(_to_float(c_, dtype).astype(np.float64) - _to_float(p_, dtype)) * _SCALE[(p_ >> 7) & 0xFF]
        fix = np.bincount(idx // prev.shape[-1], weights=units - d.reshape(-1)[idx], minlength=out.size)
        out += fix.reshape(out.shape)
    return out


def events_between(prev: np.ndarray, cur: np.ndarray, step: int) -> list[Event]:
    """Fission and merge events between two labellings of the same tokens (canonical ids)."""
    out = []
    pairs = np.unique(np.stack([prev, cur], axis=1), axis=0)
    for kind, a, b, col in (("fission", prev, cur, 0), ("merge", cur, prev, 1)):
        vals, counts = np.unique(pairs[:, col], return_counts=True)
        for g in vals[counts >= 2]:
            whole = np.flatnonzero(a == g)
            parts = [whole[b[whole] == h] for h in np.unique(b[whole])]
            parts.sort(key=lambda m: int(m[0]))
            out.append(Event(step, kind, [whole], parts) if kind == "fission" else Event(step, kind, parts, [whole]))
    return out


def _components(n_steps: int, v: int, labels: np.ndarray, t: np.ndarray, a: np.ndarray, b: np.ndarray):
    """Connected components of each step's tokens joined by the edges (t, a, b) (token ids of
    representatives) and by identity: (count (c,), largest (c,))."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = n_steps * v
    g = coo_matrix((np.ones(len(t), dtype=np.int8), (t * v + a, t * v + b)), shape=(n, n)).tocsr()
    _, lab = connected_components(g, directed=False)
    full = lab[(np.arange(n_steps)[:, None] * v + labels).ravel()]
    sizes = np.bincount(full, minlength=lab.max() + 1 if n else 0)
    comp_step = np.zeros(len(sizes), dtype=np.int64)
    comp_step[full] = np.repeat(np.arange(n_steps), v)
    present = np.flatnonzero(sizes)
    count = np.bincount(comp_step[present], minlength=n_steps)
    largest = np.zeros(n_steps, dtype=np.int64)
    np.maximum.at(largest, comp_step[present], sizes[present])
    return count, largest


class Tracker:
    """Accumulates the dynamics over steps given in order (chunks of any size)."""

    def __init__(self, thresholds=(2 * 2.0 ** -7,), metric: str = "chebyshev", device: str = "auto"):
        if metric not in METRICS:
            raise ValueError(f"dynamics metric {metric!r} is unknown; choose {' or '.join(METRICS)}")
        self.thresholds = sorted(float(x) for x in thresholds)
        self.metric, self.device = metric, device
        self.steps, self.labels, self.disp, self.fis, self.mer, self.events = [], [], [], [], [], []
        self.comp = {x: ([], []) for x in self.thresholds}
        self.first_bits = self.prev_bits = self.prev_labels = self.first_hash = None
        self.first_leave = self.freeze = self.n_changes = self.prev_comp = None
        self.t = 0

    def add(self, steps, x: torch.Tensor, dist: torch.Tensor | None = None) -> None:
        """x: (c, V, D) rows of c consecutive steps in their stored dtype (or (V, D) for one);
        dist: optional (c, V, V) float32 matrices of ``metric`` for these steps (engine output),
        used for the components only without the native kernels."""
        if x.ndim == 2:
            x, steps = x[None], [steps]
            dist = None if dist is None else dist[None]
        c, v, _ = x.shape
        if c == 0:
            return
        if x.dtype not in _DT:
            raise ValueError(f"the dynamics need a float32, bfloat16 or float16 history, not {x.dtype}")
        bits = rows.canonical_bits(x)                     # canonical row words (-0.0 -> +0.0)
        elem = bits.view(_UINT[x.element_size()]).reshape(c, v, -1)
        lib = _native_lib()
        if lib is not None:
            labels, changed, differs0, disp = _dynamics_native.steps(self, lib, x, bits, elem)
        else:
            labels, changed, differs0, disp = self._numpy_steps(x, bits, elem)
        idx = self.t + np.arange(c)
        # first step off the step-0 row, last change
        for mask, arr, pick in ((differs0, self.first_leave, "first"), (changed, self.freeze, "last")):
            hit = mask.any(axis=0)
            if pick == "first":
                new = hit & (arr < 0)
                arr[new] = idx[mask.argmax(axis=0)[new]]
            else:
                arr[hit] = idx[c - 1 - mask[::-1].argmax(axis=0)[hit]]
        self.n_changes += changed.sum(axis=0)
        # events
        prev_labels = labels[:1] if self.prev_labels is None else self.prev_labels[None]
        before = np.concatenate([prev_labels, labels[:-1]])
        fis, mer = np.zeros(c, dtype=np.int64), np.zeros(c, dtype=np.int64)
        for s in np.flatnonzero((labels != before).any(axis=1)):
            ev = events_between(before[s], labels[s], int(steps[s]))
            fis[s] = sum(e.kind == "fission" for e in ev)
            mer[s] = len(ev) - fis[s]
            self.events.extend(ev)
        self._components(x, labels, dist, changed)
        self.steps.extend(int(s) for s in steps)
        self.labels.append(labels.astype(np.int32))
        self.disp.append(disp)
        self.fis.append(fis), self.mer.append(mer)
        self.prev_bits, self.prev_labels = bits[-1].copy(), labels[-1].copy()
        self.t += c

    def _start(self, bits: np.ndarray, v: int) -> None:
        if self.first_bits is None:
            self.first_bits = bits[0].copy()
            self.first_leave = np.full(v, -1, dtype=np.int64)
            self.freeze = np.full(v, -1, dtype=np.int64)
            self.n_changes = np.zeros(v, dtype=np.int64)

    def _numpy_steps(self, x: torch.Tensor, bits: np.ndarray, elem):
        """The same without the native library (numpy; embdist.rows' labels)."""
        c, v, _ = x.shape
        if not _finite(x, elem):
            raise ValueError("the history holds NaN or Inf values; the dynamics need finite rows")
        hashes = rows.hash_rows(bits)
        labels = rows.labels_of_bits(bits, hashes=hashes)
        self._start(bits, v)
        if self.first_hash is None:
            self.first_hash = rows.hash_rows(self.first_bits)
        differs0 = rows.rows_differ(bits, hashes, self.first_bits[None], self.first_hash[None])
        changed = np.empty((c, v), dtype=bool)
        changed[0] = False if self.prev_bits is None else rows.rows_differ(
            bits[0], hashes[0], self.prev_bits, rows.hash_rows(self.prev_bits))
        changed[1:] = rows.rows_differ(bits[1:], hashes[1:], bits[:-1], hashes[:-1])
        disp = np.zeros((c, v))                      # unchanged rows: equal bits, 0 units
        nsteps = max(1, _CHUNK_ELEMS // max(1, v * elem.shape[2]))
        if self.prev_bits is not None:
            disp[0] = _units_from_bits(self.prev_bits.view(elem.dtype).reshape(v, -1), elem[0], x.dtype)
        for s0 in range(1, c, nsteps):               # consecutive steps as views: no gathers
            s1 = min(c, s0 + nsteps)
            disp[s0:s1] = _units_from_bits(elem[s0 - 1:s1 - 1], elem[s0:s1], x.dtype)
        return labels, changed, differs0, disp

    def _components(self, x: torch.Tensor, labels: np.ndarray, dist, changed: np.ndarray | None = None) -> None:
        if not self.thresholds:
            return
        lib = _native_lib()
        if lib is not None:
            return _dynamics_native.components(self, lib, x, labels, changed)
        c, v, _ = x.shape
        top = self.thresholds[-1]
        isrep = labels == np.arange(v)
        if dist is None and v <= SMALL_V:
            from embdist.pairwise import pairwise_snapshots_multi
            dist = pairwise_snapshots_multi(x, [self.metric], device=self.device)[self.metric]
        if dist is not None:
            from embdist.pairwise._radius import exact_distances
            d = dist.numpy() if isinstance(dist, torch.Tensor) else dist
            slack = 1.0 if self.metric == "chebyshev" else 1 + 1e-5   # Euclidean: engine within 2e-6
            # Only pairs of distinct vectors (representatives) are read: identical rows are joined
            # through the labels. Consecutive steps with the same grouping share one index set.
            same = np.zeros(c, dtype=bool)
            same[1:] = (labels[1:] == labels[:-1]).all(axis=1)
            starts = np.flatnonzero(~same)
            ends = np.append(starts[1:], c)
            tt, aa, bb, vv = [], [], [], []
            for s0, s1 in zip(starts, ends):
                reps = np.flatnonzero(isrep[s0])
                i, j = np.triu_indices(len(reps), 1)
                ra, rb = reps[i], reps[j]
                vals = d[s0:s1][:, ra, rb]
                st, pk = np.nonzero(vals <= top * slack)
                tt.append(st + s0), aa.append(ra[pk]), bb.append(rb[pk]), vv.append(vals[st, pk])
            t, a, b = (np.concatenate(z).astype(np.int64) for z in (tt, aa, bb))
            val = np.concatenate(vv).astype(np.float64)
            if self.metric == "euclidean":       # settle the pairs near a threshold exactly
                near = np.zeros(len(val), dtype=bool)
                for thr in self.thresholds:
                    near |= np.abs(val - thr) <= 1e-5 * thr
                for s in np.unique(t[near]):
                    k = np.flatnonzero(near & (t == s))
                    val[k] = exact_distances(x[s], self.metric, a[k], b[k])
        else:
            from embdist.pairwise._radius import radius_pairs
            parts = [radius_pairs(x[s], self.metric, top) for s in range(c)]
            t = np.concatenate([np.full(len(p.a), s) for s, p in enumerate(parts)]).astype(np.int64)
            a = np.concatenate([p.a for p in parts]).astype(np.int64)
            b = np.concatenate([p.b for p in parts]).astype(np.int64)
            val = np.concatenate([p.dist for p in parts])
        for thr in self.thresholds:
            k = val <= thr
            count, largest = _components(c, v, labels, t[k], a[k], b[k])
            self.comp[thr][0].append(count), self.comp[thr][1].append(largest)

    def result(self) -> Dynamics:
        if not self.labels:
            raise ValueError("no steps were given")
        labels = np.concatenate(self.labels)
        v = labels.shape[1]
        return Dynamics(
            steps=np.array(self.steps, dtype=np.int64), groups=labels,
            distinct=(labels == np.arange(v)).sum(axis=1).astype(np.int64),
            fissions=np.concatenate(self.fis), merges=np.concatenate(self.mer), events=self.events,
            first_leave=self.first_leave, freeze=self.freeze, n_changes=self.n_changes,
            displacement=np.concatenate(self.disp), metric=self.metric, thresholds=list(self.thresholds),
            components={thr: {"count": np.concatenate(cnt), "largest": np.concatenate(lg)}
                        for thr, (cnt, lg) in self.comp.items()})


def history_dynamics(history: torch.Tensor, thresholds=(2 * 2.0 ** -7,), metric: str = "chebyshev", *,
                     steps=None, matrices: torch.Tensor | None = None, chunk_steps: int | None = None,
                     device: str = "auto") -> Dynamics:
    """The dynamics of a (T, V, D) history (``matrices``: its (T, V, V) float32 ``metric``
    matrices when already computed, reused for the components)."""
    t, v, d = history.shape
    steps = np.arange(t) if steps is None else np.asarray(steps)
    if chunk_steps is None:
        if history.dtype in _DT and _native_lib() is not None:    # no matrices: chunks of ~16M values
            chunk_steps = max(1, 4 * _CHUNK_ELEMS // max(1, v * d))
        else:
            chunk_steps = max(1, min(_CHUNK_ELEMS // max(1, v * d), _CHUNK_ELEMS // max(1, v * v)))
    tr = Tracker(thresholds, metric, device)
    for s in range(0, t, chunk_steps):
        e = min(t, s + chunk_steps)
        tr.add(steps[s:e], history[s:e], None if matrices is None else matrices[s:e])
    return tr.result()
