"""Data for long-context training: synthetic tasks, token files, raw bytes, packed documents, a DataModule."""

from .files import ByteTextDataset, TokenFileDataset
from .hf_text import HFTextDataModule
from .module import RingDataModule
from .packed import PackedSynthetic, PackedTextFolder, PackedTokenFile, packed_documents
from .stream import StepSampler
from .tasks import IGNORE_INDEX, AssociativeRecall, PasskeyRetrieval, answer_accuracy

__all__ = [
    "IGNORE_INDEX",
    "AssociativeRecall",
    "ByteTextDataset",
    "HFTextDataModule",
    "PackedSynthetic",
    "PackedTextFolder",
    "PackedTokenFile",
    "PasskeyRetrieval",
    "RingDataModule",
    "StepSampler",
    "TokenFileDataset",
    "answer_accuracy",
    "packed_documents",
]
