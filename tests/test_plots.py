"""embdist.plots: every picture is a real, non-blank PNG of the promised size; the histogram
helper agrees with numpy bin for bin; clustering order against scipy."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")
import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

from embdist import plots  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LO = 50  # dpi of most test renders (default 100): a quarter of the pixels, same drawing code
BOX = dict(lat_min=45, lat_max=65, lon_min=5, lon_max=32, r_min=0.2, r_max=0.5)


def read_png(path, width: int, height: int) -> np.ndarray:
    """Check a PNG: signature, decodable, exact size, not blank. Returns RGB in [0, 1]."""
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = mpimg.imread(str(path))
    assert img.shape[:2] == (height, width), img.shape
    rgb = img[..., :3]
    assert float(rgb.var()) > 1e-3  # not one flat colour
    q = (rgb.reshape(-1, 3) * 255).round().astype(np.uint32)
    colours = np.unique((q[:, 0] << 16) | (q[:, 1] << 8) | q[:, 2])
    assert len(colours) > 20
    return rgb


def red_pixels(rgb: np.ndarray) -> int:
    """Pixels of the box/zero-spike red (#d62728 = 214, 39, 40), with antialiasing slack."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return int(((r > 0.7) & (g < 0.3) & (b < 0.3)).sum())


@pytest.fixture(autouse=True)
def no_pyplot_figures_left():
    before = plt.get_fignums()
    yield
    assert plt.get_fignums() == before  # nothing registered with pyplot, nothing left open


def sky_data(n=20_000, seed=0):
    """A sky with an overdense blob inside the test box (lat ~55, lon ~18, r ~0.34)."""
    rng = np.random.default_rng(seed)
    lat = np.degrees(np.arcsin(rng.uniform(-1, 1, n)))
    lon = rng.uniform(-180, 180, n)
    r = rng.gamma(6, 0.04, n)
    k = n // 10
    lat[:k] = rng.normal(55, 2, k)
    lon[:k] = rng.normal(18, 3, k)
    r[:k] = rng.normal(0.34, 0.02, k)
    return lat, lon, r


# ----------------------------------------------------------------------------------- sky map

def test_sky_map_with_box(tmp_path):
    lat, lon, r = sky_data()
    out = plots.sky_map(torch.from_numpy(lat), torch.from_numpy(lon), torch.from_numpy(r), BOX,
                        tmp_path / "sub" / "sky.png", title="test sky", dpi=LO)
    assert out == tmp_path / "sub" / "sky.png"
    rgb = read_png(out, 800, 550)
    assert red_pixels(rgb) > 150  # the box rectangles and the r_min/r_max lines


def test_sky_map_without_box_has_no_box(tmp_path):
    lat, lon, r = sky_data(5_000)
    rgb = read_png(plots.sky_map(lat, lon, r, None, tmp_path / "sky.png", dpi=LO), 900, 275)
    assert red_pixels(rgb) < 20


def test_sky_map_on_minilm(tmp_path):
    from embdist import geometry, sources

    try:
        w = sources.load_matrix(sources.packaged_minilm_path()).tensor
    except sources.InputError as e:
        pytest.skip(str(e))
    p = geometry.pca(w)
    vec = {k: geometry.pc_vector(p, n) for k, n in dict(north=2, meridian=1, equinox=3).items()}
    sky = geometry.sky_coordinates(w, vec["north"], vec["meridian"], vec["equinox"])
    assert int(geometry.in_box(sky, **BOX).sum()) == 2352  # the box holds MiniLM's [unused*] cluster
    rgb = read_png(plots.sky_map(sky.lat, sky.lon, sky.r, BOX, tmp_path / "minilm.png"), 1600, 1100)  # default dpi
    assert red_pixels(rgb) > 300


def test_sky_map_rejects_bad_input(tmp_path):
    lat, lon, r = sky_data(100)
    with pytest.raises(ValueError, match="one length"):
        plots.sky_map(lat, lon[:50], r, None, tmp_path / "x.png")
    with pytest.raises(ValueError, match="unknown bbox keys"):
        plots.sky_map(lat, lon, r, {"lat_low": 1}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="above"):
        plots.sky_map(lat, lon, r, dict(BOX, r_min=0.6), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


# ----------------------------------------------------------------------- histogram helper

def dist_matrix(n=301, seed=0, dtype=torch.float32, symmetric=True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    d = torch.rand(n, n, generator=g, dtype=torch.float64) * 2 + 0.1
    if symmetric:
        d = (d + d.T) / 2
    d.fill_diagonal_(0)
    if n > 200:
        d[3, 50:90] = 0.0   # exact zeros in the upper triangle...
        d[200, 10:30] = 0.0  # ...and some below the diagonal only (must not count)
    d[7, 8] = -0.0
    return d.to(dtype)


def numpy_reference(d: torch.Tensor, bins=200):
    a = d.float().numpy() if d.dtype in (torch.bfloat16, torch.float16) else d.numpy()
    upper = a[np.triu_indices(len(a), 1)]
    counts, edges = np.histogram(upper, bins=bins)
    return edges, counts, int((upper == 0).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_elems", [1000, 1 << 22])
def test_upper_triangle_histogram_matches_numpy(dtype, block_elems):
    d = dist_matrix(dtype=dtype, symmetric=False)  # not symmetric: only the upper triangle counts
    edges, counts, zeros = plots.upper_triangle_histogram(d, bins=200, block_elems=block_elems)
    ref_edges, ref_counts, ref_zeros = numpy_reference(d)
    np.testing.assert_array_equal(edges, ref_edges)
    np.testing.assert_array_equal(counts, ref_counts)
    assert zeros == ref_zeros == 41
    assert counts.sum() == 301 * 300 // 2


def test_upper_triangle_histogram_numpy_input_and_bins():
    d = dist_matrix(n=157).numpy()
    for bins, block in ((1, 100), (7, 157 * 100), (64, 157 * 130)):  # blocks of 1, 100, 130 rows
        e, c, z = plots.upper_triangle_histogram(d, bins=bins, block_elems=block)
        re_, rc, rz = numpy_reference(torch.from_numpy(d), bins)
        np.testing.assert_array_equal(e, re_)
        np.testing.assert_array_equal(c, rc)
        assert z == rz


def test_upper_triangle_histogram_does_not_copy_the_triangle():
    n = 1500  # a bool N×N mask would be 2.2 MB, the gathered triangle 4.5 MB
    d = dist_matrix(n=n)
    tracemalloc.start()
    try:
        plots.upper_triangle_histogram(d, block_elems=1 << 14)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak


def test_upper_triangle_histogram_edges():
    e, c, z = plots.upper_triangle_histogram(torch.zeros(1, 1))
    assert c.sum() == 0 and z == 0 and len(e) == 201
    e, c, z = plots.upper_triangle_histogram(torch.zeros(4, 4))  # all pairs zero
    assert c.sum() == 6 and z == 6
    np.testing.assert_array_equal(c, numpy_reference(torch.zeros(4, 4))[1])
    bad = dist_matrix(n=10)
    bad[2, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        plots.upper_triangle_histogram(bad)
    with pytest.raises(ValueError, match="square"):
        plots.upper_triangle_histogram(torch.zeros(3, 4))


# ------------------------------------------------------------------------ distance histogram

def test_distance_histogram_from_hist_and_values(tmp_path):
    d = dist_matrix()
    hist = plots.upper_triangle_histogram(d)
    a = read_png(plots.distance_histogram(hist, tmp_path / "a.png", metric="euclidean"), 1000, 550)  # default dpi
    assert red_pixels(a) > 100  # the zero spike and its label
    upper = d.numpy()[np.triu_indices(len(d), 1)]
    b = read_png(plots.distance_histogram(upper, tmp_path / "b.png", metric="chebyshev", dpi=LO), 500, 275)
    assert red_pixels(b) > 25
    c = read_png(plots.distance_histogram(hist[:2], tmp_path / "c.png", zero_count=0, dpi=LO), 500, 275)
    assert red_pixels(c) < 5  # no exact zeros: no spike


def test_distance_histogram_rejects_bad_input(tmp_path):
    d = dist_matrix(n=20)
    with pytest.raises(ValueError, match="upper_triangle_histogram"):
        plots.distance_histogram(d, tmp_path / "x.png")
    with pytest.raises(ValueError, match="len\\(edges\\)"):
        plots.distance_histogram((np.arange(5.0), np.ones(5)), tmp_path / "x.png")
    e, c, _ = plots.upper_triangle_histogram(d)
    with pytest.raises(ValueError, match="exceeds"):
        plots.distance_histogram((e, c), tmp_path / "x.png", zero_count=int(c[0]) + 1)


# ------------------------------------------------------------------------------ group sizes

def test_group_sizes(tmp_path):
    qwen = [814, 704, 306, 228, 11, 10, 6, 5, 4, 4, 3, 3, 2]
    read_png(plots.group_sizes(np.array(qwen), tmp_path / "g.png"), 1300, 500)
    read_png(plots.group_sizes([50] + [2] * 30 + [3] * 10, tmp_path / "toy.png", dpi=LO), 650, 250)
    out = plots.group_sizes([], tmp_path / "none.png", dpi=LO)
    assert mpimg.imread(str(out)).shape[:2] == (250, 650)
    with pytest.raises(ValueError):
        plots.group_sizes([3, 0], tmp_path / "bad.png")


# -------------------------------------------------------------------------- snapshot curves

def test_snapshot_curves(tmp_path):
    t = 300
    steps = np.arange(t)
    grow = 1 - np.exp(-steps / 40)
    per = {m: {"min": np.zeros(t), "mean": s * grow, "max": 2 * s * grow, "zero_pairs": np.ones(t)}
           for m, s in (("euclidean", 2.0), ("chebyshev", 0.6))}
    per["euclidean"]["mean"] = torch.from_numpy(per["euclidean"]["mean"])  # tensors accepted too
    distinct = np.minimum(1 + steps // 3, 74)
    read_png(plots.snapshot_curves(per, distinct, tmp_path / "c.png"), 1100, 980)
    read_png(plots.snapshot_curves({"euclidean": per["euclidean"]}, None, tmp_path / "e.png", dpi=LO), 550, 230)
    with pytest.raises(ValueError, match="steps"):
        plots.snapshot_curves(per, distinct[:-1], tmp_path / "x.png")
    with pytest.raises(ValueError, match="min, mean and max"):
        plots.snapshot_curves({"euclidean": {"min": [0.0]}}, None, tmp_path / "x.png")


# ------------------------------------------------------------------------ clustered heatmap

def blocks(sizes=(40, 25, 15), seed=0):
    """Three well separated clusters (one of identical points), rows shuffled."""
    rng = np.random.default_rng(seed)
    pts = np.concatenate([rng.normal(c * 10, 0.3 if c else 0.0, size=(k, 5)) for c, k in enumerate(sizes)])
    label = np.repeat(np.arange(len(sizes)), sizes)
    perm = rng.permutation(len(pts))
    pts, label = pts[perm], label[perm]
    d = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1))
    return d, label


def test_cluster_order_matches_scipy_and_groups_clusters():
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    d, label = blocks()
    order = plots.cluster_order(torch.from_numpy(d).float())
    ref = leaves_list(linkage(squareform(d.astype(np.float32).astype(np.float64), checks=False), "average"))
    np.testing.assert_array_equal(order, ref)
    assert sorted(order.tolist()) == list(range(len(d)))
    runs = label[order]
    assert (np.diff(runs) != 0).sum() == 2  # each cluster is one contiguous run


def test_clustered_heatmap(tmp_path):
    d, label = blocks()
    read_png(plots.clustered_heatmap(d, tmp_path / "h.png", metric="euclidean"), 1000, 1100)
    d, label = blocks((12, 8, 5))
    labels = [f"tok{i}" for i in range(len(d))]
    read_png(plots.clustered_heatmap(torch.from_numpy(d), tmp_path / "l.png", labels=labels, dpi=LO), 500, 550)
    read_png(plots.clustered_heatmap(d[:2, :2], tmp_path / "two.png", dpi=LO), 500, 550)


def test_clustered_heatmap_refuses(tmp_path):
    d, _ = blocks()
    with pytest.raises(ValueError, match="80 tokens, above max_n=50"):
        plots.clustered_heatmap(d, tmp_path / "x.png", max_n=50)
    with pytest.raises(ValueError, match="3 labels for 80 tokens"):
        plots.clustered_heatmap(d, tmp_path / "x.png", labels=["a", "b", "c"])
    with pytest.raises(ValueError, match="square"):
        plots.clustered_heatmap(d[:, :10], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
