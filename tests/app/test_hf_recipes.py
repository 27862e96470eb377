"""The HF job recipes: the 128K continued-pretraining recipe extends a short-context pretrained model through
``model.config_overrides`` (checked before anything starts), the SFT recipe trains on chat data."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from ring_plugin.app.config_checks import ConfigError, validate_config
from ring_plugin.models.hf_overrides import apply_config_overrides, pretrained_or_given_config

from .hf_pretrained import SHORT_CONTEXT, short_context_llama
from .test_config import compose_app


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return str(short_context_llama(tmp_path_factory.mktemp("hf_recipes") / "llama"))


def test_128k_recipe_raises_the_rope_base_of_the_pretrained_model(pretrained):
    cfg = compose_app("recipe=hf_continued_pretraining_128k", f"model.pretrained={pretrained}", "data.path=x")
    validate_config(cfg)
    assert (cfg.seq_len, cfg.layout, cfg.strategy.stage, cfg.data.tokenizer) == (131072, "balanced", 3, pretrained)
    overrides = OmegaConf.to_container(cfg.model.config_overrides)
    config = apply_config_overrides(pretrained_or_given_config(pretrained, None), overrides)
    assert config.rope_parameters["rope_theta"] == 8.0e6 and config.max_position_embeddings == 131072
    assert pretrained_or_given_config(pretrained, None).max_position_embeddings == SHORT_CONTEXT  # folder untouched


@pytest.mark.parametrize("override, message", [
    ("model.config_overrides=null", "max_position_embeddings=8192 is below seq_len=131072"),
    ("+model.config_overrides.rope_base=1e7", "model.config_overrides.rope_base: LlamaConfig has no field"),
    ("model.config_overrides.rope_parameters.rope_type=warp", "rope_parameters="),
    ("model.config_overrides.rope_parameters={rope_type: yarn, rope_theta: 1e6}", "Missing required keys"),
])
def test_128k_recipe_checks_the_config_overrides(pretrained, override, message):
    cfg = compose_app("recipe=hf_continued_pretraining_128k", f"model.pretrained={pretrained}", "data.path=x",
                      override)
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)


def test_sft_recipe_is_chat_with_assistant_only_labels(pretrained):
    cfg = compose_app("recipe=hf_sft_32k", f"model.pretrained={pretrained}", "data.path=x",
                      "model.config_overrides={max_position_embeddings: 32768}")
    validate_config(cfg)
    assert (cfg.seq_len, cfg.data.messages_field, cfg.data.packing) == (32768, "messages", "bfd")
