"""MLflow tracking: one run per job, one parent run per multirun sweep.

The engine and the tasks know nothing of MLflow; a task gets a ``RunLog`` and reports
through it. Runs are driven with ``MlflowClient`` (no fluent "active run"), so a job that
raises is marked FAILED (KILLED on Ctrl-C) here, not closed as FINISHED by MLflow's exit hook
after Hydra turns the exception into ``sys.exit(1)``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from embdist import paths

log = logging.getLogger(__name__)

PARENT_ENV = "EMBDIST_PARENT_RUN_ID"
_BATCH = 1000  # MLflow's per-request limit for metrics (params: 100)
HASH_INPUT_MAX = 512 << 20  # inputs up to this size get a sha256 tag (about a second); larger ones path and size


def tracking_uri(configured: str | None) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else the project's SQLite store (absolute)."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or paths.default_tracking_uri()


def retry(fn: Callable[[], Any], tries: int = 10) -> Any:
    """Call fn, backing off on SQLite contention ("database is locked") between parallel jobs."""
    for attempt in range(tries):
        try:
            return fn()
        except Exception as e:  # MlflowException / sqlalchemy OperationalError
            text = str(e).lower()
            if attempt == tries - 1 or not ("locked" in text or "busy" in text or "unique constraint" in text):
                raise
            time.sleep(0.05 * 2**attempt * (1 + random.random()))


def ensure_experiment(client: MlflowClient, name: str, uri: str) -> str:
    """Experiment id for name, created once (race-safe: a parallel creator wins, we re-read)."""
    exp = retry(lambda: client.get_experiment_by_name(name))
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        # Artifacts beside the database, not in a ./mlruns of whatever the cwd is.
        location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    try:
        # The experiment kind makes the MLflow UI open on the runs table (model training),
        # not on the GenAI traces overview.
        return client.create_experiment(name, artifact_location=location,
                                        tags={"mlflow.experimentKind": "custom_model_development"})
    except Exception:
        exp = retry(lambda: client.get_experiment_by_name(name))
        if exp is None:
            raise
        return exp.experiment_id


def flatten(cfg: Mapping, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:6000]
    return out


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024**2 if sys.platform == "darwin" else 1024)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


class RunLog:
    """What a task may report: metrics, series over steps, stage timings, output files."""

    def __init__(self, client: MlflowClient, run_id: str, staging=None):
        self.client, self.run_id = client, run_id
        self.staging = staging  # embdist.outputs.Staging: the task writes here; committed last

    @property
    def out_dir(self) -> Path | None:
        """Where the task writes its files (the staging folder, moved to the run folder last)."""
        return self.staging.dir if self.staging is not None else None

    def metrics(self, values: Mapping[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        self._log([Metric(k, float(v), now, step) for k, v in values.items()])

    def series(self, key: str, values, steps=None) -> None:
        """One metric over steps, so the UI draws it as a curve."""
        now = int(time.time() * 1000)
        steps = range(len(values)) if steps is None else steps
        self._log([Metric(key, float(v), now, int(s)) for s, v in zip(steps, values)])

    def _log(self, ms: list[Metric]) -> None:
        for i in range(0, len(ms), _BATCH):
            retry(lambda: self.client.log_batch(self.run_id, metrics=ms[i : i + _BATCH]))

    def params(self, values: Mapping[str, str]) -> None:
        items = [Param(k, v) for k, v in values.items()]
        for i in range(0, len(items), 100):
            retry(lambda: self.client.log_batch(self.run_id, params=items[i : i + 100]))

    def tag(self, key: str, value: Any) -> None:
        retry(lambda: self.client.set_tag(self.run_id, key, str(value)[:5000]))

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        seconds = time.perf_counter() - t0
        log.info("stage %s: %.2f s", name, seconds)
        self.metrics({f"time/{name}_s": seconds})

    def output(self, name: str, path: Path) -> None:
        """Record an output file on the run: its absolute (final) path and its sha256."""
        path = Path(path).resolve()
        final = self.staging.final_path(path) if self.staging is not None else path
        self.tag(f"output.{name}", final)
        self.tag(f"sha256.{name}", sha256(path))

    def input_file(self, path: Path, what: str = "input") -> None:
        """Record the input actually read: its path, size and (when cheap) sha256, as tags."""
        path = Path(path).resolve()
        size = path.stat().st_size
        self.tag(f"embdist.{what}.path", path)
        self.tag(f"embdist.{what}.bytes", size)
        if size <= HASH_INPUT_MAX:
            self.tag(f"embdist.{what}.sha256", sha256(path))

    def artifacts(self, local_dir: Path, artifact_path: str | None = None) -> None:
        retry(lambda: self.client.log_artifacts(self.run_id, str(local_dir), artifact_path))

    def artifact(self, local_file: Path, artifact_path: str | None = None) -> None:
        retry(lambda: self.client.log_artifact(self.run_id, str(local_file), artifact_path))

    def plot(self, png: Path) -> None:
        self.artifact(png, "plots")

    def table(self, csv: Path) -> None:
        self.artifact(csv, "tables")


def _run_name(cfg: DictConfig, job_num: int | None) -> str:
    group = "history" if cfg.task.name == "snapshots" else "model"
    subject = cfg[group].name    # null only when the path is unset too (the run fails, named so)
    name = f"{cfg.task.name}:{subject if subject is not None else f'<{group}.path unset>'}"
    return name if job_num is None else f"{name}#{job_num}"


def open_store(uri: str, experiment: str) -> tuple[MlflowClient, str]:
    """The store, contacted once at the start (a short timeout for a server): the client and the
    experiment id, or a one-line InputError naming the URI.  Then the runs this host left
    RUNNING by processes that are gone are marked KILLED (embdist.liveness.reap)."""
    from embdist import liveness, preflight

    preflight.check_tracking_uri(uri)
    for attempt in range(6):
        try:
            with _schema_lock(uri):
                client = MlflowClient(tracking_uri=uri)
                exp_id = ensure_experiment(client, experiment, uri)
            break
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:
            # Processes that open a new SQLite store at the same moment race on its schema
            # ("duplicate column", "already exists"): the loser waits and reads it again.
            text = str(e).lower()
            if attempt < 5 and any(m in text for m in ("duplicate column", "already exists", "locked", "busy")):
                time.sleep(0.5 * (attempt + 1) * (1 + random.random()))
                continue
            raise preflight.contact_error(uri, e) from None
    try:
        liveness.reap(client)
    except Exception as e:  # reaping is housekeeping: never the reason a run fails
        log.warning("could not check for runs left RUNNING by killed processes: %s", e)
    return client, exp_id


@contextmanager
def _schema_lock(uri: str) -> Iterator[None]:
    """Processes opening one new SQLite store at once would race on creating its tables (MLflow's
    migrations are not safe against that): the first contact is serialised by a lock file beside
    the database (``.NAME.embdist-lock``).  Other stores: nothing to do."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    from filelock import FileLock

    db = Path(uri[len("sqlite:///"):].split("?", 1)[0])
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db.parent / f".{db.name}.embdist-lock"), timeout=300):
        yield


