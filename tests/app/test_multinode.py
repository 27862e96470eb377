"""Two "nodes" on localhost: one ``torchrun --nnodes 2 --nproc-per-node 2`` per node with a c10d rendezvous
(CPU, gloo, tiny model). ``ring-train devices=2 num_nodes=2`` takes its 4 ranks from torchrun (Lightning
spawns nothing), writes the run's files once, maps Ulysses groups inside a node and rings across, and
after losing a node mid-run the same two commands resume and reach the uninterrupted run's losses and
weights exactly. Lightning's own launcher (``NODE_RANK`` per node) runs the same job."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import torch

from ring_plugin.app.config_checks import ConfigError
from ring_plugin.app.launch import check_launch, is_global_rank_zero, launcher
from ring_plugin.testing import free_port
from tests import prefork

from .helpers import REPO, TINY, env, final_weights, read_csv_metrics

pytestmark = pytest.mark.timeout(240)
LAUNCH_TIMEOUT = 100  # seconds for both nodes of one launch; a hang fails the test instead of stalling CI
STEPS = 20
FAST = ["logger=[csv]", "devices=2", "num_nodes=2", f"max_steps={STEPS}", "trainer.log_every_n_steps=1",
        "trainer.val_check_interval=100", "callbacks.checkpointing.every_n_train_steps=5",
        # DDP re-orders its gradient buckets after the first step of every launch, which changes the order of
        # the 4-rank sums: a resumed run would agree to ~1e-7, not bit for bit. This keeps the first order.
        "+strategy.find_unused_parameters=true"]


def launch_two_nodes(out: Path, tag: str, *overrides: str) -> tuple[list[int], list[str], list[int]]:
    """Both nodes' torchrun with a fresh rendezvous; (return codes, logs, agent pids)."""
    endpoint, rdzv_id = f"127.0.0.1:{free_port()}", uuid.uuid4().hex[:8]
    procs, logs = [], []
    for node in (0, 1):
        cmd = [prefork.python(), "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=2",
               "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={rdzv_id}", "--max-restarts=0",
               "--monitor-interval=0.5", "-m", "ring_plugin.app.train", f"hydra.run.dir={out}", *TINY, *FAST,
               *overrides]
        logs.append(out.parent / f"{out.name}.{tag}.node{node}.log")
        with open(logs[-1], "w") as log:  # a file, not a pipe: a full pipe would stall the node
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for proc in procs:
            if proc.poll() is None:  # the agent and (own sessions) its workers
                for pid in _descendants(proc.pid):
                    _kill(pid)
                _kill(proc.pid)
                proc.wait()
    return [p.returncode for p in procs], [p.read_text() for p in logs], [p.pid for p in procs]


