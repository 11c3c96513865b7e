"""Whole-matrix analysis without an N x N matrix: the engine's tiles, reduced as they stream.

In the spirit of scikit-learn's ``pairwise_distances_chunked``, but with the reductions done in
the native epilogue of each tile (kernels_stream.c), so nothing of size N x N ever exists.

API
---
``stream_pass(x, metric="euclidean", *, k=10, radii=(), bins=65536, hist_max=None, near_steps=None,
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
``vocab_stats(x, metric, **kw)`` = ``finalize(x, stream_pass(x, metric, **kw))``.
Row identity is ``embdist.rows`` (the one row-identity code).

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
Modules: ``_bindings`` (ctypes), ``_partial`` (format, shards, merge, save/load), ``_pass`` (the
pass), ``_finalize`` (neighbours and their proof, statistics, near-duplicate groups).
"""
from __future__ import annotations

from ._bindings import DT_CODES, STREAM_METRICS
from ._finalize import StreamResult, finalize, vocab_stats
from ._partial import FORMAT, MAX_NEAR_STEPS, MAX_RADII, TOLQ, StreamPartial, load_partials, save_partials, shard_rows
from ._pass import stream_pass

__all__ = ["stream_pass", "finalize", "vocab_stats", "StreamPartial", "StreamResult", "save_partials",
           "load_partials", "shard_rows", "STREAM_METRICS", "TOLQ", "DT_CODES", "FORMAT", "MAX_RADII",
           "MAX_NEAR_STEPS"]
