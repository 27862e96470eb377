"""Datasets over real corpora: nanoGPT-style token files and raw bytes of any text file.

Both are memory-mapped (nothing is read until a sample is asked for) and cut into fixed windows of
``seq_len + 1`` tokens; ``labels`` are the window shifted by one (the whole sequence is scored).
Window ``i`` starts at ``i * stride`` (default: non-overlapping), so samples are deterministic.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

_DTYPES = {"uint16": np.uint16, "uint32": np.uint32, "uint8": np.uint8}


class _WindowDataset(Dataset):
    def __init__(self, tokens: np.ndarray, seq_len: int, stride: int | None, source: Path):
        if seq_len <= 0:
            raise ValueError(f"seq_len={seq_len} must be positive")
        self.tokens = tokens
        self.seq_len = seq_len
        self.stride = stride or seq_len
        if self.stride <= 0:
            raise ValueError(f"stride={stride} must be positive")
        if len(tokens) < seq_len + 1:
            raise ValueError(f"{source} holds {len(tokens)} tokens; seq_len={seq_len} needs at least {seq_len + 1}")
        self._len = (len(tokens) - seq_len - 1) // self.stride + 1

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        window = torch.from_numpy(self.window(index))
        return {"input_ids": window[:-1].clone(), "labels": window[1:].clone()}

    def window(self, index: int) -> np.ndarray:
        """The ``seq_len + 1`` tokens (int64) of window ``index``."""
        if not 0 <= index < self._len:
            raise IndexError(f"index {index} out of range for {self._len} windows")
        start = index * self.stride
        return self.tokens[start : start + self.seq_len + 1].astype(np.int64)


def _existing(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what}={str(path)!r} is not a file")
    return p


class TokenFileDataset(_WindowDataset):
    """A flat binary file of token ids (nanoGPT's ``train.bin``: ``np.uint16``, or ``uint32`` for big vocabularies)."""

    def __init__(self, path: str | Path, seq_len: int, dtype: str = "uint16", stride: int | None = None):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; valid: {', '.join(_DTYPES)}")
        p = _existing(path, "path")
        super().__init__(np.memmap(p, dtype=_DTYPES[dtype], mode="r"), seq_len, stride, p)


class ByteTextDataset(_WindowDataset):
    """Any file as a byte stream (vocabulary 256): a tokenizer-free language-modelling corpus."""

    vocab_size = 256

    def __init__(self, path: str | Path, seq_len: int, stride: int | None = None):
        p = _existing(path, "path")
        super().__init__(np.memmap(p, dtype=np.uint8, mode="r"), seq_len, stride, p)