def _descendants(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [d for c in map(int, found) for d in (c, *_descendants(c))]


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _losses(out: Path) -> dict[int, float]:
    """train/loss per step; a step repeated after a crash counts with its last row (as the CSV's readers do)."""
    return {int(r["step"]): float(r["train/loss"]) for r in read_csv_metrics(out) if r.get("train/loss")}


def _ok(codes: list[int], logs: list[str]) -> str:
    assert codes == [0, 0], "\n=====\n".join(log[-3000:] for log in logs)
    return "".join(logs)


def _ranks(directory: Path) -> list[dict]:
    return [json.loads((directory / f"rank{r}.json").read_text()) for r in range(4)]


@pytest.mark.parametrize("ulysses_size", [1, 2])
def test_two_nodes_train_lose_a_node_and_resume_exactly(tmp_path: Path, ulysses_size: int) -> None:
    sizes = ["ring_size=2", f"ulysses_size={ulysses_size}"]
    ranks_dir = tmp_path / "ranks"
    record = ["+callbacks.ranks._target_=tests.app.helpers.RecordRanks", f"+callbacks.ranks.dir={ranks_dir}"]

    reference = tmp_path / "reference"
    codes, logs, agents = launch_two_nodes(reference, "full", *sizes, *record)
    text = _ok(codes, logs)
    # (a) one run of 4 ranks, announced and summarised once, all its files written once
    assert text.count("[ring-train] run 'default'") == 1 and text.count("== ring-train summary") == 1, text[-3000:]
    assert "4 processes on 2 nodes (torchrun)" in text
    assert sorted(p.name for p in (reference / "csv").iterdir()) == ["version_0"]
    rows = [r for r in read_csv_metrics(reference) if r.get("train/loss")]
    assert [int(r["step"]) for r in rows] == list(range(STEPS))  # every step exactly once
    assert all(math.isfinite(float(r["train/loss"])) for r in rows)
    # per step: one batch of 2 samples x 64 tokens per data-parallel replica (4 ranks / (ulysses x ring))
    assert {r["train/tokens_per_step"] for r in rows} == {str(4 // (ulysses_size * 2) * 2 * 64.0)}
    want = _losses(reference)
    assert len(set(want.values())) > 1

    # (b) the ranks came from torchrun, 2 per agent, node-major; Ulysses inside a node, rings as documented
    ranks = _ranks(ranks_dir)
    assert {r["cluster_environment"] for r in ranks} == {"TorchElasticEnvironment"}
    assert all(r["external_processes"] for r in ranks)  # Lightning's launcher re-runs nothing
    by_parent: dict[int, list[int]] = {}
    for r in ranks:
        by_parent.setdefault(r["ppid"], []).append(r["global_rank"])
        assert r["global_rank"] == 2 * r["node_rank"] + r["local_rank"] and r["world_size"] == 4
    assert set(by_parent) == set(agents)  # every rank a child of a torchrun agent, none of another rank
    assert sorted(map(sorted, by_parent.values())) == [[0, 1], [2, 3]]
    for r in ranks:
        node = [2 * r["node_rank"], 2 * r["node_rank"] + 1]
        if ulysses_size == 1:  # the ring inside the node, data parallel across
            assert r["groups"]["ring"] == node and r["groups"]["dp"] == [r["local_rank"], r["local_rank"] + 2]
        else:  # the Ulysses all-to-all inside the node, the ring across the nodes, one sequence group
            assert r["groups"]["ulysses"] == node and r["groups"]["ring"] == [r["local_rank"], r["local_rank"] + 2]
            assert r["groups"]["sequence"] == [0, 1, 2, 3] and r["groups"]["dp"] == [r["global_rank"]]

    # (c) node 1 dies at step 12; the other node's ranks fail instead of hanging, no launcher succeeds
    out = tmp_path / "run"
    lose = ["+callbacks.lose._target_=tests.app.helpers.LoseNodeOnce", "+callbacks.lose.step=12",
            f"+callbacks.lose.marker={tmp_path / 'lost'}"]
    codes, logs, _ = launch_two_nodes(out, "crash", *sizes, *lose)
    assert all(c != 0 for c in codes), "\n=====\n".join(log[-3000:] for log in logs)
    failures = [ln for ln in "".join(logs).splitlines() if ln.startswith("[ring-train] rank ")]
    # node 0's ranks learn at once that the other node is gone ("reset by peer"), not after comm_timeout
    assert sorted(ln.split()[2] for ln in failures) == ["0", "1"], failures
    assert all("reset by peer" in ln or "closed" in ln for ln in failures), failures
    ckpts = out / "checkpoints"
    assert (ckpts / "step000010.ckpt").exists() and not (ckpts / "step000015.ckpt").exists()

    # (d) the same two commands again: resume from step 10, steps 10..19 exactly as the uninterrupted run
    text = _ok(*launch_two_nodes(out, "resume", *sizes, *lose)[:2])
    assert text.count(f"resuming from {ckpts / 'step000010.ckpt'}") == 1, text[-3000:]
    assert text.count(f"== ring-train summary (step {STEPS}) ==") == 1
    got = _losses(out)
    assert sorted(got) == list(range(STEPS)) and got == want  # bit-equal floats, every step
    got_w, want_w = final_weights(ckpts / f"step{STEPS:06d}.ckpt"), final_weights(reference / "checkpoints" /
                                                                                    f"step{STEPS:06d}.ckpt")
    assert got_w.keys() == want_w.keys()
    for k in want_w:
        torch.testing.assert_close(got_w[k], want_w[k], rtol=0, atol=0, msg=k)


def test_lightnings_own_launcher_on_two_nodes(tmp_path: Path) -> None:
    """Without torchrun or SLURM: ``NODE_RANK=i MASTER_ADDR=... ring-train num_nodes=2`` per node, and Lightning
    re-runs the command for local rank 1 of each node; node 1's first process owns no file."""
    out, ranks_dir, port = tmp_path / "run", tmp_path / "ranks", free_port()
    cmd = [prefork.python(), "-m", "ring_plugin.app.train", f"hydra.run.dir={out}", *TINY, *FAST, "max_steps=6",
           "+callbacks.ranks._target_=tests.app.helpers.RecordRanks", f"+callbacks.ranks.dir={ranks_dir}"]
    procs = [subprocess.Popen(cmd, cwd=REPO, env={**env(), "NODE_RANK": str(node), "MASTER_ADDR": "127.0.0.1",
                                                   "MASTER_PORT": str(port)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for node in (0, 1)]
    try:
        logs = [proc.communicate(timeout=LAUNCH_TIMEOUT)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                for pid in _descendants(proc.pid):
                    _kill(pid)
                _kill(proc.pid)
                proc.wait()
    text = _ok([p.returncode for p in procs], logs)
    assert "4 processes on 2 nodes (lightning)" in text and text.count("== ring-train summary (step 6) ==") == 1
    assert [int(r["step"]) for r in read_csv_metrics(out) if r.get("train/loss")] == list(range(6))
    ranks = _ranks(ranks_dir)
    assert {r["cluster_environment"] for r in ranks} == {"LightningEnvironment"}
    for node, pid in enumerate(p.pid for p in procs):  # each node's command is its local rank 0 ...
        first, second = ranks[2 * node], ranks[2 * node + 1]
        assert (first["pid"], first["node_rank"], first["local_rank"]) == (pid, node, 0)
        assert (second["ppid"], second["node_rank"], second["local_rank"]) == (pid, node, 1)  # ... and spawned 1


def test_launcher_and_global_rank_zero_from_the_environment() -> None:
    torchrun = {"TORCHELASTIC_RUN_ID": "x", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "8"}
    assert launcher(torchrun) == "torchrun" and is_global_rank_zero(torchrun)
    # `srun torchrun`: SLURM_PROCID is the node's task, RANK decides (c10d may put rank 0 on any node)
    assert is_global_rank_zero({**torchrun, "SLURM_NTASKS": "2", "SLURM_PROCID": "1"})
    assert not is_global_rank_zero({**torchrun, "RANK": "4", "LOCAL_RANK": "0", "SLURM_PROCID": "0"})
    slurm = {"SLURM_NTASKS": "16", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_JOB_NAME": "train"}
    assert launcher(slurm) == "slurm" and is_global_rank_zero(slurm)
    assert not is_global_rank_zero({**slurm, "SLURM_PROCID": "8"})  # local rank 0 of node 1 owns nothing
    # an interactive allocation: Lightning's own launcher, ranks from LOCAL_RANK / NODE_RANK
    assert launcher({**slurm, "SLURM_JOB_NAME": "bash", "SLURM_PROCID": "3"}) == "lightning"
    assert is_global_rank_zero({}) and not is_global_rank_zero({"NODE_RANK": "1"})
    assert not is_global_rank_zero({"LOCAL_RANK": "1"}) and not is_global_rank_zero({"GROUP_RANK": "1"})


def test_devices_and_num_nodes_must_match_the_launcher() -> None:
    torchrun = {"TORCHELASTIC_RUN_ID": "x", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "4",
                "LOCAL_WORLD_SIZE": "2"}
    check_launch(2, 2, torchrun)
    with pytest.raises(ConfigError, match=r"devices=4 but torchrun started 2 \(LOCAL_WORLD_SIZE, --nproc-per-node\)"):
        check_launch(4, 1, torchrun)
    with pytest.raises(ConfigError, match=r"devices x num_nodes=2 but torchrun started 4"):
        check_launch(2, 1, torchrun)
    slurm = {"SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8", "SLURM_NNODES": "2", "SLURM_PROCID": "0"}
    check_launch(8, 2, slurm)
    with pytest.raises(ConfigError, match=r"num_nodes=1 but slurm started 2 \(SLURM_NNODES, --nodes\)"):
        check_launch(8, 1, slurm)
    check_launch(8, 2, {**slurm, "SLURM_NTASKS_PER_NODE": "8(x2)"})  # not a plain number: Lightning checks it
    check_launch(3, 5, {})  # Lightning's own launcher: it starts what devices x num_nodes say
