"""Pictures of saved embdist results, for a notebook or a script.

Every function draws one PNG with matplotlib's Agg renderer and returns the saved Path. The
figures are built with ``matplotlib.figure.Figure`` and an explicit Agg canvas, never pyplot:
nothing is registered with pyplot's figure manager (there is nothing left open to close and
no leak in a loop), the global backend of a notebook is left alone, and no display is needed.
Show a result in a notebook with ``IPython.display.Image(path)``.

Inputs may be torch tensors or numpy arrays. Sizes are fixed: ``dpi`` (default 100) times the
figure size in inches - sky map 16x11 (18x5.5 without a box), distance histogram 10x5.5, group
sizes 13x5, snapshot curves 11 x (2 + 2.6 per panel), clustered heat map 10x11.

* :func:`sky_map` - the PCA sky (latitude/longitude/r) with the bounding box: the picture
  to choose a box from.
* :func:`distance_histogram` (+ :func:`upper_triangle_histogram`) - distribution of the
  pairwise distances of one matrix, log counts, the spike of exact zeros marked.
* :func:`group_sizes` - sizes of the groups of identical vectors (``embdist.groups``).
* :func:`snapshot_curves` - min/mean/max distance and number of distinct vectors per step.
* :func:`clustered_heatmap` (+ :func:`cluster_order`) - a distance matrix with the tokens
  ordered by hierarchical clustering.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from embdist.atomic import atomic_path
from embdist.regions import in_box

DPI = 100
BOX_COLOR = "#d62728"
_BLOCK_ELEMS = 1 << 22  # values per row block in upper_triangle_histogram (16 MiB of float32)


# ------------------------------------------------------------------------------------ helpers

def _figure(width: float, height: float, dpi: int = DPI) -> Figure:
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    try:
        with atomic_path(path) as tmp:   # no half-written PNG
            # No bbox_inches="tight": the PNG is exactly figsize x dpi pixels.
            fig.savefig(tmp, format="png", dpi=fig.dpi)
    finally:
        fig.clear()
    return Path(path)


def _np(x, dtype=None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        x = x.numpy()
    a = np.asarray(x)
    return a.astype(dtype, copy=False) if dtype is not None else a


def _fmt(n) -> str:
    return f"{int(n):,}"


# ------------------------------------------------------------------------------------- sky map

BBOX_KEYS = ("lat_min", "lat_max", "lon_min", "lon_max", "r_min", "r_max")
_BBOX_DEFAULTS = {"lat_min": -90.0, "lat_max": 90.0, "lon_min": -180.0, "lon_max": 180.0,
                  "r_min": 0.0, "r_max": math.inf}


def _bbox(bbox: Mapping | None) -> dict | None:
    if bbox is None:
        return None
    b = dict(bbox)
    unknown = set(b) - set(BBOX_KEYS)
    if unknown:
        raise ValueError(f"unknown bbox keys {sorted(unknown)}; use {', '.join(BBOX_KEYS)}")
    out = {k: float(b[k]) if b.get(k) is not None else _BBOX_DEFAULTS[k] for k in BBOX_KEYS}
    for lo, hi in (("lat_min", "lat_max"), ("r_min", "r_max")):  # lon_min > lon_max wraps through +/-180
        if out[lo] > out[hi]:
            raise ValueError(f"bbox {lo}={out[lo]} is above {hi}={out[hi]}")
    return out


def sky_map(lat, lon, r, bbox: Mapping | None, path: str | os.PathLike,
            title: str = "Token embeddings on the PCA sky", gridsize: int = 120, dpi: int = DPI) -> Path:
    """The sky of every token and the bounding box, to choose the box from.

    Panels: (1) density of tokens in longitude/latitude (hexbin, log colour) with the box;
    (2) mean r of the tokens in each hexagon, with the box; with a bbox, (3) a zoom on the
    box and its surroundings (density again, finer hexagons) and (4) the r histogram of all
    tokens and of the tokens inside the box's lat/lon window, with r_min/r_max marked and
    the number of tokens the full box selects. ``bbox`` holds lat_min, lat_max, lon_min,
    lon_max, r_min, r_max (degrees; as the config's bbox group); a missing key is unbounded.
    The selection counted is the inclusive one of ``embdist.geometry.in_box``.
    """
    lat, lon, r = (_np(v, np.float64).ravel() for v in (lat, lon, r))
    if not (len(lat) == len(lon) == len(r)):
        raise ValueError(f"lat, lon and r must have one length, got {len(lat)}, {len(lon)}, {len(r)}")
    if len(lat) == 0:
        raise ValueError("no tokens to draw")
    b = _bbox(bbox)
    n = len(lat)

    if b is None:
        fig = _figure(18, 5.5, dpi)
        axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 0.8]})
        ax_den, ax_r, ax_hist = axes
        ax_zoom = None
    else:
        fig = _figure(16, 11, dpi)
        (ax_den, ax_r), (ax_zoom, ax_hist) = fig.subplots(2, 2)

    extent = (-180, 180, -90, 90)
    hb = ax_den.hexbin(lon, lat, gridsize=(gridsize, gridsize // 3), extent=extent, mincnt=1,
                       bins="log", cmap="viridis", linewidths=0)
    fig.colorbar(hb, ax=ax_den, label="tokens per hexagon (log)")
    ax_den.set_title(f"Density of all {_fmt(n)} tokens")

    lo_r, hi_r = np.percentile(r, [1, 99])
    hr = ax_r.hexbin(lon, lat, C=r, reduce_C_function=np.mean, gridsize=(gridsize, gridsize // 3),
                     extent=extent, mincnt=1, cmap="cividis", vmin=lo_r, vmax=hi_r, linewidths=0)
    fig.colorbar(hr, ax=ax_r, label="mean r in hexagon (1st-99th percentile scale)")
    ax_r.set_title("Radius r = |(x, y, z)|")
    for ax in (ax_den, ax_r):
        sky_axes(ax)

    if b is not None:
        window = in_box(lat, lon, r, {**b, "r_min": -math.inf, "r_max": math.inf})  # wrap-aware
        inside = window & (r >= b["r_min"]) & (r <= b["r_max"])
        n_win, n_in = int(window.sum()), int(inside.sum())
        for ax in (ax_den, ax_r):
            _box(ax, b)

        # Zoom: the box with a margin of its own size on each side (at least 10°).
        mx = max(10.0, min((b["lon_max"] - b["lon_min"]) % 360.0 or 360.0, 360.0))
        my = max(10.0, min(b["lat_max"] - b["lat_min"], 180.0))
        x0, x1 = max(-180.0, b["lon_min"] - mx), min(180.0, b["lon_max"] + mx)
        if b["lon_min"] > b["lon_max"]:  # through +/-180: both edges of the map
            x0, x1 = -180.0, 180.0
        y0, y1 = max(-90.0, b["lat_min"] - my), min(90.0, b["lat_max"] + my)
        near = (lon >= x0) & (lon <= x1) & (lat >= y0) & (lat <= y1)
        if near.any():
            hz = ax_zoom.hexbin(lon[near], lat[near], gridsize=(60, 30), extent=(x0, x1, y0, y1),
                                mincnt=1, bins="log", cmap="viridis", linewidths=0)
            fig.colorbar(hz, ax=ax_zoom, label="tokens per hexagon (log)")
        _box(ax_zoom, b)
        ax_zoom.set_xlim(x0, x1)
        ax_zoom.set_ylim(y0, y1)
        ax_zoom.set_xlabel("longitude (°)")
        ax_zoom.set_ylabel("latitude (°)")
        ax_zoom.grid(True, lw=0.3, alpha=0.5)
        ax_zoom.set_title(f"Around the box: {_fmt(near.sum())} tokens, {_fmt(n_win)} in its lat/lon window")

    # r histogram: all tokens, and those in the lat/lon window.
    edges = np.histogram_bin_edges(r, bins=120)
    ax_hist.hist(r, bins=edges, color="0.6", label=f"all tokens ({_fmt(n)})", log=True)
    if b is not None:
        if n_win:
            ax_hist.hist(r[window], bins=edges, color="#1f77b4", alpha=0.85, log=True,
                         label=f"lat/lon window ({_fmt(n_win)})")
        r_hi = b["r_max"] if math.isfinite(b["r_max"]) else edges[-1]
        ax_hist.axvspan(b["r_min"], r_hi, color=BOX_COLOR, alpha=0.08)
        ax_hist.axvline(b["r_min"], color=BOX_COLOR, ls="--", lw=1.2, label=f"r_min = {b['r_min']:g}")
        if math.isfinite(b["r_max"]):
            ax_hist.axvline(b["r_max"], color=BOX_COLOR, ls="-.", lw=1.2, label=f"r_max = {b['r_max']:g}")
        ax_hist.set_title(f"r: the box selects {_fmt(n_in)} of {_fmt(n)} tokens")
    else:
        ax_hist.set_title("r of all tokens")
    ax_hist.set_xlabel("r")
    ax_hist.set_ylabel("tokens (log)")
    ax_hist.legend(fontsize=8, loc="best")

    sub = ""
    if b is not None:
        sub = (f"\nbox: lat {b['lat_min']:g}..{b['lat_max']:g}°, lon {b['lon_min']:g}..{b['lon_max']:g}°, "
               f"r {b['r_min']:g}..{b['r_max']:g}  →  {_fmt(n_in)} tokens")
    fig.suptitle(title + sub)
    fig.tight_layout()
    return _save(fig, path)


def sky_axes(ax) -> None:
    """The whole sky in longitude/latitude, ticks every 60/30 degrees, a light grid."""
    ax.set_xlim(-180, 180)
    ax.set_ylim(-90, 90)
    ax.set_xticks(range(-180, 181, 60))
    ax.set_yticks(range(-90, 91, 30))
    ax.set_xlabel("longitude (°)")
    ax.set_ylabel("latitude (°)")
    ax.grid(True, lw=0.3, alpha=0.5)


def _box(ax, b: dict) -> None:
    from embdist.plots_survey import draw_box  # also boxes through +/-180 degrees

    draw_box(ax, b)


# ------------------------------------------------------------------------- distance histogram

def upper_triangle_histogram(d, bins: int = 200, block_elems: int = _BLOCK_ELEMS):
    """Histogram of the strict upper triangle of a square matrix: (edges, counts, zero_count).

    Equal to ``np.histogram(d[np.triu_indices(n, 1)], bins=bins)`` (same edges, same counts:
    the range is the triangle's min..max and each block is binned by numpy with that range),
    and ``zero_count`` is the number of exact zeros (±0) among those values. Rows are taken a
    block at a time (the rectangle right of the block's diagonal square, and that square cut
    into 64-row slices the same way), so no N×N mask and no copy of the N(N-1)/2 values are
    made: the largest temporary is one block of about ``block_elems`` values.
    bf16/float16 matrices are binned as float32 (an exact conversion), float64 as float64.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    t = d if isinstance(d, torch.Tensor) else torch.from_numpy(np.asarray(d))
    t = t.detach().cpu()
    if t.ndim != 2 or t.shape[0] != t.shape[1]:
        raise ValueError(f"need a square matrix, got shape {tuple(t.shape)}")
    if t.dtype in (torch.bfloat16, torch.float16):
        conv = torch.float32
    elif t.dtype in (torch.float32, torch.float64):
        conv = None
    else:
        conv = torch.float64
    n = t.shape[0]
    step = max(1, block_elems // max(1, n))
    sub = 64  # the diagonal square of a block is cut again, down to 64x64 triangles
    tri_idx = {}

    def parts():
        """Views covering the strict upper triangle exactly once: per row block [i0, i1), the
        rectangle right of its diagonal square; inside the square, per 64-row slice, the
        rectangle right of the slice's own 64x64 square, and that square's strict upper
        triangle (the only gathered values: at most 2,016 at a time)."""
        for i0 in range(0, n, step):
            i1 = min(n, i0 + step)
            yield t[i0:i1, i1:]
            for j0 in range(i0, i1, sub):
                j1 = min(i1, j0 + sub)
                yield t[j0:j1, j1:i1]
                k = j1 - j0
                if k not in tri_idx:
                    tri_idx[k] = torch.triu_indices(k, k, 1)
                iu = tri_idx[k]
                yield t[j0:j1, j0:j1][iu[0], iu[1]]

    def converted():
        for part in parts():
            if part.numel():
                yield part if conv is None else part.to(conv)

    lo, hi, zeros, nan = math.inf, -math.inf, 0, False
    for part in converted():
        mn, mx = torch.aminmax(part)
        lo, hi = min(lo, mn.item()), max(hi, mx.item())
        nan |= bool(torch.isnan(mn) or torch.isnan(mx))
        zeros += int(torch.count_nonzero(part == 0))
    if nan or (n > 1 and not (math.isfinite(lo) and math.isfinite(hi))):
        raise ValueError("the upper triangle holds NaN or infinite values; a histogram needs finite distances")
    vdtype = np.dtype("float32") if torch.float32 in (conv, t.dtype) and conv != torch.float64 else np.dtype("float64")
    if n < 2:  # no pairs: numpy's default range for an empty array
        edges = np.histogram_bin_edges(np.empty(0), bins=bins)
        return edges, np.zeros(bins, dtype=np.int64), 0
    rng = (vdtype.type(lo), vdtype.type(hi))
    counts = np.zeros(bins, dtype=np.int64)
    edges = None
    for part in converted():
        c, edges = np.histogram(part.numpy(), bins=bins, range=rng)
        counts += c
    return edges, counts, zeros


def distance_histogram(values_or_hist, path: str | os.PathLike, metric: str = "euclidean",
                       zero_count: int | None = None, bins: int = 200, title: str | None = None,
                       dpi: int = DPI) -> Path:
    """Distribution of pairwise distances on a log count axis, the zero spike marked.

    ``values_or_hist`` is either a 1-D array of (upper-triangle) distances, or a precomputed
    ``(edges, counts)`` pair - or the ``(edges, counts, zero_count)`` triple of
    :func:`upper_triangle_histogram`. For values, ``zero_count`` defaults to the number of
    exact zeros among them. The bars show the distances other than exact zeros (the first
    bin less ``zero_count``); the exact zeros are drawn as a separate red spike at 0 with
    their count written beside it.
    """
    edges, counts, zc = _as_hist(values_or_hist, bins)
    if zero_count is None:
        zero_count = zc
    counts = counts.astype(np.int64).copy()
    total = int(counts.sum())
    shown = counts.copy()
    if zero_count and edges[0] <= 0 <= edges[-1]:
        k = min(len(counts) - 1, max(0, int(np.searchsorted(edges, 0.0, side="right")) - 1))
        if zero_count > shown[k]:
            raise ValueError(f"zero_count {zero_count:,} exceeds the {shown[k]:,} values of the bin that holds 0")
        shown[k] -= zero_count

    fig = _figure(10, 5.5, dpi)
    ax = fig.subplots()
    width = np.diff(edges)
    pos = shown > 0
    ax.bar(edges[:-1][pos], shown[pos], width=width[pos], align="edge", color="#1f77b4",
           label="pairs (exact zeros excluded)", linewidth=0)
    ax.set_yscale("log")
    ymax = max(int(shown.max()) if len(shown) else 1, int(zero_count or 0), 1)
    ax.set_ylim(0.7, ymax * 3)
    span = float(edges[-1] - edges[0]) or 1.0
    ax.set_xlim(min(edges[0], 0.0) - 0.02 * span, edges[-1] + 0.02 * span)
    if zero_count:
        ax.vlines(0.0, 0.7, zero_count, color=BOX_COLOR, lw=2.5, zorder=4)
        ax.plot([0.0], [zero_count], marker="v", color=BOX_COLOR, ms=8, zorder=5,
                label=f"exact zeros: {_fmt(zero_count)}")
        ax.annotate(f"{_fmt(zero_count)} exact zeros\n({100.0 * zero_count / max(total, 1):.3g}% of pairs)",
                    xy=(0.0, zero_count), xytext=(0.06, 0.97), textcoords="axes fraction", va="top",
                    color=BOX_COLOR, fontsize=10,
                    arrowprops=dict(arrowstyle="->", color=BOX_COLOR, lw=1))
    elif zero_count == 0:
        ax.text(0.02, 0.97, "no exact zeros", transform=ax.transAxes, va="top", color="0.3")
    ax.set_xlabel(f"{metric} distance")
    ax.set_ylabel("pairs (log)")
    ax.grid(True, which="major", lw=0.3, alpha=0.5)
    ax.legend(loc="upper right", fontsize=9)
    ax.set_title(title or f"{metric} distances: {_fmt(total)} pairs, range {edges[0]:.4g}..{edges[-1]:.4g}")
    fig.tight_layout()
    return _save(fig, path)


def _as_hist(v, bins: int):
    if isinstance(v, (tuple, list)) and len(v) in (2, 3) and np.ndim(v[0]) == 1 and np.ndim(v[1]) == 1:
        edges, counts = _np(v[0], np.float64), _np(v[1])
        if len(edges) != len(counts) + 1:
            raise ValueError(f"a histogram needs len(edges) == len(counts) + 1, got {len(edges)} and {len(counts)}")
        if len(counts) == 0:
            raise ValueError("empty histogram")
        zc = int(v[2]) if len(v) == 3 and v[2] is not None else None
        return edges, counts.astype(np.int64), zc
    a = _np(v)
    if a.ndim != 1:
        raise ValueError(f"give a 1-D array of distances or an (edges, counts) pair, got shape {a.shape}; "
                         "for a matrix use upper_triangle_histogram(d) first")
    if a.size == 0:
        raise ValueError("no distances to draw")
    counts, edges = np.histogram(a, bins=bins)
    return edges.astype(np.float64), counts.astype(np.int64), int(np.count_nonzero(a == 0))


# ------------------------------------------------------------------------------- group sizes


# Group sizes, snapshot curves and clustered heat maps live in plots_groups (kept importable here).
from embdist.plots_groups import cluster_order, clustered_heatmap, group_sizes, snapshot_curves  # noqa: E402,F401
