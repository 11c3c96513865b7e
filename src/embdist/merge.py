"""Merge the shards of a sharded ``task=vocab`` run into exactly the single-process result.

A sweep such as ``python -m embdist -m task=vocab shard.count=4 shard.index=0,1,2,3
hydra/launcher=joblib`` (or ``submitit_slurm`` on a cluster) leaves one ``vocab_shard.npz`` per
job.  ``embdist.callbacks.MergeShards`` (a Hydra callback that ``conf/task/vocab.yaml`` registers) runs in the
launching process when every job has returned: it merges the shards of each run found in the
sweep folder, writes the outputs to ``<sweep_dir>/merged/`` and logs them on the sweep's parent
MLflow run.  By hand (e.g. after re-running a failed shard)::

    python -m embdist.merge <sweep_dir> [more dirs or shard files] [--out DIR] [--run-id ID | --no-mlflow]

The matrix is read again (from the shards' config) for the exact final step; the shards carry
a fingerprint of it, so a changed file is refused.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from embdist import config
from embdist.errors import InputError
from embdist.pairwise import stream
from embdist.tasks import vocab

log = logging.getLogger(__name__)


def find_shards(paths) -> list[Path]:
    """Shard files under the given folders (recursively) or given directly."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            out.extend(q for q in sorted(p.rglob(vocab.SHARD_FILE)) if "merged" not in q.relative_to(p).parts)
        else:
            raise InputError(f"{str(p)!r} does not exist; give sweep folders, job folders or {vocab.SHARD_FILE} files")
    return sorted(set(out))


def _head(path: Path) -> dict:
    import json
    import zipfile

    from embdist.sources import regular_file

    regular_file(Path(path), "shard file", f"give the {vocab.SHARD_FILE} files of a sharded task=vocab run")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":  # an .npz is a zip archive
        raise InputError(f"{str(path)!r} is not a {vocab.SHARD_FILE} shard of a task=vocab run (not an .npz "
                         "archive); give shard files or the sweep folders holding them")
    try:
        with np.load(path, allow_pickle=False) as z:
            return json.loads(bytes(z["head"]).decode())["info"]
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile, UnicodeDecodeError) as e:
        raise InputError(f"{str(path)!r} is not a {vocab.SHARD_FILE} shard of a task=vocab run "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); give shard files or the "
                         "sweep folders holding them") from None


def group_shards(paths) -> dict[str, list[Path]]:
    """Shard files by run (the config without shard.index)."""
    groups: dict[str, list[Path]] = defaultdict(list)
    for p in paths:
        groups[_head(p)["group"]].append(p)
    return dict(groups)


def merge_group(paths, out_dir: Path, rl=None) -> dict:
    """Merge the shards of one run, finalize on the re-read matrix, write and log the outputs.
    Shards are absorbed one at a time (memory: about two partials, not all of them)."""
    heads = [_head(p) for p in paths]
    info = heads[0]
    count = info["shard"][1]
    have = sorted(h["shard"][0] for h in heads)
    if have != list(range(count)):
        missing = sorted(set(range(count)) - set(have))
        dup = sorted({h for h in have if have.count(h) > 1})
        what = "; ".join(filter(None, [f"missing {missing}" if missing else "", f"repeated {dup}" if dup else ""]))
        raise InputError(f"shards of {count}: {what} ({', '.join(str(p) for p in paths)}); run the missing shard jobs again")
    cfg = config.build(info["config"])
    x, ids, m = vocab.load_selection(cfg)
    merged: dict = {}
    for p in paths:
        parts, extra, inf = stream.load_partials(p)
        if not np.array_equal(extra["token_ids"], ids.numpy()):
            raise InputError(f"shard {inf['shard'][0]} ({p}) selected other tokens than the matrix gives now; the matrix "
                             "changed since the shards ran: run them again")
        for metric, part in parts.items():
            merged[metric] = part if metric not in merged else stream.StreamPartial.merge([merged[metric], part])
        del parts
    results = {metric: stream.finalize(x, part) for metric, part in merged.items()}
    if rl is not None:
        rl.metrics({"shards": count, "n_tokens": len(ids)})
        rl.tag("embdist.merged_from", " ".join(str(p) for p in paths)[:5000])
    return vocab.report(results, ids, out_dir, rl, cfg, m.path)


