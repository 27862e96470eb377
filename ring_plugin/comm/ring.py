"""Point-to-point ring exchange: send a tensor to the next rank while receiving from the previous one.

Exchanges are started with ``batch_isend_irecv`` and waited on later, so the next shard is in
flight while the current one is computed. Optional statistics (bytes, time waiting vs computing)
and a timeout that turns a silent peer into a :class:`RingTimeoutError` instead of a hang; a peer
whose process died is reported as such (:class:`RingPeerClosedError`), usually at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist


class RingPeerError(RuntimeError):
    """A ring peer failed during an exchange; the subclasses say how, when the backend's error tells."""


class RingTimeoutError(RingPeerError):
    """A ring peer did not answer within the configured timeout (alive but silent, or very slow)."""


class RingPeerClosedError(RingPeerError):
    """A ring peer closed its connection: its process ended (crashed, was killed) or its network failed."""


# Words in gloo/NCCL/socket errors that mean the connection went away rather than a wait ran out.
_CLOSED_MARKERS = ("connection closed", "connection reset", "broken pipe", "connection refused",
                   "remote process exited", "peer closed", "socket closed", "end of file")


def peer_error(err: RuntimeError, waited: float, timeout: float | None, where: str) -> RingPeerError:
    """Name what happened to a peer from a backend error: a closed connection, a timeout, or neither.

    Only a wait that lasted about as long as the timeout (or whose error says so) is called a timeout.
    """
    text = str(err).lower()
    if any(m in text for m in _CLOSED_MARKERS):
        return RingPeerClosedError(
            f"ring peer closed the connection after {waited:.1f} s ({where}): its process probably died; its "
            f"own log says why. Backend error: {err}"
        )
    if "timed out" in text or "timeout" in text or (timeout is not None and waited >= 0.9 * timeout):
        limit = f"{timeout:.1f} s" if timeout is not None else "the process-group timeout"
        return RingTimeoutError(f"ring peer did not answer within {limit} ({where}): {err}")
    return RingPeerError(f"ring exchange failed after {waited:.1f} s ({where}): {err}")


@dataclass
class RingStats:
    """Communication statistics, accumulated over forward and backward passes."""

    bytes_sent: int = 0
    messages: int = 0
    steps: int = 0
    wait_seconds: float = 0.0
    compute_seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)

    def reset(self) -> None:
        self.bytes_sent = self.messages = self.steps = 0
        self.wait_seconds = self.compute_seconds = 0.0
        self.history.clear()

    @property
    def wait_fraction(self) -> float:
        total = self.wait_seconds + self.compute_seconds
        return self.wait_seconds / total if total > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "bytes_sent": float(self.bytes_sent),
            "messages": float(self.messages),
            "steps": float(self.steps),
            "wait_seconds": self.wait_seconds,
            "compute_seconds": self.compute_seconds,
            "wait_fraction": self.wait_fraction,
        }


class PendingExchange:
    def __init__(self, works: list, recv: list[torch.Tensor], comm: RingComm):
        self._works = works
        self._recv = recv
        self._comm = comm

    def wait(self) -> list[torch.Tensor]:
        self._comm._wait(self._works)
        return self._recv


class RingComm:
    """Sends to ``rank + 1`` and receives from ``rank - 1`` within ``group``."""

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        stats: RingStats | None = None,
        timeout: float | None = None,
    ):
        self.group = group
        self.world_size = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        self.stats = stats
        self.timeout = timeout
        if self.world_size > 1:
            self.next_peer = dist.get_global_rank(group, (self.rank + 1) % self.world_size)
            self.prev_peer = dist.get_global_rank(group, (self.rank - 1) % self.world_size)
        self._mark = time.perf_counter()

    def exchange(self, tensors: list[torch.Tensor]) -> PendingExchange:
        """Start sending ``tensors`` to the next rank and receiving same-shaped ones from the previous."""
        return self.exchange_with(tensors, self.rank + 1, [torch.empty_like(t) for t in tensors], self.rank - 1)

    def exchange_with(
        self,
        send: list[torch.Tensor] | None,
        to: int,
        recv: list[torch.Tensor] | None,
        frm: int,
    ) -> PendingExchange:
        """Start sending ``send`` to ring rank ``to`` and receiving into ``recv`` from ring rank ``frm``.

        The direct exchanges of a sub-ring (the ranks that share a segment): either side may be
        ``None``, and the caller sizes ``recv`` from the config and global shapes, exactly as the
        sender sizes what it sends, so both sides post matching messages in the same order.
        """
        ops = []
        if send:
            peer = dist.get_global_rank(self.group, to % self.world_size)
            ops += [dist.P2POp(dist.isend, t.contiguous(), peer, self.group) for t in send]
        if recv:
            peer = dist.get_global_rank(self.group, frm % self.world_size)
            ops += [dist.P2POp(dist.irecv, r, peer, self.group) for r in recv]
        works = dist.batch_isend_irecv(ops) if ops else []
        if self.stats is not None and send:
            self.stats.bytes_sent += sum(t.numel() * t.element_size() for t in send)
            self.stats.messages += len(send)
        return PendingExchange(works, list(recv or []), self)

    # Timing: the time between two waits is compute; the wait itself is time lost to the ring.
    def start_compute(self) -> None:
        if self.stats is not None:
            self._mark = time.perf_counter()

    def _wait(self, works: list) -> None:
        if self.stats is not None:
            self._sync()
            start = time.perf_counter()
            self.stats.compute_seconds += start - self._mark
        began = time.monotonic()
        try:
            for w in works:
                if self.timeout is not None:
                    w.wait(timedelta(seconds=self.timeout))
                else:
                    w.wait()
        except RuntimeError as err:
            where = (f"rank {self.rank} of {self.world_size}, previous peer global rank {self.prev_peer}, "
                     f"next {self.next_peer}")
            raise peer_error(err, time.monotonic() - began, self.timeout, where) from err
        if self.stats is not None:
            self._sync()
            end = time.perf_counter()
            self.stats.wait_seconds += end - start
            self.stats.steps += 1
            self._mark = end

    def _sync(self) -> None:
        # Host timers only mean something once queued GPU work is done; this costs overlap, so
        # it happens only when statistics were asked for.
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.current_stream().synchronize()
