"""embdist.groups: bit-exact groups of identical rows, and distinct rows per snapshot."""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import torch

from embdist import rows


def brute_groups(x: torch.Tensor | np.ndarray) -> list[list[int]]:
    """Reference: rows keyed by their raw bytes in a dict."""
    if isinstance(x, torch.Tensor):
        t = x.contiguous()
        rows = [bytes(t[i].view(torch.uint8).numpy().tobytes()) for i in range(len(t))]
    else:
        rows = [np.ascontiguousarray(r).tobytes() for r in x]
    by = defaultdict(list)
    for i, k in enumerate(rows):
        by[k].append(i)
    return sorted((g for g in by.values() if len(g) > 1), key=lambda g: (-len(g), g[0]))


def planted(dtype, n=400, d=24, seed=0) -> tuple[torch.Tensor, list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(dtype)
    plan = [[3, 50, 51, 399], [10, 11], list(range(100, 220, 20)), [7, 300]]
    for grp in plan:
        x[grp] = x[grp[0]].clone()
    # A near-duplicate: one bit away from row 20 (must stay out of every group).
    x[21] = x[20].clone()
    bits = x[21].view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])
    bits[5] += 1
    return x, plan


def as_lists(gs):
    return [g.tolist() for g in gs]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_duplicate_groups_match_brute_force(dtype):
    x, plan = planted(dtype)
    got = rows.duplicate_groups(x)
    assert as_lists(got) == brute_groups(x)
    assert sorted(map(sorted, as_lists(got))) == sorted(map(sorted, plan))
    assert all(g.dtype == np.int64 for g in got)
    assert [len(g) for g in got] == sorted((len(g) for g in got), reverse=True)


def test_duplicate_groups_numpy_and_odd_row_bytes():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 3, size=(500, 3), dtype=np.uint8)  # 3-byte rows, many collisions of values
    assert as_lists(rows.duplicate_groups(a)) == brute_groups(a)
    b = rng.normal(size=(50, 5)).astype(np.float32)          # 20-byte rows
    b[[4, 9, 49]] = b[4]
    assert as_lists(rows.duplicate_groups(b)) == [[4, 9, 49]]


def test_signed_zeros_are_equal_like_the_distance_engine():
    x = torch.zeros(4, 3)
    x[1, 0] = -0.0          # equal in value to row 0 (distance 0), different bits
    x[2] = float("nan")
    x[3] = float("nan")     # same NaN bits as row 2
    got = as_lists(rows.duplicate_groups(x))
    assert got == [[0, 1], [2, 3]]
    assert rows.distinct_per_step(x[None])[0] == 2
    assert x[1, 0].item() == 0 and str(x[1, 0].item()) == "-0.0"  # the input is not modified


def test_hash_collisions_are_split_exactly(monkeypatch):
    x, _ = planted(torch.float32)
    ref = brute_groups(x)
    monkeypatch.setattr(rows, "hash_rows", lambda bits: np.zeros(bits.shape[:-1], dtype=np.uint64))
    assert as_lists(rows.duplicate_groups(x)) == ref


def test_duplicate_groups_edges():
    assert rows.duplicate_groups(torch.randn(1, 4)) == []
    assert rows.duplicate_groups(torch.randn(6, 4)) == []
    assert as_lists(rows.duplicate_groups(torch.empty(3, 0))) == [[0, 1, 2]]
    with pytest.raises(ValueError, match="2-D"):
        rows.duplicate_groups(torch.randn(2, 3, 4))


def test_pairs_in_groups_qwen_figure():
    sizes = [814, 704, 306, 228, 11, 10, 6, 5, 4, 4, 3, 3, 2]
    assert sum(sizes) == 2100
    assert rows.pairs_in_groups(sizes) == 651_034
    assert rows.pairs_in_groups([]) == 0
    x, _ = planted(torch.bfloat16)
    gs = rows.duplicate_groups(x)
    assert list(rows.group_sizes_of(gs)) == [len(g) for g in gs]


def history_like(t=40, v=32, d=8, seed=3) -> torch.Tensor:
    """All tokens start at one point; some separate over the steps, some stay together."""
    g = torch.Generator().manual_seed(seed)
    h = torch.empty(t, v, d)
    h[0] = torch.randn(d, generator=g)
    for s in range(1, t):
        h[s] = h[s - 1]
        k = min(v, s)
        h[s, :k] += 0.01 * torch.randn(k, d, generator=g)
    h[:, v - 5:] = h[:, v - 5:v - 4].clone()  # five tokens that never separate
    return h.to(torch.bfloat16)


def test_distinct_vectors_per_step_matches_torch_unique():
    h = history_like()
    ref = np.array([torch.unique(h[i].float(), dim=0).shape[0] for i in range(len(h))])
    got = rows.distinct_per_step(h)
    assert got.dtype == np.int64 and got.shape == (len(h),)
    np.testing.assert_array_equal(got, ref)
    assert got[0] == 1 and got[-1] == 32 - 4
    np.testing.assert_array_equal(rows.distinct_per_step(h, chunk_steps=3), ref)
    np.testing.assert_array_equal(rows.distinct_per_step(h.float().numpy()), ref)


def test_distinct_vectors_fall_back_on_collisions(monkeypatch):
    h = history_like(t=12, v=10)
    ref = np.array([torch.unique(h[i].float(), dim=0).shape[0] for i in range(len(h))])
    monkeypatch.setattr(rows, "hash_rows", lambda bits: np.zeros(bits.shape[:-1], dtype=np.uint64))
    np.testing.assert_array_equal(rows.distinct_per_step(h), ref)


def test_distinct_vectors_edges():
    np.testing.assert_array_equal(rows.distinct_per_step(torch.randn(3, 1, 4)), [1, 1, 1])
    np.testing.assert_array_equal(rows.distinct_per_step(torch.randn(2, 0, 4)), [0, 0])
    with pytest.raises(ValueError, match="steps, tokens, dims"):
        rows.distinct_per_step(torch.randn(3, 4))
