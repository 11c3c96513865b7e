"""Seed 08.4b: distance matrices for every snapshot of a training run."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from embdist import checkpoints, pairwise as engine, paths, plots, rows, sources, store, tables
from embdist.tasks import snapshots_dynamics
from embdist.tracking import RunLog

log = logging.getLogger(__name__)

OUTPUT = "pairwise_distances.safetensors"


def history_path(cfg) -> Path:
    """The configured history, or the bundled toy run (trained once, then reused)."""
    if cfg.history.path:
        return Path(cfg.history.path)
    path = paths.default_history_path()
    if not path.is_file():
        from embdist.toytrain import train_snapshots

        log.info("Training the bundled toy run once (%d steps) into %s", cfg.history.toy_steps, path)
        path.parent.mkdir(parents=True, exist_ok=True)
        train_snapshots(path, steps=cfg.history.toy_steps, seed=cfg.seed, progress=cfg.task.progress)
    return path


def validate(shape, h) -> None:
    """As the seed: a step-count mismatch warns, a (vocab, dim) mismatch is an error."""
    t, v, d = shape
    if h.expected_steps is not None and t != h.expected_steps:
        log.warning("Snapshot count mismatch! Expected %s, got %s", f"{h.expected_steps:,}", f"{t:,}")
    expected = (h.vocab_size or v, h.hidden_dim or d)
    if (v, d) != expected:
        raise sources.InputError(
            f"history has (vocab, dim) = {(v, d)} but the config expects {expected}; "
            "set history.vocab_size / history.hidden_dim (or null to accept any; history=custom expects nothing)"
        )


def want_matrices(cfg, shape, n_metrics: int, out_dir: Path) -> bool:
    """task.matrices, or (null) whether the (T, V, V) matrices fit in memory and on disk."""
    if cfg.task.matrices is not None:
        return bool(cfg.task.matrices)
    t, v, _ = shape
    per_metric = t * v * v
    try:
        store.check_fits(0 if cfg.task.out_of_core else per_metric * 4 * n_metrics,
                         per_metric * store.DTYPES[cfg.task.dtype].itemsize * n_metrics, out_dir, "",
                         cfg.task.memory_limit_gb)
        return True
    except sources.InputError as e:
        log.info("No distance matrices (task.matrices=null and they do not fit: %s); computing the dynamics only", e)
        return False


def run(cfg, rl: RunLog, out_dir: Path) -> dict:
    entries = steps = history = kept = v_all = None
    if not cfg.history.checkpoints and cfg.history.name == "checkpoints":
        raise sources.InputError("history=checkpoints (experiment=checkpoints) needs the series: set "
                                 "history.checkpoints='/runs/NAME/step*' or a list of [step, path] pairs")
    if cfg.history.checkpoints:  # a series of checkpoints, read one at a time
        entries = checkpoints.resolve(cfg.history.checkpoints)
        steps = [s for s, _ in entries]
        with rl.stage("load"):
            first = sources.load_matrix(entries[0][1], cfg.model.tensor)
        shape, path = (len(entries), *first.tensor.shape), Path(entries[0][1])
        log.info("%d checkpoints, steps %d..%d, %s %s", len(entries), steps[0], steps[-1], first.name, tuple(shape[1:]))
        rl.tag("embdist.checkpoints", f"{len(entries)} checkpoints, steps {steps[0]}..{steps[-1]}: {path} ...")
        del first
    else:
        path = history_path(cfg)
        with rl.stage("load"):
            history = sources.load_history(path, cfg.history.tensor)
        shape = tuple(history.shape)
        log.info("Loaded %s from %s: %s %s", cfg.history.tensor, path, shape, history.dtype)
        rl.tag("embdist.history_file", Path(path).resolve())
        rl.input_file(Path(path))
        # NaN/Inf: refused, or (model.drop_nonfinite=true) the tokens left out, as in every task
        history, kept = sources.finite_rows(history, drop=cfg.model.drop_nonfinite,
                                            what=f"{cfg.history.tensor} in {path}")
        if kept is not None:
            rl.metrics({"n_rows_nonfinite_dropped": shape[1] - len(kept)})
            v_all, shape = shape[1], tuple(history.shape)
    t, v, d = shape
    validate(shape, cfg.history)
    n_pairs = v * (v - 1) // 2
    rl.metrics({"n_steps": t, "n_tokens": v, "n_pairs": n_pairs})

    metrics = list(cfg.metric.names)
    summary, reuse = {"n_steps": t, "n_tokens": v, "n_pairs": n_pairs}, {}
    matrices = want_matrices(cfg, shape, len(metrics), out_dir)
    rl.tag("embdist.matrices", matrices)
    if matrices:
        if history is None:
            with rl.stage("load"):
                history = torch.stack([m.tensor for _, m in checkpoints.read_series(entries, cfg.model.tensor)])
        summary = matrices_run(cfg, rl, out_dir, path, history, metrics, steps, reuse, kept, v_all)
    with rl.stage("dynamics"):
        dy = snapshots_dynamics.compute(cfg, history, entries, steps, reuse.get(cfg.dynamics.metric))
    n_all = v if v_all is None else v_all
    strings = snapshots_dynamics.token_strings(cfg, n_all, entries, byte_labels(n_all))
    if kept is not None and strings is not None:
        strings = [strings[i] for i in kept.tolist()]
    summary["dynamics"] = snapshots_dynamics.report(cfg, rl, out_dir, dy, strings, cfg.history.name,
                                                    token_ids=None if kept is None else kept.numpy())
    return summary


def matrices_run(cfg, rl: RunLog, out_dir: Path, path, history, metrics, steps, reuse, kept=None, v_all=None) -> dict:
    """The seed's outputs: the (T, V, V) matrices, curves and summaries."""
    t, v, _ = history.shape
    dtype = store.DTYPES[cfg.task.dtype]
    per_metric = t * v * v
    ooc = cfg.task.out_of_core
    store.check_fits(0 if ooc else per_metric * 4 * len(metrics),
                     per_metric * dtype.itemsize * len(metrics), out_dir,
                     "analyse fewer snapshots" if ooc else
                     "store task.dtype=float16, write the matrices to disk with task.out_of_core=true, "
                     "analyse fewer snapshots, or set task.matrices=false (the dynamics only)", cfg.task.memory_limit_gb)

    with contextlib.ExitStack() as stack:
        mapped = None
        if ooc:  # the file is allocated now and the engine fills it in place; deleted unless completed
            meta = {"history": str(path), "metrics": ",".join(metrics)}
            specs = {f"{metric}_distances": (dtype, (t, v, v)) for metric in metrics}
            if kept is not None:
                specs["token_ids"] = (torch.int64, (v,))
            mapped = stack.enter_context(store.MappedSafetensors(out_dir / OUTPUT, specs, meta))
            if kept is not None:
                mapped.tensors["token_ids"].copy_(kept)
            log.info("Writing the matrices in place into %s (task.out_of_core=true)", mapped.tmp)
        summary = compute(cfg, rl, out_dir, path, history, metrics, dtype, mapped, steps, reuse, kept, v_all)
    return summary


