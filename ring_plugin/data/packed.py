"""Packed documents: fixed-length sequences holding several documents, for document-masked training.

Every sample holds ``input_ids`` (int64, ``seq_len``), pre-shifted ``labels`` (``labels[t]`` is the token after
``input_ids[t]``; -100 where that token belongs to another document, so no loss crosses a boundary),
``position_ids`` (restarting at 0 for each document, and at the start of the sample) and ``document_ids``
(0, 1, ... along the sample; equal to ``document_ids_from_position_ids(position_ids)``).

Sources:

* ``PackedTokenFile``: a nanoGPT token file whose documents each end with an end-of-text token (the
  separator belongs to the document it ends, so the last word predicts it).
* ``PackedTextFolder``: a folder of text files, byte-level (vocabulary 256), one file one document.
* ``PackedSynthetic``: seeded documents with long-tailed lengths (``balance.packed_document_lengths``), each
  a short pattern repeated, so a small CPU run shows learning: every token after a document's first period
  is predictable from that document.

The corpora are cut like ``TokenFileDataset`` (window ``i`` starts at ``i * stride``; documents run across
windows); the synthetic samples hold whole documents. Every sample is a pure function of its index, so a
resumed run sees exactly the samples of an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..documents.ids import packed_document_lengths
from .files import TokenFileDataset, _WindowDataset
from .tasks import FIRST_FREE, IGNORE_INDEX, SeededSamples

SOURCES = ("synthetic", "token_file", "text_folder")


def packed_sample(tokens: torch.Tensor, starts: torch.Tensor) -> dict[str, torch.Tensor]:
    """The sample of ``seq_len + 1`` tokens and where documents start among them (bool, same length).

    The last token is only a label; ``starts[0]`` is implied (every sample starts a document).
    """
    starts = starts.clone()
    starts[0] = True
    input_starts = starts[:-1]
    index = torch.arange(len(input_starts))
    first = torch.where(input_starts, index, torch.zeros_like(index)).cummax(0).values
    labels = tokens[1:].clone()
    labels[starts[1:]] = IGNORE_INDEX
    return {
        "input_ids": tokens[:-1].clone(),
        "labels": labels,
        "position_ids": index - first,
        "document_ids": input_starts.long().cumsum(0) - 1,
    }


class PackedTokenFile(TokenFileDataset):
    """A nanoGPT token file (``uint16``/``uint32``) packed by document: ``eot_token`` ends each document."""

    def __init__(self, path: str | Path, seq_len: int, eot_token: int, dtype: str = "uint16",
                 stride: int | None = None):
        super().__init__(path, seq_len, dtype, stride)
        top = np.iinfo(self.tokens.dtype).max
        if isinstance(eot_token, bool) or not isinstance(eot_token, int) or not 0 <= eot_token <= top:
            raise ValueError(f"eot_token={eot_token!r} must be a token id in [0, {top}] for dtype={dtype!r}")
        self.eot_token = eot_token

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        tokens = torch.from_numpy(self.window(index))
        starts = torch.zeros_like(tokens, dtype=torch.bool)
        starts[1:] = tokens[:-1] == self.eot_token
        return packed_sample(tokens, starts)


class _ConcatenatedFiles:
    """Read-only bytes of several files as one array (sliceable, with ``len``); files are read on demand."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        sizes = np.array([p.stat().st_size for p in paths], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])  # file i holds bytes starts[i]:starts[i+1]

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, window: slice) -> np.ndarray:
        lo, hi = window.start, min(window.stop, len(self))
        first = int(np.searchsorted(self.starts, lo, side="right")) - 1
        parts = []
        for i in range(first, len(self.paths)):
            a, b = max(lo, self.starts[i]), min(hi, self.starts[i + 1])
            if a >= hi:
                break
            parts.append(np.fromfile(self.paths[i], dtype=np.uint8, count=int(b - a), offset=int(a - self.starts[i])))
        return np.concatenate(parts)


class PackedTextFolder(_WindowDataset):
    """Every file under ``path`` (matching ``pattern``, recursively, in sorted order) as one byte-level document."""

    vocab_size = 256

    def __init__(self, path: str | Path, seq_len: int, pattern: str = "*", stride: int | None = None):
        root = Path(path).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"path={str(path)!r} is not a folder")
        # Empty files are documents of no tokens: nothing to pack.
        files = sorted(p for p in root.rglob(pattern) if p.is_file() and p.stat().st_size > 0)
        if not files:
            raise ValueError(f"path={str(path)!r} holds no non-empty file matching pattern={pattern!r}")
        super().__init__(_ConcatenatedFiles(files), seq_len, stride, root)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        tokens = torch.from_numpy(self.window(index))
        start = index * self.stride
        file_starts = self.tokens.starts  # ascending: the files that start inside this window are one run
        lo, hi = np.searchsorted(file_starts, [start, start + len(tokens)])
        starts = torch.zeros_like(tokens, dtype=torch.bool)
        starts[torch.from_numpy(file_starts[lo:hi] - start)] = True
        return packed_sample(tokens, starts)


