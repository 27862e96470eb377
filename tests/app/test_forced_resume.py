"""``resume=force`` applies the new optimizer and schedule settings to the restored state and says which changed;
a shape change is refused naming the key. ``model.schedule_steps`` fixes the cosine schedule's length."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from ring_plugin.models import RingCausalLM
from ring_plugin.models.lightning_module import warmup_cosine

from .helpers import read_csv_metrics, run_ring_train

# A constant LR (no warm-up, a floor of 1x), so the LR each step used is the configured one exactly.
FLAT = ["model.warmup_steps=0", "model.min_lr_ratio=1.0", "trainer.log_every_n_steps=1",
        "callbacks.checkpointing.every_n_train_steps=3"]
OLD_LR, NEW_LR, NEW_WD = 1e-2, 1e-3, 0.05


@pytest.fixture(scope="module")
def forced(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("forced")
    first = run_ring_train(out, *FLAT, "max_steps=6", f"model.lr={OLD_LR}")
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_ring_train(out, *FLAT, "max_steps=9", f"model.lr={NEW_LR}", f"model.weight_decay={NEW_WD}",
                            "resume=force")
    assert second.returncode == 0, second.stderr[-3000:]
    return out, second


def test_forced_resume_trains_at_the_new_lr(forced: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, _ = forced
    used = {int(r["step"]): float(r["train/lr"]) for r in read_csv_metrics(out) if r.get("train/lr")}
    assert sorted(used) == list(range(9))
    for step, lr in used.items():
        assert lr == pytest.approx(OLD_LR if step < 6 else NEW_LR, rel=1e-6), (step, lr)


def test_forced_resume_sets_the_new_weight_decay(forced: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, _ = forced
    state = torch.load(out / "checkpoints" / "step000009.ckpt", map_location="cpu", weights_only=False)
    groups = state["optimizer_states"][0]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [NEW_WD, 0.0]  # matrices decay, vectors do not
    assert [g["initial_lr"] for g in groups] == [NEW_LR, NEW_LR]


def test_forced_resume_says_what_changed(forced: tuple[Path, subprocess.CompletedProcess]) -> None:
    _, second = forced
    text = second.stdout + second.stderr
    assert ("[ring-train] resume=force continues with the new model.lr 0.01 -> 0.001, model.weight_decay 0.0 -> 0.05 "
            "(the restored optimizer and LR schedule take model.lr, model.weight_decay)") in text
    assert ("[ring-train] the cosine LR schedule now ends at step 9 instead of 6: a longer schedule raises the LR "
            "where the run left it; set model.schedule_steps=6 to keep the schedule") in text


def test_forced_shape_change_is_refused_naming_the_key(forced: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, _ = forced
    refused = run_ring_train(out, *FLAT, "max_steps=12", "model.n_embd=64", "resume=force", "model.n_head=2")
    assert refused.returncode != 0
    assert ("resume=force cannot apply model.n_embd: 32 -> 64 (the checkpoint's weights have the old shape); "
            "use name=NEW for a new run") in refused.stderr
    assert not (out / "checkpoints" / "step000012.ckpt").exists()


def test_schedule_steps_fixes_the_cosine_length() -> None:
    tiny = {"vocab_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 8, "max_seq_len": 8}
    fixed = RingCausalLM(tiny, lr=1.0, warmup_steps=2, max_steps=40, schedule_steps=20, min_lr_ratio=0.1)
    stretched = RingCausalLM(tiny, lr=1.0, warmup_steps=2, max_steps=40, min_lr_ratio=0.1)
    fixed_lr = fixed.configure_optimizers()["lr_scheduler"]["scheduler"].lr_lambdas[0]
    stretched_lr = stretched.configure_optimizers()["lr_scheduler"]["scheduler"].lr_lambdas[0]
    for step in (0, 1, 5, 19, 20, 30, 39):
        assert fixed_lr(step) == warmup_cosine(step, 2, 20, 0.1)
        assert stretched_lr(step) == warmup_cosine(step, 2, 40, 0.1)
    assert fixed_lr(30) == pytest.approx(0.1) and stretched_lr(30) > 0.2
