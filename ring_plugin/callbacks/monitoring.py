"""``RingMonitor``: throughput, MFU, memory, ring communication and step-time skew, to every logger.

Every ``log_every_n_steps`` optimizer steps it reduces its counters across all ranks and logs, under
``monitor/``: ``tokens_per_s`` (whole job), ``mfu`` (model FLOPs per token × tokens/s over the summed
device peak), ``peak_mem_gb`` (max over ranks) and ``peak_mem_gb_rank{r}``, ``ring_bytes_sent``
(per rank and step), ``ring_wait_frac`` (share of ring time spent waiting on a peer),
``step_time_s`` and ``step_skew`` ((slowest - fastest) / mean step time across ranks). The loss and LR are
``train/loss`` and ``train/lr`` (logged once, by the model). The first step of each attempt (start-up, first
allocations) is left out of the timing; a last window shorter than ``log_every_n_steps`` is logged when
training ends, so a short run still measures its throughput.
"""

from __future__ import annotations

import resource
import time
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from ..comm.ring import RingStats
from ..gpu_peaks import BF16_PEAK_FLOPS


def device_peak_flops(device: torch.device, cpu_peak_flops: float) -> float:
    """The device's dense bf16 peak by its name (an explicit ``peak_flops`` of the callback wins)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, peak in BF16_PEAK_FLOPS.items():
            if fragment in name:
                return peak
    return cpu_peak_flops


def _peak_memory_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _flops_per_token(pl_module: pl.LightningModule, seq_len: int) -> float:
    for owner in (pl_module, getattr(pl_module, "model", None)):
        fn = getattr(owner, "flops_per_token", None)
        if callable(fn):
            return float(fn(seq_len))
    # Fallback: 6 N (forward + backward of the weights), ignoring attention.
    return 6.0 * sum(p.numel() for p in pl_module.parameters())


def _ring_totals(pl_module: pl.LightningModule) -> torch.Tensor:
    totals = torch.zeros(3, dtype=torch.float64)
    for m in pl_module.modules():
        stats = getattr(m, "stats", None)
        if isinstance(stats, RingStats):
            totals += torch.tensor([stats.bytes_sent, stats.wait_seconds, stats.compute_seconds], dtype=torch.float64)
    return totals


class RingMonitor(Callback):
    def __init__(self, log_every_n_steps: int = 10, peak_flops: float | None = None,
                 cpu_peak_flops: float = 1.0e11):
        if log_every_n_steps < 1:
            raise ValueError(f"callbacks.monitoring.log_every_n_steps={log_every_n_steps} must be >= 1")
        self.log_every_n_steps = log_every_n_steps
        self.peak_flops = peak_flops
        self.cpu_peak_flops = cpu_peak_flops
        self.last: dict[str, float] = {}
        self.total_tokens = 0.0
        self.total_time = 0.0
        self._reset_window()
        self._t0 = 0.0
        self._warm = False

    def _reset_window(self) -> None:
        self._tokens = 0.0
        self._time = 0.0
        self._steps = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ring0 = _ring_totals(pl_module)
        self._reset_window()
        self._warm = False

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._steps > 0:  # a stop before max_steps; every rank ran the same steps: the collectives match
            self._log(trainer, pl_module, progress_bar=False)  # self.log is not allowed here

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._warm:  # the attempt's first step: start-up cost, not throughput
            self._warm = True
            self._ring0 = _ring_totals(pl_module)
            return
        self._time += time.perf_counter() - self._t0
        self._steps += 1
        ids = batch["input_ids"] if isinstance(batch, dict) else batch[0]
        self._seq_local = ids.shape[-1]
        self._tokens += float(ids.numel())  # this rank's shard; summed over ranks below
        last = 0 < trainer.max_steps <= trainer.global_step  # before the final checkpoint, which keeps the numbers
        if trainer.global_step % self.log_every_n_steps == 0 or last:
            self._log(trainer, pl_module)

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, progress_bar: bool = True) -> None:
        device = pl_module.device
        world = trainer.world_size
        ring = _ring_totals(pl_module)
        delta = ring - self._ring0
        self._ring0 = ring
        mem = _peak_memory_bytes(device)
        # One all-reduce for sums and one gather for per-rank values keep this cheap.
        sums = torch.tensor([self._tokens, delta[0], delta[1], delta[2]],
                            dtype=torch.float64, device=device)
        per_rank = torch.tensor([self._time / self._steps, mem], dtype=torch.float64, device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
            gathered = [torch.zeros_like(per_rank) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, per_rank)
            ranks = torch.stack(gathered).cpu()
        else:
            ranks = per_rank.cpu().unsqueeze(0)
        tokens, ring_bytes, wait, compute = sums.cpu().tolist()
        step_times, mems = ranks[:, 0], ranks[:, 1]
        window = float(step_times.max()) * self._steps  # the job moves at its slowest rank's pace
        tokens_per_s = tokens / window if window > 0 else 0.0
        peak = self.peak_flops or device_peak_flops(device, self.cpu_peak_flops)
        seq_len = self._seq_local * (world // max(1, _dp_size(trainer)))
        metrics = {
            "monitor/tokens_per_s": tokens_per_s,
            "monitor/mfu": _flops_per_token(pl_module, seq_len) * tokens_per_s / (peak * world),
            "monitor/peak_mem_gb": float(mems.max()) / 1e9,
            "monitor/ring_bytes_sent": ring_bytes / world / self._steps,
            "monitor/ring_wait_frac": wait / (wait + compute) if wait + compute > 0 else 0.0,
            "monitor/step_time_s": float(step_times.mean()),
            "monitor/step_skew": float((step_times.max() - step_times.min()) / step_times.mean()),
        }
        for r, m in enumerate(mems.tolist()):
            metrics[f"monitor/peak_mem_gb_rank{r}"] = m / 1e9
        self.total_tokens += tokens
        self.total_time += window
        self.last = metrics
        self._reset_window()
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                # The index of the window's last step, as Lightning logs train/* (global_step counts it done).
                logger.log_metrics(metrics, step=trainer.global_step - 1)
        if progress_bar:
            pl_module.log("tok/s", tokens_per_s, prog_bar=True, logger=False, rank_zero_only=True)

    @property
    def mean_tokens_per_s(self) -> float:
        return self.total_tokens / self.total_time if self.total_time > 0 else 0.0


def _dp_size(trainer: pl.Trainer) -> int:
    kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
    return int(kwargs.get("num_replicas", trainer.world_size))
