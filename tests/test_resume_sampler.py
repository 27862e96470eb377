"""Resuming mid-epoch starts the sampler at the saved batch: the same batches as an uninterrupted pass,
without loading the skipped ones."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from ring_plugin.data import StepSampler
from ring_plugin.lightning import ResumableLoader


class CountingDataset(Dataset):
    def __init__(self, n: int):
        self.n = n
        self.loaded = 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        self.loaded += 1
        return torch.tensor(i)


def test_step_sampler_starts_at_a_step_once() -> None:
    sampler = StepSampler(100, 2, rank=1, num_replicas=2, num_steps=4)
    full = list(sampler)
    sampler.start_at(3)
    assert list(sampler) == full[3 * 2 :] == [14, 15]  # step 3 of replica 1: samples (3 * 2 + 1) * 2 + i
    assert list(sampler) == full  # the next pass starts at 0 again
    with pytest.raises(ValueError, match="start_at\\(step=-1\\)"):
        sampler.start_at(-1)


def _loader(dataset: Dataset, loader_batch: int, sampler_batch: int = 2) -> DataLoader:
    return DataLoader(dataset, batch_size=loader_batch, sampler=StepSampler(len(dataset), sampler_batch, num_steps=6))


def test_resume_skips_in_the_sampler_without_loading() -> None:
    want = [b.tolist() for b in _loader(CountingDataset(50), 2)]
    dataset = CountingDataset(50)
    loader = ResumableLoader(_loader(dataset, 2), lambda: {"epoch": 0, "batches": 0})
    loader.load_state_dict({"epoch": 0, "batches": 4})
    assert [b.tolist() for b in loader] == want[4:]
    assert dataset.loaded == 2 * 2  # only the two batches trained on were loaded
    assert [b.tolist() for b in loader] == want  # later epochs are whole


def test_a_sampler_that_cannot_start_at_a_batch_falls_back_to_dropping_with_a_warning() -> None:
    # Sampler steps of 2 samples under loader batches of 4: start_at would count the wrong unit.
    want = [b.tolist() for b in _loader(CountingDataset(50), 4)]
    dataset = CountingDataset(50)
    loader = ResumableLoader(_loader(dataset, 4), lambda: {"epoch": 0, "batches": 0})
    loader.load_state_dict({"epoch": 0, "batches": 2})
    with pytest.warns(UserWarning, match="loading and dropping 2 batch"):
        assert [b.tolist() for b in loader] == want[2:]
    assert dataset.loaded == 12  # every batch loaded, the two skipped ones included
