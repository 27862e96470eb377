"""The one prefetch schedule every ring algorithm uses: post round i + 1, wait round i, compute.

Messages of the next round are in flight while this round is computed, so a ring costs
``max(compute, transfer)`` per round rather than their sum.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from ..comm.ring import PendingExchange, RingComm

Received = list[torch.Tensor]
# post(i, previous): start round i's messages; ``previous`` is what round i - 1 brought (None for 0).
Post = Callable[[int, "Received | None"], PendingExchange]


def prefetched(comm: RingComm, rounds: int, post: Post) -> Iterator[Received]:
    """Round 0 is posted now; the iterator yields what each round brings, in order.

    Round ``i + 1`` is posted as soon as round ``i`` has arrived, before the caller computes on it,
    so work done before the first ``next()`` (a rank's own shard) and each round's compute overlap
    the next transfer. ``post`` may forward what the previous round brought (the dense ring does).
    """
    if rounds <= 0:
        return iter(())
    first = post(0, None)
    comm.start_compute()
    return _arrivals(comm, rounds, post, first)


def _arrivals(comm: RingComm, rounds: int, post: Post, pending: PendingExchange) -> Iterator[Received]:
    for i in range(rounds):
        received = pending.wait()
        if i + 1 < rounds:
            pending = post(i + 1, received)
        comm.start_compute()
        yield received
