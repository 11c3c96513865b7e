"""Where embdist keeps its configs, MLflow store, outputs and cached data."""
from __future__ import annotations

import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def config_dir() -> str:
    """conf/ shipped in the wheel (embdist/conf), else the repo-root conf/ of a source checkout."""
    packaged = _PACKAGE / "conf"
    return str(packaged if packaged.is_dir() else _PACKAGE.parents[1] / "conf")


def home() -> Path:
    """The project folder that holds mlflow.db, outputs/ and data/.

    $EMBDIST_HOME if set; else the source checkout embdist runs from (an editable install);
    else ~/.embdist for an installed wheel. Absolute, so it never depends on the cwd.
    """
    env = os.environ.get("EMBDIST_HOME")
    if env:
        return Path(env).expanduser().resolve()
    checkout = _PACKAGE.parents[1]
    if (checkout / "pyproject.toml").is_file() and (checkout / "conf").is_dir():
        return checkout
    return Path.home() / ".embdist"


def default_tracking_uri() -> str:
    return f"sqlite:///{home() / 'mlflow.db'}"


def default_history_path() -> Path:
    return home() / "data" / "toy-qweninit" / "embedding_evolution.safetensors"
