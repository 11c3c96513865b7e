"""The Hydra callbacks of the app, in one place (registered in conf/config.yaml and conf/task/vocab.yaml).

They run in the launching process: a check of the run folder before Hydra creates it, the
sweep's parent MLflow run, and the merge of a sharded ``task=vocab`` sweep.  Heavy modules
(MLflow, torch) are imported inside the hooks, so composing a config stays light.
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("embdist.callbacks")


class RunFolderCheck(Callback):
    """Fail in one line, before Hydra creates it, when the run folder cannot be written."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(Path(config.hydra.run.dir), "hydra.run.dir", config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(Path(config.hydra.sweep.dir), "hydra.sweep.dir", config, sweep=True)

    @staticmethod
    def _check(folder: Path, key: str, config: DictConfig, sweep: bool = False) -> None:
        from embdist import liveness
        from embdist.errors import InputError

        probe = folder / f".embdist-write-test-{os.getpid()}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            print(f"embdist: error: cannot write the run folder {str(folder)!r} ({e.strerror}); "
                  f"set {key} to a writable folder", file=sys.stderr)
            sys.exit(2)
        # Before Hydra writes .hydra/ and the log there: one run per folder, finished runs kept.
        try:
            liveness.claim_folder(folder, key, overwrite=bool(config.task.get("overwrite", False)), sweep=sweep)
        except InputError as e:
            print(f"embdist: error: {e}", file=sys.stderr)
            sys.exit(2)


class SweepParentRun(Callback):
    """Hydra callback: a multirun sweep gets one parent MLflow run; its jobs become children.

    Runs in the launching process before any job starts, so it also creates the experiment
    once (parallel jobs on a fresh SQLite store would race on it). The id travels to the jobs
    in an environment variable, which launchers' worker processes inherit.
    """

    def __init__(self) -> None:
        self.client = None
        self.run_id: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from embdist import liveness
        from embdist.errors import InputError
        from embdist.tracking import PARENT_ENV, open_store, retry, tracking_uri
        uri = tracking_uri(config.tracking.uri)
        try:
            self.client, exp_id = open_store(uri, config.tracking.experiment)
        except InputError as e:
            print(f"embdist: error: {e}", file=sys.stderr)
            sys.exit(2)
        overrides = list(config.hydra.overrides.task)
        run = retry(lambda: self.client.create_run(
            exp_id,
            run_name=f"sweep:{config.task.name}",
            tags={"embdist.sweep": "parent", "embdist.sweep_dir": str(config.hydra.sweep.dir),
                  "embdist.overrides": " ".join(overrides), **liveness.run_tags()},
        ))
        self.run_id = run.info.run_id
        os.environ[PARENT_ENV] = self.run_id
        atexit.register(self._close, "FAILED")
        log.info("MLflow parent run %s for this sweep", self.run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.run_id is None:
            return
        from mlflow.entities import RunStatus

        from embdist.tracking import retry
        children = retry(lambda: self.client.search_runs(
            [self.client.get_run(self.run_id).info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{self.run_id}'",
        ))
        failed = [r for r in children if r.info.status != "FINISHED"]
        self.client.log_metric(self.run_id, "jobs", len(children))
        self.client.log_metric(self.run_id, "jobs_failed", len(failed))
        problems = []
        if failed:
            first = min(failed, key=lambda r: r.info.start_time)
            problems.append(f"{len(failed)} of {len(children)} jobs failed (first: {first.info.run_name}: "
                            f"{first.data.tags.get('error', first.info.status)})")
        end_error = retry(lambda: self.client.get_run(self.run_id)).data.tags.get("error")
        if end_error:      # set by a step at the sweep's end (the vocab shard merge)
            problems.append(end_error)
        if problems:
            retry(lambda: self.client.set_tag(self.run_id, "error", "; ".join(problems)))
        self._close(RunStatus.to_string(RunStatus.FAILED if problems else RunStatus.FINISHED))
        if problems:  # the sweep ran every job; its exit status says that some failed
            print(f"embdist: error: sweep {config.hydra.sweep.dir}: {'; '.join(problems)}", file=sys.stderr)
            sys.exit(2)

    def _close(self, status: str) -> None:
        from embdist.tracking import PARENT_ENV, retry
        if self.run_id is not None and self.client is not None:
            run_id, self.run_id = self.run_id, None
            os.environ.pop(PARENT_ENV, None)
            retry(lambda: self.client.set_terminated(run_id, status))


class MergeShards(Callback):
    """Hydra callback: at the end of a multirun, merge the vocab shards of the sweep and log the
    merged result on the sweep's parent MLflow run (``EMBDIST_PARENT_RUN_ID``).  Runs before the
    parent run is closed (Hydra calls end hooks in reverse order)."""

    def __init__(self) -> None:
        self.sweep_dir: Path | None = None
        self.tracking_uri: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep_dir = Path(str(config.hydra.sweep.dir))
        from embdist.tracking import tracking_uri
        self.tracking_uri = tracking_uri(config.tracking.uri)

    def _parent_by_tag(self) -> str | None:
        """The sweep's parent run found by its embdist.sweep_dir tag (when the callbacks' order
        closed it already)."""
        from mlflow.tracking import MlflowClient
        try:
            c = MlflowClient(tracking_uri=self.tracking_uri)
            runs = c.search_runs([e.experiment_id for e in c.search_experiments()],
                                 filter_string=f"tags.`embdist.sweep_dir` = '{self.sweep_dir}'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
            return runs[0].info.run_id if runs else None
        except Exception:
            return None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.sweep_dir is None or not self.sweep_dir.is_dir():
            return
        from embdist.merge import find_shards, merge_paths
        if not find_shards([self.sweep_dir]):
            return
        from mlflow.tracking import MlflowClient

        from embdist.tracking import PARENT_ENV, RunLog
        parent = os.environ.get(PARENT_ENV) or self._parent_by_tag()
        rl = RunLog(MlflowClient(tracking_uri=self.tracking_uri), parent) if parent else None
        try:
            if rl is not None:
                with rl.stage("merge"):
                    merge_paths([self.sweep_dir], self.sweep_dir / "merged", rl)
            else:
                merge_paths([self.sweep_dir], self.sweep_dir / "merged")
            log.info("Merged the shards of %s into %s", self.sweep_dir, self.sweep_dir / "merged")
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            log.error("merging the shards of %s failed: %s", self.sweep_dir, msg)
            print(f"embdist: error: merging the shards of {self.sweep_dir} failed: {msg}; "
                  f"fix it and run: python -m embdist.merge {self.sweep_dir}", file=sys.stderr)
            if rl is None:
                raise
            # the sweep's parent run (embdist.callbacks.SweepParentRun) then closes FAILED, exit status 2
            rl.tag("error", f"merge failed: {msg}")