@contextmanager
def job_run(cfg: DictConfig, run_dir: Path, job_num: int | None = None, log_file: Path | None = None) -> Iterator[RunLog]:
    """One MLflow run around a job: params in, FINISHED / FAILED / KILLED out, artifacts logged.

    The task writes into ``rl.out_dir`` (a staging folder); its files move to ``run_dir`` only
    after the task returned and the final logging succeeded, just before the run is closed
    FINISHED.  Any failure (Ctrl-C included) discards them: no file under a final name.
    """
    from embdist import liveness, outputs

    uri = tracking_uri(cfg.tracking.uri)
    client, exp_id = open_store(uri, cfg.tracking.experiment)
    tags = {"embdist.task": cfg.task.name, "embdist.run_dir": str(run_dir), **liveness.run_tags()}
    parent = os.environ.get(PARENT_ENV)
    if parent:
        tags["mlflow.parentRunId"] = parent
    run = retry(lambda: client.create_run(exp_id, run_name=_run_name(cfg, job_num), tags=tags))
    rl = RunLog(client, run.info.run_id)
    log.info("MLflow run %s in experiment %r at %s", run.info.run_id, cfg.tracking.experiment, uri)
    status = RunStatus.to_string(RunStatus.FINISHED)
    staging = outputs.Staging(run_dir)
    try:
        try:
            rl.params(flatten(OmegaConf.to_container(cfg, resolve=True)))
            rl.staging = staging.open()
            yield rl
        except KeyboardInterrupt:
            status = RunStatus.to_string(RunStatus.KILLED)
            raise
        except BaseException:
            status = RunStatus.to_string(RunStatus.FAILED)
            raise
        finally:
            try:
                _close_logging(rl, run_dir, log_file)
            except BaseException:
                if status == RunStatus.to_string(RunStatus.FINISHED):
                    status = RunStatus.to_string(RunStatus.FAILED)
                    raise  # the run's own failure, if any, stays the one reported
        if status == RunStatus.to_string(RunStatus.FINISHED):
            staging.commit()  # nothing left that can fail but closing the run
    except BaseException as e:
        if status == RunStatus.to_string(RunStatus.FINISHED):
            status = RunStatus.to_string(RunStatus.KILLED if isinstance(e, KeyboardInterrupt) else RunStatus.FAILED)
        staging.rollback()
        staging.discard()
        _tag_error(rl, e)
        raise
    finally:
        try:
            retry(lambda: client.set_terminated(rl.run_id, status))
        except BaseException:
            staging.rollback()  # a run that cannot be closed FINISHED leaves no outputs behind
            raise


def _tag_error(rl: RunLog, e: BaseException) -> None:
    if isinstance(e, KeyboardInterrupt):
        msg = "interrupted (KeyboardInterrupt)"
    else:
        from embdist.errors import InputError, is_disk_full
        text = str(e).splitlines()[0] if str(e) else ""
        user = isinstance(e, InputError) or is_disk_full(e)
        msg = text if user and text else f"internal error: {type(e).__name__}: {text}".rstrip(": ")
    try:
        rl.tag("error", msg)
    except Exception as te:  # the store itself may be what failed
        log.warning("could not record the error on the MLflow run: %s", te)


def _close_logging(rl: RunLog, run_dir: Path, log_file: Path | None) -> None:
    rl.metrics({"peak_rss_mb": peak_rss_mb()})
    hydra_dir = run_dir / ".hydra"
    if hydra_dir.is_dir():
        rl.artifacts(hydra_dir, ".hydra")
    if log_file is not None and log_file.is_file():
        for h in logging.getLogger().handlers:
            h.flush()
        rl.artifact(log_file)
