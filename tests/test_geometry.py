"""geometry against an independent float64 numpy reference (SVD-based PCA, direct trig)."""
import numpy as np
import pytest
import torch

from embdist import geometry


def numpy_pca(w: np.ndarray):
    """PCA via SVD of the centred matrix in float64: eigenvalues s²/N, eigenvectors = Vᵀ rows."""
    c = w - w.mean(0)
    _, s, vt = np.linalg.svd(c, full_matrices=False)
    return s**2 / len(w), vt.T


def test_pca_matches_float64_svd():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(500, 12)) * np.linspace(3, 0.2, 12) + 0.5
    p = geometry.pca(torch.from_numpy(w.astype(np.float32)))
    evals, evecs = numpy_pca(w.astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(p.eigenvalues.numpy(), evals, rtol=1e-9)
    # Same axes up to sign, and the sign is the documented one: largest |loading| positive.
    for k in range(12):
        v = p.eigenvectors[:, k].numpy()
        assert abs(abs(v @ evecs[:, k]) - 1) < 1e-9
        assert v[np.argmax(np.abs(v))] > 0


def test_sign_convention_is_independent_of_eigh_signs():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    flipped = q * np.array([1, -1, 1, -1, -1, 1])
    a = geometry.fix_signs(torch.from_numpy(q))
    b = geometry.fix_signs(torch.from_numpy(flipped))
    assert torch.equal(a, b)


def test_pc_vector_signed_and_range():
    p = geometry.pca(torch.randn(100, 5, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(geometry.pc_vector(p, -2), -p.eigenvectors[:, 1])
    for bad in (0, 6, -6):
        with pytest.raises(ValueError):
            geometry.pc_vector(p, bad)


def test_sky_coordinates_match_direct_trig():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(400, 10))
    p = geometry.pca(torch.from_numpy(w))
    north, meridian, equinox = (geometry.pc_vector(p, k) for k in (2, 1, -3))
    s = geometry.sky_coordinates(torch.from_numpy(w), north, meridian, equinox)
    x, y, z = w @ meridian.numpy(), w @ equinox.numpy(), w @ north.numpy()
    r = np.sqrt(x**2 + y**2 + z**2)
    np.testing.assert_allclose(s.r.numpy(), r, rtol=1e-12)
    np.testing.assert_allclose(s.lat.numpy(), np.degrees(np.arcsin(z / r)), atol=1e-9)
    np.testing.assert_allclose(s.lon.numpy(), np.degrees(np.arctan2(y, x)), atol=1e-9)


def test_box_is_inclusive_and_zero_rows_do_not_nan():
    s = geometry.Sky(*(torch.tensor(v, dtype=torch.float64) for v in (
        [1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0])))
    mask = geometry.in_box(s, lat_min=0, lat_max=0, lon_min=0, lon_max=0, r_min=0, r_max=1)
    assert mask.tolist() == [True, True]
    w = torch.zeros(3, 4, dtype=torch.float64)
    e = torch.eye(4, dtype=torch.float64)
    sky = geometry.sky_coordinates(w, e[2], e[0], e[1])
    assert not torch.isnan(sky.lat).any() and not torch.isnan(sky.lon).any()
