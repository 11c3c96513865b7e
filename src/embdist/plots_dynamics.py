"""Pictures of the training dynamics (``embdist.dynamics.Dynamics``), each one PNG.

* ``dynamics_curves``: distinct vectors and connected components per threshold against step,
  fission and merge events per step below;
* ``lineage``: an icicle of the groups of identical tokens: tokens on the vertical axis in an
  order that keeps every group contiguous while groups only split, one box per group and
  period between changes, shaded by the group's size; a split shows as a box ending in
  several thinner ones;
* ``freeze_histogram``: the step at which each token last moved;
* ``displacement_heatmap``: lattice units moved per token and step, tokens ordered by freeze
  step (log colour scale).

``log_step=True`` draws the step axis symmetric-logarithmic (linear below step 1), so step 0
stays on the axis.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.collections import PatchCollection
from matplotlib.colors import LogNorm
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from embdist.plots import DPI, _figure, _fmt, _save

MAX_LINEAGE_TOKENS = 2000   # larger vocabularies: the tokens that ever share a vector, biggest groups first
MAX_HEAT_ROWS, MAX_HEAT_COLS = 600, 1000


def _step_axis(ax, log_step: bool, steps=None) -> None:
    if log_step:
        ax.set_xscale("symlog", linthresh=1.0)
    if steps is not None and len(steps):
        ax.set_xlim(steps[0], max(steps[-1], steps[0] + 1))
    ax.set_xlabel("training step" + (" (log)" if log_step else ""))


def dynamics_curves(dy, path: str | os.PathLike, log_step: bool = False, title: str | None = None,
                    dpi: int = DPI) -> Path:
    fig = _figure(11, 7, dpi)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2.2, 1]})
    s = dy.steps
    top.plot(s, dy.distinct, lw=1.6, color="black", label="distinct vectors")
    for thr, c in dy.components.items():
        top.plot(s, c["count"], lw=1.2, label=f"components, {dy.metric} <= {thr:g}")
    top.set_ylabel("count")
    top.yaxis.set_major_locator(MaxNLocator(integer=True))
    top.legend(loc="best", fontsize=9)
    top.grid(True, lw=0.3, alpha=0.5)
    bottom.vlines(s, 0, dy.fissions, color="#d62728", lw=1.2, label=f"fission ({_fmt(dy.fissions.sum())})")
    bottom.vlines(s, 0, -dy.merges, color="#1f77b4", lw=1.2, label=f"merge ({_fmt(dy.merges.sum())}, drawn below 0)")
    bottom.axhline(0, color="grey", lw=0.5)
    bottom.set_ylabel("events per step")
    bottom.yaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.legend(loc="best", fontsize=9)
    bottom.grid(True, lw=0.3, alpha=0.5)
    _step_axis(bottom, log_step, s)
    fig.suptitle(title or f"{_fmt(dy.groups.shape[1])} tokens over {_fmt(len(s))} steps: distinct vectors "
                          f"{_fmt(dy.distinct[0])} -> {_fmt(dy.distinct[-1])}")
    fig.tight_layout()
    return _save(fig, path)


def lineage_order(groups: np.ndarray, tokens: np.ndarray | None = None) -> np.ndarray:
    """Token order keeping every group contiguous at every step while groups only split: sort
    by the group id at each step where the grouping changes, the earliest step first."""
    g = groups if tokens is None else groups[:, tokens]
    change = np.flatnonzero((g[1:] != g[:-1]).any(axis=1)) + 1
    keys = [g[t] for t in np.concatenate(([0], change))][::-1] if len(g) else []
    idx = np.arange(g.shape[1])
    return idx[np.lexsort([idx] + keys)] if keys else idx


def lineage(dy, path: str | os.PathLike, labels=None, log_step: bool = False, title: str | None = None,
            dpi: int = DPI) -> Path:
    groups = dy.groups
    t_len, v = groups.shape
    sizes_all = np.stack([np.bincount(groups[t], minlength=v)[groups[t]] for t in range(t_len)])
    tokens = np.arange(v)
    if v > MAX_LINEAGE_TOKENS:            # the tokens that ever share a vector, biggest groups first
        best = sizes_all.max(axis=0)
        shared = np.flatnonzero(best > 1)
        tokens = np.sort(shared[np.argsort(-best[shared], kind="stable")[:MAX_LINEAGE_TOKENS]])
    order = tokens[lineage_order(groups, tokens)]
    if len(order) == 0:                   # no token ever shares a vector: nothing to draw but the fact
        fig = _figure(10, 3, dpi)
        ax = fig.subplots()
        ax.text(0.5, 0.5, f"no two of the {_fmt(v)} tokens share a vector at any step", ha="center", va="center")
        ax.set_axis_off()
        return _save(fig, path)
    g = groups[:, order]
    change = np.flatnonzero((g[1:] != g[:-1]).any(axis=1)) + 1
    starts = np.concatenate(([0], change))
    ends = np.concatenate((change, [t_len - 1]))
    s = dy.steps.astype(np.float64)
    rects, vals = [], []
    for a, b in zip(starts, ends):
        col = g[a]
        cut = np.flatnonzero(col[1:] != col[:-1]) + 1
        lo = np.concatenate(([0], cut))
        hi = np.concatenate((cut, [len(col)]))
        x0, x1 = s[a], s[b] if b > a else s[a] + 1
        for y0, y1 in zip(lo, hi):
            rects.append(Rectangle((x0, y0), x1 - x0, y1 - y0))
            vals.append(sizes_all[a, order[y0]])
    n_tok = len(order)
    fig = _figure(13, max(6, min(22, 0.11 * n_tok + 2)), dpi)
    ax = fig.subplots()
    vals = np.asarray(vals, dtype=np.float64)
    pc = PatchCollection(rects, cmap="viridis_r", norm=LogNorm(1, max(2, vals.max())), edgecolor="white",
                         linewidth=0.4)
    pc.set_array(vals)
    ax.add_collection(pc)
    ax.set_ylim(n_tok, 0)
    if labels is not None and n_tok <= 200:
        ax.set_yticks(np.arange(n_tok) + 0.5)
        ax.set_yticklabels([labels[i] for i in order], fontsize=max(4, min(8, 900 // max(n_tok, 1))), family="monospace")
    else:
        ax.set_ylabel("tokens (lineage order)")
    _step_axis(ax, log_step, s)
    cb = fig.colorbar(pc, ax=ax, pad=0.01)
    cb.set_label("tokens sharing the vector (group size)")
    fig.suptitle(title or f"Lineage of the groups of identical vectors ({_fmt(n_tok)} tokens; "
                          f"{_fmt(int(dy.fissions.sum()))} fissions, {_fmt(int(dy.merges.sum()))} merges)")
    fig.tight_layout()
    return _save(fig, path)


def freeze_histogram(dy, path: str | os.PathLike, log_step: bool = False, title: str | None = None,
                     dpi: int = DPI) -> Path:
    fig = _figure(10, 5, dpi)
    ax = fig.subplots()
    moved = dy.freeze >= 0
    fs = dy.steps[dy.freeze[moved]].astype(np.float64)
    never = int((~moved).sum())
    if fs.size:
        lo, hi = dy.steps[0], dy.steps[-1]
        if log_step:
            edges = np.unique(np.concatenate(([lo, lo + 1], np.geomspace(max(lo + 1, 1), max(hi + 1, 2), 60))))
        else:
            edges = np.linspace(lo, hi + 1, min(80, max(2, len(dy.steps))) + 1)
        ax.hist(fs, bins=edges, color="#2ca02c", edgecolor="white", linewidth=0.3)
    ax.set_ylabel("tokens")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    _step_axis(ax, log_step, dy.steps)
    ax.grid(True, axis="y", lw=0.3, alpha=0.5)
    ax.set_title(f"{_fmt(int(moved.sum()))} tokens moved, {_fmt(never)} never changed; "
                 f"still moving at the last step: {_fmt(int((dy.freeze == len(dy.steps) - 1).sum()))}", fontsize=10)
    fig.suptitle(title or "Freeze step: the last step a token's row changed")
    fig.tight_layout()
    return _save(fig, path)


def _bin_sum(a: np.ndarray, n: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Sum a along axis into at most n contiguous bins; returns (binned, bin start indices)."""
    m = a.shape[axis]
    starts = np.unique(np.linspace(0, m, min(n, m) + 1).astype(np.int64))[:-1]
    return np.add.reduceat(a, starts, axis=axis), starts