def merge_paths(paths, out_dir: Path | None = None, rl=None) -> dict:
    """Find, group and merge shard files; out_dir/merged[-<run>] per run. Returns summaries by run."""
    shards = find_shards(paths)
    if not shards:
        raise InputError(f"no {vocab.SHARD_FILE} under {', '.join(map(str, paths))}; give the folder of a sharded "
                         "task=vocab sweep")
    groups = group_shards(shards)
    base = Path(out_dir) if out_dir is not None else Path(paths[0]) / "merged"
    out = {}
    for key, files in sorted(groups.items()):
        d = base if len(groups) == 1 else base / key
        log.info("Merging %d shard(s) of run %s into %s", len(files), key, d)
        out[key] = _merge_staged(files, d, rl if len(groups) == 1 else _Prefixed(rl, key) if rl else None)
    return out


def _merge_staged(files: list[Path], out_dir: Path, rl) -> dict:
    """merge_group into a staging folder of out_dir, committed when every output is written, as
    a run's outputs are (embdist.outputs): a merge that fails or is stopped leaves nothing under
    the final names, and a merge into an earlier merge's folder replaces all of its outputs."""
    from embdist import liveness, outputs
    # as a run claims its folder: locked (a second merge into it meanwhile is refused), a killed
    # merge's staging folder removed; an earlier merge there is replaced, not refused
    liveness.claim_folder(out_dir, "--out", overwrite=True)
    staging = outputs.Staging(out_dir, kind="merge").open()
    base = rl.rl if isinstance(rl, _Prefixed) else rl   # the RunLog records the final paths
    before = base.staging if base is not None else None
    if base is not None:
        base.staging = staging
    try:
        summary = merge_group(files, staging.dir, rl)
        staging.commit()
    except BaseException:
        staging.rollback()
        staging.discard()
        raise
    finally:
        if base is not None:
            base.staging = before
    return summary


class _Prefixed:
    """A RunLog whose metric names carry a prefix (several runs merged onto one parent)."""

    def __init__(self, rl, prefix: str):
        self.rl, self.prefix = rl, prefix

    def metrics(self, values, step: int = 0):
        self.rl.metrics({f"{self.prefix}/{k}": v for k, v in values.items()}, step)

    def output(self, name, path):
        self.rl.output(f"{self.prefix}.{name}", path)

    def tag(self, key, value):
        self.rl.tag(f"{self.prefix}.{key}", value)

    def __getattr__(self, name):
        return getattr(self.rl, name)


def main(argv=None) -> int:
    """``python -m embdist.merge``: every failure is one line (exit 2 for a user's error, 1 for
    an internal one; HYDRA_FULL_ERROR=1 shows the traceback, as for the app)."""
    from embdist.errors import failure_or_raise
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("embdist.merge: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except BaseException as e:
        line, status = failure_or_raise(e)
        print(f"embdist.merge: {line}", file=sys.stderr)
        return status


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m embdist.merge", description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="sweep folders, job folders or vocab_shard.npz files")
    ap.add_argument("--out", type=Path, help="output folder (default: <first path>/merged)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--run-id", help="log the merged result on this MLflow run (e.g. the sweep's parent)")
    g.add_argument("--no-mlflow", action="store_true", help="only write the outputs")
    ap.add_argument("--tracking-uri", help="MLflow store (default: as the app: $MLFLOW_TRACKING_URI, else the project's)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    if a.no_mlflow:
        merge_paths(a.paths, a.out)
        return 0
    from mlflow.entities import RunStatus
    from mlflow.tracking import MlflowClient

    from embdist import liveness
    from embdist.tracking import RunLog, ensure_experiment, retry, tracking_uri
    shards = find_shards(a.paths)
    info = _head(shards[0]) if shards else {}
    cfg = info.get("config", {})
    uri = tracking_uri(a.tracking_uri or cfg.get("tracking", {}).get("uri"))
    client = MlflowClient(tracking_uri=uri)
    if a.run_id:
        merge_paths(a.paths, a.out, RunLog(client, a.run_id))
        return 0
    exp = ensure_experiment(client, cfg.get("tracking", {}).get("experiment", "embdist"), uri)
    run = retry(lambda: client.create_run(exp, run_name=f"merge:{cfg.get('model', {}).get('name', 'vocab')}",
                                          tags={"embdist.task": "vocab-merge", **liveness.run_tags()}))
    status = RunStatus.to_string(RunStatus.FINISHED)
    try:
        merge_paths(a.paths, a.out, RunLog(client, run.info.run_id))
    except BaseException:
        status = RunStatus.to_string(RunStatus.FAILED)
        raise
    finally:
        retry(lambda: client.set_terminated(run.info.run_id, status))
    return 0


if __name__ == "__main__":
    sys.exit(main())
