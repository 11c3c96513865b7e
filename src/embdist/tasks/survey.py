"""Where are the collapsed tokens?  Over-dense regions of the PCA sky, found without a box.

For every row of the matrix: the PCA sky (as task=overdensity), the over-dense regions
(``embdist.regions``), exact-duplicate groups (row hashing, no N^2 work), tokenizer
reachability and magikarp's under-trained indicator (``embdist.flags``).  Writes
``regions.csv`` (one row per region with its box), ``tokens.csv`` (one row per token),
``sky_map_regions.png`` and ``sky_map.html`` (interactive), all on the MLflow run, and logs the
override line of every region (``bbox.lat_min=… bbox.r_max=…``; or ``bbox=auto bbox.region=N``).

:func:`resolve_box` is the ``bbox=auto`` hook of task=overdensity and task=vocab.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from embdist import flags, geometry, regions as regions_mod, rows, selection, tables, tokens
from embdist.config import Config
from embdist.errors import InputError
from embdist.tracking import RunLog

log = logging.getLogger(__name__)

EXAMPLES = 8  # token strings shown per region


def detect(cfg, sky: geometry.Sky) -> list[regions_mod.Region]:
    s = cfg.survey
    return regions_mod.detect(sky.lat.numpy(), sky.lon.numpy(), sky.r.numpy(), scales=tuple(s.scales),
                              degree=s.degree, min_significance=s.min_significance, min_excess=s.min_excess,
                              max_regions=s.max_regions, max_r_fraction=s.max_r_fraction)


def resolve_box(cfg, sky: geometry.Sky, rl: RunLog | None = None) -> dict:
    """The six box numbers: the config's, or with ``bbox.region=N`` (``bbox=auto``) the box of
    the survey's Nth region, logged as params ``bbox_resolved.*`` and the override line."""
    b = cfg.bbox
    box = {k: float(getattr(b, k)) for k in regions_mod.BOX_KEYS}
    n = getattr(b, "region", None)
    if n is None:
        return box
    found = detect(cfg, sky)
    if not found:
        raise InputError(f"bbox.region={n}: the survey found no over-dense region (survey.min_significance="
                                 f"{cfg.survey.min_significance}); give the box's numbers instead of bbox=auto")
    if n > len(found):
        raise InputError(f"bbox.region={n}: the survey found {len(found)} region(s); choose bbox.region=1.."
                                 f"{len(found)} (python -m embdist task=survey lists them)")
    g = found[n - 1]
    box = g.box()
    log.info("bbox=auto: region %d of %d: %s tokens (%.1f expected, %.1f sigma): %s", n, len(found), f"{g.tokens:,}",
             g.expected, g.significance, g.override())
    if rl is not None:
        rl.params({f"bbox_resolved.{k}": repr(v) for k, v in box.items()})
        rl.tag("bbox_resolved.override", g.override())
        rl.metrics({"bbox_resolved/tokens": g.tokens, "bbox_resolved/expected": g.expected,
                    "bbox_resolved/significance": g.significance})
    return box


def group_labels(w) -> np.ndarray:
    """Per row: the smallest row index of its exact-duplicate group (``embdist.rows``), -1 for
    a row identical to no other."""
    labels = rows.row_groups(w)
    size = np.bincount(labels, minlength=len(labels))
    return np.where(size[labels] > 1, labels, -1).astype(np.int64)


def token_table(cfg, tensor_file, ids: np.ndarray):
    """(tokenizer or None, TokenInfo per id)."""
    loc = Path(cfg.model.tokenizer) if cfg.model.tokenizer else Path(tensor_file).parent
    try:
        tok = tokens.load_tokenizer(loc)
    except Exception as e:  # a broken tokenizer must not lose the survey
        log.warning("no token strings: %s", e)
        tok = None
    return tok, tokens.describe_tokens(tok, ids)


