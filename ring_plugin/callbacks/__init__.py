"""Lightning callbacks of the ``ring-train`` app: atomic checkpoints, fault tolerance, monitoring, task metrics."""

from .checkpoint_files import newest_complete_checkpoint
from .checkpointing import AtomicModelCheckpoint
from .fault_tolerance import FaultTolerance
from .final_checkpoint import FinalCheckpoint
from .hf_export import HFExport
from .long_context_eval import LongContextEval
from .monitoring import RingMonitor
from .progress import RingProgressBar
from .task_accuracy import TaskAccuracy

__all__ = ["AtomicModelCheckpoint", "FaultTolerance", "FinalCheckpoint", "HFExport", "LongContextEval", "RingMonitor",
           "RingProgressBar", "TaskAccuracy", "newest_complete_checkpoint"]
