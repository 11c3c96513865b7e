"""Entry point: wires Hydra to the tasks (``python -m embdist`` and the ``embdist`` script).

Only light modules are imported here: ``--help`` and a config error never import torch or
MLflow; the task (and with it the engine and the tracking) is imported once a job starts.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from embdist import config, paths, tasks
from embdist.errors import failure_or_raise

log = logging.getLogger("embdist")

OmegaConf.register_new_resolver("embdist.home", lambda: str(paths.home()), replace=True)
config.register()


def run_task(cfg: DictConfig) -> dict:
    hc = HydraConfig.get()
    sweep = hc.mode == RunMode.MULTIRUN
    typed = None
    paths.fill_names(cfg)  # names not given come from the input actually read
    if not sweep:  # a single run refuses a bad value before any MLflow run exists
        typed = config.typed(cfg)  # the typed objects: their __post_init__ checks run before any work
    from embdist import liveness, preflight
    from embdist.tracking import job_run

    run_dir = Path(hc.runtime.output_dir)
    # A single run's folder was claimed before Hydra wrote into it (embdist.callbacks.RunFolderCheck);
    # a sweep's job claims its own folder here (in its own process under a parallel launcher).
    liveness.claim_folder(run_dir, "hydra.sweep.dir" if sweep else "hydra.run.dir",
                          overwrite=bool(cfg.task.overwrite))
    with job_run(cfg, run_dir, hc.job.num if sweep else None, run_dir / f"{hc.job.name}.log") as rl:
        if sweep:  # in a sweep the failed job is a FAILED child run, so the sweep's runs tell every outcome
            typed = config.typed(cfg)
        preflight.check_device(typed.task.device)
        record_kernels(typed.task.kernels, rl)
        # The task writes into a staging folder; job_run moves its files to run_dir last.
        return tasks.get(typed.task.name).run(typed, rl, rl.out_dir)


def record_kernels(requested: str, rl) -> str:
    """Select the CPU kernel tier (task.kernels; auto honours $EMBDIST_KERNELS) and record the tier
    actually used as the param and tag ``embdist.kernels`` of the run."""
    from embdist import pairwise

    choice = os.environ.get("EMBDIST_KERNELS", "auto") if requested == "auto" else requested
    tier = pairwise.use_kernels(choice or "auto")
    rl.params({"embdist.kernels": tier})
    rl.tag("embdist.kernels", tier)
    return tier


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _traceback_to_log_file(e: BaseException) -> None:
    """The traceback of an internal error goes to the run's log file only (not the screen)."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "traceback of the internal error",
                            None, (type(e), e, e.__traceback__))
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(record)


@hydra.main(version_base="1.3", config_path=paths.config_dir(), config_name="config")
def main(cfg: DictConfig) -> None:
    # A kill (SIGTERM, as schedulers send) unwinds like Ctrl-C: temporaries removed, run KILLED.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        run_task(cfg)
    except KeyboardInterrupt:
        log.error("interrupted; no output was written under its final name")
        print("embdist: interrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except BaseException as e:
        # The one boundary: every failure is one line (the traceback only with HYDRA_FULL_ERROR=1).
        line, status = failure_or_raise(e)
        if status == 1:
            _traceback_to_log_file(e)
        log.error("%s", line)
        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            # Recorded on the job's FAILED run; the sweep goes on and ends with exit status 2
            # (embdist.callbacks.SweepParentRun).
            print(f"embdist: {line.split(':', 1)[0]}: job {hc.job.num} ({' '.join(hc.overrides.task)}):"
                  f"{line.split(':', 1)[1]}", file=sys.stderr)
            return
        print(f"embdist: {line}", file=sys.stderr)
        sys.exit(status)


if __name__ == "__main__":
    main()
