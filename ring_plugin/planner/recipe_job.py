"""A planner :class:`Job` from a composed ``ring-train`` config: RingGPT or a transformers model."""

from __future__ import annotations

from typing import Any

from .hf_models import HF_TARGET, spec_from_hf_model
from .workload import Job, Layout, ModelSpec


def job_from_config(cfg: Any, name: str) -> Job:
    """A :class:`Job` from a composed ``ring-train`` config: RingGPT (``model=gpt_*``) or a transformers
    model (``model=hf``: its ``model.config`` or the ``config.json`` of ``model.pretrained``)."""
    from omegaconf import OmegaConf

    for key in ("seq_len", "data.batch_size", "devices", "num_nodes", "ring_size", "ulysses_size"):
        value = OmegaConf.select(cfg, key, default=1)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{key}={value!r} must be a positive integer")
    model = OmegaConf.to_container(cfg.model, resolve=True)
    assert isinstance(model, dict)
    if "_target_" in model:
        if model["_target_"] != HF_TARGET:
            raise ValueError(f"recipe {name!r} trains {model['_target_']}; the planner models RingGPT (model=gpt_*) "
                             f"and transformers models (model=hf)")
        spec = spec_from_hf_model(model, int(cfg.seq_len))
    else:
        attention = cfg.attention
        kwargs = attention.get("kwargs")
        model.update(attention=str(attention.layer),
                     attention_kwargs=OmegaConf.to_container(kwargs, resolve=True) if kwargs else {},
                     max_seq_len=max(int(cfg.seq_len), 1))
        spec = ModelSpec.from_dict(model)
    stage = int(cfg.strategy.get("stage", 0)) if "stage" in cfg.strategy else 0
    world = int(cfg.devices) * int(cfg.num_nodes)
    ulysses = int(cfg.get("ulysses_size") or 1)  # read where the app has it; not required
    ring = int(cfg.ring_size)
    layout = Layout(world // (ring * ulysses), ulysses, ring, stage, bool(spec.config.activation_checkpointing),
                    bool(spec.config.recompute_attention), spec.config.checkpoint_layers,
                    host_offload=bool(spec.config.offload_checkpoints))
    precision = str(cfg.trainer.precision)
    chunk = model.get("loss_chunk_tokens")  # the model's loss tiles (RingCausalLM / HFCausalLM's argument)
    return Job(model=spec, seq_len=int(cfg.seq_len), batch=int(cfg.data.get("batch_size", 1)),
               act_bytes=4 if precision.startswith("32") else 2, name=name, recipe_layout=layout,
               **({"loss_chunk": int(chunk)} if chunk is not None else {}),
               tiled_loss=bool(model.get("tiled_loss", True)),
               offload_optimizer=bool(cfg.strategy.get("offload_optimizer", False)))
