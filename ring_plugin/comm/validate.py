"""Input checks that every rank agrees on before the first ring message.

Each rank checks its own inputs, then all ranks exchange a small summary (error flag and shape
signature) in one all-gather. If any rank failed, or the ranks disagree, every rank raises the same
``ValueError``: a bad input never leaves one rank waiting for a peer that already gave up.
"""

from __future__ import annotations

import time
from datetime import timedelta

import torch
import torch.distributed as dist

from .ring import peer_error

_SIG_LEN = 12


def agree_or_raise(
    local_error: str | None,
    signature: tuple[int, ...],
    group: dist.ProcessGroup | None,
    device: torch.device,
    timeout: float | None = None,
) -> None:
    """Raise on every rank if any rank reported an error or the signatures differ.

    ``timeout``: seconds to wait for the other ranks (a silent peer raises ``RingTimeoutError``, one
    whose process ended ``RingPeerClosedError``).
    """
    world = dist.get_world_size(group) if group is not None else 1
    if world == 1:
        if local_error:
            raise ValueError(local_error)
        return
    sig = list(signature)[:_SIG_LEN] + [0] * (_SIG_LEN - len(signature))
    mine = torch.tensor([1 if local_error else 0, *sig], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    work = dist.all_gather(gathered, mine, group=group, async_op=True)
    began = time.monotonic()
    try:
        work.wait(timedelta(seconds=timeout)) if timeout is not None else work.wait()
    except RuntimeError as err:
        raise peer_error(err, time.monotonic() - began, timeout, f"input check, ring of {world}") from err
    rows = [g.tolist() for g in gathered]
    failed = [r for r, row in enumerate(rows) if row[0]]
    if local_error:
        raise ValueError(local_error)
    if failed:
        raise ValueError(f"ring input check failed on rank(s) {failed} of the ring; see their error")
    if any(row[1:] != rows[0][1:] for row in rows):
        shapes = {r: row[1:] for r, row in enumerate(rows)}
        raise ValueError(f"ranks of the ring were given inputs of different shapes/dtypes: {shapes}")
