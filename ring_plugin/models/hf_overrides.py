"""Config overrides of a transformers model for a longer context (``model.config_overrides``), checked.

A pretrained folder brings its own config; a long-context run usually changes a few of its fields: RoPE's
base or scaling (``rope_parameters``) and ``max_position_embeddings``. Every override must name an existing
field, a ``rope_parameters`` override must be one transformers validates, and the resulting context must
hold ``seq_len``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any


def hf_config(config: Any) -> Any:
    """A transformers config from a config object or a dict with ``model_type`` (e.g. ``"llama"``)."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        return copy.deepcopy(config)
    values = dict(config)
    if "model_type" not in values:
        raise ValueError(f"config={values!r} needs a model_type (e.g. 'llama', 'qwen2', 'mistral')")
    return AutoConfig.for_model(values.pop("model_type"), **values)


def pretrained_or_given_config(pretrained: str | None, config: Any) -> Any:
    """The transformers config a run trains: the pretrained folder's (read, no weights), else ``config``."""
    from transformers import AutoConfig

    if pretrained is not None:
        if not Path(pretrained).expanduser().is_dir():
            raise ValueError(f"pretrained={pretrained!r} is not a folder (a local from_pretrained folder)")
        return AutoConfig.from_pretrained(str(Path(pretrained).expanduser()), local_files_only=True)
    if config is None:
        raise ValueError("pretrained is not set: give pretrained=FOLDER (a local from_pretrained folder), or a config")
    return hf_config(config)


def apply_config_overrides(config: Any, overrides: dict[str, Any] | None) -> Any:
    """A copy of ``config`` with ``overrides`` set; an unknown field or invalid RoPE parameters are refused."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = copy.deepcopy(config)
    for key, value in (overrides or {}).items():
        if not hasattr(config, key):
            raise ValueError(f"config_overrides.{key}: {type(config).__name__} has no field {key!r}")
        try:
            setattr(config, key, value)
        except (TypeError, ValueError) as err:  # transformers validates typed fields on assignment
            raise ValueError(f"config_overrides.{key}={value!r}: {str(err).splitlines()[-1].strip()}") from None
    rope = (overrides or {}).get("rope_parameters")
    if rope is not None:
        if not isinstance(rope, dict) or rope.get("rope_type", "default") not in {"default", *ROPE_INIT_FUNCTIONS}:
            raise ValueError(f"config_overrides.rope_parameters={rope!r} needs a rope_type of default, "
                             f"{', '.join(sorted(ROPE_INIT_FUNCTIONS))}")
        if not float(rope.get("rope_theta", 0)) > 0:
            raise ValueError(f"config_overrides.rope_parameters.rope_theta={rope.get('rope_theta')!r} must be positive")
        try:
            config.validate_rope()
        except (KeyError, ValueError) as err:
            raise ValueError(f"config_overrides.rope_parameters={rope!r}: {err}") from None
    return config


def check_context(config: Any, seq_len: int) -> None:
    """The model's context (``max_position_embeddings``) holds ``seq_len``."""
    longest = getattr(config, "max_position_embeddings", None)
    if longest is not None and longest < seq_len:
        raise ValueError(f"config_overrides: the model's max_position_embeddings={longest} is below seq_len={seq_len}; "
                         "set config_overrides.max_position_embeddings (and raise RoPE's base: "
                         "config_overrides.rope_parameters.rope_theta) for the longer context")
