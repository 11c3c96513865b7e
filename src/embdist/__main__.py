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
from embdist.errors import InputError, is_disk_full

log = logging.getLogger("embdist")

OmegaConf.register_new_resolver("embdist.home", lambda: str(paths.home()), replace=True)
config.register()


def run_task(cfg: DictConfig) -> dict:
    hc = HydraConfig.get()
    sweep = hc.mode == RunMode.MULTIRUN
    typed = None
    paths.fill_names(cfg)  # names not given come from the input actually read
    if not sweep:  # a single run refuses a bad value before any MLflow run exists
        typed = OmegaConf.to_object(cfg)  # the typed objects: their __post_init__ checks run before any work
    from embdist.tracking import job_run

    run_dir = Path(hc.runtime.output_dir)
    with job_run(cfg, run_dir, hc.job.num if sweep else None, run_dir / f"{hc.job.name}.log") as rl:
        if sweep:  # in a sweep the failed job is a FAILED child run, so the sweep's runs tell every outcome
            typed = OmegaConf.to_object(cfg)
        return tasks.get(typed.task.name).run(typed, rl, run_dir)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


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
    except (InputError, OSError) as e:
        # A user's mistake or a full disk: one clear line, no traceback (unless HYDRA_FULL_ERROR=1).
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or (isinstance(e, OSError) and not is_disk_full(e)):
            raise
        log.error("%s", e)
        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            # Recorded on the job's FAILED run; the sweep goes on and ends with exit status 2
            # (embdist.callbacks.SweepParentRun).
            print(f"embdist: error: job {hc.job.num} ({' '.join(hc.overrides.task)}): {e}", file=sys.stderr)
            return
        print(f"embdist: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
