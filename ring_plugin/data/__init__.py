"""Data for long-context training: synthetic retrieval tasks, token files, raw bytes, and a DataModule."""

from .files import ByteTextDataset, TokenFileDataset
from .module import RingDataModule
from .stream import StepSampler
from .tasks import IGNORE_INDEX, AssociativeRecall, PasskeyRetrieval, answer_accuracy

__all__ = [
    "IGNORE_INDEX",
    "AssociativeRecall",
    "ByteTextDataset",
    "PasskeyRetrieval",
    "RingDataModule",
    "StepSampler",
    "TokenFileDataset",
    "answer_accuracy",
]
