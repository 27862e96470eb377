"""``RingCausalLM``: causal-LM training of a :class:`RingGPT` on sequence shards.

The loss is the token-weighted mean over every label of the global batch (all ranks, all rings): each
rank sums its local token losses, one all-reduce gives the global label count. DDP and DeepSpeed
average gradients over the whole world (they divide by its size), so the backward runs on
``world_size * local_sum / global_count``; the sum of every rank's gradient is then exactly the
gradient of the full-batch mean, as one process on the concatenated batch computes it.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from ..shard_plan import SequenceShards
from ..sharding import batch_documents
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
        schedule_steps: int | None = None,
    ):
        super().__init__()
        config = model if isinstance(model, GPTConfig) else GPTConfig.from_dict(dict(model))
        self.save_hyperparameters({"model": config.__dict__, "lr": lr, "weight_decay": weight_decay,
                                   "betas": tuple(betas), "warmup_steps": warmup_steps, "max_steps": max_steps,
                                   "min_lr_ratio": min_lr_ratio, "schedule_steps": schedule_steps,
                                   "loss_chunk_tokens": loss_chunk_tokens})
        self.config = config
        self.model = RingGPT(config)
        self._val_sums: torch.Tensor | None = None
        self._tokens_seen = 0.0

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                document_ids: torch.Tensor | SequenceShards | None = None) -> torch.Tensor:
        return self.model(input_ids, position_ids, document_ids)

    def flops_per_token(self, seq_len: int) -> float:
        return self.model.flops_per_token(seq_len)

    def hidden_and_head(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's final hidden states and the head weight that turns them into logits (read in
        forward, where ZeRO-3 gathers a partitioned weight on access)."""
        hidden = self.model.hidden_states(batch["input_ids"], batch["position_ids"], batch_documents(batch))
        return hidden, self.model.head_weight

    def loss_tile_tokens(self, tokens: int) -> int:
        """Tokens per chunk of the fused head and cross-entropy over ``tokens`` labels."""
        return self.hparams.loss_chunk_tokens

    def local_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of this rank's token losses, [label count, loss sum, input tokens] to all-reduce)."""
        hidden, head_weight = self.hidden_and_head(batch)
        labels = batch["labels"]
        loss_sum = linear_cross_entropy_sum(hidden, head_weight, labels, self.loss_tile_tokens(labels.numel()))
        stats = torch.stack([(labels != IGNORE_INDEX).sum().to(torch.float64), loss_sum.detach().double(),
                             torch.tensor(float(labels.numel()), dtype=torch.float64, device=labels.device)])
        return loss_sum, _all_reduce_sum(stats)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss_sum, (count, total, tokens) = self.local_loss(batch)
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
        _, stats = self.local_loss(batch)
        self._val_sums = stats if self._val_sums is None else self._val_sums + stats

    def on_validation_epoch_end(self) -> None:
        if self._val_sums is not None:
            count, total, _ = self._val_sums
            self.log("val/loss", (total / count.clamp_min(1.0)).float(), prog_bar=True)

    def _parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW's groups, in order: matrices decay, vectors do not (empty groups left out). A ZeRO-3
        partitioned parameter keeps its real shape in ds_shape."""
        hp = self.hparams
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if len(getattr(p, "ds_shape", p.shape)) >= 2]
        no_decay = [p for p in params if len(getattr(p, "ds_shape", p.shape)) < 2]
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def schedule_length(self) -> int:
        """Steps of the cosine schedule: ``schedule_steps``, else ``max_steps``, else the trainer's estimate."""
        hp = self.hparams
        return hp.get("schedule_steps") or hp.max_steps or max(1, int(self.trainer.estimated_stepping_batches))

    def lr_factor(self, step: int) -> float:
        hp = self.hparams
        return warmup_cosine(step, hp.warmup_steps, self.schedule_length(), hp.min_lr_ratio)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.AdamW(self._parameter_groups(), lr=hp.lr, betas=tuple(hp.betas))
        # A plain function, so the scheduler's state_dict leaves it out: a resume uses this run's schedule.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.lr_factor(step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        """A restored optimizer and scheduler keep the checkpoint's LR, weight decay and betas: set this run's
        (the same values on a plain resume; the new ones on ``resume=force``). The schedule's shape (warm-up,
        length, floor) is this run's already: ``lr_factor`` reads the current hyper-parameters."""
        if not self.trainer.optimizers or not self.trainer.lr_scheduler_configs:
            return
        apply_optimizer_settings(self.trainer.optimizers[0], self.trainer.lr_scheduler_configs[0].scheduler,
                                 self.hparams, [g["weight_decay"] for g in self._parameter_groups()])


def apply_optimizer_settings(optimizer: Any, scheduler: Any, hp: Any, weight_decays: list[float]) -> None:
    """This run's LR, betas and per-group weight decay on a (restored) optimizer and its LambdaLR."""
    groups = optimizer.param_groups
    if len(groups) != len(weight_decays) or not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        return  # not the optimizer configure_optimizers made (a subclass's own): leave it as restored
    step = scheduler.last_epoch
    scheduler.base_lrs = [float(hp.lr)] * len(groups)
    for group, decay, factor in zip(groups, weight_decays, scheduler.lr_lambdas):
        group.update(initial_lr=float(hp.lr), weight_decay=decay, betas=tuple(hp.betas), lr=float(hp.lr) * factor(step))
    scheduler._last_lr = [g["lr"] for g in groups]


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _training_parameters() -> list[inspect.Parameter]:
    """RingCausalLM's training arguments (optimizer, schedule, loss chunks): everything but its ``model``."""
    params = inspect.signature(RingCausalLM.__init__).parameters
    return [p for name, p in params.items() if name not in ("self", "model")]


def training_arguments(given: dict[str, Any], owner: str) -> dict[str, Any]:
    """The training arguments a sibling of RingCausalLM was given as ``**training``, defaults filled in; a
    name RingCausalLM does not take raises ``TypeError`` as Python would for ``owner``."""
    params = _training_parameters()
    unknown = sorted(set(given) - {p.name for p in params})
    if unknown:
        raise TypeError(f"{owner}.__init__() got an unexpected keyword argument {unknown[0]!r}")
    return {p.name: given.get(p.name, p.default) for p in params}


def takes_training_arguments(init: Callable) -> Callable:
    """For an ``__init__(self, ..., **training)``: its signature, as ``inspect`` (and so Hydra's key checks
    and ``help``) reads it, names RingCausalLM's training arguments, keyword-only, with their defaults."""
    own = [p for p in inspect.signature(init).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    training = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in _training_parameters()]
    init.__signature__ = inspect.Signature(own + training)  # type: ignore[attr-defined]
    return init
