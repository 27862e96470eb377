"""Bad strategy arguments fail at construction with the argument's name; names are registered."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.strategies import StrategyRegistry

from ring_plugin.lightning import RingDeepSpeedStrategy, RingStrategy, shard_batch
from ring_plugin.lightning.groups import check_ring_size


@pytest.mark.parametrize("cls", [RingStrategy, RingDeepSpeedStrategy])
def test_bad_ring_size_and_layout(cls):
    with pytest.raises(ValueError, match="ring_size=0"):
        cls(ring_size=0)
    with pytest.raises(ValueError, match="layout='diagonal'"):
        cls(layout="diagonal")


def test_bad_stage():
    with pytest.raises(ValueError, match="stage=4 is not a ZeRO stage"):
        RingDeepSpeedStrategy(stage=4)


def test_ring_size_must_divide_world():
    assert check_ring_size(None, 4) == 4 and check_ring_size(2, 4) == 2
    with pytest.raises(ValueError, match=r"ring_size=3 must be a positive divisor of the world size 4.*\[1, 2, 4\]"):
        check_ring_size(3, 4)


def test_registered_names():
    for name in ("ring", "ring_deepspeed", "ring_deepspeed_stage_3_offload",
                 *(f"ring_deepspeed_stage_{s}" for s in range(4))):
        assert name in StrategyRegistry
    assert StrategyRegistry["ring_deepspeed_stage_1"]["init_params"] == {"stage": 1}


def test_deepspeed_config_passes_through_untouched():
    config = {"zero_optimization": {"stage": 3, "stage3_max_live_parameters": 123}, "bf16": {"enabled": True}}
    strategy = RingDeepSpeedStrategy(config=config, ring_size=2)
    assert strategy.config == config and strategy.zero_stage_3


def test_shard_batch_creates_positions_and_names_bad_length():
    batch = {"input_ids": torch.arange(16).view(1, 16), "labels": torch.arange(16).view(1, 16),
             "mask": torch.ones(1, 16), "meta": "kept"}
    out = shard_batch(batch, "zigzag", 1, 2, extra_keys=["mask"])
    # zigzag, ring of 2: rank 1 holds chunks 1 and 2 of 4.
    assert out["position_ids"].tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]
    assert out["input_ids"].tolist() == out["labels"].tolist() == out["position_ids"].tolist()
    assert out["mask"].shape == (1, 8) and out["meta"] == "kept"
    with pytest.raises(ValueError, match="sequence length 18 .* multiple of 4"):
        shard_batch({"input_ids": torch.zeros(1, 18, dtype=torch.long)}, "zigzag", 0, 2)


def test_offload_with_a_torch_optimizer_is_allowed_only_in_our_default_config():
    assert RingDeepSpeedStrategy(stage=3, offload_optimizer=True).config["zero_force_ds_cpu_optimizer"] is False
    config = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    assert "zero_force_ds_cpu_optimizer" not in RingDeepSpeedStrategy(config=config, offload_optimizer=True).config


def test_resumable_loader_skips_only_in_the_saved_epoch():
    from types import SimpleNamespace

    from ring_plugin.lightning import ResumableLoader

    inner = SimpleNamespace(items=[0, 1, 2, 3], worker_init_fn=None)
    position = {"epoch": 1, "batches": 3}
    loader = ResumableLoader(inner.items, lambda: dict(position))
    assert loader.state_dict() == {"epoch": 1, "batches": 3}
    loader.load_state_dict({"epoch": 1, "batches": 3})
    with pytest.warns(UserWarning, match="loading and dropping 3 batch"):  # a list has no sampler to start late
        assert list(loader) == [3]
    assert list(loader) == [0, 1, 2, 3]  # skips once
    loader.load_state_dict({"epoch": 0, "batches": 3})  # saved in an epoch that has ended
    assert list(loader) == [0, 1, 2, 3]
    wrapped = ResumableLoader(inner, lambda: dict(position))
    wrapped.worker_init_fn = print
    assert inner.worker_init_fn is print and wrapped.items == [0, 1, 2, 3]
