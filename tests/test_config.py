"""Composition of conf/ through Hydra's compose API (the packaged-app example's way)."""
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

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


@pytest.mark.parametrize("overrides, key", [
    (("model=custom",), "model.path"),
    (("model=qwen3-4b-instruct-2507",), "model.path"),
    (("experiment=qwen3-4b-overdensity",), "model.path"),
    (("task=snapshots", "history=seed-qweninit"), "history.path"),
    (("task=snapshots", "history=custom"), "history.path"),
])
def test_a_required_path_left_unset_is_refused_not_replaced_by_the_default(overrides, key):
    """`path: ???` in an option must stay required: merged onto a null schema default it once
    vanished, and model=custom without model.path quietly analysed the packaged MiniLM."""
    cfg = compose_cfg(*overrides)
    paths.fill_names(cfg)  # leaves the unset path alone
    with pytest.raises(InputError, match=rf"^{key} has no value and the chosen option needs one; set it, e.g. {key}=/"):
        config.typed(cfg)
    assert config.typed(compose_cfg(*overrides, f"{key}=/given")).model is not None
    # the options whose null path means the packaged model / the bundled toy run still build
    built = config.typed(compose_cfg("task=snapshots"))
    assert built.model.path is None and built.history.path is None


def test_an_unset_model_path_through_the_app_is_one_line_exit_2(tmp_path):
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR")}
    p = subprocess.run([sys.executable, "-m", "embdist", "model=custom", f"hydra.run.dir={tmp_path / 'run'}"],
                       env={**env, "EMBDIST_HOME": str(tmp_path)}, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("embdist: error: model.path has no value"), p.stderr
    assert not (tmp_path / "mlflow.db").exists()  # refused before any MLflow run