def compute(cfg, rl: RunLog, out_dir: Path, path: Path, history, metrics, dtype, mapped, steps=None,
            reuse: dict | None = None, kept=None, v_all=None) -> dict:
    """Distances for every snapshot (into the memory-mapped file when given), per-step
    statistics, curves, pictures and tables. ``reuse`` receives the float32 matrices in memory;
    ``kept``: the original token ids when tokens holding NaN/Inf were left out (then also
    stored as ``token_ids``)."""
    t, v, _ = history.shape
    steps = list(range(t)) if steps is None else list(steps)
    n_pairs = v * (v - 1) // 2
    tensors, summary, curves = {}, {"n_steps": t, "n_tokens": v, "n_pairs": n_pairs}, {}
    labels = byte_labels(v if v_all is None else v_all)
    if kept is not None:
        tensors["token_ids"] = kept
        labels = None if labels is None else [labels[i] for i in kept.tolist()]
    distinct = rows.distinct_per_step(history)  # its series is logged with the dynamics
    log.info("Computing %s distances for %s snapshots of %d tokens", " and ".join(metrics), f"{t:,}", v)
    with rl.stage("pairwise"):  # one fused pass over every snapshot for all metrics
        out = {m: mapped.tensors[f"{m}_distances"] for m in metrics} if mapped else None
        all_dist = engine.pairwise_snapshots_multi(history, metrics, out_dtype=dtype, device=cfg.task.device,
                                                   out=out, progress=cfg.task.progress)
    for metric in metrics:
        dist = all_dist.pop(metric)
        with rl.stage(f"stats_{metric}"):
            per_step = engine.snapshot_step_stats(dist)
            final = engine.upper_triangle_stats(dist[-1])
            initial = engine.upper_triangle_stats(dist[0])
        for k in ("min", "mean", "max"):
            rl.series(f"{metric}/{k}", per_step[k].tolist(), steps)
        rl.series(f"{metric}/zero_pairs", per_step["zero_pairs"].tolist(), steps)
        # The series end at the final step, so the run's latest values are the final snapshot's.
        rl.metrics({f"{metric}/median": final["median"]}, step=steps[-1])
        rl.metrics({f"{metric}/initial_{k}": initial[k] for k in ("min", "mean", "max")})
        log.info("%s: initial (step 0) min=%.6f, max=%.6f, mean=%.6f", metric, initial["min"], initial["max"], initial["mean"])
        log.info("%s: final (step %d) min=%.6f, max=%.6f, mean=%.6f", metric, t - 1, final["min"], final["max"], final["mean"])
        summary[metric] = {"initial": initial, "final": final}
        curves[metric] = per_step
        with rl.stage(f"report_{metric}"):
            rl.plot(plots.distance_histogram(plots.upper_triangle_histogram(dist[-1]),
                                             out_dir / f"{metric}_final_histogram.png", metric=metric,
                                             title=f"{metric} distances at the final step ({t - 1})"))
            rl.plot(plots.clustered_heatmap(dist[-1], out_dir / f"{metric}_final_heatmap.png", metric=metric,
                                            labels=labels, title=f"{metric} distances at step {t - 1}, clustered"))
        tensors[f"{metric}_distances"] = dist
        if reuse is not None and mapped is None and dist.dtype == torch.float32:
            reuse[metric] = dist

    with rl.stage("save"):
        out = mapped.commit() if mapped else store.save_atomic(
            tensors, out_dir / OUTPUT, metadata={"history": str(path), "metrics": ",".join(metrics)})
    rl.output("pairwise_distances", out)
    log.info("Saved %s (%.1f MB)", out, out.stat().st_size / 1e6)

    with rl.stage("report"):
        columns = {"step": steps, "distinct_vectors": distinct.tolist()}
        for metric, per_step in curves.items():
            columns.update({f"{metric}_{k}": per_step[k].tolist() for k in ("min", "mean", "max", "zero_pairs")})
        rl.table(tables.write_csv(out_dir / "snapshots.csv", columns))
        rl.plot(plots.snapshot_curves(curves, distinct, out_dir / "snapshot_curves.png", steps=steps,
                                      title=f"{cfg.history.name}: {t:,} snapshots of {v} tokens"))
        final_groups = rows.duplicate_groups(history[-1])
        if final_groups:
            rl.plot(plots.group_sizes([len(g) for g in final_groups], out_dir / "group_sizes.png"))
    log.info("Distinct vectors: %d at step 0, %d at the final step", distinct[0], distinct[-1])
    return summary


def byte_labels(v: int) -> list[str] | None:
    """Byte-level vocabularies (the seed's 128 tokens) label rows with the character."""
    if v > 256:
        return None
    return [repr(chr(i))[1:-1] if 32 <= i < 127 else f"\\x{i:02x}" for i in range(v)]