class PackedSynthetic(SeededSamples):
    """Seeded packed documents, each a short pattern of distinct tokens repeated to the document's length.

    Each document draws its period (2 to ``max_period`` tokens) and pattern; after the first period every
    token repeats the one a period earlier, so it is predictable from its own document alone (an induction
    head learns it). Document lengths follow ``packed_document_lengths(seq_len, ..., mean=mean_doc_len,
    sigma=sigma)`` and fill the sample exactly.
    """

    def __init__(self, seq_len: int = 256, vocab_size: int = 64, num_samples: int = 100_000,
                 mean_doc_len: float = 64.0, sigma: float = 1.0, max_period: int = 8, seed: int = 0):
        super().__init__(seq_len, vocab_size, num_samples, seed)
        if mean_doc_len < 1 or sigma < 0:
            raise ValueError(f"mean_doc_len={mean_doc_len} must be >= 1 and sigma={sigma} >= 0")
        if max_period < 2:
            raise ValueError(f"max_period={max_period} must be at least 2")
        if vocab_size - FIRST_FREE < max_period:
            raise ValueError(f"vocab_size={vocab_size} leaves {vocab_size - FIRST_FREE} pattern tokens (ids from "
                             f"{FIRST_FREE}); max_period={max_period} needs as many distinct ones")
        self.mean_doc_len = mean_doc_len
        self.sigma = sigma
        self.max_period = max_period

    def _sample(self, gen: torch.Generator) -> dict[str, torch.Tensor]:
        lengths = packed_document_lengths(self.seq_len, int(torch.randint(2**62, (1,), generator=gen)),
                                          self.mean_doc_len, self.sigma)
        docs = [self._document(length, gen) for length in lengths]
        # One extra label slot: the token after the last document belongs to no document of this sample.
        tokens = torch.cat([*docs, torch.zeros(1, dtype=torch.long)])
        starts = torch.zeros(self.seq_len + 1, dtype=torch.bool)
        starts[torch.tensor(lengths[:-1], dtype=torch.long).cumsum(0)] = True
        starts[-1] = True
        return packed_sample(tokens, starts)

    def _document(self, length: int, gen: torch.Generator) -> torch.Tensor:
        period = int(torch.randint(2, self.max_period + 1, (1,), generator=gen))
        pattern = FIRST_FREE + torch.randperm(self.vocab_size - FIRST_FREE, generator=gen)[:period]
        return pattern.repeat(length // period + 1)[:length]


def packed_documents(source: str = "synthetic", seq_len: int = 256, path: str | None = None,
                     eot_token: int | None = None, dtype: str = "uint16", pattern: str = "*",
                     stride: int | None = None, vocab_size: int = 64, num_samples: int = 100_000,
                     mean_doc_len: float = 64.0, sigma: float = 1.0, max_period: int = 8, seed: int = 0) -> Dataset:
    """The packed dataset of ``source`` (``synthetic``, ``token_file`` or ``text_folder``), for configs.

    ``token_file`` uses ``path``, ``eot_token``, ``dtype``, ``stride``; ``text_folder`` uses ``path``, ``pattern``,
    ``stride``; ``synthetic`` uses ``vocab_size``, ``num_samples``, ``mean_doc_len``, ``sigma``, ``max_period``,
    ``seed``.
    """
    if source == "synthetic":
        return PackedSynthetic(seq_len, vocab_size, num_samples, mean_doc_len, sigma, max_period, seed)
    if source not in SOURCES:
        raise ValueError(f"source={source!r} is not a packed data source; valid: {', '.join(SOURCES)}")
    if not path:
        raise ValueError(f"path is required for source={source!r}")
    if source == "text_folder":
        return PackedTextFolder(path, seq_len, pattern, stride)
    if eot_token is None:
        raise ValueError("eot_token is required for source='token_file' (the id that ends each document, "
                         "50256 for GPT-2 tokens)")
    return PackedTokenFile(path, seq_len, eot_token, dtype, stride)
