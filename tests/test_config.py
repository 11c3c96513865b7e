"""Composition of conf/ through Hydra's compose API (the packaged-app example's way)."""
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

import embdist.__main__  # noqa: F401  registers the schema and the embdist.home resolver
from embdist import config, paths
from embdist.sources import InputError


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=paths.config_dir(), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_defaults_are_the_minilm_overdensity():
    cfg = compose_cfg()
    assert cfg.task.name == "overdensity" and cfg.model.name is None  # named after the input read
    paths.fill_names(cfg)
    assert cfg.model.name == "all-MiniLM-L6-v2" and cfg.history.name == "toy-qweninit"
    assert list(cfg.metric.names) == ["euclidean"]
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, config.Config) and isinstance(obj.bbox, config.BBoxConfig)


def test_qwen_model_carries_the_seed_basis_and_box_and_cli_wins():
    cfg = compose_cfg("model=qwen3-4b-instruct-2507", "model.path=/ckpt", "bbox.lat_min=-20")
    assert (cfg.basis.north, cfg.basis.meridian, cfg.basis.equinox) == (2, 1, 3)
    assert (cfg.bbox.lat_min, cfg.bbox.lat_max, cfg.bbox.lon_min, cfg.bbox.lon_max) == (-20, 5, -10, 20)
    assert (cfg.bbox.r_min, cfg.bbox.r_max) == (0.2, 0.5)
    assert compose_cfg("model=qwen3-4b-instruct-2507", "model.path=/c", "bbox=all").bbox.lat_min == -90


def test_experiment_selects_a_combination():
    cfg = compose_cfg("experiment=qwen3-4b-overdensity", "model.path=/ckpt")
    assert cfg.model.name == "Qwen3-4B-Instruct-2507" and list(cfg.metric.names) == ["euclidean", "chebyshev"]
    assert cfg.bbox.lat_min == -15
    cfg = compose_cfg("experiment=toy-snapshots")
    assert cfg.task.name == "snapshots" and cfg.task.dtype == "float16"


def test_snapshots_task_defaults_to_both_metrics_but_cli_wins():
    assert list(compose_cfg("task=snapshots").metric.names) == ["euclidean", "chebyshev"]
    assert list(compose_cfg("task=snapshots", "metric=euclidean").metric.names) == ["euclidean"]


def test_unknown_key_wrong_type_unknown_option_fail_at_composition():
    with pytest.raises(ConfigCompositionException):
        compose_cfg("bbox.foo=1")
    with pytest.raises(ConfigCompositionException):
        compose_cfg("bbox.lat_min=abc")
    with pytest.raises(ConfigCompositionException):
        compose_cfg("metric=hamming")


@pytest.mark.parametrize("override, message", [
    ("bbox.lat_min=10", "above bbox.lat_max"),
    ("bbox.lat_max=95", "outside \\[-90, 90\\]"),
    ("bbox.lon_min=-200", "outside \\[-180, 180\\]"),
    ("bbox.r_min=-1", "negative"),
    ("basis.north=0", "numbered from 1"),
    ("basis.equinox=-1", "repeats"),
    ("task.dtype=int8", "task.dtype"),
])
def test_value_checks_run_before_work(override, message):
    cfg = compose_cfg(override, "bbox.lat_max=5" if "lat_min=10" in override else "seed=0")
    with pytest.raises(InputError, match=message):
        OmegaConf.to_object(cfg)
