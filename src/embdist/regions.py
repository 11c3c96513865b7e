"""Over-dense regions of the PCA sky, found without a hand-picked box.

Input: the sky coordinates of every row (``embdist.geometry.Sky``: lat, lon, r). Output: a list
of :class:`Region`, ranked by excess over a smooth background, each with the box
(``lat_min .. r_max``) that holds its core, the tokens in that box, the background tokens
expected there, and a Poisson significance.

Method, and why
---------------
The question is a counting one: does a patch of sky hold more tokens than the smooth
background predicts?  So the method is a matched-filter count on the sphere against an
explicit background model, with a Poisson significance, rather than a clustering:

1. **Smooth background.** Token directions u = (x, y, z) / r are modelled as an
   inhomogeneous Poisson process on the sphere with intensity f(u) = exp(sum_k a_k B_k(u)),
   B_k spanning all spherical harmonics of degree <= ``degree`` (6 by default: structure
   wider than about 180/6 = 30 degrees is background).  The fit is the Poisson maximum
   likelihood (Newton on a Fibonacci-lattice quadrature of the sphere), so the background
   follows the strongly anisotropic sky of a real (or Gaussian) embedding cloud: a
   non-parametric background (an annulus, a wide smoothing kernel) is biased by the curvature
   of that density by tens of percent at scales of ten degrees, which a Gaussian cloud alone
   turns into "detections".  The fit is repeated with the detected regions masked out, so
   a spike does not raise its own background (``iterations`` fits in all, 2 by default,
   fewer when the regions no longer change).  A pile of identical rows holding a large share
   of the sky distorts the first fit enough to leave wide, weaker false regions after two fits
   (seen from ~15 % of the rows of a 60,000-row sky; 13 % of a 100,000-row sky is clean);
   a third fit removed them at 28 % of a 100,000-row sky (``iterations=3``; tests/test_regions.py),
   not at 40 % of a 100,000-row one.
2. **Matched filter at every scale.** For aperture radii ``scales`` (1 to 16 degrees, a
   factor ~1.5 apart) spherical caps are centred on a Fibonacci lattice whose spacing is a
   third of the radius (so any spike lies near a centre).  The tokens in each cap are counted
   with a KD-tree on the unit vectors (exact, O(N log N), no N^2 work); the background
   expected in the cap is its area times the mean intensity (cubature on a ring at radius
   rho / sqrt 2, exact to third order).  Working on 3-D unit vectors, not on a lat/lon grid,
   a cap straddling +/-180 degrees or sitting on a pole is counted like any other
   (equal area everywhere, no pixel singularity).
3. **Poisson significance.**  The probability of at least n tokens where b are expected,
   P(N >= n | b), as a one-sided Gaussian sigma (the likelihood-ratio form
   sqrt(2 (n ln(n/b) - n + b)) where the tail underflows).  A spike is most significant at the
   aperture that matches its size, which is how the scale is chosen.  About 2e4 independent
   apertures are tried over all scales, so the default threshold of 5 sigma (local p = 2.9e-7)
   leaves a pure background with one false region in a few hundred surveys.
4. **Regions.** The most significant aperture becomes a region; apertures whose centre lies
   within the larger of the two radii, or inside its box, are suppressed (one region per
   place), and so on down the list (an aperture that yields no acceptable region suppresses
   nothing).
   Its r range is the interval (between quantiles of the cap's r values) where the excess
   is most significant against the r distribution of the tokens around the cap (an annulus
   of 1.5 to 3 radii): this makes the region compact in r.  Its box is the extent of the
   tokens in the cap and that r range; longitudes are measured from the centre, so a box can
   wrap through +/-180 (``lon_min > lon_max``, as GeoJSON) and a core that holds a pole gets
   ``lon -180..180`` up to that pole.  A region must be compact in r: at most
   ``max_r_fraction`` (one half) of the tokens around it may share its most significant r
   interval; wide angular
   structure of the sky that spans every r is background, not a region.  The tokens, the expected background and the
   significance reported are those of the box itself (the background integrated over the
   box, times the fraction of the surroundings' tokens in the box's r range).
5. Ranked by excess (tokens - expected), those at or above ``min_significance`` and with at
   least ``min_excess`` excess tokens are kept.

Work: O(N log N), with a bounded constant, whatever the sky
-----------------------------------------------------------
A real vocabulary's sky can be crowded: Qwen-like rows (a common offset plus noise) put
150,000 directions inside 20 degrees, where a 2-degree neighbourhood holds thousands of
tokens.  Every step is kept at O(N log N) or O(N x small):

* cap counts (step 2): each token falls in ~28 caps per scale (the lattice spacing is a third
  of the radius), so counting is O(N x scales) tree work, however crowded the sky;
* the background fit is on 20,000 quadrature points plus one O(N x 49) pass over the tokens;
  a small ridge (1e-3 x tokens) on its non-constant coefficients keeps it finite on a sky
  crowded into a few degrees, where the unpenalised optimum needs a log-intensity range of
  thousands (on an ordinary sky the coefficients are O(1) and the ridge moves them by ~1e-3);
* a crowded sky has hundreds of significant apertures on wide structure spanning every r.
  Each candidate is first screened for compactness in r (step 4) on a fixed random subsample
  of at most 32,768 rows (``_Screen``: the cap's and annulus' r values thinned with the
  background, O(subsample) per candidate), and only those that pass are examined on every row
  and count against the ``3 x max_regions`` candidates tried;
* a core's per-token neighbour counts (the quadratic step: a crowded 2-degree neighbourhood
  times every token in it) are bounded at ~200 neighbour visits per token (``_dense``): above
  that the neighbours are counted in a Bernoulli subsample of fraction f and tested against
  f x the background.  A thinned Poisson process is Poisson with f times the intensity, so the
  test keeps its false-positive rate exactly and loses only power, which at ~200 expected
  neighbours is ample for a clump several times denser than its surroundings.  Below 5e6
  visits in all (MiniLM, the tests) every neighbour is counted, as before.  Friends-of-friends
  linking uses each token's 12 nearest neighbours (memory ~12 n).

Why not HDBSCAN on the 3-D points: it finds clumps but neither says how many tokens a smooth
background would put there nor how unlikely the clump is, and its min_cluster_size is a scale
of its own; the 3-D density of an embedding cloud also falls steeply with r, which a density
clustering reads as structure.  Why not HEALPix: it needs healpy/astropy (large dependencies)
for what a KD-tree count of caps on a quasi-uniform lattice does as well here.  The sphere
tools, the background model and the significance are in ``embdist.skymodel``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree
from threadpoolctl import threadpool_limits

from embdist.skymodel import (  # noqa: F401  (re-exported: the sphere tools of a region)
    Background, _tangent_frame, box_area, cap_area, chord, fibonacci_sphere, in_box, lat_lon,
    poisson_significance, unit_vectors,
)

DEFAULT_SCALES = (1.0, 1.5, 2.25, 3.4, 5.0, 7.5, 11.0, 16.0)
NEIGHBOUR_BUDGET = 200.0  # neighbour visits per point when a core's neighbourhoods are counted
SCREEN_ROWS = 32_768  # rows of the subsample on which candidates are screened for compactness in r
NEIGHBOUR_FLOOR = 5e6  # below this many visits in all, every neighbour is counted (no subsample)
BOX_KEYS = ("lat_min", "lat_max", "lon_min", "lon_max", "r_min", "r_max")


@dataclass
class Region:
    rank: int
    lat_min: float
    lat_max: float
    lon_min: float
    lon_max: float
    r_min: float
    r_max: float
    tokens: int  # rows inside the box
    expected: float  # background rows expected inside the box
    significance: float  # Poisson, one-sided Gaussian sigma
    centre_lat: float
    centre_lon: float
    scale_deg: float  # aperture radius that detected it
    radius_deg: float  # angular radius of the core around the centre
    r_fraction: float  # share of the surrounding tokens in the region's most significant r interval (compactness in r)
    members: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, np.int64))  # row indices in the box

    @property
    def excess(self) -> float:
        return self.tokens - self.expected

    def box(self) -> dict:
        return {k: float(getattr(self, k)) for k in BOX_KEYS}

    def override(self) -> str:
        return override_line(self.box())


def override_line(box: dict) -> str:
    """The command-line overrides that select a box: ``bbox.lat_min=… … bbox.r_max=…``."""
    return " ".join(f"bbox.{k}={_num(box[k])}" for k in BOX_KEYS)


def _num(v: float) -> str:
    if math.isinf(v):
        return ".inf" if v > 0 else "-.inf"
    return f"{v:.12g}"


def outward(box: dict) -> dict:
    """The box rounded outwards to 1e-4 degree and 1e-6 in r, so its printed numbers hold
    every token the exact box holds (a wrapping box stays wrapping)."""
    d, e = 1e4, 1e-6
    out = {"lat_min": max(-90.0, math.floor(box["lat_min"] * d) / d), "lat_max": min(90.0, math.ceil(box["lat_max"] * d) / d),
           "lon_min": max(-180.0, math.floor(box["lon_min"] * d) / d), "lon_max": min(180.0, math.ceil(box["lon_max"] * d) / d),
           "r_min": max(0.0, math.floor(box["r_min"] / e) * e), "r_max": math.ceil(box["r_max"] / e) * e}
    return {k: float(f"{v:.12g}") for k, v in out.items()}


# ------------------------------------------------------------------------------------ survey

def detect(lat, lon, r, **options) -> list[Region]:
    """Over-dense regions of a sky, ranked by excess over the smooth background (see module doc).

    Options: ``scales`` (aperture radii, degrees), ``degree`` (of the background), ``min_significance``
    (sigma), ``min_excess`` (tokens), ``max_regions``, ``max_r_fraction``, ``iterations`` (at most this
    many background fits, each with the previous fit's regions masked; stops when the regions no
    longer change), ``core_significance`` (sigma of a core token's neighbourhood).
    """
    # The matrix products here are small (N x 49): one BLAS thread is as fast, and OpenBLAS's
    # spinning threads are 50x slower on a loaded machine (measured on these 2-core VMs).
    with threadpool_limits(limits=1, user_api="blas"):
        return _detect(lat, lon, r, **options)


def _detect(lat, lon, r, *, scales=DEFAULT_SCALES, degree: int = 6, min_significance: float = 5.0,
            min_excess: float = 10.0, max_regions: int = 20, iterations: int = 2,
            core_significance: float = 3.0, max_r_fraction: float = 0.5) -> list[Region]:
    lat, lon, r = (np.asarray(v, np.float64).ravel() for v in (lat, lon, r))
    ok = np.isfinite(lat) & np.isfinite(lon) & np.isfinite(r) & (r > 0)
    rows = np.flatnonzero(ok)
    if len(rows) < 10:
        return []
    u = unit_vectors(lat[rows], lon[rows])
    tree = cKDTree(u)
    bg = Background(degree)
    ru = r[rows]
    sky = (u, rows, lat, lon, r, ru, tree)
    screen = _Screen(u, ru, tree)
    regions: list[Region] = []
    counts = {}  # cap counts per scale: the same in every iteration, only the background moves
    previous = None
    for _ in range(iterations):
        bg.fit(u, [(unit_vectors(g.centre_lat, g.centre_lon), g.radius_deg * 1.2) for g in regions])
        peaks = _peaks(tree, bg, scales, min_significance, min_excess, counts)
        regions = []
        tried = 0
        for c, theta, _sig in peaks:
            if len(regions) >= max_regions or tried >= 3 * max_regions:
                break
            if not _free(c, theta, regions, lat, lon) or not screen.compact(c, theta, bg, max_r_fraction):
                continue
            tried += 1
            g = _region(c, theta, sky, bg, core_significance, max_r_fraction)
            if (g is None or g.significance < min_significance or g.excess < min_excess
                    or g.r_fraction > max_r_fraction):
                continue
            if any(len(np.intersect1d(g.members, k.members, assume_unique=True)) > 0.5 * len(g.members)
                   for k in regions):
                continue
            regions.append(g)
        regions = _nested_out(regions)
        state = sorted((tuple(g.box().values()), g.tokens) for g in regions)
        if not regions or state == previous:  # converged: the same mask gives the same regions
            break
        previous = state
    regions.sort(key=lambda g: -g.excess)
    for i, g in enumerate(regions):
        g.rank = i + 1
    return regions


def _nested_out(regions: list[Region]) -> list[Region]:
    """One region per clump: a region whose tokens are mostly (> 50 %) in a region of larger
    excess is dropped (found at another scale, or a part of it)."""
    kept: list[Region] = []
    for g in sorted(regions, key=lambda g: -g.excess):
        if not any(len(np.intersect1d(g.members, k.members, assume_unique=True)) > 0.5 * len(g.members)
                   for k in kept):
            kept.append(g)
    return kept


def _free(c, theta, regions, lat, lon) -> bool:
    """A peak is new unless it lies in a region's box or near its centre."""
    clat, clon = (float(v) for v in lat_lon(c))
    for g in regions:
        if in_box(clat, clon, g.r_min, g.box()):
            return False
        if float(c @ unit_vectors(g.centre_lat, g.centre_lon)) >= math.cos(math.radians(max(theta, g.scale_deg))):
            return False
    return True


def _peaks(tree, bg, scales, min_sig, min_excess, cache: dict) -> list[tuple[np.ndarray, float, float]]:
    """Local maxima of the significance at each scale, all scales together, most significant first
    (across scales a peak is suppressed only by a region actually made: see detect)."""
    found = []
    for theta in scales:
        if theta not in cache:
            spacing = math.radians(theta) / 3.0
            centres = fibonacci_sphere(max(int(min(4 * math.pi / spacing**2, 2_000_000)), 12))
            n_in = tree.query_ball_point(centres, chord(theta), return_length=True)
            busy = n_in >= max(min_excess, 1)
            cache[theta] = (centres[busy], n_in[busy].astype(np.float64))
        cs, counts = cache[theta]
        if not len(cs):
            continue
        b = bg.in_caps(cs, theta)
        s = poisson_significance(counts, b)
        good = np.flatnonzero((s >= min_sig) & (counts - b >= min_excess))
        if not len(good):
            continue
        cs, s = cs[good], s[good]
        order = np.argsort(-s, kind="stable")
        gtree = cKDTree(cs)
        gone = np.zeros(len(cs), bool)
        for i in order:  # greedy non-maximum suppression within one radius
            if gone[i]:
                continue
            found.append((float(s[i]), theta, cs[i]))
            gone[gtree.query_ball_point(cs[i], chord(theta))] = True
    found.sort(key=lambda t: -t[0])
    return [(c, theta, sig) for sig, theta, c in found]


def _r_range(c, theta, u, ru, tree, bg, f: float = 1.0):
    """The cap's most significant r interval against its surroundings (``_best_r_interval``):
    (cap rows, rows within 3 radii, sorted r of the annulus, lo, hi, share of the annulus in
    the interval), or None for a cap with fewer than 2 rows.  ``u``/``ru``/``tree`` may be a
    Bernoulli subsample of fraction f of the sky (the background is thinned with it)."""
    idx = np.asarray(tree.query_ball_point(c, chord(theta)), dtype=np.int64)
    if len(idx) < 2:
        return None
    near = np.asarray(tree.query_ball_point(c, chord(3 * theta)), dtype=np.int64)
    ann = near[u[near] @ c < math.cos(math.radians(1.5 * theta))]
    r_ann = np.sort(ru[ann])
    b_cap = float(bg.in_caps(c[None], theta)[0]) * f
    lo, hi, share = _best_r_interval(np.sort(ru[idx]), r_ann, b_cap)
    return idx, near, r_ann, lo, hi, share


class _Screen:
    """The test of compactness in r on a fixed random subsample of at most ``SCREEN_ROWS`` rows
    (all rows below that): a crowded sky has hundreds of significant apertures on wide
    structure that spans every r; each is rejected in O(subsample) work and does not count
    against the candidates tried.  Those that pass are tested again on every row by _region."""

    def __init__(self, u, ru, tree, seed: int = 0):
        n = len(u)
        if n <= SCREEN_ROWS:                  # every row: the sky's own arrays and tree
            self.f, self.u, self.ru, self.tree = 1.0, u, ru, tree
            return
        keep = np.sort(np.random.default_rng(seed).choice(n, SCREEN_ROWS, replace=False))
        self.f = len(keep) / n
        self.u, self.ru = u[keep], ru[keep]
        self.tree = cKDTree(self.u)

    def compact(self, c, theta, bg, max_r_fraction: float) -> bool:
        got = _r_range(c, theta, self.u, self.ru, self.tree, bg, self.f)
        return got is not None and got[5] <= max_r_fraction


def _dense(up: np.ndarray, rho: float, expected: np.ndarray, core_sig: float, per_point: float = NEIGHBOUR_BUDGET,
           floor: float = NEIGHBOUR_FLOOR, probe: int = 256, seed: int = 0) -> np.ndarray:
    """Which points have an over-dense neighbourhood (radius rho degrees): Poisson significance
    of the other points within rho against ``expected`` at least ``core_sig``.

    Bounded work: the mean neighbour count is estimated on ``probe`` random points; when the
    pairs to visit (points x mean count) exceed max(floor, per_point x points), the neighbours
    are counted in a Bernoulli subsample of fraction f (chosen so that the visits are about
    per_point x points) and tested against f x expected.  A thinned Poisson process is Poisson
    with f times the intensity, so the test keeps its false-positive rate exactly; it loses only
    power, and with ~``per_point`` neighbours at the mean density a neighbourhood a few times
    denser than the background still stands out by many sigma.  Deterministic (fixed seed)."""
    n = len(up)
    if n == 0:
        return np.zeros(0, bool)
    rng = np.random.default_rng(seed)
    ch = chord(rho)
    tree = cKDTree(up)
    look = rng.choice(n, size=min(probe, n), replace=False)
    mean_n = float(tree.query_ball_point(up[look], ch, return_length=True).mean())
    f = min(1.0, max(floor, per_point * n) / max(n * mean_n, 1.0))
    if f >= 1.0:
        k = tree.query_ball_point(up, ch, return_length=True) - 1
        return poisson_significance(k, expected) >= core_sig
    sub = rng.random(n) < f
    k = cKDTree(up[sub]).query_ball_point(up, ch, return_length=True) - sub  # not itself
    return poisson_significance(k, f * np.asarray(expected)) >= core_sig


def _region(c, theta, sky, bg, core_sig, max_r_fraction: float = 1.0) -> Region | None:
    u, rows, lat, lon, r, ru, tree = sky
    got = _r_range(c, theta, u, ru, tree, bg)
    if got is None or got[5] > max_r_fraction:  # not compact in r: rejected before any core is grown
        return None
    idx, near, r_ann, lo, hi, core_share = got
    frac = _frac_in(r_ann, lo, hi) if len(r_ann) >= 5 else 1.0
    # Core: tokens (in the r range, within 3 radii) whose own neighbourhood of radius rho is
    # over-dense, joined by friends-of-friends at rho; the groups that reach into the cap.
    within = u[near] @ c >= math.cos(math.radians(2 * theta))
    pts = near[within & (r[rows[near]] >= lo) & (r[rows[near]] <= hi)]
    # (at most 2 degrees: a neighbourhood count per token stays ~O(N) work at the widest scales)
    rho = min(max(theta / 2.0, 0.5), 2.0)
    e_i = bg.intensity(u[pts]) * cap_area(rho) * max(frac, 1e-12)
    dense = _dense(u[pts], rho, e_i, core_sig)
    if dense.sum() < 2:
        return None
    cand = pts[dense]
    # Friends of friends through each token's 12 nearest neighbours within rho: memory ~ 12 n
    # however dense the core (all pairs within rho would be ~n^2 at large scales).  On the
    # distinct directions: identical rows (collapsed tokens) are one point, linked by definition,
    # and a KD-tree cannot split a pile of identical points (its queries would scan the pile).
    uc, inv = np.unique(u[cand], axis=0, return_inverse=True)
    k = min(13, len(uc))
    dist, nb = (np.reshape(v, (len(uc), k)) for v in cKDTree(uc).query(uc, k=k, distance_upper_bound=chord(rho)))
    src = np.repeat(np.arange(len(uc)), k).reshape(len(uc), k)
    link = np.isfinite(dist)
    graph = coo_matrix((np.ones(int(link.sum())), (src[link], nb[link])), shape=(len(uc), len(uc)))
    _, comp = connected_components(graph, directed=False)
    comp = comp[np.ravel(inv)]
    in_cap = u[cand] @ c >= math.cos(math.radians(theta))
    core = cand[np.isin(comp, np.unique(comp[in_cap]))]
    if len(core) < 2:
        return None
    # The edge of a spike is sparser than its middle: the tokens (of the r range) within half
    # the linking length of the dense core belong to it too.
    dist, _ = cKDTree(np.unique(u[core], axis=0)).query(u[pts], distance_upper_bound=chord(rho / 2))
    core = np.union1d(core, pts[np.isfinite(dist)])
    clat, clon = (float(v) for v in lat_lon(c))
    box = _core_box(u[core], lat[rows[core]], c, clat, clon)
    box["r_min"], box["r_max"] = float(r[rows[core]].min()), float(r[rows[core]].max())
    box = outward(box)
    members = np.flatnonzero(in_box(lat, lon, r, box))
    r_frac = _frac_in(r_ann, box["r_min"], box["r_max"]) if len(r_ann) >= 5 else 1.0
    expected = bg.in_box(box) * r_frac
    sig = float(poisson_significance(len(members), expected))
    radius = float(np.degrees(np.arccos(np.clip(u[core] @ c, -1, 1))).max())
    return Region(0, **box, tokens=len(members), expected=expected, significance=sig,
                  centre_lat=clat, centre_lon=clon, scale_deg=float(theta), radius_deg=max(radius, theta),
                  r_fraction=core_share, members=members)


def _frac_in(sorted_r: np.ndarray, lo: float, hi: float) -> float:
    k = np.searchsorted(sorted_r, hi, side="right") - np.searchsorted(sorted_r, lo, side="left")
    return float(k) / max(len(sorted_r), 1)


def _best_r_interval(r_cap_sorted: np.ndarray, r_ann_sorted: np.ndarray, b_cap: float) -> tuple[float, float, float]:
    """The r interval (ends at quantiles of the cap's r) where the cap's tokens stand most
    significantly above the background's r distribution (from the surroundings), widened by a
    quarter of its width on each side: the most significant cut of a Gaussian spike is about
    +/-2 sigma, the widened one +/-3 sigma, so the spike's tails stay in.  Also returns the
    share of the surroundings' tokens in the most significant (not widened) interval."""
    if len(r_ann_sorted) < 5:
        return float(r_cap_sorted[0]), float(r_cap_sorted[-1]), 0.0
    q = np.unique(np.quantile(r_cap_sorted, np.linspace(0, 1, 61)))
    lo, hi = np.meshgrid(q, q, indexing="ij")
    keep = lo <= hi
    lo, hi = lo[keep], hi[keep]
    n = np.searchsorted(r_cap_sorted, hi, "right") - np.searchsorted(r_cap_sorted, lo, "left")
    m = np.searchsorted(r_ann_sorted, hi, "right") - np.searchsorted(r_ann_sorted, lo, "left")
    # The background fraction in [lo, hi], with half a token of floor so an empty r range of the
    # surroundings does not look infinitely significant.
    b = b_cap * np.maximum(m, 0.5) / len(r_ann_sorted)
    s = poisson_significance(n, b)
    best = np.flatnonzero(s >= s.max() - 1e-9 * max(1.0, s.max()))  # ties: the interval holding more tokens
    k = best[np.argmax(n[best])]
    pad = 0.25 * (hi[k] - lo[k])
    return max(0.0, float(lo[k] - pad)), float(hi[k] + pad), float(m[k]) / len(r_ann_sorted)


def _core_box(uc: np.ndarray, lat_c: np.ndarray, c: np.ndarray, clat: float, clon: float) -> dict:
    """The lat/lon box holding the core tokens: longitudes measured from the centre (so a
    box may wrap through +/-180); a core that holds a pole spans every longitude."""
    theta_max = float(np.arccos(np.clip(uc @ c, -1, 1)).max())
    lat_lo, lat_hi = float(lat_c.min()), float(lat_c.max())
    for sign in (1.0, -1.0):
        pole_dist = math.radians(90.0 - sign * clat)
        if pole_dist <= theta_max:
            if sign > 0:
                return {"lat_min": lat_lo, "lat_max": 90.0, "lon_min": -180.0, "lon_max": 180.0}
            return {"lat_min": -90.0, "lat_max": lat_hi, "lon_min": -180.0, "lon_max": 180.0}
    lon_c = np.degrees(np.arctan2(uc[:, 1], uc[:, 0]))
    d = (lon_c - clon + 180.0) % 360.0 - 180.0
    lo, hi = clon + d.min(), clon + d.max()
    if hi - lo >= 360.0:
        lo, hi = -180.0, 180.0
    return {"lat_min": lat_lo, "lat_max": lat_hi, "lon_min": _wrap(lo), "lon_max": _wrap(hi)}


def _wrap(lon: float) -> float:
    if -180.0 <= lon <= 180.0:
        return float(lon)
    return float((lon + 180.0) % 360.0 - 180.0)


def region_of_rows(regions: list[Region], n_rows: int) -> np.ndarray:
    """For every row, the rank of the first region whose box holds it (0: none)."""
    out = np.zeros(n_rows, np.int64)
    for g in sorted(regions, key=lambda g: g.rank, reverse=True):
        out[g.members] = g.rank
    return out
