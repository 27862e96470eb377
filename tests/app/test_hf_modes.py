"""A transformers model trains in train mode (its dropout on), attention dropout the ring cannot apply is refused
before any process starts, and the start line gives the real attention and parameter count."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from ring_plugin.app.config_checks import ConfigError
from ring_plugin.app.hf_model import check_attention_dropout, describe
from tests import prefork

from ..hf_harness import tiny_model
from .helpers import REPO, env
from .test_config import compose_app

GPT2 = {"model_type": "gpt2", "vocab_size": 64, "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64,
        "bos_token_id": 0, "eos_token_id": 0}


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved GPT-2 with MLP/residual and embedding dropout 0.1 and no attention dropout."""
    from transformers import AutoModelForCausalLM, GPT2Config

    path = tmp_path_factory.mktemp("gpt2")
    config = GPT2Config(**{k: v for k, v in GPT2.items() if k != "model_type"}, resid_pdrop=0.1, embd_pdrop=0.1,
                        attn_pdrop=0.0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def test_pretrained_model_trains_in_train_mode_with_its_dropout(gpt2_dir: Path) -> None:
    module = instantiate(compose_app("model=hf", f"model.pretrained={gpt2_dir}", "seq_len=16").model)
    module.configure_model()
    assert all(m.training for m in module.model.modules())  # from_pretrained alone gives eval mode
    ids = torch.arange(16).remainder(64).unsqueeze(0)
    batch = {"input_ids": ids, "position_ids": torch.arange(16).unsqueeze(0)}
    torch.manual_seed(0)
    first, _ = module.hidden_and_head(batch)
    second, _ = module.hidden_and_head(batch)
    assert not torch.equal(first, second)  # dropout is on: two passes differ
    module.eval()
    assert torch.equal(module.hidden_and_head(batch)[0], module.hidden_and_head(batch)[0])


@pytest.mark.parametrize("key", ["attn_pdrop"])
def test_attention_dropout_is_refused_naming_the_key(key: str) -> None:
    cfg = compose_app("model=hf", "model.config.model_type=gpt2", "~model.config.num_key_value_heads",
                      f"+model.config.{key}=0.1")
    with pytest.raises(ConfigError) as err:
        check_attention_dropout(cfg)
    assert str(err.value) == (f"model.config: {key}=0.1 is attention dropout, which the ring cannot apply exactly; "
                              f"set it to 0.0 (model.config.{key}=0.0, or in the directory's config.json)")


def test_describe_counts_the_real_parameters(gpt2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    cfg = compose_app("model=hf", f"model.pretrained={gpt2_dir}")
    expected = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(gpt2_dir).parameters())
    assert describe(cfg) == ("ring attention (gpt2)", expected)


@pytest.mark.timeout(300)
def test_ring_train_pretrained_banner_and_train_mode(tmp_path: Path) -> None:
    saved = tmp_path / "llama"
    model = tiny_model("llama", "eager")
    model.save_pretrained(saved)
    params = sum(p.numel() for p in model.parameters())
    # The data's vocabulary is model.config.vocab_size: the saved model's.
    cmd = [prefork.python(), "-m", "ring_plugin.app.train", f"hydra.run.dir={tmp_path / 'run'}", "model=hf",
           f"model.pretrained={saved}", f"model.config.vocab_size={model.config.vocab_size}", "logger=[csv]",
           "max_steps=2", "seq_len=64", "data.batch_size=2", "data.val_batches=1", "trainer.enable_progress_bar=false",
           "comm_timeout=30"]
    run = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stderr[-3000:]
    text = run.stdout + run.stderr
    assert f": ring attention (llama), {params / 1e6:.2f}M parameters, seq_len 64," in text
    assert "eval mode" not in text
