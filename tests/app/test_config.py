"""Every recipe and every attention x strategy combination composes and validates; bad values name their key;
every setting is said once (a derived key set on its own is refused)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from ring_plugin.app.config_checks import ConfigError, check_optional_choices, model_kwargs, validate_config
from ring_plugin.app.train import CONFIG_DIR
from tests import prefork

CONF = Path(CONFIG_DIR)
RECIPES = sorted(p.stem for p in (CONF / "recipe").glob("*.yaml"))
ATTENTION = sorted(p.stem for p in (CONF / "attention").glob("*.yaml"))
DEBUG = sorted(p.stem for p in (CONF / "debug").glob("*.yaml"))


def compose_app(*overrides: str) -> DictConfig:
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
    assert DEBUG == ["fdr", "limit", "overfit"]


def _users_value(key: str, tmp_path: Path) -> str:
    """A stand-in for a value a recipe leaves to the user (a file, a pretrained model folder)."""
    if key == "model.pretrained":  # read by the validation: a real folder, its context as long as any recipe's
        from .hf_pretrained import short_context_llama

        return str(short_context_llama(tmp_path / "pretrained", context=1 << 20))
    if key == "data.tokenizer":
        from ..hf_data_fixtures import train_tokenizer

        return str(train_tokenizer(tmp_path / "tokenizer"))
    return {"data.train.path": "train.bin", "data.val.path": "val.bin"}.get(key, str(tmp_path / "data"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes_and_validates(recipe: str, tmp_path: Path) -> None:
    cfg = compose_app(f"recipe={recipe}")
    missing = sorted(OmegaConf.missing_keys(cfg))
    # Required values a recipe cannot mark ??? (a group already gives them null): named by the validation.
    if OmegaConf.select(cfg, "model._target_") and cfg.model.pretrained is None and cfg.model.config is None:
        with pytest.raises(ConfigError, match=r"model\.pretrained is not set"):
            validate_config(compose_app(f"recipe={recipe}", *(f"{k}=x" for k in missing)))
        missing.append("model.pretrained")
    elif OmegaConf.select(cfg, "data.tokenizer", default="absent") is None:
        with pytest.raises(ConfigError, match=r"data\.tokenizer is not set"):
            validate_config(compose_app(f"recipe={recipe}", *(f"{k}=x" for k in missing)))
        missing.append("data.tokenizer")
    if missing:  # the files are the user's to give
        with pytest.raises(ConfigError, match=rf"{missing[0]} has no value"):
            validate_config(cfg)  # a missing value is named before the model is read
        given = [f"{k}={_users_value(k, tmp_path)}" for k in missing]
        if "data.train.path" in missing:
            given.append("data.val.path=val.bin")
        cfg = compose_app(f"recipe={recipe}", *given)
    validate_config(cfg)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert cfg.name == recipe


def test_default_is_the_cpu_run() -> None:
    cfg = compose_app()
    validate_config(cfg)
    assert (cfg.trainer.accelerator, cfg.devices, cfg.ring_size) == ("cpu", 2, 2)
    assert cfg.strategy._target_ == "ring_plugin.lightning.RingStrategy"
    assert set(cfg.callbacks) >= {"checkpointing", "final_checkpoint", "fault_tolerance", "monitoring"}
    assert set(cfg.logger) == {"wandb", "csv"}


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_ulysses_size_reaches_the_strategy(strategy: str) -> None:
    from hydra.utils import instantiate

    cfg = compose_app("devices=4", "ulysses_size=2", "ring_size=2", f"strategy={strategy}")
    validate_config(cfg)
    made = instantiate(cfg.strategy)
    assert (made.ulysses_size, made.ring_size) == (2, 2)


def test_recipe_changes_groups() -> None:
    cfg = compose_app("recipe=dense_128k_zero3")
    assert cfg.strategy.stage == 3 and cfg.model.activation_checkpointing
    assert cfg.seq_len == 131072 and cfg.trainer.accelerator == "gpu"
    assert compose_app("recipe=block_sparse_90").attention.kwargs.sparsity_ratio == 0.9


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_every_variant_with_every_strategy(strategy: str) -> None:
    for attention in ATTENTION:
        cfg = compose_app(f"attention={attention}", f"strategy={strategy}")
        validate_config(cfg)
        assert cfg.attention.name == attention  # the variant is named truly in the composed config
        kwargs = model_kwargs(cfg, {"comm_timeout": 5})
        assert kwargs["model"]["attention"] == ("sdpa" if attention == "dilated" else attention)
        assert kwargs["model"]["max_seq_len"] == cfg.seq_len and kwargs["max_steps"] == cfg.max_steps
        assert kwargs["model"]["attention_kwargs"]["comm_timeout"] == 5


def test_one_deepspeed_file_with_a_stage_key() -> None:
    cfg = compose_app("strategy=deepspeed", "strategy.stage=3", "strategy.offload_optimizer=true",
                      "strategy.offload_parameters=true")
    validate_config(cfg)
    assert cfg.strategy.stage == 3 and cfg.strategy.offload_optimizer and cfg.strategy.offload_parameters


@pytest.mark.parametrize("debug", DEBUG)
def test_debug_configs(debug: str) -> None:
    cfg = compose_app(f"debug={debug}")
    validate_config(cfg)
    assert cfg.job_type == "debug" and cfg.resume == "never" and cfg.name == f"debug_{debug}"
    if debug == "fdr":
        assert cfg.trainer.fast_dev_run is True
    if debug == "overfit":  # one batch of training data, seen at every step
        assert OmegaConf.to_container(cfg.data, resolve=True)["train"]["num_samples"] == cfg.data.batch_size


def test_fast_dev_run_needs_no_plus() -> None:
    assert compose_app("trainer.fast_dev_run=2").trainer.fast_dev_run == 2


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("attention.layer=nonexistent", r"attention\.layer='nonexistent' is not a ring attention layer"),
        ("ring_size=3", r"ring_size=3 must be a positive divisor of the world size 2"),
        ("seq_len=250", r"seq_len=250 must be a multiple of 4 \(ring_size=2, layout=zigzag\)"),
        ("layout=spiral", r"layout='spiral' is not a known shard layout"),
        ("max_steps=0", r"max_steps=0 must be a positive integer"),
        ("comm_timeout=-1", r"comm_timeout=-1 must be positive"),
        ("model.n_embd=30", r"model\.n_embd=30 / n_head=4 must give an even head size"),
        ("+model.dropout=0.1", r"model\.dropout is neither a GPTConfig field nor a RingCausalLM argument"),
        # the step budget is said once: the trainer's and the LR schedule's
        ("trainer.max_steps=-1", r"trainer\.max_steps=-1 is set from max_steps: set max_steps="),
        ("trainer.max_steps=100", r"trainer\.max_steps=100 is set from max_steps"),
        ("strategy.ring_size=1", r"strategy\.ring_size=1 is set from ring_size"),
        ("data.train.seq_len=128", r"data\.train\.seq_len=128 is set from seq_len"),
        ("+model.max_seq_len=128", r"model\.max_seq_len is set by the app"),
        # the library's own checks, under the config key
        ("attention=block_sparse attention.kwargs.sparsity_ratio=1.5",
         r"attention\.kwargs\.sparsity_ratio=1\.5 must lie in \[0, 1\)"),
        ("attention=dilated attention.kwargs.segment_lengths=[64,96,256]",
         r"attention\.kwargs\.segment_lengths: .*multiple of every segment length.*\[96\]"),
        ("attention=hilbert attention.kwargs.grid=[8,8]", r"attention\.kwargs\.grid=\[8, 8\] must be \[H, W\]"),
        ("+attention.kwargs.bogus=1", r"unknown ring attention argument\(s\) \['bogus'\]"),
        ("strategy=deepspeed strategy.stage=5", r"strategy\.stage=5 is not a ZeRO stage"),
        ("data=token_file", r"data\.train\.path has no value \(\?\?\? in the config\): set data\.train\.path="),
        # 2-D sequence parallel
        ("ulysses_size=0", r"ulysses_size=0 must be a positive integer"),
        ("ulysses_size=2", r"ring_size=2 x ulysses_size=2 must divide the world size 2"),
        ("strategy.ulysses_size=2", r"strategy\.ulysses_size=2 is set from ulysses_size"),
        ("devices=4 ulysses_size=2 seq_len=252", r"seq_len=252 must be a multiple of 8 \(ring_size=2 x ulysses_size=2"),
        ("devices=4 ulysses_size=2 model.n_head=3 model.n_kv_head=1 model.n_embd=48",
         r"model\.n_head=3 must be a multiple of ulysses_size=2"),
        ("devices=4 ulysses_size=2 attention=block_sparse",
         r"ulysses_size=2 is supported by the dense attention layers .* not by attention=block_sparse"),
        # values Lightning or the optimizer would reject only after spawning or training
        ("trainer.val_check_interval=0", r"trainer\.val_check_interval=0 must be a number of steps >= 1"),
        ("trainer.val_check_interval=1.5", r"trainer\.val_check_interval=1\.5 must be .* fraction of an epoch"),
        ("model.lr=-1", r"model\.lr=-1 must be a positive number"),
        ("model=hf model.lr=0", r"model\.lr=0 must be a positive number"),
        ("layout=balanced", r"layout=balanced balances packed documents, but data\.train "
                            r"\(ring_plugin\.data\.PasskeyRetrieval\) has one document per row"),
    ],
)
def test_bad_values_name_the_key(override: str, message: str) -> None:
    cfg = compose_app(*override.split())
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)


def test_unknown_group_option_is_refused_by_hydra() -> None:
    with pytest.raises(Exception, match="attention"):
        compose_app("attention=nonexistent")


def _ring_train(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """``ring-train`` run from a temporary folder, its Hydra run directory inside it: nothing lands in the repo."""
    from .helpers import env

    return subprocess.run([prefork.python(), "-m", "ring_plugin.app.train", f"hydra.run.dir={tmp_path / 'run'}", *args],
                          cwd=tmp_path, env={**env(), "HYDRA_FULL_ERROR": "0"}, capture_output=True, text=True,
                          timeout=120)


def test_misspelt_recipe_or_debug_is_refused_not_skipped(tmp_path: Path) -> None:
    """Hydra skips a missing option of an optional group: the app refuses it, listing the names."""
    with pytest.raises(ConfigError, match=f"recipe=dense_128k is not a recipe config; valid: {', '.join(RECIPES)}"):
        check_optional_choices({"recipe": "dense_128k", "debug": None})
    with pytest.raises(ConfigError, match="debug=fdrr is not a debug config; valid: fdr, limit, overfit"):
        check_optional_choices({"recipe": None, "debug": "fdrr"})
    check_optional_choices({"recipe": "cpu_default", "debug": "fdr"})
    proc = _ring_train(tmp_path, "recipe=dense_128k")
    assert proc.returncode != 0 and "config error: recipe=dense_128k is not a recipe config" in proc.stderr, \
        proc.stderr[-2000:]


def test_help_lists_groups_recipes_and_debug_configs(tmp_path: Path) -> None:
    proc = _ring_train(tmp_path, "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("ring-train: train long-context models with exact ring attention")
    for line in (f"recipe: {', '.join(RECIPES)}", "debug: fdr, limit, overfit", "strategy: ddp, deepspeed",
                 f"attention: {', '.join(ATTENTION)}", "ring-train debug=fdr"):
        assert line in proc.stdout, line


def test_unwritable_output_folder_is_a_one_line_error() -> None:
    """Before Hydra opens train.log in it (else: "Unable to configure handler 'file'" and a traceback).
    /sys/kernel exists and refuses new files even to root."""
    from ring_plugin.app.writable_output import unwritable_reason

    assert unwritable_reason(Path("/sys/kernel")) == "Permission denied"
    proc = subprocess.run([prefork.python(), "-m", "ring_plugin.app.train", "hydra.run.dir=/sys/kernel"],
                          cwd=CONF.parents[1], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == ("ring-train: config error: the output folder /sys/kernel cannot be written "
                                   "(Permission denied): set hydra.run.dir= a writable folder, or run from one")
