"""Every recipe and every attention x strategy combination composes and validates; bad values name their key."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from ring_plugin.app.train import CONFIG_DIR
from ring_plugin.app.validate import ConfigError, validate_config

CONF = Path(CONFIG_DIR)
RECIPES = sorted(p.stem for p in (CONF / "recipe").glob("*.yaml"))
ATTENTION = sorted(p.stem for p in (CONF / "attention").glob("*.yaml"))
STRATEGIES = sorted(p.stem for p in (CONF / "strategy").glob("*.yaml"))


def _compose(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    # `${hydra:...}` only resolves inside a running app; give it the run dir it would have.
    OmegaConf.set_struct(cfg, False)
    cfg.paths.output_dir = str(cfg.hydra.run.dir)
    del cfg["hydra"]
    return cfg


def test_repo_conf_and_recipes_are_the_packaged_tree() -> None:
    repo = CONF.parents[1]
    assert (repo / "conf").resolve() == CONF
    assert (repo / "recipes").resolve() == CONF / "recipe"
    assert set(RECIPES) >= {"cpu_default", "dense_128k_zero3", "longnet_1m", "block_sparse_90", "hilbert_grid"}


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes_and_validates(recipe: str) -> None:
    cfg = _compose(f"recipe={recipe}")
    validate_config(cfg)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert cfg.name == recipe


def test_default_is_the_cpu_run() -> None:
    cfg = _compose()
    validate_config(cfg)
    assert (cfg.trainer.accelerator, cfg.devices, cfg.ring_size) == ("cpu", 2, 2)
    assert cfg.strategy._target_ == "ring_plugin.lightning.RingStrategy"
    assert set(cfg.callbacks) >= {"checkpointing", "fault_tolerance", "monitoring"}
    assert set(cfg.logger) == {"wandb", "csv"}


def test_recipe_changes_groups() -> None:
    cfg = _compose("recipe=dense_128k_zero3")
    assert cfg.strategy.stage == 3 and cfg.model.model.activation_checkpointing
    assert cfg.seq_len == 131072 and cfg.trainer.accelerator == "gpu"
    assert _compose("recipe=block_sparse_90").attention.kwargs.sparsity_ratio == 0.9


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_variant_with_every_strategy(strategy: str) -> None:
    for attention in ATTENTION:
        cfg = _compose(f"attention={attention}", f"strategy={strategy}")
        validate_config(cfg)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        assert resolved["model"]["model"]["attention"] == cfg.attention.name


def test_offload_strategy() -> None:
    cfg = _compose("strategy=deepspeed_stage_3_offload")
    assert cfg.strategy.stage == 3 and cfg.strategy.offload_optimizer and cfg.strategy.offload_parameters


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("attention.name=nonexistent", "attention.name"),
        ("+strategy.stage=5", "strategy.stage"),
        ("ring_size=3", "ring_size"),
        ("seq_len=250", "seq_len"),
        ("layout=spiral", "layout"),
        ("attention=dilated", None),  # valid; the bad one follows
    ],
)
def test_bad_values_name_the_key(override: str, key: str | None) -> None:
    cfg = _compose(override)
    if key is None:
        validate_config(cfg)
        return
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(cfg)


def test_deepspeed_stage_5_names_strategy_stage() -> None:
    with pytest.raises(ConfigError, match=r"strategy\.stage=5"):
        validate_config(_compose("strategy=deepspeed_stage_2", "strategy.stage=5"))


def test_unknown_group_option_is_refused_by_hydra() -> None:
    with pytest.raises(Exception, match="attention"):
        _compose("attention=nonexistent")
