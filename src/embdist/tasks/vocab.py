"""Whole vocabulary without an N x N matrix: groups, exact neighbours and distance statistics.

Every row of the matrix (or, with ``vocab.use_bbox=true``, the tokens inside the bbox) goes
through the engine's streaming pass (``embdist.pairwise.stream``), one pass per metric. With
``shard.count > 1`` the job computes only its share of the row blocks and writes a partial
(``vocab_shard.npz``); ``embdist.merge`` combines the shards of a sweep into exactly the
single-process result, in the launching process (Hydra callback) or by hand
(``python -m embdist.merge <sweep_dir>``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch

from embdist import config, plots, selection, store, tables, tokens
from embdist.config import Config
from embdist.errors import InputError
from embdist.pairwise import stream
from embdist.tracking import RunLog

log = logging.getLogger(__name__)

SHARD_FILE = "vocab_shard.npz"
NEIGHBOURS = "neighbours.safetensors"
GROUPS = "groups.csv"
PLOT_BINS = 400
MEMBERS_SHOWN = 8


def load_selection(cfg: Config, rl=None):
    """The matrix rows to analyse (stored dtype) and their token ids; the LoadedMatrix."""
    chosen = selection.select_rows(cfg, use_bbox=cfg.vocab.use_bbox, rl=rl)  # rl: bbox=auto logs its box
    return chosen.x, chosen.ids, chosen.matrix


def metrics_of(cfg) -> list[str]:
    names = list(cfg.metric.names)
    bad = [n for n in names if n not in stream.STREAM_METRICS]
    if bad:
        raise InputError(f"task=vocab streams {' and '.join(stream.STREAM_METRICS)} only; "
                                 f"metric {', '.join(bad)} is not supported (use metric=euclidean, chebyshev or both)")
    return names


def group_key(cfg) -> str:
    """Identity of a sharded run: the resolved config without shard.index (and progress)."""
    c = config.as_dict(cfg)
    c.get("shard", {}).pop("index", None)
    c.get("task", {}).pop("progress", None)
    return hashlib.sha256(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run(cfg: Config, rl: RunLog, out_dir: Path) -> dict:
    metrics = metrics_of(cfg)
    if cfg.task.device not in ("cpu", "auto"):
        raise InputError(f"task=vocab runs on the CPU (native kernels); set task.device=cpu, not {cfg.task.device!r}")
    v, sh = cfg.vocab, cfg.shard
    x, ids, m = load_selection(cfg, rl)  # times its stages (load, pca, sky) and records the input on rl
    n, dim = x.shape
    tok = tokens.tokenizer_for(cfg.model.tokenizer, m.path, int(m.tensor.shape[0]))  # read before the work
    log.info("Analysing %s rows of %s", f"{n:,}", m.name)
    rl.metrics({"n_rows": m.tensor.shape[0], "n_tokens": n, "n_pairs": n * (n - 1) // 2})
    K = v.k + max(8, v.k)
    dp = -(-max(dim, 1) // 32) * 32
    ram = (-(-n // 32) * 32) * dp * 4 + n * K * 17 * 2 + n * 64
    disk = n * v.k * 16 * len(metrics) + (n * K * 17 * len(metrics) if sh.count > 1 else 0)
    store.check_fits(ram, disk, out_dir, "select fewer rows (vocab.use_bbox=true) or shard the run over jobs",
                     cfg.task.memory_limit_gb)
    parts = {}
    for i, metric in enumerate(metrics):
        log.info("Streaming %s distances over %s pairs (shard %d of %d)", metric, f"{n * (n - 1) // 2:,}",
                 sh.index, sh.count)
        with rl.stage(f"stream_{metric}"):
            parts[metric] = stream.stream_pass(x, metric, k=v.k, radii=list(v.radii), bins=v.bins, hist_max=v.hist_max,
                                           near_steps=v.near_steps if i == 0 else None, shard=(sh.index, sh.count),
                                           progress=cfg.task.progress)
        rl.metrics({f"{metric}/pairs_streamed": parts[metric].pairs, f"{metric}/flagged_pairs": parts[metric].flagged})
    if sh.count > 1:
        info = {"config": config.as_dict(cfg), "group": group_key(cfg),
                "shard": [sh.index, sh.count], "tensor_file": str(m.path), "tensor": m.name}
        with rl.stage("save"):
            path = stream.save_partials(out_dir / SHARD_FILE, parts, extra={"token_ids": ids.numpy()}, info=info)
        rl.output("shard", path)
        rl.tag("embdist.shard", f"{sh.index}/{sh.count}")
        log.info("Shard %d of %d written to %s; the merge combines the shards", sh.index, sh.count, path)
        return {"shard": sh.index, "path": str(path)}
    with rl.stage("finalize"):
        results = {metric: stream.finalize(x, p) for metric, p in parts.items()}
    return report(results, ids, out_dir, rl, cfg, m.path, tokenizer=tok)


def _tokenizer(cfg, tensor_file):
    loc = Path(cfg.model.tokenizer) if cfg.model.tokenizer else Path(tensor_file).parent
    try:
        return tokens.load_tokenizer(loc)
    except Exception as e:  # a broken tokenizer must not lose the results
        log.warning("no token strings: %s", e)
        return None


def report(results: dict, ids: torch.Tensor, out_dir: Path, rl: RunLog | None, cfg, tensor_file, tokenizer=None) -> dict:
    """Write the outputs of finished results (single run or merged shards) and log them."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids_np = ids.numpy().astype(np.int64)
    first = next(iter(results.values()))
    n = first.n

    def tok(rows: np.ndarray) -> np.ndarray:
        return np.where(rows >= 0, ids_np[np.clip(rows, 0, max(n - 1, 0))], -1)

    tensors = {"token_ids": torch.from_numpy(ids_np)}
    summary: dict = {"n_tokens": n}
    mets: dict = {}
    for metric, r in results.items():
        tensors[f"{metric}_neighbour_ids"] = torch.from_numpy(tok(r.knn_ids))
        tensors[f"{metric}_neighbour_distances"] = torch.from_numpy(r.knn_dist)
        tensors[f"{metric}_histogram"] = torch.from_numpy(r.hist_counts)
        tensors[f"{metric}_histogram_edges"] = torch.from_numpy(r.hist_edges)
        st = r.stats
        for key in ("min", "min_nonzero", "mean", "max", "median", "median_error_bound", "zero_pairs"):
            mets[f"{metric}/{key}"] = st[key]
        for rad, c in st["below"].items():
            mets[f"{metric}/below_{rad:g}"] = c
        for key, val in r.diagnostics.items():
            mets[f"{metric}/{key}"] = val
        summary[metric] = st
        log.info("%s over %s pairs: min %.10g, mean %.10g, max %.10g, median %.6g ± %.2g, exact zeros %s; %s",
                 metric, f"{st['n_pairs']:,}", st["min"], st["mean"], st["max"], st["median"],
                 st["median_error_bound"], f"{st['zero_pairs']:,}",
                 ", ".join(f"below {k:g}: {c:,}" for k, c in st["below"].items()))
    dup = first.duplicate_groups
    near_r = next((r for r in results.values() if r.near_groups is not None), None)
    near = near_r.near_groups if near_r is not None else []
    mets.update({"n_pairs": first.stats["n_pairs"], "distinct_vectors": n - sum(len(g) - 1 for g in dup),
                 "duplicate_groups": len(dup), "duplicate_tokens": sum(len(g) for g in dup),
                 "duplicate_pairs": first.stats["zero_pairs"]})
    if near_r is not None:
        mets.update({"near_groups": len(near), "near_tokens": sum(len(g) for g in near)})
    summary.update({"duplicate_group_sizes": [len(g) for g in dup], "near_group_sizes": [len(g) for g in near]})
    log.info("%s distinct vectors; %d exact-duplicate groups (sizes %s)", f"{mets['distinct_vectors']:,}", len(dup),
             ", ".join(str(len(g)) for g in dup[:20]) + (" …" if len(dup) > 20 else ""))
    if near_r is not None:
        log.info("%d near-duplicate groups within %d steps (sizes %s)", len(near), near_r.near_steps,
                 ", ".join(str(len(g)) for g in near[:20]) + (" …" if len(near) > 20 else ""))

    # save_atomic stores the metadata as one sorted-JSON key: byte-identical single and merged runs
    path = store.save_atomic(tensors, out_dir / NEIGHBOURS, metadata={
        "model": str(cfg.model.name), "metrics": list(results), "k": first.k})
    tk = tokenizer if tokenizer is not None else _tokenizer(cfg, tensor_file)
    kinds = [("duplicate", g) for g in dup] + [("near", g) for g in near]
    shown = sorted({int(i) for _, g in kinds for i in g[:MEMBERS_SHOWN]})
    strings = dict(zip(shown, (t.string for t in tokens.describe_tokens(tk, [int(ids_np[i]) for i in shown])))) \
        if shown else {}
    gpath = tables.write_csv(out_dir / GROUPS, {
        "kind": [k for k, _ in kinds],
        "group": [i for i, _ in enumerate(dup)] + [i for i, _ in enumerate(near)],
        "size": [len(g) for _, g in kinds],
        "pairs": [len(g) * (len(g) - 1) // 2 for _, g in kinds],
        "member_ids": [" ".join(str(int(ids_np[i])) for i in g) for _, g in kinds],
        "member_strings": [" | ".join(strings[int(i)] for i in g[:MEMBERS_SHOWN]) for _, g in kinds],
    })
    hist_files = []
    for metric, r in results.items():
        e, c = _coarse(r.hist_edges, r.hist_counts, r.stats["max"])
        hist_files.append(tables.write_csv(out_dir / f"{metric}_histogram.csv",
                                           {"lo": e[:-1].tolist(), "hi": e[1:].tolist(), "pairs": c.tolist()}))
    pngs = []
    try:
        for metric, r in results.items():
            e, c = _coarse(r.hist_edges, r.hist_counts, r.stats["max"])
            pngs.append(plots.distance_histogram((e, c), out_dir / f"{metric}_histogram.png", metric=metric,
                                                 zero_count=r.stats["zero_pairs"]))
        if dup:
            pngs.append(plots.group_sizes([len(g) for g in dup], out_dir / "group_sizes.png"))
    except Exception as e:  # plots are a convenience; the numbers are written already
        log.warning("plots skipped: %s", e)
    if rl is not None:
        rl.metrics({k: float(v) for k, v in mets.items() if v is not None and not (isinstance(v, float) and math.isnan(v))})
        rl.output("neighbours", path)
        rl.tag("duplicate_group_sizes", ",".join(str(len(g)) for g in dup))
        rl.tag("near_group_sizes", ",".join(str(len(g)) for g in near))
        rl.table(gpath)
        for f in hist_files:
            rl.table(f)
        for p in pngs:
            rl.plot(p)
    summary["metrics"] = mets
    return summary


def _coarse(edges: np.ndarray, counts: np.ndarray, dmax: float, bins: int = PLOT_BINS):
    """The histogram merged into about ``bins`` bins over [0, max] (for the table and the plot)."""
    nb = len(counts)
    last = int(np.searchsorted(edges, dmax, side="right")) if math.isfinite(dmax) else nb
    last = max(1, min(nb, last))
    step = max(1, -(-last // bins))
    m = -(-last // step) * step
    c = np.zeros(m, dtype=np.int64)
    c[:min(m, nb)] = counts[:min(m, nb)]
    c[min(m, nb) - 1] += counts[min(m, nb):].sum()
    c = c.reshape(-1, step).sum(1)
    w = edges[1] - edges[0]
    e = edges[0] + w * step * np.arange(len(c) + 1)
    return e, c