def displacement_heatmap(dy, path: str | os.PathLike, labels=None, log_step: bool = False,
                         title: str | None = None, dpi: int = DPI) -> Path:
    order = np.lexsort((np.arange(len(dy.freeze)), np.where(dy.freeze < 0, np.iinfo(np.int64).max, dy.freeze)))
    d = dy.displacement[:, order].T                       # tokens x steps
    d, col0 = _bin_sum(d, MAX_HEAT_COLS, 1)
    rows_binned = d.shape[0] > MAX_HEAT_ROWS
    if rows_binned:
        d, row0 = _bin_sum(d, MAX_HEAT_ROWS, 0)
    s = dy.steps.astype(np.float64)
    xe = np.concatenate((s[col0], [s[-1] + 1]))
    ye = np.arange(d.shape[0] + 1)
    fig = _figure(13, max(6, min(20, 0.1 * d.shape[0] + 2)), dpi)
    ax = fig.subplots()
    pos = d[d > 0]
    norm = LogNorm(pos.min(), max(pos.max(), pos.min() * 2)) if pos.size else None
    mesh = ax.pcolormesh(xe, ye, np.ma.masked_less_equal(d, 0), cmap="magma_r", norm=norm, shading="flat")
    ax.set_facecolor("#f4f4f4")
    ax.set_ylim(d.shape[0], 0)
    if labels is not None and not rows_binned and d.shape[0] <= 200:
        ax.set_yticks(ye[:-1] + 0.5)
        ax.set_yticklabels([labels[i] for i in order], fontsize=max(4, min(8, 900 // d.shape[0])), family="monospace")
    else:
        ax.set_ylabel("tokens by freeze step" + (" (binned)" if rows_binned else ""))
    _step_axis(ax, log_step, xe)
    cb = fig.colorbar(mesh, ax=ax, pad=0.01)
    cb.set_label("lattice units moved (sum over coordinates" + (", steps binned)" if len(col0) < len(s) else ")"))
    fig.suptitle(title or "Displacement in bf16 lattice units (dW / 2^(E-134)), tokens ordered by freeze step "
                          "(never-changed last; grey: no move)")
    fig.tight_layout()
    return _save(fig, path)
