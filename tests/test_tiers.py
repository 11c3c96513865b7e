"""Kernel tiers (avx512, avx2, neon, portable, torch): selection, the engine's contract on every
tier this CPU runs, agreement between tiers (Chebyshev bit for bit, equal zero sets, Euclidean
within the contract, equal kNN ids in the vocab stream), and builds with gcc and clang."""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from embdist import pairwise as P
from embdist.pairwise import _native
from embdist.pairwise import stream as S

TIERS = _native.available_tiers()


def _input_error():
    try:
        from embdist.errors import InputError
    except ImportError:
        from embdist.sources import InputError
    return InputError


@pytest.fixture
def restore_tier():
    yield
    with _native._lock:
        _native._choice = None
        _native._tried = False


def planted(n=150, d=70, seed=0) -> torch.Tensor:
    """bf16-valued rows with duplicate groups, rows one bf16 step apart, a -0.0/+0.0 pair and
    subnormal rows (identical, and one subnormal step apart)."""
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.normal(0, 0.05, (n, d)).astype(np.float32)).bfloat16().float()
    x[10] = x[3]
    x[11] = x[3]
    x[20] = x[7]
    x[30] = x[5]
    b = x[30].bfloat16().view(torch.int16).clone()
    b[4] += 1                                               # one bf16 step
    x[30] = b.view(torch.bfloat16).float()
    x[40] = 0.0
    x[41] = -0.0
    sub = torch.from_numpy(rng.normal(0, 1e-39, d).astype(np.float32))
    x[50] = sub
    x[51] = sub
    s2 = sub.clone().view(torch.int32)
    s2[0] += 1                                              # one subnormal step
    x[52] = s2.view(torch.float32)
    return x


def identical(x: torch.Tensor) -> np.ndarray:
    a = (x + 0.0).numpy()
    return (a[:, None, :] == a[None, :, :]).all(-1)


def rel_err(got, ref) -> float:
    m = ref > 0
    return float((np.abs(got[m] - ref[m]) / ref[m]).max()) if m.any() else 0.0


@pytest.fixture(scope="module")
def per_tier():
    """Results of every tier this CPU runs, on the same inputs."""
    x = planted()
    h = x[:140].reshape(4, 35, 70).bfloat16()
    res = {}
    try:
        for t in TIERS:
            assert P.use_kernels(t) == t and P.active_kernels() == t
            r = {"euclidean": P.pairwise(x, "euclidean", device="cpu"),
                 "chebyshev": P.pairwise(x, "chebyshev", device="cpu"),
                 "manhattan": P.pairwise(x, "manhattan", device="cpu"),
                 "sqeuclidean": P.pairwise(x, "sqeuclidean", device="cpu"),
                 "cosine": P.pairwise(x, "cosine", device="cpu"),
                 "snap": P.pairwise_snapshots_multi(h, ["euclidean", "chebyshev"], device="cpu")}
            v = S.vocab_stats(x.bfloat16(), "euclidean", k=5, bins=64)
            r["knn"] = v.knn_ids
            r["knn_cheb"] = S.vocab_stats(x.bfloat16(), "chebyshev", k=5, bins=64).knn_ids
            res[t] = r
    finally:
        with _native._lock:
            _native._choice = None
            _native._tried = False
    return x, h, res


def test_this_cpu_runs_the_expected_tiers():
    assert TIERS[-1] == "portable"
    if _native.machine() == "x86_64" and {"avx2", "fma", "f16c"} <= _native.cpu_features():
        assert "avx2" in TIERS
    assert P.active_kernels() in TIERS + ["torch"]


