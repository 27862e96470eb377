"""Lightning strategies for sequence-parallel training on the ring (registered on import)."""

from .ddp import RingStrategy
from .deepspeed import RingDeepSpeedStrategy
from .groups import RingGroups
from .registry import register_strategies
from .resumable import ResumableLoader
from .sharding import shard_batch

register_strategies()

__all__ = ["ResumableLoader", "RingDeepSpeedStrategy", "RingGroups", "RingStrategy", "register_strategies",
           "shard_batch"]
