"""What the app checks and says about a transformers model (``model=hf``) before any process starts.

The ring cannot apply attention dropout exactly, so a config with one is refused here, naming the key (the
MLP's and embeddings' dropout work normally: the model trains in train mode). The start line gives the real
attention and parameter count, counted on a model built on the meta device (no memory, no weights read).
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ..models.hf_overrides import apply_config_overrides, pretrained_or_given_config
from .config_error import ConfigError

# transformers' names for the attention-probability dropout, by model family.
ATTENTION_DROPOUT_KEYS = ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob")


def model_config(cfg: DictConfig) -> Any:
    """The transformers config of ``cfg.model``: a local pretrained directory's, else ``model.config``, with
    ``model.config_overrides`` set (checked: see ``models.hf_overrides``)."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    config = pretrained_or_given_config(model.get("pretrained"), model.get("config"))
    return apply_config_overrides(config, model.get("config_overrides"))


def check_attention_dropout(cfg: DictConfig) -> None:
    config = model_config(cfg)
    where = f"{cfg.model.pretrained}/config.json" if cfg.model.get("pretrained") else "model.config"
    for key in ATTENTION_DROPOUT_KEYS:
        value = getattr(config, key, None)
        if value:
            raise ConfigError(f"{where}: {key}={value} is attention dropout, which the ring cannot apply exactly; "
                              f"set it to 0.0 (model.config.{key}=0.0, or in the directory's config.json)")


def describe(cfg: DictConfig) -> tuple[str, int]:
    """(``ring attention (llama)``, the parameter count) for the start line."""
    from transformers import AutoModelForCausalLM

    config = model_config(cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return f"ring attention ({config.model_type})", sum(p.numel() for p in model.parameters())
