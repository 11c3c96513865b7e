"""Seed 1.4b: pairwise distances between the tokens inside a box of the PCA sky."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np
import torch

from embdist import pairwise as engine, plots, rows, selection, store, tables, tokens
from embdist.config import Config
from embdist.errors import InputError
from embdist.pairwise import nearest_neighbours
from embdist.tracking import RunLog

log = logging.getLogger(__name__)

OUTPUT = "distances.safetensors"
# Seed keys: the L2 matrix is "distances"; the others get "<metric>_distances".
KEYS = {"euclidean": "distances"}


def key_for(metric: str) -> str:
    return KEYS.get(metric, f"{metric}_distances")


def run(cfg: Config, rl: RunLog, out_dir: Path) -> dict:
    if cfg.task.out_of_core and cfg.task.dtype != "float32":
        raise InputError(f"task.out_of_core=true writes the engine's float32 matrices in place, "
                                 f"not task.dtype={cfg.task.dtype}; set task.dtype=float32 or task.out_of_core=false")
    chosen = selection.select_rows(cfg, use_bbox=True, rl=rl)
    m, ids, sky, box = chosen.matrix, chosen.ids, chosen.sky, chosen.box
    n_rows, dim = m.tensor.shape
    tok = tokens.tokenizer_for(cfg.model.tokenizer, m.path, n_rows)  # read now: the report must not fail on it
    n = len(ids)
    n_pairs = n * (n - 1) // 2
    rl.metrics({"n_rows": n_rows, "n_tokens": n, "n_pairs": n_pairs})

    metrics = list(cfg.metric.names)
    dtype = store.DTYPES[cfg.task.dtype]
    ooc = cfg.task.out_of_core
    out_bytes = 0 if ooc else engine.output_nbytes(n) * len(metrics)   # out of core: in the page cache
    disk_bytes = sum(engine.output_nbytes(n, dtype) for _ in metrics) + n * 8
    store.check_fits(out_bytes + working_bytes(n, dim), disk_bytes, out_dir,
                     "narrow the bbox, or use task=vocab (no N x N matrix)" if ooc else
                     "narrow the bbox, store task.dtype=float16, write the matrices to disk with "
                     f"task.out_of_core=true{'' if cfg.task.dtype == 'float32' else ' task.dtype=float32'}, "
                     "or use task=vocab (no N x N matrix)",
                     cfg.task.memory_limit_gb)

    x = chosen.x  # stored dtype (bf16 for Qwen) until the engine computes in fp32
    tensors: dict[str, torch.Tensor] = {"spike_token_ids": ids}
    summary = {"n_tokens": n, "n_pairs": n_pairs}
    dup = rows.duplicate_groups(x)
    rl.metrics({"duplicate_groups": len(dup), "distinct_vectors": n - sum(len(g) - 1 for g in dup)})
    meta = {"model": cfg.model.name, "tensor": m.name, "metrics": ",".join(metrics)}
    nn_ids = nn_dist = None
    with contextlib.ExitStack() as stack:
        mapped = None
        if ooc:  # the file is allocated now and filled in place; deleted unless the run completes
            specs = {"spike_token_ids": (torch.int64, (n,))}
            specs.update({key_for(metric): (torch.float32, (n, n)) for metric in metrics})
            mapped = stack.enter_context(store.MappedSafetensors(out_dir / OUTPUT, specs, meta))
            mapped.tensors["spike_token_ids"].copy_(ids)
            log.info("Writing the matrices in place into %s (task.out_of_core=true)", mapped.tmp)
        for metric in metrics:
            log.info("Computing %s distances between %s tokens", metric, f"{n:,}")
            with rl.stage(f"pairwise_{metric}"):
                d = engine.pairwise(x, metric, device=cfg.task.device, progress=cfg.task.progress,
                                    out=mapped.tensors[key_for(metric)] if mapped else None)
            with rl.stage(f"stats_{metric}"):
                st = engine.upper_triangle_stats(d)
            log_stats(metric, st)
            rl.metrics({f"{metric}/{k}": v for k, v in st.items() if k != "n_pairs"})
            summary[metric] = st
            with rl.stage(f"report_{metric}"):
                edges, counts, zeros = plots.upper_triangle_histogram(d)
                rl.plot(plots.distance_histogram((edges, counts, zeros), out_dir / f"{metric}_histogram.png",
                                                 metric=metric))
                if n <= HEATMAP_MAX:
                    rl.plot(plots.clustered_heatmap(d, out_dir / f"{metric}_heatmap.png", metric=metric))
                if nn_ids is None:  # nearest neighbours by the first metric chosen
                    nn_ids, nn_dist = nearest_neighbours(d)
                    nn_metric = metric
            if mapped is None:
                tensors[key_for(metric)] = d if d.dtype == dtype else d.to(dtype)
            del d

        with rl.stage("save"):
            out = mapped.commit() if mapped else store.save_atomic(tensors, out_dir / OUTPUT, metadata=meta)
    rl.output("distances", out)
    log.info("Saved %s (%.1f MB)", out, out.stat().st_size / 1024**2)

    with rl.stage("report"):
        infos = tokens.describe_tokens(tok, ids.tolist())
        group_of = np.full(n, -1)
        for gi, g in enumerate(dup):
            group_of[g] = gi
        sel = chosen.sel  # rows of the analysed matrix
        norms = x.to(torch.float64).norm(dim=1)
        rl.table(tables.write_csv(out_dir / "tokens.csv", {
            "id": ids.tolist(), "string": [t.string for t in infos], "category": [t.category for t in infos],
            "lat": sky.lat[sel].tolist(), "lon": sky.lon[sel].tolist(), "r": sky.r[sel].tolist(),
            "norm": norms.tolist(), "duplicate_group": group_of.tolist(),
            "nearest_id": ids[nn_ids].tolist(), f"nearest_{nn_metric}": nn_dist.tolist(),
        }))
        rl.table(tables.write_csv(out_dir / "duplicate_groups.csv", {
            "group": list(range(len(dup))), "size": [len(g) for g in dup],
            "pairs": [len(g) * (len(g) - 1) // 2 for g in dup],
            "member_ids": [" ".join(str(int(ids[i])) for i in g[:MEMBERS_SHOWN]) for g in dup],
            "member_strings": [" | ".join(infos[i].string for i in g[:MEMBERS_SHOWN]) for g in dup],
        }))
        for cat, count in tokens.category_counts(infos).items():
            rl.metrics({f"tokens/{cat}": count})
        rl.plot(plots.sky_map(sky.lat, sky.lon, sky.r, box, out_dir / "sky_map.png",
                              title=f"{cfg.model.name}: PCA sky (north PC{cfg.basis.north}, meridian PC{cfg.basis.meridian}, "
                                    f"equinox PC{cfg.basis.equinox})"))
        if dup:
            rl.plot(plots.group_sizes([len(g) for g in dup], out_dir / "group_sizes.png"))
        from embdist.tasks import survey  # the same page as task=survey, with this run's box

        page = survey.sky_page(out_dir / "sky_map.html", chosen, tok, [], box, f"{cfg.model.name}: PCA sky and the box")
        rl.artifact(page, "html")
    return summary


HEATMAP_MAX = 2000  # clustered heat maps beyond this many tokens are unreadable and slow
MEMBERS_SHOWN = 8


def working_bytes(n: int, dim: int) -> int:
    """Memory besides the output: the engine's float32 and packed copies of the rows and its
    tiles (~2 x 4 n dim + 64 MB), the stored rows, and the nearest-neighbour row blocks."""
    return 3 * n * dim * 4 + (64 << 20) + 2 * 1024 * n * 4


def log_stats(metric: str, st: dict) -> None:
    """The seed's summary block."""
    log.info("%s distance statistics (excluding diagonal):", metric)
    log.info("  Number of pairs: %s", f"{st['n_pairs']:,}")
    for k in ("min", "median", "mean", "max"):
        log.info("  %s: %.10f", k.capitalize(), st[k])
    log.info("Exact zeros (off-diagonal): %s", f"{st['zero_pairs']:,}")
