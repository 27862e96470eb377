"""A run's identity: re-run, extend, change, sweep. A changed config refuses to resume and names the keys, a
completed run exits at once, a resume continues the same W&B run and CSV log, every job of a sweep has its
own W&B run, and training always ends with a validation, a checkpoint and ``last.ckpt``."""

from __future__ import annotations

import csv
import os
import subprocess
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ring_plugin.app.config_checks import ConfigError
from ring_plugin.app.identity import RunRecord, flat_config, identity_diff, is_complete, open_run, save_record
from ring_plugin.app.sweep_dirs import job_folder
from ring_plugin.callbacks.checkpoint_files import write_manifest
from ring_plugin.callbacks.checkpoint_owner import write_owner

from .helpers import REPO, env, read_wandb_runs, ring_train_cmd, run_ring_train
from .test_config import compose_app

pytestmark = pytest.mark.timeout(400)


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _csv_rows(out: Path) -> list[dict[str, str]]:
    (path,) = (out / "csv").glob("version_*/metrics.csv")  # one CSV per run, however often it resumed
    with open(path) as f:
        return list(csv.DictReader(f))


def _step(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]


def test_identity_diff_ignores_keys_that_may_change() -> None:
    old = flat_config(compose_app())
    new = flat_config(compose_app("max_steps=900", "comm_timeout=5", "logger=[csv]", "trainer.log_every_n_steps=1"))
    assert identity_diff(old, new) == []
    changed = flat_config(compose_app("attention=dilated", "seed=1"))
    assert identity_diff(old, changed) == ["attention.kwargs.dilation_rates", "attention.kwargs.segment_lengths",
                                           "attention.layer", "attention.name", "seed"]
    # Checkpointing trades memory for speed with the same gradients: a resume may switch it.
    assert identity_diff(old, flat_config(compose_app("model.activation_checkpointing=true",
                                                      "+model.recompute_attention=false"))) == []


def test_a_record_from_before_ulysses_resumes_at_the_old_behaviour() -> None:
    """A run recorded before ``ulysses_size`` existed is the same run at ulysses_size=1, not at 2."""
    new = flat_config(compose_app())
    old = {k: v for k, v in new.items() if k not in ("ulysses_size", "strategy.ulysses_size")}
    assert new["ulysses_size"] == 1 and identity_diff(old, new) == []
    assert identity_diff(old, flat_config(compose_app("ulysses_size=2", "devices=4"))) == ["devices", "ulysses_size"]


def test_open_run_refuses_a_changed_config_and_never_mixes_checkpoints(tmp_path: Path) -> None:
    def cfg(*overrides: str):
        c = compose_app(*overrides)
        c.paths.output_dir, c.paths.checkpoints = str(tmp_path), str(tmp_path / "checkpoints")
        return c

    first = open_run(cfg())
    save_record(tmp_path, first)
    assert open_run(cfg()).wandb_id == first.wandb_id  # nothing trained yet: same run
    # no checkpoint yet: a changed config starts the run over, under a new W&B run
    assert open_run(cfg("seed=7")).wandb_id != first.wandb_id
    ckpt = tmp_path / "checkpoints" / "step000005.ckpt"
    write_owner(ckpt.parent, first.run_id)
    torch.save({"global_step": 5}, ckpt)
    write_manifest(ckpt, ckpt, 5, True, first.run_id)  # one of this run's checkpoints
    with pytest.raises(ConfigError, match=r"different config: seed: 1234 -> 7\. Use name=NEW .* resume=force"):
        open_run(cfg("seed=7"))
    assert open_run(cfg("seed=7", "resume=force")).config["seed"] == 7
    assert open_run(cfg("max_steps=1000")).wandb_id == first.wandb_id
    # resume=never starts over as a new W&B run (resolve_resume sets the old checkpoints aside)
    restarted = open_run(cfg("resume=never"))
    assert restarted.wandb_id != first.wandb_id and restarted.run_id == first.run_id  # the same run folder
    done = RunRecord(config=first.config, wandb_id="abc", completed_step=600,
                     summary={"checkpoint": "/elsewhere/step000005.ckpt"})
    save_record(tmp_path, done)
    assert open_run(cfg()).completed_step == 600
    assert is_complete(done, 600, tmp_path / "checkpoints")  # found by name in the run's own folder
    assert not is_complete(done, 601, tmp_path / "checkpoints")  # a larger budget: train further
    (tmp_path / "checkpoints" / "step000005.ckpt").write_bytes(b"")
    assert not is_complete(done, 600, tmp_path / "checkpoints")  # a damaged final checkpoint: resume decides