def run(cfg: Config, rl: RunLog, out_dir: Path) -> dict:
    out_dir = Path(out_dir)
    with rl.stage("load"):
        m, w, kept = selection.load(cfg, rl)
    n_rows = int(m.tensor.shape[0])
    outside = sorted(i for i in set(cfg.survey.untrained_ids) if not 0 <= int(i) < n_rows)
    if outside:  # before the work: a typo here would quietly leave the magikarp reference smaller
        raise InputError(f"survey.untrained_ids {outside[:5]} {'are' if len(outside) > 1 else 'is'} not a row of "
                         f"{cfg.model.name} ({n_rows:,} rows: ids 0..{n_rows - 1}); give token ids of this matrix")
    pcs, sky = selection.sky_of(cfg, w, rl)
    ids = (kept if kept is not None else torch.arange(w.shape[0])).numpy().astype(np.int64)
    n = len(ids)
    with rl.stage("regions"):
        found = detect(cfg, sky)
    with rl.stage("duplicates"):
        label = group_labels(w)
    with rl.stage("flags"):
        tok, infos = token_table(cfg, m.path, ids)
        cats = np.array([t.category for t in infos])
        reach = flags.reachable(tok, ids)
        extra = set(int(i) for i in cfg.survey.untrained_ids)
        ref = np.flatnonzero(np.isin(cats, ("beyond_vocab", "unused")) | np.isin(ids, sorted(extra)))
        if len(ref) == 0:
            log.warning("no reference rows known to be untrained (no beyond_vocab or [unused*] token, "
                        "survey.untrained_ids empty): the magikarp column is empty")
        indicator = flags.magikarp_indicator(w, ref, geometry.pc_vector(pcs, 1))
    region_of = regions_mod.region_of_rows(found, n)
    lat, lon, r = sky.lat.numpy(), sky.lon.numpy(), sky.r.numpy()
    strings = [t.string for t in infos]

    with rl.stage("report"):
        rl.table(tables.write_csv(out_dir / "tokens.csv", {
            "id": ids.tolist(), "string": strings, "category": cats.tolist(),
            "lat": lat.tolist(), "lon": lon.tolist(), "r": r.tolist(),
            "duplicate_group": np.where(label >= 0, ids[np.maximum(label, 0)], -1).tolist(),
            "reachable": reach.astype(int).tolist(), "magikarp": indicator.tolist(), "region": region_of.tolist(),
        }))
        rl.table(tables.write_csv(out_dir / "regions.csv", region_columns(found, ids, strings, cats, label)))
        for g in found:
            log.info("region %d: %s tokens, %.1f expected, %.1f sigma (%s in duplicate groups); paste: %s",
                     g.rank, f"{g.tokens:,}", g.expected, g.significance,
                     f"{int((label[g.members] >= 0).sum()):,}", g.override())
            rl.tag(f"region.{g.rank}.override", g.override())
        if not found:
            log.info("no over-dense region above %.1f sigma", cfg.survey.min_significance)
        dup_rows = int((label >= 0).sum())
        rl.metrics({"n_rows": n, "regions": len(found), "duplicate_tokens": dup_rows,
                    "distinct_vectors": n - dup_rows + len(np.unique(label[label >= 0])),
                    "unreachable": int((~reach).sum()), "magikarp_reference_rows": len(ref)})
        for g in found[:10]:
            rl.metrics({f"region_{g.rank}/tokens": g.tokens, f"region_{g.rank}/expected": g.expected,
                        f"region_{g.rank}/significance": g.significance})
        title = (f"{cfg.model.name}: PCA sky (north PC{cfg.basis.north}, meridian PC{cfg.basis.meridian}, "
                 f"equinox PC{cfg.basis.equinox})")
        from embdist import plots_survey

        boxes = [region_dict(g) for g in found]
        rl.plot(plots_survey.survey_sky_map(lat, lon, r, boxes, out_dir / "sky_map_regions.png", title=title))
        if cfg.survey.html:
            page = write_html(out_dir / "sky_map.html", ids, sky, strings, cats, label, boxes, None, title)
            rl.artifact(page, "html")
            rl.output("sky_html", page)
    return {"regions": [region_dict(g) for g in found], "n_rows": n}


def region_dict(g: regions_mod.Region) -> dict:
    return {"rank": g.rank, **g.box(), "tokens": g.tokens, "expected": g.expected, "significance": g.significance}


def sky_page(path, chosen: selection.Selection, tok, boxes, box, title) -> Path:
    """The interactive page of every row of a selection (task=overdensity: its box drawn)."""
    ids = (chosen.kept if chosen.kept is not None else torch.arange(chosen.w.shape[0])).numpy().astype(np.int64)
    infos = tokens.describe_tokens(tok, ids)
    return write_html(path, ids, chosen.sky, [t.string for t in infos], [t.category for t in infos],
                      group_labels(chosen.w), boxes, box, title)


def write_html(path, ids, sky, strings, cats, label, boxes, box, title) -> Path:
    from embdist import skyhtml

    return skyhtml.write_sky_html(path, ids=ids, lat=sky.lat.numpy(), lon=sky.lon.numpy(), r=sky.r.numpy(),
                                  strings=strings, categories=list(cats),
                                  groups=np.where(label >= 0, ids[np.maximum(label, 0)], -1),
                                  regions=boxes, box=box, title=title)


def region_columns(found, ids, strings, cats, label) -> dict:
    cols = {k: [] for k in ("rank", *regions_mod.BOX_KEYS, "tokens", "expected", "significance", "excess",
                            "duplicate_tokens", *(f"n_{c}" for c in tokens.CATEGORIES), "centre_lat", "centre_lon",
                            "scale_deg", "r_fraction", "examples", "override")}
    for g in found:
        mem = g.members
        for k in ("rank", *regions_mod.BOX_KEYS, "tokens", "expected", "significance", "excess", "centre_lat",
                  "centre_lon", "scale_deg", "r_fraction"):
            cols[k].append(getattr(g, k))
        cols["duplicate_tokens"].append(int((label[mem] >= 0).sum()))
        for c in tokens.CATEGORIES:
            cols[f"n_{c}"].append(int((cats[mem] == c).sum()))
        cols["examples"].append(" | ".join(f"{ids[i]}:{strings[i]}" for i in mem[:EXAMPLES]))
        cols["override"].append(g.override())
    return cols