def test_every_tier_meets_the_contract(per_tier):
    x, h, res = per_tier
    x64 = x.double().numpy()
    ref = cdist(x64, x64)
    ident = identical(x)
    seed_cheb = (x[:, None, :] - x[None, :, :]).abs().max(dim=2)[0]
    for t, r in res.items():
        e = r["euclidean"].numpy()
        assert rel_err(e, ref) <= 2e-6, t
        assert np.array_equal(e == 0, ident), t
        assert np.array_equal(e, e.T) and (np.diag(e) == 0).all(), t
        assert torch.equal(r["chebyshev"], seed_cheb), t
        assert rel_err(r["manhattan"].numpy(), cdist(x64, x64, "cityblock")) <= 2e-6, t
        sq = r["sqeuclidean"].numpy()           # (the planted subnormal rows' d^2 underflow float32)
        fin = ref ** 2 > 2.0 ** -120
        assert rel_err(np.where(fin, sq, 0), np.where(fin, ref ** 2, 0)) <= 4e-6, t
        assert np.array_equal(sq == 0, ident), t
        cos = r["cosine"].numpy()               # rows 40 and 41 are zero vectors: 1 to all others
        nz = np.linalg.norm(x64, axis=1) > 0
        np.testing.assert_allclose(cos[np.ix_(nz, nz)], np.clip(cdist(x64[nz], x64[nz], "cosine"), 0, 2),
                                   rtol=4e-6, atol=3e-7, err_msg=t)
        assert (cos[np.ix_(~nz, nz)] == 1).all() and (cos[np.ix_(~nz, ~nz)] == 0).all(), t
        assert np.array_equal(cos, cos.T) and (cos[ident] == 0).all(), t
        for i in range(h.shape[0]):
            hi = h[i].float()
            assert torch.equal(r["snap"]["chebyshev"][i], (hi[:, None] - hi[None]).abs().max(dim=2)[0]), t
            s64 = cdist(hi.double().numpy(), hi.double().numpy())
            assert rel_err(r["snap"]["euclidean"][i].numpy(), s64) <= 2e-6, t
            assert np.array_equal(r["snap"]["euclidean"][i].numpy() == 0, identical(hi)), t


def test_tiers_agree(per_tier):
    x, h, res = per_tier
    base = res[TIERS[0]]
    for t, r in res.items():
        assert torch.equal(r["chebyshev"], base["chebyshev"]), t
        assert torch.equal(r["manhattan"], base["manhattan"]), t
        assert torch.equal(r["euclidean"] == 0, base["euclidean"] == 0), t
        assert rel_err(r["euclidean"].numpy(), base["euclidean"].double().numpy()) <= 4e-6, t
        for m in ("euclidean", "chebyshev"):          # snapshots: the same bits on every tier
            assert torch.equal(r["snap"][m], base["snap"][m]), (t, m)
        assert np.array_equal(r["knn"], base["knn"]), t
        assert np.array_equal(r["knn_cheb"], base["knn_cheb"]), t


def test_use_kernels_validates(restore_tier):
    err = _input_error()
    with pytest.raises(err, match="not a kernel tier") as e:
        P.use_kernels("sse9")
    assert "\n" not in str(e.value)
    other = "neon" if _native.machine() == "x86_64" else "avx2"
    with pytest.raises(err) as e:
        P.use_kernels(other)
    assert "\n" not in str(e.value) and other in str(e.value)
    assert P.use_kernels("auto") == TIERS[0]
    assert P.use_kernels("torch") == "torch" and P.active_kernels() == "torch"
    x = planted(60, 9)
    d = P.pairwise(x, "euclidean", device="cpu")            # the torch path still meets the contract
    assert np.array_equal(d.numpy() == 0, identical(x))
    assert rel_err(d.numpy(), cdist(x.double().numpy(), x.double().numpy())) <= 2e-6


def test_environment_variable_selects_the_tier():
    env = dict(os.environ, EMBDIST_KERNELS="portable")
    code = "from embdist import pairwise as P; print(P.active_kernels())"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == "portable"
    env["EMBDIST_KERNELS"] = "bogus"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode != 0 and "InputError" in p.stderr and "bogus" in p.stderr


def test_cpu_detection_without_proc(monkeypatch):
    """Where /proc does not exist (macOS, BSD) detection falls back without failing."""
    import builtins
    real_open = builtins.open

    def no_proc(path, *a, **k):
        if str(path).startswith("/proc"):
            raise FileNotFoundError(path)
        return real_open(path, *a, **k)

    expected = None         # the best x86 tier by this machine's own /proc/cpuinfo flags, read here
    if platform.machine().lower() in ("x86_64", "amd64") and os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            flags = set(next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), []))
        expected = ("avx512" if {"avx512f", "avx512dq", "avx512bw", "avx512vl"} <= flags
                    else "avx2" if {"avx2", "fma", "f16c"} <= flags else "portable")
    monkeypatch.setattr(builtins, "open", no_proc)
    _native.cpu_features.cache_clear()
    try:
        feats = _native.cpu_features()
        assert isinstance(feats, frozenset)
        tiers = _native.available_tiers()
        assert tiers[-1] == "portable"
        # on x86-64 without /proc: torch's CPUID level, the same best tier (unless the
        # environment lowers torch's level on purpose)
        if expected is not None and not os.environ.get("ATEN_CPU_CAPABILITY"):
            assert tiers[0] == expected, (tiers, expected)
    finally:
        monkeypatch.undo()
        _native.cpu_features.cache_clear()


