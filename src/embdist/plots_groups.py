"""Plots of groups and matrices: group sizes, snapshot curves, clustered heat maps (from saved data)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.ticker import MaxNLocator

from embdist.plots import DPI, _figure, _fmt, _np, _save


def group_sizes(sizes, path: str | os.PathLike, title: str | None = None, dpi: int = DPI) -> Path:
    """Sizes of the groups of identical vectors (from ``embdist.rows.duplicate_groups``).

    Left: one bar per group, largest first (sizes written on the bars when there are at most
    40 groups; log axis when sizes span more than a factor 30). Right: how many groups have
    each size. The title gives the number of groups, tokens in them, and Σ C(k,2) - the
    number of zero-distance pairs the groups account for.
    """
    s = np.sort(_np(sizes).astype(np.int64).ravel())[::-1]
    if s.size and s.min() < 1:
        raise ValueError("group sizes must be >= 1")
    fig = _figure(13, 5, dpi)
    ax_rank, ax_count = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.6, 1]})
    pairs = int((s * (s - 1) // 2).sum())
    if s.size == 0:
        for ax in (ax_rank, ax_count):
            ax.text(0.5, 0.5, "no groups of identical vectors", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
    else:
        x = np.arange(1, len(s) + 1)
        ax_rank.bar(x, s, color="#1f77b4", width=0.8)
        log = s.max() > 30 * s.min()
        if log:
            ax_rank.set_yscale("log")
        if len(s) <= 40:
            for xi, si in zip(x, s):
                ax_rank.annotate(_fmt(si), (xi, si), xytext=(0, 2), textcoords="offset points",
                                 ha="center", va="bottom", fontsize=8)
        ax_rank.set_ylim(0.8 if log else 0, s.max() * (3 if log else 1.12))
        ax_rank.set_xlabel("group (largest first)")
        ax_rank.set_ylabel("tokens in group" + (" (log)" if log else ""))
        ax_rank.set_xlim(0.3, len(s) + 0.7)
        ax_rank.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax_rank.set_title("Group sizes")

        vals, cnt = np.unique(s, return_counts=True)
        ax_count.bar(np.arange(len(vals)), cnt, color="#ff7f0e", width=0.8)
        step = max(1, len(vals) // 20)
        ax_count.set_xticks(np.arange(len(vals))[::step])
        ax_count.set_xticklabels([str(v) for v in vals[::step]], rotation=45 if len(vals) > 10 else 0)
        ax_count.set_xlabel("group size (tokens)")
        ax_count.set_ylabel("number of groups")
        ax_count.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax_count.set_title("Groups per size")
        for ax in (ax_rank, ax_count):
            ax.grid(True, axis="y", lw=0.3, alpha=0.5)
    fig.suptitle(title or f"{_fmt(len(s))} groups of identical vectors holding {_fmt(s.sum())} tokens; "
                          f"Σ C(k,2) = {_fmt(pairs)} zero-distance pairs")
    fig.tight_layout()
    return _save(fig, path)


# -------------------------------------------------------------------------- snapshot curves

def snapshot_curves(per_step: Mapping[str, Mapping[str, Sequence]], distinct, path: str | os.PathLike,
                    steps=None, title: str | None = None, dpi: int = DPI) -> Path:
    """Per-step distance summaries of a training history, one panel per metric, and the
    number of distinct vectors per step in the last panel.

    ``per_step[metric]`` holds arrays ``min``, ``mean``, ``max`` over the strict upper
    triangle of each snapshot (other keys are ignored), e.g. from
    ``embdist.pairwise.snapshot_step_stats``; ``distinct`` is the (T,) array of
    :func:`embdist.rows.distinct_per_step` (None: no panel). ``steps`` gives the
    x values (default 0..T-1).
    """
    metrics = list(per_step)
    if not metrics and distinct is None:
        raise ValueError("nothing to draw: per_step is empty and distinct is None")
    series = {}
    t_len = None
    for m in metrics:
        missing = [k for k in ("min", "mean", "max") if k not in per_step[m]]
        if missing:
            raise ValueError(f"per_step[{m!r}] lacks {missing}; it needs min, mean and max")
        series[m] = {k: _np(per_step[m][k], np.float64).ravel() for k in ("min", "mean", "max")}
        lens = {len(v) for v in series[m].values()}
        if len(lens) != 1 or (t_len is not None and lens != {t_len}):
            raise ValueError(f"per-step arrays differ in length: {sorted(lens | {t_len} - {None})}")
        t_len = lens.pop()
    dist = None if distinct is None else _np(distinct).astype(np.int64).ravel()
    if dist is not None:
        if t_len is not None and len(dist) != t_len:
            raise ValueError(f"distinct has {len(dist)} steps, the distance series {t_len}")
        t_len = len(dist)
    x = np.arange(t_len) if steps is None else _np(steps, np.float64).ravel()
    if len(x) != t_len:
        raise ValueError(f"steps has {len(x)} values for {t_len} snapshots")

    n_panels = len(metrics) + (dist is not None)
    fig = _figure(11, 2.0 + 2.6 * n_panels, dpi)
    axes = np.atleast_1d(fig.subplots(n_panels, 1, sharex=True))
    for ax, m in zip(axes, metrics):
        s = series[m]
        ax.fill_between(x, s["min"], s["max"], color="#1f77b4", alpha=0.15, lw=0, label="min..max")
        ax.plot(x, s["max"], color="#1f77b4", lw=1, label="max")
        ax.plot(x, s["mean"], color="k", lw=1.4, label="mean")
        ax.plot(x, s["min"], color="#d62728", lw=1, label="min")
        ax.set_ylabel(f"{m} distance")
        ax.set_title(f"{m}: final min {s['min'][-1]:.4g}, mean {s['mean'][-1]:.4g}, max {s['max'][-1]:.4g}",
                     fontsize=10)
        ax.legend(loc="best", fontsize=8, ncol=4)
        ax.grid(True, lw=0.3, alpha=0.5)
    if dist is not None:
        ax = axes[-1]
        ax.plot(x, dist, color="#2ca02c", lw=1.4, drawstyle="steps-post")
        ax.set_ylabel("distinct vectors")
        ax.set_ylim(0, max(1, int(dist.max())) * 1.08)
        ax.set_title(f"distinct vectors: {_fmt(dist[0])} at the first step, {_fmt(dist[-1])} at the last "
                     f"(min {_fmt(dist.min())}, max {_fmt(dist.max())})", fontsize=10)
        ax.grid(True, lw=0.3, alpha=0.5)
    axes[-1].set_xlabel("step")
    fig.suptitle(title or f"Pairwise distances over {_fmt(t_len)} snapshots")
    fig.tight_layout()
    return _save(fig, path)


# -------------------------------------------------------------------------- clustered heatmap

def _condensed(d, max_n: int) -> tuple[np.ndarray, np.ndarray, int]:
    a = _np(d)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"need a square distance matrix, got shape {a.shape}")
    n = a.shape[0]
    if n > max_n:
        raise ValueError(f"the matrix has {n:,} tokens, above max_n={max_n:,}: a clustered heat map of "
                         f"that many is slow and unreadable; pass a subset (or raise max_n)")
    a = a.astype(np.float64, copy=False)
    cond = a[np.triu_indices(n, 1)]
    if not np.all(np.isfinite(cond)) or (cond.size and cond.min() < 0):
        raise ValueError("distances must be finite and >= 0")
    return a, cond, n


def cluster_order(d, max_n: int = 2000) -> np.ndarray:
    """Leaf order of average-linkage hierarchical clustering of a distance matrix (upper
    triangle used, as scipy's condensed form)."""
    from scipy.cluster.hierarchy import leaves_list, linkage

    _, cond, n = _condensed(d, max_n)
    if n < 3:
        return np.arange(n)
    return leaves_list(linkage(cond, method="average"))


def clustered_heatmap(d, path: str | os.PathLike, labels: Sequence[str] | None = None,
                      max_n: int = 2000, metric: str = "distance", title: str | None = None,
                      dpi: int = DPI) -> Path:
    """Heat map of a distance matrix with rows and columns in the leaf order of average-linkage
    hierarchical clustering (scipy, on the condensed upper triangle), the dendrogram above it.

    Blocks of near-zero distance along the diagonal are groups of (near-)identical tokens.
    Labels are written on the axes when there are at most 80 tokens. More than ``max_n``
    tokens raise ValueError (the message gives the number).
    """
    from scipy.cluster.hierarchy import leaves_list, linkage

    a, cond, n = _condensed(d, max_n)
    if labels is not None and len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} tokens")
    z = linkage(cond, method="average") if n >= 3 else None
    order = leaves_list(z) if z is not None else np.arange(n)
    m = a[np.ix_(order, order)]

    fig = _figure(10, 11, dpi)
    fig.set_layout_engine("constrained", h_pad=0.02, w_pad=0.02, hspace=0.0, wspace=0.0)
    gs = fig.add_gridspec(2, 2, height_ratios=[1, 5], width_ratios=[30, 1])
    ax_tree = fig.add_subplot(gs[0, 0])
    ax = fig.add_subplot(gs[1, 0])
    cax = fig.add_subplot(gs[1, 1])
    # Colour range of the off-diagonal values: the diagonal's zeros do not squeeze the scale
    # (they show at the low end all the same); exact zeros off the diagonal set vmin = 0.
    lo, hi = (float(cond.min()), float(cond.max())) if cond.size else (0.0, 1.0)
    im = ax.imshow(m, cmap="viridis", interpolation="nearest" if n <= 400 else "antialiased",
                   aspect="auto", extent=(0, n, n, 0), vmin=lo, vmax=hi if hi > lo else lo + 1.0)
    fig.colorbar(im, cax=cax, label=metric)
    if labels is not None and n <= 80:
        ticks = np.arange(n) + 0.5
        lab = [str(labels[i]) for i in order]
        fs = max(4, min(9, int(500 / max(n, 1))))
        ax.set_xticks(ticks)
        ax.set_xticklabels(lab, rotation=90, fontsize=fs)
        ax.set_yticks(ticks)
        ax.set_yticklabels(lab, fontsize=fs)
    else:
        ax.set_xlabel("tokens (cluster order)")
        ax.set_ylabel("tokens (cluster order)")
    if z is not None:
        _dendrogram(ax_tree, z, order)
    ax_tree.set_xlim(0, n)
    ax_tree.axis("off")
    zeros = int(np.count_nonzero(cond == 0))
    ax_tree.set_title(title or f"{_fmt(n)} tokens, average-linkage order; {_fmt(zeros)} pairs at exactly 0")
    return _save(fig, path)


def _dendrogram(ax, z: np.ndarray, order: np.ndarray) -> None:
    """Draw a linkage tree without recursion (scipy's dendrogram recurses once per level)."""
    n = len(order)
    xpos = np.empty(2 * n - 1)
    xpos[order] = np.arange(n) + 0.5
    height = np.zeros(2 * n - 1)
    segs = []
    for i, (c1, c2, h, _) in enumerate(z):
        c1, c2 = int(c1), int(c2)
        x1, x2 = xpos[c1], xpos[c2]
        segs += [((x1, height[c1]), (x1, h)), ((x1, h), (x2, h)), ((x2, h), (x2, height[c2]))]
        xpos[n + i] = (x1 + x2) / 2
        height[n + i] = h
    ax.add_collection(LineCollection(segs, colors="0.25", linewidths=0.5 if n <= 300 else 0.25))
    top = float(z[:, 2].max()) if len(z) else 1.0
    ax.set_ylim(0, top * 1.05 if top > 0 else 1.0)
