"""embdist.regions: planted spikes on a realistic background are recovered with their members,
a pure background gives no region, boxes wrap through +/-180 and sit on poles; the background
model, its integrals and the significance against independent references."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm, poisson

from embdist import geometry, regions


def sky_of(xyz):
    x, y, z = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    r = np.sqrt(x * x + y * y + z * z)
    return np.degrees(np.arcsin(z / r)), np.degrees(np.arctan2(y, x)), r


def background(n, seed):
    """A realistic sky: an anisotropic Gaussian cloud off the origin (embeddings are projected
    uncentred), so the density of directions varies by a factor of several over the sky."""
    rng = np.random.default_rng(seed)
    return rng.normal(0, 1, (n, 3)) * np.array([1.0, 0.75, 0.55]) + np.array([0.35, -0.2, 0.15])


def spike(n, lat, lon, spread_deg, r0, r_spread, seed):
    rng = np.random.default_rng(seed)
    c = regions.unit_vectors(lat, lon)
    e1, e2 = regions._tangent_frame(c[None])
    t = rng.normal(0, math.radians(spread_deg), (n, 2))
    u = c + t[:, :1] * e1 + t[:, 1:] * e2
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    return u * rng.normal(r0, r_spread, (n, 1))


def inside(lat, lon, r, b):
    """Independent membership test of a box (lon_min > lon_max wraps)."""
    lon_ok = (lon >= b["lon_min"]) & (lon <= b["lon_max"]) if b["lon_min"] <= b["lon_max"] \
        else (lon >= b["lon_min"]) | (lon <= b["lon_max"])
    return (lat >= b["lat_min"]) & (lat <= b["lat_max"]) & lon_ok & (r >= b["r_min"]) & (r <= b["r_max"])


SPIKES = {  # name: (size, lat, lon, spread, r0, r spread)
    "small": (400, 30.0, 60.0, 0.7, 1.0, 0.01),
    "wrap": (300, -20.0, 179.5, 1.5, 1.3, 0.02),
    "pole": (250, 88.5, 0.0, 1.2, 0.8, 0.01),
    "wide": (1500, -45.0, -100.0, 4.0, 1.6, 0.03),
}


@pytest.fixture(scope="module")
def planted():
    parts = [background(60_000, 1)]
    labels = [np.full(60_000, -1)]
    for k, (size, lat, lon, spread, r0, rs) in enumerate(SPIKES.values()):
        parts.append(spike(size, lat, lon, spread, r0, rs, 10 + k))
        labels.append(np.full(size, k))
    xyz = np.concatenate(parts)
    lab = np.concatenate(labels)
    perm = np.random.default_rng(5).permutation(len(xyz))
    xyz, lab = xyz[perm], lab[perm]
    lat, lon, r = sky_of(xyz)
    return lat, lon, r, lab, regions.detect(lat, lon, r)


def test_planted_spikes_recovered_with_their_members(planted):
    lat, lon, r, lab, found = planted
    assert [g.rank for g in found] == list(range(1, len(found) + 1))
    assert all(a.excess >= b.excess for a, b in zip(found, found[1:]))  # ranked by excess
    matched = {}
    for k, name in enumerate(SPIKES):
        members = np.flatnonzero(lab == k)
        best = max(found, key=lambda g: np.isin(members, g.members).sum())
        box = best.box()
        held = inside(lat[members], lon[members], r[members], box).mean()
        assert held >= 0.95, (name, held, box)
        # the region's members are exactly the rows in its box, counted independently
        assert np.array_equal(np.flatnonzero(inside(lat, lon, r, box)), best.members)
        # few strangers: no more than the background expected there plus 5 sigma
        strangers = int((lab[best.members] != k).sum())
        assert strangers <= best.expected + 5 * math.sqrt(best.expected) + 5, (name, strangers, best.expected)
        assert best.significance >= 5
        matched[name] = best
    assert len({id(g) for g in matched.values()}) == len(SPIKES)  # one region per spike
    w, p = matched["wrap"], matched["pole"]
    assert w.lon_min > w.lon_max  # through +/-180
    assert p.lat_max == 90.0 and (p.lon_min, p.lon_max) == (-180.0, 180.0)
    # compact in r: the box's r range is near the spike's, not the background's
    for name, g in matched.items():
        r0, rs = SPIKES[name][4], SPIKES[name][5]
        assert r0 - 6 * rs <= g.r_min and g.r_max <= r0 + 6 * rs, (name, g.r_min, g.r_max)


def test_region_numbers_against_independent_references(planted):
    lat, lon, r, lab, found = planted
    for g in found:
        # significance: exact Poisson tail from scipy, as a one-sided Gaussian sigma
        p = poisson.sf(g.tokens - 1, g.expected)
        ref = norm.isf(p) if p > 1e-290 else math.sqrt(2 * (g.tokens * math.log(g.tokens / g.expected) - g.tokens + g.expected))
        assert g.significance == pytest.approx(ref, rel=1e-6, abs=1e-6)
        assert g.tokens == int(inside(lat, lon, r, g.box()).sum())


def test_pure_background_has_no_region():
    for seed in (2, 3):
        lat, lon, r = sky_of(background(60_000, seed))
        assert regions.detect(lat, lon, r) == []
    u = np.random.default_rng(4).normal(size=(30_000, 3))  # isotropic too
    lat, lon, r = sky_of(u)
    assert regions.detect(lat, lon, r) == []


def test_background_fit_and_integrals():
    # A known log-linear intensity: sample it by rejection and refit.
    rng = np.random.default_rng(0)
    q = rng.normal(size=(600_000, 3))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    f_true = np.exp(1.2 * q[:, 0] - 0.8 * q[:, 2] ** 2 + 0.5 * q[:, 1] * q[:, 2])
    keep = rng.random(len(q)) < f_true / f_true.max()
    u = q[keep][:120_000]
    bg = regions.Background(6).fit(u)
    # the ML fit integrates to the number of points (the constant lies in the span)
    mc = rng.normal(size=(200_000, 3))
    mc /= np.linalg.norm(mc, axis=1, keepdims=True)
    assert 4 * math.pi * bg.intensity(mc).mean() == pytest.approx(len(u), rel=5e-3)
    # shape: the fitted intensity follows the true one (normalised to the same total)
    f_mc = np.exp(1.2 * mc[:, 0] - 0.8 * mc[:, 2] ** 2 + 0.5 * mc[:, 1] * mc[:, 2])
    ratio = bg.intensity(mc) / (f_mc * len(u) / (4 * math.pi * f_mc.mean()))
    assert np.percentile(np.abs(ratio - 1), 95) < 0.07  # statistical noise of 49 coefficients: ~2 % rms
    # box and cap integrals against Monte Carlo integration of the same intensity: uniform
    # points drawn inside the box (lon uniform, sin lat uniform) or the cap (cos uniform)
    for box in ({"lat_min": 10, "lat_max": 40, "lon_min": 20, "lon_max": 70},
                {"lat_min": -30, "lat_max": -5, "lon_min": 160, "lon_max": -150},  # wraps
                {"lat_min": 70, "lat_max": 90, "lon_min": -180, "lon_max": 180}):  # pole
        full = {**box, "r_min": 0, "r_max": math.inf}
        width = (box["lon_max"] - box["lon_min"]) % 360 or 360
        lo = box["lon_min"] + width * rng.random(200_000)
        sl = rng.uniform(math.sin(math.radians(box["lat_min"])), math.sin(math.radians(box["lat_max"])), 200_000)
        area = math.radians(width) * (math.sin(math.radians(box["lat_max"])) - math.sin(math.radians(box["lat_min"])))
        assert regions.box_area(full) == pytest.approx(area, rel=1e-12)
        pts = regions.unit_vectors(np.degrees(np.arcsin(sl)), lo)
        assert bg.in_box(full) == pytest.approx(area * bg.intensity(pts).mean(), rel=2e-3)
    c = regions.unit_vectors(20.0, 30.0)
    e1, e2 = regions._tangent_frame(c[None])
    for theta in (2.0, 10.0):
        cz = rng.uniform(math.cos(math.radians(theta)), 1, 200_000)
        phi = rng.uniform(0, 2 * math.pi, 200_000)
        sz = np.sqrt(1 - cz**2)[:, None]
        pts = cz[:, None] * c + sz * (np.cos(phi)[:, None] * e1 + np.sin(phi)[:, None] * e2)
        ref = regions.cap_area(theta) * bg.intensity(pts).mean()
        assert regions.cap_area(theta) == pytest.approx(2 * math.pi * (1 - math.cos(math.radians(theta))))
        assert bg.in_caps(c[None], theta)[0] == pytest.approx(ref, rel=2e-3)


def test_in_box_wraps_and_poles():
    lat = torch.tensor([0.0, 0.0, 0.0, 0.0, 89.0, 10.0], dtype=torch.float64)
    lon = torch.tensor([179.0, -179.0, 0.0, 170.0, 45.0, -180.0], dtype=torch.float64)
    r = torch.ones(6, dtype=torch.float64)
    sky = geometry.Sky(lon, lon, lat, r, lat, lon)
    wrap = dict(lat_min=-10, lat_max=15, lon_min=175, lon_max=-175, r_min=0, r_max=2)
    assert geometry.in_box(sky, **wrap).tolist() == [True, True, False, False, False, True]
    plain = dict(lat_min=-10, lat_max=15, lon_min=-175, lon_max=175, r_min=0, r_max=2)
    assert geometry.in_box(sky, **plain).tolist() == [False, False, True, True, False, False]
    pole = dict(lat_min=80, lat_max=90, lon_min=-180, lon_max=180, r_min=0, r_max=2)
    assert geometry.in_box(sky, **pole).tolist() == [False] * 4 + [True, False]
    assert regions.in_box(lat.numpy(), lon.numpy(), r.numpy(), wrap).tolist() == geometry.in_box(sky, **wrap).tolist()


def test_bbox_config_accepts_wrapping_longitudes():
    from embdist.config import BBoxConfig
    from embdist.sources import InputError

    b = BBoxConfig(lon_min=170, lon_max=-170)
    assert b.lon_min > b.lon_max
    with pytest.raises(InputError, match="lat_min"):
        BBoxConfig(lat_min=10, lat_max=5)
    with pytest.raises(InputError, match="bbox.region=0"):
        BBoxConfig(region=0)


def test_override_line_rounds_outwards():
    b = regions.outward({"lat_min": 10.123456, "lat_max": 20.000001, "lon_min": 170.55555, "lon_max": -170.44444,
                         "r_min": 0.3333339, "r_max": 0.5000001})
    assert b == {"lat_min": 10.1234, "lat_max": 20.0001, "lon_min": 170.5555, "lon_max": -170.4444,
                 "r_min": 0.333333, "r_max": 0.500001}
    assert regions.override_line(b) == ("bbox.lat_min=10.1234 bbox.lat_max=20.0001 bbox.lon_min=170.5555 "
                                        "bbox.lon_max=-170.4444 bbox.r_min=0.333333 bbox.r_max=0.500001")


def test_crowded_sky_with_a_pile_on_the_far_side():
    """Qwen-like rows (an offset plus noise) crowd the sky into ~10 degrees, where a core's
    neighbour counts would be near N^2 and an unregularised background fit overflows; a pile
    of identical rows on the far side (the collapsed tokens) is the first region, exactly."""
    rng = np.random.default_rng(4)
    blob = rng.normal(0, 0.06, (80_000, 3)) + np.array([1.0, 0.0, 0.0])
    pile = np.repeat(np.array([[-0.35, 0.02, 0.01]]), 2_000, 0)
    xyz = np.concatenate([blob, pile])
    lat, lon, r = sky_of(xyz)
    found = regions.detect(lat, lon, r)
    assert found and np.array_equal(found[0].members, np.arange(80_000, 82_000))
    assert found[0].significance > 50


@pytest.mark.parametrize("pile, iterations", [(15_000, 2), (40_000, 3)])
def test_a_pile_of_identical_rows_leaves_no_false_region(pile, iterations):
    """A pile of identical rows (13 % of the sky; or 28 %, with a third background fit)
    distorts the first background fit; the refit with the regions masked leaves the pile and
    the planted spike, and nothing else."""
    xyz = np.concatenate([background(100_000, 1), np.repeat(spike(1, 20.0, 100.0, 0.0, 1.0, 0.0, 7), pile, 0),
                          spike(500, -30.0, -60.0, 0.7, 1.2, 0.01, 8)])
    lat, lon, r = sky_of(xyz)
    found = regions.detect(lat, lon, r, iterations=iterations)
    assert np.array_equal(found[0].members, np.arange(100_000, 100_000 + pile))
    assert len(found) == 2 and np.isin(np.arange(100_000 + pile, 100_500 + pile), found[1].members).mean() >= 0.95
