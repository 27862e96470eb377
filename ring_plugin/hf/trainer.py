"""transformers' ``Trainer`` on the ring: :class:`RingTrainer`.

    trainer = RingTrainer(model=model, args=TrainingArguments(...), train_dataset=full_length_samples,
                          ring_size=2)          # torchrun --nproc_per_node 4: 2 rings of 2
    trainer.train()

What differs from the plain ``Trainer``, and why:

- **Data.** Every rank of a ring must read the same full-length sample, so the loaders sample over the
  data-parallel ranks (one ring = one replica), not over every process as accelerate would.
- **Inputs.** ``compute_loss`` shards each batch for this rank (:func:`shard_batch`: global
  ``position_ids``, ``shift_labels`` made over the whole sequence, packed documents) inside the ring.
- **Loss.** The token count ``num_items_in_batch`` covers the labelled tokens of every accumulated
  micro-batch of every ring; each rank's loss is its share of the global mean. accelerate's DDP
  averages gradients over all processes, so the loss is scaled by their number: the sum of the
  shares' gradients is then exactly one process's gradient on the whole batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from transformers import Trainer

from ..comm.context import RingContext, ring_context
from ..comm.topology import SequenceMesh, build_mesh
from ..layout import check_layout
from .batch import count_labels, full_sequence_batch, shard_batch
from .tiling import check_long_context_args, enable_long_context


class RingTrainer(Trainer):
    """A ``Trainer`` whose attention runs on rings of ``ring_size`` (x ``ulysses_size``) processes.

    The model must use ``attn_implementation="ring"`` (``import ring_plugin.hf``); datasets yield
    full-length samples (``input_ids``, ``labels``, optionally packed ``position_ids``). Supports
    data parallel x Ulysses x ring under the DDP accelerate sets up; DeepSpeed/FSDP through the
    ``Trainer`` are not wired (use ``RingDeepSpeedStrategy`` with Lightning for ZeRO).
    ``tiled_loss``, ``mlp_tile_tokens``, ``offload_checkpoints`` and ``loss_tile_tokens`` switch the
    model for the longest sequences (:func:`~ring_plugin.hf.enable_long_context`).
    """

    def __init__(self, *args: Any, ring_size: int | None = None, ulysses_size: int = 1, layout: str = "zigzag",
                 tiled_loss: bool = False, mlp_tile_tokens: int | None = None, offload_checkpoints: bool = False,
                 loss_tile_tokens: int = 4096, **kwargs: Any):
        check_long_context_args(tiled_loss, mlp_tile_tokens, offload_checkpoints, loss_tile_tokens)
        super().__init__(*args, **kwargs)
        check_layout(layout)
        if offload_checkpoints and self.args.gradient_checkpointing:
            raise ValueError("offload_checkpoints=True checkpoints every decoder layer itself: leave "
                             "TrainingArguments.gradient_checkpointing off")
        enable_long_context(self.model, tiled_loss=tiled_loss, mlp_tile_tokens=mlp_tile_tokens,
                            offload_checkpoints=offload_checkpoints, loss_tile_tokens=loss_tile_tokens)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError("RingTrainer shards sequences under DDP only; for ZeRO use RingDeepSpeedStrategy")
        distributed = dist.is_available() and dist.is_initialized()
        if not distributed and (ring_size or 1) * ulysses_size > 1:
            raise ValueError(f"ring_size={ring_size}, ulysses_size={ulysses_size} need a distributed launch "
                             "(torchrun); one process trains without a ring")
        mesh = build_mesh(ring_size, ulysses_size) if distributed else SequenceMesh.of_ring(None)
        self.ring = RingContext(mesh, layout)
        # num_items_in_batch below counts every accumulated micro-batch: the loss needs no further division.
        self.loss_is_scaled_for_ga = True

    def _data_parallel(self) -> tuple[int, int]:
        if "dp" not in self.ring.mesh.names:
            return 1, 0
        return self.ring.mesh.size("dp"), self.ring.mesh.rank("dp")

    def _ring_loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        replicas, rank = self._data_parallel()
        sampler = DistributedSampler(dataset, num_replicas=replicas, rank=rank, shuffle=shuffle, seed=self.args.seed,
                                     drop_last=self.args.dataloader_drop_last)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=self.data_collator,
                          num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory,
                          drop_last=self.args.dataloader_drop_last)

    def get_train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise ValueError("RingTrainer: training requires a train_dataset")
        return self._ring_loader(self.train_dataset, self._train_batch_size, shuffle=True)

    def get_eval_dataloader(self, eval_dataset: str | Dataset | None = None) -> DataLoader:
        if isinstance(eval_dataset, str):
            eval_dataset = self.eval_dataset[eval_dataset]
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("RingTrainer: evaluation requires an eval_dataset")
        return self._ring_loader(dataset, self.args.eval_batch_size, shuffle=False)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """Labelled tokens of every accumulated micro-batch of every ring (each ring counted once)."""
        if not batch_samples or "labels" not in batch_samples[0]:
            return None
        count = sum(count_labels(full_sequence_batch(batch)) for batch in batch_samples).to(device)
        replicas, _ = self._data_parallel()
        if replicas > 1:
            dist.all_reduce(count, group=self.ring.mesh.group("dp"))
        return count

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        # The ring is active only around the model call: the one place the Trainer runs attention.
        with ring_context(self.ring.group, self.ring.layout, mesh=self.ring.mesh):
            shard = shard_batch(inputs, num_items_in_batch=num_items_in_batch)
            outputs = model(**shard, use_cache=False)
        # Training: DDP averages gradients over all processes and the shares must add up, so undo the
        # average. Evaluation: the Trainer averages the processes' losses, which must give the mean
        # over rings of each ring's loss (the sum of its ranks' shares).
        loss = outputs.loss * (self.accelerator.num_processes if model.training else self.ring.sequence_size)
        return (loss, outputs) if return_outputs else loss
