"""Packing tokenized documents into ``seq_len`` samples, and the dataset that reads the packed samples.

A packing plan is a list of pieces ``(document, start, length)`` and, per sample, the range of its pieces.
A document longer than ``seq_len`` is first cut into pieces of ``seq_len`` (the last one shorter); every
piece is its own document for attention (positions restart at 0, no label crosses into the next piece).

* ``bfd`` (best-fit decreasing): pieces in decreasing length, each into the open sample with the least room
  that still holds it, else a new sample; a document that fits in ``seq_len`` is never split. The samples'
  unused tail is padding (no label, a document of its own).
* ``greedy``: documents in order, concatenated and cut every ``seq_len`` tokens (no padding; a document
  that crosses a cut continues, positions from 0, in the next sample).

The samples are then put in a seeded order, so training does not see the longest documents first.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from .packed import packed_sample
from .tasks import IGNORE_INDEX

PACKINGS = ("bfd", "greedy")


def _cut(lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every document cut into pieces of at most ``seq_len``: (document, start, length) per piece, in order."""
    counts = np.maximum(1, -(-lengths // seq_len))
    docs = np.repeat(np.arange(len(lengths), dtype=np.int64), counts)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    starts = (np.arange(len(docs), dtype=np.int64) - np.repeat(first, counts)) * seq_len
    return docs, starts, np.minimum(lengths[docs] - starts, seq_len)


class _RoomTree:
    """Open samples by their free room: the smallest room >= ``need`` in O(log seq_len) (a count tree)."""

    def __init__(self, seq_len: int):
        self.size = 1 << max(1, int(seq_len).bit_length())
        self.count = np.zeros(2 * self.size, dtype=np.int64)
        self.samples: dict[int, list[int]] = {}

    def add(self, room: int, sample: int) -> None:
        self.samples.setdefault(room, []).append(sample)
        i = room + self.size
        while i:
            self.count[i] += 1
            i >>= 1

    def take(self, need: int) -> tuple[int, int] | None:
        """Remove and return (room, sample) of the fullest sample that still holds ``need`` tokens."""
        i = need + self.size
        if not self.count[i]:  # climb until a right sibling range holds a room, then descend leftmost
            while i > 1 and (i & 1 or not self.count[i + 1]):
                i >>= 1
            if i <= 1:
                return None
            i += 1
            while i < self.size:
                i = 2 * i if self.count[2 * i] else 2 * i + 1
        room = i - self.size
        sample = self.samples[room].pop(0)  # oldest first: the order does not depend on dict internals
        while i:
            self.count[i] -= 1
            i >>= 1
        return room, sample


def pack(lengths: np.ndarray, seq_len: int, packing: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The plan of ``lengths`` (tokens per document): ``pieces`` (n, 3: document, start, length) grouped by
    sample, and ``bounds`` (samples + 1): sample ``i`` holds ``pieces[bounds[i]:bounds[i + 1]]``."""
    if packing not in PACKINGS:
        raise ValueError(f"packing={packing!r} is not a packing; valid: {', '.join(PACKINGS)}")
    lengths = np.asarray(lengths, dtype=np.int64)
    if packing == "greedy":
        docs, starts, sizes = _cut(np.array([lengths.sum()]), seq_len)  # cut the concatenation
        ends = np.cumsum(lengths)
        pieces = []
        for s, n in zip(starts.tolist(), sizes.tolist()):
            d = int(np.searchsorted(ends, s, side="right"))
            while n > 0:
                offset = s - (ends[d] - lengths[d])
                take = int(min(n, ends[d] - s))
                pieces.append((d, int(offset), take))
                s, n, d = s + take, n - take, d + 1
        plan = np.array(pieces, dtype=np.int64).reshape(-1, 3)
        sample_of = np.cumsum(np.concatenate([[0], plan[:-1, 2]])) // seq_len
    else:
        docs, starts, sizes = _cut(lengths, seq_len)
        order = np.lexsort((np.arange(len(sizes)), -sizes))  # longest first; ties in document order
        tree, sample_of, used = _RoomTree(seq_len), np.empty(len(sizes), dtype=np.int64), 0
        for piece in order.tolist():
            size = int(sizes[piece])
            found = tree.take(size)
            room, sample = found if found is not None else (seq_len, used)
            used += found is None
            sample_of[piece] = sample
            if room - size > 0:
                tree.add(room - size, sample)
        plan = np.stack([docs, starts, sizes], axis=1)
        order_in = np.lexsort((np.arange(len(sizes)), sample_of))  # pieces of a sample in document order
        plan, sample_of = plan[order_in], sample_of[order_in]
    count = int(sample_of.max()) + 1 if len(sample_of) else 0
    bounds = np.searchsorted(sample_of, np.arange(count + 1))
    # A seeded order of the samples (their pieces move with them).
    perm = np.random.default_rng(seed).permutation(count)
    pieces = np.concatenate([plan[bounds[s]:bounds[s + 1]] for s in perm]) if count else plan
    sizes_in_order = np.diff(bounds)[perm]
    return pieces, np.concatenate([[0], np.cumsum(sizes_in_order)]).astype(np.int64)


class PackedPlanDataset(Dataset):
    """The samples of a packing plan over flat tokens: ``tokens`` (all documents, each ending with EOS),
    ``offsets`` (document ``d`` is ``tokens[offsets[d]:offsets[d + 1]]``), optional ``loss_mask`` (1 where a
    token may be a label: the assistant's tokens of chat data). Sample keys as in ``data.packed``."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, pieces: np.ndarray, bounds: np.ndarray,
                 seq_len: int, pad_token: int, loss_mask: np.ndarray | None = None):
        self.tokens, self.offsets, self.pieces, self.bounds = tokens, offsets, pieces, bounds
        self.seq_len, self.pad_token, self.loss_mask = seq_len, pad_token, loss_mask

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def pieces_of(self, index: int) -> np.ndarray:
        """(document, start, length) of the pieces sample ``index`` holds, in order."""
        return self.pieces[self.bounds[index]:self.bounds[index + 1]]

    def document(self, doc: int) -> np.ndarray:
        return np.asarray(self.tokens[self.offsets[doc]:self.offsets[doc + 1]], dtype=np.int64)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of {len(self)}")
        parts, masks, starts = [], [], np.zeros(self.seq_len + 1, dtype=bool)
        at = 0
        for doc, start, length in self.pieces_of(index).tolist():
            lo = int(self.offsets[doc]) + start
            parts.append(self.tokens[lo:lo + length])
            if self.loss_mask is not None:
                masks.append(self.loss_mask[lo:lo + length])
            starts[at] = True
            at += length
        fill = self.seq_len + 1 - at  # padding (and the extra label slot): a document of its own
        starts[at] = True
        tokens = np.concatenate([*parts, np.full(fill, self.pad_token)]).astype(np.int64)
        sample = packed_sample(torch.from_numpy(tokens), torch.from_numpy(starts))
        target_ok = np.zeros(self.seq_len + 1, dtype=bool)
        target_ok[:at] = np.concatenate(masks).astype(bool) if self.loss_mask is not None else True
        sample["labels"][~torch.from_numpy(target_ok[1:])] = IGNORE_INDEX  # no label on padding / a user's turn
        return sample
