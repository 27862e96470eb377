"""What a run records and says across its attempts: W&B steps continue on a resume, the typed config stays in
W&B, the loss and LR are logged once, the summary syncs every segment, a short run measures its throughput,
redirected output gets plain lines, and a run stuck after its checkpointed last step finishes properly."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from ring_plugin.app.resume_changes import steps
from ring_plugin.app.wandb_log import offline_segments

from .helpers import read_csv_metrics, read_wandb_history, read_wandb_runs, run_ring_train

pytestmark = pytest.mark.timeout(600)
# 7 steps, monitoring every 10: the monitor's only window is the one that ends with training.
ARGS = ["trainer.log_every_n_steps=10", "trainer.enable_progress_bar=true", "model.lr=0.005",
        "callbacks.checkpointing.every_n_train_steps=7"]


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def attempts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A 7-step run, its extension to 12 steps, and the same command again after the completion mark was lost."""
    out = tmp_path_factory.mktemp("record")
    first = _ok(run_ring_train(out, *ARGS, "max_steps=7"))
    second = _ok(run_ring_train(out, *ARGS, "max_steps=12"))
    csv_rows = len(read_csv_metrics(out))
    segments = offline_segments(out, yaml.safe_load((out / "run.yaml").read_text())["wandb_id"])
    # A crash between the final checkpoint and the completion mark: the record says nothing is complete.
    record = yaml.safe_load((out / "run.yaml").read_text())
    record.update(completed_step=None, summary={})
    (out / "run.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
    stuck = run_ring_train(out, *ARGS, "max_steps=12")
    return {"out": out, "first": first, "second": second, "stuck": stuck, "csv_rows": csv_rows,
            "segments": segments}


def test_wandb_steps_continue_across_attempts(attempts: dict) -> None:
    out = attempts["out"]
    assert len(attempts["segments"]) == 2
    rows = read_wandb_history(out)  # both segments, oldest first
    steps_logged = [r["_step"] for r in rows]
    assert all(r["_step"] == r["trainer/global_step"] for r in rows)  # W&B's step is the trainer's
    assert steps_logged == sorted(steps_logged) and steps_logged[-1] == 11  # the second segment continues
    assert any("train/loss" in r and r["_step"] >= 7 for r in rows)


def test_wandb_config_keeps_the_model_group_as_typed(attempts: dict) -> None:
    runs = read_wandb_runs(attempts["out"])
    assert len(runs) == 2
    for run in runs:
        assert run["config"]["model"]["lr"] == 0.005 and run["config"]["model"]["n_embd"] == 32
        assert "lr" not in run["config"]  # Lightning's copy of the module's hyper-parameters is not logged


def test_loss_and_lr_are_logged_once(attempts: dict) -> None:
    keys = {k for row in read_wandb_history(attempts["out"]) for k in row}
    assert {"train/loss", "train/lr", "monitor/tokens_per_s"} <= keys
    assert not keys & {"monitor/loss", "monitor/lr"}


def test_summary_syncs_every_segment(attempts: dict) -> None:
    out, segments = attempts["out"], attempts["segments"]
    run_id = segments[0].name.rsplit("-", 1)[1]
    assert f"(upload: wandb sync {out}/wandb/offline-run-*-{run_id}   (2 segments, one per attempt))" \
        in attempts["second"]
    assert sorted(out.glob(f"wandb/offline-run-*-{run_id}")) == segments  # the glob names exactly the run's


def test_short_run_measures_throughput_after_the_first_step(attempts: dict) -> None:
    first = attempts["first"]
    assert "throughput         n/a" not in first
    rows = [r for r in read_csv_metrics(attempts["out"]) if r.get("monitor/tokens_per_s")]
    assert [int(r["step"]) for r in rows] == [6, 9, 11]  # the end of 2..7, then 9 (every 10), then 11..12
    assert all(float(r["monitor/tokens_per_s"]) > 0 for r in rows)


def test_redirected_output_prints_lines_not_a_bar(attempts: dict) -> None:
    first = attempts["first"]
    assert "\r" not in first and "it/s" not in first
    lines = [line for line in first.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["7/7"]  # every log_every_n_steps (10), and the last
    second_lines = [line.split()[1] for line in attempts["second"].splitlines() if line.startswith("step ")]
    assert second_lines == ["10/12", "12/12"]


def test_stuck_run_finishes_from_its_checkpoint(attempts: dict) -> None:
    out, stuck = attempts["out"], attempts["stuck"]
    text = _ok(stuck)
    assert "reached step 12 (checkpointed) but was not marked complete: completed now, nothing to train" in text
    assert "== ring-train summary (step 12) ==" in text and "n/a" not in text
    record = yaml.safe_load((out / "run.yaml").read_text())
    assert record["completed_step"] == 12 and record["summary"]["checkpoint"].endswith("step000012.ckpt")
    # The numbers are the checkpoint's: those the attempt that trained step 12 reported.
    for label, key in (("final train loss", "train_loss"), ("val loss", "val_loss")):
        reported = attempts["second"].split(label, 1)[1].split()[0]
        assert f"{record['summary'][key]:.4f}" == reported
    assert len(offline_segments(out, record["wandb_id"])) == 2  # no new W&B segment
    assert len(read_csv_metrics(out)) == attempts["csv_rows"]  # nothing trained, nothing logged
    again = _ok(run_ring_train(out, *ARGS, "max_steps=12"))
    assert "is complete (12 steps" in again


def test_start_line_grammar() -> None:
    assert (steps(1), steps(2)) == ("1 step", "2 steps")


def test_setup_prints_a_line_per_step(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[2]
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "setup_env.sh").write_text((repo / "scripts" / "setup_env.sh").read_text())
    for name in ("pyproject.toml", "constraints.txt"):
        (tmp_path / name).write_text("")
    python = tmp_path / ".venv" / "bin" / "python"  # a stand-in that records what pip was asked
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\n')
    python.chmod(0o755)
    out = subprocess.run(["bash", str(tmp_path / "scripts" / "setup_env.sh")], capture_output=True, text=True,
                         timeout=60, env={**os.environ})
    assert out.returncode == 0, out.stderr
    assert [line.split("]")[0] + "]" for line in out.stdout.splitlines()] == \
        ["[setup 1/3]", "[setup 2/3]", "[setup 3/3]", "[setup]"]
    assert len((tmp_path / "calls").read_text().splitlines()) == 3
