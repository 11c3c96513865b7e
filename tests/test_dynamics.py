"""embdist.dynamics against independent references: a planted history whose every event, freeze
step and lattice move is known by construction, and the toy training run against a float64
brute force over every row pair of every step."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from embdist import dynamics
from embdist.pairwise import _radius

U = {0: 2.0 ** -7, 1: 2.0 ** -8, 2: 2.0 ** -9, 3: 2.0 ** -133, 4: 2.0 ** -6, 5: 2.0 ** -6, 6: 2.0 ** -7, 7: 2.0 ** -10}
BASE = [1.0, 0.5, -0.25, 0.0, 3.0, -2.0, 1.5, 0.125]   # bf16-exact; U[k] = the bf16 spacing at BASE[k]


def planted():
    """(history (26, 12, 8) bf16, expected) built move by move; the comments give each move in
    lattice units of the value it starts from."""
    T, V = 26, 12
    cur = np.tile(np.array(BASE, dtype=np.float32), (V, 1))
    cur[2, 3] = -0.0                                   # -0.0 == +0.0: token 2 is in the start group
    moves = {  # step: [(tokens, coord, new value or delta in units, units moved)]
        3: [(range(6, 12), 0, +2, 2)],
        5: [((8, 9, 10), 1, +1, 1), ((11,), 4, +3, 3)],
        7: [((3,), 3, "-0", 0)],                       # +0.0 -> -0.0: not a change
        9: [((11,), 4, -3, 3), ((11,), 1, +1, 1)],
        12: [((6, 7), 0, -2, 2)],
        15: [((4,), 3, +3, 3)],                        # 0 -> 3 * 2^-133 (subnormal spacing)
        17: [((4,), 7, +5, 5)],
        20: [((5,), 0, 1 - 2.0 ** -8, 0.5)],           # 1.0 -> 1 - 2^-8: 2^-8 in units of 2^-7
        21: [((5,), 0, 1.0, 1.0)],                     # back: 2^-8 in units of 2^-8
        23: [((0, 1), 6, -1, 1)],
    }
    hist = np.zeros((T, V, 8), dtype=np.float32)
    disp = np.zeros((T, V))
    for t in range(T):
        for toks, k, what, units in moves.get(t, []):
            for i in toks:
                if what == "-0":
                    cur[i, k] = -0.0
                elif isinstance(what, float):
                    cur[i, k] = what
                else:
                    cur[i, k] += what * U[k]
                disp[t, i] += units
        hist[t] = cur
    h = torch.from_numpy(hist).to(torch.bfloat16)
    assert torch.equal(h.float(), torch.from_numpy(hist))           # every value bf16-exact
    events = [
        (3, "fission", [list(range(12))], [list(range(6)), list(range(6, 12))]),
        (5, "fission", [list(range(6, 12))], [[6, 7], [8, 9, 10], [11]]),
        (9, "merge", [[8, 9, 10], [11]], [[8, 9, 10, 11]]),
        (12, "merge", [list(range(6)), [6, 7]], [list(range(8))]),
        (15, "fission", [list(range(8))], [[0, 1, 2, 3, 5, 6, 7], [4]]),
        (20, "fission", [[0, 1, 2, 3, 5, 6, 7]], [[0, 1, 2, 3, 6, 7], [5]]),
        (21, "merge", [[0, 1, 2, 3, 6, 7], [5]], [[0, 1, 2, 3, 5, 6, 7]]),
        (23, "fission", [[0, 1, 2, 3, 5, 6, 7]], [[0, 1], [2, 3, 5, 6, 7]]),
    ]
    freeze = [23, 23, -1, -1, 17, 21, 12, 12, 5, 5, 5, 9]
    first_leave = [23, 23, -1, -1, 15, 20, 3, 3, 3, 3, 3, 3]
    total = [1, 1, 0, 0, 8, 1.5, 4, 4, 3, 3, 3, 9]
    return h, dict(events=events, freeze=freeze, first_leave=first_leave, total=total, disp=disp)


def brute_labels(h) -> np.ndarray:
    """labels[t, i] = smallest j with row j == row i at step t, by float64 comparison."""
    x = h.double().numpy()
    out = np.empty(x.shape[:2], dtype=np.int64)
    for t in range(len(x)):
        eq = (x[t][:, None, :] == x[t][None, :, :]).all(-1)
        out[t] = eq.argmax(axis=1)
    return out


def brute_events(labels: np.ndarray, steps) -> list:
    """Events from labellings with Python sets (independent of the numpy implementation)."""
    out = []
    for t in range(1, len(labels)):
        before, after = {}, {}
        for i, (p, q) in enumerate(zip(labels[t - 1], labels[t])):
            before.setdefault(int(p), []).append(i)
            after.setdefault(int(q), []).append(i)
        for members in sorted(before.values()):
            split = {}
            for i in members:
                split.setdefault(int(labels[t][i]), []).append(i)
            if len(split) > 1:
                out.append((int(steps[t]), "fission", [members], sorted(split.values())))
        for members in sorted(after.values()):
            came = {}
            for i in members:
                came.setdefault(int(labels[t - 1][i]), []).append(i)
            if len(came) > 1:
                out.append((int(steps[t]), "merge", sorted(came.values()), [members]))
    return sorted(out)


def as_tuples(events) -> list:
    return sorted((e.step, e.kind, [m.tolist() for m in e.parents], [m.tolist() for m in e.children]) for e in events)


def brute_components(h, metric: str, thr: float, steps) -> tuple[np.ndarray, np.ndarray]:
    """Components by transitive closure of the float64 distance graph (Chebyshev of bf16 values
    is exact in float64, as the engine's float32 max)."""
    x = h.double().numpy()
    count, largest = [], []
    for t in steps:
        diff = x[t][:, None, :] - x[t][None, :, :]
        d = np.abs(diff).max(-1) if metric == "chebyshev" else np.sqrt((diff ** 2).sum(-1))
        r = (d <= thr).astype(np.float64)
        while True:
            r2 = ((r @ r) > 0).astype(np.float64)
            if np.array_equal(r2, r):
                break
            r = r2
        first = r.argmax(axis=1)
        count.append(int((first == np.arange(len(first))).sum()))
        largest.append(int(np.bincount(first).max()))
    return np.array(count), np.array(largest)


def brute_units(h) -> np.ndarray:
    """(T, V) lattice units with the seeds' formula on the bits: |dW| / 2^(E-134), E of the
    earlier value (E = 0 read as 1)."""
    x = h.double().numpy()
    e = ((h.view(torch.int16).numpy().astype(np.int64) & 0x7FFF) >> 7)
    spacing = np.exp2(np.maximum(e, 1) - 134.0)
    out = np.zeros(x.shape[:2])
    out[1:] = (np.abs(x[1:] - x[:-1]) / spacing[:-1]).sum(-1)
    return out


# ----------------------------------------------------------------------------- planted history
@pytest.mark.parametrize("chunk", [1, 4, 26])
def test_planted_history_recovered_exactly(chunk):
    h, want = planted()
    dy = dynamics.history_dynamics(h, [2.0 ** -7, 0.015625], "chebyshev", chunk_steps=chunk, device="cpu")
    assert as_tuples(dy.events) == sorted(want["events"])
    assert dy.freeze.tolist() == want["freeze"] and dy.first_leave.tolist() == want["first_leave"]
    assert dy.total_displacement.tolist() == want["total"]            # exact, not approximately
    assert np.array_equal(dy.displacement, want["disp"])
    assert dy.n_changes[[2, 3]].tolist() == [0, 0]                     # the -0.0 flip is no change
    assert np.array_equal(dy.groups, brute_labels(h)) and dy.groups.dtype == np.int32
    assert dy.distinct.tolist() == [len(np.unique(g)) for g in brute_labels(h)]
    fis = np.bincount([e[0] for e in want["events"] if e[1] == "fission"], minlength=26)
    assert dy.fissions.tolist() == fis.tolist() and dy.merges.sum() == 3
    for thr in (2.0 ** -7, 0.015625):
        c, lg = brute_components(h, "chebyshev", thr, range(26))
        assert dy.components[thr]["count"].tolist() == c.tolist(), thr
        assert dy.components[thr]["largest"].tolist() == lg.tolist(), thr
    # by hand: at step 3 the two halves are exactly 2^-6 apart: one component at <= 2^-6 (inclusive)
    assert dy.components[0.015625]["count"][3] == 1 and dy.components[2.0 ** -7]["count"][3] == 2
    assert dy.components[0.015625]["count"][5] == 2 and dy.components[0.015625]["largest"][5] == 11


def test_planted_euclidean_and_steps():
    h, want = planted()
    steps = np.arange(26) * 10 + 1000
    dy = dynamics.history_dynamics(h, [0.015625, 0.02], "euclidean", steps=steps, device="cpu")
    assert [e.step for e in dy.events] == sorted(10 * e[0] + 1000 for e in want["events"])
    assert dy.step_of(dy.freeze).tolist() == [-1 if f < 0 else 10 * f + 1000 for f in want["freeze"]]
    for thr in (0.015625, 0.02):
        c, lg = brute_components(h, "euclidean", thr, range(26))
        assert dy.components[thr]["count"].tolist() == c.tolist()
        assert dy.components[thr]["largest"].tolist() == lg.tolist()


def test_large_vocabulary_path_is_the_same(monkeypatch):
    """Without the native passes, past SMALL_V tokens the components come from the streaming pass
    (radius_pairs), one step at a time: same numbers as the matrices (and the native passes)."""
    h, _ = planted()
    ref = dynamics.history_dynamics(h, [2.0 ** -7, 0.015625], "chebyshev", device="cpu")
    _numpy_path(monkeypatch, small_v=0)
    tr = dynamics.Tracker([2.0 ** -7, 0.015625], "chebyshev")
    for t in range(len(h)):
        tr.add(t, h[t])
    got = tr.result()
    for thr in ref.components:
        assert np.array_equal(got.components[thr]["count"], ref.components[thr]["count"])
        assert np.array_equal(got.components[thr]["largest"], ref.components[thr]["largest"])
    assert np.array_equal(got.groups, ref.groups) and as_tuples(got.events) == as_tuples(ref.events)
    assert np.array_equal(got.displacement, ref.displacement)


def test_lattice_units_rule():
    # the earlier value's binade decides; zero and subnormals use 2^-133
    assert dynamics.lattice_units(np.float32(1.0), np.float32(1.0 - 2 ** -8)) == 0.5
    assert dynamics.lattice_units(np.float32(1.0 - 2 ** -8), np.float32(1.0)) == 1.0
    assert dynamics.lattice_units(np.float32(0.0), np.float32(2.0 ** -130)) == 8.0
    assert dynamics.lattice_units(np.float32(-2.0 ** -133), np.float32(2.0 ** -133)) == 2.0
    assert dynamics.lattice_units(np.float32(-1.0), np.float32(1.0)) == 256.0
    # the bf16 bit path agrees with the formula over random pairs, binade and sign crossings included
    rng = np.random.default_rng(1)
    a = torch.from_numpy(rng.normal(0, 1, (400, 64)).astype(np.float32) * np.exp2(rng.integers(-140, 5, (400, 64)))).to(torch.bfloat16)
    b = torch.from_numpy(a.float().numpy() * rng.choice([1, -1, 0.5, 1.01, 3], (400, 64)).astype(np.float32)).to(torch.bfloat16)
    h = torch.stack([a, b])
    dy = dynamics.history_dynamics(h, [], "chebyshev", device="cpu")
    np.testing.assert_array_equal(dy.displacement, brute_units(h))


def test_nan_is_refused():
    h = torch.zeros(3, 4, 2, dtype=torch.bfloat16)
    h[2, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        dynamics.history_dynamics(h, [0.1], "chebyshev", device="cpu")


# ----------------------------------------------------------------------------- the toy run
def test_toy_run_against_brute_force(toy_history):
    h = load_file(str(toy_history))["embedding_history"]
    assert tuple(h.shape) == (1001, 128, 64) and h.dtype == torch.bfloat16
    dy = dynamics.history_dynamics(h, [0.015625, 0.03125], "chebyshev", device="cpu")
    labels = brute_labels(h)
    assert np.array_equal(dy.groups, labels)
    assert as_tuples(dy.events) == brute_events(labels, np.arange(1001))
    # the figures: 1 vector at step 0, 57 at step 1, 74 from about step 20
    assert dy.distinct[0] == 1 and dy.distinct[1] == 57 and (dy.distinct[20:] == 74).all()
    # the 55 bytes absent from the corpus: one group at every step, never split
    from embdist.toytrain import load_corpus
    absent = np.array(sorted(set(range(128)) - set(load_corpus()[0])))
    assert len(absent) == 55
    assert (labels[:, absent] == labels[:, absent[:1]]).all()
    assert labels[-1].tolist().count(int(absent[0])) == 55
    # what the run really has: only fissions (the start group shedding the 73 present bytes)
    assert dy.merges.sum() == 0 and dy.fissions.sum() == len(dy.events) > 0
    assert all(e.parents[0][0] == 0 or len(e.parents[0]) == 2 for e in dy.events)
    np.testing.assert_array_equal(dy.displacement, brute_units(h))
    x = h.double().numpy()
    changed = (x[1:] != x[:-1]).any(-1)
    last = np.where(changed.any(0), 1000 - changed[::-1].argmax(0), -1)
    assert dy.freeze.tolist() == last.tolist()
    left = (x != x[:1]).any(-1)
    assert dy.first_leave.tolist() == np.where(left.any(0), left.argmax(0), -1).tolist()
    sample = list(range(0, 30)) + list(range(30, 1001, 37))
    for thr in (0.015625, 0.03125):
        c, lg = brute_components(h, "chebyshev", thr, sample)
        assert dy.components[thr]["count"][sample].tolist() == c.tolist()
        assert dy.components[thr]["largest"][sample].tolist() == lg.tolist()


# ----------------------------------------------------------------------------- the engine's radius pairs
@pytest.mark.parametrize("metric", ["chebyshev", "euclidean"])
def test_radius_pairs_against_brute_force(metric):
    rng = np.random.default_rng(5)
    x = torch.from_numpy(rng.normal(0, 0.01, (300, 200)).astype(np.float32)).to(torch.bfloat16)
    x[10] = x[11]
    x[12] = x[11]
    x[40] = x[41]
    bits = x.view(torch.int16).clone()
    bits[40, 3] += 1                                   # one bf16 step
    x = bits.view(torch.bfloat16)
    x[100:140] = x[100] + torch.from_numpy(rng.normal(0, 0.0005, (40, 200)).astype(np.float32)).to(torch.bfloat16)
    xd = x.double().numpy()
    diff = xd[:, None, :] - xd[None, :, :]
    d = np.abs(diff).max(-1) if metric == "chebyshev" else np.sqrt((diff ** 2).sum(-1))
    for r, pre in ((0.004, 16), (0.02 if metric == "chebyshev" else 0.05, 64), (0.004, 1000)):
        res = _radius.radius_pairs(x, metric, r, prefilter=pre)
        rep = res.groups == np.arange(300)
        i, j = np.triu_indices(300, 1)
        keep = (d[i, j] <= r) & (d[i, j] > 0) & rep[i] & rep[j]
        assert list(zip(res.a.tolist(), res.b.tolist())) == sorted(zip(i[keep].tolist(), j[keep].tolist()))
        np.testing.assert_allclose(res.dist, d[res.a, res.b], rtol=1e-15)
        assert res.groups[[11, 12]].tolist() == [10, 10] and res.groups[41] == 41
        assert res.prefiltered == (pre < 100)


def test_per_step_labels_survive_hash_collisions(monkeypatch):
    """rows.row_groups of a history (the vectorised per-step path) stays exact when every row
    hashes alike: equal hashes are verified, a collision is split."""
    from embdist import rows
    rng = np.random.default_rng(2)
    h = torch.from_numpy(rng.integers(0, 3, (40, 30, 3)).astype(np.float32)).to(torch.bfloat16)
    h[5, :, 0] = -0.0                                   # -0.0 == +0.0 in a step full of zeros
    want = brute_labels(h)
    assert np.array_equal(rows.row_groups(h), want)
    monkeypatch.setattr(rows, "hash_rows", lambda bits: np.zeros(bits.shape[:-1], dtype=np.uint64))
    assert np.array_equal(rows.row_groups(h), want)
    assert np.array_equal(rows.row_groups(h[7]), want[7])


# ----------------------------------------------------------------------------- native passes
def _numpy_path(monkeypatch, small_v=None):
    monkeypatch.setattr(dynamics, "_native_lib", lambda: None)
    if small_v is not None:
        monkeypatch.setattr(dynamics, "SMALL_V", small_v)


def _same_dynamics(a, b):
    for f in ("groups", "distinct", "fissions", "merges", "first_leave", "freeze", "n_changes", "displacement"):
        assert np.array_equal(getattr(a, f), getattr(b, f)), f
    assert as_tuples(a.events) == as_tuples(b.events)
    for thr in a.thresholds:
        for k in ("count", "largest"):
            assert np.array_equal(a.components[thr][k], b.components[thr][k]), (thr, k)


def _training_like(dtype, t=14, v=300, d=20, seed=3):
    """Rows converging with noise, a duplicated block, -0.0 rows, frozen halves, near triples."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(v, d, generator=g) * 0.02
    out = []
    for s in range(t):
        w = base + torch.randn(v, d, generator=g) * 0.01 * (s % 3)
        w[: v // 6] = w[0]
        w[v // 6: v // 5] = -0.0 if s % 2 else 0.0
        w[v // 2: v // 2 + 30: 3] = w[v // 2 + 1: v // 2 + 31: 3] + 0.003
        if s % 4 == 0 and out:
            w[v // 2:] = out[-1][v // 2:].float()
        out.append(w.to(dtype))
    return torch.stack(out)


@pytest.mark.skipif(dynamics._native_lib() is None, reason="no native kernels")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("metric", ["chebyshev", "euclidean"])
def test_native_passes_equal_the_engine_path(monkeypatch, dtype, metric):
    """The native passes (kernels_dynamics.c) give what the numpy labels and the engine's
    matrices give: groups, events, per-token, displacement bit for bit, components at thresholds
    from 0 up to one joining nearly everything; chunks of any size."""
    h = _training_like(dtype)
    thr = [0.0, 0.004, 0.02, 0.05] if metric == "chebyshev" else [0.006, 0.03, 0.12]
    got = dynamics.history_dynamics(h, thr, metric, chunk_steps=5, device="cpu")
    for s in (2, 3):
        c, lg = brute_components(h, metric, thr[1], [s])
        assert got.components[thr[1]]["count"][s] == c[0] and got.components[thr[1]]["largest"][s] == lg[0]
    _numpy_path(monkeypatch)
    _same_dynamics(got, dynamics.history_dynamics(h, thr, metric, device="cpu"))


@pytest.mark.skipif(dynamics._native_lib() is None, reason="no native kernels")
def test_native_components_large_vocabulary(monkeypatch):
    """Thousands of rows (the candidate window and lane filter at work, planted pairs and
    triples within the threshold among random rows) against the streaming pass's radius pairs."""
    g = torch.Generator().manual_seed(5)
    v, d = 6000, 96
    x = torch.randn(2, v, d, generator=g) * 0.02
    x[:, 100:400:3] = x[:, 101:401:3] + 0.005       # 100 near pairs
    x[:, 1000:1300:2] = x[:, 1001:1301:2] - 0.0078125
    x[1, 3000:3100] = x[1, 2999]                    # a group of identical rows at step 1
    h = x.to(torch.bfloat16)
    thr = [0.0078125, 2 * 2.0 ** -7]
    got = dynamics.history_dynamics(h, thr, "chebyshev", device="cpu")
    assert got.components[thr[1]]["count"][0] <= got.distinct[0] - 200   # the planted pairs joined
    _numpy_path(monkeypatch, small_v=0)
    _same_dynamics(got, dynamics.history_dynamics(h, thr, "chebyshev", device="cpu"))


@pytest.mark.skipif(dynamics._native_lib() is None, reason="no native kernels")
def test_native_labels_survive_hash_collisions(monkeypatch):
    """Every row hashing alike (embdist.rows' hash replaced): the native label pass verifies the
    bits and splits, so the groups stay exact."""
    from embdist import rows
    rng = np.random.default_rng(2)
    h = torch.from_numpy(rng.integers(0, 3, (40, 30, 3)).astype(np.float32)).to(torch.bfloat16)
    h[5, :, 0] = -0.0
    want = brute_labels(h)
    monkeypatch.setattr(rows, "hash_rows", lambda bits: np.zeros(bits.shape[:-1], dtype=np.uint64))
    assert np.array_equal(dynamics.history_dynamics(h, [0.5], "chebyshev", device="cpu").groups, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_inf_is_refused(dtype):
    h = torch.zeros(3, 4, 2, dtype=dtype)
    h[1, 2, 1] = float("-inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        dynamics.history_dynamics(h, [0.1], "chebyshev", device="cpu")


@pytest.mark.skipif(dynamics._native_lib() is None, reason="no native kernels")
def test_native_passes_do_not_depend_on_threads(monkeypatch):
    """Pieces of steps (a history chunk) or of tokens (one checkpoint) on worker threads: the same
    numbers with 1 and 3 threads."""
    from embdist.pairwise import _cpu
    h = _training_like(torch.bfloat16, t=9, v=500, d=24, seed=8)
    runs = []
    for n in (1, 3):
        monkeypatch.setattr(_cpu, "n_threads", lambda n=n: n)
        tr = dynamics.Tracker([0.004, 0.02], "chebyshev")
        tr.add(range(4), h[:4])
        for t in range(4, 9):
            tr.add(t, h[t])
        runs.append(tr.result())
    _same_dynamics(*runs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int16, torch.int32])   # int: same widths as bf16 / fp32
def test_other_dtype_history_is_a_clear_error(dtype):
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        dynamics.history_dynamics(torch.zeros(2, 3, 4, dtype=dtype), [0.1], "chebyshev", device="cpu")
