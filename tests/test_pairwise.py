"""embdist.pairwise against float64 numpy/scipy references.

Every property is checked on both CPU back ends: the native kernels (compiled C) and the
generic torch path (what CUDA/MPS run, and the CPU fallback when no compiler is found).
"""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from scipy.spatial.distance import pdist, squareform

from embdist import pairwise as P
from embdist.pairwise import _native

BACKENDS = ["native", "generic"]
HYP = settings(max_examples=25, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SCIPY = {"euclidean": "euclidean", "sqeuclidean": "sqeuclidean", "manhattan": "cityblock",
         "chebyshev": "chebyshev", "cosine": "cosine"}


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param == "native" and _native.load() is None:
        pytest.skip(f"native kernels unavailable: {_native.load_error()}")
    monkeypatch.setenv("EMBDIST_PAIRWISE_BACKEND", request.param)
    return request.param


# ----------------------------------------------------------------------------- references
def bf16_step(v: np.ndarray, k: int = 1) -> np.ndarray:
    """v moved by k bf16 steps (units in the last place), v bf16-valued float32."""
    t = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)).to(torch.bfloat16)
    bits = t.view(torch.int16).clone()
    bits += k
    return bits.view(torch.bfloat16).float().numpy()


def identical_pairs(x: np.ndarray) -> np.ndarray:
    """Boolean (N, N): rows equal elementwise (-0.0 == 0.0), independent of the engine."""
    canon = (x.astype(np.float32) + np.float32(0)).view(np.uint32)
    _, inv = np.unique(canon, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    return inv[:, None] == inv[None, :]


def expected_zero_pairs(x: np.ndarray) -> int:
    canon = (x.astype(np.float32) + np.float32(0)).view(np.uint32)
    _, counts = np.unique(canon, axis=0, return_counts=True)
    return int(sum(k * (k - 1) // 2 for k in counts))


def seed_chebyshev(x: torch.Tensor) -> torch.Tensor:
    """The seed's formula (08.4b), verbatim in float32."""
    g = x.float()
    return torch.abs(g.unsqueeze(0) - g.unsqueeze(1)).max(dim=2)[0]


def check_contract(d: torch.Tensor, x32: np.ndarray):
    n = len(x32)
    assert d.dtype == torch.float32 and tuple(d.shape) == (n, n)
    a = d.numpy()
    assert not np.isnan(a).any()
    assert (a >= 0).all()
    assert np.array_equal(a, a.T), "not exactly symmetric"
    assert (np.diag(a) == 0).all()
    same = identical_pairs(x32)
    assert np.array_equal(a == 0, same), "exact zeros must be exactly the identical pairs"
    assert int((a[np.triu_indices(n, 1)] == 0).sum()) == expected_zero_pairs(x32)


def rel_err(d: np.ndarray, ref: np.ndarray) -> float:
    """max relative error; below float32's normal range the representable spacing
    (2**-149) is the limit, so the error there is measured against that instead."""
    m = ref > 0
    if not m.any():
        return 0.0
    err = np.abs(d[m].astype(np.float64) - ref[m]) - 2.0 ** -150   # float32 subnormal rounding
    return float((np.maximum(err, 0) / ref[m]).max())


# ----------------------------------------------------------------------------- data
@st.composite
def matrices(draw, max_n=48, max_d=40, dtypes=("bf16", "fp16", "fp32")):
    n = draw(st.integers(2, max_n))
    d = draw(st.integers(1, max_d))
    kind = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    if kind == "fp16":
        scale = 2.0 ** draw(st.integers(-6, 6))
    else:
        scale = 2.0 ** draw(st.sampled_from([-60, -20, -5, 0, 5, 20, 60]))
    offset = draw(st.sampled_from([0.0, 1.0, 30.0]))        # a common component (cone of rows)
    x = (rng.normal(size=(n, d)) + offset * rng.normal(size=(1, d))) * scale
    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[kind]
    x = torch.from_numpy(x.astype(np.float32)).to(tdt).float().numpy()
    # planted duplicate groups
    for _ in range(draw(st.integers(0, 3))):
        k = draw(st.integers(2, min(6, n)))
        idx = rng.choice(n, size=k, replace=False)
        x[idx] = x[idx[0]]
    # near-duplicates: one bf16/fp16/fp32 step in one coordinate
    for _ in range(draw(st.integers(0, 3))):
        i, j = rng.choice(n, size=2, replace=False)
        c = rng.integers(d)
        x[j] = x[i]
        t = torch.from_numpy(x[j].copy()).to(tdt)
        bits = t.view({torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[tdt])
        bits[c] += int(rng.choice([-1, 1])) if bits[c] != 0 else 1
        x[j] = t.float().numpy()
    if draw(st.booleans()):
        x[rng.integers(n)] = 0.0
    if draw(st.booleans()):                                   # -0.0 must equal 0.0
        i = rng.integers(n)
        x[i] = 0.0
        x[(i + 1) % n] = -0.0
    return torch.from_numpy(x).to(tdt)


# ----------------------------------------------------------------------------- argument checks
def test_unknown_metric_names_value_and_choices():
    with pytest.raises(ValueError) as e:
        P.pairwise(torch.zeros(3, 2), "minkowski")
    assert "minkowski" in str(e.value) and "euclidean" in str(e.value) and "chebyshev" in str(e.value)
    with pytest.raises(ValueError, match="hamming"):
        P.pairwise_snapshots(torch.zeros(2, 3, 2), "hamming")


def test_bad_inputs_rejected():
    with pytest.raises(ValueError):
        P.pairwise(torch.zeros(3), "euclidean")
    with pytest.raises(TypeError):
        P.pairwise(torch.zeros(3, 2, dtype=torch.int32), "euclidean")
    with pytest.raises(ValueError):
        P.pairwise(torch.zeros(3, 2), out=torch.empty(3, 4))
    with pytest.raises(ValueError):
        P.pairwise(torch.zeros(3, 2), device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError):
            P.pairwise(torch.zeros(3, 2), device="cuda")


def test_output_nbytes():
    assert P.output_nbytes(20373) == 20373 * 20373 * 4
    assert P.output_nbytes(5, torch.float16) == 50
    assert P.output_nbytes(0) == 0


def test_degenerate_shapes(backend):
    assert P.pairwise(torch.zeros(0, 4), device="cpu").shape == (0, 0)
    d = P.pairwise(torch.ones(1, 4), device="cpu")
    assert d.shape == (1, 1) and d.item() == 0
    d = P.pairwise(torch.zeros(3, 0), device="cpu")
    assert (d == 0).all()
    for metric in P.METRICS:
        s = P.pairwise_snapshots(torch.zeros(2, 3, 0), metric, device="cpu")
        assert s.shape == (2, 3, 3) and (s == 0).all()
        assert P.pairwise_snapshots(torch.zeros(0, 3, 2), metric, device="cpu").shape == (0, 3, 3)


# ----------------------------------------------------------------------------- properties
@HYP
@given(x=matrices())
def test_euclidean_contract_against_float64(x):
    for be in BACKENDS:
        if be == "native" and _native.load() is None:
            continue
        with _env_backend(be):
            d = P.pairwise(x, "euclidean", device="cpu")
        x32 = x.float().numpy()
        check_contract(d, x32)
        ref = squareform(pdist(x32.astype(np.float64), "euclidean"))
        assert rel_err(d.numpy(), ref) <= 2e-6, be


@HYP
@given(x=matrices(max_n=40, max_d=48))
def test_chebyshev_bit_identical_to_seed_and_scipy(x):
    seed = seed_chebyshev(x)
    ref = squareform(pdist(x.double().numpy(), "chebyshev"))
    for be in BACKENDS:
        if be == "native" and _native.load() is None:
            continue
        with _env_backend(be):
            d = P.pairwise(x, "chebyshev", device="cpu")
        assert torch.equal(d, seed), be
        check_contract(d, x.float().numpy())
        assert rel_err(d.numpy(), ref) <= 6e-8   # only the float32 rounding of a - b


@HYP
@given(x=matrices(max_n=32, max_d=24, dtypes=("bf16", "fp32")),
       metric=st.sampled_from(["sqeuclidean", "manhattan", "cosine"]))
def test_other_metrics_against_scipy(x, metric):
    x64 = x.double().numpy()
    for be in BACKENDS:
        if be == "native" and _native.load() is None:
            continue
        with _env_backend(be):
            d = P.pairwise(x, metric, device="cpu").numpy()
        assert np.array_equal(d, d.T) and (np.diag(d) == 0).all() and not np.isnan(d).any()
        same = identical_pairs(x.float().numpy())
        assert (d[same] == 0).all()
        if metric == "cosine":
            nz = np.linalg.norm(x64, axis=1) > 0
            ref = squareform(pdist(x64[nz], "cosine"), checks=False)
            sub = d[np.ix_(nz, nz)]
            np.testing.assert_allclose(sub, np.clip(ref, 0, 2), rtol=4e-6, atol=3e-7)
            z = ~nz
            if z.any() and nz.any():
                assert (d[np.ix_(z, nz)] == 1).all()
        else:
            assert np.array_equal(d == 0, same)
            ref = squareform(pdist(x64, SCIPY[metric]))
            if metric == "sqeuclidean":
                fin = ref > 2.0 ** -120      # below that, d^2 is subnormal in float32
                assert rel_err(np.where(fin, d, 0), np.where(fin, ref, 0)) <= 4e-6
            else:
                assert rel_err(d, ref) <= 2e-6


# ----------------------------------------------------------------------------- targeted cases
def _clustered(n=700, d=160, seed=0):
    """Tiles of several sizes: a cone of rows, dense clusters of near-duplicates (all within a
    few bf16 steps), exact duplicate groups, zero rows."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.02, (n, d)) + rng.normal(0, 0.02, (1, d))
    c = rng.normal(0, 0.02, (1, d))
    k = min(120, n // 4)
    x[:k] = c + rng.integers(-2, 3, (k, d)) * 6e-5 * (rng.random((k, d)) < 0.05)
    x = torch.from_numpy(x.astype(np.float32)).bfloat16().float().numpy()
    for g in ([5, 6, 7, 300, 699], [10, 11], [200, 201, 202, 650], [400, 401]):
        g = [i % n for i in g]
        x[g] = x[g[0]]
    a, b = (500 % n), (501 % n)
    x[b] = x[a]
    x[b, 7 % d] = bf16_step(x[a, 7 % d:7 % d + 1], 1)[0]     # one bf16 step in one coordinate
    x[600 % n] = 0
    return torch.from_numpy(x).bfloat16()


def test_euclidean_clustered_many_tiles(backend, monkeypatch):
    from embdist.pairwise import _generic
    monkeypatch.setitem(_generic.TILE, "cpu", 96)
    x = _clustered()
    d = P.pairwise(x, "euclidean", device="cpu")
    x32 = x.float().numpy()
    check_contract(d, x32)
    ref = squareform(pdist(x32.astype(np.float64)))
    assert rel_err(d.numpy(), ref) <= 2e-6
    # the one-step pair: exactly the step
    assert d[500, 501].item() == pytest.approx(abs(float(x32[501, 7] - x32[500, 7])), rel=1e-7)
    assert d[500, 501].item() > 0


def test_tiny_differences_do_not_underflow(backend):
    # rows ~1e-30 apart: squared differences underflow float32 (1e-60)
    rng = np.random.default_rng(3)
    base = rng.normal(size=(1, 64)).astype(np.float32)
    x = np.repeat(base, 6, axis=0)
    x[1, 3] = np.nextafter(x[1, 3], np.float32(10))
    x[2] = x[2] * np.float32(1e-30)
    x[3] = x[2]
    x[3, 0] = np.nextafter(x[3, 0], np.float32(1))
    x[4] = np.float32(1e-44)                     # subnormals
    x[5] = 0
    x[5, 9] = np.float32(1.4e-45)
    d = P.pairwise(torch.from_numpy(x), "euclidean", device="cpu")
    check_contract(d, x)
    ref = squareform(pdist(x.astype(np.float64)))
    assert rel_err(d.numpy(), ref) <= 2e-6


def test_all_rows_identical_and_all_near(backend):
    x = torch.randn(1, 50).bfloat16().repeat(300, 1)
    d = P.pairwise(x, "euclidean", device="cpu")
    assert (d == 0).all()
    y = x.clone()
    y[:, 0] = torch.arange(300).bfloat16() * 2**-20 + y[0, 0]
    d = P.pairwise(y, "euclidean", device="cpu")
    check_contract(d, y.float().numpy())
    ref = squareform(pdist(y.double().numpy()))
    assert rel_err(d.numpy(), ref) <= 2e-6


def test_large_input_against_float64_reference(backend):
    # several native blocks and columns, d not a multiple of any vector width
    x = _clustered(n=1100, d=301, seed=5)
    for metric in ("euclidean", "chebyshev"):
        d = P.pairwise(x, metric, device="cpu")
        check_contract(d, x.float().numpy())
        ref = squareform(pdist(x.double().numpy(), metric))
        assert rel_err(d.numpy(), ref) <= (2e-6 if metric == "euclidean" else 6e-8)
    assert torch.equal(P.pairwise(x[:300], "chebyshev", device="cpu"), seed_chebyshev(x[:300]))


def test_out_memory_mapped(backend, tmp_path):
    x = _clustered(n=130, d=33)
    path = tmp_path / "d.bin"
    out = torch.from_file(str(path), shared=True, size=130 * 130, dtype=torch.float32).view(130, 130)
    r = P.pairwise(x, "euclidean", device="cpu", out=out)
    assert r.data_ptr() == out.data_ptr()
    expect = P.pairwise(x, "euclidean", device="cpu")
    assert torch.equal(out, expect)
    mm = np.memmap(path, dtype=np.float32, mode="r", shape=(130, 130))
    assert np.array_equal(mm, expect.numpy())


def test_ctrl_c_propagates_and_engine_stays_usable(backend, monkeypatch):
    """A real SIGINT during a run: KeyboardInterrupt reaches the caller, no worker thread
    is left running, and the next call gives a correct result."""
    import os
    import signal
    import time

    from embdist.pairwise import _cpu, _generic
    x = _clustered(n=700, d=40)
    orig_rp = _cpu.run_parallel

    def slow_rp(items, fn, bar=None, workers=None):
        def slow(it):
            time.sleep(0.1)
            return fn(it)
        return orig_rp(items, slow, bar, workers)

    orig_ws = _generic._write_sym

    def slow_ws(*a):
        time.sleep(0.1)
        return orig_ws(*a)

    monkeypatch.setattr(_cpu, "run_parallel", slow_rp)
    monkeypatch.setattr(_generic, "_write_sym", slow_ws)
    monkeypatch.setitem(_generic.TILE, "cpu", 64)
    monkeypatch.setitem(_generic.DIRECT_TILE, "cpu", 64)
    before = {t.ident for t in threading.enumerate()}
    for metric in ("euclidean", "chebyshev"):
        timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        t0 = time.perf_counter()
        with pytest.raises(KeyboardInterrupt):
            P.pairwise(x, metric, device="cpu", progress=True)
        assert time.perf_counter() - t0 < 5
        timer.join()
    left = [t for t in threading.enumerate()
            if t.ident not in before and t.name.startswith("embdist") and t.is_alive()]
    assert not left
    monkeypatch.setattr(_cpu, "run_parallel", orig_rp)
    monkeypatch.setattr(_generic, "_write_sym", orig_ws)
    d = P.pairwise(x, "euclidean", device="cpu", progress=True)
    check_contract(d, x.float().numpy())


# ----------------------------------------------------------------------------- snapshots
def test_snapshots_match_per_snapshot_loop(backend):
    rng = np.random.default_rng(11)
    t, v, dd = 7, 40, 16
    h = rng.normal(0, 0.1, (t, v, dd))
    h[0] = h[0, 0]                         # step 0: all tokens at one point
    h[1, :10] = h[1, 0]
    h[2, 5, 3] = h[2, 4, 3]
    h[2, 5] = h[2, 4]
    h[2, 5, 1] = bf16_step(h[2, 4, 1:2].astype(np.float32), 1)[0]
    h = torch.from_numpy(h.astype(np.float32)).bfloat16()
    for metric in ("euclidean", "chebyshev", "manhattan", "sqeuclidean", "cosine"):
        s = P.pairwise_snapshots(h, metric, device="cpu")
        assert s.shape == (t, v, v) and s.dtype == torch.float32
        for i in range(t):
            ref = squareform(pdist(h[i].double().numpy(), SCIPY[metric]), checks=False)
            if metric == "chebyshev":
                assert torch.equal(s[i], seed_chebyshev(h[i]))
            if metric == "cosine":
                assert np.abs(s[i].numpy() - np.nan_to_num(ref, nan=0.0)).max() <= 2e-6
            else:
                check_contract(s[i], h[i].float().numpy())
                assert rel_err(s[i].numpy(), ref) <= (4e-6 if metric == "sqeuclidean" else 2e-6)
    assert (P.pairwise_snapshots(h, "euclidean", device="cpu")[0] == 0).all()


def test_snapshots_float16_keeps_zero_iff_identical(backend):
    h = torch.zeros(3, 5, 4)
    h[:, 1, 0] = 1e-9                      # a distance far below float16's smallest subnormal
    h[:, 2, 0] = 1.0
    s = P.pairwise_snapshots(h, "euclidean", out_dtype=torch.float16, device="cpu")
    assert s.dtype == torch.float16
    assert s[0, 0, 1] > 0 and s[0, 0, 3] == 0 and s[0, 0, 2] == 1


# shapes for the fused snapshot pass: V and D below, at and past the 16-wide tiles, D past one
# float32 superblock (64 terms: float64 flushes), and the 08.4b shape
SNAP_SHAPES = [(3, 1, 1), (2, 5, 3), (3, 16, 16), (3, 17, 15), (2, 33, 64), (2, 40, 65), (1, 20, 200),
               (2, 128, 64)]


def snap_history(t, v, d, dtype, seed) -> torch.Tensor:
    """(t, v, d) snapshots, one scale per snapshot (squares that underflow / overflow float32
    included), with identical rows, one-step near-duplicates, a zero row and -0.0."""
    rng = np.random.default_rng(seed)
    scales = [2.0 ** -20, 2.0 ** -6, 1.0, 2.0 ** 6] if dtype == torch.float16 else \
        [2.0 ** -70, 2.0 ** -20, 1.0, 2.0 ** 20, 2.0 ** 70]
    h = np.empty((t, v, d), dtype=np.float32)
    for i in range(t):
        x = (rng.normal(size=(v, d)) + rng.normal(size=(1, d))) * scales[(i + seed) % len(scales)]
        if v >= 4:
            x[1] = x[0]
            x[3] = x[2]
        h[i] = x
    h = torch.from_numpy(h).to(dtype)
    bits = h.view(torch.int32 if dtype == torch.float32 else torch.int16)
    for i in range(t):
        if v >= 6:
            bits[i, 5] = bits[i, 4]
            bits[i, 5, rng.integers(d)] += 1                 # one step apart
        if v >= 8:
            h[i, 6] = 0.0
            h[i, 7] = -0.0
    return h


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_snapshots_multi_contract_all_shapes(backend, dtype):
    """The fused pass: every snapshot meets the contract (float64 reference), Chebyshev is the
    seed's formula bit for bit, and each metric equals its single-metric call bit for bit."""
    for k, (t, v, d) in enumerate(SNAP_SHAPES):
        h = snap_history(t, v, d, dtype, seed=k)
        res = P.pairwise_snapshots_multi(h, ["euclidean", "chebyshev", "sqeuclidean"], device="cpu")
        assert set(res) == {"euclidean", "chebyshev", "sqeuclidean"}
        for i in range(t):
            x32 = h[i].float().numpy()
            x64 = x32.astype(np.float64)
            check_contract(res["euclidean"][i], x32)
            check_contract(res["sqeuclidean"][i], x32)
            assert rel_err(res["euclidean"][i].numpy(), squareform(pdist(x64), checks=False)) <= 2e-6, (t, v, d, i)
            sq, ref = res["sqeuclidean"][i].numpy(), squareform(pdist(x64, "sqeuclidean"), checks=False)
            big = ref > np.finfo(np.float32).max                 # beyond float32: rounds to inf
            under = (ref > 0) & (ref < 2.0 ** -150)              # below float32: smallest subnormal
            assert np.isinf(sq[big]).all() and (sq[under] == np.float32(2.0 ** -149)).all()
            keep = ~(big | under)
            assert rel_err(np.where(keep, sq, 0), np.where(keep, ref, 0)) <= 4e-6, (t, v, d, i)
            assert torch.equal(res["chebyshev"][i], seed_chebyshev(h[i])), (t, v, d, i)
        for m in res:
            assert torch.equal(res[m], P.pairwise_snapshots(h, m, device="cpu")), (m, t, v, d)
        pair = P.pairwise_snapshots_multi(h, ["chebyshev", "euclidean"], device="cpu")
        assert torch.equal(pair["euclidean"], res["euclidean"]) and torch.equal(pair["chebyshev"], res["chebyshev"])


@pytest.mark.parametrize("odt", [torch.float16, torch.bfloat16])
def test_snapshots_multi_low_precision_extremes(backend, odt):
    """float16/bfloat16 outputs of the fused pass at extreme scales (distances below the
    format's subnormals, above its range): the float32 result rounded to nearest even, a
    nonzero distance never 0."""
    h = snap_history(5, 37, 20, torch.float32, seed=3)
    h[4] *= 1e-25                                   # float32-subnormal coordinates
    s32 = P.pairwise_snapshots_multi(h, ["euclidean", "chebyshev"], device="cpu")
    s = P.pairwise_snapshots_multi(h, ["euclidean", "chebyshev"], out_dtype=odt, device="cpu")
    fi = torch.finfo(odt)
    for m in s:
        assert s[m].dtype == odt
        expect = s32[m].to(odt)
        expect[(expect == 0) & (s32[m] != 0)] = fi.smallest_normal * fi.eps
        assert torch.equal(s[m].view(torch.int16), expect.view(torch.int16)), m
        assert ((s[m] == 0) == (s32[m] == 0)).all()


def test_snapshots_multi_api(backend, monkeypatch):
    h = snap_history(3, 9, 4, torch.bfloat16, seed=1)
    with pytest.raises(TypeError):
        P.pairwise_snapshots_multi(h, "euclidean")
    with pytest.raises(ValueError):
        P.pairwise_snapshots_multi(h, [])
    with pytest.raises(ValueError, match="hamming"):
        P.pairwise_snapshots_multi(h, ["euclidean", "hamming"])
    with pytest.raises(ValueError):
        P.pairwise_snapshots_multi(h, ["euclidean"], out_dtype=torch.int32)
    every = list(P.METRICS) + ["euclidean"]          # repeated names are computed once
    res = P.pairwise_snapshots_multi(h, every, device="cpu", progress=True)
    assert list(res) == list(P.METRICS)
    for m in P.METRICS:
        assert torch.equal(res[m], P.pairwise_snapshots(h, m, device="cpu")), m
    r64 = P.pairwise_snapshots_multi(h, ["euclidean", "chebyshev"], out_dtype=torch.float64, device="cpu")
    for m in r64:
        assert r64[m].dtype == torch.float64
        assert torch.equal(r64[m], P.pairwise_snapshots(h, m, out_dtype=torch.float64, device="cpu"))
    with monkeypatch.context() as mp:                 # outputs on transparent huge pages (opt-in)
        mp.setattr(P._snapshots, "_THP_MIN_BYTES", 0)
        mp.setenv("EMBDIST_SNAPSHOT_THP", "1")
        thp = P.pairwise_snapshots_multi(h, ["euclidean", "chebyshev"], device="cpu")
    assert all(torch.equal(thp[m], res[m]) for m in thp)
    z = P.pairwise_snapshots_multi(torch.zeros(2, 3, 0), ["euclidean", "chebyshev"], device="cpu")
    assert all(o.shape == (2, 3, 3) and (o == 0).all() for o in z.values())
    e = P.pairwise_snapshots_multi(torch.zeros(0, 3, 2), ["euclidean", "chebyshev"], device="cpu")
    assert all(o.shape == (0, 3, 3) for o in e.values())


def test_snapshots_into_caller_buffers(backend, tmp_path):
    """out=: the caller's (reused, NaN-filled, or memory-mapped) tensors are filled in place
    with the same bits as fresh outputs, checked against scipy float64 and the seed."""
    t, v, d = 5, 37, 20
    h = snap_history(t, v, d, torch.bfloat16, seed=7)
    mm = np.memmap(tmp_path / "cheb.bin", dtype=np.float32, mode="w+", shape=(t, v, v))
    bufs = {"euclidean": torch.full((t, v, v), float("nan")), "chebyshev": torch.from_numpy(mm)}
    got = P.pairwise_snapshots_multi(h, ["euclidean", "chebyshev"], device="cpu", out=bufs)
    assert got["euclidean"] is bufs["euclidean"] and got["chebyshev"] is bufs["chebyshev"]
    for i in range(t):
        hi = h[i].double().numpy()
        assert rel_err(got["euclidean"][i].numpy(), squareform(pdist(hi, "euclidean"))) <= 2e-6
        check_contract(got["euclidean"][i], h[i].float().numpy())
        assert torch.equal(got["chebyshev"][i], seed_chebyshev(h[i]))
    mm.flush()
    on_disk = np.fromfile(tmp_path / "cheb.bin", dtype=np.float32).reshape(t, v, v)
    assert np.array_equal(on_disk, got["chebyshev"].numpy())
    fresh = P.pairwise_snapshots_multi(h, ["euclidean", "chebyshev"], device="cpu")
    assert all(torch.equal(fresh[m], got[m]) for m in fresh)
    h16 = torch.full((t, v, v), 7.0, dtype=torch.float16)     # single metric, low-precision output
    assert P.pairwise_snapshots(h, "euclidean", out_dtype=torch.float16, device="cpu", out=h16) is h16
    assert torch.equal(h16, P.pairwise_snapshots(h, "euclidean", out_dtype=torch.float16, device="cpu"))
    bad = [({"euclidean": torch.empty(t, v, v)}, "one tensor per metric"),
           ({"euclidean": torch.empty(t, v, v + 1), "chebyshev": torch.empty(t, v, v)}, r"shape \(5, 37, 37\)"),
           ({"euclidean": torch.empty(t, v, v, dtype=torch.float16), "chebyshev": torch.empty(t, v, v)},
            "out_dtype"),
           ({"euclidean": torch.empty(t, v, v).transpose(1, 2), "chebyshev": torch.empty(t, v, v)},
            "not contiguous")]
    shared = torch.empty(2 * t, v, v)
    bad.append(({"euclidean": shared[:t], "chebyshev": shared[:t]}, "overlaps"))
    half = torch.empty(t * v * v + 7)                                    # partly overlapping views
    bad.append(({"euclidean": half[:t * v * v].view(t, v, v), "chebyshev": half[7:].view(t, v, v)}, "overlaps"))
    for out, msg in bad:
        with pytest.raises(ValueError, match=msg):
            P.pairwise_snapshots_multi(h, ["euclidean", "chebyshev"], device="cpu", out=out)
    with pytest.raises(TypeError, match="torch.Tensor"):
        P.pairwise_snapshots(h, "euclidean", device="cpu", out=np.zeros((t, v, v), np.float32))
    h32 = torch.zeros(t, v, v)                                          # the output would overwrite the input
    h32[:, :, :d] = h.float()
    with pytest.raises(ValueError, match="overlaps the history"):
        P.pairwise_snapshots(h32[:, :, :d], "euclidean", device="cpu", out=h32)


@pytest.mark.parametrize("v", [32, 48])
def test_snapshots_into_caller_buffers_aligned_and_not(backend, v):
    """V a multiple of 16: whole aligned rows (the native path's streaming stores), then the same
    buffer shifted by 4 bytes (no longer 64-byte aligned: plain stores); float64 outputs too."""
    t, d = 4, 70
    h = snap_history(t, v, d, torch.bfloat16, seed=v)
    fresh = P.pairwise_snapshots_multi(h, ["euclidean", "chebyshev"], device="cpu")
    for shift in (0, 1):
        raw = [torch.full((t * v * v + 16 + shift,), 3.0) for _ in range(2)]
        # (-ptr/4) mod 16 floats to the next 64-byte boundary, then `shift` floats past it
        bufs = [r[(-(r.data_ptr() // 4)) % 16 + shift:][: t * v * v].view(t, v, v) for r in raw]
        assert all((b.data_ptr() % 64 == 0) == (shift == 0) for b in bufs)
        got = P.pairwise_snapshots_multi(h, ["euclidean", "chebyshev"], device="cpu",
                                         out={"euclidean": bufs[0], "chebyshev": bufs[1]})
        assert torch.equal(got["euclidean"], fresh["euclidean"]) and torch.equal(got["chebyshev"], fresh["chebyshev"])
    for i in range(t):
        hi = h[i].double().numpy()
        assert rel_err(fresh["euclidean"][i].numpy(), squareform(pdist(hi, "euclidean"))) <= 2e-6
        assert torch.equal(fresh["chebyshev"][i], seed_chebyshev(h[i]))
    o64 = torch.full((t, v, v), float("nan"), dtype=torch.float64)
    r64 = P.pairwise_snapshots(h, "euclidean", out_dtype=torch.float64, device="cpu", out=o64)
    assert r64 is o64 and torch.equal(o64, P.pairwise_snapshots(h, "euclidean", out_dtype=torch.float64, device="cpu"))


@pytest.mark.parametrize("odt", [torch.float32, torch.float16, torch.bfloat16])
def test_snapshots_streaming_stores_same_bits(odt):
    """Outputs written with streaming stores (reused, already faulted buffers) equal the plain
    stores of a fresh output, bit for bit (V a multiple of 16: aligned full rows)."""
    lib = _native.load()
    if lib is None:
        pytest.skip(f"no native build here: {_native.load_error()}")
    from embdist.pairwise import _cpu
    for v, d in ((16, 5), (32, 64), (128, 64), (48, 70)):
        h = snap_history(6, v, d, torch.bfloat16, seed=v)
        ref = P.pairwise_snapshots_multi(h, ["euclidean", "chebyshev"], out_dtype=odt, device="cpu")
        oe = torch.full((6, v, v), 7.0, dtype=odt)
        oc = torch.full((6, v, v), 7.0, dtype=odt)
        _cpu.snapshots(lib, h, 0, 6, out_e=oe, out_c=oc, fresh=False)
        assert torch.equal(oe, ref["euclidean"]) and torch.equal(oc, ref["chebyshev"])
        _cpu.snapshots(lib, h, 2, 5, out_e=oe[2:5], out_c=None, squared=True, fresh=False)   # an inner range
        sq = P.pairwise_snapshots(h, "sqeuclidean", out_dtype=odt, device="cpu")
        assert torch.equal(oe[2:5], sq[2:5]) and torch.equal(oe[:2], ref["euclidean"][:2])


def test_snapshots_non_finite_follow_the_seed(backend):
    """Outside the contract, but not silently finite: a snapshot holding NaN or inf gives the
    seed's IEEE results off the diagonal (Chebyshev keeps NaN like torch's max)."""
    h = torch.randn(3, 20, 8, generator=torch.Generator().manual_seed(2))
    h[0, 3, 2] = float("nan")
    h[1, 4, 1] = h[1, 5, 1] = float("inf")           # inf - inf = NaN in one coordinate
    h[1, 6, 0] = -float("inf")
    res = P.pairwise_snapshots_multi(h, ["euclidean", "chebyshev"], device="cpu")
    off = ~torch.eye(20, dtype=torch.bool)
    for i in range(3):
        g = h[i]
        diff = g.unsqueeze(0) - g.unsqueeze(1)
        for m, ref in (("chebyshev", diff.abs().max(dim=2)[0]), ("euclidean", torch.norm(diff, p=2, dim=2))):
            got = res[m][i]
            assert torch.equal(got.isnan()[off], ref.isnan()[off]), (m, i)
            assert torch.equal(got.isinf()[off], ref.isinf()[off]), (m, i)
            if m == "chebyshev":
                assert torch.equal(got[off].nan_to_num(), ref[off].nan_to_num()), i
            assert (got.diagonal() == 0).all()


def test_snapshots_multi_portable_build_is_bit_identical(tmp_path, monkeypatch):
    """The plain-C snapshot kernels (no AVX-512) do the same arithmetic: same bits."""
    if _native.load() is None:
        pytest.skip(f"no native build here: {_native.load_error()}")
    import platform
    if platform.machine() not in ("x86_64", "AMD64") or not _native.load().emb_has_avx512():
        pytest.skip("needs an AVX-512 x86-64 build to compare with")
    fast = {}
    hs = [snap_history(2, v, d, torch.bfloat16, seed=v + d) for (_, v, d) in SNAP_SHAPES[:7]]
    for k, h in enumerate(hs):
        fast[k] = P.pairwise_snapshots_multi(h, ["euclidean", "chebyshev", "sqeuclidean"], device="cpu")
    lib = _native.build_and_open(march="x86-64-v2", directory=tmp_path)
    assert lib.emb_has_avx512() == 0
    monkeypatch.setattr(_native, "load", lambda: lib)
    monkeypatch.setenv("EMBDIST_PAIRWISE_BACKEND", "native")
    for k, h in enumerate(hs):
        slow = P.pairwise_snapshots_multi(h, ["euclidean", "chebyshev", "sqeuclidean"], device="cpu")
        for m in slow:
            assert torch.equal(slow[m], fast[k][m]), (m, tuple(h.shape))


# ----------------------------------------------------------------------------- statistics
def numpy_upper_stats(d: np.ndarray) -> dict:
    v = np.sort(d[np.triu_indices(len(d), 1)].astype(np.float64))
    return {"n_pairs": len(v), "min": v[0], "median": v[(len(v) - 1) // 2], "mean": v.mean(),
            "max": v[-1], "zero_pairs": int((v == 0).sum())}


@settings(max_examples=40, deadline=None, derandomize=True)
@given(n=st.integers(2, 90), seed=st.integers(0, 2**31 - 1), ties=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.float64]), neg=st.booleans())
def test_upper_triangle_stats_against_numpy(n, seed, ties, dtype, neg):
    rng = np.random.default_rng(seed)
    a = rng.random((n, n)) * 3
    if ties:
        a = np.round(a, 1)                # many equal values and zeros
    if neg:
        a -= 1.5                           # general matrices: negative values, -0.0
        a[0, -1] = -0.0
    a = torch.from_numpy(a).to(dtype)
    got = P.upper_triangle_stats(a)
    ref = numpy_upper_stats(a.double().numpy())
    assert got["n_pairs"] == ref["n_pairs"] and got["zero_pairs"] == ref["zero_pairs"]
    for k in ("min", "median", "max"):
        assert got[k] == ref[k], k
    assert got["mean"] == pytest.approx(ref["mean"], rel=1e-12, abs=1e-12)
    # torch.median (the seed's call) on the gathered values agrees
    iu = torch.triu_indices(n, n, 1)
    assert got["median"] == float(a[iu[0], iu[1]].median())
    assert set(got) == {"n_pairs", "min", "median", "mean", "max", "zero_pairs"}
    assert isinstance(got["n_pairs"], int) and isinstance(got["zero_pairs"], int)


def test_upper_triangle_stats_large_block_boundaries(monkeypatch):
    from embdist.pairwise import _stats
    monkeypatch.setattr(_stats, "_ROW_BLOCK_ELEMS", 1000)
    rng = np.random.default_rng(2)
    a = rng.random((257, 257)).astype(np.float32)
    a[3, 100:200] = 0
    got = P.upper_triangle_stats(torch.from_numpy(a))
    ref = numpy_upper_stats(a)
    assert got["median"] == ref["median"] and got["zero_pairs"] == ref["zero_pairs"]
    assert got["min"] == 0 and got["max"] == ref["max"]


def test_snapshot_step_stats_against_numpy():
    rng = np.random.default_rng(4)
    d = rng.random((9, 12, 12)).astype(np.float32)
    d = (d + d.transpose(0, 2, 1)) / 2
    d[:, np.arange(12), np.arange(12)] = 0
    d[2, 1, 5] = d[2, 5, 1] = 0
    d[0] = 0
    got = P.snapshot_step_stats(torch.from_numpy(d))
    iu = np.triu_indices(12, 1)
    v = d[:, iu[0], iu[1]].astype(np.float64)
    np.testing.assert_array_equal(got["min"].numpy(), v.min(1))
    np.testing.assert_array_equal(got["max"].numpy(), v.max(1))
    np.testing.assert_allclose(got["mean"].numpy(), v.mean(1), rtol=1e-12)
    np.testing.assert_array_equal(got["zero_pairs"].numpy(), (v == 0).sum(1))
    assert got["min"].dtype == torch.float64 and got["zero_pairs"].dtype == torch.int64


# ----------------------------------------------------------------------------- helpers
class _env_backend:
    def __init__(self, name):
        self.name = name

    def __enter__(self):
        import os
        self.old = os.environ.get("EMBDIST_PAIRWISE_BACKEND")
        os.environ["EMBDIST_PAIRWISE_BACKEND"] = self.name

    def __exit__(self, *a):
        import os
        if self.old is None:
            os.environ.pop("EMBDIST_PAIRWISE_BACKEND", None)
        else:
            os.environ["EMBDIST_PAIRWISE_BACKEND"] = self.old


def test_upper_triangle_stats_both_backends_agree(backend):
    rng = np.random.default_rng(9)
    a = rng.random((300, 300)).astype(np.float32)
    a[rng.random((300, 300)) < 0.1] = 0
    a[5, 17] = -0.0
    a[7, 200] = np.float32(1e-42)
    got = P.upper_triangle_stats(torch.from_numpy(a))
    ref = numpy_upper_stats(a)
    for k in ("n_pairs", "min", "median", "max", "zero_pairs"):
        assert got[k] == ref[k], k
    assert got["mean"] == pytest.approx(ref["mean"], rel=1e-12)
    # a non-contiguous row stride (a view into a wider matrix) works too
    wide = np.zeros((300, 310), dtype=np.float32)
    wide[:, :300] = a
    got2 = P.upper_triangle_stats(torch.from_numpy(wide)[:, :300])
    assert got2 == got


def test_portable_kernels_without_avx512(tmp_path, monkeypatch):
    """The same C source built for a CPU without AVX-512 (plain-C kernels): same contract."""
    if _native.load() is None:
        pytest.skip(f"no native build here: {_native.load_error()}")
    import platform
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86-64 only")
    lib = _native.build_and_open(march="x86-64-v2", directory=tmp_path)
    assert lib.emb_has_avx512() == 0
    monkeypatch.setattr(_native, "load", lambda: lib)
    monkeypatch.setenv("EMBDIST_PAIRWISE_BACKEND", "native")
    x = _clustered(n=150, d=37)
    x32 = x.float().numpy()
    d = P.pairwise(x, "euclidean", device="cpu")
    check_contract(d, x32)
    assert rel_err(d.numpy(), squareform(pdist(x32.astype(np.float64)))) <= 2e-6
    assert torch.equal(P.pairwise(x, "chebyshev", device="cpu"), seed_chebyshev(x))
    m = P.pairwise(x, "manhattan", device="cpu").numpy()
    assert rel_err(m, squareform(pdist(x32.astype(np.float64), "cityblock"))) <= 2e-6
    h = x[:120].reshape(4, 30, 37)
    s = P.pairwise_snapshots(h, "chebyshev", device="cpu")
    assert all(torch.equal(s[i], seed_chebyshev(h[i])) for i in range(4))
    s = P.pairwise_snapshots(h, "euclidean", device="cpu")
    for i in range(4):
        check_contract(s[i], h[i].float().numpy())
    st = P.upper_triangle_stats(d)
    assert st["median"] == numpy_upper_stats(d.numpy())["median"]


@pytest.mark.parametrize("odt", [torch.float16, torch.bfloat16])
def test_snapshots_low_precision_output_is_rounded_float32(backend, odt):
    """float16/bfloat16 outputs: the float32 result rounded to nearest even, except that a
    nonzero distance never becomes 0 (smallest subnormal instead)."""
    rng = np.random.default_rng(8)
    h = rng.normal(0, 1, (6, 33, 12)) * np.array([1, 1e-4, 1e-6, 1e-8, 300, 1e4])[:, None, None]
    h[:, 3] = h[:, 2]
    h = torch.from_numpy(h.astype(np.float32))
    for metric in ("euclidean", "chebyshev"):
        s32 = P.pairwise_snapshots(h, metric, device="cpu")
        s = P.pairwise_snapshots(h, metric, out_dtype=odt, device="cpu")
        assert s.dtype == odt
        expect = s32.to(odt)
        fi = torch.finfo(odt)
        expect[(expect == 0) & (s32 != 0)] = fi.smallest_normal * fi.eps
        assert torch.equal(s.view(torch.int16), expect.view(torch.int16)), metric
        assert ((s == 0) == (s32 == 0)).all()


def test_module_boundary_is_callable():
    import embdist
    from scipy.spatial.distance import cdist as _cdist

    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(5))
    d = embdist.pairwise(x, "euclidean")
    assert d.dtype == torch.float32 and d.shape == (40, 40)
    np.testing.assert_allclose(d.numpy(), _cdist(x.double().numpy(), x.double().numpy()), rtol=2e-6, atol=0)
    # and in a fresh interpreter, where nothing has imported embdist.pairwise yet
    import subprocess
    import sys
    code = ("import embdist, torch, sys; assert 'embdist.pairwise' not in sys.modules; "
            "x = torch.tensor([[0., 0.], [3., 4.], [0., 0.]]); print(embdist.pairwise(x, 'euclidean').tolist())")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert p.stdout.strip() == "[[0.0, 5.0, 0.0], [5.0, 0.0, 5.0], [0.0, 5.0, 0.0]]"
