"""``HFCausalLM``: causal-LM training of any transformers causal LM on sequence shards.

The sibling of :class:`~ring_plugin.models.RingCausalLM` for a transformers backbone: the same
batches (full-length ``input_ids`` and pre-shifted ``labels``, sharded by the ring strategy), the same
token-weighted global loss and loss scaling, optimizer, schedule and logging (inherited), with the
chunked cross-entropy over the backbone's hidden states so the full-vocabulary logits never exist.

The model is built in :meth:`configure_model`, which Lightning calls inside the strategy's init
context: under ZeRO-3 transformers' own ``zero.Init`` path partitions every parameter as it is
created (and initialises or loads weights gathered one module at a time), so no rank ever holds the
full model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from ..shard_plan import SHARDS_KEY, SequenceShards
from ..sharding import batch_documents
from .hf_overrides import apply_config_overrides, hf_config, pretrained_or_given_config
from .lightning_module import RingCausalLM, takes_training_arguments, training_arguments


def build_hf_causal_lm(pretrained: str | None, config: Any, dtype: torch.dtype,
                       config_overrides: dict[str, Any] | None = None) -> nn.Module:
    """The causal LM on ``attn_implementation="ring"``: from a local directory or a config (with
    ``config_overrides`` set on the pretrained folder's config, e.g. a longer context's RoPE)."""
    from transformers import AutoModelForCausalLM

    import ring_plugin.hf  # noqa: F401 - registers "ring"
    from ring_plugin.hf.tiling import logit_transform_error

    if pretrained is not None:
        extra = {}
        if config_overrides:
            extra["config"] = apply_config_overrides(pretrained_or_given_config(pretrained, None), config_overrides)
        model = AutoModelForCausalLM.from_pretrained(pretrained, attn_implementation="ring", dtype=dtype,
                                                     local_files_only=True, **extra)
    else:
        model = AutoModelForCausalLM.from_config(hf_config(config), attn_implementation="ring", dtype=dtype)
    error = logit_transform_error(model)
    if error is not None:
        raise ValueError(f"{error}; train it with its own head instead")
    model.config.use_cache = False  # a KV cache in training is refused on the ring
    return model


class HFCausalLM(RingCausalLM):
    """``pretrained``: a local ``from_pretrained`` directory (its weights and config; takes precedence), or
    ``config``: a transformers config or a dict with ``model_type`` (random init). The other arguments are
    :class:`RingCausalLM`'s; ``activation_checkpointing`` recomputes each decoder layer in backward;
    ``config_overrides`` sets fields of the config (a longer context's ``rope_parameters``, ...).

    For the longest sequences (see :func:`ring_plugin.hf.enable_long_context`): ``tiled_loss`` computes
    the head and cross-entropy ``loss_chunk_tokens`` tokens at a time (False: all at once, the full
    logits); ``mlp_tile_tokens`` runs each decoder MLP in tiles of that many tokens, recomputed in
    backward; ``offload_checkpoints`` (with ``activation_checkpointing``) keeps each checkpointed
    layer's input in pinned host memory until backward."""

    @takes_training_arguments
    def __init__(
        self,
        pretrained: str | None = None,
        config: Any = None,
        *,
        activation_checkpointing: bool = False,
        tiled_loss: bool = True,
        mlp_tile_tokens: int | None = None,
        offload_checkpoints: bool = False,
        config_overrides: dict[str, Any] | None = None,
        **training: Any,
    ):
        # RingCausalLM.__init__ builds a RingGPT; everything else of it (loss scaling, steps, optimizer) is shared,
        # its training arguments (lr, weight_decay, ..., schedule_steps) included.
        training = training_arguments(training, type(self).__name__)
        pl.LightningModule.__init__(self)
        if pretrained is None and config is None:
            raise ValueError("give pretrained (a local from_pretrained directory) or config (a transformers config, "
                             "or a dict with model_type, for a random init)")
        from ..hf.tiling import check_long_context_args

        check_long_context_args(tiled_loss, mlp_tile_tokens, offload_checkpoints, training["loss_chunk_tokens"])
        if offload_checkpoints and not activation_checkpointing:
            raise ValueError("offload_checkpoints=True needs activation_checkpointing=True (it offloads the "
                             "checkpointed layers' inputs)")
        # The architecture of a random init; a pretrained directory brings its own. Parsed now, so a bad
        # config fails before any process starts.
        config = None if pretrained is not None else apply_config_overrides(hf_config(config), config_overrides)
        self.save_hyperparameters({
            "pretrained": pretrained, "config": None if config is None else config.to_dict(),
            **training, "betas": tuple(training["betas"]), "activation_checkpointing": activation_checkpointing,
            "tiled_loss": tiled_loss, "mlp_tile_tokens": mlp_tile_tokens, "offload_checkpoints": offload_checkpoints,
            "config_overrides": config_overrides})
        self.hf_config = config
        self.model: nn.Module | None = None
        self._val_sums: torch.Tensor | None = None
        self._tokens_seen = 0.0

    def configure_model(self) -> None:
        from ..hf.tiling import enable_long_context

        if self.model is not None:
            return
        with _zero3_announced(self._trainer):
            self.model = build_hf_causal_lm(self.hparams.pretrained, self.hf_config, torch.get_default_dtype(),
                                            self.hparams.config_overrides if self.hparams.pretrained else None)
        # from_pretrained returns the model in eval mode: train it in train mode (its MLP and embedding dropout on).
        self.model.train(self.training)
        hp = self.hparams
        if hp.activation_checkpointing and not hp.offload_checkpoints:
            # Recomputing a layer re-runs its ring forward: every rank recomputes the same layers in the same order.
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # The loss here runs through hidden_and_head, not the model's forward: its tiles are loss_tile_tokens'.
        enable_long_context(self.model, tiled_loss=False, mlp_tile_tokens=hp.mlp_tile_tokens,
                            offload_checkpoints=hp.offload_checkpoints)

    def loss_tile_tokens(self, tokens: int) -> int:
        return self.hparams.loss_chunk_tokens if self.hparams.tiled_loss else max(tokens, 1)

    def _require_model(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError("the model is built by configure_model() (Lightning calls it in fit); call it first")
        return self.model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                document_ids: torch.Tensor | SequenceShards | None = None) -> torch.Tensor:
        return self._require_model()(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                                     **document_kwargs(document_ids)).logits

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), for MFU.

        Matmuls: 2 FLOPs per weight of every ``nn.Linear`` (the head included, the embedding lookup not);
        attention: QK^T and PV cost 4 x keys x head_dim per head per query, halved by the causal mask.
        """
        model = self._require_model()
        c = model.config
        linear = sum(int(getattr(m.weight, "ds_numel", m.weight.numel()))
                     for m in model.modules() if isinstance(m, nn.Linear))
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        attention = c.num_hidden_layers * c.num_attention_heads * 4 * head_dim * seq_len * 0.5
        return 3.0 * (2.0 * linear + attention)

    def hidden_and_head(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        model = self._require_model()
        hidden = model.get_decoder()(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                     use_cache=False, **document_kwargs(batch_documents(batch))).last_hidden_state
        return hidden, model.get_output_embeddings().weight


def document_kwargs(documents: torch.Tensor | SequenceShards | None) -> dict[str, Any]:
    """The keyword arguments that carry packed documents through a transformers model to the ring
    attention: the shard plan, or (slow path) this rank's ids."""
    if documents is None:
        return {}
    return {SHARDS_KEY: documents} if isinstance(documents, SequenceShards) else {"document_ids": documents}


@contextlib.contextmanager
def _zero3_announced(trainer: Any) -> Iterator[None]:
    """Under ZeRO-3, tell transformers (its global ``HfDeepSpeedConfig``) while the model is built, so that
    it creates, initialises and loads it partitioned; withdrawn afterwards, so a model built later in the
    same process (without ZeRO-3) is not partitioned."""
    strategy = getattr(trainer, "strategy", None) if trainer is not None else None
    config = getattr(strategy, "config", None)
    if not isinstance(config, dict) or config.get("zero_optimization", {}).get("stage") != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    announced = HfDeepSpeedConfig(config)  # noqa: F841 - transformers holds only a weak reference
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
