"""Which rows a task analyses: load the matrix, keep finite rows, PCA, sky, box (every check once).

Serves every task that starts from one matrix (overdensity, vocab, survey): the same loading
rules, the same refusals, the same messages.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from embdist import geometry, sources
from embdist.errors import InputError

log = logging.getLogger("embdist.selection")

AXES = ("north", "meridian", "equinox")


@dataclass
class Selection:
    matrix: sources.LoadedMatrix      # the tensor as stored, its file and name
    w: torch.Tensor                   # the rows analysed for the sky (finite rows), stored dtype
    kept: torch.Tensor | None         # original ids of w's rows; None when no row was dropped
    pcs: geometry.PCA | None          # None when no sky was asked for
    sky: geometry.Sky | None          # sky coordinates of w's rows
    box: dict | None                  # the box applied (None: every row)
    ids: torch.Tensor                 # original token ids of the selected rows
    x: torch.Tensor                   # the selected rows, stored dtype
    sel: torch.Tensor                 # their row indices in w (and in sky)

    @property
    def n_rows(self) -> int:
        return int(self.matrix.tensor.shape[0])


def check_basis(basis, dim: int) -> None:
    """The sky needs three principal components (3 columns) and basis numbers the matrix has."""
    sources.check_sky(dim, basis)


def load(cfg, rl=None) -> tuple[sources.LoadedMatrix, torch.Tensor, torch.Tensor | None]:
    """The matrix (model.path, else the packaged MiniLM), its finite rows and their original ids."""
    path = cfg.model.path or sources.packaged_minilm_path()
    m = sources.load_matrix(path, cfg.model.tensor)
    log.info("Loaded %s from %s: %s %s", m.name, m.path, tuple(m.tensor.shape), m.tensor.dtype)
    if rl is not None:
        rl.tag("embdist.tensor", m.name)
        rl.tag("embdist.tensor_file", m.path)
        rl.input_file(m.path)
    w, kept = sources.finite_rows(m.tensor, drop=cfg.model.drop_nonfinite, what=f"{m.name} in {m.path}")
    if kept is not None and rl is not None:
        rl.metrics({"n_rows_nonfinite_dropped": int(m.tensor.shape[0]) - len(kept)})
    return m, w, kept


def sky_of(cfg, w: torch.Tensor, rl=None) -> tuple[geometry.PCA, geometry.Sky]:
    """PCA of the rows and their sky coordinates in the configured basis."""
    check_basis(cfg.basis, int(w.shape[1]))
    stage = rl.stage if rl is not None else _no_stage
    with stage("pca"):
        pcs = geometry.pca(w)
    vec = {k: geometry.pc_vector(pcs, getattr(cfg.basis, k)) for k in AXES}
    with stage("sky"):
        sky = geometry.sky_coordinates(w, vec["north"], vec["meridian"], vec["equinox"])
    return pcs, sky


def select_rows(cfg, use_bbox: bool = True, rl=None) -> Selection:
    """Load, keep finite rows, and (``use_bbox``) select the rows inside ``cfg.bbox`` of the sky."""
    stage = rl.stage if rl is not None else _no_stage
    with stage("load"):
        m, w, kept = load(cfg, rl)
    ids_all = kept if kept is not None else torch.arange(w.shape[0])
    if not use_bbox:
        return Selection(m, w, kept, None, None, None, ids_all, w, torch.arange(w.shape[0]))
    pcs, sky = sky_of(cfg, w, rl)
    from embdist.tasks.survey import resolve_box

    box = resolve_box(cfg, sky, rl)  # the bbox's numbers, or with bbox=auto the survey's region bbox.region
    sel = torch.where(geometry.in_box(sky, **box))[0]
    n = len(sel)
    log.info("Found %s tokens in bounding box %s", f"{n:,}", box)
    if n < 2:
        wider, n_wider = geometry.nearest_wider_box(sky, box)
        wider = ", ".join(f"bbox.{k}={v:g}" for k, v in wider.items())
        raise InputError(f"the bounding box selects {n} token(s) of {w.shape[0]:,}; "
                         f"the nearest wider box ({wider}) holds {n_wider:,}")
    return Selection(m, w, kept, pcs, sky, box, ids_all[sel], w[sel], sel)


class _no_stage:
    def __init__(self, name: str):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
