"""``RingCausalLM``: causal-LM training of a :class:`RingGPT` on sequence shards.

The loss is the token-weighted mean over every label of the global batch (all ranks, all rings): each
rank sums its local token losses, one all-reduce gives the global label count. DDP and DeepSpeed
average gradients over the whole world (they divide by its size), so the backward runs on
``world_size * local_sum / global_count``; the sum of every rank's gradient is then exactly the
gradient of the full-batch mean, as one process on the concatenated batch computes it.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from .gpt import GPTConfig, RingGPT
from .loss import IGNORE_INDEX, linear_cross_entropy_sum


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


class RingCausalLM(pl.LightningModule):
    def __init__(
        self,
        model: GPTConfig | dict[str, Any],
        lr: float = 3e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 0,
        max_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        loss_chunk_tokens: int = 4096,
    ):
        super().__init__()
        config = model if isinstance(model, GPTConfig) else GPTConfig.from_dict(dict(model))
        self.save_hyperparameters({"model": config.__dict__, "lr": lr, "weight_decay": weight_decay,
                                   "betas": tuple(betas), "warmup_steps": warmup_steps, "max_steps": max_steps,
                                   "min_lr_ratio": min_lr_ratio,
                                   "loss_chunk_tokens": loss_chunk_tokens})
        self.config = config
        self.model = RingGPT(config)
        self._val_sums: torch.Tensor | None = None
        self._tokens_seen = 0.0

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, position_ids, document_ids)

    def flops_per_token(self, seq_len: int) -> float:
        return self.model.flops_per_token(seq_len)

    def hidden_and_head(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's final hidden states and the head weight that turns them into logits (read in
        forward, where ZeRO-3 gathers a partitioned weight on access)."""
        hidden = self.model.hidden_states(batch["input_ids"], batch["position_ids"], batch.get("document_ids"))
        return hidden, self.model.head_weight

    def _local_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of this rank's token losses, [label count, loss sum, input tokens] to all-reduce)."""
        hidden, head_weight = self.hidden_and_head(batch)
        labels = batch["labels"]
        loss_sum = linear_cross_entropy_sum(hidden, head_weight, labels, self.hparams.loss_chunk_tokens)
        stats = torch.stack([(labels != IGNORE_INDEX).sum().to(torch.float64), loss_sum.detach().double(),
                             torch.tensor(float(labels.numel()), dtype=torch.float64, device=labels.device)])
        return loss_sum, _all_reduce_sum(stats)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss_sum, (count, total, tokens) = self._local_loss(batch)
        count = count.clamp_min(1.0)
        mean = (total / count).float()
        world = self.trainer.world_size if self._trainer is not None else 1
        local = loss_sum * (world / count.float())
        # Value: the global mean (what the progress bar and callbacks see); gradient: that of `local`.
        loss = local + (mean - local.detach())
        self.log("train/loss", mean, prog_bar=True)
        self.log("train/tokens_per_step", tokens.float())
        self._tokens_seen += float(tokens)
        self.log("train/tokens", self._tokens_seen)
        if self._trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ring_tokens_seen"] = self._tokens_seen

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._tokens_seen = float(checkpoint.get("ring_tokens_seen", 0.0))

    def on_validation_epoch_start(self) -> None:
        self._val_sums = None

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        _, stats = self._local_loss(batch)
        self._val_sums = stats if self._val_sums is None else self._val_sums + stats

    def on_validation_epoch_end(self) -> None:
        if self._val_sums is not None:
            count, total, _ = self._val_sums
            self.log("val/loss", (total / count.clamp_min(1.0)).float(), prog_bar=True)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        # Matrices decay, vectors do not; a ZeRO-3 partitioned parameter keeps its real shape in ds_shape.
        decay = [p for p in self.model.parameters() if p.requires_grad and len(getattr(p, "ds_shape", p.shape)) >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and len(getattr(p, "ds_shape", p.shape)) < 2]
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=hp.lr, betas=tuple(hp.betas))
        total = hp.max_steps or max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: _warmup_cosine(step, hp.warmup_steps, total, hp.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
