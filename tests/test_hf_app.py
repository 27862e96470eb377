"""The app's model=hf group and the hf_llama_128k recipe: configs compose into the intended models, a
pretrained directory is loaded as saved, and ring-train trains model=hf on a ring of 2 processes."""

from __future__ import annotations

import math
import re
import subprocess

import pytest
import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from ring_plugin.app.config_checks import validate_config  # noqa: E402
from ring_plugin.models.hf_lightning_module import build_hf_causal_lm  # noqa: E402
from tests import prefork

from .app.helpers import REPO, env, read_csv_metrics  # noqa: E402
from .app.test_config import compose_app as _compose  # noqa: E402
from .hf_harness import tiny_model  # noqa: E402


def test_recipe_is_llama_3_2_1b_shaped():
    cfg = _compose("recipe=hf_llama_128k", "data.train.path=train.bin", "data.val.path=val.bin")
    validate_config(cfg)
    assert (cfg.seq_len, cfg.ring_size, cfg.strategy.stage) == (131072, 2, 3)
    module = instantiate(cfg.model)
    assert module.hparams.activation_checkpointing and module.hparams.pretrained is None
    with torch.device("meta"):  # shapes only: no 5 GB of fp32 weights on a CPU test machine
        model = build_hf_causal_lm(None, module.hf_config, torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config._attn_implementation == "ring"
    assert sum(p.numel() for p in model.parameters()) == 1_235_814_400  # Llama-3.2-1B, tied embeddings
    assert model.config.rope_parameters["rope_type"] == "llama3"


def test_pretrained_directory_is_loaded_as_saved(tmp_path):
    saved = tiny_model("qwen2", "eager")
    saved.save_pretrained(tmp_path)
    module = instantiate(_compose("model=hf", f"model.pretrained={tmp_path}").model)
    module.configure_model()
    assert type(module.model).__name__ == "Qwen2ForCausalLM" and module.model.config._attn_implementation == "ring"
    loaded = dict(module.model.named_parameters())
    assert all(torch.equal(loaded[n], p) for n, p in saved.named_parameters())


@pytest.mark.timeout(300)
def test_ring_train_model_hf_on_two_processes_learns(tmp_path):
    """One batch seen at every step (as debug=overfit), warm-up of one step: the train loss falls from chance."""
    steps = 6
    cmd = [prefork.python(), "-m", "ring_plugin.app.train", f"hydra.run.dir={tmp_path}", "model=hf", "logger=[csv]",
           f"max_steps={steps}", "seq_len=64", "data.batch_size=2", "data.val_batches=1",
           "trainer.val_check_interval=3", "trainer.enable_progress_bar=false", "comm_timeout=30",
           "callbacks.checkpointing.every_n_train_steps=3", "model.activation_checkpointing=true",
           "model.warmup_steps=1", "++data.train.num_samples=2", "trainer.log_every_n_steps=1"]
    run = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"== ring-train summary (step {steps}) ==" in run.stdout
    losses = [float(r["train/loss"]) for r in read_csv_metrics(tmp_path) if r.get("train/loss")]
    assert len(losses) == steps, losses
    assert abs(losses[0] - math.log(64)) < 0.3, losses  # a random init starts at chance: ln 64 for 64 tokens
    assert losses[-1] < 0.6 * losses[0], losses  # and learns the batch
    final = float(re.search(r"final train loss\s+([0-9.]+)", run.stdout).group(1))
    assert final == pytest.approx(losses[-1], abs=1e-4), (final, losses)


def test_one_gpu_longest_recipe_switches_every_memory_saving_on():
    cfg = _compose("recipe=hf_llama_1gpu_longest", "data.train.path=train.bin", "data.val.path=val.bin")
    validate_config(cfg)
    assert (cfg.devices, cfg.ring_size, cfg.strategy.stage, cfg.strategy.offload_optimizer) == (1, 1, 3, True)
    module = instantiate(cfg.model)
    hp = module.hparams
    assert (hp.tiled_loss, hp.mlp_tile_tokens, hp.offload_checkpoints, hp.activation_checkpointing) == (
        True, 16384, True, True)
    assert module.hf_config.hidden_size == 2048 and module.hf_config.max_position_embeddings == cfg.seq_len == 524288
