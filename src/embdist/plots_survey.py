"""Static pictures of the survey: the sky with its detected regions (matplotlib, Agg, no pyplot).

:func:`draw_box` draws a lat/lon box on a longitude/latitude axis, also one through +/-180
degrees (``lon_min > lon_max``: two rectangles, one at each edge) and one on a pole
(``lon -180..180`` up to +/-90); ``embdist.plots.sky_map`` uses it for the task's box.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.patches import Rectangle

from embdist import plots

REGION_COLOUR = "#d62728"


def draw_box(ax, b: dict, colour: str = plots.BOX_COLOR, label: str | None = None, lw: float = 1.6) -> None:
    y0, y1 = max(b["lat_min"], -90.0), min(b["lat_max"], 90.0)
    if b["lon_min"] <= b["lon_max"]:
        spans = [(max(b["lon_min"], -180.0), min(b["lon_max"], 180.0))]
    else:  # through +/-180: from lon_min to the right edge, and from the left edge to lon_max
        spans = [(b["lon_min"], 180.0), (-180.0, b["lon_max"])]
    for x0, x1 in spans:
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=colour, lw=lw, zorder=5))
    if label:
        x0, x1 = spans[0]
        ax.text(x0, y1, label, color=colour, fontsize=9, fontweight="bold", va="bottom", ha="left", zorder=6)


def survey_sky_map(lat, lon, r, regions: Sequence[dict], path: str | os.PathLike,
                   title: str = "PCA sky: detected regions", gridsize: int = 120, dpi: int = plots.DPI) -> Path:
    """Density of every token in longitude/latitude with each region's box and rank, and the r
    histogram of all tokens and of each region's tokens (first five regions)."""
    lat, lon, r = (plots._np(v, np.float64).ravel() for v in (lat, lon, r))
    if not (len(lat) == len(lon) == len(r)) or len(lat) == 0:
        raise ValueError("lat, lon and r must be non-empty and of one length")
    fig = plots._figure(18, 7, dpi)
    ax, ax_r = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.9, 1]})
    hb = ax.hexbin(lon, lat, gridsize=(gridsize, gridsize // 3), extent=(-180, 180, -90, 90), mincnt=1,
                   bins="log", cmap="viridis", linewidths=0)
    fig.colorbar(hb, ax=ax, label="tokens per hexagon (log)")
    for g in regions:
        draw_box(ax, g, REGION_COLOUR, str(g["rank"]))
    plots.sky_axes(ax)
    ax.set_title(f"{plots._fmt(len(lat))} tokens, {len(regions)} regions (boxes, ranked by excess)")

    edges = np.histogram_bin_edges(r, bins=120)
    ax_r.hist(r, bins=edges, color="0.6", log=True, label=f"all tokens ({plots._fmt(len(r))})")
    from embdist.regions import in_box

    for g, colour in zip(regions[:5], ("#d62728", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b")):
        inside = in_box(lat, lon, r, g)
        if inside.any():
            ax_r.hist(r[inside], bins=edges, color=colour, alpha=0.8, log=True,
                      label=f"region {g['rank']} ({plots._fmt(inside.sum())})")
    ax_r.set_xlabel("r")
    ax_r.set_ylabel("tokens (log)")
    ax_r.legend(fontsize=8)
    ax_r.set_title("r of all tokens and of the regions")
    fig.suptitle(title)
    fig.tight_layout()
    return plots._save(fig, path)
