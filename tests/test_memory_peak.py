"""``benchmarks/memory_peak.peak_breakdown``: the replay that finds a step's peak and what is alive there."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from memory_peak import peak_breakdown  # noqa: E402

OURS = {"filename": "/x/ring_plugin/models/loss.py", "line": 31, "name": "forward"}
TORCH = {"filename": "/x/site-packages/torch/functional.py", "line": 9, "name": "matmul"}


def _alloc(addr: int, size: int, frames: list) -> dict:
    return {"action": "alloc", "addr": addr, "size": size, "frames": frames}


def _free(addr: int, size: int) -> dict:
    return {"action": "free_requested", "addr": addr, "size": size}


def test_peak_is_the_highest_point_and_lists_what_is_alive_there():
    trace = [
        _alloc(1, 100, [TORCH, OURS]),
        _alloc(2, 50, [OURS]),
        _free(1, 100),
        _alloc(3, 120, []),  # peak: 1000 + 50 + 120
        _alloc(4, 10, [TORCH]),  # (peak + 10, but only after a free)
        _free(3, 120),
        _free(99, 7),  # a block from before the step: not replayed
    ]
    trace.insert(4, _free(2, 50))
    result = peak_breakdown(trace, baseline=1000)
    assert result["peak_bytes"] == 1170 and result["peak_entry"] == 3
    alive = {row["where"]: (row["bytes"], row["blocks"]) for row in result["at_peak"]}
    assert alive == {
        "before the step (states, partitions, buffers)": (1000, 0),
        "models/loss.py:31 forward": (50, 1),
        "(no python frame: autograd engine)": (120, 1),
    }
    assert result["at_peak_by_size"] == [{"bytes_each": 120, "blocks": 1}, {"bytes_each": 50, "blocks": 1}]


def test_innermost_op_is_named_beside_our_frame():
    result = peak_breakdown([_alloc(1, 8, [TORCH, OURS])], baseline=0)
    assert result["at_peak"][1] == {"where": "models/loss.py:31 forward <- matmul", "bytes": 8, "blocks": 1}