@pytest.mark.parametrize("cc", ["gcc", "clang"])
def test_tiers_build_and_pass_with_gcc_and_clang(cc, tmp_path, monkeypatch):
    if shutil.which(cc) is None:
        pytest.skip(f"{cc} not installed (Debian package {cc})")
    x = planted(90, 37, seed=3)
    x64 = x.double().numpy()
    ident = identical(x)
    cheb = None
    for t in TIERS:
        lib = _native.build_and_open(tier=t, cc=cc)          # the per-user cache (keyed by compiler)
        assert lib.embdist_tier == t
        monkeypatch.setattr(_native, "load", lambda lib=lib: lib)
        monkeypatch.setenv("EMBDIST_PAIRWISE_BACKEND", "native")
        e = P.pairwise(x, "euclidean", device="cpu").numpy()
        assert rel_err(e, cdist(x64, x64)) <= 2e-6, (cc, t)
        assert np.array_equal(e == 0, ident), (cc, t)
        c = P.pairwise(x, "chebyshev", device="cpu")
        assert cheb is None or torch.equal(c, cheb), (cc, t)
        cheb = c


def test_row_hash_and_nan_rows_match_their_reference_formulas():
    """rows.hash_rows (one np.dot pass) equals the elementwise sum of words x weights mod 2^64,
    and rows._nan_rows (row sums name candidates) equals isnan().any(-1), on every float dtype."""
    import numpy as np
    import torch
    from embdist import rows
    rng = np.random.default_rng(1)
    for shape, dt in [((100, 64), np.uint64), ((7, 5, 33), np.uint32), ((50, 3), np.uint16), ((9, 1), np.uint8)]:
        b = rng.integers(0, np.iinfo(dt).max, size=shape, dtype=dt, endpoint=True)
        w = (np.random.default_rng(rows._SEED).integers(1, 2**63 - 1, size=shape[-1], dtype=np.uint64)
             * np.uint64(2) + np.uint64(1))
        with np.errstate(over="ignore"):
            ref = (b.astype(np.uint64) * w).sum(axis=-1, dtype=np.uint64)
        assert np.array_equal(rows.hash_rows(b), ref)
    g = torch.Generator().manual_seed(0)
    for shape in [(100, 7), (4, 30, 5), (1, 1), (300, 50)]:
        for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            x = torch.randn(*shape, generator=g).to(dt)
            f = x.reshape(-1)
            for v in (float("nan"), float("inf"), -float("inf")):
                f[torch.randint(0, f.numel(), (3,), generator=g)] = v
            assert np.array_equal(rows._nan_rows(x), x.isnan().reshape(shape[:-1] + (-1,)).any(-1).numpy())


@pytest.mark.parametrize("tier", TIERS)
def test_centring_scale_matches_a_float32_brute_force(tier, restore_tier):
    """The engine's centring (one pass: column sums, mins and maxes) gives the column means and
    max |fl(x - mu)| of a float32 brute force over every element, NaN ignored, inf included."""
    from embdist.pairwise import _cpu
    P.use_kernels(tier)
    lib = _native.load()
    rng = np.random.default_rng(7)
    for trial in range(24):
        n, d = int(rng.integers(1, 200)), int(rng.integers(1, 70))
        a = rng.normal(0, 10.0 ** int(rng.integers(-30, 30)), (n, d)).astype(np.float32)
        if trial % 3 == 1:
            for _ in range(3):
                a[rng.integers(n), rng.integers(d)] = rng.choice([np.nan, np.inf, -np.inf])
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.from_numpy(a).to(dt).contiguous()
            mu, mx = _cpu.centre(lib, x)
            xf = x.float().numpy()
            with np.errstate(all="ignore"):
                ref_mu = (xf.astype(np.float64).sum(0) / n).astype(np.float32)
                ref = float(np.fmax.reduce(np.abs(xf - ref_mu).ravel(), initial=0.0))
            assert np.array_equal(mu.numpy(), ref_mu, equal_nan=True), (tier, trial, dt)
            assert mx == ref or (np.isnan(mx) and np.isnan(ref)), (tier, trial, dt, mx, ref)


@pytest.mark.parametrize("tier", TIERS)
def test_half_inputs_read_as_stored_equal_their_float32_copy(tier, restore_tier):
    """The native path reads bf16 / fp16 as stored (no float32 copy): every metric gives the
    bits of the same values passed as float32."""
    P.use_kernels(tier)
    x = planted(90, 37)
    for dt in (torch.bfloat16, torch.float16):
        xh = x.to(dt)
        for m in ("euclidean", "sqeuclidean", "cosine", "chebyshev", "manhattan"):
            assert torch.equal(P.pairwise(xh, m, device="cpu"), P.pairwise(xh.float(), m, device="cpu")), (tier, dt, m)
