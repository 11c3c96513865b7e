"""Each task is a short script of calls to sources → geometry → pairwise, reporting to a RunLog.

``TASKS`` maps a task name (``task=NAME``) to its module, imported only when that task runs, so
``--help`` and config errors never import torch or MLflow.  A task module has
``run(cfg: embdist.config.Config, rl: RunLog, out_dir: Path) -> dict``.  A new task adds one
line here, its name to ``embdist.config.TASKS`` and a ``conf/task/NAME.yaml``.
"""
from __future__ import annotations

import importlib

TASKS = {
    "overdensity": "embdist.tasks.overdensity",
    "snapshots": "embdist.tasks.snapshots",
    "vocab": "embdist.tasks.vocab",
    "survey": "embdist.tasks.survey",
}


def get(name: str):
    """The task module for ``task.name``."""
    return importlib.import_module(TASKS[name])
