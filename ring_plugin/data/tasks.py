"""Synthetic long-context tasks whose answers can only be found by looking far back.

Every sample is a pure function of ``(seed, index)``, so a run is reproducible and a resumed run
sees exactly the samples an uninterrupted one would. Samples are dicts with the full-length
``input_ids`` (int64) and pre-shifted ``labels`` (``labels[t]`` is the target after ``input_ids[t]``),
-100 everywhere except where the next token is part of the answer.

Vocabulary shared by the tasks: ``0..9`` are digits / values, then a few markers, then filler or key
tokens. ``answer_mask`` tells the metric which label positions belong to the answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

IGNORE_INDEX = -100
N_DIGITS = 10
KEY, QUERY, SEP = 10, 11, 12
FIRST_FREE = 13


def _generator(seed: int, index: int) -> torch.Generator:
    # One independent stream per sample: large odd multiplier keeps nearby (seed, index) pairs apart.
    return torch.Generator().manual_seed((seed * 1_000_003 + index * 7919 + 17) % (2**63 - 1))


def _shifted_labels(input_ids: torch.Tensor, answer_positions: torch.Tensor) -> torch.Tensor:
    """Labels that score only the tokens at ``answer_positions`` (predicted from the token before)."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[answer_positions - 1] = input_ids[answer_positions]
    return labels


@dataclass(eq=False)
class SeededSamples(Dataset):
    """``num_samples`` samples of ``seq_len`` tokens, each a pure function of ``(seed, index)``:
    subclasses build one from its own random stream (:meth:`_sample`)."""

    seq_len: int
    vocab_size: int
    num_samples: int
    seed: int

    def __post_init__(self) -> None:
        for name, value in (("seq_len", self.seq_len), ("num_samples", self.num_samples)):
            if value <= 0:
                raise ValueError(f"{name}={value} must be positive")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        return self._sample(_generator(self.seed, index))

    def _sample(self, gen: torch.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class _TaskDataset(SeededSamples):
    def __init__(self, seq_len: int, vocab_size: int, num_samples: int, seed: int):
        super().__init__(seq_len, vocab_size, num_samples, seed)
        if vocab_size <= FIRST_FREE + 1:
            raise ValueError(f"vocab_size={vocab_size} must exceed {FIRST_FREE + 1} (digits, markers and filler)")

    def _sample(self, gen: torch.Generator) -> dict[str, torch.Tensor]:
        input_ids, answer_positions = self._make(gen)
        return {"input_ids": input_ids, "labels": _shifted_labels(input_ids, answer_positions)}

    def _make(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class PasskeyRetrieval(_TaskDataset):
    """A ``passkey_digits``-digit number hidden at a random depth in filler; the sequence ends by asking for it.

    Layout: ``filler… KEY d1…dk filler… QUERY d1…dk``. The scored tokens are the final ``dk`` digits, so the
    model must retrieve a number that can sit anywhere in the context. Metric: exact match of all digits.
    """

    def __init__(self, seq_len: int = 256, vocab_size: int = 64, num_samples: int = 100_000,
                 passkey_digits: int = 4, seed: int = 0):
        super().__init__(seq_len, vocab_size, num_samples, seed)
        if passkey_digits <= 0:
            raise ValueError(f"passkey_digits={passkey_digits} must be positive")
        if seq_len < 2 * passkey_digits + 3:
            raise ValueError(f"seq_len={seq_len} is too short for passkey_digits={passkey_digits}")
        self.passkey_digits = passkey_digits

    def _make(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        n, k = self.seq_len, self.passkey_digits
        ids = torch.randint(FIRST_FREE, self.vocab_size, (n,), generator=gen)
        digits = torch.randint(0, N_DIGITS, (k,), generator=gen)
        query = n - k - 1
        depth = int(torch.randint(0, query - k, (1,), generator=gen))  # KEY + digits end before QUERY
        ids[depth] = KEY
        ids[depth + 1 : depth + 1 + k] = digits
        ids[query] = QUERY
        ids[query + 1 :] = digits
        return ids, torch.arange(query + 1, n)


class AssociativeRecall(_TaskDataset):
    """Multi-query associative recall: ``num_pairs`` key→value pairs, filler, then ``num_queries`` keys to answer.

    Layout: ``k1 v1 k2 v2 … filler… SEP q1 a1 q2 a2 …`` with keys drawn without replacement from the free
    vocabulary and values from the digits. The scored tokens are the answers ``a_i``. Metric: the share of
    queried values predicted exactly.
    """

    def __init__(self, seq_len: int = 256, vocab_size: int = 64, num_samples: int = 100_000,
                 num_pairs: int = 8, num_queries: int = 4, seed: int = 0):
        super().__init__(seq_len, vocab_size, num_samples, seed)
        if num_pairs <= 0 or not 0 < num_queries <= num_pairs:
            raise ValueError(f"num_pairs={num_pairs}, num_queries={num_queries}: need 0 < num_queries <= num_pairs")
        if num_pairs > vocab_size - FIRST_FREE:
            raise ValueError(f"num_pairs={num_pairs} needs as many distinct keys: vocab_size={vocab_size} is too small")
        if seq_len < 2 * num_pairs + 2 * num_queries + 1:
            raise ValueError(f"seq_len={seq_len} is too short for num_pairs={num_pairs}, num_queries={num_queries}")
        self.num_pairs = num_pairs
        self.num_queries = num_queries

    def _make(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        n, p, q = self.seq_len, self.num_pairs, self.num_queries
        keys = FIRST_FREE + torch.randperm(self.vocab_size - FIRST_FREE, generator=gen)[:p]
        values = torch.randint(0, N_DIGITS, (p,), generator=gen)
        # Filler is digit noise: keys never occur in it, so each queried key has exactly one earlier mention.
        ids = torch.full((n,), SEP, dtype=torch.long)
        ids[: 2 * p : 2] = keys
        ids[1 : 2 * p : 2] = values
        tail = n - 2 * q
        ids[2 * p : tail - 1] = torch.randint(0, N_DIGITS, (tail - 1 - 2 * p,), generator=gen)
        asked = torch.randperm(p, generator=gen)[:q]
        ids[tail::2] = keys[asked]
        ids[tail + 1 :: 2] = values[asked]
        return ids, torch.arange(tail + 1, n, 2)


def answer_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample counts ``(wrong, scored)`` of answer tokens: argmax(logits) vs labels where labels != -100.

    Counts (not ratios) so shards of one sample can be summed across a ring before deciding exact match.
    """
    scored = labels != IGNORE_INDEX
    wrong = (logits.argmax(dim=-1) != labels) & scored
    return wrong.sum(dim=-1), scored.sum(dim=-1)
