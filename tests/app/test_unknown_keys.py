"""A key that nothing reads is an error naming it and the closest valid key: on the command line (before Hydra
composes), as a ``+`` addition (in the composed config), for ``ring-train`` and ``ring-plan``; the valid keys come
from the config groups' files, so every recipe and debug config passes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ring_plugin.app.config_checks import ConfigError
from ring_plugin.app.known_keys import check_config, check_overrides, closest, schema
from ring_plugin.planner import cli as plan_cli

from .helpers import REPO, env, ring_train_cmd
from .test_config import CONF, DEBUG, RECIPES, compose_app


@pytest.mark.parametrize("override,message", [
    ("max_step=50", "max_step is not a config key (nothing reads it); did you mean max_steps?"),
    ("model.lrr=1e-3", "model.lrr is not a config key (nothing reads it); did you mean model.lr?"),
    ("data.batchsize=4", "data.batchsize is not a config key (nothing reads it); did you mean data.batch_size?"),
])
def test_command_line_key_is_refused_before_composing(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        check_overrides([override])
    assert str(err.value) == message


@pytest.mark.parametrize("override,message", [
    ("+max_step=50", "max_step is not a config key (nothing reads it); did you mean max_steps?"),
    ("+lr=3e-3", "lr is not a config key (nothing reads it); did you mean model.lr?"),
    ("+model.warmup=5", "model.warmup is not a config key (nothing reads it); did you mean model.warmup_steps?"),
    ("+callbacks.checkpointing.every_n_steps=5", "callbacks.checkpointing.every_n_steps is not a config key "
     "(nothing reads it); did you mean callbacks.checkpointing.every_n_train_steps?"),
    ("+strategy.find_unused_paramters=true", "strategy.find_unused_paramters is not a config key (nothing reads "
     "it); did you mean strategy.find_unused_parameters?"),
])
def test_added_key_is_refused_in_the_composed_config(override: str, message: str) -> None:
    cfg = compose_app(override)
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    assert str(err.value) == message


@pytest.mark.parametrize("overrides", [
    ["+trainer.gradient_clip_algorithm=norm"],  # an argument of the node's _target_ (lightning.Trainer)
    ["+callbacks.checkpointing.save_top_k=3"],  # of ModelCheckpoint, through AtomicModelCheckpoint's **kwargs
    ["+strategy.find_unused_parameters=true"],  # of torch's DDP, through DDPStrategy's **kwargs
    ["model=hf", "+model.config.rope_theta=5e5"],  # free-form: a transformers config
    ["+callbacks.nan._target_=tests.app.helpers.NanGradients", "+callbacks.nan.steps=[3]"],  # a new callback
])
def test_keys_something_reads_pass(overrides: list[str]) -> None:
    check_overrides([o.lstrip("+") for o in overrides if not o.startswith("+")])
    check_config(compose_app(*overrides))


@pytest.mark.parametrize("config", [f"recipe={r}" for r in RECIPES] + [f"debug={d}" for d in DEBUG] + ["model=hf"])
def test_every_shipped_config_has_only_known_keys(config: str) -> None:
    check_config(compose_app(config))


def test_valid_keys_come_from_the_group_files(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("defaults:\n  - data: one\nseed: 1\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "one.yaml").write_text("batch_size: 2\n")
    (tmp_path / "data" / "two.yaml").write_text("path: x\ntokenizer: y\n")  # a group option added later
    (tmp_path / "recipe").mkdir()
    (tmp_path / "recipe" / "r.yaml").write_text("# @package _global_\nmax_steps: 5\ndata:\n  val_path: z\n")
    keys, _ = schema(tmp_path)
    assert {"seed", "data", "data.batch_size", "data.path", "data.tokenizer", "max_steps", "data.val_path"} <= keys
    assert "defaults" not in keys and "data.max_steps" not in keys
    assert closest("data.tokeniser", keys) == "data.tokenizer"


def test_ring_train_plus_key_exits_with_one_line(tmp_path: Path) -> None:
    out = subprocess.run(ring_train_cmd(tmp_path / "run", "+lr=3e-3"), cwd=REPO, env={**env(), "HYDRA_FULL_ERROR": ""},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip() == "ring-train: config error: lr is not a config key (nothing reads it); did you mean " \
                                 "model.lr?"
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("arg", ["+gpus=8", "gpus=8"])
def test_ring_plan_refuses_an_unknown_key(arg: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        plan_cli.main(["recipe=dense_128k_zero3", arg])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().endswith(
        "ring-plan: error: gpus is not a config key (nothing reads it); did you mean gpus_per_node?")


def test_conf_is_the_schema_source() -> None:
    keys, _ = schema()
    assert schema(CONF)[0] == keys and "max_steps" in keys and "model.warmup_steps" in keys