def test_run_rerun_extend_change(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # 7 steps: checkpoints every 5, validation every 10; the end adds a validation and a checkpoint of step 7.
    args = ["max_steps=7", "trainer.val_check_interval=10", "tags=[smoke,cpu]"]
    first = _ok(run_ring_train(out, *args))
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == ["last.ckpt", "step000005.ckpt", "step000007.ckpt"]
    assert os.readlink(ckpts / "last.ckpt") == "step000007.ckpt" and _step(ckpts / "last.ckpt") == 7
    assert f"checkpoint         {ckpts / 'step000007.ckpt'} (also last.ckpt)" in first
    val_steps = [int(r["step"]) for r in _csv_rows(out) if r.get("val/loss")]
    assert val_steps == [6]  # Lightning logs the validation after optimizer step 7 at step index 6

    (run,) = read_wandb_runs(out)
    assert run["tags"] == ["smoke", "cpu"] and run["job_type"] == "train" and run["name"] == "default"
    config = run["config"]
    assert config["attention"]["name"] == "sdpa" and config["seed"] == 1234 and config["ring_size"] == 2
    assert config["strategy"]["_target_"] == "ring_plugin.lightning.RingStrategy" and config["layout"] == "zigzag"
    assert config["data"]["train"]["_target_"] == "ring_plugin.data.PasskeyRetrieval"
    assert config["choices"]["attention"] == "sdpa" and config["parameters"] > 0
    assert f"final train loss   {run['summary']['final/train_loss']:.4f}" in first
    assert run["summary"]["final/step"] == 7 and run["summary"]["final/tokens_per_s"] > 0

    again = _ok(run_ring_train(out, *args))  # the same command: complete, nothing trained, nothing opened
    assert f"run 'default' is complete (7 steps, {out})" in again and "Restoring states" not in again
    assert len(read_wandb_runs(out)) == 1

    extended = _ok(run_ring_train(out, *args[:-1], "max_steps=9"))  # a larger budget continues the run
    assert f"resuming from {ckpts / 'step000007.ckpt'}" in extended
    runs = read_wandb_runs(out)
    assert len(runs) == 2 and runs[0]["id"] == runs[1]["id"] == run["id"]  # the same W&B run, continued
    assert [int(r["step"]) for r in _csv_rows(out) if r.get("val/loss")] == [6, 8]  # one CSV, both attempts
    assert _step(ckpts / "last.ckpt") == 9

    one_line = {**env(), "HYDRA_FULL_ERROR": "0"}
    changed = subprocess.run(ring_train_cmd(out, "max_steps=9", "attention=dilated",
                                            "attention.kwargs.segment_lengths=[16,32]",
                                            "attention.kwargs.dilation_rates=[1,2]"),
                             cwd=REPO, env=one_line, capture_output=True, text=True, timeout=120)
    assert changed.returncode == 2, changed.stdout[-2000:] + changed.stderr[-2000:]
    assert changed.stderr.startswith("ring-train: config error: run 'default'") and "Traceback" not in changed.stderr
    assert "attention.name: 'sdpa' -> 'dilated'" in changed.stderr and "name=NEW" in changed.stderr
    assert sorted(p.name for p in ckpts.glob("step*.ckpt"))[-1] == "step000009.ckpt"  # nothing written


def test_multirun_jobs_get_their_own_wandb_runs(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    cmd = [c for c in ring_train_cmd(tmp_path / "unused", "max_steps=2") if not c.startswith("hydra.run.dir=")]

    def run_sweep(*overrides: str) -> None:
        _ok(subprocess.run([*cmd[:3], "--multirun", f"hydra.sweep.dir={sweep}", "name=sw", *overrides, *cmd[3:]],
                           cwd=REPO, env=env(), capture_output=True, text=True, timeout=300))

    run_sweep("attention=standard,sdpa")
    # A job's folder is named by its overrides (too long here: shortened, with a hash of them all).
    folders = {}
    for job in (p for p in sweep.iterdir() if p.is_dir()):
        hydra_job = OmegaConf.load(job / ".hydra" / "hydra.yaml").hydra.job
        assert job.name == job_folder(hydra_job.override_dirname) and "name=" not in hydra_job.override_dirname
        folders[OmegaConf.load(job / "run.yaml").config["attention.name"]] = job.name
    assert sorted(folders) == ["sdpa", "standard"] and folders["sdpa"].startswith("attention=sdpa,")
    runs = read_wandb_runs(sweep)
    assert sorted(r["name"] for r in runs) == sorted(f"sw-{f}" for f in folders.values())
    assert runs[0]["id"] != runs[1]["id"] and [r["group"] for r in runs] == ["sw", "sw"]
    for folder in folders.values():
        assert _step(sweep / folder / "checkpoints" / "last.ckpt") == 2
        assert OmegaConf.load(sweep / folder / "run.yaml").completed_step == 2
    # A second sweep with a new setting gets new folders (not the first sweep's, whose runs would refuse it).
    run_sweep("attention=sdpa,standard", "+trainer.gradient_clip_algorithm=value")
    assert len([p for p in sweep.iterdir() if p.is_dir()]) == 4
    assert all(OmegaConf.load(sweep / f / "run.yaml").completed_step == 2 for f in folders.values())
