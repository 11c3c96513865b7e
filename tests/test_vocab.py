"""task=vocab: whole-matrix streaming (embdist.pairwise.stream) against brute-force float64
references, shards merged bit for bit, and the sharded sweep through real Hydra launchers."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from scipy.spatial.distance import cdist

from conftest import client_for, run_embdist, runs_of
from embdist.pairwise import stream as S
from embdist.tables import read_csv
from embdist.tracking import sha256

EXACT_SIZES = [60, 25, 9, 4, 3, 2, 2]


def planted_vocab(n: int, d: int, seed: int = 0):
    """bf16 rows with planted exact-duplicate groups, near-duplicate clusters (every member within
    one bf16 step of a base row per coordinate: pairwise within 2), a chain a - b - c whose ends
    are 4 steps apart, and two rows equal up to the sign of a zero."""
    rng = np.random.default_rng(seed)
    w = torch.from_numpy(rng.normal(0, 0.05, (n, d)).astype(np.float32)).bfloat16()
    b = w.view(torch.int16)
    perm = rng.permutation(n)
    used = 0

    def take(k):
        nonlocal used
        out = np.sort(perm[used:used + k])
        used += k
        return out

    exact = []
    for s in EXACT_SIZES:
        g = take(s)
        b[torch.from_numpy(g)] = b[int(g[0])].clone()
        exact.append(g)
    near = []
    for s in (12, 5, 3):
        g = take(s)
        base = b[int(g[0])].clone()
        for r in g[1:]:
            row = base.clone()
            cols = rng.choice(d, 3, replace=False)
            row[torch.from_numpy(cols)] += torch.from_numpy(rng.choice([-1, 1], 3).astype(np.int16))
            b[int(r)] = row
        near.append(g)
    dupe = take(1)[0]                          # an exact copy of a near-cluster member
    b[int(dupe)] = b[int(near[0][3])].clone()
    exact.append(np.sort([near[0][3], dupe]))
    near[0] = np.sort(np.append(near[0], dupe))
    chain = take(3)
    for a, c in zip(chain[:-1], chain[1:]):
        row = b[int(a)].clone()
        row[0] += 2
        b[int(c)] = row
    near.append(chain)
    z = take(2)                                # +0.0 and -0.0: equal values, different bits
    b[int(z[0]), 1] = 0
    b[int(z[1])] = b[int(z[0])].clone()
    b[int(z[1]), 1] = -32768                   # 0x8000: -0.0
    exact.append(z)
    sizes = sorted(exact, key=lambda g: (-len(g), int(g[0])))
    near_all = sorted([np.array(g) for g in near] + [g for g in exact if not any(set(g) <= set(h) for h in near)],
                      key=lambda g: (-len(g), int(g[0])))
    planted_vocab.last = {"clusters": near[:-1], "chain": chain}
    return w, sizes, near_all


def ref_knn_chunked(w64: np.ndarray, k: int, metric: str = "euclidean", slack: int = 80, chunk: int = 1000):
    """Brute-force k nearest neighbours in float64 (scipy), ties by the smaller id."""
    n = len(w64)
    ids = np.empty((n, k), dtype=np.int64)
    dist = np.empty((n, k))
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        dd = cdist(w64[s:e], w64, metric)
        dd[np.arange(e - s), np.arange(s, e)] = np.inf
        m = min(n - 1, k + slack)
        part = np.argpartition(dd, m, axis=1)[:, :m + 1]
        pv = np.take_along_axis(dd, part, 1)
        assert (pv.max(1) > np.sort(pv, 1)[:, k - 1]).all()   # the slack covers every tie at the k-th
        o = np.lexsort((part, pv), axis=-1)[:, :k]
        ids[s:e] = np.take_along_axis(part, o, 1)
        dist[s:e] = np.take_along_axis(pv, o, 1)
    return ids, dist


def as_lists(groups):
    return [list(map(int, g)) for g in groups]


def test_planted_groups_and_brute_force_neighbours_20000_rows():
    w, exact, near = planted_vocab(20_000, 32)
    res = S.vocab_stats(w, "euclidean", k=6, radii=(0.05,), bins=4096, near_steps=2)
    assert as_lists(res.duplicate_groups) == as_lists(exact)
    assert as_lists(res.near_groups) == as_lists(near)
    assert res.stats["zero_pairs"] == sum(len(g) * (len(g) - 1) // 2 for g in exact)
    w64 = w.float().numpy().astype(np.float64)
    ids, dist = ref_knn_chunked(w64, 6)
    assert np.array_equal(res.knn_ids, ids)
    np.testing.assert_allclose(res.knn_dist, dist, rtol=1e-14, atol=0)
    assert res.stats["min"] == 0.0 and res.stats["min_nonzero"] == pytest.approx(dist[dist > 0].min(), rel=1e-14)
    # n = 1: the clusters (one step from their base) stay, the chain (two steps per link) goes
    parts = planted_vocab.last
    res1 = S.vocab_stats(w, "euclidean", k=1, near_steps=1, bins=16)
    got = [set(map(int, g)) for g in res1.near_groups]
    assert all(set(map(int, c)) in got for c in parts["clusters"])
    assert not any(set(map(int, parts["chain"])) & g for g in got)


def ordinal(w: torch.Tensor) -> np.ndarray:
    b = w.view(torch.int16).numpy().astype(np.int32)
    mag = b & 0x7FFF
    return np.where(b < 0, -mag, mag)


@pytest.mark.parametrize("metric", ["euclidean", "chebyshev"])
def test_statistics_neighbours_and_near_groups_against_numpy(metric):
    w, exact, near = planted_vocab(4000, 24, seed=3)
    radii = (0.1, 0.2, 0.25)
    res = S.vocab_stats(w, metric, k=5, radii=radii, bins=2000, near_steps=2)
    w64 = w.float().numpy().astype(np.float64)
    full = cdist(w64, w64, metric)
    v = full[np.triu_indices(len(w), 1)]
    st = res.stats
    assert st["n_pairs"] == len(v) and st["zero_pairs"] == int((v == 0).sum())
    assert st["min"] == v.min()
    assert st["max"] == pytest.approx(v.max(), rel=1e-14)
    assert st["mean"] == pytest.approx(v.mean(), rel=2e-6)
    for r in radii:
        assert st["below"][r] == int((v < r).sum())
    med = np.partition(v, (len(v) - 1) // 2)[(len(v) - 1) // 2]
    assert abs(st["median"] - med) <= st["median_error_bound"]
    assert st["median_error_bound"] <= (res.hist_edges[1] - res.hist_edges[0]) * 0.5 + 2 * S.TOLQ * med
    counts, _ = np.histogram(v, bins=res.hist_edges)
    assert res.hist_counts.sum() == len(v)
    width = res.hist_edges[1]
    at_edge = np.abs(v / width - np.round(v / width)) * width <= 3e-6 * v + 1e-12   # binned within 2e-6
    assert np.abs(res.hist_counts - counts).sum() <= 2 * int(at_edge[v > 0].sum())
    ids, dist = ref_knn_chunked(w64, 5, metric)
    assert np.array_equal(res.knn_ids, ids)
    np.testing.assert_allclose(res.knn_dist, dist, rtol=1e-14 if metric == "euclidean" else 0, atol=0)
    # near-duplicate groups against a brute-force check of every pair's bf16 steps
    o = ordinal(w)
    adj = np.zeros((len(w), len(w)), dtype=bool)
    for s in range(0, len(w), 500):
        adj[s:s + 500] = (np.abs(o[s:s + 500, None, :] - o[None, :, :]).max(-1) <= 2)
    from scipy.sparse.csgraph import connected_components
    _, lab = connected_components(adj, directed=False)
    comps = [np.flatnonzero(lab == c) for c in np.unique(lab) if (lab == c).sum() > 1]
    comps.sort(key=lambda g: (-len(g), int(g[0])))
    assert as_lists(res.near_groups) == as_lists(comps) == as_lists(near)


@pytest.mark.parametrize("metric", ["euclidean", "chebyshev"])
def test_shards_merge_to_the_single_result_bit_for_bit(tmp_path, metric):
    w, _, _ = planted_vocab(3000, 16, seed=5)
    kw = dict(k=4, radii=(0.1,), bins=512, near_steps=2)
    single = S.finalize(w, S.stream_pass(w, metric, **kw))
    parts = []
    for i in range(4):
        p = S.stream_pass(w, metric, shard=(i, 4), **kw)
        parts.append(S.StreamPartial.load(p.save(tmp_path / f"s{i}.npz")))
    merged = S.finalize(w, S.StreamPartial.merge(parts[::-1]))
    for key in ("knn_ids", "knn_dist", "hist_counts", "hist_edges", "groups"):
        assert np.array_equal(getattr(single, key), getattr(merged, key)), key
    assert single.stats == merged.stats
    assert as_lists(single.near_groups) == as_lists(merged.near_groups)
    with pytest.raises(ValueError, match="lacks shard"):
        S.finalize(w, S.StreamPartial.merge(parts[:3]))
    with pytest.raises(ValueError, match="appear twice"):
        S.StreamPartial.merge([parts[0], parts[0]])
    with pytest.raises(ValueError, match="not the matrix"):
        w2 = w.clone()
        w2[7, 3] = 1.0
        S.finalize(w2, S.StreamPartial.merge(parts))


def test_ties_duplicates_and_tiny_candidate_lists_stay_exact():
    """A lattice (many exactly equal distances) with candidate lists too short to prove their
    order: the rows fall back to a full exact evaluation and still match brute force."""
    rng = np.random.default_rng(11)
    w = torch.from_numpy((rng.integers(-2, 3, (1500, 6)) * 0.0625).astype(np.float32)).bfloat16()
    w64 = w.float().numpy().astype(np.float64)
    for metric in ("euclidean", "chebyshev"):
        ids, dist = ref_knn_chunked(w64, 7, metric, slack=400)
        for cand in (None, 9):
            res = S.finalize(w, S.stream_pass(w, metric, k=7, bins=64, candidates=cand))
            assert np.array_equal(res.knn_ids, ids), (metric, cand)
            np.testing.assert_array_equal(res.knn_dist, dist)


def test_float32_and_float16_inputs():
    rng = np.random.default_rng(2)
    a = rng.normal(0, 0.1, (1200, 20)).astype(np.float32)
    for x in (torch.from_numpy(a), torch.from_numpy(a).half()):
        x64 = x.float().numpy().astype(np.float64)
        res = S.vocab_stats(x, "euclidean", k=3, bins=128, near_steps=0)
        ids, dist = ref_knn_chunked(x64, 3)
        assert np.array_equal(res.knn_ids, ids)
        np.testing.assert_allclose(res.knn_dist, dist, rtol=1e-14)
        assert res.near_groups == [] and res.duplicate_groups == []


def test_argument_checks():
    w = torch.zeros(10, 4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="metric"):
        S.stream_pass(w, "manhattan")
    with pytest.raises(ValueError, match="shard index"):
        S.stream_pass(w, shard=(3, 3))
    with pytest.raises(ValueError, match="near_steps"):
        S.stream_pass(w, near_steps=65)
    res = S.vocab_stats(w, k=3, bins=8)      # every row identical
    assert res.stats["zero_pairs"] == 45 and res.stats["max"] == 0.0 and res.stats["median"] == 0.0
    assert as_lists(res.duplicate_groups) == [list(range(10))]
    assert res.knn_ids[0].tolist() == [1, 2, 3] and res.knn_ids[5].tolist() == [0, 1, 2]


def test_shard_rows_cover_every_block_once():
    for n in (1, 31, 129, 5000, 40_000):
        for count in (1, 2, 3, 7):
            spans = [S.shard_rows(n, i, count) for i in range(count)]
            covered = [r for a, b in spans for r in range(a, b)]
            assert covered == list(range(n))


# ----------------------------------------------------------------------------- the app
@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    w, exact, near = planted_vocab(3000, 32, seed=9)
    path = tmp_path_factory.mktemp("vocab") / "m.safetensors"
    save_file({"model.embed_tokens.weight": w}, str(path))
    return path, w, exact, near


ARGS = ("task=vocab", "model=custom", "task.progress=false", "vocab.k=5", "vocab.bins=1024")


def outputs_of(run_dir: Path) -> dict:
    out = {k: v for k, v in load_file(str(run_dir / "neighbours.safetensors")).items()}
    out["groups.csv"] = (run_dir / "groups.csv").read_bytes()
    out["euclidean_histogram.csv"] = (run_dir / "euclidean_histogram.csv").read_bytes()
    return out


def assert_same(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


STAT_KEYS = ("euclidean/min", "euclidean/mean", "euclidean/max", "euclidean/median", "euclidean/median_error_bound",
             "euclidean/zero_pairs", "euclidean/below_0.1", "duplicate_groups", "near_groups", "distinct_vectors")


def test_vocab_task_single_and_sharded_sweeps_agree(home, vocab_file):
    path, w, exact, near = vocab_file
    run_embdist(*ARGS, f"model.path={path}", home=home)
    (single,) = runs_of(home)
    assert single.info.status == "FINISHED"
    sdir = Path(single.data.tags["embdist.run_dir"])
    ref = outputs_of(sdir)
    assert single.data.tags["sha256.neighbours"] == sha256(sdir / "neighbours.safetensors")
    # the outputs themselves: planted groups, neighbours against brute force
    rows = read_csv(sdir / "groups.csv")
    dup = [list(map(int, r["member_ids"].split())) for r in rows if r["kind"] == "duplicate"]
    nea = [list(map(int, r["member_ids"].split())) for r in rows if r["kind"] == "near"]
    assert dup == as_lists(exact) and nea == as_lists(near)
    ids, dist = ref_knn_chunked(w.float().numpy().astype(np.float64), 5)
    assert np.array_equal(ref["euclidean_neighbour_ids"].numpy(), ids)
    np.testing.assert_allclose(ref["euclidean_neighbour_distances"].numpy(), dist, rtol=1e-14)
    assert torch.equal(ref["token_ids"], torch.arange(3000))
    m = single.data.metrics
    assert m["duplicate_groups"] == len(exact) and m["near_groups"] == len(near)
    assert m["euclidean/zero_pairs"] == sum(len(g) * (len(g) - 1) // 2 for g in exact)
    assert single.data.tags["duplicate_group_sizes"] == ",".join(str(len(g)) for g in exact)
    arts = {a.path for a in client_for(home).list_artifacts(single.info.run_id, "tables")}
    assert {"tables/groups.csv", "tables/euclidean_histogram.csv"} <= arts
    # each stage timed once (the load was once timed twice, nested)
    assert len(client_for(home).get_metric_history(single.info.run_id, "time/load_s")) == 1

    # the same run sharded over joblib and submitit_local jobs: merged = single, bit for bit
    for launcher in ("joblib", "submitit_local"):
        before = {r.info.run_id for r in runs_of(home)}
        run_embdist("-m", *ARGS, f"model.path={path}", "shard.count=3", "shard.index=0,1,2",
                    f"hydra/launcher={launcher}", home=home)
        new = [r for r in runs_of(home) if r.info.run_id not in before]
        (parent,) = [r for r in new if r.data.tags.get("embdist.sweep") == "parent"]
        children = [r for r in new if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert parent.info.status == "FINISHED" and len(children) == 3
        assert sorted(c.data.tags["embdist.shard"] for c in children) == ["0/3", "1/3", "2/3"]
        assert all(c.info.status == "FINISHED" and "output.shard" in c.data.tags for c in children)
        merged_dir = Path(parent.data.tags["embdist.sweep_dir"]) / "merged"
        assert_same(outputs_of(merged_dir), ref)
        pm = parent.data.metrics                          # the parent run holds the merged result
        for key in STAT_KEYS:
            assert pm[key] == m[key], (launcher, key)
        assert parent.data.tags["sha256.neighbours"] == single.data.tags["sha256.neighbours"]
        assert pm["shards"] == 3 and pm["jobs"] == 3
    # and by hand, from the sweep folder
    out = home / "by_hand"
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "embdist.merge", str(merged_dir.parent), "--out", str(out), "--no-mlflow"],
                       capture_output=True, text=True, cwd=home, env={**__import__("os").environ, "EMBDIST_HOME": str(home)})
    assert p.returncode == 0, p.stderr
    assert_same(outputs_of(out), ref)


def test_vocab_config_errors(home, vocab_file):
    path = vocab_file[0]
    p = run_embdist(*ARGS, f"model.path={path}", "shard.count=2", "shard.index=2", home=home, check=False)
    assert p.returncode == 2 and "shard.index=2 is outside 0..1" in p.stderr
    p = run_embdist(*ARGS, f"model.path={path}", "metric=both", "vocab.k=0", home=home, check=False)
    assert p.returncode == 2 and "vocab.k=0" in p.stderr
    p = run_embdist(*ARGS, f"model.path={path}", "metric.names=[manhattan]", home=home, check=False)
    assert p.returncode == 2 and "manhattan is not supported" in p.stderr
