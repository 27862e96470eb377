"""What a rank is told when its ring peer goes away: a closed connection, not a timeout (gloo, 2 CPU
processes). A silent peer is still a timeout: ``test_ring_errors.py``."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist

from ring_plugin import create_ring_attention
from ring_plugin.comm.ring import RingComm, RingPeerClosedError, RingPeerError
from ring_plugin.testing import run_in_process_group

pytestmark = pytest.mark.timeout(120)
TIMEOUT = 30.0


def _ring_call(where: str) -> Callable[[], object]:
    if where == "exchange":
        comm = RingComm(dist.group.WORLD, timeout=TIMEOUT)
        return lambda: comm.exchange([torch.ones(16)]).wait()
    x = torch.randn(1, 8, 2, 4)  # a layer, whose first collective is the input check all ranks agree on
    attn = create_ring_attention("distributed", comm_timeout=TIMEOUT)
    return lambda: attn(x, x, x)


def _peer_leaves_worker(rank: int, world: int, where: str) -> tuple[str, str, float]:
    call = _ring_call(where)
    dist.barrier()
    if rank == 1:
        time.sleep(1.0)  # rank 0 is waiting on it by now
        dist.destroy_process_group()  # its connections close, as those of a killed process do
        return "peer", "", 0.0
    start = time.monotonic()
    try:
        call()
    except RingPeerError as err:
        return type(err).__name__, str(err), time.monotonic() - start
    return "no error", "", time.monotonic() - start


@pytest.mark.parametrize("where", ["exchange", "input check"])
def test_a_peer_that_went_away_is_a_closed_connection_not_a_timeout(where: str) -> None:
    kind, message, elapsed = run_in_process_group(_peer_leaves_worker, 2, where, timeout=90)[0]
    assert kind == RingPeerClosedError.__name__, (kind, message)
    assert "ring peer closed the connection after" in message and "did not answer" not in message, message
    assert elapsed < 10.0 < TIMEOUT, elapsed  # reported when it happened, not after the timeout

