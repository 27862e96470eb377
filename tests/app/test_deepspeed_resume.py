"""``ring-train strategy=deepspeed`` (ZeRO-2, 2 CPU processes): a rank crashes after the step-5 checkpoint, the
same command resumes from it, and the run ends bit for bit where an uninterrupted run ends: weights and every
rank's optimizer partition."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .helpers import run_ring_train

pytestmark = pytest.mark.timeout(400)


def _states(checkpoint: Path) -> dict[str, object]:
    """Every file of a DeepSpeed checkpoint directory that torch saved, loaded (files this test's runs wrote)."""
    return {p.name: torch.load(p, map_location="cpu", weights_only=False)
            for p in sorted((checkpoint / "checkpoint").glob("*.pt"))}


def _assert_identical(got: object, want: object, where: str) -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype, where
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=where)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), (where, sorted(map(str, want)))
        for key in want:
            _assert_identical(got[key], want[key], f"{where}/{key}")
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            _assert_identical(a, b, f"{where}/{i}")


def test_deepspeed_resume_ends_where_an_uninterrupted_run_ends(tmp_path: Path) -> None:
    def args(marker: Path, crash_step: int) -> list[str]:
        return ["max_steps=10", "callbacks.checkpointing.every_n_train_steps=5", "logger=[csv]",
                "strategy=deepspeed", "strategy.stage=2", "+callbacks.crash._target_=tests.app.helpers.ExitOnce",
                f"+callbacks.crash.step={crash_step}", f"+callbacks.crash.marker={marker}"]

    reference = tmp_path / "reference"
    ran = run_ring_train(reference, *args(tmp_path / "never", 1000), timeout=180)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]

    out, marker = tmp_path / "crashed", tmp_path / "crashed_at"
    crashed = run_ring_train(out, *args(marker, 7), timeout=180)
    assert crashed.returncode != 0 and marker.exists(), crashed.stdout[-3000:] + crashed.stderr[-3000:]
    assert not (out / "checkpoints" / "step000010.ckpt").exists()

    resumed = run_ring_train(out, *args(marker, 7), timeout=180)  # the same command: resume=auto
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming from {out / 'checkpoints' / 'step000005.ckpt'}" in resumed.stdout, resumed.stdout[-3000:]
    assert "== ring-train summary (step 10) ==" in resumed.stdout
    want = _states(reference / "checkpoints" / "step000010.ckpt")
    got = _states(out / "checkpoints" / "step000010.ckpt")
    assert sorted(want) == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                            "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    for name in ("mp_rank_00_model_states.pt",):
        _assert_identical(got[name]["module"], want[name]["module"], name)
    for name in want:
        if "optim_states" in name:
            _assert_identical(got[name]["optimizer_state_dict"], want[name]["optimizer_state_dict"], name)
