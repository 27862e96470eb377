"""What is allocated at a training step's peak, and where it came from (CUDA only).

``PeakSnapshot(step)`` is a Lightning callback: it records the caching allocator's history during
training batch ``step`` (``torch.cuda.memory._record_memory_history``), then replays that history to
find the moment of the step's highest allocated memory and lists the blocks alive at that moment,
grouped by block size (which names the tensor: tokens x width x bytes) and, where the allocator kept
stacks, by where they were allocated (the innermost ``ring_plugin`` frame and the innermost frame).
Blocks allocated before the step (weights, optimizer states, ZeRO partitions) are one ``before the
step`` line. This is how the planner's memory model is checked term by term against a real step.

``peak_breakdown(trace, baseline)`` is the replay alone, on the allocator's trace entries (dicts with
``action``, ``addr``, ``size``, ``frames``), so it can be tested without a GPU.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

GROUPS_REPORTED = 40


def _where(frames: list[dict[str, Any]]) -> str:
    """``file:line function`` of the innermost frame in ring_plugin (else in benchmarks), plus the
    innermost frame's function when that is a different one (the torch op that allocated)."""
    def tag(f: dict[str, Any]) -> str:
        path = str(f.get("filename", "?"))
        short = path.split("site-packages/")[-1].split("ring_plugin/", 1)[-1]
        return f"{short}:{f.get('line', '?')} {f.get('name', '?')}"

    ours = next((f for f in frames if "ring_plugin" in str(f.get("filename", ""))), None)
    ours = ours or next((f for f in frames if "benchmarks" in str(f.get("filename", ""))), None)
    inner = frames[0] if frames else None
    if ours is None:
        return tag(inner) if inner else "(no python frame: autograd engine)"
    return tag(ours) if inner is None or inner is ours else f"{tag(ours)} <- {inner.get('name', '?')}"


def peak_breakdown(trace: list[dict[str, Any]], baseline: int) -> dict[str, Any]:
    """Replay ``alloc`` / ``free_requested`` entries from ``baseline`` bytes; at the highest point, the
    live blocks grouped by :func:`_where` (largest first), in bytes."""
    peak_index, peak = _peak(trace, baseline)
    live: dict[int, tuple[int, list[dict[str, Any]]]] = {}  # addr -> (size, frames), up to the peak
    for entry in trace[:peak_index + 1]:
        if entry.get("action") == "alloc":
            live[entry.get("addr")] = (int(entry.get("size", 0)), entry.get("frames", []))
        elif entry.get("action") == "free_requested":
            live.pop(entry.get("addr"), None)
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    sizes: dict[int, int] = defaultdict(int)  # without stacks, a block's size names the tensor (n x d x bytes)
    for size, frames in live.values():
        group = groups[_where(frames)]
        group[0] += size
        group[1] += 1
        sizes[size] += 1
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])
    by_size = sorted(sizes.items(), key=lambda kv: -kv[0] * kv[1])
    return {
        "baseline_bytes": baseline, "peak_bytes": peak, "peak_entry": peak_index, "entries": len(trace),
        "at_peak": [{"where": "before the step (states, partitions, buffers)", "bytes": baseline, "blocks": 0}]
        + [{"where": w, "bytes": b, "blocks": n} for w, (b, n) in ranked[:GROUPS_REPORTED]],
        "other_bytes": sum(b for _, (b, _) in ranked[GROUPS_REPORTED:]),
        "at_peak_by_size": [{"bytes_each": size, "blocks": n} for size, n in by_size[:GROUPS_REPORTED]],
        "peak_allocator_entry": trace[peak_index].get("action") if peak_index >= 0 else None,
    }


def _peak(trace: list[dict[str, Any]], baseline: int) -> tuple[int, int]:
    """(index of the entry at the highest allocated total, that total); (-1, baseline) if it never rises.
    Frees of blocks allocated before the trace began are not counted (their sizes are in ``baseline``)."""
    allocated: dict[int, int] = {}
    current = peak = baseline
    peak_index = -1
    for i, entry in enumerate(trace):
        if entry.get("action") == "alloc":
            allocated[entry.get("addr")] = int(entry.get("size", 0))
            current += allocated[entry.get("addr")]
            if current > peak:
                peak, peak_index = current, i
        elif entry.get("action") == "free_requested" and entry.get("addr") in allocated:
            current -= allocated.pop(entry.get("addr"))
    return peak_index, peak


class PeakSnapshot(Callback):
    """Record training batch ``step``'s allocations and keep :func:`peak_breakdown` in ``self.result``."""

    def __init__(self, step: int):
        self.step = step
        self.result: dict[str, Any] | None = None
        self._baseline = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.step:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._baseline = torch.cuda.memory_allocated()
            # No stacks: capturing Python frames inside autograd Functions fails on torch 2.11
            # ("SystemError: apply ... returned NULL"); block sizes identify the tensors instead.
            torch.cuda.memory._record_memory_history(max_entries=2_000_000, context=None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx != self.step:
            return
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        trace = snapshot["device_traces"][torch.cuda.current_device()]
        self.result = peak_breakdown(trace, self._baseline)
        self.result["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
