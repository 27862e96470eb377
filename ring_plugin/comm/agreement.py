"""Input checks that every rank agrees on before the first ring message.

Each rank checks its own inputs, then all ranks exchange a small summary (error flag and shape
signature) in one all-gather. If any rank failed, or the ranks disagree, every rank raises the same
``ValueError``: a bad input never leaves one rank waiting for a peer that already gave up.
"""

from __future__ import annotations

import time
from collections.abc import Callable
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
    deferred: tuple[torch.Tensor, Callable[[], str | None]] | None = None,
) -> None:
    """Raise on every rank if any rank reported an error or the signatures differ.

    ``timeout``: seconds to wait for the other ranks (a silent peer raises ``RingTimeoutError``, one
    whose process ended ``RingPeerClosedError``). ``deferred``: a check of values on the device,
    ``(flag, explain)``: a 0-dim tensor on ``device``, nonzero where this rank's input is bad, that
    travels with the agreement (so reading it costs no host sync of its own), and what to raise then.
    """
    world = dist.get_world_size(group) if group is not None else 1
    if world == 1:
        if local_error:
            raise ValueError(local_error)
        if deferred is not None and bool(deferred[0]):
            raise ValueError(deferred[1]())
        return
    sig = list(signature)[:_SIG_LEN] + [0] * (_SIG_LEN - len(signature))
    mine = torch.tensor([1 if local_error else 0, *sig, 0], dtype=torch.int64, device=device)
    if deferred is not None and local_error is None:
        mine[-1] = deferred[0].to(device=device, dtype=torch.int64)
    rows = gather_rows(mine, group, timeout, f"input check, ring of {world}")
    failed = [r for r, row in enumerate(rows) if row[0] or row[-1]]
    if local_error:
        raise ValueError(local_error)
    if deferred is not None and rows[dist.get_rank(group)][-1]:
        raise ValueError(deferred[1]())
    if failed:
        raise ValueError(f"ring input check failed on rank(s) {failed} of the ring; see their error")
    if any(row[1:-1] != rows[0][1:-1] for row in rows):
        shapes = {r: row[1:-1] for r, row in enumerate(rows)}
        raise ValueError(f"ranks of the ring were given inputs of different shapes/dtypes: {shapes}")


def gather_rows(mine: torch.Tensor, group: dist.ProcessGroup | None, timeout: float | None,
                where: str) -> list[list[int]]:
    """Every rank's ``mine`` (a small 1-D tensor), as one list per rank: one all-gather that waits at most
    ``timeout`` seconds for the peers (a silent one raises ``RingTimeoutError``, a dead one
    ``RingPeerClosedError``), read back in one copy to the host."""
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    work = dist.all_gather(gathered, mine, group=group, async_op=True)
    began = time.monotonic()
    try:
        work.wait(timedelta(seconds=timeout)) if timeout is not None else work.wait()
    except RuntimeError as err:
        raise peer_error(err, time.monotonic() - began, timeout, where) from err
    return torch.stack(gathered).tolist()
