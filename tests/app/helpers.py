"""Helpers for the app tests: run ``ring-train`` in a subprocess, read its logs back, inject faults."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from tests import prefork

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "max_steps=20", "seq_len=64", "data.batch_size=2", "data.val_batches=1", "trainer.val_check_interval=10",
    "trainer.log_every_n_steps=5", "model.n_embd=32", "model.n_head=2", "model.n_kv_head=2",
    "callbacks.checkpointing.every_n_train_steps=5", "trainer.enable_progress_bar=false", "comm_timeout=20",
]


def ring_train_cmd(out: Path, *overrides: str) -> list[str]:
    return [prefork.python(), "-m", "ring_plugin.app.train", f"hydra.run.dir={out}", *TINY, *overrides]


def env() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "1"}


def run_ring_train(out: Path, *overrides: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(ring_train_cmd(out, *overrides), cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=timeout)


def exited_pid() -> int:
    """The pid of a process that has already exited (what a lock left by a crashed run names)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def read_csv_metrics(out: Path) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for path in sorted((out / "csv").glob("version_*/metrics.csv")):
        with open(path) as f:
            rows += list(csv.DictReader(f))
    return rows


def _wandb_payloads(data: bytes) -> list[bytes]:
    """Payloads of a ``.wandb`` file: a 7-byte header, then LevelDB-log records in 32 KiB blocks
    (each: crc32 u32, length u16, type u8 = full 1 / first 2 / middle 3 / last 4)."""
    block, pos, out, partial = 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            partial = chunk
        elif kind in (3, 4):
            partial += chunk
            if kind == 4:
                out.append(partial)
        else:
            break
    return out


def read_wandb_history(out: Path) -> list[dict[str, Any]]:
    """History rows of the offline W&B run(s), decoded from wandb's own protobuf records."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for path in sorted(out.glob("wandb/offline-run-*/run-*.wandb")):
        for payload in _wandb_payloads(path.read_bytes()):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def read_wandb_runs(out: Path) -> list[dict[str, Any]]:
    """Per offline W&B run file under ``out`` (any depth): its id, group, job type, name, config and summary."""
    from wandb.proto import wandb_internal_pb2

    runs = []
    for path in sorted(out.glob("**/wandb/offline-run-*/run-*.wandb")):
        run: dict[str, Any] = {"config": {}, "summary": {}}
        for payload in _wandb_payloads(path.read_bytes()):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                r = record.run
                run.update(id=r.run_id, group=r.run_group, job_type=r.job_type, name=r.display_name, tags=list(r.tags))
            elif kind in ("config", "summary"):
                items = record.config.update if kind == "config" else record.summary.update
                run[kind].update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items})
        runs.append(run)
    return runs


def final_weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


class NanGradients(Callback):
    """Poisons one rank's gradients at the given steps (after DDP's all-reduce, so only that rank sees it)."""

    def __init__(self, steps: list[int], rank: int = 0):
        self.steps = set(steps)
        self.rank = rank

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step in self.steps and trainer.global_rank == self.rank:
            next(p for p in pl_module.parameters() if p.grad is not None).grad.fill_(float("nan"))


class HangOnce(Callback):
    """Rank ``rank`` stops answering at ``step`` on the first torchrun attempt: alive but silent, a dead ring peer.

    It writes ``marker`` (the time it went silent) and sleeps; SIGTERM (torchrun tearing the group down)
    ends it at once. Later attempts (``TORCHELASTIC_RESTART_COUNT`` > 0) train normally.
    """

    def __init__(self, step: int, marker: str, rank: int = 1):
        self.step = step
        self.marker = marker
        self.rank = rank

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if not (first_attempt and trainer.global_step == self.step and trainer.global_rank == self.rank):
            return
        import signal

        signal.signal(signal.SIGTERM, lambda *_: os._exit(143))
        Path(self.marker).write_text(str(time.time()))
        time.sleep(600)
        os._exit(1)


def corrupt_tensor_bytes(path: Path, count: int = 256) -> None:
    """Overwrite ``count`` bytes in the middle of the largest tensor of a ``torch.save`` zip, leaving the zip
    structure intact (the file still opens and loads). 0x7f bytes read as finite float32 values (~3.4e38)."""
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    assert info.compress_type == zipfile.ZIP_STORED and info.file_size >= count, info
    with open(path, "r+b") as fh:
        fh.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", fh.read(4))
        fh.seek(info.header_offset + 30 + name_len + extra_len + (info.file_size - count) // 2)
        fh.write(b"\x7f" * count)


class FailRestore(Callback):
    """Fails while a checkpoint is being restored: a resume that breaks after it started loading."""

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        raise RuntimeError("restore failed on purpose")


class ExitOnce(Callback):
    """Rank ``rank`` exits at once (a crashed process, exit code 137) at the start of step ``step``, once: the
    ``marker`` file it writes first makes the same command, run again, train through."""

    def __init__(self, step: int, marker: str, rank: int = 1):
        self.step = step
        self.marker = Path(marker)
        self.rank = rank

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank and not self.marker.exists():
            self.marker.write_text(str(time.time()))
            os._exit(137)


class LateStart(Callback):
    """Delays rank ``rank`` by ``seconds`` while the run is being built, before it joins the rendezvous."""

    def __init__(self, seconds: float, rank: int = 1):
        if os.environ.get("LOCAL_RANK", "0") == str(rank):
            time.sleep(seconds)


class RecordRanks(Callback):
    """Writes ``<dir>/rank<R>.json`` per rank at the start of training: who started the process, which node
    it is on and the global ranks of its mesh groups (what a multi-node launch must get right)."""

    def __init__(self, dir: str):
        self.dir = Path(dir)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import torch.distributed as dist

        mesh = trainer.strategy.ring_groups.mesh
        groups = {name: dist.get_process_group_ranks(g) if g is not None else [trainer.global_rank]
                  for name, g in mesh.dims}
        launcher = getattr(trainer.strategy, "launcher", None)
        record = {
            "global_rank": trainer.global_rank, "local_rank": trainer.local_rank, "node_rank": trainer.node_rank,
            "world_size": trainer.world_size, "pid": prefork.visible_pid(), "ppid": prefork.visible_parent_pid(),
            "cluster_environment": type(trainer.strategy.cluster_environment).__name__,
            "launcher": type(launcher).__name__ if launcher is not None else None,
            # False: Lightning's launcher would re-run the command for local ranks 1..
            "external_processes": trainer.strategy.cluster_environment.creates_processes_externally,
            "groups": groups,
        }
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


class LoseNodeOnce(Callback):
    """Node ``node`` dies at the start of step ``step`` on the first launch: its torchrun agent is SIGKILLed and
    its ranks exit at once, like a machine that went away. ``marker`` (per rank) makes later launches train on."""

    def __init__(self, step: int, marker: str, node: int = 1):
        self.step = step
        self.marker = marker
        self.node = node
        # The agent's pid now, while it surely is the parent: after it died, getppid() would name init.
        self.agent = prefork.visible_parent_pid() if "TORCHELASTIC_RUN_ID" in os.environ else None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if trainer.global_step != self.step or trainer.node_rank != self.node:
            return
        marker = Path(f"{self.marker}.rank{trainer.global_rank}")
        if marker.exists():
            return
        marker.write_text(str(time.time()))
        import signal

        if self.agent is not None and prefork.visible_parent_pid() == self.agent:  # else the other rank was first
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.agent, signal.SIGKILL)
        os._exit(137)
