"""Lightning strategies for sequence-parallel training on the ring (registered on import).

    from lightning.pytorch import Trainer
    from ring_plugin.lightning import RingDeepSpeedStrategy
    from ring_plugin.models import RingCausalLM

    module = RingCausalLM(dict(vocab_size=50304, n_layer=12, n_head=12, n_embd=768, max_seq_len=131072,
                               activation_checkpointing=True))
    trainer = Trainer(accelerator="gpu", devices=2, precision="bf16-mixed", max_steps=1000,
                      strategy=RingDeepSpeedStrategy(stage=3, ring_size=2))  # or strategy="ring_deepspeed_stage_3"
    trainer.fit(module, dataloader)  # batches: full-length input_ids and pre-shifted labels

The strategy shards each batch along the sequence; ranks of one ring read the same samples. With
your own LightningModule, compute a loss whose gradients, averaged over every rank (what DDP and
DeepSpeed do), give the full batch's gradient, as ``RingCausalLM`` does; a per-rank mean loss does
this whenever every rank holds the same number of labelled tokens.
"""

from ..sharding import shard_batch
from .ddp import RingStrategy
from .deepspeed import RingDeepSpeedStrategy
from .groups import RingGroups
from .registry import register_strategies
from .resumable import ResumableLoader

register_strategies()

__all__ = ["ResumableLoader", "RingDeepSpeedStrategy", "RingGroups", "RingStrategy", "register_strategies",
           "shard_batch"]
